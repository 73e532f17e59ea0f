"""Flow `cleanup-sessions`: delete ended sessions past retention and prune the inboxes (DESIGN.md §5, seed 001).

Daily at 02:00 in the configured zone. Sessions: ended ones (never an instance's open session) whose last activity
is older than their organization's `session_retention_days`. Also the webhook inbox, the live-event log and flow
reports past their retention settings. Every delete is a batch in its own transaction; `dry_run` only counts.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from prefect import flow
from pydantic import BaseModel

from core.events import Kind, event
from core.names import CLEANUP_FLOW
from core.reports import CleanupCounts, CleanupReport
from core.settings import get_settings
from db.repositories.live_events import publish_quietly
from db.repositories.maintenance import PrunableTable
from flows.guard import Reporting, current_flow_run_id, fill, guarded, unknown_organization
from tasks.maintenance import prune_sessions, prune_table


def _summary(r: CleanupReport) -> str:
    d = r.deleted
    return (
        f"{'dry run, would delete' if r.dry_run else 'deleted'} sessions={d.sessions} webhook_events="
        f"{d.webhook_events} live_events={d.live_events} flow_reports={d.flow_reports} work_items={d.work_items} "
        f"batches={r.batches}"
    )


CLEANUP = Reporting(CLEANUP_FLOW, "CLEANUP", "zapsync.cleanup", "cleanup-sessions-report", "Cleanup report", _summary)


@flow(name=CLEANUP_FLOW, flow_run_name="cleanup-sessions dry_run={dry_run}", retries=1, retry_delay_seconds=300)
async def cleanup_sessions(
    organization_id: uuid.UUID | None = None,
    retention_days: int | None = None,
    dry_run: bool = False,
    late_after_seconds: int | None = None,
) -> CleanupReport:
    """Delete what is past retention (one organization, or all); ``dry_run`` reports counts and deletes nothing.

    ``retention_days`` overrides every organization's own session retention for this run. Retried once after
    5 minutes: the schedule is daily, and a retry deletes only what is still past retention.
    """
    settings = get_settings()
    report = CleanupReport(
        dry_run=dry_run,
        organization_id=organization_id,
        retention_days=retention_days,
        webhook_retention_days=settings.webhook_retention_days,
        live_event_retention_days=settings.live_event_retention_days,
        report_retention_days=settings.report_retention_days,
        started_at=datetime.now(UTC),
        flow_run_id=current_flow_run_id(),
    )
    unknown = await unknown_organization(organization_id)
    async with guarded(
        report,
        CLEANUP,
        lock=f"cleanup_sessions:{organization_id or 'all'}",
        busy="another cleanup of this scope is running",
        late_after_seconds=late_after_seconds,
        skip=unknown,
        organization_id=None if unknown else organization_id,
    ) as go:
        if go:
            fill(report, await run_cleanup(organization_id, retention_days, dry_run=dry_run, now=report.started_at))
    if organization_id is not None and not unknown:
        await _announce(organization_id, report)
    return report


class CleanupResult(BaseModel):
    """What one cleanup deleted (or would delete)."""

    deleted: CleanupCounts
    sessions_by_retention: dict[int, int]
    batches: int


async def run_cleanup(
    organization_id: uuid.UUID | None, retention_days: int | None, *, dry_run: bool, now: datetime
) -> CleanupResult:
    """Sessions by retention group, then each pruned table past its retention as of ``now``; one task each."""
    settings = get_settings()
    org, dry, batch_size = organization_id, dry_run, settings.maintenance_batch_size
    by_retention, batches = await prune_sessions(
        organization_id=org, override_days=retention_days, now=now, batch_size=batch_size, dry_run=dry
    )
    deleted = CleanupCounts(sessions=sum(by_retention.values()))
    retention: dict[PrunableTable, int] = {
        "webhook_events": settings.webhook_retention_days,
        "live_events": settings.live_event_retention_days,
        "flow_reports": settings.report_retention_days,
        "work_items": settings.queue_retention_days,
    }
    for table, days in retention.items():
        rows, table_batches = await prune_table(
            table, cutoff=now - timedelta(days=days), organization_id=org, batch_size=batch_size, dry_run=dry
        )
        setattr(deleted, table, rows)
        batches += table_batches
    return CleanupResult(deleted=deleted, sessions_by_retention=by_retention, batches=batches)


async def _announce(organization_id: uuid.UUID, report: CleanupReport) -> None:
    """Tell an organization-scoped run's live stream what it did."""
    await publish_quietly(
        [
            event(
                organization_id,
                Kind.FLOW_RESULT,
                flow=CLEANUP_FLOW,
                flow_run_id=report.flow_run_id,
                dry_run=report.dry_run,
                skipped=report.skipped,
                deleted=report.deleted.model_dump(),
            )
        ]
    )
