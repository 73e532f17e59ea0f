"""Message webhooks applied inline (DESIGN.md §6): Evolution and MegaAPI payloads as gateways.md §2.3 and §4 show
them, real PostgreSQL, the API in-process."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from db.engine import session_scope
from tests.factories import count, make_instance, make_organization

CUSTOMER = "5511987654321@s.whatsapp.net"
LID = "123456789012345@lid"


@pytest.fixture
async def org() -> uuid.UUID:
    organization = await make_organization()
    await make_instance(organization, "acme-01", status="connected")
    await make_instance(organization, "mega-01", gateway="megaapi", status="connected")
    return organization


def envelope(event: str, data: object) -> dict[str, object]:
    return {
        "event": event,
        "instance": "acme-01",
        "data": data,
        "destination": "http://zapsync/webhooks",
        "date_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "sender": "5511999990000@s.whatsapp.net",
        "server_url": "http://evolution",
        "apikey": None,
    }


def message(
    key_id: str,
    *,
    from_me: bool = False,
    jid: str = CUSTOMER,
    at: datetime | None = None,
    text_: str = "oi",
    **extra: Any,
) -> dict[str, Any]:
    """`messages.upsert` data (one message object, gateways.md §2.3)."""
    stamp = int((at or datetime.now(UTC)).timestamp())
    body = {
        "key": {"remoteJid": jid, "fromMe": from_me, "id": key_id},
        "pushName": "Ana",
        "status": "DELIVERY_ACK",
        "message": {"conversation": text_},
        "contextInfo": None,
        "messageType": "conversation",
        "messageTimestamp": stamp,
        "instanceId": "uuid",
        "source": "android",
    }
    body.update(extra)
    return body


async def post(
    client: httpx.AsyncClient, org: uuid.UUID, body: object, *, provider: str = "evolution", suffix: str = ""
) -> httpx.Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post(
        f"/webhooks/{provider}/{org}{suffix}",
        content=raw,
        headers={"content-type": "application/json", "x-webhook-secret": "org-secret"},
    )


async def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
    async with session_scope() as session:
        return [dict(r) for r in (await session.execute(text(sql), params)).mappings().all()]


async def conversations() -> list[dict[str, Any]]:
    return await rows("SELECT v.*, c.jid FROM conversations v JOIN contacts c ON c.id = v.contact_id ORDER BY v.id")


async def message_row(key_id: str) -> dict[str, Any]:
    found = await rows("SELECT * FROM messages WHERE external_id = :k", k=key_id)
    assert len(found) == 1
    return found[0]


async def test_inbound_message_creates_contact_waiting_conversation_and_message(client, org) -> None:
    response = await post(client, org, envelope("messages.upsert", message("3EB0A1")))

    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    contact = (await rows("SELECT jid, phone, name FROM contacts"))[0]
    assert contact == {"jid": CUSTOMER, "phone": "5511987654321", "name": "Ana"}
    (conv,) = await conversations()
    assert conv["status"] == "waiting" and conv["waiting_since"] is not None
    stored = await message_row("3EB0A1")
    assert (stored["from_me"], stored["sender"], stored["type"], stored["content"], stored["status"]) == (
        False,
        "client",
        "text",
        "oi",
        "delivered",
    )
    assert stored["conversation_id"] == conv["id"]
    events = await rows("SELECT kind, payload FROM live_events")
    assert [e["kind"] for e in events] == ["message.new"]


async def test_a_message_delivered_twice_is_stored_once(client, org) -> None:
    body = envelope("messages.upsert", message("3EB0A2"))
    first = await post(client, org, body)
    body["date_time"] = "2026-01-01T00:00:00.000Z"  # a retry may differ in its envelope
    again = await post(client, org, body)

    assert first.json()["outcome"] == "applied" and again.json()["outcome"] == "duplicate"
    assert await count("messages") == 1 and await count("webhook_events") == 1
    assert await count("conversations") == 1


async def test_business_reply_clears_waiting_and_moves_to_in_progress(client, org) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    await post(client, org, envelope("messages.upsert", message("IN1", at=start)))
    await post(client, org, envelope("messages.upsert", message("IN2", at=start + timedelta(seconds=30))))
    (conv,) = await conversations()
    assert int(conv["waiting_since"].timestamp()) == int(start.timestamp())  # the first unanswered message

    reply = await post(
        client,
        org,
        envelope("send.message", message("OUT1", from_me=True, at=start + timedelta(seconds=60), status="PENDING")),
    )

    assert reply.json()["outcome"] == "applied"
    (conv,) = await conversations()
    assert conv["status"] == "in_progress" and conv["waiting_since"] is None
    assert int(conv["last_message_at"].timestamp()) == int((start + timedelta(seconds=60)).timestamp())
    assert (await message_row("OUT1"))["status"] == "pending" and (await message_row("OUT1"))["sender"] == "agent"

    await post(client, org, envelope("messages.upsert", message("IN3", at=start + timedelta(seconds=90))))
    (conv,) = await conversations()
    assert conv["status"] == "in_progress"  # an agent is on it; the customer awaits the next reply
    assert int(conv["waiting_since"].timestamp()) == int((start + timedelta(seconds=90)).timestamp())


async def test_a_message_to_a_closed_conversation_opens_a_new_one(client, org) -> None:
    start = datetime.now(UTC) - timedelta(minutes=10)
    await post(client, org, envelope("messages.upsert", message("OLD1", at=start)))
    async with session_scope() as session:
        await session.execute(
            text(
                "UPDATE conversations SET status = 'closed', closed_at = now(), "
                "close_reason = 'resolved', waiting_since = NULL"
            )
        )

    await post(client, org, envelope("messages.upsert", message("NEW1", at=start + timedelta(minutes=5))))
    late = await post(client, org, envelope("messages.upsert", message("LATE", at=start - timedelta(minutes=1))))

    first, second = await conversations()
    assert (first["status"], second["status"]) == ("closed", "waiting")
    assert first["contact_id"] == second["contact_id"]
    assert (await message_row("NEW1"))["conversation_id"] == second["id"]
    assert late.json()["outcome"] == "applied"
    assert (await message_row("LATE"))["conversation_id"] == second["id"]  # the open one takes stragglers too


async def test_receipts_move_forward_and_never_back(client, org) -> None:
    await post(client, org, envelope("send.message", message("OUT2", from_me=True, status="PENDING")))

    def update(status: str) -> dict[str, object]:
        return envelope(
            "messages.update",
            {
                "keyId": "OUT2",
                "remoteJid": CUSTOMER,
                "fromMe": True,
                "participant": None,
                "status": status,
                "pollUpdates": None,
                "instanceId": "uuid",
                "messageId": "cuid",
            },
        )

    assert (await post(client, org, update("DELIVERY_ACK"))).json()["outcome"] == "applied"
    assert (await message_row("OUT2"))["status"] == "delivered"
    assert (await post(client, org, update("READ"))).json()["outcome"] == "applied"
    older = await post(client, org, update("DELIVERY_ACK"))  # a late, older receipt
    assert older.status_code == 200
    assert (await message_row("OUT2"))["status"] == "read"
    await post(client, org, update("PLAYED"))
    assert (await message_row("OUT2"))["status"] == "played"


async def test_deletion_is_final(client, org) -> None:
    await post(client, org, envelope("messages.upsert", message("DEL1")))

    deleted = await post(
        client,
        org,
        envelope("messages.delete", {"remoteJid": CUSTOMER, "fromMe": False, "id": "DEL1", "participant": None}),
    )
    late_read = await post(client, org, envelope("messages.update", {"keyId": "DEL1", "status": "READ"}))

    assert deleted.json()["outcome"] == "applied" and late_read.status_code == 200
    assert (await message_row("DEL1"))["status"] == "deleted"


async def test_lid_addressed_messages_land_on_one_contact(client, org) -> None:
    lid_key = message("LID1", jid=LID)
    lid_key["key"].update(remoteJidAlt=CUSTOMER, addressingMode="lid")
    await post(client, org, envelope("messages.upsert", lid_key))
    await post(client, org, envelope("messages.upsert", message("PN1")))

    (contact,) = await rows("SELECT jid, alt_jid, phone FROM contacts")
    assert contact == {"jid": CUSTOMER, "alt_jid": LID, "phone": "5511987654321"}
    assert await count("conversations") == 1 and await count("messages") == 2


async def test_media_message_keeps_type_caption_and_media_fields(client, org) -> None:
    image = message(
        "IMG1",
        messageType="imageMessage",
        message={
            "imageMessage": {
                "url": "https://mmg.whatsapp.net/x.enc",
                "mimetype": "image/jpeg",
                "caption": "foto",
                "fileLength": "2048",
            }
        },
    )
    audio = message(
        "AUD1",
        messageType="audioMessage",
        message={
            "audioMessage": {
                "url": "https://mmg.whatsapp.net/a.enc",
                "mimetype": "audio/ogg; codecs=opus",
                "fileLength": 999,
            }
        },
    )
    document = message(
        "DOC1",
        messageType="documentMessage",
        message={
            "documentMessage": {"mimetype": "application/pdf", "fileName": "boleto.pdf", "caption": "segue"},
            "mediaUrl": "https://s3.example/doc.pdf",
        },
    )

    for body in (image, audio, document):
        assert (await post(client, org, envelope("messages.upsert", body))).json()["outcome"] == "applied"

    img, aud, doc = [await message_row(k) for k in ("IMG1", "AUD1", "DOC1")]
    assert (img["type"], img["content"], img["media_mime"], img["media_size"]) == ("image", "foto", "image/jpeg", 2048)
    assert (aud["type"], aud["content"], aud["media_size"]) == ("audio", None, 999)
    assert (doc["type"], doc["media_name"], doc["media_url"]) == (
        "document",
        "boleto.pdf",
        "https://s3.example/doc.pdf",
    )


@pytest.mark.parametrize("jid", ["120363000000000001@g.us", "status@broadcast"])
async def test_group_and_broadcast_messages_are_stored_and_ignored(client, org, jid: str) -> None:
    body = envelope("messages.upsert", message("GRP1", jid=jid))

    response = await post(client, org, body)

    assert response.status_code == 200 and response.json()["outcome"] == "ignored"
    assert await count("contacts") == 0 and await count("messages") == 0
    assert await count("webhook_events") == 1


async def test_by_events_suffix_reaches_the_same_handler(client, org) -> None:
    body = envelope("messages.upsert", message("SUF1"))
    del body["event"]

    response = await post(client, org, body, suffix="/messages-upsert")

    assert response.json()["outcome"] == "applied" and await count("messages") == 1


@pytest.mark.parametrize(
    ("event", "data"),
    [
        (
            "contacts.upsert",
            [{"remoteJid": CUSTOMER, "pushName": "Ana Paula", "profilePicUrl": None, "instanceId": "uuid"}],
        ),
        (
            "contacts.update",
            {"remoteJid": CUSTOMER, "pushName": "Ana Paula", "profilePicUrl": None, "instanceId": "uuid"},
        ),
    ],
)
async def test_contacts_events_in_both_shapes(client, org, event: str, data: object) -> None:
    response = await post(client, org, envelope(event, data))

    assert response.status_code == 200 and response.json()["outcome"] == "applied"
    assert await rows("SELECT jid, name FROM contacts") == [{"jid": CUSTOMER, "name": "Ana Paula"}]


@pytest.mark.parametrize(
    ("event", "data"),
    [
        ("chats.upsert", [{"remoteJid": CUSTOMER, "instanceId": "uuid", "name": "Ana", "unreadMessages": 0}]),
        ("chats.upsert", [{"remoteJid": CUSTOMER, "instanceId": "uuid", "unreadMessages": 0}]),
        ("chats.upsert", [{"id": "clx0chatcuid", "name": "Ana (renamed)"}]),  # the variant without remoteJid
        ("chats.update", [{"remoteJid": CUSTOMER, "instanceId": "uuid"}]),
        ("chats.delete", [CUSTOMER]),
        ("chats.set", [{"remoteJid": CUSTOMER, "instanceId": "uuid", "name": "Ana"}]),
        (
            "presence.update",
            {"id": CUSTOMER, "presences": {CUSTOMER: {"lastKnownPresence": "composing", "lastSeen": 1729425600}}},
        ),
        (
            "groups.upsert",
            [
                {
                    "id": "120363000000000001@g.us",
                    "subject": "Equipe",
                    "owner": CUSTOMER,
                    "participants": [{"id": CUSTOMER, "admin": "admin"}],
                }
            ],
        ),
        (
            "group-participants.update",
            {
                "id": "120363000000000001@g.us",
                "participants": [CUSTOMER],
                "action": "add",
                "participantsData": [{"jid": CUSTOMER}],
            },
        ),
        ("messages.edited", {"key": {"remoteJid": CUSTOMER, "id": "X"}, "type": 14, "editedMessage": {}}),
    ],
)
async def test_other_events_are_stored_and_acknowledged(client, org, event: str, data: object) -> None:
    response = await post(client, org, envelope(event, data))

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] in ("stored", "applied")
    assert await count("webhook_events") == 1


async def test_megaapi_flat_message_and_acks(client, org) -> None:
    flat = {
        "instance_key": "mega-01",
        "jid": "5511999990000@s.whatsapp.net",
        "messageType": "conversation",
        "key": {"remoteJid": CUSTOMER, "id": "MEGA1", "fromMe": True, "participant": ""},
        "messageTimestamp": int(datetime.now(UTC).timestamp()),
        "pushName": "Acme",
        "status": "",
        "message": {"conversation": "olá"},
    }

    def ack(status: int) -> dict[str, object]:
        return {
            "instance_key": "mega-01",
            "messageType": "message.ack",
            "key": {"remoteJid": CUSTOMER, "id": "MEGA1"},
            "update": {"status": status},
        }

    first = await post(client, org, flat, provider="megaapi")
    again = await post(client, org, flat, provider="megaapi")
    assert (first.json()["outcome"], again.json()["outcome"]) == ("applied", "duplicate")
    stored = await message_row("MEGA1")
    assert (stored["from_me"], stored["content"], stored["status"]) == (True, "olá", "sent")
    (conv,) = await conversations()
    assert conv["status"] == "in_progress"

    for status in (3, 4, 3):
        assert (await post(client, org, ack(status), provider="megaapi")).status_code == 200
    assert (await message_row("MEGA1"))["status"] == "read"


@pytest.mark.parametrize(
    ("provider", "body", "needle"),
    [
        ("evolution", envelope("messages.upsert", {"key": {"remoteJid": CUSTOMER}, "messageTimestamp": 1}), "key.id"),
        ("evolution", envelope("messages.upsert", message("BAD1", messageTimestamp="soon")), "messageTimestamp"),
        ("evolution", envelope("messages.upsert", "oi"), "message object"),
        ("evolution", {**envelope("messages.upsert", message("BAD2")), "instance": None}, "instance"),
        ("evolution", envelope("messages.update", {"remoteJid": CUSTOMER, "status": "READ"}), "keyId"),
        ("evolution", envelope("messages.delete", {"remoteJid": CUSTOMER}), "id"),
        ("evolution", envelope("contacts.upsert", 42), "array"),
        ("evolution", envelope("chats.upsert", "nope"), "array"),
        ("evolution", envelope("presence.update", []), "presence.update"),
        ("megaapi", {"instance_key": "mega-01", "messageType": "message.ack", "key": {"id": "M"}}, "update.status"),
        (
            "megaapi",
            {"instance_key": "mega-01", "messageType": "message.ack", "key": {"id": "M"}, "update": {"status": 42}},
            "unknown status",
        ),
        (
            "megaapi",
            {"instance_key": "mega-01", "messageType": "conversation", "key": {"id": "M"}, "messageTimestamp": 1},
            "remoteJid",
        ),
    ],
)
async def test_malformed_payloads_get_422_and_lose_nothing(
    client, org, provider: str, body: dict[str, Any], needle: str
) -> None:
    await post(client, org, envelope("messages.upsert", message("KEEP1")))
    before = await rows("SELECT id, external_id, status, conversation_id FROM messages")

    response = await post(client, org, body, provider=provider)

    assert response.status_code == 422, response.text
    assert needle in response.json()["detail"]
    assert await rows("SELECT id, external_id, status, conversation_id FROM messages") == before
    assert await count("webhook_events") == 1


async def test_messages_for_unknown_instances_are_stored_and_ignored(client, org) -> None:
    body = envelope("messages.upsert", message("GHOST1"))
    body["instance"] = "not-ours"

    response = await post(client, org, body)

    assert response.json()["outcome"] == "ignored"
    assert await count("messages") == 0 and await count("webhook_events") == 1


# -- the order of arrival does not decide (issue 13 §6) -----------------------------------------------------------


async def test_a_receipt_arriving_before_its_message_is_applied_when_the_message_arrives(client, org) -> None:
    read = envelope("messages.update", {"keyId": "EARLY1", "remoteJid": CUSTOMER, "fromMe": True, "status": "READ"})
    delivered = envelope(
        "messages.update", {"keyId": "EARLY1", "remoteJid": CUSTOMER, "fromMe": True, "status": "DELIVERY_ACK"}
    )

    assert (await post(client, org, read)).json()["outcome"] == "applied"
    assert (await post(client, org, delivered)).status_code == 200  # behind READ: the pending receipt stays read
    assert await rows("SELECT external_id, status FROM pending_receipts") == [
        {"external_id": "EARLY1", "status": "read"}
    ]
    echo = await post(client, org, envelope("send.message", message("EARLY1", from_me=True, status="PENDING")))

    assert echo.json()["outcome"] == "applied"
    assert (await message_row("EARLY1"))["status"] == "read"
    assert await count("pending_receipts") == 0  # applied, so forgotten
    # A receipt for a stored message is applied at once and never remembered.
    await post(client, org, envelope("messages.update", {"keyId": "EARLY1", "status": "PLAYED"}))
    assert (await message_row("EARLY1"))["status"] == "played" and await count("pending_receipts") == 0


async def test_a_stale_pending_receipt_is_pruned_after_a_week(client, org) -> None:
    await post(client, org, envelope("messages.update", {"keyId": "GONE1", "status": "READ"}))
    async with session_scope() as session:
        await session.execute(text("UPDATE pending_receipts SET observed_at = now() - interval '8 days'"))

    await post(client, org, envelope("messages.update", {"keyId": "LATER1", "status": "DELIVERY_ACK"}))

    assert [r["external_id"] for r in await rows("SELECT external_id FROM pending_receipts")] == ["LATER1"]


async def test_an_older_customer_message_arriving_late_moves_the_waiting_marker_back(client, org) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    await post(client, org, envelope("messages.upsert", message("W2", at=start + timedelta(seconds=30))))
    await post(client, org, envelope("messages.upsert", message("W1", at=start)))

    (conv,) = await conversations()
    assert conv["status"] == "waiting"
    assert int(conv["waiting_since"].timestamp()) == int(start.timestamp())  # the first unanswered message
    assert int(conv["opened_at"].timestamp()) == int(start.timestamp())


async def test_a_business_reply_arriving_late_answers_the_messages_before_it(client, org) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    await post(client, org, envelope("messages.upsert", message("Q1", at=start)))
    await post(client, org, envelope("messages.upsert", message("Q2", at=start + timedelta(seconds=60))))
    late = message("A1", from_me=True, at=start + timedelta(seconds=30), status="PENDING")
    await post(client, org, envelope("send.message", late))

    (conv,) = await conversations()
    # As in the order they were sent: Q1 answered by A1, Q2 unanswered.
    assert conv["status"] == "in_progress"
    assert int(conv["waiting_since"].timestamp()) == int((start + timedelta(seconds=60)).timestamp())


async def test_an_older_push_name_arriving_after_a_newer_contact_name_does_not_overwrite_it(client, org) -> None:
    now = datetime.now(UTC)
    renamed = envelope("contacts.upsert", [{"remoteJid": CUSTOMER, "pushName": "Ana Paula", "profilePicUrl": None}])
    renamed["date_time"] = (now - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    await post(client, org, renamed)
    await post(client, org, envelope("messages.upsert", message("N1", at=now - timedelta(minutes=2))))  # "Ana"

    assert await rows("SELECT name FROM contacts") == [{"name": "Ana Paula"}]
    await post(client, org, envelope("messages.upsert", message("N2", at=now)))  # newer than the rename
    assert await rows("SELECT name FROM contacts") == [{"name": "Ana"}]


async def test_an_imported_message_takes_the_receipt_that_arrived_before_it(client, org) -> None:
    from core.domain import GatewayMessage
    from db.repositories.conversations import (
        ContactInput,
        ConversationFact,
        MessageRows,
        ensure_conversations,
        instance_scope_by_name,
        upsert_contacts,
    )
    from db.repositories.import_copy import copy_messages

    await post(client, org, envelope("messages.update", {"keyId": "HIST1", "status": "READ"}))
    await post(client, org, envelope("messages.update", {"keyId": "HIST2", "status": "DELIVERY_ACK"}))
    at = datetime.now(UTC) - timedelta(days=1)
    async with session_scope() as session:
        scope = await instance_scope_by_name(
            session, organization_id=org, gateways=["evolution"], instance_name="acme-01"
        )
        assert scope is not None
        written = await upsert_contacts(session, scope, [ContactInput(CUSTOMER)])
        refs = await ensure_conversations(
            session, scope, [ConversationFact(written.ids[CUSTOMER], at, True)], now=at, closed_reason="imported"
        )
        rows_ = MessageRows()
        conversation_id = refs[written.ids[CUSTOMER]].id
        rows_.append(conversation_id, GatewayMessage("HIST1", CUSTOMER, True, int(at.timestamp()), "text", "a"))
        # Its own status is further than the pending receipt: it stays.
        played = GatewayMessage("HIST2", CUSTOMER, True, int(at.timestamp()), "text", "b", status="played")
        rows_.append(conversation_id, played)
        assert await copy_messages(session, scope, rows_) == 2

    assert (await message_row("HIST1"))["status"] == "read"
    assert (await message_row("HIST2"))["status"] == "played"
    assert await count("pending_receipts") == 0
