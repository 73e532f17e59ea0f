"""Asking for imports: queue items written with the fact that asks for them, and the status sync's safety net."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import AppliedChange, InstanceStatus
from core.logs import run_logger
from core.policies.imports import connection_key
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.import_runs import import_request, pending_imports, request_imports
from db.repositories.work_queue import Enqueued
from gateways.registry import history_gateways


async def enqueue_connect_imports(
    session: AsyncSession, changes: Sequence[AppliedChange], *, trigger: str, import_gateways: Collection[str]
) -> list[Enqueued]:
    """In the transaction that wrote ``changes``: an import for each instance that became connected at a gateway
    that can read history, keyed by its connection (a second import of the same connection does nothing)."""
    requests = [
        import_request(
            c.instance_id,
            c.organization_id,
            trigger=trigger,
            connection_key=connection_key(c.instance_id, c.observed_at),
        )
        for c in changes
        if c.to_status == InstanceStatus.CONNECTED and c.gateway in import_gateways
    ]
    return await request_imports(session, requests) if requests else []


async def enqueue_missing_imports(
    became_connected: Sequence[uuid.UUID],
    *,
    organization_id: uuid.UUID | None = None,
    instance_id: uuid.UUID | None = None,
) -> int:
    """The status sync's safety net: queue an import for every connected instance whose current connection is not
    imported (never imported, its last import failed or went silent) and that has no import queued or running;
    those that just connected first, at most ``import_starts_per_sync`` per sync. Returns how many were queued."""
    settings = get_settings()
    gateways = history_gateways(settings)
    if not gateways:
        return 0
    async with session_scope() as session:
        pending = await pending_imports(
            session,
            gateways=gateways,
            first=became_connected,
            organization_id=organization_id,
            instance_id=instance_id,
            stale_minutes=settings.import_stale_minutes,
            limit=settings.import_starts_per_sync,
        )
        queued = await request_imports(
            session,
            [
                import_request(
                    p.instance_id,
                    None,
                    trigger="sync",
                    connection_key=connection_key(p.instance_id, p.connected_at) if p.connected_at else None,
                )
                for p in pending
            ],
        )
    created = sum(1 for q in queued if q.created)
    if created:
        run_logger("zapsync.imports").info("[SYNC] %d imports queued for connected instances not imported yet", created)
    return created
