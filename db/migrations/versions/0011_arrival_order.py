"""arrival order: receipts for messages not stored yet wait in `pending_receipts`; contacts remember when their name
was observed, so an older name arriving later does not overwrite a newer one (issue 13 §6)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25 22:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("contacts", sa.Column("name_observed_at", postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.create_table(
        "pending_receipts",
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("observed_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name="fk_pending_receipts_instance_id_whatsapp_instances",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("instance_id", "external_id", name="pk_pending_receipts"),
    )
    op.create_index("ix_pending_receipts_instance_observed", "pending_receipts", ["instance_id", "observed_at"])


def downgrade() -> None:
    op.drop_index("ix_pending_receipts_instance_observed", table_name="pending_receipts")
    op.drop_table("pending_receipts")
    op.drop_column("contacts", "name_observed_at")
