"""The live-event log behind `GET /events`: rows in `live_events`, announced with NOTIFY on commit.

The table is the source of truth (any process can write it; a client resumes from `Last-Event-ID`); the
notification carries only ``<organization_id>:<id>[,<id>…]`` (NOTIFY payloads are capped at 8000 bytes), and
listeners read the rows by id, so an event is delivered when its transaction commits, whatever its id order.

Pass ``session`` to :func:`publish` to publish inside an ongoing unit of work (the event exists exactly when the
change it reports was committed); without one, the event gets its own short transaction. Notifications that follow
a change already committed use :func:`publish_quietly`: losing one must not fail the webhook or flow that made it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import AppliedChange
from core.errors import DatabaseUnavailable
from core.events import NewLiveEvent, status_change_events
from db.engine import session_scope

CHANNEL = "zapsync_events"
log = logging.getLogger("zapsync.notify")


@dataclass(frozen=True, slots=True)
class StoredLiveEvent:
    """An event as the stream sends it."""

    id: int
    organization_id: uuid.UUID
    kind: str
    payload: dict[str, Any]
    created_at: datetime


_INSERT_SQL = text(f"""
WITH ins AS (
    INSERT INTO live_events (organization_id, kind, payload)
    SELECT * FROM unnest(CAST(:orgs AS uuid[]), CAST(:kinds AS text[]), CAST(:payloads AS jsonb[]))
    RETURNING id, organization_id
), numbered AS (
    -- A notification holds at most 8000 bytes: 300 ids of up to 19 digits fit with room to spare.
    SELECT id, organization_id, (row_number() OVER (PARTITION BY organization_id ORDER BY id) - 1) / 300 AS chunk
    FROM ins
), notified AS (
    SELECT pg_notify('{CHANNEL}', organization_id::text || ':' || string_agg(id::text, ',' ORDER BY id))
    FROM numbered GROUP BY organization_id, chunk
)
SELECT (SELECT count(*) FROM notified), array_agg(id ORDER BY id) FROM ins
""")


async def insert_events(session: AsyncSession, events: Sequence[NewLiveEvent]) -> list[int]:
    """Store events and queue notifications of their ids per organization (sent when the transaction commits)."""
    if not events:
        return []
    row = (
        await session.execute(
            _INSERT_SQL,
            {
                "orgs": [e.organization_id for e in events],
                "kinds": [e.kind[:32] for e in events],
                "payloads": [orjson.dumps(e.payload, default=str).decode() for e in events],
            },
        )
    ).one()
    return list(row[1] or [])


_COLUMNS = "id, organization_id, kind, payload, created_at"


async def events_by_id(
    session: AsyncSession, ids: Sequence[int], *, organization_id: uuid.UUID | None
) -> list[StoredLiveEvent]:
    """The named events that belong to ``organization_id`` (any organization when None), in id order."""
    if not ids:
        return []
    rows = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM live_events WHERE id = ANY(:ids) "
            "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org) ORDER BY id"
        ),
        {"ids": list(ids), "org": organization_id},
    )
    return [StoredLiveEvent(*r) for r in rows.all()]


async def events_after(
    session: AsyncSession, after_id: int, *, organization_id: uuid.UUID | None, limit: int = 1000
) -> list[StoredLiveEvent]:
    """Events newer than ``after_id`` (a resumed stream), oldest first."""
    rows = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM live_events WHERE id > :after "
            "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org) ORDER BY id LIMIT :limit"
        ),
        {"after": after_id, "org": organization_id, "limit": limit},
    )
    return [StoredLiveEvent(*r) for r in rows.all()]


async def latest_event_id(session: AsyncSession) -> int:
    """The newest event id of any organization (where a fresh stream starts), 0 when there is none."""
    found = await session.execute(text("SELECT COALESCE(max(id), 0) FROM live_events"))
    return int(found.scalar_one())


def parse_notification(payload: str) -> tuple[uuid.UUID, list[int]] | None:
    """``<organization_id>:<id>,<id>`` back to its parts; None for anything else on the channel."""
    org, _, ids = payload.partition(":")
    try:
        return uuid.UUID(org), [int(i) for i in ids.split(",") if i]
    except ValueError:
        return None


def listener_conninfo() -> str:
    """A libpq connection string for zapsync's database (the engine's URL; host may be a socket folder)."""
    from psycopg.conninfo import make_conninfo

    from db.engine import database_url

    url = database_url()
    params: dict[str, Any] = {
        "host": url.host or url.query.get("host"),
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    return make_conninfo(**{key: value for key, value in params.items() if value is not None})


@asynccontextmanager
async def listening(conninfo: str, channel: str = CHANNEL) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A dedicated autocommit connection LISTENing on ``channel`` (iterate ``conn.notifies()``)."""
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, application_name=f"zapsync.{channel}")
    try:
        await conn.execute(f"LISTEN {channel}")
        yield conn
    finally:
        await conn.close()


# -- publishing ------------------------------------------------------------------------------------------------


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


async def publish_status_changes(changes: Sequence[AppliedChange], *, source: str) -> None:
    """Announce written transitions (webhooks, sync) on their organizations' streams."""
    await publish_quietly(status_change_events(changes, source=source))
