"""The frame every flow runs in: skip a late scheduled run, hold the scope's lock, time the run, log one summary line,
store the report for the API and dashboard, and show it in the Prefect UI.

A flow body then reads as a short script::

    report = CleanupReport(...)
    async with guarded(report, CLEANUP, lock="cleanup_sessions:all", busy="another cleanup ...") as go:
        if go:
            fill(report, await run_cleanup(...))
    return report
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from prefect.artifacts import acreate_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from core.logs import run_logger
from db.engine import session_scope
from db.locks import try_advisory_lock
from db.repositories.organizations import organization_exists
from db.repositories.reports import save_report


class FlowReportModel(Protocol):
    """The shape shared by the flows' pydantic reports."""

    flow_run_id: uuid.UUID | None
    started_at: datetime
    finished_at: datetime | None
    seconds: float
    skipped: str | None

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...

    def to_markdown(self) -> str: ...


R = TypeVar("R", bound=FlowReportModel)


@dataclass(frozen=True, slots=True)
class Reporting(Generic[R]):
    """Where one flow's report goes and how its summary line reads."""

    flow_name: str
    tag: str
    """The log tag of the seeds, without brackets: ``SYNC`` logs ``[SYNC] ...``."""
    logger: str
    """The logger used outside a Prefect run."""
    artifact_key: str
    description: str
    summary: Callable[[R], str]
    """The summary line's counts; the guard adds the tag, the duration and why the run skipped."""


@asynccontextmanager
async def guarded(
    report: R,
    reporting: Reporting[R],
    *,
    lock: str | None = None,
    busy: str = "",
    late_after_seconds: int | None = None,
    skip: str | None = None,
    organization_id: uuid.UUID | None = None,
) -> AsyncIterator[bool]:
    """Run the block as the flow's work, yielding whether it should do anything.

    It yields False, with ``report.skipped`` saying why, for a scheduled run that started more than
    ``late_after_seconds`` late (a pile-up after downtime: the next run covers it), when ``skip`` names a reason
    found by the flow, or when another run holds the advisory lock ``lock`` (then ``busy`` is the reason; no lock
    is taken when ``lock`` is None). The
    lock is held while the block runs. After the block: the run's duration, one ``[TAG]`` log line, and the report
    stored under ``organization_id`` and shown as a markdown artifact. A block that raises stores nothing.
    """
    begun = time.perf_counter()
    if (lateness := late_by(late_after_seconds)) is not None:
        report.skipped = f"scheduled run started {lateness:.0f} s late; the next run covers it"
    elif skip is not None:
        report.skipped = skip
    if report.skipped is not None:
        yield False
    elif lock is None:
        yield True
    else:
        async with try_advisory_lock(lock) as acquired:
            if not acquired:
                report.skipped = busy
            yield acquired
    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    run_logger(reporting.logger).info(
        "[%s] %s in %.2fs%s",
        reporting.tag,
        reporting.summary(report),
        report.seconds,
        f" (skipped: {report.skipped})" if report.skipped else "",
    )
    await store_report(
        reporting.flow_name,
        report,
        organization_id=organization_id,
        artifact_key=reporting.artifact_key,
        description=reporting.description,
    )


def fill(report: BaseModel, result: BaseModel) -> None:
    """Put a work function's result into the report: each field set on the result, by name."""
    for name in result.model_fields_set:
        setattr(report, name, getattr(result, name))


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


async def unknown_organization(organization_id: uuid.UUID | None) -> str | None:
    """Why an organization-scoped run skips (its organization does not exist); None when it exists or for all."""
    if organization_id is None:
        return None
    async with session_scope() as session:
        known = await organization_exists(session, organization_id)
    return None if known else f"no organization {organization_id}"


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
