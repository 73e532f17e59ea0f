"""Live notifications from any process: a row in `live_events` plus a NOTIFY, delivered by `GET /events`.

Pass ``session`` to publish inside an ongoing unit of work (the event exists exactly when the change it reports
was committed); without one, the event gets its own short transaction. Notifications that follow a change already
committed use :func:`publish_quietly`: losing one must not fail the webhook or flow that made the change.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from db.engine import session_scope
from db.repositories.instances import AppliedChange
from db.repositories.live_events import NewLiveEvent, insert_events
from zapsync.errors import DatabaseUnavailable

log = logging.getLogger("zapsync.notify")


class Kind(enum.StrEnum):
    """Event kinds on the stream (the SSE `event:` field)."""

    INSTANCE_STATUS = "instance.status"
    INSTANCE_QR = "instance.qr"
    MESSAGE_NEW = "message.new"
    HEALTH_ALERT = "health.alert"
    HEALTH_RECONNECT = "health.reconnect"
    HEALTH_RECOVERED = "health.recovered"
    GATEWAY_UNHEALTHY = "gateway.unhealthy"
    GATEWAY_RECOVERED = "gateway.recovered"
    CONVERSATIONS_CLOSED = "conversations.closed"
    FLOW_RESULT = "flow.result"


def event(organization_id: uuid.UUID, kind: Kind | str, **payload: Any) -> NewLiveEvent:
    """One event for one organization's stream."""
    return NewLiveEvent(organization_id=organization_id, kind=str(kind), payload=payload)


async def publish(events: Sequence[NewLiveEvent], *, session: AsyncSession | None = None) -> list[int]:
    """Store ``events`` and notify listeners on commit; returns their ids."""
    if not events:
        return []
    if session is not None:
        return await insert_events(session, events)
    async with session_scope() as own:
        return await insert_events(own, events)


async def publish_quietly(events: Sequence[NewLiveEvent]) -> None:
    """:func:`publish` after the fact: a database failure is logged, not raised."""
    try:
        await publish(events)
    except (SQLAlchemyError, DatabaseUnavailable, OSError) as exc:
        log.warning("live events not published (%d lost): %s", len(events), type(exc).__name__)


def status_change_events(changes: Sequence[AppliedChange], *, source: str) -> list[NewLiveEvent]:
    """`instance.status` events for transitions that were written."""
    return [
        event(
            c.organization_id,
            Kind.INSTANCE_STATUS,
            instance_id=str(c.instance_id),
            instance_name=c.instance_name,
            from_status=c.from_status,
            to_status=c.to_status,
            reason=c.reason,
            source=source,
            observed_at=c.observed_at.isoformat(),
        )
        for c in changes
    ]


async def publish_status_changes(changes: Sequence[AppliedChange], *, source: str) -> None:
    """Announce written transitions (webhooks, sync) on their organizations' streams."""
    await publish_quietly(status_change_events(changes, source=source))
