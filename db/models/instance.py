"""WhatsApp instances, their status history and their connected sessions."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, Computed, ForeignKey, Identity, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, Timestamps

STATUSES = ("connected", "connecting", "qr_pending", "disconnected", "error")
HEALTH = ("unknown", "healthy", "unhealthy", "disconnected", "error")
_STATUS_LIST = ", ".join(f"'{s}'" for s in STATUSES)
_HEALTH_LIST = ", ".join(f"'{s}'" for s in HEALTH)


class WhatsAppInstance(Timestamps, Base):
    """One WhatsApp number at one gateway, as the CRM sees it."""

    __tablename__ = "whatsapp_instances"
    __table_args__ = (
        Index("uq_whatsapp_instances_gateway_name", "gateway", "instance_name", unique=True),
        CheckConstraint(f"status IN ({_STATUS_LIST})", name="status"),
        CheckConstraint(f"health IN ({_HEALTH_LIST})", name="health"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    gateway: Mapped[str] = mapped_column(String(64))
    instance_name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'disconnected'"))
    is_connected: Mapped[bool] = mapped_column(Computed("status = 'connected'", persisted=True))
    phone_number: Mapped[str | None] = mapped_column(String(32))
    profile_name: Mapped[str | None]
    qr_code: Mapped[str | None]
    pairing_code: Mapped[str | None] = mapped_column(String(32))
    status_reason: Mapped[str | None]
    status_observed_at: Mapped[datetime | None]
    last_checked_at: Mapped[datetime | None]
    live_confirmed_at: Mapped[datetime | None]
    logged_out: Mapped[bool] = mapped_column(server_default=text("false"))
    """The gateway said the session was logged out: only a new QR scan reconnects it."""
    consecutive_failures: Mapped[int] = mapped_column(server_default=text("0"))
    last_health_check_at: Mapped[datetime | None]
    health: Mapped[str] = mapped_column(String(16), server_default=text("'unknown'"))


class InstanceStatusChange(Base):
    """One transition of an instance's status: history and audit."""

    __tablename__ = "instance_status_changes"
    __table_args__ = (
        Index("ix_instance_status_changes_instance_recorded", "instance_id", "recorded_at"),
        Index("ix_instance_status_changes_org_recorded", "organization_id", "recorded_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("whatsapp_instances.id", ondelete="CASCADE"))
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None]
    observed_at: Mapped[datetime]
    recorded_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    flow_run_id: Mapped[uuid.UUID | None]


class WhatsAppSession(Base):
    """One connected period of an instance; at most one is open (disconnected_at null) per instance."""

    __tablename__ = "whatsapp_sessions"
    __table_args__ = (
        Index(
            "uq_whatsapp_sessions_one_open",
            "instance_id",
            unique=True,
            postgresql_where=text("disconnected_at IS NULL"),
        ),
        Index("ix_whatsapp_sessions_last_activity", "last_activity_at"),
        Index("ix_whatsapp_sessions_instance_connected", "instance_id", "connected_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("whatsapp_instances.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'active'"))
    connected_at: Mapped[datetime]
    disconnected_at: Mapped[datetime | None]
    last_activity_at: Mapped[datetime]
