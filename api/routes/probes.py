"""Probes of the service itself: liveness (`/healthz`), readiness (`/readyz`) and the external-cron trigger
`/cron/sync-status` (seed 000's `/api/cron/sync-status`). The health of WhatsApp instances is in
:mod:`api.routes.instance_health`."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.deps import BearerDep, SessionDep, bearer
from api.errors import error_body, request_id
from api.schemas import FlowRunResponse
from api.spool import app_spool
from core.errors import Unauthorized, ZapsyncError
from core.names import SYNC_FLOW, SYNC_ON_DEMAND
from core.reports import SyncScope
from core.settings import get_settings
from db.engine import check_migrated
from db.repositories.reports import latest_report
from flows.runs import start_run

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """The database is reachable and migrated (503 with the reason otherwise). The webhook spool's depth
    (``spool``: records and bytes waiting for the database) is shown while it holds deliveries, and on every 503.

    A 503 here means the management API cannot answer; webhooks are still accepted into the spool. A load balancer
    in front of the webhook routes should check `/healthz` instead, or it would turn away the deliveries the spool
    exists to keep."""
    journal = app_spool(request.app)
    depth = journal.depth() if journal is not None else None
    try:
        await check_migrated()
    except ZapsyncError as exc:
        if depth is None:
            raise
        body = {**error_body(type(exc).__name__, exc.message, request_id(request)), "spool": depth}
        return JSONResponse(body, status_code=type(exc).status_code)
    return JSONResponse({"status": "ready", **({"spool": depth} if depth and depth["records"] else {})})


@router.get(
    "/cron/sync-status",
    response_model=FlowRunResponse,
    status_code=202,
    responses={502: {"description": "Started, but the newest sync could not read a whole gateway"}},
)
async def cron_sync_status(credentials: BearerDep, session: SessionDep) -> Response:
    """Start a sync of every instance for an external cron (`Authorization: Bearer $CRON_SECRET`).

    202 when the run started; 502 (the run still started) when the newest finished sync could not read a whole
    gateway — down or refusing the key — so the cron's own alerting sees the failure."""
    expected = get_settings().cron_secret
    presented = bearer(credentials)
    if (
        expected is None
        or presented is None
        or not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())
    ):
        raise Unauthorized("missing or wrong cron secret")
    # Crons fire twice now and then: one run per minute, whatever arrives. The deployment runs it (nobody waits).
    minute = datetime.now(UTC).strftime("%Y%m%d%H%M")
    parameters = {"scope": SyncScope().model_dump(mode="json"), "mode": "apply", "force": False}
    run = await start_run(SYNC_ON_DEMAND, parameters, idempotency_key=f"cron-sync-status-{minute}")
    body = FlowRunResponse(flow_run=run).model_dump(mode="json")
    last = await latest_report(session, SYNC_FLOW) or {}
    failed = list(last.get("failed_gateways") or [])
    if not failed:
        return JSONResponse(body, status_code=202)
    auth = [g["auth_error"] for _, g in sorted((last.get("by_gateway") or {}).items()) if g.get("auth_error")]
    detail = f"the newest sync could not read gateway(s) {', '.join(failed)}" + (f": {'; '.join(auth)}" if auth else "")
    return JSONResponse({**body, "failed_gateways": failed, "detail": detail}, status_code=502)
