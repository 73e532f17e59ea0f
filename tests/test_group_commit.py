"""Group commit of message deliveries (api/group_commit.py, api.inbox.apply_message_batch): a batch ends as the
same deliveries applied one by one would, one bad delivery does not fail the others, and a burst of concurrent
webhooks is stored exactly once. Real PostgreSQL, the API in-process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from api.group_commit import ALONE, Alone, GroupCommitter
from api.inbox import Delivery, HandlingResult, apply_message_batch, message_committer
from core.errors import DatabaseUnavailable
from gateways.webhook_payloads import parse_evolution
from tests.factories import count, make_instance, make_organization
from tests.test_messages_webhooks import CUSTOMER, conversations, envelope, message, message_row, post, rows

OTHER = "5511912345678@s.whatsapp.net"


@pytest.fixture
async def org() -> uuid.UUID:
    organization = await make_organization()
    await make_instance(organization, "acme-01", status="connected")
    return organization


def delivery(org: uuid.UUID, event: str, data: object, *, instance: str = "acme-01") -> Delivery:
    payload = {**envelope(event, data), "instance": instance}
    return Delivery(org, parse_evolution(payload), payload, datetime.now(UTC))


async def test_a_batch_ends_as_its_deliveries_applied_one_by_one(client, org) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    await post(client, org, envelope("send.message", message("OUT1", from_me=True, at=start, status="PENDING")))
    batch = [
        delivery(org, "messages.upsert", message("IN1", at=start + timedelta(seconds=10))),
        delivery(org, "messages.upsert", message("IN2", at=start + timedelta(seconds=20))),
        delivery(org, "messages.upsert", message("IN1", at=start + timedelta(seconds=10))),  # a redelivery
        delivery(org, "messages.upsert", message("IN3", jid=OTHER, at=start + timedelta(seconds=15))),
        delivery(org, "messages.upsert", message("G1", jid="120363000000000000@g.us")),  # a group: not imported
        delivery(org, "messages.update", {"keyId": "OUT1", "remoteJid": CUSTOMER, "status": "DELIVERY_ACK"}),
        delivery(org, "messages.update", {"keyId": "OUT1", "remoteJid": CUSTOMER, "status": "READ"}),
        delivery(org, "messages.upsert", message("U1"), instance="not-ours"),  # untracked: applied alone
    ]

    results = await apply_message_batch(batch)

    assert [r if r is ALONE else (r.outcome, r.detail) for r in results] == [
        ("applied", "1 new of 1 messages"),
        ("applied", "1 new of 1 messages"),
        ("duplicate", None),
        ("applied", "1 new of 1 messages"),
        ("ignored", "group and broadcast chats are not imported"),
        ("applied", "0 of 1 message statuses moved forward"),  # as if READ had arrived first
        ("applied", "1 of 1 message statuses moved forward"),
        ALONE,
    ]
    assert (await message_row("OUT1"))["status"] == "read"
    assert await count("messages") == 4
    assert await count("webhook_events") == 7  # the send, and every distinct delivery but the untracked one
    by_contact = {c["jid"]: c for c in await conversations()}
    assert set(by_contact) == {CUSTOMER, OTHER}
    assert int(by_contact[CUSTOMER]["waiting_since"].timestamp()) == int((start + timedelta(seconds=10)).timestamp())
    assert by_contact[OTHER]["status"] == "waiting"
    kinds = sorted(e["kind"] for e in await rows("SELECT kind FROM live_events"))
    assert kinds.count("message.new") == 4  # OUT1 (its own delivery) and the three new messages
    assert kinds.count("message.status") == 1  # OUT1 moved once, straight to read


async def test_a_burst_of_concurrent_webhooks_is_stored_once_and_answered_each(client, org) -> None:
    bodies = [envelope("messages.upsert", message(f"B{i}", jid=f"55119{i % 7:08d}@s.whatsapp.net")) for i in range(60)]
    bodies += bodies[:10]  # redeliveries racing their first delivery

    batches_before = message_committer().batches
    answers = await asyncio.gather(*(post(client, org, body) for body in bodies))

    assert [a.status_code for a in answers] == [200] * 70
    outcomes = [a.json()["outcome"] for a in answers]
    assert outcomes.count("applied") == 60 and outcomes.count("duplicate") == 10
    assert await count("messages") == 60 and await count("webhook_events") == 60
    assert len(await conversations()) == 7  # one per contact, however the deliveries were grouped
    assert message_committer().batches - batches_before < 70  # some deliveries shared a transaction


async def test_one_bad_item_does_not_fail_the_others_and_a_lost_database_fails_them_all() -> None:
    applied_alone: list[int] = []

    async def batch_fails(items: Sequence[int]) -> list[str | Alone]:
        raise ValueError("one item is bad")

    async def one(item: int) -> str:
        if item == 3:
            raise ValueError("bad item")
        applied_alone.append(item)
        return f"ok {item}"

    committer: GroupCommitter[int, str] = GroupCommitter(batch_fails, one, max_inflight=1)
    answers = await asyncio.gather(*(committer.submit(i) for i in range(6)), return_exceptions=True)

    assert [str(a) for a in answers] == ["ok 0", "ok 1", "ok 2", "bad item", "ok 4", "ok 5"]
    assert sorted(applied_alone) == [0, 1, 2, 4, 5]
    assert committer.largest == 5  # the first item alone, then the five that queued meanwhile

    async def no_database(items: Sequence[int]) -> list[str | Alone]:
        raise DatabaseUnavailable("the database is unreachable: OperationalError")

    lost: GroupCommitter[int, str] = GroupCommitter(no_database, one, max_inflight=1)
    first = asyncio.ensure_future(lost.submit(0))
    others = [asyncio.ensure_future(lost.submit(i)) for i in (1, 2)]
    assert await first == "ok 0"  # alone, through the one-by-one path
    for other in others:
        with pytest.raises(DatabaseUnavailable):
            await other


async def test_results_are_given_back_in_order_and_alone_items_after_the_batch() -> None:
    async def batch(items: Sequence[int]) -> list[HandlingResult | Alone]:
        return [ALONE if i % 2 else HandlingResult("applied", f"batch {i}") for i in items]

    async def one(item: int) -> HandlingResult:
        return HandlingResult("ignored", f"alone {item}")

    committer: GroupCommitter[int, HandlingResult] = GroupCommitter(batch, one, max_inflight=1)
    answers = await asyncio.gather(*(committer.submit(i) for i in range(5)))

    assert [a.detail for a in answers] == ["alone 0", "alone 1", "batch 2", "alone 3", "batch 4"]


# -- the credentials read of the receive path (lean14) -------------------------------------------------------------


async def test_concurrent_credential_reads_answer_each_organization_and_see_a_rotation_at_once() -> None:
    from api.group_commit import webhook_credentials_of
    from db.engine import session_scope
    from db.repositories.organizations import digest, set_webhook_secret

    first = await make_organization("First", secret="first-secret")
    second = await make_organization("Second", secret="second-secret")
    unknown = uuid.uuid4()
    asked = [first, second, unknown, first, second] * 4
    answers = await asyncio.gather(*(webhook_credentials_of(org) for org in asked))

    expected = {first: digest("first-secret"), second: digest("second-secret")}
    assert [a.secret_hash if a else None for a in answers] == [expected.get(org) for org in asked]
    assert all(a.secret() == "first-secret" for a, org in zip(answers, asked, strict=True) if org == first and a)

    async with session_scope() as session:  # nothing is remembered: the next read sees a rotated secret
        assert await set_webhook_secret(session, first, "rotated-secret")
    rotated = await webhook_credentials_of(first)
    assert rotated is not None and rotated.secret_hash == digest("rotated-secret")
    assert rotated.secret() == "rotated-secret"
