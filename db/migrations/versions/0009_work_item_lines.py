"""work item lines: the indexes the per-instance line queries of the send queue use (each line's head and run, and
when its last item finished)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25 19:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_work_items_line",
        "work_items",
        ["kind", "instance_id", "id"],
        postgresql_where=sa.text("state IN ('pending', 'running')"),
    )
    op.create_index(
        "ix_work_items_line_finished",
        "work_items",
        ["kind", "instance_id", "finished_at"],
        postgresql_where=sa.text("state IN ('done', 'failed')"),
    )


def downgrade() -> None:
    op.drop_index("ix_work_items_line_finished", table_name="work_items")
    op.drop_index("ix_work_items_line", table_name="work_items")
