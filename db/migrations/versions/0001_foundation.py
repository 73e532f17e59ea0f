"""foundation: organizations, instances, status history, sessions, webhook inbox, tokens

Revision ID: 0001
Revises:
Create Date: 2026-11-23 17:59:10.833442
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("webhook_secret_hash", sa.String(length=64), nullable=True),
        sa.Column("inactivity_hours", sa.Integer(), server_default=sa.text("24"), nullable=False),
        sa.Column("session_retention_days", sa.Integer(), server_default=sa.text("30"), nullable=False),
        sa.Column("import_history_days", sa.Integer(), nullable=True),
        sa.Column("auto_reconnect", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("close_waiting_conversations", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=True),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.String()), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_used_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("revoked_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_api_tokens_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_organization_id"), "api_tokens", ["organization_id"], unique=False)
    op.create_table(
        "clients",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_clients_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
    )
    op.create_index("ix_clients_organization_phone", "clients", ["organization_id", "phone"], unique=False)
    op.create_table(
        "flow_reports",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("flow_run_id", sa.Uuid(), nullable=True),
        sa.Column("flow_name", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=True),
        sa.Column("started_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("finished_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("report", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_flow_reports_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flow_reports")),
        sa.UniqueConstraint("flow_run_id", name=op.f("uq_flow_reports_flow_run_id")),
    )
    op.create_index("ix_flow_reports_flow_finished", "flow_reports", ["flow_name", "finished_at"], unique=False)
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("instance_name", sa.String(length=255), nullable=True),
        sa.Column("dedupe_key", sa.String(length=128), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_webhook_events_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_webhook_events_dedupe_key")),
    )
    op.create_index(
        "ix_webhook_events_org_received", "webhook_events", ["organization_id", "received_at"], unique=False
    )
    op.create_table(
        "whatsapp_instances",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("gateway", sa.String(length=64), nullable=False),
        sa.Column("instance_name", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'disconnected'"), nullable=False),
        sa.Column("is_connected", sa.Boolean(), sa.Computed("status = 'connected'", persisted=True), nullable=False),
        sa.Column("phone_number", sa.String(length=32), nullable=True),
        sa.Column("profile_name", sa.String(), nullable=True),
        sa.Column("qr_code", sa.String(), nullable=True),
        sa.Column("status_reason", sa.String(), nullable=True),
        sa.Column("status_observed_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_checked_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("live_confirmed_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("health", sa.String(length=16), server_default=sa.text("'unknown'"), nullable=False),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "health IN ('unknown', 'healthy', 'unhealthy', 'disconnected', 'error')",
            name=op.f("ck_whatsapp_instances_health"),
        ),
        sa.CheckConstraint(
            "status IN ('connected', 'connecting', 'qr_pending', 'disconnected', 'error')",
            name=op.f("ck_whatsapp_instances_status"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_whatsapp_instances_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_whatsapp_instances")),
        sa.UniqueConstraint("user_id", name=op.f("uq_whatsapp_instances_user_id")),
    )
    # Room on each page for HOT updates: every sync rewrites last_checked_at of every row.
    op.execute("ALTER TABLE whatsapp_instances SET (fillfactor = 70)")
    op.create_index(
        op.f("ix_whatsapp_instances_organization_id"), "whatsapp_instances", ["organization_id"], unique=False
    )
    op.create_index(
        "uq_whatsapp_instances_gateway_name", "whatsapp_instances", ["gateway", "instance_name"], unique=True
    )
    op.create_table(
        "instance_status_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("from_status", sa.String(length=16), nullable=True),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("observed_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("recorded_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("flow_run_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name=op.f("fk_instance_status_changes_instance_id_whatsapp_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_instance_status_changes_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_status_changes")),
    )
    op.create_index(
        "ix_instance_status_changes_instance_recorded",
        "instance_status_changes",
        ["instance_id", "recorded_at"],
        unique=False,
    )
    op.create_index(
        "ix_instance_status_changes_org_recorded",
        "instance_status_changes",
        ["organization_id", "recorded_at"],
        unique=False,
    )
    op.create_table(
        "whatsapp_sessions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'active'"), nullable=False),
        sa.Column("connected_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("disconnected_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_activity_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name=op.f("fk_whatsapp_sessions_instance_id_whatsapp_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_whatsapp_sessions")),
    )
    op.create_index("ix_whatsapp_sessions_last_activity", "whatsapp_sessions", ["last_activity_at"], unique=False)
    op.create_index(
        "uq_whatsapp_sessions_one_open",
        "whatsapp_sessions",
        ["instance_id"],
        unique=True,
        postgresql_where=sa.text("disconnected_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_whatsapp_sessions_one_open",
        table_name="whatsapp_sessions",
        postgresql_where=sa.text("disconnected_at IS NULL"),
    )
    op.drop_index("ix_whatsapp_sessions_last_activity", table_name="whatsapp_sessions")
    op.drop_table("whatsapp_sessions")
    op.drop_index("ix_instance_status_changes_org_recorded", table_name="instance_status_changes")
    op.drop_index("ix_instance_status_changes_instance_recorded", table_name="instance_status_changes")
    op.drop_table("instance_status_changes")
    op.drop_index("uq_whatsapp_instances_gateway_name", table_name="whatsapp_instances")
    op.drop_index(op.f("ix_whatsapp_instances_organization_id"), table_name="whatsapp_instances")
    op.drop_table("whatsapp_instances")
    op.drop_index("ix_webhook_events_org_received", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_index("ix_flow_reports_flow_finished", table_name="flow_reports")
    op.drop_table("flow_reports")
    op.drop_index("ix_clients_organization_phone", table_name="clients")
    op.drop_table("clients")
    op.drop_index(op.f("ix_api_tokens_organization_id"), table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("organizations")
