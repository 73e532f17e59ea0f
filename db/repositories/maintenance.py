"""Scheduled maintenance in set-based SQL: expired sessions and old rows, inactive conversations.

Functions flush, never commit; each call is one batch, and the caller gives every batch its own transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# -- cleanup ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetentionGroup:
    """Organizations that keep ended sessions for the same number of days."""

    days: int
    organization_ids: list[uuid.UUID]


async def session_retention_groups(
    session: AsyncSession, *, organization_id: uuid.UUID | None, override_days: int | None
) -> list[RetentionGroup]:
    """Organizations (all, or one) grouped by their session retention, or all under ``override_days``."""
    rows = await session.execute(
        text(
            "SELECT COALESCE(CAST(:days AS integer), session_retention_days) AS days, array_agg(id ORDER BY id) "
            "FROM organizations WHERE CAST(:org AS uuid) IS NULL OR id = :org GROUP BY 1 ORDER BY 1"
        ),
        {"days": override_days, "org": organization_id},
    )
    return [RetentionGroup(int(r[0]), list(r[1])) for r in rows.all()]


_EXPIRED_SESSIONS = """
    FROM whatsapp_sessions s JOIN whatsapp_instances i ON i.id = s.instance_id
    WHERE i.organization_id = ANY(:orgs) AND s.disconnected_at IS NOT NULL AND s.last_activity_at < :cutoff
"""


async def count_expired_sessions(
    session: AsyncSession, *, organization_ids: Sequence[uuid.UUID], cutoff: datetime
) -> int:
    """Ended sessions of these organizations whose last activity is older than ``cutoff``."""
    found = await session.execute(
        text(f"SELECT count(*) {_EXPIRED_SESSIONS}"), {"orgs": list(organization_ids), "cutoff": cutoff}
    )
    return int(found.scalar_one())


async def delete_expired_sessions(
    session: AsyncSession, *, organization_ids: Sequence[uuid.UUID], cutoff: datetime, limit: int
) -> int:
    """Delete up to ``limit`` expired sessions; an open session (``disconnected_at`` null) is never touched."""
    deleted = await session.execute(
        text(
            "DELETE FROM whatsapp_sessions WHERE disconnected_at IS NOT NULL AND id IN ("
            f"SELECT s.id {_EXPIRED_SESSIONS} ORDER BY s.last_activity_at LIMIT :limit FOR UPDATE OF s SKIP LOCKED)"
        ),
        {"orgs": list(organization_ids), "cutoff": cutoff, "limit": limit},
    )
    return int(deleted.rowcount or 0)  # type: ignore[attr-defined]  # a DELETE gives a CursorResult, typed as Result


PrunableTable = Literal["webhook_events", "live_events", "flow_reports", "work_items"]
_AGE_COLUMN: dict[str, str] = {
    "webhook_events": "received_at",
    "live_events": "created_at",
    "flow_reports": "finished_at",
    "work_items": "finished_at",  # NULL until an item is done or failed: queued and running items are never pruned
}


def _older(table: PrunableTable) -> str:
    column = _AGE_COLUMN[table]  # a fixed name from the map above, never user input
    return f"FROM {table} WHERE {column} < :cutoff AND (CAST(:org AS uuid) IS NULL OR organization_id = :org)"


async def count_older(
    session: AsyncSession, table: PrunableTable, *, cutoff: datetime, organization_id: uuid.UUID | None
) -> int:
    """Rows of ``table`` older than ``cutoff`` (of one organization, when given)."""
    found = await session.execute(text(f"SELECT count(*) {_older(table)}"), {"cutoff": cutoff, "org": organization_id})
    return int(found.scalar_one())


async def delete_older(
    session: AsyncSession, table: PrunableTable, *, cutoff: datetime, organization_id: uuid.UUID | None, limit: int
) -> int:
    """Delete up to ``limit`` rows of ``table`` older than ``cutoff``."""
    deleted = await session.execute(
        text(f"DELETE FROM {table} WHERE id IN (SELECT id {_older(table)} LIMIT :limit)"),
        {"cutoff": cutoff, "org": organization_id, "limit": limit},
    )
    return int(deleted.rowcount or 0)  # type: ignore[attr-defined]  # a DELETE gives a CursorResult, typed as Result


# -- inactive conversations ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClosePolicy:
    """How one organization closes idle conversations in this run."""

    organization_id: uuid.UUID
    inactivity_hours: int
    close_waiting: bool
    """Also close conversations whose customer still waits for an agent's reply."""
    cutoff: datetime
    """A conversation with no message since this instant is idle."""


@dataclass(frozen=True, slots=True)
class IdleConversation:
    """A conversation found idle (a candidate; the UPDATE decides)."""

    id: int
    last_message_at: datetime


@dataclass(frozen=True, slots=True)
class ClosedConversation:
    """A conversation this run closed."""

    id: int
    instance_id: uuid.UUID


async def organizations_closing(
    session: AsyncSession, *, organization_id: uuid.UUID | None
) -> list[tuple[uuid.UUID, int, bool]]:
    """(id, inactivity_hours, close_waiting_conversations) of organizations that close idle conversations."""
    rows = await session.execute(
        text(
            "SELECT id, inactivity_hours, close_waiting_conversations FROM organizations "
            "WHERE (CAST(:org AS uuid) IS NULL OR id = :org) AND inactivity_hours > 0 ORDER BY id"
        ),
        {"org": organization_id},
    )
    return [(r[0], int(r[1]), bool(r[2])) for r in rows.all()]


# Candidates: open, quiet since the cutoff by the conversation's own clock, and not waiting on an agent unless the
# organization says so — an index range on the open-idle partial index.
_CANDIDATE = """
    c.organization_id = :org AND c.status IN ('waiting', 'in_progress') AND c.last_message_at < :cutoff
    AND (CAST(:close_waiting AS boolean) OR c.waiting_since IS NULL)
"""
# Idle: a candidate with no message row since the cutoff either (a writer may add the row before it moves the
# conversation's clock). Repeated in the UPDATE: a message that lands between selection and update makes it false.
_IDLE = (
    _CANDIDATE
    + """
    AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.sent_at >= :cutoff)
"""
)


def _policy_params(policy: ClosePolicy) -> dict[str, object]:
    return {"org": policy.organization_id, "cutoff": policy.cutoff, "close_waiting": policy.close_waiting}


async def count_idle(session: AsyncSession, policy: ClosePolicy) -> tuple[int, int]:
    """(idle conversations the policy closes, idle ones it keeps because the customer waits for an agent)."""
    row = (
        await session.execute(
            text(
                "SELECT count(*) FILTER (WHERE CAST(:close_waiting AS boolean) OR c.waiting_since IS NULL), "
                "count(*) FILTER (WHERE NOT CAST(:close_waiting AS boolean) AND c.waiting_since IS NOT NULL) "
                "FROM conversations c WHERE c.organization_id = :org AND c.status IN ('waiting', 'in_progress') "
                "AND c.last_message_at < :cutoff "
                "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.sent_at >= :cutoff)"
            ),
            _policy_params(policy),
        )
    ).one()
    return int(row[0]), int(row[1])


async def count_kept_waiting(session: AsyncSession, policy: ClosePolicy) -> int:
    """Conversations quiet since the cutoff that stay open because the customer waits for an agent's reply."""
    if policy.close_waiting:
        return 0
    found = await session.execute(
        text(
            "SELECT count(*) FROM conversations c WHERE c.organization_id = :org "
            "AND c.status IN ('waiting', 'in_progress') AND c.last_message_at < :cutoff "
            "AND c.waiting_since IS NOT NULL"
        ),
        _policy_params(policy),
    )
    return int(found.scalar_one())


async def select_idle(
    session: AsyncSession, policy: ClosePolicy, *, after: IdleConversation | None, limit: int
) -> list[IdleConversation]:
    """The next ``limit`` candidates after ``after`` (keyset on last message, id), in index order, without locks."""
    keyset = ""
    params = _policy_params(policy)
    if after is not None:
        keyset = (
            "AND c.last_message_at >= :after_at "
            "AND (c.last_message_at, c.id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS bigint))"
        )
        params |= {"after_at": after.last_message_at, "after_id": after.id}
    rows = await session.execute(
        text(
            f"SELECT c.id, c.last_message_at FROM conversations c WHERE {_CANDIDATE} {keyset} "
            "ORDER BY c.last_message_at, c.id LIMIT :limit"
        ),
        params | {"limit": limit},
    )
    return [IdleConversation(r[0], r[1]) for r in rows.all()]


# The contact lock mirrors the message path (db/repositories/conversations.py locks the contact FOR UPDATE before
# it picks the conversation): a conversation whose contact is taking a message right now is skipped, and a
# message that comes after this batch waits for it, then finds the conversation closed and opens a new one.
_CLOSE_SQL = text(f"""
WITH locked AS (
    SELECT c.ctid AS tid FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
    WHERE c.id = ANY(:ids) AND {_CANDIDATE}
    FOR NO KEY UPDATE OF c SKIP LOCKED FOR KEY SHARE OF ct SKIP LOCKED
), closed AS (
    UPDATE conversations c SET status = 'closed', closed_at = :now, close_reason = 'inactive', updated_at = :now
    FROM locked WHERE c.ctid = locked.tid AND {_IDLE}
    RETURNING c.id, c.organization_id, c.instance_id
), note AS (
    INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, from_me, sender, type, content,
                          sent_at, status)
    SELECT organization_id, instance_id, id, 'zapsync-close-' || id, true, 'system', 'text', :message, :now, 'sent'
    FROM closed
    ON CONFLICT (instance_id, external_id) DO NOTHING
)
SELECT id, instance_id FROM closed ORDER BY id
""")


async def close_idle(
    session: AsyncSession, policy: ClosePolicy, ids: Sequence[int], *, closed_at: datetime, message: str
) -> list[ClosedConversation]:
    """Close those of ``ids`` that are still idle, skipping rows another transaction holds.

    Each closed conversation gets ``close_reason='inactive'``, ``closed_at`` and one system message (external id
    ``zapsync-close-<id>``, so a repeated batch adds nothing).
    """
    if not ids:
        return []
    # A batch lost in a crash leaves its conversations open (and un-noted) for the next run to close: not worth an
    # fsync wait per batch while message writers queue behind its row locks.
    await session.execute(text("SET LOCAL synchronous_commit = off"))
    rows = await session.execute(
        _CLOSE_SQL, _policy_params(policy) | {"ids": list(ids), "now": closed_at, "message": message}
    )
    return [ClosedConversation(r[0], r[1]) for r in rows.all()]
