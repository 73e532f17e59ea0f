"""The durable work queue (DESIGN.md §5.1): event-driven work, enqueued with the fact that causes it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Identity, Index, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, Timestamps

WORK_ITEM_STATES = ("pending", "running", "done", "failed")
PENDING = "state = 'pending'"
RUNNING = "state = 'running'"
FINISHED = "state IN ('done', 'failed')"
OUTSTANDING = "state IN ('pending', 'running')"


class WorkItem(Timestamps, Base):
    """One unit of queued work (an import, a send…): at most one pending and one running per (kind, key)."""

    __tablename__ = "work_items"
    __table_args__ = (
        CheckConstraint(f"state IN ({', '.join(repr(s) for s in WORK_ITEM_STATES)})", name="state"),
        Index("uq_work_items_pending_key", "kind", "key", unique=True, postgresql_where=text(PENDING)),
        Index("uq_work_items_running_key", "kind", "key", unique=True, postgresql_where=text(RUNNING)),
        Index("ix_work_items_due", "kind", "next_attempt_at", "id", postgresql_where=text(PENDING)),
        Index("ix_work_items_lease", "kind", "lease_until", postgresql_where=text(RUNNING)),
        Index("ix_work_items_finished", "state", "finished_at", postgresql_where=text(FINISHED)),
        Index("ix_work_items_line", "kind", "instance_id", "id", postgresql_where=text(OUTSTANDING)),
        Index("ix_work_items_line_finished", "kind", "instance_id", "finished_at", postgresql_where=text(FINISHED)),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(Text)
    """Deduplicates within a kind: the instance id for imports, the client message id for sends."""
    organization_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    instance_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("whatsapp_instances.id", ondelete="CASCADE"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    state: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(server_default=text("0"))
    """Claims so far (a claim counts as an attempt, so work lost with its process counts too)."""
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=text("now()"))
    lease_until: Mapped[datetime | None]
    lease_token: Mapped[uuid.UUID | None]
    """Fencing token of the current claim: only its holder may complete, retry or fail the item."""
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """What finishing the item produced (an import's report), for whoever waits for it."""
    finished_at: Mapped[datetime | None]
