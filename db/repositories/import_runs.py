"""Import runs: one running per instance, a cursor checkpointed with every page, resumable after a crash.

Functions flush, never commit. The cursor and counts of a run are read-modify-written under the run's row lock in
the same transaction as the page they describe, so a checkpoint exists exactly when its page's rows do.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import WorkKind
from db.repositories.work_queue import Enqueued, WorkRequest, enqueue_many

Cursor = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ImportRunRow:
    """One import run as the flow works with it."""

    id: int
    instance_id: uuid.UUID
    trigger: str
    connection_key: str | None
    state: str
    started_at: datetime
    cursor: Cursor
    counts: dict[str, int]
    resumed: bool = False


_COLUMNS = "id, instance_id, trigger, connection_key, state, started_at, cursor, counts"


def _row(row: Sequence[Any], *, resumed: bool = False) -> ImportRunRow:
    run_id, instance_id, trigger, connection_key, state, started_at, cursor, counts = row  # the order of _COLUMNS
    return ImportRunRow(run_id, instance_id, trigger, connection_key, state, started_at, cursor, counts, resumed)


async def begin_import(
    session: AsyncSession,
    *,
    instance_id: uuid.UUID,
    trigger: str,
    connection_key: str | None,
    full: bool,
    flow_run_id: uuid.UUID | None,
    cursor: Cursor,
) -> ImportRunRow | str:
    """The run to work on: the unfinished one resumed, or a new one (``cursor`` seeds it). A string says why
    nothing should run (this connection was already imported).

    Callers hold the instance's import lock. An unfinished run (running after a crash, or failed) is resumed
    unless ``full`` is set or it belongs to another connection; then it is closed as superseded.
    """
    if connection_key and not full:
        done = (
            await session.execute(
                text(
                    "SELECT id FROM import_runs WHERE instance_id = :inst AND connection_key = :key "
                    "AND state = 'completed' "
                    "ORDER BY id DESC LIMIT 1"
                ),
                {"inst": instance_id, "key": connection_key},
            )
        ).scalar_one_or_none()
        if done is not None:
            return f"this connection was already imported (import run {done})"
    latest = (
        await session.execute(
            text(
                f"SELECT {_COLUMNS} FROM import_runs WHERE instance_id = :inst "
                "ORDER BY started_at DESC, id DESC LIMIT 1 "
                "FOR UPDATE"
            ),
            {"inst": instance_id},
        )
    ).one_or_none()
    if latest is not None and latest.state in ("running", "failed"):
        other_connection = bool(connection_key and latest.connection_key and latest.connection_key != connection_key)
        if not full and not other_connection:
            resumed = (
                await session.execute(
                    text(
                        "UPDATE import_runs SET state = 'running', error = NULL, finished_at = NULL, "
                        "flow_run_id = :run "
                        f"WHERE id = :id RETURNING {_COLUMNS}"
                    ),
                    {"id": latest.id, "run": flow_run_id},
                )
            ).one()
            return _row(resumed, resumed=True)
        await session.execute(
            text("UPDATE import_runs SET state = 'failed', finished_at = now(), error = :why WHERE id = :id"),
            {"id": latest.id, "why": "superseded by a full import" if full else "superseded by a newer connection"},
        )
    created = (
        await session.execute(
            text(
                "INSERT INTO import_runs (instance_id, trigger, connection_key, state, cursor, counts, flow_run_id) "
                f"VALUES (:inst, :trigger, :key, 'running', CAST(:cursor AS jsonb), '{{}}', :run) RETURNING {_COLUMNS}"
            ),
            {
                "inst": instance_id,
                "trigger": trigger[:16],
                "key": connection_key,
                "run": flow_run_id,
                "cursor": orjson.dumps(cursor).decode(),
            },
        )
    ).one()
    return _row(created)


async def last_imported_until(session: AsyncSession, instance_id: uuid.UUID) -> datetime | None:
    """The end of the window of the instance's newest completed import (what a reconnect imports from)."""
    row = await session.execute(
        text(
            "SELECT cursor->>'until' FROM import_runs WHERE instance_id = :inst AND state = 'completed' "
            "AND cursor->>'until' IS NOT NULL ORDER BY finished_at DESC NULLS LAST, id DESC LIMIT 1"
        ),
        {"inst": instance_id},
    )
    until = row.scalar_one_or_none()
    return datetime.fromisoformat(until) if until else None


async def relax_durability(session: AsyncSession) -> None:
    """Let this transaction commit without waiting for its WAL flush (``synchronous_commit = off``).

    For import pages only: a page's rows and its checkpoint commit together, so a crash that loses the last few
    commits loses both, and the resumed import fetches those pages again. It never risks corruption.
    """
    await session.execute(text("SET LOCAL synchronous_commit TO off"))


async def read_run(session: AsyncSession, run_id: int) -> ImportRunRow:
    """The run as stored now."""
    row = (await session.execute(text(f"SELECT {_COLUMNS} FROM import_runs WHERE id = :id"), {"id": run_id})).one()
    return _row(row)


async def record_progress(
    session: AsyncSession,
    run_id: int,
    *,
    counts: Mapping[str, int],
    advance: Callable[[Cursor], Cursor | None],
) -> bool:
    """Checkpoint a page: ``advance`` returns the new cursor (None when the page was already recorded, which
    then adds no counts). Locks the run row until the caller's commit. Returns whether anything was recorded."""
    row = (
        await session.execute(text("SELECT cursor, counts FROM import_runs WHERE id = :id FOR UPDATE"), {"id": run_id})
    ).one()
    cursor = advance(dict(row.cursor))
    if cursor is None:
        return False
    cursor["at"] = datetime.now(UTC).isoformat()
    merged = dict(row.counts)
    for key, value in counts.items():
        if value:
            merged[key] = int(merged.get(key, 0)) + int(value)
    await session.execute(
        text("UPDATE import_runs SET cursor = CAST(:cursor AS jsonb), counts = CAST(:counts AS jsonb) WHERE id = :id"),
        {"id": run_id, "cursor": orjson.dumps(cursor).decode(), "counts": orjson.dumps(merged).decode()},
    )
    return True


async def finish_import(session: AsyncSession, run_id: int, *, state: str, error: str | None = None) -> None:
    """Close a run as completed or failed."""
    await session.execute(
        text(
            "UPDATE import_runs SET state = :state, error = :error, finished_at = now(), "
            "cursor = cursor || jsonb_build_object('at', now()) WHERE id = :id"
        ),
        {"id": run_id, "state": state, "error": error[:2000] if error else None},
    )


@dataclass(frozen=True, slots=True)
class PendingImport:
    """A connected instance that should be imported, and why."""

    instance_id: uuid.UUID
    connected_at: datetime | None
    """When its current session began (the connection an import belongs to)."""
    run_id: int | None
    run_state: str | None
    run_connection_key: str | None
    reason: str
    """`unfinished` (its last run failed or stopped checkpointing), `never_imported`, or `connected` (no import
    has started since its current connection began)."""


_PENDING_CANDIDATES = """
    SELECT i.id, s.connected_at, r.id, r.state, r.connection_key,
           CASE WHEN r.id IS NULL THEN 'never_imported'
                WHEN r.state = 'completed' THEN 'connected' ELSE 'unfinished' END
    FROM whatsapp_instances i
    LEFT JOIN LATERAL (
        SELECT connected_at FROM whatsapp_sessions ws WHERE ws.instance_id = i.id AND ws.disconnected_at IS NULL
        ORDER BY connected_at DESC LIMIT 1) s ON true
    LEFT JOIN LATERAL (
        SELECT id, state, connection_key, started_at, cursor FROM import_runs ir WHERE ir.instance_id = i.id
        ORDER BY ir.started_at DESC, ir.id DESC LIMIT 1) r ON true
    WHERE i.status = 'connected' AND i.gateway = ANY(:gateways)
      AND (CAST(:org AS uuid) IS NULL OR i.organization_id = :org)
      AND (CAST(:iid AS uuid) IS NULL OR i.id = :iid)
      AND (r.id IS NULL OR r.state = 'failed'
           OR (r.state = 'completed' AND r.started_at < s.connected_at)
           OR (r.state = 'running' AND COALESCE(CAST(r.cursor->>'at' AS timestamptz), r.started_at)
               < now() - make_interval(mins => :stale)))
      -- already queued or being worked; or failed for good within the hour (asked again at most hourly). NOT IN
      -- (`key` is never null) is one hashed subplan; NOT EXISTS became a nested loop over the queue when its
      -- statistics predate the batch of imports the sync just queued.
      AND CAST(i.id AS text) NOT IN (
          SELECT w.key FROM work_items w WHERE w.kind = 'import'
            AND (w.state IN ('pending', 'running')
                 OR (w.state = 'failed' AND w.finished_at > now() - interval '1 hour')))
"""

_PENDING_IMPORTS_SQL = text(f"""
({_PENDING_CANDIDATES} AND i.id = ANY(CAST(:first AS uuid[])) ORDER BY i.id LIMIT :limit)
UNION ALL
({_PENDING_CANDIDATES} AND i.id <> ALL(CAST(:first AS uuid[])) ORDER BY i.id LIMIT :limit)
LIMIT :limit
""")
"""The just-connected candidates first, then the others, each branch in id order so that it stops at the limit
(one ``ORDER BY i.id = ANY(:first)`` would evaluate every connected instance before sorting)."""


async def pending_imports(
    session: AsyncSession,
    *,
    gateways: Sequence[str],
    first: Sequence[uuid.UUID] = (),
    organization_id: uuid.UUID | None = None,
    instance_id: uuid.UUID | None = None,
    stale_minutes: int = 15,
    limit: int = 100,
) -> list[PendingImport]:
    """Connected instances at history-capable ``gateways`` whose current connection is not imported: never
    imported, no import started since the current session began, or the last run failed or went silent for
    ``stale_minutes``. Instances in ``first`` (just connected) come first; at most ``limit``."""
    if not gateways:
        return []
    rows = await session.execute(
        _PENDING_IMPORTS_SQL,
        {
            "gateways": list(gateways),
            "first": list(first),
            "org": organization_id,
            "iid": instance_id,
            "stale": stale_minutes,
            "limit": limit,
        },
    )
    return [PendingImport(*row) for row in rows.all()]


async def latest_runs(session: AsyncSession, instance_id: uuid.UUID, *, limit: int = 10) -> list[dict[str, Any]]:
    """The instance's most recent import runs, newest first."""
    rows = await session.execute(
        text(
            "SELECT id, trigger, connection_key, state, started_at, finished_at, counts, error, flow_run_id "
            "FROM import_runs WHERE instance_id = :inst ORDER BY started_at DESC, id DESC LIMIT :limit"
        ),
        {"inst": instance_id, "limit": limit},
    )
    return [dict(r) for r in rows.mappings().all()]


# -- queued imports -----------------------------------------------------------------------------------------------


def import_request(
    instance_id: uuid.UUID,
    organization_id: uuid.UUID | None,
    *,
    trigger: str,
    connection_key: str | None = None,
    full: bool = False,
    history_days: int | None = None,
) -> WorkRequest:
    """The queue item that asks for an import of one instance (keyed by the instance: one pending per instance)."""
    payload: dict[str, Any] = {"trigger": trigger, "full": full}
    if connection_key is not None:
        payload["connection_key"] = connection_key
    if history_days is not None:
        payload["history_days"] = history_days
    return WorkRequest(WorkKind.IMPORT, str(instance_id), organization_id, instance_id, payload)


async def request_imports(session: AsyncSession, requests: Sequence[WorkRequest]) -> list[Enqueued]:
    """Enqueue imports in the caller's transaction: a request for an instance with one pending merges into it (the
    newer trigger and window win; a full import, once asked for, stays full); one running gets a single follow-up."""
    return await enqueue_many(session, requests, merge=("full",))
