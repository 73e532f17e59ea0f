"""Health of instances and gateways, and uptime derived from sessions. Functions flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import HealthCheck, HealthOutcome

_RECORD_SQL = text("""
WITH obs AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:ok AS boolean[]), CAST(:health AS text[]),
                         CAST(:at AS timestamptz[])) AS o(id, ok, health, at)
), prev AS (
    SELECT i.id, i.consecutive_failures, i.health FROM whatsapp_instances i JOIN obs ON obs.id = i.id
), upd AS (
    UPDATE whatsapp_instances i SET
        consecutive_failures = CASE WHEN obs.ok THEN 0 ELSE i.consecutive_failures + 1 END,
        health = obs.health,
        last_health_check_at = obs.at
    FROM obs
    WHERE i.id = obs.id AND (i.last_health_check_at IS NULL OR i.last_health_check_at < obs.at)
    RETURNING i.id, i.organization_id, i.user_id, i.gateway, i.instance_name, i.status, i.logged_out,
              i.consecutive_failures, i.health, i.phone_number
)
SELECT upd.id, upd.organization_id, upd.user_id, upd.gateway, upd.instance_name, upd.status, upd.logged_out,
       prev.consecutive_failures, upd.consecutive_failures, prev.health, upd.health, o.auto_reconnect,
       upd.phone_number IS NOT NULL OR EXISTS (SELECT 1 FROM whatsapp_sessions s WHERE s.instance_id = upd.id)
FROM upd JOIN prev ON prev.id = upd.id JOIN organizations o ON o.id = upd.organization_id
ORDER BY upd.gateway, upd.instance_name
""")


async def record_health(session: AsyncSession, checks: Sequence[HealthCheck]) -> list[HealthOutcome]:
    """Count failures (reset on success) and store health for many instances in one statement.

    A check older than the instance's last recorded one changes nothing (and is not returned).
    """
    if not checks:
        return []
    rows = await session.execute(
        _RECORD_SQL,
        {
            "ids": [c.instance_id for c in checks],
            "ok": [c.ok for c in checks],
            "health": [c.health for c in checks],
            "at": [c.checked_at for c in checks],
        },
    )
    return [HealthOutcome(*r) for r in rows.all()]


async def failing_instance_ids(session: AsyncSession) -> set[uuid.UUID]:
    """Instances whose last health check failed."""
    rows = await session.execute(text("SELECT id FROM whatsapp_instances WHERE consecutive_failures > 0"))
    return {r[0] for r in rows.all()}


@dataclass(frozen=True, slots=True)
class GatewayCheck:
    """Whether one gateway answered in one health check."""

    gateway: str
    reachable: bool
    error: str | None
    checked_at: datetime


@dataclass(frozen=True, slots=True)
class GatewayOutcome:
    """A gateway's health after a check, and before it (None the first time it is seen)."""

    gateway: str
    health_before: str | None
    health: str
    consecutive_failures: int


_GATEWAY_SQL = text("""
WITH obs AS (
    SELECT * FROM unnest(CAST(:names AS text[]), CAST(:ok AS boolean[]), CAST(:errors AS text[]),
                         CAST(:at AS timestamptz[])) AS o(gateway, ok, error, at)
), prev AS (
    SELECT g.gateway, g.health FROM gateway_health g JOIN obs ON obs.gateway = g.gateway
), up AS (
    INSERT INTO gateway_health AS g (gateway, health, consecutive_failures, last_error, last_check_at, changed_at)
    SELECT gateway, CASE WHEN ok THEN 'healthy' ELSE 'unhealthy' END, CASE WHEN ok THEN 0 ELSE 1 END,
           error, at, at
    FROM obs
    ON CONFLICT (gateway) DO UPDATE SET
        health = EXCLUDED.health,
        consecutive_failures = CASE WHEN EXCLUDED.health = 'healthy' THEN 0 ELSE g.consecutive_failures + 1 END,
        last_error = EXCLUDED.last_error,
        last_check_at = EXCLUDED.last_check_at,
        changed_at = CASE WHEN g.health = EXCLUDED.health THEN g.changed_at ELSE EXCLUDED.last_check_at END
    WHERE g.last_check_at < EXCLUDED.last_check_at
    RETURNING g.gateway, g.health, g.consecutive_failures
)
SELECT up.gateway, prev.health, up.health, up.consecutive_failures
FROM up LEFT JOIN prev ON prev.gateway = up.gateway ORDER BY up.gateway
""")


async def record_gateway_checks(session: AsyncSession, checks: Sequence[GatewayCheck]) -> list[GatewayOutcome]:
    """Store each gateway's health (consecutive failed checks, last error) and return before/after."""
    if not checks:
        return []
    rows = await session.execute(
        _GATEWAY_SQL,
        {
            "names": [c.gateway for c in checks],
            "ok": [c.reachable for c in checks],
            "errors": [c.error for c in checks],
            "at": [c.checked_at for c in checks],
        },
    )
    return [GatewayOutcome(*r) for r in rows.all()]


async def gateway_health(session: AsyncSession, gateway: str) -> dict[str, Any] | None:
    """The stored health of one gateway, if the monitor has checked it."""
    row = await session.execute(
        text(
            "SELECT gateway, health, consecutive_failures, last_error, last_check_at, changed_at "
            "FROM gateway_health WHERE gateway = :g"
        ),
        {"g": gateway},
    )
    found = row.mappings().one_or_none()
    return dict(found) if found else None


@dataclass(frozen=True, slots=True)
class Uptime:
    """Connected time of one instance, from its sessions."""

    connected_since: datetime | None
    """Start of the open session, if connected."""
    windows: dict[str, float | None]
    """Connected fraction of each window (``"24h"``, ``"7d"``…); None when the window has not started yet."""
    sessions: int
    """Sessions that overlap the longest window."""


async def uptime(
    session: AsyncSession,
    instance_id: uuid.UUID,
    *,
    now: datetime,
    windows: dict[str, timedelta],
    tracked_since: datetime,
) -> Uptime:
    """Fraction of each window the instance was connected, counted from ``tracked_since`` (its creation).

    Sessions past the retention period are gone, so a window longer than the retention understates uptime.
    """
    starts = {label: max(now - span, tracked_since) for label, span in windows.items()}
    earliest = min(starts.values(), default=now)
    rows = (
        await session.execute(
            text(
                "SELECT connected_at, COALESCE(disconnected_at, :now) FROM whatsapp_sessions "
                "WHERE instance_id = :id AND connected_at < :now AND COALESCE(disconnected_at, :now) > :since"
            ),
            {"id": instance_id, "now": now, "since": earliest},
        )
    ).all()
    open_since = (
        await session.execute(
            text("SELECT connected_at FROM whatsapp_sessions WHERE instance_id = :id AND disconnected_at IS NULL"),
            {"id": instance_id},
        )
    ).scalar_one_or_none()
    fractions: dict[str, float | None] = {}
    for label, start in starts.items():
        span = (now - start).total_seconds()
        if span <= 0:
            fractions[label] = None
            continue
        connected = sum(max(0.0, (min(end, now) - max(begin, start)).total_seconds()) for begin, end in rows)
        fractions[label] = round(min(1.0, connected / span), 4)
    return Uptime(connected_since=open_since, windows=fractions, sessions=len(rows))


async def instance_health(
    session: AsyncSession, instance_id: uuid.UUID, *, organization_id: uuid.UUID | None
) -> dict[str, Any] | None:
    """One instance's health fields and its organization's reconnect setting (only within ``organization_id``)."""
    row = await session.execute(
        text(
            "SELECT i.id, i.organization_id, i.user_id, i.gateway, i.instance_name, i.status, i.status_reason, "
            "i.health, i.consecutive_failures, i.last_health_check_at, i.logged_out, i.created_at, "
            "o.auto_reconnect FROM whatsapp_instances i JOIN organizations o ON o.id = i.organization_id "
            "WHERE i.id = :id AND (CAST(:org AS uuid) IS NULL OR i.organization_id = :org)"
        ),
        {"id": instance_id, "org": organization_id},
    )
    found = row.mappings().one_or_none()
    return dict(found) if found else None
