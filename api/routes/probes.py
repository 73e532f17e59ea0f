"""Probes of the service itself: liveness (`/healthz`), readiness (`/readyz`) and the external-cron trigger
`/cron/sync-status` (seed 000's `/api/cron/sync-status`). The health of WhatsApp instances is in
:mod:`api.routes.instance_health`."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from fastapi import APIRouter

from api.deps import BearerDep, bearer
from api.routes.instances import start_sync
from api.schemas import FlowRunResponse, SyncRequest
from core.errors import Unauthorized
from core.reports import SyncScope
from core.settings import get_settings
from db.engine import check_migrated

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz() -> dict[str, str]:
    """The database is reachable and migrated (503 with the reason otherwise)."""
    await check_migrated()
    return {"status": "ready"}


@router.get("/cron/sync-status", response_model=FlowRunResponse, status_code=202)
async def cron_sync_status(credentials: BearerDep) -> FlowRunResponse:
    """Start a sync of every instance for an external cron (`Authorization: Bearer $CRON_SECRET`)."""
    expected = get_settings().cron_secret
    presented = bearer(credentials)
    if (
        expected is None
        or presented is None
        or not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())
    ):
        raise Unauthorized("missing or wrong cron secret")
    # Crons fire twice now and then: one run per minute, whatever arrives.
    minute = datetime.now(UTC).strftime("%Y%m%d%H%M")
    return await start_sync(SyncScope(), SyncRequest(), idempotency_key=f"cron-sync-status-{minute}")
