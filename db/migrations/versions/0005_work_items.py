"""work_items: the durable work queue of event-driven work (imports, sends)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "work_items",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=True),
        sa.Column("instance_id", sa.Uuid(), nullable=True),
        sa.Column(
            "payload", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("state", sa.String(length=16), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("lease_until", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("finished_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('pending', 'running', 'done', 'failed')", name=op.f("ck_work_items_state")),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_work_items_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name=op.f("fk_work_items_instance_id_whatsapp_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_work_items")),
    )
    pending, running = sa.text("state = 'pending'"), sa.text("state = 'running'")
    op.create_index("uq_work_items_pending_key", "work_items", ["kind", "key"], unique=True, postgresql_where=pending)
    op.create_index("uq_work_items_running_key", "work_items", ["kind", "key"], unique=True, postgresql_where=running)
    op.create_index("ix_work_items_due", "work_items", ["kind", "next_attempt_at", "id"], postgresql_where=pending)
    op.create_index("ix_work_items_lease", "work_items", ["kind", "lease_until"], postgresql_where=running)
    op.create_index(
        "ix_work_items_finished",
        "work_items",
        ["state", "finished_at"],
        postgresql_where=sa.text("state IN ('done', 'failed')"),
    )


def downgrade() -> None:
    op.drop_table("work_items")  # its indexes go with it
