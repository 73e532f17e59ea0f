"""`GET /metrics` in Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import SessionDep
from api.spool import app_spool

router = APIRouter(tags=["health"])


@router.get("/metrics")
async def metrics(request: Request, session: SessionDep) -> Response:
    """Sync, webhook, import, gateway and conversation metrics."""
    journal = app_spool(request.app)
    request.app.state.metrics.set_spool(journal.depth() if journal is not None else None)
    body = await request.app.state.metrics.render(session)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
