"""Flow reports: written by flows, read by the API and dashboard."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import FlowReport


async def save_report(
    session: AsyncSession,
    *,
    flow_name: str,
    flow_run_id: uuid.UUID | None,
    organization_id: uuid.UUID | None,
    started_at: datetime,
    report: dict[str, Any],
) -> None:
    """Store (or replace, on a retried run) the report of one flow run."""
    statement = insert(FlowReport).values(
        flow_name=flow_name,
        flow_run_id=flow_run_id,
        organization_id=organization_id,
        started_at=started_at,
        report=report,
    )
    if flow_run_id is not None:
        statement = statement.on_conflict_do_update(
            index_elements=["flow_run_id"], set_={"report": statement.excluded.report, "finished_at": text("now()")}
        )
    await session.execute(statement)


async def report_for_run(session: AsyncSession, flow_run_id: uuid.UUID) -> dict[str, Any] | None:
    """The report a flow run stored, if it finished."""
    row = await session.execute(text("SELECT report FROM flow_reports WHERE flow_run_id = :id"), {"id": flow_run_id})
    return row.scalar_one_or_none()


async def latest_report(
    session: AsyncSession, flow_name: str, organization_id: uuid.UUID | None = None
) -> dict[str, Any] | None:
    """The newest report of a flow (for an organization, or global runs when None)."""
    row = await session.execute(
        text(
            "SELECT report FROM flow_reports WHERE flow_name = :flow "
            "AND (CAST(:org AS uuid) IS NULL OR organization_id = :org OR organization_id IS NULL) "
            "ORDER BY finished_at DESC LIMIT 1"
        ),
        {"flow": flow_name, "org": organization_id},
    )
    return row.scalar_one_or_none()
