"""Hostile input (issue 13 §2) is a 4xx or is stored, never a 5xx: NUL and lone surrogates in webhooks, over-long
identifiers, deep nesting and out-of-range numbers, unbounded query integers and request bodies, and SQL parameters
kept out of error messages. Real PostgreSQL, the API in-process."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from core.storable import NUL_STANDIN, SURROGATE_STANDIN, storable
from db.engine import session_scope
from db.repositories.webhook_events import inbox_payload, original_payload
from gateways.webhook_payloads import MalformedPayload, checked_payload, decode_json, parse_evolution
from tests.factories import auth_headers, count, make_instance, make_organization

CUSTOMER = "5511987654321@s.whatsapp.net"
SECRET_APIKEY = "evo-apikey-5f1e0c77"


@pytest.fixture
async def org() -> uuid.UUID:
    organization = await make_organization()
    await make_instance(organization, "acme-01", status="connected")
    return organization


def envelope(event: str, data: object, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": event,
        "instance": "acme-01",
        "data": data,
        "date_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "apikey": None,
    }
    body.update(extra)
    return body


def message(key_id: str, *, text_: str = "oi", push_name: str = "Ana", jid: str = CUSTOMER, **extra: Any) -> dict:
    body: dict[str, Any] = {
        "key": {"remoteJid": jid, "fromMe": False, "id": key_id},
        "pushName": push_name,
        "message": {"conversation": text_},
        "messageType": "conversation",
        "messageTimestamp": int(datetime.now(UTC).timestamp()),
    }
    body.update(extra)
    return body


def as_json(body: object) -> bytes:
    """JSON as a JavaScript gateway sends it: lone surrogates and NUL as `\\uXXXX` escapes (orjson refuses them)."""
    return json.dumps(body, ensure_ascii=True).encode()


async def post(client: httpx.AsyncClient, org: uuid.UUID, body: object, *, path: str = "evolution") -> httpx.Response:
    raw = body if isinstance(body, bytes) else as_json(body)
    return await client.post(
        f"/webhooks/{path}/{org}",
        content=raw,
        headers={"content-type": "application/json", "x-webhook-secret": "org-secret"},
    )


async def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
    async with session_scope() as session:
        return [dict(r) for r in (await session.execute(text(sql), params)).mappings().all()]


# -- 1. NUL and lone surrogates ----------------------------------------------------------------------------------


@pytest.mark.pure
def test_storable_replaces_nul_and_lone_surrogates_only() -> None:
    assert storable("a\x00b\ud800c\udfff") == f"a{NUL_STANDIN}b{SURROGATE_STANDIN}c{SURROGATE_STANDIN}"
    assert storable("plain ✓ 😀") == "plain ✓ 😀"


async def test_nul_everywhere_in_a_message_is_stored_with_a_visible_stand_in(client, org) -> None:
    data = message(
        "3EB0\x00NUL",
        text_="oi\x00tudo bem",
        push_name="An\x00a",
        jid="5511987654321\x00@s.whatsapp.net",
        extra={"nested": {"deep": ["x\x00y", {"k\x00": "v"}]}},
    )
    sent = envelope("messages.upsert", data, apikey=SECRET_APIKEY)

    response = await post(client, org, sent)

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "applied"
    stored = await rows("SELECT external_id, content FROM messages")
    assert stored == [{"external_id": f"3EB0{NUL_STANDIN}NUL", "content": f"oi{NUL_STANDIN}tudo bem"}]
    contact = await rows("SELECT jid, name FROM contacts")
    assert contact == [{"jid": f"5511987654321{NUL_STANDIN}@s.whatsapp.net", "name": f"An{NUL_STANDIN}a"}]
    inbox = await rows("SELECT payload FROM webhook_events")
    assert len(inbox) == 1
    restored = original_payload(inbox[0]["payload"])
    assert restored["data"] == data  # the delivery as sent, NUL included
    assert restored["apikey"] == "[redacted]"  # still redacted
    assert SECRET_APIKEY not in json.dumps(inbox[0]["payload"])
    # A redelivery is the same event: nothing applied twice.
    again = await post(client, org, sent)
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert await count("messages") == 1


async def test_a_batch_of_deliveries_keeps_each_payload_as_sent(client, org) -> None:
    from db.repositories.webhook_events import InboxRow, store_events

    sent = envelope("messages.upsert", message("3EB0BATCH", text_="a\x00b"))
    payload = decode_json(orjson.dumps(sent))  # as the receive path parses it: sanitized, the original kept
    async with session_scope() as session:
        stored = await store_events(
            session, [InboxRow(org, "evolution", "messages.upsert", "acme-01", "batch-key", payload, "applied")]
        )

    assert stored == {"batch-key"}
    [row] = await rows("SELECT payload FROM webhook_events")
    assert original_payload(row["payload"])["data"] == sent["data"]


async def test_lone_surrogates_are_stored_as_replacement_characters(client, org) -> None:
    data = message("3EB0SURR", text_="broken \ud800 emoji \udc00", push_name="\ud83d")
    response = await post(client, org, envelope("messages.upsert", data))

    assert response.status_code == 200, response.text
    stored = await rows("SELECT content FROM messages")
    assert stored == [{"content": f"broken {SURROGATE_STANDIN} emoji {SURROGATE_STANDIN}"}]
    assert await rows("SELECT name FROM contacts") == [{"name": SURROGATE_STANDIN}]
    inbox = await rows("SELECT payload FROM webhook_events")
    assert original_payload(inbox[0]["payload"])["data"] == data


async def test_nul_in_status_contacts_and_other_events_is_not_a_5xx(client, org) -> None:
    contacts = envelope("contacts.upsert", [{"remoteJid": CUSTOMER, "pushName": "Bi\x00a"}])
    chats = envelope("chats.upsert", [{"remoteJid": CUSTOMER, "name": "\x00\ud800"}])
    await make_instance(org, "acme-02", status="disconnected")
    status = envelope(
        "connection.update", {"state": "open", "profileName": "Loja\x00", "wuid": CUSTOMER}, instance="acme-02"
    )
    for body in (contacts, chats, status):
        response = await post(client, org, body)
        assert response.status_code == 200, (body["event"], response.text)
    assert await rows("SELECT name FROM contacts") == [{"name": f"Bi{NUL_STANDIN}a"}]
    profile = await rows("SELECT profile_name FROM whatsapp_instances WHERE instance_name = 'acme-02'")
    assert profile == [{"profile_name": f"Loja{NUL_STANDIN}"}]
    assert await count("webhook_events") == 3


async def test_waha_message_with_nul_is_stored(client, org) -> None:
    await make_instance(org, "default", gateway="waha", status="connected")
    body = {
        "id": "evt_01NUL",
        "event": "message",
        "session": "default",
        "payload": {
            "id": "false_5511987654321@c.us_3EB0WAHA",
            "timestamp": int(datetime.now(UTC).timestamp()),
            "from": "5511987654321@c.us",
            "fromMe": False,
            "body": "ola\x00",
            "_data": {"notifyName": "Zé\x00"},
        },
    }
    response = await post(client, org, body, path="waha")
    assert response.status_code == 200, response.text
    assert await rows("SELECT content FROM messages") == [{"content": f"ola{NUL_STANDIN}"}]


@pytest.mark.pure
def test_a_stored_original_replays_to_the_same_parse() -> None:
    body = as_json(envelope("messages.upsert", message("3EB0\x00R", text_="a\ud800\x00"), apikey=SECRET_APIKEY))
    parsed = decode_json(body)
    stored = json.loads(json.dumps(inbox_payload(parsed)))  # what jsonb gives back

    original = original_payload(stored)
    assert original["data"] == json.loads(body)["data"] and original["apikey"] == "[redacted]"
    replayed = checked_payload(original)
    assert replayed == {**parsed, "apikey": "[redacted]"}
    assert parse_evolution(replayed).messages == parse_evolution(parsed).messages
    assert original_payload({"event": "x"}) == {"event": "x"}  # rows without such characters are as stored


# -- 2. over-long identifiers and names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (message("K" * 129), "key.id"),
        (message("3EB0LONGJID", jid="5" * 120 + "@s.whatsapp.net"), "key.remoteJid"),
        (message("3EB0LONGPHONE", jid="5" * 40 + "@s.whatsapp.net"), "key.remoteJid"),
    ],
)
async def test_over_long_identifiers_are_a_permanent_4xx(client, org, data: dict, field: str) -> None:
    response = await post(client, org, envelope("messages.upsert", data))

    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert await count("messages") == 0


async def test_over_long_instance_names_and_receipt_ids_are_a_permanent_4xx(client, org) -> None:
    long_name = envelope("connection.update", {"state": "open"}, instance="i" * 256)
    receipt = envelope("messages.update", {"keyId": "K" * 200, "status": "READ"})
    contact = envelope("contacts.upsert", [{"remoteJid": "5" * 130 + "@s.whatsapp.net"}])
    mega = {"messageType": "connection_update", "instance_key": "m" * 256, "connection_state": "open"}
    waha = {"event": "session.status", "session": "w" * 256, "payload": {"status": "WORKING"}}
    cases = [(long_name, "instance", "evolution"), (receipt, "keyId", "evolution"), (contact, "remoteJid", "evolution")]
    cases += [(mega, "instance_key", "megaapi"), (waha, "session", "waha")]
    for body, words, provider in cases:
        response = await post(client, org, body, path=provider)
        assert response.status_code == 422, response.text
        assert words in response.json()["detail"]


# -- 3. bounded parsing ------------------------------------------------------------------------------------------


@pytest.mark.pure
def test_decode_json_bounds_depth_and_numbers() -> None:
    deep = b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}"
    with pytest.raises(MalformedPayload, match="deeper than 64"):
        decode_json(deep)
    assert isinstance(decode_json(b'{"a":' + b"[" * 60 + b"]" * 60 + b"}")["a"], list)
    for number in (b"1e20", b"-1e300", b"9223372036854775808", b"1e400"):
        with pytest.raises(MalformedPayload):
            decode_json(b'{"n":' + number + b"}")
    assert decode_json(b'{"n": 9223372036854775807}') == {"n": 9223372036854775807}
    with pytest.raises(MalformedPayload, match="deeper than 64"):
        decode_json(b'{"s":"\\ud800","a":' + b"[" * 100 + b"]" * 100 + b"}")


async def test_deep_nesting_is_a_4xx(client, org) -> None:
    body = b'{"event":"messages.upsert","instance":"acme-01","data":' + b"[" * 1000 + b"]" * 1000 + b"}"
    response = await post(client, org, body)
    assert response.status_code == 422 and "deep" in response.json()["detail"]


@pytest.mark.parametrize(
    "stamp",
    [1e20, 10**18, {"low": 0, "high": 2**40}, {"low": 5, "high": "x"}, 253402300800 * 1000 + 1],
    ids=["1e20", "1e18", "long-high", "long-not-number", "after-9999"],
)
async def test_message_timestamps_out_of_range_are_a_permanent_4xx(client, org, stamp: object) -> None:
    response = await post(client, org, envelope("messages.upsert", message("3EB0TIME", messageTimestamp=stamp)))

    assert response.status_code == 422, response.text
    assert "messageTimestamp" in response.json()["detail"]


async def test_envelope_times_out_of_range_are_unknown_or_4xx(client, org) -> None:
    huge = await post(client, org, envelope("connection.update", {"state": "open"}, date_time=1e300))
    assert huge.status_code == 422 and "out of range" in huge.json()["detail"]
    far = await post(client, org, envelope("connection.update", {"state": "connecting"}, date_time=10**18))
    assert far.status_code == 200 and far.json()["outcome"] == "applied"  # an unknown time: the receive time
    status = await rows("SELECT status, status_observed_at FROM whatsapp_instances")
    assert status[0]["status"] == "connecting" and status[0]["status_observed_at"].year == datetime.now(UTC).year


@pytest.mark.parametrize(
    "query", ["skip=9223372036854775808", "skip=99999999999999999999999", "take=9223372036854775808", "skip=-1"]
)
async def test_int_query_params_beyond_int64_are_422(client, org, query: str) -> None:
    instance = await make_instance(org, "chats-01", status="connected")
    response = await client.get(f"/instances/{instance}/chats?{query}", headers=await auth_headers(org))
    assert response.status_code == 422, response.text


async def test_big_path_ids_and_limits_are_4xx(client, org) -> None:
    headers = await auth_headers(org)
    for url in (
        "/conversations?limit=9223372036854775808",
        "/conversations/9223372036854775808/messages",
        "/conversations/99999999999999999999999/messages?limit=5",
    ):
        response = await client.get(url, headers=headers)
        assert 400 <= response.status_code < 500, (url, response.text)


# -- 4. body size limits -----------------------------------------------------------------------------------------


class CountingBody(httpx.AsyncByteStream):
    """A request body streamed in 64 KiB chunks (chunked: no Content-Length), counting what the server pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        while self.pulled < self.total:
            self.pulled += len(chunk)
            yield chunk


async def test_unauthenticated_50mb_body_is_413_before_it_is_read(client, org) -> None:
    fifty = 50 * 1024 * 1024
    declared = await client.post(
        "/instances", content=b"{}", headers={"content-length": str(fifty), "content-type": "application/json"}
    )
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"] == "PayloadTooLarge"

    body = CountingBody(fifty)
    streamed = await client.send(
        client.build_request("POST", "/instances", content=body, headers={"content-type": "application/json"})
    )
    assert streamed.status_code == 413, streamed.text
    assert body.pulled < 2 * 1024 * 1024 + 65536  # stopped at the limit, not after 50 MB


async def test_webhook_routes_keep_their_own_limit(client, org) -> None:
    anonymous = CountingBody(50 * 1024 * 1024)
    refused = await client.send(client.build_request("POST", f"/webhooks/evolution/{org}", content=anonymous))
    assert refused.status_code == 401  # credentials first: an anonymous body is never read
    assert anonymous.pulled <= 65536

    body = CountingBody(8 * 1024 * 1024)
    response = await client.send(
        client.build_request(
            "POST", f"/webhooks/evolution/{org}", content=body, headers={"x-webhook-secret": "org-secret"}
        )
    )
    assert response.status_code == 413
    assert body.pulled < 2 * 1024 * 1024 + 65536


async def test_small_bodies_still_pass(client, org) -> None:
    response = await post(client, org, envelope("messages.upsert", message("3EB0OK")))
    assert response.status_code == 200 and response.json()["outcome"] == "applied"


# -- 5. no SQL parameters in errors or logs ----------------------------------------------------------------------


async def test_database_errors_do_not_carry_sql_parameters(database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DBAPIError) as raised:
        async with session_scope() as session:
            await session.execute(text("SELECT CAST(:value AS text), 1 / 0"), {"value": SECRET_APIKEY})
    assert "SELECT CAST" in str(raised.value) and "division by zero" in str(raised.value)
    assert SECRET_APIKEY not in str(raised.value)
    assert SECRET_APIKEY not in caplog.text


async def test_a_500_on_a_webhook_does_not_log_the_payload(client, org, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = envelope("messages.upsert", message("3EB0LOG", text_="private words"), apikey=SECRET_APIKEY)
    async with session_scope() as session:  # make the inbox insert fail: a provoked internal error
        await session.execute(text("ALTER TABLE webhook_events ADD CONSTRAINT hostile_test CHECK (false) NOT VALID"))
    try:
        response = await client.post(
            f"/webhooks/evolution/{org}", content=orjson.dumps(body), headers={"x-webhook-secret": "org-secret"}
        )
    finally:
        async with session_scope() as session:
            await session.execute(text("ALTER TABLE webhook_events DROP CONSTRAINT hostile_test"))
    assert response.status_code == 500
    assert "webhook_events" in caplog.text  # the statement is logged…
    assert SECRET_APIKEY not in caplog.text and "private words" not in caplog.text  # …not its parameters
