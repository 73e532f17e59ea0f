"""`GET /metrics` in Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import SessionDep, get_metrics_reader
from api.spool import app_spool

router = APIRouter(tags=["health"])


@router.get("/metrics", dependencies=[Depends(get_metrics_reader)])
async def metrics(request: Request, session: SessionDep) -> Response:
    """Sync, webhook, import, gateway and conversation metrics.

    Requires `Authorization: Bearer <token>` with `ZAPSYNC_METRICS_TOKEN` or an admin token (401 without, 403 for an
    organization's token). This is the default rather than a private bind because the metrics count every
    organization's instances, webhooks and queue and name the instances' gateways, one API port serves both, and a
    Prometheus scrape job can send a bearer token (`authorization: {credentials_file: ...}`): a dedicated metrics
    token lets the scraper read this and nothing else."""
    journal = app_spool(request.app)
    request.app.state.metrics.set_spool(journal.depth() if journal is not None else None)
    body = await request.app.state.metrics.render(session)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
