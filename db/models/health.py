"""What the health monitor remembers about each gateway between runs."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String, text
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base


class GatewayHealth(Base):
    """One configured gateway's health: an outage is the gateway's failure, not its instances'."""

    __tablename__ = "gateway_health"
    __table_args__ = (CheckConstraint("health IN ('healthy', 'unhealthy')", name="health"),)

    gateway: Mapped[str] = mapped_column(String(64), primary_key=True)
    health: Mapped[str] = mapped_column(String(16), server_default=text("'healthy'"))
    consecutive_failures: Mapped[int] = mapped_column(server_default=text("0"))
    last_error: Mapped[str | None]
    last_check_at: Mapped[datetime]
    changed_at: Mapped[datetime]
