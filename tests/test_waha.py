"""The WAHA client against its simulator over loopback: statuses (passkey too), QR, the session lifecycle, history
pages and sending (gateways.md §5, §8.4)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from core.domain import ChatKind, InstanceStatus, OutgoingMessage, OutgoingType, Provider
from core.errors import GatewayAuthError, GatewayOutcomeUnknown, GatewaySendRejected, GatewayTransientError
from core.settings import Settings
from core.webhook_signatures import hmac_sha512
from gateways.base import iter_chats, iter_contacts, iter_messages
from gateways.registry import build_gateway
from gateways.resilience import RetryPolicy
from gateways.simulator import SimulatorServer, SimulatorState, WebhookEmitter
from gateways.waha import MISSING_AT_GATEWAY, WahaGateway

pytestmark = pytest.mark.pure

NEWEST = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def waha_client(server: SimulatorServer, *, key: str = "sim-waha-key", timeout: float = 5) -> WahaGateway:
    return WahaGateway(
        name="waha",
        base_url=server.url,
        api_key=key,
        timeout=httpx.Timeout(timeout),
        retry=RetryPolicy(attempts=1),
    )


@pytest.fixture
async def waha(simulator, simulator_server) -> AsyncIterator[WahaGateway]:
    async with waha_client(simulator_server) as client:
        yield client


async def test_settings_name_a_waha_gateway_with_its_own_variables(monkeypatch) -> None:
    monkeypatch.setenv("WAHA_API_URL", "http://waha.local:3000/")
    monkeypatch.setenv("WAHA_API_KEY", "k1")
    monkeypatch.setenv("ZAPSYNC_GATEWAYS", '{"waha-2": {"provider": "waha", "url": "http://w2", "api_key": "k2"}}')
    configs = Settings().gateways()

    assert configs["waha"].provider is Provider.WAHA and configs["waha"].url == "http://waha.local:3000"
    assert configs["waha"].api_key.get_secret_value() == "k1"
    client = build_gateway("waha-2", configs["waha-2"], settings=Settings())
    assert isinstance(client, WahaGateway) and client.supports_history and client.bulk_states
    await client.aclose()


async def test_every_status_in_one_call_with_passkey_and_missing(waha, simulator: SimulatorState) -> None:
    simulator.add_instance("w-open", "waha", "open")
    simulator.add_instance("w-stopped", "waha", "close")
    simulator.add_instance("w-failed", "waha", "refused")
    simulator.add_instance("w-starting", "waha", "connecting")
    simulator.add_instance("w-passkey", "waha", "connecting").waha_status = "PASSKEY_REQUIRED"
    simulator.add_instance("w-confirm", "waha", "connecting").waha_status = "PASSKEY_CONFIRMATION_REQUIRED"
    simulator.add_instance("evo-only", "evolution", "open")  # another provider's instance is not a session
    simulator.create_instance("w-qr", provider="waha", qrcode=True)
    names = ["w-open", "w-stopped", "w-failed", "w-starting", "w-passkey", "w-confirm", "w-qr", "evo-only"]

    seen = await waha.fetch_states(names)

    assert {name: obs.status for name, obs in seen.items()} == {
        "w-open": InstanceStatus.CONNECTED,
        "w-stopped": InstanceStatus.DISCONNECTED,
        "w-failed": InstanceStatus.ERROR,
        "w-starting": InstanceStatus.CONNECTING,
        "w-passkey": InstanceStatus.QR_PENDING,
        "w-confirm": InstanceStatus.QR_PENDING,
        "w-qr": InstanceStatus.QR_PENDING,
        "evo-only": InstanceStatus.DISCONNECTED,
    }
    assert seen["w-passkey"].reason == seen["w-confirm"].reason == "passkey required on the phone"
    assert seen["evo-only"].reason == MISSING_AT_GATEWAY
    assert seen["w-open"].phone_number and seen["w-open"].profile_name == simulator.get("w-open").profile_name
    assert simulator.calls["waha.sessions"] == 1


async def test_wrong_key_is_an_auth_failure_and_an_outage_unreachable(simulator, simulator_server) -> None:
    simulator.add_instance("w-1", "waha", "open")
    async with waha_client(simulator_server, key="wrong") as bad:
        with pytest.raises(GatewayAuthError):
            await bad.connect("w-1")
        assert (await bad.fetch_states(["w-1"]))["w-1"].status is None
    simulator.config.outage = True
    async with waha_client(simulator_server) as good:
        observed = (await good.fetch_states(["w-1"]))["w-1"]
    assert observed.status is None and "503" in (observed.error or "")


async def test_create_start_qr_logout_restart_delete(waha, simulator: SimulatorState) -> None:
    created = await waha.create_instance(
        "w-new", webhook_url="http://zapsync/webhooks/waha/org", webhook_headers={"X-Webhook-Secret": "s3"}
    )

    inst = simulator.get("w-new", "waha")
    assert created.status is InstanceStatus.QR_PENDING and created.qr_code == inst.qr_code
    assert created.qr_code.startswith("2@")  # the raw string a phone scans, not an image
    assert inst.webhook["hmac"] == {"key": "s3"}
    assert inst.webhook["customHeaders"] == [{"name": "X-Webhook-Secret", "value": "s3"}]
    assert "session.status" in inst.webhook["events"] and "message.any" in inst.webhook["events"]

    again = await waha.connect("w-new")  # already started: WAHA's 422 is read as "where does it stand"
    assert again.status is InstanceStatus.QR_PENDING and again.qr_code == inst.qr_code

    simulator.set_state("w-new", "open")
    assert (await waha.connect("w-new")).status is InstanceStatus.CONNECTED
    await waha.logout("w-new")
    assert (await waha.fetch_states(["w-new"]))["w-new"].status is InstanceStatus.DISCONNECTED
    started = await waha.connect("w-new")  # logged out: a new QR code
    assert started.status is InstanceStatus.QR_PENDING and started.qr_code and started.qr_code != created.qr_code
    simulator.set_state("w-new", "open")
    await waha.restart("w-new")
    assert simulator.calls["waha.restart:w-new"] == 1 and simulator.get("w-new").live_state == "open"

    await waha.delete_instance("w-new")
    assert simulator.get("w-new") is None
    await waha.delete_instance("w-new")  # gone already is fine
    assert simulator.calls["waha.delete:w-new"] == 2


@pytest.fixture
def waha_history(simulator: SimulatorState) -> SimulatorState:
    simulator.add_instance("w-h", "waha", "open")
    simulator.set_history(
        "w-h",
        chats=6,
        messages_per_chat=5,
        group_chats=2,
        group_messages=2,
        broadcast_messages=2,
        empty_chats=1,
        extra_contacts=1,
        lid_every=0,
        newest_at=NEWEST,
    )
    return simulator


async def test_chats_and_contacts_pages(waha, waha_history: SimulatorState) -> None:
    chats = [c for page in [p async for p in iter_chats(waha, "w-h", page_size=4)] for c in page]
    contacts = [c for page in [p async for p in iter_contacts(waha, "w-h", page_size=3)] for c in page]

    assert len(chats) == 6 + 2 + 1 + 1 and waha_history.calls["waha.chats:w-h"] == 3
    assert all(not c.jid.endswith("@c.us") for c in chats)  # zapsync's form of a WAHA id
    assert [c.kind for c in chats].count(ChatKind.GROUP) == 2
    newest = [c.last_message_at for c in chats if c.last_message_at]
    assert newest == sorted(newest, reverse=True) and newest[0] == NEWEST
    assert chats[-1].last_message_at is None
    assert len(contacts) == 6 + 2 + 1 + 1 and {c.kind for c in contacts} == {"contact", "group"}
    assert len({c.jid for c in contacts}) == len(contacts)


async def test_messages_of_one_chat_page_with_time_filters(waha, waha_history: SimulatorState) -> None:
    history = waha_history.history("w-h")
    jid = history.chat(0).jid

    everything = [m async for page in iter_messages(waha, "w-h", page_size=2, chat_jid=jid) for m in page.messages]
    windowed = await waha.fetch_messages(
        "w-h", page=1, page_size=10, chat_jid=jid, since=NEWEST - timedelta(hours=2, minutes=30), until=NEWEST
    )

    assert len(everything) == 5 and len({m.external_id for m in everything}) == 5
    assert [m.timestamp for m in everything] == sorted((m.timestamp for m in everything), reverse=True)
    assert {m.chat_jid for m in everything} == {jid}
    record = history.record(0, 0)
    assert everything[0].external_id == record["key"]["id"] and everything[0].from_me == record["key"]["fromMe"]
    assert len(windowed.messages) == 3 and windowed.pages == 1


async def test_instance_wide_message_pages_cover_one_to_one_chats(waha, waha_history: SimulatorState) -> None:
    waha.chats_per_page = 4
    pages = [page async for page in iter_messages(waha, "w-h", page_size=3)]
    messages = [m for page in pages for m in page.messages]

    assert [p.pages for p in pages] == [2, 2] and pages[0].total == 6  # six one-to-one chats, four a page
    assert len(messages) == 6 * 5 and len({m.external_id for m in messages}) == 30
    assert all(m.kind is ChatKind.CONTACT for m in messages)
    assert sum(1 for m in messages if m.type != "text") > 0  # media comes through with its type

    since = NEWEST - timedelta(hours=1, minutes=30)
    recent = [m async for page in iter_messages(waha, "w-h", page_size=50, since=since) for m in page.messages]
    assert len(recent) == 6 * 2 and all(m.sent_at >= since for m in recent)


async def test_send_text_and_media_once(waha, simulator: SimulatorState) -> None:
    simulator.add_instance("w-s", "waha", "open")
    sent = await waha.send("w-s", OutgoingMessage(to="5511988887777@s.whatsapp.net", text="oi"), timeout_seconds=5)
    media = await waha.send(
        "w-s",
        OutgoingMessage(
            to="5511988887777@s.whatsapp.net",
            type=OutgoingType.IMAGE,
            media_url="https://cdn.example/a.jpg",
            mime_type="image/jpeg",
            text="legenda",
        ),
        timeout_seconds=5,
    )

    assert sent.external_id.startswith("3EB0") and sent.status == "sent" and media.external_id != sent.external_id
    assert simulator.calls["waha.sendText:w-s"] == 1 and simulator.calls["waha.sendImage:w-s"] == 1
    with pytest.raises(GatewaySendRejected):
        await waha.send("w-s", OutgoingMessage(to="5511988887777@s.whatsapp.net", text=""), timeout_seconds=5)

    simulator.config.error_rate = 1.0  # an explicit 503: certainly not taken
    with pytest.raises(GatewayTransientError):
        await waha.send("w-s", OutgoingMessage(to="5511988887777@s.whatsapp.net", text="oi"), timeout_seconds=5)
    assert simulator.calls["waha.sendText:w-s"] == 3  # one try each (sent, rejected, 503), never retried


async def test_send_without_an_answer_is_of_unknown_outcome(waha, simulator: SimulatorState) -> None:
    simulator.add_instance("w-s", "waha", "open")
    simulator.configure(hang=True, hang_s=5)
    try:
        with pytest.raises(GatewayOutcomeUnknown):
            await waha.send("w-s", OutgoingMessage(to="5511988887777@s.whatsapp.net", text="oi"), timeout_seconds=0.3)
    finally:
        simulator.configure(hang=False)
    assert simulator.calls["waha.sendText:w-s"] == 1


async def test_simulator_webhooks_use_wahas_envelope_and_signed_headers() -> None:
    received: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    state = SimulatorState()
    state.create_instance(
        "w-hook",
        provider="waha",
        webhook={"url": "http://crm/hook", "events": ["session.status"], "hmac": {"key": "k"}, "customHeaders": []},
    )
    async with WebhookEmitter(
        state, evolution_url=None, megaapi_url=None, transport=httpx.MockTransport(receiver)
    ) as emitter:
        state.create_instance("w-quiet", provider="waha")  # no webhook of its own, no default: nothing sent
        state.set_state("w-quiet", "open")
        state.set_state("w-hook", "open")
        await emitter.flush()

    assert len(received) == 1 and str(received[0].url) == "http://crm/hook"
    body = received[0].content
    envelope = orjson.loads(body)
    assert set(envelope) == {
        "id",
        "timestamp",
        "event",
        "session",
        "metadata",
        "me",
        "payload",
        "engine",
        "environment",
    }
    assert envelope["id"].startswith("evt_") and len(envelope["id"]) == 30
    assert envelope["event"] == "session.status" and envelope["session"] == "w-hook"
    assert envelope["payload"]["status"] == "WORKING" and envelope["payload"]["statuses"][0]["status"] == "WORKING"
    assert envelope["me"]["id"].endswith("@c.us")
    headers = received[0].headers
    assert headers["x-webhook-hmac"] == hmac_sha512("k", body) and headers["x-webhook-hmac-algorithm"] == "sha512"
    assert headers["x-webhook-request-id"] and headers["x-webhook-timestamp"] == str(envelope["timestamp"])


async def test_simulator_echoes_a_send_as_message_any_with_its_acks_signed_to_the_session_webhook(
    waha, simulator: SimulatorState
) -> None:
    received: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    simulator.create_instance(
        "w-echo",
        provider="waha",
        webhook={"url": "http://crm/hook", "events": ["message.any", "message.ack"], "hmac": {"key": "k"}},
    )
    simulator.set_state("w-echo", "open")
    simulator.configure(receipts=True)
    voice = OutgoingMessage(to="5511988887777@s.whatsapp.net", type=OutgoingType.AUDIO, media_url="https://x/a.ogg")
    async with WebhookEmitter(
        simulator, evolution_url=None, megaapi_url=None, transport=httpx.MockTransport(receiver)
    ) as emitter:
        text = await waha.send(
            "w-echo", OutgoingMessage(to="5511988887777@s.whatsapp.net", text="oi"), timeout_seconds=5
        )
        sent_voice = await waha.send("w-echo", voice, timeout_seconds=5)
        await emitter.flush()

    [text_record, voice_record] = simulator.sends.records
    assert (text_record.external_id, voice_record.external_id) == (text.external_id, sent_voice.external_id)
    assert (text_record.to, text_record.type, voice_record.type) == ("5511988887777@s.whatsapp.net", "text", "audio")
    bodies = [orjson.loads(r.content) for r in received]
    assert all(r.headers["x-webhook-hmac"] == hmac_sha512("k", r.content) for r in received)
    events = [(b["event"], b["payload"].get("ack")) for b in bodies]
    assert events == [
        ("message.any", 0),
        ("message.ack", 1),
        ("message.ack", 2),
        ("message.ack", 3),
        ("message.any", 0),
        ("message.ack", 1),
        ("message.ack", 2),
        ("message.ack", 3),
        ("message.ack", 4),  # PLAYED: a voice message only
    ]
    echo = bodies[0]["payload"]
    assert echo["fromMe"] is True and echo["to"] == "5511988887777@c.us" and echo["body"] == "oi"
    assert echo["id"] == f"true_5511988887777@c.us_{text.external_id}" and echo["source"] == "api"
    assert {b["payload"]["id"] for b in bodies[1:4]} == {echo["id"]}
    assert [b["payload"]["ackName"] for b in bodies[5:]] == ["SERVER", "DEVICE", "READ", "PLAYED"]
