"""Health of WhatsApp instances: `GET /instances/{id}/health` gives the failure streak, detected problems and uptime
from sessions (seed 003). Probes of the service itself (`/healthz`, `/readyz`) are in :mod:`api.routes.probes`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import PrincipalDep, SessionDep
from core.errors import NotFound
from core.policies.health import describe_issues
from core.settings import get_settings
from db.repositories.health import gateway_health, instance_health, uptime

router = APIRouter(prefix="/instances", tags=["health"])
WINDOWS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}


class UptimeView(BaseModel):
    """Connected time, from the instance's sessions."""

    connected_since: datetime | None = Field(description="Start of the current session (null when not connected).")
    current_session_seconds: float | None
    ratios: dict[str, float | None] = Field(description="Connected fraction of the last 24 h, 7 d and 30 d.")
    sessions: int = Field(description="Sessions in the last 30 days (ended ones past retention are gone).")


class GatewayView(BaseModel):
    """The gateway as the health monitor last saw it."""

    name: str
    health: str
    consecutive_failures: int
    last_error: str | None
    last_check_at: datetime | None


class InstanceHealthResponse(BaseModel):
    """One instance's health."""

    id: uuid.UUID
    instance_name: str
    gateway: str
    status: str
    health: str
    consecutive_failures: int
    last_health_check_at: datetime | None
    logged_out: bool
    auto_reconnect: bool
    issues: list[str]
    uptime: UptimeView
    gateway_health: GatewayView | None


@router.get("/{instance_id}/health", response_model=InstanceHealthResponse)
async def instance_health_view(
    instance_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> InstanceHealthResponse:
    """Health as of the monitor's last check, problems detected, and uptime over 24 h / 7 d / 30 d."""
    row = await instance_health(session, instance_id, organization_id=principal.organization_id)
    if row is None:
        raise NotFound(f"no instance {instance_id}")
    gateway = await gateway_health(session, str(row["gateway"]))
    now = datetime.now(UTC)
    figures = await uptime(session, instance_id, now=now, windows=WINDOWS, tracked_since=row["created_at"])
    settings = get_settings()
    issues = describe_issues(
        row, gateway, alert_after=settings.monitor_alert_after, reconnect_after=settings.monitor_reconnect_after
    )
    return InstanceHealthResponse(
        **{
            k: row[k]
            for k in (
                "id",
                "instance_name",
                "gateway",
                "status",
                "health",
                "consecutive_failures",
                "last_health_check_at",
                "logged_out",
                "auto_reconnect",
            )
        },
        issues=issues,
        uptime=UptimeView(
            connected_since=figures.connected_since,
            current_session_seconds=(now - figures.connected_since).total_seconds()
            if figures.connected_since
            else None,
            ratios=figures.windows,
            sessions=figures.sessions,
        ),
        gateway_health=GatewayView(
            name=gateway["gateway"],
            health=gateway["health"],
            consecutive_failures=gateway["consecutive_failures"],
            last_error=gateway["last_error"],
            last_check_at=gateway["last_check_at"],
        )
        if gateway
        else None,
    )
