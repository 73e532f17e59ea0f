"""WAHA webhooks and signed deliveries (real PostgreSQL): WAHA's envelope from the simulator's emitter, HMAC-SHA512
of the body, Evolution's JWT with its leeway, the per-organization choice of method, 401 before reading a body."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from api.main import create_app
from core.webhook_signatures import evolution_jwt, hmac_sha512
from db.engine import session_scope
from gateways.simulator import SimulatorState, WebhookEmitter
from gateways.simulator.emitter import delivery_headers
from gateways.simulator.waha import emit_event, envelope
from tests.factories import auth_headers, count, instance_row, make_instance, make_organization
from tests.test_webhooks import opened

SECRET = "org-secret"


@pytest.fixture
async def app_and_client(database: str) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = create_app(check_database=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as http:
        yield app, http


@pytest.fixture
def client(app_and_client: tuple[Any, httpx.AsyncClient]) -> httpx.AsyncClient:
    return app_and_client[1]


@pytest.fixture
async def emitter_to(app_and_client: tuple[Any, httpx.AsyncClient]) -> AsyncIterator[Any]:
    """``emitter_to(org, key)``: a simulator world whose WAHA deliveries reach the API, signed with ``key``."""
    app = app_and_client[0]
    opened_emitters: list[WebhookEmitter] = []

    async def make(org: uuid.UUID, key: str | None) -> WebhookEmitter:
        emitter = WebhookEmitter(
            SimulatorState(),
            evolution_url=None,
            megaapi_url=None,
            waha_url=f"http://zapsync/webhooks/waha/{org}",
            waha_hmac_key=key,
            transport=httpx.ASGITransport(app=app),
        )
        await emitter.start()
        opened_emitters.append(emitter)
        return emitter

    yield make
    for emitter in opened_emitters:
        await emitter.aclose()


def message_payload(key_id: str = "3EB0AA01", *, from_me: bool = False, body: str = "oi") -> dict[str, Any]:
    """A WAHA `message` payload (gateways.md §8.4)."""
    chat, own = "5511988887777@c.us", "5511900000000@c.us"
    return {
        "id": f"{'true' if from_me else 'false'}_{chat}_{key_id}",
        "timestamp": int(time.time()),
        "from": own if from_me else chat,
        "fromMe": from_me,
        "source": "app",
        "to": chat if from_me else own,
        "body": body,
        "hasMedia": False,
        "media": None,
        "ack": 2,
        "ackName": "DEVICE",
        "_data": {"notifyName": "Ana"},
    }


async def post_waha(
    client: httpx.AsyncClient, org: uuid.UUID, body: dict[str, Any], *, key: str | None = SECRET, **headers: str
) -> httpx.Response:
    raw = orjson.dumps(body)
    signed = {"x-webhook-hmac": hmac_sha512(key, raw), "x-webhook-hmac-algorithm": "sha512"} if key else {}
    return await client.post(
        f"/webhooks/waha/{org}",
        content=raw,
        headers={"content-type": "application/json", **signed, **headers},
    )


# -- WAHA ---------------------------------------------------------------------------------------------------------


async def test_signed_session_status_from_the_simulator_connects_the_instance(emitter_to) -> None:
    org = await make_organization(secret=SECRET)
    instance_id = await make_instance(org, "w-1", gateway="waha")
    emitter = await emitter_to(org, SECRET)
    emitter.state.add_instance("w-1", "waha", "close")

    emitter.state.set_state("w-1", "open")
    await emitter.flush()

    assert emitter.stats["delivered"] == 1 and emitter.stats["failed"] == 0
    row = await instance_row(instance_id)
    owner = emitter.state.get("w-1").owner_jid
    assert row["status"] == "connected" and row["phone_number"] == owner.split("@")[0]
    assert row["profile_name"] == emitter.state.get("w-1").profile_name


async def test_wrong_or_missing_hmac_is_401(client, emitter_to) -> None:
    org = await make_organization(secret=SECRET)
    instance_id = await make_instance(org, "w-1", gateway="waha")
    emitter = await emitter_to(org, "not-the-secret")
    emitter.state.add_instance("w-1", "waha", "close")
    emitter.state.set_state("w-1", "open")
    await emitter.flush()
    body = envelope("session.status", "w-1", {"status": "WORKING"}, me=None)

    missing = await post_waha(client, org, body, key=None)
    tampered = await client.post(
        f"/webhooks/waha/{org}",
        content=orjson.dumps(body) + b" ",
        headers={"x-webhook-hmac": hmac_sha512(SECRET, orjson.dumps(body))},
    )

    assert emitter.stats["failed"] == 1 and "401" in (emitter.last_error or "")
    assert missing.status_code == 401 and "X-Webhook-Hmac" in missing.json()["detail"]
    assert tampered.status_code == 401
    assert (await instance_row(instance_id))["status"] == "disconnected"
    assert await count("webhook_events") == 0


async def test_redelivered_envelope_id_is_stored_once(client, emitter_to) -> None:
    org = await make_organization(secret=SECRET)
    await make_instance(org, "w-1", gateway="waha")
    emitter = await emitter_to(org, SECRET)

    for _ in range(3):
        assert await emit_event(emitter, "w-1", "presence.update", {"id": "x@c.us"}, envelope_id="evt_SAME")
    first = await emit_event(emitter, "w-1", "message.any", message_payload(), envelope_id="evt_MSG")
    again = await emit_event(emitter, "w-1", "message.any", message_payload(), envelope_id="evt_MSG")

    assert first and again
    async with session_scope() as session:
        events = (await session.execute(text("SELECT event, outcome FROM webhook_events ORDER BY id"))).all()
    assert [tuple(e) for e in events] == [("presence.update", "stored"), ("message.any", "applied")]
    assert await count("messages") == 1


async def test_messages_receipts_and_revokes_apply(client) -> None:
    org = await make_organization(secret=SECRET)
    await make_instance(org, "w-1", gateway="waha")

    new = await post_waha(client, org, envelope("message", "w-1", message_payload("3EB0BB"), me=None))
    own = await post_waha(client, org, envelope("message.any", "w-1", message_payload("3EB0CC", from_me=True), me=None))
    read = await post_waha(
        client,
        org,
        envelope("message.ack", "w-1", {"id": "true_5511988887777@c.us_3EB0CC", "ack": 3, "ackName": "READ"}, me=None),
    )
    revoked = await post_waha(
        client, org, envelope("message.revoked", "w-1", {"revokedMessageId": "3EB0BB", "after": None}, me=None)
    )
    group = await post_waha(client, org, envelope("group.v2.join", "w-1", {"group": {}}, me=None))
    call = await post_waha(client, org, envelope("call.received", "w-1", {"id": "c1"}, me=None))
    malformed = await post_waha(client, org, envelope("session.status", "w-1", {"status": "SLEEPING"}, me=None))
    not_json = await client.post(
        f"/webhooks/waha/{org}", content=b"{", headers={"x-webhook-hmac": hmac_sha512(SECRET, b"{")}
    )

    assert [r.json()["outcome"] for r in (new, own, read, revoked, group, call)] == [
        "applied",
        "applied",
        "applied",
        "applied",
        "stored",
        "stored",
    ]
    assert malformed.status_code == 422 and "SLEEPING" in malformed.json()["detail"]
    assert not_json.status_code == 422
    async with session_scope() as session:
        rows = dict((await session.execute(text("SELECT external_id, status FROM messages"))).all())
        chats = (await session.execute(text("SELECT DISTINCT jid FROM contacts"))).scalars().all()
    assert rows == {"3EB0BB": "deleted", "3EB0CC": "read"}
    assert chats == ["5511988887777@s.whatsapp.net"]


async def test_passkey_status_is_pending_with_its_reason(client) -> None:
    org = await make_organization(secret=SECRET)
    instance_id = await make_instance(org, "w-1", gateway="waha")

    response = await post_waha(client, org, envelope("session.status", "w-1", {"status": "PASSKEY_REQUIRED"}, me=None))

    assert response.json()["outcome"] == "applied"
    row = await instance_row(instance_id)
    assert row["status"] == "qr_pending" and row["status_reason"] == "passkey required on the phone"


# -- Evolution JWT ------------------------------------------------------------------------------------------------


async def post_jwt(client: httpx.AsyncClient, org: uuid.UUID, token: str) -> httpx.Response:
    return await client.post(
        f"/webhooks/evolution/{org}",
        content=orjson.dumps(opened("acme-01")),
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
    )


async def test_evolution_jwt_valid_late_within_leeway_beyond_and_wrong_key(client) -> None:
    org = await make_organization(secret=SECRET)
    await make_instance(org, "acme-01")
    now = int(time.time())

    valid = await post_jwt(client, org, evolution_jwt(SECRET, issued_at=now))
    late = await post_jwt(client, org, evolution_jwt(SECRET, issued_at=now - 600 - 20 * 60))  # 20 min past exp
    beyond = await post_jwt(client, org, evolution_jwt(SECRET, issued_at=now - 600 - 31 * 60))
    wrong = await post_jwt(client, org, evolution_jwt("another-secret", issued_at=now))

    assert (valid.status_code, late.status_code) == (200, 200)
    assert valid.json()["outcome"] == "applied"
    assert (beyond.status_code, wrong.status_code) == (401, 401)


async def test_evolution_jwt_as_the_simulator_signs_it(client) -> None:
    secret = "wh_" + "k" * 32  # as long as the ones zapsync makes (pyjwt warns below 32 bytes)
    org = await make_organization(secret=secret)
    await make_instance(org, "acme-01")

    headers = delivery_headers({"jwt_key": secret})
    response = await client.post(f"/webhooks/evolution/{org}", content=orjson.dumps(opened("acme-01")), headers=headers)

    assert response.status_code == 200 and response.json()["outcome"] == "applied"


async def test_secret_in_the_url_for_evolutions_global_webhook(client) -> None:
    org = await make_organization(secret=SECRET)
    await make_instance(org, "acme-01")

    response = await client.post(f"/webhooks/evolution/{org}?secret={SECRET}", content=orjson.dumps(opened("acme-01")))

    assert response.status_code == 200 and response.json()["outcome"] == "applied"


async def test_old_organization_without_a_sealed_secret_keeps_the_header_secret_only(client) -> None:
    org = await make_organization(secret=SECRET)
    await make_instance(org, "acme-01")
    async with session_scope() as session:
        await session.execute(text("UPDATE organizations SET webhook_secret_sealed = NULL WHERE id = :id"), {"id": org})

    signed = await post_jwt(client, org, evolution_jwt(SECRET, issued_at=int(time.time())))
    header = await client.post(
        f"/webhooks/evolution/{org}", content=orjson.dumps(opened("acme-01")), headers={"x-webhook-secret": SECRET}
    )

    assert signed.status_code == 401 and "rotate" in signed.json()["detail"]
    assert header.status_code == 200


# -- per organization and gateway; before the body ----------------------------------------------------------------


async def test_chosen_methods_per_organization_and_provider(client) -> None:
    org = await make_organization(secret=SECRET)
    await make_instance(org, "w-1", gateway="waha")
    await make_instance(org, "acme-01")
    headers = await auth_headers(org)
    body = envelope("presence.update", "w-1", {"id": "x@c.us"}, me=None)

    before = await post_waha(client, org, body, key=None, **{"x-webhook-secret": SECRET})
    chosen = await client.patch(
        f"/organizations/{org}/settings", headers=headers, json={"webhook_auth": {"waha": "hmac", "evolution": "jwt"}}
    )
    secret_only = await post_waha(client, org, {**body, "id": "evt_2"}, key=None, **{"x-webhook-secret": SECRET})
    signed = await post_waha(client, org, {**body, "id": "evt_3"})
    evolution_secret = await client.post(
        f"/webhooks/evolution/{org}", content=orjson.dumps(opened("acme-01")), headers={"x-webhook-secret": SECRET}
    )
    impossible = await client.patch(
        f"/organizations/{org}/settings", headers=headers, json={"webhook_auth": {"megaapi": "hmac"}}
    )

    assert before.status_code == 200
    assert chosen.status_code == 200 and chosen.json()["webhook_auth"] == {"waha": "hmac", "evolution": "jwt"}
    assert secret_only.status_code == 401 and signed.status_code == 200
    assert evolution_secret.status_code == 401 and "JWT" in evolution_secret.json()["detail"]
    assert impossible.status_code == 422 and "megaapi" in impossible.json()["detail"]


@pytest.mark.parametrize("provider", ["evolution", "waha", "megaapi"])
async def test_unauthenticated_5mb_post_is_401_not_413(client, provider: str) -> None:
    org = await make_organization(secret=SECRET)
    huge = b"x" * (5 * 1024 * 1024)

    anonymous = await client.post(f"/webhooks/{provider}/{org}", content=huge)
    wrong = await client.post(f"/webhooks/{provider}/{org}", content=huge, headers={"x-webhook-secret": "nope"})
    authenticated = await client.post(f"/webhooks/{provider}/{org}", content=huge, headers={"x-webhook-secret": SECRET})

    assert (anonymous.status_code, wrong.status_code) == (401, 401)
    assert authenticated.status_code == 413  # the size limit still holds once the sender is known
