"""conversations, messages, imports, live events, instance health

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:10:55.351191
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "live_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_live_events_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_live_events")),
    )
    op.create_index("ix_live_events_org_id", "live_events", ["organization_id", "id"], unique=False)
    op.create_table(
        "contacts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("jid", sa.String(length=128), nullable=False),
        sa.Column("alt_jid", sa.String(length=128), nullable=True),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("client_id", sa.Uuid(), nullable=True),
        sa.Column("is_group", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.id"], name=op.f("fk_contacts_client_id_clients"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name=op.f("fk_contacts_instance_id_whatsapp_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_contacts_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contacts")),
    )
    op.create_index("ix_contacts_instance_alt_jid", "contacts", ["instance_id", "alt_jid"], unique=False)
    op.create_index("ix_contacts_organization_phone", "contacts", ["organization_id", "phone"], unique=False)
    op.create_index("uq_contacts_instance_jid", "contacts", ["instance_id", "jid"], unique=True)
    op.create_table(
        "import_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("connection_key", sa.String(length=128), nullable=True),
        sa.Column("state", sa.String(length=16), server_default=sa.text("'running'"), nullable=False),
        sa.Column("started_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column(
            "cursor", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column(
            "counts", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("flow_run_id", sa.Uuid(), nullable=True),
        sa.CheckConstraint("state IN ('running', 'completed', 'failed')", name=op.f("ck_import_runs_state")),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name=op.f("fk_import_runs_instance_id_whatsapp_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_runs")),
    )
    op.create_index("ix_import_runs_instance_started", "import_runs", ["instance_id", "started_at"], unique=False)
    op.create_index(
        "uq_import_runs_one_running",
        "import_runs",
        ["instance_id"],
        unique=True,
        postgresql_where=sa.text("state = 'running'"),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'waiting'"), nullable=False),
        sa.Column("opened_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("last_message_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("waiting_since", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("closed_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("close_reason", sa.String(length=32), nullable=True),
        sa.Column("assignee_id", sa.String(length=128), nullable=True),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "tags", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status IN ('waiting', 'in_progress', 'closed', 'cancelled')", name=op.f("ck_conversations_status")
        ),
        sa.ForeignKeyConstraint(
            ["contact_id"], ["contacts.id"], name=op.f("fk_conversations_contact_id_contacts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name=op.f("fk_conversations_instance_id_whatsapp_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_conversations_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    op.create_index("ix_conversations_instance_updated", "conversations", ["instance_id", "updated_at"], unique=False)
    op.create_index(
        "ix_conversations_open_idle",
        "conversations",
        ["organization_id", "last_message_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('waiting', 'in_progress')"),
    )
    op.create_index(
        "ix_conversations_organization_updated", "conversations", ["organization_id", "updated_at"], unique=False
    )
    op.create_index(
        "uq_conversations_one_open_per_contact",
        "conversations",
        ["contact_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('waiting', 'in_progress')"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=True),
        sa.Column("from_me", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("sender", sa.String(length=8), nullable=False),
        sa.Column("type", sa.String(length=16), server_default=sa.text("'text'"), nullable=False),
        sa.Column("content", sa.String(), nullable=True),
        sa.Column("media_url", sa.String(), nullable=True),
        sa.Column("media_mime", sa.String(length=128), nullable=True),
        sa.Column("media_name", sa.String(), nullable=True),
        sa.Column("media_size", sa.BigInteger(), nullable=True),
        sa.Column("sent_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'sent'"), nullable=False),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("sender IN ('client', 'agent', 'system')", name=op.f("ck_messages_sender")),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'delivered', 'read', 'played', 'failed', 'deleted')",
            name=op.f("ck_messages_status"),
        ),
        sa.CheckConstraint(
            "type IN ('text', 'image', 'video', 'audio', 'document', 'sticker', 'location', 'contact', 'reaction', 'other')",
            name=op.f("ck_messages_type"),
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_messages_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["whatsapp_instances.id"],
            name=op.f("fk_messages_instance_id_whatsapp_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_messages_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
    )
    op.create_index("ix_messages_conversation_sent", "messages", ["conversation_id", "sent_at"], unique=False)
    op.create_index("uq_messages_instance_external", "messages", ["instance_id", "external_id"], unique=True)
    op.add_column(
        "whatsapp_instances", sa.Column("logged_out", sa.Boolean(), server_default=sa.text("false"), nullable=False)
    )
    op.add_column(
        "whatsapp_instances", sa.Column("last_health_check_at", postgresql.TIMESTAMP(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("whatsapp_instances", "last_health_check_at")
    op.drop_column("whatsapp_instances", "logged_out")
    op.drop_index("uq_messages_instance_external", table_name="messages")
    op.drop_index("ix_messages_conversation_sent", table_name="messages")
    op.drop_table("messages")
    op.drop_index(
        "uq_conversations_one_open_per_contact",
        table_name="conversations",
        postgresql_where=sa.text("status IN ('waiting', 'in_progress')"),
    )
    op.drop_index("ix_conversations_organization_updated", table_name="conversations")
    op.drop_index(
        "ix_conversations_open_idle",
        table_name="conversations",
        postgresql_where=sa.text("status IN ('waiting', 'in_progress')"),
    )
    op.drop_index("ix_conversations_instance_updated", table_name="conversations")
    op.drop_table("conversations")
    op.drop_index("uq_import_runs_one_running", table_name="import_runs", postgresql_where=sa.text("state = 'running'"))
    op.drop_index("ix_import_runs_instance_started", table_name="import_runs")
    op.drop_table("import_runs")
    op.drop_index("uq_contacts_instance_jid", table_name="contacts")
    op.drop_index("ix_contacts_organization_phone", table_name="contacts")
    op.drop_index("ix_contacts_instance_alt_jid", table_name="contacts")
    op.drop_table("contacts")
    op.drop_index("ix_live_events_org_id", table_name="live_events")
    op.drop_table("live_events")
