"""Contacts, conversations (atendimentos), messages (mensagens) and resumable imports."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Identity, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, Timestamps

CONVERSATION_STATUSES = ("waiting", "in_progress", "closed", "cancelled")
OPEN_CONVERSATION = "status IN ('waiting', 'in_progress')"
MESSAGE_STATUSES = ("pending", "unknown", "sent", "delivered", "read", "played", "failed", "deleted")
MESSAGE_TYPES = ("text", "image", "video", "audio", "document", "sticker", "location", "contact", "reaction", "other")
SENDERS = ("client", "agent", "system")
IMPORT_STATES = ("running", "completed", "failed")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Contact(Timestamps, Base):
    """A WhatsApp contact seen by one instance; linked to a CRM client by phone when one matches."""

    __tablename__ = "contacts"
    __table_args__ = (
        Index("uq_contacts_instance_jid", "instance_id", "jid", unique=True),
        Index("ix_contacts_instance_alt_jid", "instance_id", "alt_jid"),
        Index("ix_contacts_organization_phone", "organization_id", "phone"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("whatsapp_instances.id", ondelete="CASCADE"))
    jid: Mapped[str] = mapped_column(String(128))
    alt_jid: Mapped[str | None] = mapped_column(String(128))
    """The other addressing form (LID ↔ phone number) when the gateway gives it."""
    phone: Mapped[str | None] = mapped_column(String(32))
    name: Mapped[str | None]
    name_observed_at: Mapped[datetime | None]
    """When ``name`` was observed (a message's push name at its send time, a contact event at its time): an older
    observation arriving later does not overwrite it (migration 0011)."""
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("clients.id", ondelete="SET NULL"))
    is_group: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class PendingReceipt(Base):
    """A receipt for a message not stored yet (it arrived first): applied, and deleted, when the message is stored.

    One row per message, at the furthest status seen; rows older than a week are pruned when a receipt is
    remembered (migration 0011).
    """

    __tablename__ = "pending_receipts"
    __table_args__ = (Index("ix_pending_receipts_instance_observed", "instance_id", "observed_at"),)

    instance_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("whatsapp_instances.id", ondelete="CASCADE"), primary_key=True
    )
    external_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    observed_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class Conversation(Timestamps, Base):
    """An attendance: opened by a customer's message, closed by an agent or for inactivity."""

    __tablename__ = "conversations"
    __table_args__ = (
        CheckConstraint(_one_of("status", CONVERSATION_STATUSES), name="status"),
        Index(
            "uq_conversations_one_open_per_contact", "contact_id", unique=True, postgresql_where=text(OPEN_CONVERSATION)
        ),
        Index(
            "ix_conversations_open_idle", "organization_id", "last_message_at", postgresql_where=text(OPEN_CONVERSATION)
        ),
        Index("ix_conversations_instance_updated", "instance_id", "updated_at"),
        Index("ix_conversations_organization_updated", "organization_id", "updated_at"),
        Index("ix_conversations_contact_last", "contact_id", "last_message_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("whatsapp_instances.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("contacts.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'waiting'"))
    opened_at: Mapped[datetime]
    last_message_at: Mapped[datetime]
    waiting_since: Mapped[datetime | None]
    """Set while the customer wrote last and awaits a reply; cleared by the agent's answer."""
    closed_at: Mapped[datetime | None]
    close_reason: Mapped[str | None] = mapped_column(String(32))
    assignee_id: Mapped[str | None] = mapped_column(String(128))
    priority: Mapped[int] = mapped_column(server_default=text("0"))
    tags: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))


class Message(Base):
    """One WhatsApp message; the gateway's key id makes every write idempotent."""

    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint(_one_of("status", MESSAGE_STATUSES), name="status"),
        CheckConstraint(_one_of("type", MESSAGE_TYPES), name="type"),
        CheckConstraint(_one_of("sender", SENDERS), name="sender"),
        Index("uq_messages_instance_external", "instance_id", "external_id", unique=True),
        Index(
            "uq_messages_instance_client",
            "instance_id",
            "client_id",
            unique=True,
            postgresql_where=text("client_id IS NOT NULL"),
        ),
        Index("ix_messages_conversation_sent", "conversation_id", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    organization_id: Mapped[uuid.UUID]
    """Its conversation's organization (no foreign key: the conversation's cascades cover it, migration 0003)."""
    instance_id: Mapped[uuid.UUID]
    """Its conversation's instance (no foreign key, as above)."""
    conversation_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("conversations.id", ondelete="CASCADE"))
    external_id: Mapped[str | None] = mapped_column(String(128))
    from_me: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    sender: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16), server_default=text("'text'"))
    content: Mapped[str | None]
    media_url: Mapped[str | None]
    media_mime: Mapped[str | None] = mapped_column(String(128))
    media_name: Mapped[str | None]
    media_size: Mapped[int | None] = mapped_column(BigInteger)
    sent_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), server_default=text("'sent'"))
    client_id: Mapped[str | None] = mapped_column(String(128))
    """The sender's idempotency key (``Idempotency-Key`` or ``client_id``) of an outbox message."""
    attempted_at: Mapped[datetime | None]
    """When the outbox last handed the message to the gateway (an echo can only match a message that was tried)."""
    error: Mapped[str | None]
    """Why a send failed (or why its outcome is unknown)."""
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))


class ImportRun(Base):
    """One conversation import of one instance, with the cursor that lets a killed run resume."""

    __tablename__ = "import_runs"
    __table_args__ = (
        CheckConstraint(_one_of("state", IMPORT_STATES), name="state"),
        Index("uq_import_runs_one_running", "instance_id", unique=True, postgresql_where=text("state = 'running'")),
        Index("ix_import_runs_instance_started", "instance_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("whatsapp_instances.id", ondelete="CASCADE"))
    trigger: Mapped[str] = mapped_column(String(16))
    connection_key: Mapped[str | None] = mapped_column(String(128))
    """Identifies the connection that started the import (instance + connect time): one import per connect."""
    state: Mapped[str] = mapped_column(String(16), server_default=text("'running'"))
    started_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    finished_at: Mapped[datetime | None]
    cursor: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    error: Mapped[str | None]
    flow_run_id: Mapped[uuid.UUID | None]


class LiveEvent(Base):
    """A notification for the organization's live stream (`GET /events`), written by any process."""

    __tablename__ = "live_events"
    __table_args__ = (Index("ix_live_events_org_id", "organization_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
