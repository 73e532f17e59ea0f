"""One conformance suite for every gateway (issue 12 §5): the same scenarios and assertions against the Evolution,
MegaAPI and WAHA simulators over loopback, real PostgreSQL, real Prefect runs where the scenario has a flow.
A scenario a gateway cannot do is skipped with the reason.

Scenarios: status sync (drift found and applied), connect's QR, connect/provisioning through the API (the instance
created at the gateway with zapsync's webhook, the scan connecting it by webhook), import on connect (drained by a
flow run), message and receipt webhooks (receipts only move forward), and a send through the outbox (one gateway
send, its echo adopting the outbox row, its receipts). Instances are created through zapsync, so every webhook comes
from the simulator to the receiver zapsync configured, authenticated as the organization chose (WAHA: HMAC only)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from core.qr import qr_png_data_url
from core.settings import get_settings
from db.engine import session_scope
from gateways.registry import open_gateways
from gateways.simulator import SimulatorServer, SimulatorState, WebhookEmitter
from tests.factories import auth_headers, history, instance_row, make_instance, make_organization
from tests.test_import import expected_messages
from tests.test_provisioning import decode_qr

PROVIDERS = ("evolution", "megaapi", "waha")
SECRET = "conformance-secret"
NUMBER = "5511988887777"
JID = f"{NUMBER}@s.whatsapp.net"
CREATE_CALL = {"evolution": "evolution.create", "megaapi": "megaapi.init", "waha": "waha.create"}
"""The simulator's counter of each provider's create call."""
WEBHOOK_AUTH = {"evolution": "secret", "megaapi": "secret", "waha": "hmac"}
"""What the organization accepts from each provider: WAHA's deliveries must be HMAC-signed with its key."""
NO_HISTORY = "MegaAPI has no history API: nothing to import on connect (gateways.md §4)"


@pytest.fixture
def gateway(
    request: pytest.FixtureRequest, simulator, simulator_server: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The provider under test, its gateway (named as the provider) configured at the simulator."""
    monkeypatch.setenv("WAHA_API_URL", simulator_server.url)
    monkeypatch.setenv("WAHA_API_KEY", "sim-waha-key")
    get_settings.cache_clear()
    yield request.param
    monkeypatch.delenv("WAHA_API_URL")
    monkeypatch.delenv("WAHA_API_KEY")
    get_settings.cache_clear()


each_gateway = pytest.mark.parametrize("gateway", PROVIDERS, indirect=True)


@each_gateway
@pytest.mark.usefixtures("prefect_server")
async def test_status_sync_finds_and_applies_drift(gateway: str, simulator) -> None:
    from flows.sync_status import sync_status

    org = await make_organization()
    simulator.add_instance("up-01", gateway, "open")
    simulator.add_instance("down-01", gateway, "close")
    simulator.add_instance("same-01", gateway, "open")
    up = await make_instance(org, "up-01", gateway=gateway, status="disconnected")
    down = await make_instance(org, "down-01", gateway=gateway, status="connected")
    same = await make_instance(org, "same-01", gateway=gateway, status="connected")

    report = await sync_status(mode="apply")

    assert report.flow_run_id is not None and report.failed_gateways == []
    assert (report.checked, report.drifted, report.applied, report.unreachable) == (3, 2, 2, 0)
    assert (await instance_row(up))["status"] == "connected"
    assert (await instance_row(down))["status"] == "disconnected"
    assert await history(up) == [("disconnected", "connected", "sync")]
    assert await history(same) == []
    assert set(report.became_connected) == {up}


@each_gateway
async def test_connect_gives_a_raw_qr_that_decodes(gateway: str, simulator) -> None:
    simulator.add_instance("qr-01", gateway, "close")

    async with open_gateways({gateway}) as gateways:
        result = await gateways[gateway].connect("qr-01")

    assert result.qr_code, result
    # Evolution and WAHA give the raw string a phone scans; MegaAPI documents only its QR image (gateways.md §8.5).
    image = result.qr_code if gateway == "megaapi" else qr_png_data_url(result.qr_code)
    assert gateway == "megaapi" or not result.qr_code.startswith("data:image/")
    assert decode_qr(image) == simulator.instances["qr-01"].qr_code


# -- a zapsync API whose gateways' webhooks reach it ------------------------------------------------------------


@dataclass
class World:
    """An organization, the API in-process and the simulator's webhook deliveries to it (to each instance's own
    webhook, as zapsync configured it when it created the instance)."""

    gateway: str
    sim: SimulatorState
    http: httpx.AsyncClient
    emitter: WebhookEmitter
    org: uuid.UUID
    headers: dict[str, str]

    async def connect(self, user: str) -> dict[str, Any]:
        """`POST /users/{user}/whatsapp/connect` at the gateway under test; the answer's body."""
        response = await self.http.post(
            f"/users/{user}/whatsapp/connect", json={"gateway": self.gateway}, headers=self.headers
        )
        assert response.status_code == 200, response.text
        await self.emitter.flush()
        return dict(response.json())

    async def scan(self, name: str) -> None:
        """The phone scans the instance's QR code; its webhooks are delivered."""
        self.sim.scan(name)
        await self.emitter.flush()

    async def connected(self, user: str) -> tuple[uuid.UUID, str]:
        """A user's number created through zapsync and scanned: (instance id, instance name)."""
        body = await self.connect(user)
        await self.scan(body["instance_name"])
        assert (await instance_row(uuid.UUID(body["instance_id"])))["status"] == "connected"
        return uuid.UUID(body["instance_id"]), body["instance_name"]


@pytest.fixture
async def world(gateway: str, simulator: SimulatorState, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    """The :class:`World` of the gateway under test; at the end, no webhook delivery may have been refused."""
    for name, value in {
        "ZAPSYNC_SEND_MIN_INTERVAL": "0",
        "ZAPSYNC_SEND_TIMEOUT": "5",
        "ZAPSYNC_QUEUE_RETRY_INITIAL": "0.05",
        "ZAPSYNC_QUEUE_RETRY_MAX": "0.1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WEBHOOK_URL", raising=False)  # the gateways call back the API's own URL
    get_settings.cache_clear()
    from api.main import create_app

    org = await make_organization(secret=SECRET)
    app = create_app(check_database=False)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://zapsync") as http,
        WebhookEmitter(simulator, evolution_url=None, megaapi_url=None, transport=transport) as emitter,
    ):
        headers = await auth_headers(org)
        chosen = await http.patch(
            f"/organizations/{org}/settings", json={"webhook_auth": WEBHOOK_AUTH}, headers=headers
        )
        assert chosen.status_code == 200, chosen.text
        yield World(gateway, simulator, http, emitter, org, headers)
        assert emitter.stats["failed"] == 0, emitter.last_error  # every delivery was accepted
        await app.state.waker.settle()
    get_settings.cache_clear()


async def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
    async with session_scope() as session:
        return [dict(r) for r in (await session.execute(text(sql), params)).mappings().all()]


async def stored_messages(instance_id: uuid.UUID) -> list[dict[str, Any]]:
    return await rows(
        "SELECT m.id, m.external_id, m.from_me, m.status, m.content, c.jid, v.status AS conversation "
        "FROM messages m JOIN conversations v ON v.id = m.conversation_id JOIN contacts c ON c.id = v.contact_id "
        "WHERE m.instance_id = :i ORDER BY m.id",
        i=instance_id,
    )


@each_gateway
async def test_connect_creates_the_instance_with_zapsyncs_webhook_and_the_scan_connects_it(world: World) -> None:
    body = await world.connect("u-1")

    name = body["instance_name"]
    inst = world.sim.get(name, world.gateway)
    assert inst is not None and inst.qr_code is not None, "the instance was created at the gateway under test"
    assert world.sim.calls[CREATE_CALL[world.gateway]] == 1
    assert inst.webhook is not None
    # MegaAPI sends no custom headers: its secret travels in the URL's query instead (gateways.md §8.5).
    assert inst.webhook["url"].split("?")[0] == f"http://zapsync/webhooks/{world.gateway}/{world.org}"
    assert (body["gateway"], body["user_id"], body["status"]) == (world.gateway, "u-1", "qr_pending")
    assert decode_qr(body["qr_image"]) == inst.qr_code
    instance_id = uuid.UUID(body["instance_id"])

    await world.scan(name)

    row = await instance_row(instance_id)
    assert (row["status"], row["qr_code"]) == ("connected", None)
    owner = world.sim.require(name).owner_jid
    assert owner is not None and row["phone_number"] == owner.split("@")[0]
    assert (await history(instance_id))[-1] == ("qr_pending", "connected", "webhook")
    read = await world.http.get("/users/u-1/whatsapp", headers=world.headers)
    assert read.json()["status"] == "connected"


@each_gateway
@pytest.mark.usefixtures("prefect_server")
async def test_import_on_connect(world: World) -> None:
    if world.gateway == "megaapi":
        pytest.skip(NO_HISTORY)
    from flows.import_conversations import import_conversations

    body = await world.connect("importer")
    name = body["instance_name"]
    spec = {"chats": 3, "messages_per_chat": 4, "group_chats": 1, "group_messages": 2, "newest_at": datetime.now(UTC)}
    gateway_history = world.sim.set_history(name, **spec)

    await world.scan(name)  # the connect webhook queues the import
    instance_id = uuid.UUID(body["instance_id"])
    (item,) = await rows(
        "SELECT id, state, payload FROM work_items WHERE kind = 'import' AND instance_id = :i", i=instance_id
    )
    assert item["payload"]["trigger"] == "connect"

    report = await import_conversations()  # a real flow run drains the queue

    assert report.flow_run_id is not None
    (done,) = await rows("SELECT state FROM work_items WHERE id = :id", id=item["id"])
    assert done["state"] == "done"
    stored = await rows(
        "SELECT m.external_id, c.jid, m.from_me FROM messages m JOIN conversations v ON v.id = m.conversation_id "
        "JOIN contacts c ON c.id = v.contact_id WHERE m.instance_id = :i",
        i=instance_id,
    )
    expected = expected_messages(gateway_history)
    assert len(expected) == 12
    assert {r["external_id"]: (r["jid"], r["from_me"]) for r in stored} == {
        k: (jid, from_me) for k, (jid, _, from_me, _) in expected.items()
    }
    (run,) = await rows("SELECT trigger, state FROM import_runs WHERE instance_id = :i", i=instance_id)
    assert (run["trigger"], run["state"]) == ("connect", "completed")


@each_gateway
async def test_message_and_receipt_webhooks(world: World) -> None:
    instance_id, name = await world.connected("talker")

    inbound = world.sim.receive_message(name, NUMBER, "oi, tudo bem?", push_name="Maria")
    await world.emitter.flush()

    (contact,) = await rows("SELECT jid, name FROM contacts WHERE instance_id = :i", i=instance_id)
    assert contact == {"jid": JID, "name": "Maria"}
    (message,) = await stored_messages(instance_id)
    assert (message["external_id"], message["from_me"], message["content"]) == (
        inbound["key"]["id"],
        False,
        "oi, tudo bem?",
    )
    assert message["jid"] == JID and message["conversation"] == "waiting"

    # The owner answers from the phone; its receipts come, one of them late (deliveries are not ordered).
    reply = world.sim.receive_message(name, NUMBER, "tudo ótimo", from_me=True)
    await world.emitter.flush()
    reply_id = reply["key"]["id"]

    async def status() -> str:
        (row,) = await rows("SELECT status FROM messages WHERE external_id = :e", e=reply_id)
        return str(row["status"])

    assert await status() == "sent"
    for receipt, expected in (("delivered", "delivered"), ("read", "read"), ("delivered", "read"), ("sent", "read")):
        world.sim.send_receipts(name, NUMBER, reply_id, receipt)
        await world.emitter.flush()
        assert await status() == expected, f"after a {receipt} receipt"
    assert len(await stored_messages(instance_id)) == 2
    (conversation,) = await rows("SELECT status FROM conversations WHERE instance_id = :i", i=instance_id)
    assert conversation["status"] == "in_progress"


@each_gateway
@pytest.mark.usefixtures("prefect_server")
async def test_send_through_the_outbox(world: World) -> None:
    from flows.send_messages import send_queued_now

    instance_id, name = await world.connected("sender")
    world.sim.configure(receipts=True)

    queued = await world.http.post(
        f"/instances/{instance_id}/messages", json={"to": NUMBER, "text": "olá!"}, headers=world.headers
    )
    assert queued.status_code == 201, queued.text
    assert queued.json()["message"]["status"] == "pending"

    (state,) = await send_queued_now([queued.json()["work_item_id"]], timeout_seconds=30)
    await world.emitter.flush()  # the echo, then the receipts

    assert state.state == "done"
    (record,) = world.sim.sends.records  # one send at the gateway
    assert (record.instance, record.provider, record.to, record.text) == (name, world.gateway, JID, "olá!")
    (row,) = await stored_messages(instance_id)  # the echo adopted the outbox row: still one row
    assert (row["id"], row["external_id"], row["from_me"]) == (queued.json()["message"]["id"], record.external_id, True)
    assert row["status"] == "read"
    events = await rows(
        "SELECT payload->>'status' AS status FROM live_events WHERE kind = 'message.status' "
        "AND (payload->>'message_id')::bigint = :id ORDER BY id",
        id=row["id"],
    )
    seen = [e["status"] for e in events]
    assert seen[0] == "pending" and seen[-1] == "read" and {"sent", "delivered"} <= set(seen), seen


@pytest.mark.parametrize("gateway", ["waha"], indirect=True)
async def test_waha_inbound_message_comes_as_message_and_message_any_and_is_stored_once(world: World) -> None:
    instance_id, name = await world.connected("both-events")
    hook = world.sim.require(name).webhook
    assert hook is not None
    world.sim.set_webhook(name, {**hook, "events": ["*"]})  # an operator subscribed the session to every event
    delivered = world.emitter.stats["delivered"]

    inbound = world.sim.receive_message(name, NUMBER, "oi")
    own = world.sim.receive_message(name, NUMBER, "typed on the phone", from_me=True)
    await world.emitter.flush()

    assert world.emitter.stats["delivered"] - delivered == 3  # inbound: message + message.any; own: message.any
    events = await rows("SELECT event FROM webhook_events WHERE instance_name = :n ORDER BY id", n=name)
    # deliveries run concurrently, as WAHA's do: their order is not fixed
    assert sorted(e["event"] for e in events if e["event"].startswith("message")) == [
        "message",
        "message.any",
        "message.any",
    ]
    stored = await stored_messages(instance_id)
    assert sorted((m["external_id"], m["from_me"]) for m in stored) == sorted(
        [(inbound["key"]["id"], False), (own["key"]["id"], True)]
    )
