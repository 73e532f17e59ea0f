"""Rows for the maintenance, health and live-event tests, written with plain SQL (as another process would)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from db.engine import session_scope
from tests.factories import auth_headers


def ago(**delta: float) -> datetime:
    """Now minus a timedelta (``ago(hours=30)``)."""
    return datetime.now(UTC) - timedelta(**delta)


async def set_org(organization_id: uuid.UUID, **settings: Any) -> None:
    """Change organization settings columns directly."""
    assignments = ", ".join(f"{name} = :{name}" for name in settings)
    async with session_scope() as session:
        await session.execute(
            text(f"UPDATE organizations SET {assignments} WHERE id = :id"), {**settings, "id": organization_id}
        )


async def add_session(
    instance_id: uuid.UUID,
    *,
    connected_at: datetime,
    disconnected_at: datetime | None,
    last_activity_at: datetime | None = None,
) -> int:
    """A whatsapp_sessions row (open when ``disconnected_at`` is None)."""
    async with session_scope() as session:
        row = await session.execute(
            text(
                "INSERT INTO whatsapp_sessions (instance_id, status, connected_at, disconnected_at, last_activity_at) "
                "VALUES (:iid, :status, :c, :d, :a) RETURNING id"
            ),
            {
                "iid": instance_id,
                "status": "active" if disconnected_at is None else "ended",
                "c": connected_at,
                "d": disconnected_at,
                "a": last_activity_at or disconnected_at or connected_at,
            },
        )
        return int(row.scalar_one())


async def add_conversation(
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    *,
    last_message_at: datetime,
    waiting_since: datetime | None = None,
    status: str = "in_progress",
    with_message: bool = True,
) -> int:
    """A contact and its conversation (with one message at ``last_message_at``, as an import would leave it)."""
    jid = f"55{uuid.uuid4().int % 10**11:011d}@s.whatsapp.net"
    async with session_scope() as session:
        contact = (
            await session.execute(
                text(
                    "INSERT INTO contacts (organization_id, instance_id, jid, phone) VALUES (:org, :iid, :jid, :phone) "
                    "RETURNING id"
                ),
                {"org": organization_id, "iid": instance_id, "jid": jid, "phone": jid.split("@")[0]},
            )
        ).scalar_one()
        conversation = int(
            (
                await session.execute(
                    text(
                        "INSERT INTO conversations (organization_id, instance_id, contact_id, status, opened_at, "
                        "last_message_at, waiting_since, closed_at) VALUES (:org, :iid, :cid, :status, :opened, :last, "
                        ":waiting, :closed) RETURNING id"
                    ),
                    {
                        "org": organization_id,
                        "iid": instance_id,
                        "cid": contact,
                        "status": status,
                        "opened": last_message_at - timedelta(hours=1),
                        "last": last_message_at,
                        "waiting": waiting_since,
                        "closed": last_message_at if status in ("closed", "cancelled") else None,
                    },
                )
            ).scalar_one()
        )
        if with_message:
            await session.execute(
                text(
                    "INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, from_me, "
                    "sender, content, sent_at) VALUES (:org, :iid, :conv, :ext, :me, :sender, 'hi', :at)"
                ),
                {
                    "org": organization_id,
                    "iid": instance_id,
                    "conv": conversation,
                    "ext": uuid.uuid4().hex,
                    "me": waiting_since is None,
                    "sender": "client" if waiting_since else "agent",
                    "at": last_message_at,
                },
            )
        return conversation


async def add_message(conversation_id: int, *, at: datetime | None = None, bump: bool = True) -> None:
    """A customer's message in a conversation; ``bump`` also moves its ``last_message_at`` (as the handler does)."""
    at = at or datetime.now(UTC)
    async with session_scope() as session:
        await session.execute(
            text(
                "INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, sender, content, "
                "sent_at) SELECT organization_id, instance_id, id, :ext, 'client', 'still there?', :at "
                "FROM conversations WHERE id = :id"
            ),
            {"id": conversation_id, "ext": uuid.uuid4().hex, "at": at},
        )
        if bump:
            await session.execute(
                text(
                    "UPDATE conversations SET last_message_at = :at, waiting_since = COALESCE(waiting_since, :at) "
                    "WHERE id = :id"
                ),
                {"id": conversation_id, "at": at},
            )


async def conversation(conversation_id: int) -> dict[str, Any]:
    """A conversation row."""
    async with session_scope() as session:
        row = await session.execute(text("SELECT * FROM conversations WHERE id = :id"), {"id": conversation_id})
        return dict(row.mappings().one())


async def system_messages() -> list[dict[str, Any]]:
    """Every system message, by conversation."""
    async with session_scope() as session:
        rows = await session.execute(
            text(
                "SELECT conversation_id, external_id, content, from_me, sent_at FROM messages WHERE sender = 'system' "
                "ORDER BY conversation_id"
            )
        )
        return [dict(r) for r in rows.mappings().all()]


async def live_events(kind_prefix: str = "") -> list[dict[str, Any]]:
    """Stored live events (of kinds starting with ``kind_prefix``), oldest first."""
    async with session_scope() as session:
        rows = await session.execute(
            text("SELECT id, organization_id, kind, payload FROM live_events WHERE kind LIKE :k ORDER BY id"),
            {"k": f"{kind_prefix}%"},
        )
        return [dict(r) for r in rows.mappings().all()]


org_token = auth_headers
