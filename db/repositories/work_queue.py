"""The durable work queue (DESIGN.md §5.1): enqueue with the fact that asks for the work, claim in batches under
a lease, finish with the lease's token.

Functions flush, never commit: an item enqueued in the caller's transaction exists exactly when the fact that asks
for it (a status change, an API call) does. Claim, heartbeat and finish in short transactions of their own: times
are the transaction's ``now()``, and claimed rows stay locked until it ends.

The rules, kept by two partial unique indexes: at most one pending and one running item per (kind, key).
Enqueuing while an item is pending adds nothing (see ``merge``); while one is running, it adds one pending
follow-up, which is not claimed before the running one finishes, so one key never runs twice at once. A running
item whose lease expired is claimed again (attempts + 1) under a new token; its former holder's token no longer
matches, so that process can no longer complete, retry or fail it (fencing).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import psycopg
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict

WORK_CHANNEL = "zapsync_work"
"""Enqueuing NOTIFYs this channel with the item's kind when its transaction commits: warm workers wake at once."""
SUPERSEDED = "superseded by a newer request"
LEASE_EXPIRED = "lease expired"


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """One item to enqueue (see :func:`enqueue`)."""

    kind: str
    key: str
    organization_id: uuid.UUID | None = None
    instance_id: uuid.UUID | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The pending item that holds a request, and whether this request created it."""

    id: int
    created: bool


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    """An item leased to its claimer; ``lease_token`` is needed to extend, complete, retry or fail it."""

    id: int
    kind: str
    key: str
    organization_id: uuid.UUID | None
    instance_id: uuid.UUID | None
    payload: dict[str, Any]
    attempts: int
    """Claims so far, this one included."""
    lease_token: uuid.UUID


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The state of one kind of work, for /metrics, the dashboard and the API."""

    kind: str
    pending: int
    running: int
    failed: int
    oldest_pending_age_seconds: float | None
    """Age of the oldest pending item since it was enqueued (None when nothing is pending)."""


_ENQUEUE_SQL = text("""
WITH written AS (
INSERT INTO work_items AS w (kind, key, organization_id, instance_id, payload)
SELECT * FROM unnest(CAST(:kinds AS text[]), CAST(:keys AS text[]), CAST(:orgs AS uuid[]), CAST(:insts AS uuid[]),
                     CAST(:payloads AS jsonb[]))
ON CONFLICT (kind, key) WHERE state = 'pending' DO UPDATE SET
    payload = CASE WHEN :merging THEN
        w.payload || EXCLUDED.payload || COALESCE(
            (SELECT jsonb_object_agg(s.k, true) FROM unnest(CAST(:sticky AS text[])) AS s(k)
             WHERE w.payload -> s.k = 'true'::jsonb),
            '{}'::jsonb)
        ELSE w.payload END,
    updated_at = now()
-- xmax is 0 on a freshly inserted row version and set on one written by DO UPDATE (a long-standing PostgreSQL
-- behaviour, relied on here to tell the two apart without a second statement).
RETURNING w.kind, w.key, w.id, (w.xmax = 0) AS created
), notified AS (  -- wake the workers when this transaction commits (once per kind: NOTIFY folds duplicates)
    SELECT pg_notify(:channel, kind) FROM (SELECT DISTINCT kind FROM written) AS kinds
)
SELECT kind, key, id, created, (SELECT count(*) FROM notified) AS notified FROM written
""")


def _combine(stored: Mapping[str, Any], new: Mapping[str, Any], merge: Collection[str] | None) -> dict[str, Any]:
    """The SQL merge rule, for duplicates within one call."""
    if merge is None:
        return dict(stored)
    combined = {**stored, **new}
    for key in merge:
        if stored.get(key) is True:
            combined[key] = True
    return combined


async def enqueue_many(
    session: AsyncSession, requests: Iterable[WorkRequest], *, merge: Collection[str] | None = None
) -> list[Enqueued]:
    """Enqueue many requests in one statement; one result per request, in order (duplicates share theirs).

    Idempotent per (kind, key): a request whose key already has a pending item adds nothing. With ``merge=None``
    the pending item keeps its payload (the first request wins: a send cannot be changed by a repeat); with a
    collection of keys, the newer request's values win, except for the named boolean keys, where true sticks
    (``merge=("full",)``: a full import asked for once stays full). A key whose item is running gets one pending
    follow-up; later requests merge into it.
    """
    ordered = list(requests)
    unique: dict[tuple[str, str], WorkRequest] = {}
    for request in ordered:
        seen = unique.get((request.kind, request.key))
        if seen is None:
            unique[(request.kind, request.key)] = request
        else:
            combined = _combine(seen.payload, request.payload, merge)
            unique[(request.kind, request.key)] = WorkRequest(
                seen.kind, seen.key, seen.organization_id, seen.instance_id, combined
            )
    if not unique:
        return []
    batch = list(unique.values())
    rows = await session.execute(
        _ENQUEUE_SQL,
        {
            "kinds": [r.kind for r in batch],
            "keys": [r.key for r in batch],
            "orgs": [r.organization_id for r in batch],
            "insts": [r.instance_id for r in batch],
            "payloads": [orjson.dumps(dict(r.payload), default=str).decode() for r in batch],
            "merging": merge is not None,
            "sticky": list(merge or ()),
            "channel": WORK_CHANNEL,
        },
    )
    found = {(kind, key): Enqueued(id=item_id, created=created) for kind, key, item_id, created, _ in rows.all()}
    return [found[(r.kind, r.key)] for r in ordered]


async def enqueue(
    session: AsyncSession,
    *,
    kind: str,
    key: str,
    organization_id: uuid.UUID | None = None,
    instance_id: uuid.UUID | None = None,
    payload: Mapping[str, Any] | None = None,
    merge: Collection[str] | None = None,
) -> Enqueued:
    """Enqueue one request in the caller's transaction (the rules of :func:`enqueue_many`)."""
    request = WorkRequest(kind, key, organization_id, instance_id, payload or {})
    (result,) = await enqueue_many(session, [request], merge=merge)
    return result


_CLAIM_SQL = text("""
WITH expired AS (
    SELECT id FROM work_items
    WHERE kind = :kind AND state = 'running' AND lease_until <= now()
    ORDER BY next_attempt_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), due AS (
    SELECT p.id FROM work_items AS p
    WHERE p.kind = :kind AND p.state = 'pending' AND p.next_attempt_at <= now()
      -- never start a key that is still running (its lease may have expired: then it is re-claimed first)
      AND NOT EXISTS (
          SELECT 1 FROM work_items AS r WHERE r.kind = p.kind AND r.key = p.key AND r.state = 'running'
      )
    ORDER BY p.next_attempt_at, p.id
    LIMIT :limit - (SELECT count(*) FROM expired)
    FOR UPDATE SKIP LOCKED
)
UPDATE work_items AS w SET
    state = 'running',
    attempts = w.attempts + 1,
    lease_token = gen_random_uuid(),
    lease_until = now() + make_interval(secs => :lease),
    last_error = CASE WHEN w.state = 'running' THEN :expired_error ELSE w.last_error END,
    updated_at = now()
-- an array, not a join: the planner cannot size the CTEs, and a join may scan the whole primary key
WHERE w.id = ANY (ARRAY(SELECT id FROM expired UNION ALL SELECT id FROM due))
RETURNING w.id, w.kind, w.key, w.organization_id, w.instance_id, w.payload, w.attempts, w.lease_token,
          w.next_attempt_at
""")


async def claim(session: AsyncSession, *, kind: str, limit: int, lease_seconds: float) -> list[ClaimedItem]:
    """Lease up to ``limit`` items of ``kind`` for ``lease_seconds``, oldest due first, in one statement.

    Takes running items whose lease expired (their claimer is presumed dead) and due pending items whose key is
    not running, skipping rows other claimers hold locked, so concurrent claimers get disjoint items. Each claim
    counts as an attempt; the caller decides with ``core.policies.backoff.should_give_up`` whether to go on.
    """
    if limit <= 0:
        return []
    rows = await session.execute(
        _CLAIM_SQL, {"kind": kind, "limit": limit, "lease": float(lease_seconds), "expired_error": LEASE_EXPIRED}
    )
    ordered = sorted(rows.all(), key=lambda r: (r.next_attempt_at, r.id))
    return [_claimed(r) for r in ordered]


def _claimed(r: Any) -> ClaimedItem:
    """A claim statement's returned row as the item its claimer holds."""
    return ClaimedItem(
        id=r.id,
        kind=r.kind,
        key=r.key,
        organization_id=r.organization_id,
        instance_id=r.instance_id,
        payload=r.payload,
        attempts=r.attempts,
        lease_token=r.lease_token,
    )


_HELD = "id = :id AND lease_token = :token AND state = 'running'"
_RELEASE = "lease_until = NULL, lease_token = NULL, updated_at = now()"


async def _update_held(session: AsyncSession, sql: str, params: dict[str, Any]) -> bool:
    result = await session.execute(text(sql), params)
    return int(result.rowcount or 0) == 1  # type: ignore[attr-defined]


async def extend_lease(session: AsyncSession, item_id: int, token: uuid.UUID, lease_seconds: float) -> bool:
    """Heartbeat: the lease runs ``lease_seconds`` from now. False when the lease was lost to another claimer."""
    return await _update_held(
        session,
        f"UPDATE work_items SET lease_until = now() + make_interval(secs => :lease), updated_at = now() WHERE {_HELD}",
        {"id": item_id, "token": token, "lease": float(lease_seconds)},
    )


async def complete(
    session: AsyncSession, item_id: int, token: uuid.UUID, *, result: Mapping[str, Any] | None = None
) -> bool:
    """Mark the item done, keeping ``result``; False (and nothing changes) when ``token`` no longer holds it."""
    return await _update_held(
        session,
        f"UPDATE work_items SET state = 'done', finished_at = now(), result = CAST(:result AS jsonb), {_RELEASE} "
        f"WHERE {_HELD}",
        {"id": item_id, "token": token, "result": orjson.dumps(result, default=str).decode() if result else None},
    )


async def fail(
    session: AsyncSession, item_id: int, token: uuid.UUID, *, error: str, result: Mapping[str, Any] | None = None
) -> bool:
    """Mark the item failed for good with the reason (and ``result``); False when ``token`` no longer holds it."""
    return await _update_held(
        session,
        "UPDATE work_items SET state = 'failed', last_error = :error, finished_at = now(), "
        f"result = CAST(:result AS jsonb), {_RELEASE} WHERE {_HELD}",
        {
            "id": item_id,
            "token": token,
            "error": error,
            "result": orjson.dumps(result, default=str).decode() if result else None,
        },
    )


_RETRY_SQL = text(f"""
UPDATE work_items AS w SET
    state = CASE WHEN s.superseded THEN 'done' ELSE 'pending' END,
    next_attempt_at = CASE WHEN s.superseded THEN w.next_attempt_at ELSE now() + make_interval(secs => :delay) END,
    last_error = CASE WHEN s.superseded THEN :superseded ELSE :error END,
    finished_at = CASE WHEN s.superseded THEN now() END,
    {_RELEASE}
FROM (
    SELECT t.id, EXISTS (
        SELECT 1 FROM work_items AS p WHERE p.kind = t.kind AND p.key = t.key AND p.state = 'pending'
    ) AS superseded
    FROM work_items AS t WHERE t.id = :id
) AS s
WHERE w.id = s.id AND w.id = :id AND w.lease_token = :token AND w.state = 'running'
RETURNING w.state
""")


async def retry_later(
    session: AsyncSession, item_id: int, token: uuid.UUID, *, error: str, delay_seconds: float
) -> Literal["pending", "done"] | None:
    """Put the item back to pending, due in ``delay_seconds``, with the error; returns the resulting state.

    When a pending follow-up for the same key exists, that one covers this request: the item is marked done
    with ``last_error`` "superseded by a newer request". None when ``token`` no longer holds the item.
    """
    params = {"id": item_id, "token": token, "error": error, "delay": float(delay_seconds), "superseded": SUPERSEDED}
    for _ in range(3):
        try:
            # A follow-up enqueued concurrently (not yet visible to this statement) makes "back to pending" break
            # the one-pending rule; the savepoint keeps the caller's transaction, and the next try sees it.
            async with session.begin_nested():
                state = (await session.execute(_RETRY_SQL, params)).scalar_one_or_none()
        except IntegrityError as exc:
            if not isinstance(exc.orig, psycopg.errors.UniqueViolation):
                raise
            continue
        return state
    raise Conflict(f"work item {item_id}: a follow-up kept appearing while it was put back to pending")


_DUE_NOW_SQL = text("""
WITH due AS (
    UPDATE work_items SET next_attempt_at = now(), updated_at = now()
    WHERE kind = :kind AND state = 'pending' AND key = ANY(CAST(:keys AS text[])) AND next_attempt_at > now()
    RETURNING id
)
SELECT count(*), (SELECT pg_notify(:channel, :kind) WHERE EXISTS (SELECT 1 FROM due)) FROM due
""")


async def make_due_now(session: AsyncSession, *, kind: str, keys: Sequence[str]) -> int:
    """Make the pending items of ``kind`` with these keys due now (their wait is over) and wake the workers when
    the transaction commits; returns how many were waiting."""
    if not keys:
        return 0
    row = (await session.execute(_DUE_NOW_SQL, {"kind": kind, "keys": list(keys), "channel": WORK_CHANNEL})).one()
    return int(row[0])


_STATS_SQL = text("""
SELECT kind,
       count(*) FILTER (WHERE state = 'pending') AS pending,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at) FILTER (WHERE state = 'pending')), 0) AS age
FROM work_items
WHERE state IN ('pending', 'running', 'failed') AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)
GROUP BY kind
""")


async def queue_stats(
    session: AsyncSession, *, kinds: Iterable[str] = (), organization_id: uuid.UUID | None = None
) -> list[QueueStats]:
    """Counts per kind (pending, running, failed) and the oldest pending item's age, sorted by kind (of one
    organization's items when given); ``kinds`` are always listed, with zeros when they have nothing outstanding."""
    found = {
        r.kind: QueueStats(r.kind, r.pending, r.running, r.failed, None if r.age is None else float(r.age))
        for r in (await session.execute(_STATS_SQL, {"org": organization_id})).all()
    }
    for kind in kinds:
        found.setdefault(kind, QueueStats(kind, 0, 0, 0, None))
    return [found[kind] for kind in sorted(found)]


WORKER_APPLICATION = f"zapsync.{WORK_CHANNEL}"
"""The application name of a warm worker's LISTEN connection (``listening()`` names it after its channel)."""


async def listening_workers(session: AsyncSession) -> int:
    """Warm workers listening for work on this database right now (their LISTEN connections)."""
    row = await session.execute(
        text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND datname = current_database()"),
        {"name": WORKER_APPLICATION},
    )
    return int(row.scalar_one())


async def due_kinds(session: AsyncSession, kinds: Iterable[str]) -> set[str]:
    """Which of ``kinds`` have work a claim would take now (a due pending item, or a running one whose lease
    expired)."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT kind FROM work_items WHERE kind = ANY(:kinds) AND ("
            "(state = 'pending' AND next_attempt_at <= now()) OR (state = 'running' AND lease_until <= now()))"
        ),
        {"kinds": list(kinds)},
    )
    return {row[0] for row in rows}


@dataclass(frozen=True, slots=True)
class ItemState:
    """One item as whoever waits for it sees it."""

    id: int
    kind: str
    state: str
    attempts: int
    last_error: str | None
    result: dict[str, Any] | None
    finished: bool


async def read_item(
    session: AsyncSession, item_id: int, *, organization_id: uuid.UUID | None = None
) -> ItemState | None:
    """The item's state and result (only within ``organization_id`` when given); None when there is no such item."""
    row = (
        await session.execute(
            text(
                "SELECT id, kind, state, attempts, last_error, result FROM work_items WHERE id = :id "
                "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)"
            ),
            {"id": item_id, "org": organization_id},
        )
    ).one_or_none()
    if row is None:
        return None
    return ItemState(
        id=row.id,
        kind=row.kind,
        state=row.state,
        attempts=row.attempts,
        last_error=row.last_error,
        result=row.result,
        finished=row.state in ("done", "failed"),
    )


# -- lines: per-instance order (sends) ------------------------------------------------------------------------

_LINE_LOCK_SQL = text("SELECT pg_advisory_xact_lock(hashtext(:name))")

_OUTSTANDING_LINE = "w.kind = :kind AND w.state IN ('pending', 'running')"
_HEADS = f"""
RECURSIVE line_ids (instance_id) AS (
    -- the instances with outstanding items, one index probe each (ix_work_items_line), not a scan of every item
    (SELECT w.instance_id FROM work_items w
     WHERE {_OUTSTANDING_LINE} AND w.instance_id IS NOT NULL ORDER BY w.instance_id LIMIT 1)
    UNION ALL
    SELECT (SELECT w.instance_id FROM work_items w
            WHERE {_OUTSTANDING_LINE} AND w.instance_id > l.instance_id ORDER BY w.instance_id LIMIT 1)
    FROM line_ids l WHERE l.instance_id IS NOT NULL
),
heads AS (  -- each line's first outstanding item
    SELECT f.id, f.instance_id, f.state, f.next_attempt_at, f.lease_until
    FROM line_ids l CROSS JOIN LATERAL (
        SELECT w.id, w.instance_id, w.state, w.next_attempt_at, w.lease_until FROM work_items w
        WHERE {_OUTSTANDING_LINE} AND w.instance_id = l.instance_id ORDER BY w.id LIMIT 1
    ) AS f
    WHERE l.instance_id IS NOT NULL
)"""
_PACED = """
    NOT EXISTS (
        SELECT 1 FROM work_items f
        WHERE f.state IN ('done', 'failed') AND f.kind = :kind AND f.instance_id = h.instance_id
          AND f.finished_at > clock_timestamp() - make_interval(secs => :gap))
"""

_NEXT_HEAD_SQL = text(f"""
WITH {_HEADS}
SELECT EXTRACT(EPOCH FROM min(GREATEST(
    h.next_attempt_at,
    COALESCE((SELECT max(f.finished_at) FROM work_items f
              WHERE f.state IN ('done', 'failed') AND f.kind = :kind AND f.instance_id = h.instance_id
                AND f.finished_at > clock_timestamp() - make_interval(secs => :gap)), '-infinity')
        + make_interval(secs => :gap)
) - clock_timestamp()))
FROM heads h WHERE h.state = 'pending'
""")


async def seconds_to_next_head(session: AsyncSession, *, kind: str, min_gap_seconds: float = 0.0) -> float | None:
    """Seconds until the next pending line head becomes claimable (0 when one is now); None when no line has a
    pending head."""
    value = (await session.execute(_NEXT_HEAD_SQL, {"kind": kind, "gap": float(min_gap_seconds)})).scalar_one()
    return None if value is None else max(0.0, float(value))


async def due_line_kinds(session: AsyncSession, kinds: Iterable[str]) -> set[str]:
    """Like :func:`due_kinds` for kinds claimed by line head (sends): due only when some line's head is (a line
    whose head waits for its retry has nothing due, however many items queue behind it)."""
    found: set[str] = set()
    for kind in kinds:
        expired = await session.execute(
            text("SELECT 1 FROM work_items WHERE kind = :kind AND state = 'running' AND lease_until <= now() LIMIT 1"),
            {"kind": kind},
        )
        if expired.first() is not None or await seconds_to_next_head(session, kind=kind) == 0.0:
            found.add(kind)
    return found


# -- line runs: several consecutive items of each line per claim (sends, set-based) --------------------------------

_DUE = """((x.state = 'pending' AND x.next_attempt_at <= clock_timestamp())
           OR (x.state = 'running' AND x.lease_until <= clock_timestamp()))"""

_CLAIM_RUNS_SQL = text(f"""
WITH {_HEADS},
lines AS (
    SELECT h.instance_id FROM heads h
    WHERE ((h.state = 'pending' AND h.next_attempt_at <= clock_timestamp())
           OR (h.state = 'running' AND h.lease_until <= clock_timestamp()))
      AND {_PACED}
    ORDER BY h.next_attempt_at, h.id
    LIMIT :limit
),
runs AS (
    SELECT r.id FROM lines l CROSS JOIN LATERAL (
        SELECT s.id, sum(CASE WHEN s.due THEN 0 ELSE 1 END) OVER (ORDER BY s.id) AS blocked
        FROM (
            SELECT x.id, {_DUE} AS due FROM work_items x
            WHERE x.kind = :kind AND x.instance_id = l.instance_id AND x.state IN ('pending', 'running')
            ORDER BY x.id
            LIMIT :run
        ) AS s
    ) AS r
    WHERE r.blocked = 0  -- the run ends before the first item that is not due: nothing overtakes it
)
UPDATE work_items AS w SET
    state = 'running',
    attempts = w.attempts + 1,
    lease_token = gen_random_uuid(),
    lease_until = clock_timestamp() + make_interval(secs => :lease),
    last_error = CASE WHEN w.state = 'running' THEN :expired_error ELSE w.last_error END,
    updated_at = now()
WHERE w.id = ANY (ARRAY(SELECT id FROM runs))
RETURNING w.id, w.kind, w.key, w.organization_id, w.instance_id, w.payload, w.attempts, w.lease_token
""")


async def claim_line_runs(
    session: AsyncSession,
    *,
    kind: str,
    lines: int,
    run_length: int,
    lease_seconds: float,
    min_gap_seconds: float = 0.0,
) -> list[list[ClaimedItem]]:
    """Lease the run of up to ``lines`` instances' lines in one statement: each line's first ``run_length``
    outstanding items in id order, up to (not including) the first that is not due. A line is taken only when its
    head is due and paced (the rules of :func:`claim_line_runs`; claims are serialized by the same advisory lock).

    Returns one list per line, in line order; the claimer works each run in order and gives back with
    :func:`release_unsent` whatever it does not get to (an item whose send must wait holds the rest of its line).
    """
    if lines <= 0 or run_length <= 0:
        return []
    await session.execute(_LINE_LOCK_SQL, {"name": f"zapsync:line-claim:{kind}"})
    rows = await session.execute(
        _CLAIM_RUNS_SQL,
        {
            "kind": kind,
            "limit": lines,
            "run": run_length,
            "lease": float(lease_seconds),
            "gap": float(min_gap_seconds),
            "expired_error": LEASE_EXPIRED,
        },
    )
    runs: dict[uuid.UUID | None, list[ClaimedItem]] = {}
    for r in sorted(rows.all(), key=lambda r: r.id):
        item = _claimed(r)
        runs.setdefault(item.instance_id, []).append(item)
    return list(runs.values())


def _held(items: Sequence[ClaimedItem]) -> dict[str, Any]:
    return {"ids": [i.id for i in items], "tokens": [i.lease_token for i in items]}


_HELD_MANY = """FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS uuid[])) AS h(id, token)
WHERE w.id = h.id AND w.lease_token = h.token AND w.state = 'running'"""


async def release_unsent(session: AsyncSession, items: Sequence[ClaimedItem]) -> int:
    """Give back claimed items that were not worked (pending again, as due as before, this claim not counted as an
    attempt); returns how many were still held."""
    if not items:
        return 0
    result = await session.execute(
        text(f"UPDATE work_items AS w SET state = 'pending', attempts = w.attempts - 1, {_RELEASE} {_HELD_MANY}"),
        _held(items),
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def extend_leases(session: AsyncSession, items: Sequence[ClaimedItem], lease_seconds: float) -> set[int]:
    """Heartbeat for many items in one statement; returns the ids still held (the others were lost)."""
    if not items:
        return set()
    rows = await session.execute(
        text(
            "UPDATE work_items AS w SET lease_until = now() + make_interval(secs => :lease), updated_at = now() "
            f"{_HELD_MANY} RETURNING w.id"
        ),
        {**_held(items), "lease": float(lease_seconds)},
    )
    return {r[0] for r in rows.all()}


async def complete_many(
    session: AsyncSession, done: Sequence[tuple[ClaimedItem, Mapping[str, Any] | None]]
) -> set[int]:
    """:func:`complete` for many items in one statement; returns the ids completed (the others' leases were lost)."""
    if not done:
        return set()
    rows = await session.execute(
        text(
            "UPDATE work_items AS w SET state = 'done', finished_at = now(), result = h.result, "
            f"{_RELEASE} "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:tokens AS uuid[]), CAST(:results AS jsonb[])) "
            "AS h(id, token, result) "
            "WHERE w.id = h.id AND w.lease_token = h.token AND w.state = 'running' RETURNING w.id"
        ),
        {
            **_held([item for item, _ in done]),
            "results": [orjson.dumps(result, default=str).decode() if result else None for _, result in done],
        },
    )
    return {r[0] for r in rows.all()}
