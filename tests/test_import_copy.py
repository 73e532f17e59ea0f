"""The import's COPY path stores exactly the rows the webhook path's ``unnest`` insert stores, and is idempotent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from core.domain import GatewayMessage
from db.engine import session_scope
from db.repositories.conversations import (
    ContactInput,
    ConversationFact,
    InstanceScope,
    MessageRows,
    ensure_conversations,
    insert_messages,
    instance_scope,
    upsert_contacts,
)
from db.repositories.import_copy import copy_messages
from tests.factories import make_instance, make_organization

JID = "5511987654321@s.whatsapp.net"
AT = 1_700_000_000

# Text no plain COPY row can carry as is (a NUL byte), the unnest path's delimiters, tabs, newlines and a backslash
# (which COPY's text format escapes), empty strings (stored as NULL) and every optional field.
MESSAGES = [
    GatewayMessage("m-plain", JID, False, AT, "text", "bom dia"),
    GatewayMessage("m-nul", JID, True, AT + 1, "text", "a\x00b\x1fc\x1ed", status="read"),
    GatewayMessage("m-escapes", JID, False, AT + 2, "text", "tab\there\nnew line \\N back\\slash"),
    GatewayMessage("m-empty", JID, True, AT + 3, "text", ""),
    GatewayMessage(
        "m-media",
        JID,
        False,
        AT + 4,
        "document",
        None,
        media_url="https://mmg.whatsapp.net/d/1.enc",
        media_mime="application/pdf",
        media_name="",
        media_size=123_456,
        status="delivered",
    ),
    GatewayMessage("m-nul-only", JID, False, AT + 5, "text", "\x00"),
]


async def _scope_with_conversation(name: str) -> tuple[InstanceScope, int]:
    organization_id = await make_organization(f"org {name}")
    instance_id = await make_instance(organization_id, name)
    async with session_scope() as session:
        scope = await instance_scope(session, instance_id)
        assert scope is not None
        written = await upsert_contacts(session, scope, [ContactInput(JID)])
        refs = await ensure_conversations(
            session,
            scope,
            [ConversationFact(written.ids[JID], datetime.fromtimestamp(AT + 5, UTC), False)],
            now=datetime.now(UTC),
            closed_reason="imported",
        )
    return scope, refs[written.ids[JID]].id


def _rows(conversation_id: int, messages: list[GatewayMessage]) -> MessageRows:
    rows = MessageRows()
    for message in messages:
        rows.append(conversation_id, message)
    return rows


async def _stored(instance_id: uuid.UUID) -> list[dict[str, Any]]:
    async with session_scope() as session:
        result = await session.execute(
            text(
                "SELECT external_id, from_me, sender, type, content, media_url, media_mime, media_name, media_size, "
                "sent_at, status, client_id FROM messages WHERE instance_id = :inst ORDER BY external_id"
            ),
            {"inst": instance_id},
        )
        return [dict(r) for r in result.mappings().all()]


async def test_copy_stores_what_the_unnest_insert_stores() -> None:
    copied, copied_conversation = await _scope_with_conversation("copy")
    inserted, inserted_conversation = await _scope_with_conversation("unnest")

    async with session_scope() as session:
        assert await copy_messages(session, copied, _rows(copied_conversation, MESSAGES)) == len(MESSAGES)
    async with session_scope() as session:
        assert await insert_messages(session, inserted, _rows(inserted_conversation, MESSAGES)) == len(MESSAGES)

    stored = await _stored(copied.id)
    assert stored == await _stored(inserted.id)
    by_id = {row["external_id"]: row for row in stored}
    assert by_id["m-nul"]["content"] == "ab c d"
    assert by_id["m-escapes"]["content"] == "tab\there\nnew line \\N back\\slash"
    assert by_id["m-empty"]["content"] is None and by_id["m-nul-only"]["content"] is None
    assert by_id["m-media"]["media_name"] is None and by_id["m-media"]["media_size"] == 123_456
    assert [by_id[m]["status"] for m in ("m-plain", "m-nul", "m-empty")] == ["delivered", "read", "sent"]
    assert [by_id[m]["sender"] for m in ("m-plain", "m-nul")] == ["client", "agent"]


async def test_copy_is_idempotent_and_pages_can_share_a_transaction() -> None:
    scope, conversation_id = await _scope_with_conversation("twice")

    async with session_scope() as session:
        assert await copy_messages(session, scope, _rows(conversation_id, MESSAGES[:3])) == 3
        # A second page in the same transaction: the staging table holds only its own rows.
        assert await copy_messages(session, scope, _rows(conversation_id, MESSAGES[2:])) == len(MESSAGES) - 3
    async with session_scope() as session:
        assert await copy_messages(session, scope, _rows(conversation_id, MESSAGES)) == 0
        assert await copy_messages(session, scope, MessageRows()) == 0

    assert sorted(row["external_id"] for row in await _stored(scope.id)) == sorted(m.external_id for m in MESSAGES)
