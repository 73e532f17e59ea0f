"""What every flow does at its end: store its report for the API and dashboard, and show it in the Prefect UI."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

from prefect.artifacts import acreate_markdown_artifact
from prefect.runtime import flow_run

from db.engine import session_scope
from db.repositories.organizations import organization_exists
from db.repositories.reports import save_report


class FlowReportModel(Protocol):
    """The shape shared by the flows' pydantic reports."""

    flow_run_id: uuid.UUID | None
    started_at: datetime

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...

    def to_markdown(self) -> str: ...


async def store_report(
    flow_name: str,
    report: FlowReportModel,
    *,
    organization_id: uuid.UUID | None,
    artifact_key: str,
    description: str,
) -> None:
    """Save the report in `flow_reports` and, inside a flow run, as a markdown artifact."""
    async with session_scope() as session:
        await save_report(
            session,
            flow_name=flow_name,
            flow_run_id=report.flow_run_id,
            organization_id=organization_id,
            started_at=report.started_at,
            report=report.model_dump(mode="json"),
        )
    if report.flow_run_id is not None:
        await acreate_markdown_artifact(key=artifact_key, markdown=report.to_markdown(), description=description)


async def organization_known(organization_id: uuid.UUID) -> bool:
    """Whether an organization-scoped run names an organization that exists."""
    async with session_scope() as session:
        return await organization_exists(session, organization_id)


def current_flow_run_id() -> uuid.UUID | None:
    """The running flow run's id, or None outside Prefect."""
    run_id = flow_run.get_id()
    return uuid.UUID(run_id) if run_id else None


def late_by(limit_seconds: int | None) -> float | None:
    """Seconds a scheduled run started past its slot, when that exceeds ``limit_seconds``."""
    scheduled = flow_run.get_scheduled_start_time() if limit_seconds else None
    if scheduled is None or limit_seconds is None:
        return None
    lateness = (datetime.now(UTC) - scheduled).total_seconds()
    return lateness if lateness > limit_seconds else None
