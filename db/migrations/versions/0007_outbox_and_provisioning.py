"""outbox and provisioning: sends keep their message row (client id, attempt, error, `unknown` outcome); an
organization's webhook secret is also kept sealed, so zapsync can write it into the gateways it provisions

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 19:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_OLD = "'pending', 'sent', 'delivered', 'read', 'played', 'failed', 'deleted'"
_NEW = "'pending', 'unknown', 'sent', 'delivered', 'read', 'played', 'failed', 'deleted'"


def upgrade() -> None:
    op.drop_constraint("status", "messages", type_="check")
    op.create_check_constraint("status", "messages", f"status IN ({_NEW})")
    op.add_column("messages", sa.Column("client_id", sa.String(length=128), nullable=True))
    op.add_column("messages", sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("messages", sa.Column("error", sa.Text(), nullable=True))
    op.create_index(
        "uq_messages_instance_client",
        "messages",
        ["instance_id", "client_id"],
        unique=True,
        postgresql_where=sa.text("client_id IS NOT NULL"),
    )
    op.add_column("organizations", sa.Column("webhook_secret_sealed", sa.Text(), nullable=True))
    op.add_column("whatsapp_instances", sa.Column("pairing_code", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("whatsapp_instances", "pairing_code")
    op.drop_column("organizations", "webhook_secret_sealed")
    op.drop_index("uq_messages_instance_client", table_name="messages")
    op.drop_column("messages", "error")
    op.drop_column("messages", "attempted_at")
    op.drop_column("messages", "client_id")
    op.execute("UPDATE messages SET status = 'pending' WHERE status = 'unknown'")
    op.drop_constraint("status", "messages", type_="check")
    op.create_check_constraint("status", "messages", f"status IN ({_OLD})")
