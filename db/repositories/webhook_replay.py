"""Reading the webhook inbox back for `zapsync webhooks replay` (issue 13 §5)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    """One inbox row, as replay needs it."""

    id: int
    organization_id: uuid.UUID
    provider: str
    event: str
    received_at: datetime
    payload: dict[str, Any]


async def stored_deliveries(
    session: AsyncSession,
    *,
    since: datetime,
    after: tuple[datetime, int] | None = None,
    event: str | None = None,
    organization_id: uuid.UUID | None = None,
    limit: int = 500,
) -> list[StoredDelivery]:
    """Inbox rows received at or after ``since`` (optionally of one event name and organization), oldest first,
    a page of ``limit`` after the (received_at, id) ``after`` of the previous page."""
    rows = await session.execute(
        text(
            "SELECT id, organization_id, provider, event, received_at, payload FROM webhook_events "
            "WHERE received_at >= :since "
            "AND (CAST(:event AS text) IS NULL OR event = :event) "
            "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org) "
            "AND (CAST(:after_at AS timestamptz) IS NULL OR (received_at, id) > (:after_at, :after_id)) "
            "ORDER BY received_at, id LIMIT :limit"
        ),
        {
            "since": since,
            "event": event,
            "org": organization_id,
            "after_at": after[0] if after else None,
            "after_id": after[1] if after else 0,
            "limit": limit,
        },
    )
    return [StoredDelivery(*row) for row in rows]
