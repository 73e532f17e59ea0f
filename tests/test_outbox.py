"""The outbox end to end: the API queues, a real `send-messages` flow run sends through the simulator over loopback,
the simulator's echo and receipts come back as webhooks to the API, and PostgreSQL holds one row per message."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from core.settings import get_settings
from db.engine import session_scope
from flows.send_messages import send_messages, send_queued_now
from gateways.simulator import SimulatorState, WebhookEmitter
from tests.factories import auth_headers, make_instance, make_organization

pytestmark = pytest.mark.usefixtures("prefect_server")

SECRET = "org-secret"
NUMBER = "5511988887777"
JID = f"{NUMBER}@s.whatsapp.net"


@dataclass
class World:
    """An organization with a connected Evolution instance whose simulator webhooks reach the API."""

    http: httpx.AsyncClient
    sim: SimulatorState
    emitter: WebhookEmitter
    org: uuid.UUID
    instance_id: uuid.UUID
    headers: dict[str, str]

    async def send(self, body: dict[str, Any], *, key: str | None = None, instance: uuid.UUID | None = None) -> Any:
        headers = {**self.headers, **({"Idempotency-Key": key} if key else {})}
        return await self.http.post(f"/instances/{instance or self.instance_id}/messages", json=body, headers=headers)

    async def drain(self, *item_ids: int) -> list[Any]:
        states = await send_queued_now(list(item_ids), timeout_seconds=30)
        await self.emitter.flush()
        return states


@pytest.fixture
async def world(simulator: SimulatorState, monkeypatch: pytest.MonkeyPatch, database: str) -> AsyncIterator[World]:
    for name, value in {
        "ZAPSYNC_SEND_MIN_INTERVAL": "0",
        "ZAPSYNC_SEND_TIMEOUT": "0.3",
        "ZAPSYNC_SEND_UNKNOWN_GRACE": "0.5",
        "ZAPSYNC_QUEUE_RETRY_INITIAL": "0.05",
        "ZAPSYNC_QUEUE_RETRY_MAX": "0.1",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    from api.main import create_app

    org = await make_organization(secret=SECRET)
    instance_id = await make_instance(org, "acme-01", status="connected")
    inst = simulator.add_instance("acme-01", live_state="open")
    simulator.set_webhook(
        inst.name,
        {
            "url": f"http://zapsync/webhooks/evolution/{org}",
            "headers": {"x-webhook-secret": SECRET},
            "events": ["SEND_MESSAGE", "MESSAGES_UPSERT", "MESSAGES_UPDATE"],
        },
    )
    app = create_app(check_database=False)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://zapsync") as http,
        WebhookEmitter(simulator, evolution_url=None, megaapi_url=None, transport=transport) as emitter,
    ):
        yield World(http, simulator, emitter, org, instance_id, await auth_headers(org))
        await app.state.waker.settle()
    get_settings.cache_clear()


async def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
    async with session_scope() as session:
        return [dict(r) for r in (await session.execute(text(sql), params)).mappings().all()]


async def message(message_id: int) -> dict[str, Any]:
    (row,) = await rows("SELECT * FROM messages WHERE id = :id", id=message_id)
    return row


async def status_events(message_id: int) -> list[str]:
    found = await rows(
        "SELECT payload FROM live_events WHERE kind = 'message.status' AND (payload->>'message_id')::bigint = :id "
        "ORDER BY id",
        id=message_id,
    )
    return [r["payload"]["status"] for r in found]


async def test_the_same_idempotency_key_twice_makes_one_row_and_one_gateway_send(world: World) -> None:
    first = await world.send({"to": NUMBER, "text": "olá"}, key="k-1")
    again = await world.send({"to": NUMBER, "text": "olá"}, key="k-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["message"]["id"] == again.json()["message"]["id"]
    assert first.json()["message"]["status"] == "pending"
    assert first.json()["work_item_id"] == again.json()["work_item_id"]
    other = await world.send({"to": NUMBER, "text": "something else"}, key="k-1")
    assert other.status_code == 409

    (state,) = await world.drain(first.json()["work_item_id"])

    assert state.state == "done"
    assert world.sim.sends.summary()["total"] == 1
    (row,) = await rows("SELECT * FROM messages")
    assert (row["status"], row["client_id"], row["from_me"], row["sender"]) == ("sent", "k-1", True, "agent")
    assert row["external_id"] == world.sim.sends.records[0].external_id
    assert len(await rows("SELECT id FROM work_items WHERE kind = 'send'")) == 1
    assert await status_events(row["id"]) == ["pending", "sent"]


async def test_client_id_in_the_body_is_an_idempotency_key_too(world: World) -> None:
    first = await world.send({"to": NUMBER, "text": "x", "client_id": "c-1"})
    again = await world.send({"to": NUMBER, "text": "x", "client_id": "c-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert len(await rows("SELECT id FROM messages")) == 1


async def test_a_send_that_times_out_and_is_then_echoed_is_sent_without_a_second_send(world: World) -> None:
    world.sim.configure(send_timeout_rate=1.0, send_hang_s=1.0)
    queued = (await world.send({"to": NUMBER, "text": "are you there?"})).json()

    (state,) = await world.drain(queued["work_item_id"])

    assert state.state == "done"
    (record,) = world.sim.sends.records
    assert record.timed_out
    (row,) = await rows("SELECT * FROM messages")
    assert (row["id"], row["status"], row["external_id"]) == (queued["message"]["id"], "sent", record.external_id)
    events = await status_events(row["id"])
    assert events[0] == "pending" and events[-1] == "sent" and "failed" not in events


async def test_a_send_whose_echo_comes_after_its_timeout_is_confirmed_by_it_and_not_sent_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZAPSYNC_SEND_UNKNOWN_GRACE", "600")  # only the echo can end the wait
    get_settings.cache_clear()
    world.sim.set_webhook("acme-01", {"url": "http://zapsync/nowhere", "events": ["CONNECTION_UPDATE"]})
    world.sim.configure(send_timeout_rate=1.0, send_hang_s=3.0)
    queued = (await world.send({"to": NUMBER, "text": "late echo"})).json()
    item_id = queued["work_item_id"]

    await send_messages()  # the send leaves, the answer does not come in time
    (row,) = await rows("SELECT * FROM messages")
    assert (row["status"], row["external_id"]) == ("unknown", None)
    (item,) = await rows("SELECT state, next_attempt_at > now() + interval '5 minutes' AS waits FROM work_items")
    assert item == {"state": "pending", "waits": True}

    (record,) = world.sim.sends.records  # the gateway did take it; now its echo arrives
    echo = {"event": "send.message", "instance": "acme-01", "data": record.stored, "date_time": "2026-11-25T12:00:00Z"}
    posted = await world.http.post(f"/webhooks/evolution/{world.org}", json=echo, headers={"x-webhook-secret": SECRET})
    assert posted.status_code == 200
    (state,) = await world.drain(item_id)  # the wait is over: the item finishes without sending

    assert state.state == "done"
    assert len(world.sim.sends.records) == 1
    (row,) = await rows("SELECT * FROM messages")
    assert (row["status"], row["external_id"]) == ("sent", record.external_id)
    assert await status_events(row["id"]) == ["pending", "unknown", "sent"]


async def test_an_unknown_outcome_without_an_echo_is_found_in_the_gateways_history(world: World) -> None:
    world.sim.set_webhook("acme-01", {"url": "http://zapsync/nowhere", "events": ["CONNECTION_UPDATE"]})  # no echo
    world.sim.configure(send_timeout_rate=1.0, send_hang_s=3.0)
    queued = (await world.send({"to": NUMBER, "text": "did it go?"})).json()

    (state,) = await world.drain(queued["work_item_id"])

    assert state.state == "done"
    (record,) = world.sim.sends.records
    (row,) = await rows("SELECT * FROM messages")
    assert (row["status"], row["external_id"]) == ("sent", record.external_id)
    assert await status_events(row["id"]) == ["pending", "unknown", "sent"]
    assert world.sim.calls["evolution.findMessages:acme-01"] >= 1


async def test_an_unknown_outcome_the_gateway_never_took_is_sent_again_once(world: World) -> None:
    world.sim.configure(send_drop_next=1, send_hang_s=3.0)  # the first try is lost, the next gets through
    queued = (await world.send({"to": NUMBER, "text": "lost in transit"})).json()

    (state,) = await world.drain(queued["work_item_id"])

    assert state.state == "done"
    (record,) = world.sim.sends.records  # the lost try left nothing; the resend is the only send
    (row,) = await rows("SELECT * FROM messages")
    assert (row["status"], row["external_id"]) == ("sent", record.external_id)
    assert "unknown" in await status_events(row["id"])


async def test_number_not_on_whatsapp_fails_with_the_reason_and_is_not_retried(world: World) -> None:
    world.sim.configure(not_on_whatsapp=[NUMBER])
    queued = (await world.send({"to": NUMBER, "text": "hello"})).json()

    (state,) = await world.drain(queued["work_item_id"])

    assert (state.state, state.attempts) == ("failed", 1)
    assert "number not on WhatsApp" in (state.last_error or "")
    row = await message(queued["message"]["id"])
    assert row["status"] == "failed"
    assert "number not on WhatsApp" in row["error"]
    assert world.sim.sends.records == []
    assert await status_events(row["id"]) == ["pending", "failed"]


async def test_a_logged_out_instance_fails_the_message(world: World) -> None:
    async with session_scope() as session:
        await session.execute(
            text("UPDATE whatsapp_instances SET logged_out = true WHERE id = :id"), {"id": world.instance_id}
        )
    queued = (await world.send({"to": NUMBER, "text": "hello"})).json()
    (state,) = await world.drain(queued["work_item_id"])
    assert state.state == "failed"
    assert (await message(queued["message"]["id"]))["error"] == "instance logged out"
    assert world.sim.sends.records == []


async def test_receipts_move_the_status_forward_only(world: World) -> None:
    world.sim.configure(receipts=True)
    queued = (await world.send({"to": NUMBER, "text": "read me"})).json()
    await world.drain(queued["work_item_id"])
    row = await message(queued["message"]["id"])
    assert row["status"] == "read"

    late = {
        "event": "messages.update",
        "instance": "acme-01",
        "data": {"keyId": row["external_id"], "remoteJid": JID, "fromMe": True, "status": "DELIVERY_ACK"},
    }
    answer = await world.http.post(f"/webhooks/evolution/{world.org}", json=late, headers={"x-webhook-secret": SECRET})
    assert answer.status_code == 200
    assert (await message(row["id"]))["status"] == "read"
    events = await status_events(row["id"])
    assert events[0] == "pending" and events[-1] == "read" and "delivered" in events


async def test_order_is_kept_per_instance(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZAPSYNC_SEND_MIN_INTERVAL", "0.1")
    get_settings.cache_clear()
    other = await make_instance(world.org, "acme-02", status="connected")
    world.sim.add_instance("acme-02", live_state="open")
    items = []
    for n in range(3):
        items.append((await world.send({"to": NUMBER, "text": f"one-{n}"})).json()["work_item_id"])
        items.append((await world.send({"to": NUMBER, "text": f"two-{n}"}, instance=other)).json()["work_item_id"])

    states = await world.drain(*items)

    assert {s.state for s in states} == {"done"}
    by_instance: dict[str, list[str | None]] = {}
    for record in world.sim.sends.records:
        by_instance.setdefault(record.instance, []).append(record.text)
    assert by_instance == {"acme-01": ["one-0", "one-1", "one-2"], "acme-02": ["two-0", "two-1", "two-2"]}


async def test_a_business_reply_clears_waiting_and_moves_the_conversation_in_progress(world: World) -> None:
    inbound = {
        "event": "messages.upsert",
        "instance": "acme-01",
        "data": {
            "key": {"remoteJid": JID, "fromMe": False, "id": "IN-1"},
            "pushName": "Ana",
            "message": {"conversation": "oi, preciso de ajuda"},
            "messageType": "conversation",
            "messageTimestamp": int(__import__("time").time()),
        },
    }
    assert (
        await world.http.post(f"/webhooks/evolution/{world.org}", json=inbound, headers={"x-webhook-secret": SECRET})
    ).status_code == 200
    (conversation,) = await rows("SELECT id, status, waiting_since FROM conversations")
    assert conversation["status"] == "waiting" and conversation["waiting_since"] is not None

    reply = await world.http.post(
        f"/conversations/{conversation['id']}/messages", json={"text": "Olá Ana!"}, headers=world.headers
    )

    assert reply.status_code == 201
    assert reply.json()["message"]["conversation_id"] == conversation["id"]
    (after,) = await rows("SELECT id, status, waiting_since FROM conversations")
    assert (after["status"], after["waiting_since"]) == ("in_progress", None)


async def test_another_organizations_token_cannot_send_through_its_instance_or_conversation(world: World) -> None:
    queued = (await world.send({"to": NUMBER, "text": "mine"})).json()
    intruder = await auth_headers(await make_organization("Other", secret="other-secret"))

    through_instance = await world.http.post(
        f"/instances/{world.instance_id}/messages", json={"to": NUMBER, "text": "x"}, headers=intruder
    )
    to_conversation = await world.http.post(
        f"/conversations/{queued['message']['conversation_id']}/messages", json={"text": "x"}, headers=intruder
    )

    assert (through_instance.status_code, to_conversation.status_code) == (404, 404)
    assert len(await rows("SELECT id FROM messages")) == 1
    assert len(await rows("SELECT id FROM work_items WHERE kind = 'send'")) == 1


async def test_invalid_messages_are_refused_with_a_sentence(world: World) -> None:
    no_text = await world.send({"to": NUMBER, "type": "text"})
    bad_media = await world.send({"to": NUMBER, "type": "image", "media_url": "ftp://x/y.jpg"})
    bad_number = await world.send({"to": "12", "text": "x"})
    assert {r.status_code for r in (no_text, bad_media, bad_number)} == {422}
    assert "text" in no_text.json()["detail"]
    assert "http(s)" in bad_media.json()["detail"]
    assert await rows("SELECT id FROM messages") == []


def _seed_failing_first_send_only() -> int:
    """A simulator seed whose first send draw fails (rate 0.5) and whose second succeeds."""
    for seed in range(1000):
        draws = random.Random(f"sends:{seed}")
        if draws.random() < 0.5 <= draws.random():
            return seed
    raise AssertionError("no such seed")


async def test_a_503_then_success_is_sent_once(world: World) -> None:
    world.sim.configure(seed=_seed_failing_first_send_only(), send_error_rate=0.5)
    queued = (await world.send({"to": NUMBER, "text": "retry me"})).json()

    (state,) = await world.drain(queued["work_item_id"])

    assert (state.state, state.attempts) == ("done", 2)
    assert world.sim.sends.summary()["total"] == 1
    assert (await message(queued["message"]["id"]))["status"] == "sent"


async def test_media_by_url_with_caption(world: World) -> None:
    queued = (
        await world.send(
            {"to": NUMBER, "type": "image", "media_url": "https://cdn.example/p.jpg", "caption": "the photo"}
        )
    ).json()
    await world.drain(queued["work_item_id"])
    (record,) = world.sim.sends.records
    assert (record.type, record.text, record.media_url) == ("image", "the photo", "https://cdn.example/p.jpg")
    (row,) = await rows("SELECT type, content, media_url, status FROM messages")
    assert row == {"type": "image", "content": "the photo", "media_url": "https://cdn.example/p.jpg", "status": "sent"}


def echo(external_id: str, body: str, *, from_me: bool = True) -> dict[str, Any]:
    """Evolution's `send.message` for a message of the business."""
    import time

    return {
        "event": "send.message",
        "instance": "acme-01",
        "data": {
            "key": {"remoteJid": JID, "fromMe": from_me, "id": external_id},
            "message": {"conversation": body},
            "messageType": "conversation",
            "messageTimestamp": int(time.time()),
            "status": "PENDING",
        },
    }


async def test_an_echo_after_an_unknown_outcome_adopts_the_outbox_row(world: World) -> None:
    from db.repositories.outbox import load_send_job, mark_attempted, set_outcome

    queued = (await world.send({"to": NUMBER, "text": "did it go?"})).json()
    message_id = queued["message"]["id"]
    async with session_scope() as session:
        job = await load_send_job(session, message_id)
        assert job is not None
        assert await mark_attempted(session, message_id) is not None
        await set_outcome(session, job, status="unknown", error="no answer")

    answer = await world.http.post(
        f"/webhooks/evolution/{world.org}", json=echo("3EB0LATE", "did it go?"), headers={"x-webhook-secret": SECRET}
    )

    assert answer.status_code == 200
    (row,) = await rows("SELECT id, status, external_id, error FROM messages")
    assert row == {"id": message_id, "status": "sent", "external_id": "3EB0LATE", "error": None}
    (state,) = await world.drain(queued["work_item_id"])  # the retry finds it sent: nothing goes out
    assert state.state == "done"
    assert world.sim.sends.records == []


async def test_an_echo_of_a_message_never_attempted_is_not_adopted(world: World) -> None:
    await world.send({"to": NUMBER, "text": "same words"})
    await world.http.post(
        f"/webhooks/evolution/{world.org}", json=echo("3EB0PHONE", "same words"), headers={"x-webhook-secret": SECRET}
    )
    found = await rows("SELECT external_id, status FROM messages ORDER BY id")
    assert found == [{"external_id": None, "status": "pending"}, {"external_id": "3EB0PHONE", "status": "pending"}]


async def test_recording_the_gateway_id_merges_a_row_its_echo_inserted(world: World) -> None:
    from db.repositories.outbox import load_send_job, record_sent

    queued = (await world.send({"to": NUMBER, "text": "merge me"})).json()
    await world.http.post(  # inserted on its own: the outbox row was not attempted yet
        f"/webhooks/evolution/{world.org}", json=echo("3EB0MERGE", "merge me"), headers={"x-webhook-secret": SECRET}
    )
    await world.http.post(
        f"/webhooks/evolution/{world.org}",
        json={
            "event": "messages.update",
            "instance": "acme-01",
            "data": {"keyId": "3EB0MERGE", "remoteJid": JID, "fromMe": True, "status": "DELIVERY_ACK"},
        },
        headers={"x-webhook-secret": SECRET},
    )
    assert len(await rows("SELECT id FROM messages")) == 2
    async with session_scope() as session:
        job = await load_send_job(session, queued["message"]["id"])
        assert job is not None
        change = await record_sent(session, job, external_id="3EB0MERGE", status="sent")

    assert change is not None and change.status == "delivered"
    (row,) = await rows("SELECT id, external_id, status, client_id FROM messages")
    assert (row["id"], row["external_id"], row["status"]) == (queued["message"]["id"], "3EB0MERGE", "delivered")


async def test_the_warm_worker_sends_what_the_api_queues(world: World, start_worker: Any) -> None:
    from flows.runs import wait_for_item

    start_worker()
    queued = (await world.send({"to": NUMBER, "text": "via the worker"})).json()

    state = await wait_for_item(queued["work_item_id"], timeout=60)

    assert state.state == "done"
    assert [r.text for r in world.sim.sends.records] == ["via the worker"]
    assert (await message(queued["message"]["id"]))["status"] == "sent"


async def test_a_message_that_must_wait_holds_the_rest_of_its_line_which_goes_back_unsent(world: World) -> None:
    world.sim.configure(send_drop_next=1, send_hang_s=3.0)  # the first try is lost: its outcome is unknown
    items = [(await world.send({"to": NUMBER, "text": f"line-{n}"})).json()["work_item_id"] for n in range(3)]

    states = await world.drain(*items)

    assert [s.state for s in states] == ["done", "done", "done"]
    assert [r.text for r in world.sim.sends.records] == ["line-0", "line-1", "line-2"]  # nothing overtook line-0
    # claimed with line-0 and given back unsent while it waited: those claims are not counted as attempts
    assert [s.attempts for s in states] == [2, 1, 1]
