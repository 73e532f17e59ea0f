"""Tenants, their CRM clients and their API tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, Timestamps


class Organization(Timestamps, Base):
    """A tenant: the boundary no token or webhook secret crosses."""

    __tablename__ = "organizations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))
    name: Mapped[str]
    webhook_secret_hash: Mapped[str | None] = mapped_column(String(64))
    """sha256 hex of the secret gateways send in a header: what every delivery is checked against."""
    webhook_secret_sealed: Mapped[str | None]
    """The same secret sealed (``core.sealing``): written into the webhook config of instances zapsync creates."""
    webhook_auth: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    """How deliveries authenticate, per provider: ``{"waha": "hmac", "evolution": "jwt"}`` (``secret``, ``hmac``,
    ``jwt`` or ``any``; a provider not named accepts any method it can send — ``core.webhook_signatures``)."""
    inactivity_hours: Mapped[int] = mapped_column(server_default=text("24"))
    session_retention_days: Mapped[int] = mapped_column(server_default=text("30"))
    import_history_days: Mapped[int | None]
    auto_reconnect: Mapped[bool] = mapped_column(server_default=text("true"))
    close_waiting_conversations: Mapped[bool] = mapped_column(server_default=text("false"))


class Client(Timestamps, Base):
    """A CRM customer; imports link WhatsApp contacts to clients by phone."""

    __tablename__ = "clients"
    __table_args__ = (Index("ix_clients_organization_phone", "organization_id", "phone"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str]
    phone: Mapped[str | None] = mapped_column(String(32))
    """Digits only."""


class ApiToken(Base):
    """A bearer token, scoped to one organization (or admin when organization_id is null)."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String), server_default=text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class DashboardSession(Base):
    """A signed-in dashboard browser (issue 13 §1): its cookie holds a random id, this row holds only its digest.

    The session speaks for the token it was opened with: revoking that token ends it at once (the lookup joins the
    token), and so does its expiry or a logout (which deletes the row)."""

    __tablename__ = "dashboard_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    """sha256 hex of the session id in the cookie."""
    token_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True)
    """The stored token signed in with; null for the settings' admin token (``ZAPSYNC_ADMIN_TOKEN``)."""
    token_hash: Mapped[str] = mapped_column(String(64))
    """sha256 hex of the token signed in with: a session of the settings' admin token ends when that token changes."""
    principal: Mapped[str]
    """The token's name when the session opened (for audit)."""
    created_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked_at: Mapped[datetime | None]
