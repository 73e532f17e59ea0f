"""Cleanup and inactive-conversation work: plain functions over db/repositories, each wrapped by one thin task.

Every delete or close is a batch in its own transaction, so a task retried after a database failure redoes
only what is still to do.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from prefect import task

from core.events import Kind, event
from db.engine import session_scope
from db.repositories.live_events import publish
from db.repositories.maintenance import (
    ClosedConversation,
    ClosePolicy,
    IdleConversation,
    PrunableTable,
    close_idle,
    count_expired_sessions,
    count_idle,
    count_kept_waiting,
    count_older,
    delete_expired_sessions,
    delete_older,
    select_idle,
    session_retention_groups,
)
from tasks.options import TASK_OPTIONS

T = TypeVar("T")

# -- cleanup ------------------------------------------------------------------------------------------------------


async def prune_expired_sessions(
    *, organization_id: uuid.UUID | None, override_days: int | None, now: datetime, batch_size: int, dry_run: bool
) -> tuple[dict[int, int], int]:
    """Delete (or count) ended sessions past their organization's retention; ({days: sessions}, batches)."""
    async with session_scope() as session:
        groups = await session_retention_groups(session, organization_id=organization_id, override_days=override_days)
    found: dict[int, int] = {}
    batches = 0
    for group in groups:
        cutoff = now - timedelta(days=group.days)
        if dry_run:
            async with session_scope() as session:
                found[group.days] = await count_expired_sessions(
                    session, organization_ids=group.organization_ids, cutoff=cutoff
                )
            continue
        total = 0
        while True:
            async with session_scope() as session:
                deleted = await delete_expired_sessions(
                    session, organization_ids=group.organization_ids, cutoff=cutoff, limit=batch_size
                )
            batches += 1
            total += deleted
            if deleted < batch_size:
                break
        found[group.days] = total
    return {days: n for days, n in found.items() if n}, batches


async def prune_old_rows(
    table: PrunableTable, *, cutoff: datetime, organization_id: uuid.UUID | None, batch_size: int, dry_run: bool
) -> tuple[int, int]:
    """Delete (or count) rows of ``table`` older than ``cutoff`` in batches; (rows, batches)."""
    if dry_run:
        async with session_scope() as session:
            return await count_older(session, table, cutoff=cutoff, organization_id=organization_id), 0
    total = batches = 0
    while True:
        async with session_scope() as session:
            deleted = await delete_older(
                session, table, cutoff=cutoff, organization_id=organization_id, limit=batch_size
            )
        batches += 1
        total += deleted
        if deleted < batch_size:
            return total, batches


prune_sessions = task(name="prune-sessions", **TASK_OPTIONS)(prune_expired_sessions)
prune_table = task(name="prune-table", **TASK_OPTIONS)(prune_old_rows)


# -- inactive conversations ---------------------------------------------------------------------------------------


async def count_idle_and_waiting(policy: ClosePolicy) -> tuple[int, int]:
    """(idle conversations the policy closes, idle ones kept because the customer waits for an agent)."""
    async with session_scope() as session:
        return await count_idle(session, policy)


async def count_waiting(policy: ClosePolicy) -> int:
    """Quiet conversations left open because the customer still waits for an agent."""
    async with session_scope() as session:
        return await count_kept_waiting(session, policy)


async def read_idle_candidates(
    policy: ClosePolicy, *, after: IdleConversation | None, limit: int
) -> list[IdleConversation]:
    """The next candidates, read without locks (the closing UPDATE re-checks each one)."""
    async with session_scope() as session:
        return await select_idle(session, policy, after=after, limit=limit)


async def close_idle_batch(
    policy: ClosePolicy,
    ids: Sequence[int],
    *,
    closed_at: datetime,
    message: str,
    transaction_size: int,
) -> list[ClosedConversation]:
    """Close one batch, ``transaction_size`` rows per transaction (short row locks: message writers that reach a
    locked conversation wait for at most one transaction), each with its system messages and one
    `conversations.closed` event. A retry closes only what is still idle."""
    closed: list[ClosedConversation] = []
    for start in range(0, len(ids), transaction_size):
        async with session_scope() as session:
            done = await close_idle(
                session, policy, ids[start : start + transaction_size], closed_at=closed_at, message=message
            )
            if done:
                await publish(
                    [
                        event(
                            policy.organization_id,
                            Kind.CONVERSATIONS_CLOSED,
                            reason="inactive",
                            count=len(done),
                            conversation_ids=[c.id for c in done],
                            closed_at=closed_at.isoformat(),
                        )
                    ],
                    session=session,
                )
        closed += done
    return closed


class Opaque(Generic[T]):
    """A task argument or result Prefect does not walk. A list passed or returned as such is visited element by
    element (inputs searched for futures, results linked to the task run): ~4 visits per closed conversation, about
    as much CPU as closing it."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


count_idle_conversations = task(name="count-idle-conversations", **TASK_OPTIONS)(count_idle_and_waiting)
count_waiting_conversations = task(name="count-kept-waiting", **TASK_OPTIONS)(count_waiting)


@task(name="select-idle-conversations", **TASK_OPTIONS)
async def select_idle_conversations(
    policy: ClosePolicy, *, after: IdleConversation | None, limit: int
) -> Opaque[list[IdleConversation]]:
    """:func:`read_idle_candidates` as a task run."""
    return Opaque(await read_idle_candidates(policy, after=after, limit=limit))


@task(name="close-idle-conversations", **TASK_OPTIONS)
async def close_conversations(
    policy: ClosePolicy, ids: Opaque[Sequence[int]], *, closed_at: datetime, message: str, transaction_size: int
) -> Opaque[list[ClosedConversation]]:
    """:func:`close_idle_batch` as a task run."""
    return Opaque(
        await close_idle_batch(
            policy, ids.value, closed_at=closed_at, message=message, transaction_size=transaction_size
        )
    )
