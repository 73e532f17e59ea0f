"""Read models for the dashboard: instances with their last import, recent conversations."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def instances_overview(
    session: AsyncSession, organization_id: uuid.UUID | None, *, limit: int = 500
) -> list[dict[str, Any]]:
    """Instances the caller may see, with status, health, last check and last finished import."""
    rows = await session.execute(
        text("""
            SELECT i.id, i.instance_name, i.gateway, i.status, i.health, i.status_reason, i.phone_number,
                   i.profile_name, i.last_checked_at, i.status_observed_at, i.consecutive_failures, i.logged_out,
                   o.name AS organization, imp.finished_at AS last_import_at, imp.state AS last_import_state
            FROM whatsapp_instances i
            JOIN organizations o ON o.id = i.organization_id
            LEFT JOIN LATERAL (
                SELECT finished_at, state FROM import_runs r WHERE r.instance_id = i.id
                ORDER BY r.started_at DESC LIMIT 1
            ) imp ON TRUE
            WHERE CAST(:org AS uuid) IS NULL OR i.organization_id = :org
            ORDER BY o.name, i.instance_name
            LIMIT :limit
        """),
        {"org": organization_id, "limit": limit},
    )
    return [dict(r) for r in rows.mappings().all()]


async def status_counts(session: AsyncSession, organization_id: uuid.UUID | None) -> dict[str, int]:
    """How many instances are in each status."""
    rows = await session.execute(
        text(
            "SELECT status, count(*) FROM whatsapp_instances "
            "WHERE CAST(:org AS uuid) IS NULL OR organization_id = :org GROUP BY status"
        ),
        {"org": organization_id},
    )
    return {status: int(n) for status, n in rows.all()}


async def recent_conversations(
    session: AsyncSession, organization_id: uuid.UUID | None, *, limit: int = 10
) -> list[dict[str, Any]]:
    """The conversations with the newest messages."""
    rows = await session.execute(
        text("""
            SELECT c.id, c.status, c.last_message_at, c.waiting_since, ct.name AS contact_name,
                   ct.phone AS contact_phone, i.instance_name
            FROM conversations c
            JOIN contacts ct ON ct.id = c.contact_id
            JOIN whatsapp_instances i ON i.id = c.instance_id
            WHERE CAST(:org AS uuid) IS NULL OR c.organization_id = :org
            ORDER BY c.last_message_at DESC
            LIMIT :limit
        """),
        {"org": organization_id, "limit": limit},
    )
    return [dict(r) for r in rows.mappings().all()]
