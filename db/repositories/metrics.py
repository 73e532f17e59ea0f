"""Aggregates the Prometheus endpoint reads at scrape time (flows run in other processes, so state is in the DB)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def instance_counts(session: AsyncSession) -> list[tuple[str, str, str, int]]:
    """(gateway, status, health, count) over all instances."""
    rows = await session.execute(
        text("SELECT gateway, status, health, count(*) FROM whatsapp_instances GROUP BY gateway, status, health")
    )
    return [(g, s, h, int(n)) for g, s, h, n in rows.all()]


async def latest_reports(session: AsyncSession) -> dict[str, dict[str, Any]]:
    """The newest stored report of each flow."""
    rows = await session.execute(
        text("SELECT DISTINCT ON (flow_name) flow_name, report FROM flow_reports ORDER BY flow_name, finished_at DESC")
    )
    return {row[0]: row[1] for row in rows}


async def import_totals(session: AsyncSession) -> dict[str, float]:
    """Messages and contacts written by imports, and the duration of the newest finished import."""
    row = (
        await session.execute(
            text("""
        SELECT COALESCE(sum((counts->>'messages_inserted')::bigint), 0),
               COALESCE(sum((counts->>'contacts_created')::bigint), 0),
               COALESCE(extract(epoch FROM (SELECT finished_at - started_at FROM import_runs
                                            WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1)), 0)
        FROM import_runs
    """)
        )
    ).one()
    return {"messages": float(row[0]), "contacts": float(row[1]), "last_seconds": float(row[2])}


async def closed_inactive_total(session: AsyncSession) -> int:
    """Conversations closed for inactivity, ever."""
    return int(
        (await session.execute(text("SELECT count(*) FROM conversations WHERE close_reason = 'inactive'"))).scalar_one()
    )
