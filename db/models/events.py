"""The webhook inbox and the reports flows leave behind."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Identity, Index, String, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base


class WebhookEvent(Base):
    """Every accepted webhook delivery, deduplicated by key, for audit and replay."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_org_received", "organization_id", "received_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(64))
    instance_name: Mapped[str | None] = mapped_column(String(255))
    dedupe_key: Mapped[str] = mapped_column(String(128), unique=True)
    received_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None]


class FlowReport(Base):
    """The pydantic report a flow run returned, readable by any process (API `wait=true`, dashboard)."""

    __tablename__ = "flow_reports"
    __table_args__ = (Index("ix_flow_reports_flow_finished", "flow_name", "finished_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    flow_run_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    flow_name: Mapped[str] = mapped_column(String(64))
    organization_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    report: Mapped[dict[str, Any]] = mapped_column(JSONB)
