"""Inactive conversations: closed per organization setting, a late message wins, waiting ones kept, system message."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text

from core.policies.inactivity import closing_message
from db.engine import get_engine
from db.repositories.maintenance import ClosePolicy
from flows.close_inactive import close_inactive_conversations, close_organization
from tasks.maintenance import close_idle_batch, read_idle_candidates
from tests.factories import count, make_instance, make_organization
from tests.maintenance_rows import (
    add_conversation,
    add_message,
    ago,
    conversation,
    live_events,
    set_org,
    system_messages,
)

pytestmark = pytest.mark.usefixtures("prefect_server")


async def _org(name: str, *, hours: int, close_waiting: bool = False) -> tuple[uuid.UUID, uuid.UUID]:
    org = await make_organization(name)
    await set_org(org, inactivity_hours=hours, close_waiting_conversations=close_waiting)
    return org, await make_instance(org, f"{name.lower()}-01", status="connected")


async def test_closes_exactly_the_idle_conversations_per_organization_setting() -> None:
    a, a_inst = await _org("A", hours=24)  # default: keep conversations waiting on an agent
    b, b_inst = await _org("B", hours=2, close_waiting=True)
    conv = {
        "a_idle": await add_conversation(a, a_inst, last_message_at=ago(hours=30)),
        "a_idle_waiting": await add_conversation(a, a_inst, last_message_at=ago(hours=30), waiting_since=ago(hours=30)),
        "a_recent": await add_conversation(a, a_inst, last_message_at=ago(hours=5)),
        "a_closed_before": await add_conversation(a, a_inst, last_message_at=ago(hours=50), status="closed"),
        "b_idle": await add_conversation(b, b_inst, last_message_at=ago(hours=3), status="waiting"),
        "b_idle_waiting": await add_conversation(b, b_inst, last_message_at=ago(hours=3), waiting_since=ago(hours=3)),
        "b_recent": await add_conversation(b, b_inst, last_message_at=ago(minutes=30)),
    }
    closed_before = await conversation(conv["a_closed_before"])

    report = await close_inactive_conversations()

    assert report.flow_run_id is not None and report.skipped is None
    closed = {"a_idle", "b_idle", "b_idle_waiting"}
    for name, conversation_id in conv.items():
        row = await conversation(conversation_id)
        if name in closed:
            assert row["status"] == "closed", name
            assert row["close_reason"] == "inactive" and row["closed_at"] == report.started_at, name
        elif name != "a_closed_before":
            assert row["status"] in ("waiting", "in_progress") and row["closed_at"] is None, name
    assert await conversation(conv["a_closed_before"]) == closed_before
    assert report.closed == 3 and report.kept_waiting == 1 and report.raced == 0
    by_org = {o.organization_id: o for o in report.organizations}
    assert (by_org[a].closed, by_org[a].kept_waiting, by_org[b].closed) == (1, 1, 2)

    notes = await system_messages()
    assert [n["conversation_id"] for n in notes] == sorted(conv[name] for name in closed)
    assert all(n["external_id"] == f"zapsync-close-{n['conversation_id']}" for n in notes)
    texts = {n["conversation_id"]: n["content"] for n in notes}
    assert texts[conv["a_idle"]] == "Conversation closed automatically after 1 day of inactivity."
    assert texts[conv["b_idle"]] == "Conversation closed automatically after 2 hours of inactivity."
    [event_a] = [e for e in await live_events("conversations.closed") if e["organization_id"] == a]
    assert event_a["payload"]["conversation_ids"] == [conv["a_idle"]]

    again = await close_inactive_conversations()
    assert again.closed == 0 and len(await system_messages()) == 3


async def test_dry_run_counts_and_closes_nothing() -> None:
    a, a_inst = await _org("A", hours=24)
    idle = await add_conversation(a, a_inst, last_message_at=ago(hours=30))
    await add_conversation(a, a_inst, last_message_at=ago(hours=30), waiting_since=ago(hours=29))

    report = await close_inactive_conversations(organization_id=a, dry_run=True)

    assert report.dry_run and report.idle == 1 and report.kept_waiting == 1 and report.closed == 0
    assert (await conversation(idle))["status"] == "in_progress"
    assert await count("messages") == 2  # only the seeded ones


@pytest.mark.parametrize("bump", [True, False], ids=["handler-bumps-last-message", "message-row-only"])
async def test_a_message_between_selection_and_update_keeps_its_conversation_open(bump: bool) -> None:
    a, a_inst = await _org("A", hours=24)
    ids = [await add_conversation(a, a_inst, last_message_at=ago(hours=30 + i)) for i in range(3)]
    late = ids[1]
    policy = ClosePolicy(organization_id=a, inactivity_hours=24, close_waiting=False, cutoff=ago(hours=24))

    candidates = sorted(c.id for c in await read_idle_candidates(policy, after=None, limit=10))
    await add_message(late, bump=bump)  # committed after the selection, before the UPDATE
    closed = await close_idle_batch(
        policy, candidates, closed_at=ago(), message=closing_message(24), transaction_size=1000
    )

    assert candidates == sorted(ids)  # it was selected as idle
    assert len(closed) == 2 and len(candidates) - len(closed) == 1  # two closed, one raced
    assert (await conversation(late))["status"] == "in_progress"
    assert {(await conversation(i))["status"] for i in ids if i != late} == {"closed"}
    assert late not in {n["conversation_id"] for n in await system_messages()}


@pytest.mark.parametrize("table", ["conversations", "contacts"])
async def test_a_row_held_by_another_transaction_is_skipped_not_waited_for(table: str) -> None:
    a, a_inst = await _org("A", hours=24)
    held = await add_conversation(a, a_inst, last_message_at=ago(hours=30))
    free = await add_conversation(a, a_inst, last_message_at=ago(hours=30))
    lock = {  # a message handler mid-transaction locks the contact first (db/repositories/conversations.py)
        "conversations": "SELECT id FROM conversations WHERE id = :id FOR UPDATE",
        "contacts": "SELECT ct.id FROM contacts ct JOIN conversations c ON c.contact_id = ct.id WHERE c.id = :id "
        "FOR UPDATE OF ct",
    }[table]

    async with get_engine().connect() as other:
        await other.execute(text(lock), {"id": held})
        report = await asyncio.wait_for(close_inactive_conversations(organization_id=a), timeout=30)
        await other.rollback()

    assert report.closed == 1 and report.raced == 1
    assert (await conversation(held))["status"] == "in_progress"
    assert (await conversation(free))["status"] == "closed"

    later = await close_inactive_conversations(organization_id=a)
    assert later.closed == 1 and (await conversation(held))["status"] == "closed"


async def test_many_small_rounds_close_every_idle_conversation_once() -> None:
    a, a_inst = await _org("A", hours=24)
    same_instant = ago(hours=40)  # ties on last_message_at: the keyset must still move past each row once
    idle = [
        await add_conversation(a, a_inst, last_message_at=same_instant if i % 3 else ago(hours=30 + i))
        for i in range(9)
    ]
    recent = await add_conversation(a, a_inst, last_message_at=ago(hours=1))
    policy = ClosePolicy(organization_id=a, inactivity_hours=24, close_waiting=False, cutoff=ago(hours=24))

    rounds: list[list[int]] = []  # the keyset walk the flow makes, with rounds of batch_size 2 × concurrency 2
    page = await read_idle_candidates(policy, after=None, limit=4)
    while page:
        rounds.append([c.id for c in page])
        page = await read_idle_candidates(policy, after=page[-1], limit=4) if len(page) == 4 else []
    summary = await close_organization(policy, closed_at=ago(), dry_run=False, batch_size=2, concurrency=2)

    assert [len(r) for r in rounds] == [4, 4, 1]
    assert sorted(i for r in rounds for i in r) == sorted(idle)
    assert (summary.closed, summary.raced, summary.batches) == (9, 0, 5)
    assert {(await conversation(i))["status"] for i in idle} == {"closed"}
    assert (await conversation(recent))["status"] == "in_progress"
    assert len(await system_messages()) == 9
