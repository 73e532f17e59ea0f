"""gateway health for the monitor; sessions by instance for uptime

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 19:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_health",
        sa.Column("gateway", sa.String(length=64), nullable=False),
        sa.Column("health", sa.String(length=16), server_default=sa.text("'healthy'"), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("last_check_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("changed_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.CheckConstraint("health IN ('healthy', 'unhealthy')", name=op.f("ck_gateway_health_health")),
        sa.PrimaryKeyConstraint("gateway", name=op.f("pk_gateway_health")),
    )
    op.create_index(
        "ix_whatsapp_sessions_instance_connected", "whatsapp_sessions", ["instance_id", "connected_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_whatsapp_sessions_instance_connected", table_name="whatsapp_sessions")
    op.drop_table("gateway_health")
