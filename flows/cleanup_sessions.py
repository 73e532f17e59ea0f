"""Flow `cleanup-sessions`: delete ended sessions past retention and prune the inboxes (DESIGN.md §5, seed 001).

Daily at 02:00 in the configured zone. Sessions: ended ones (never an instance's open session) whose last activity
is older than their organization's `session_retention_days`. Also the webhook inbox, the live-event log and flow
reports past their retention settings. Every delete is a batch in its own transaction; `dry_run` only counts.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from prefect import flow

from core.events import Kind, event
from core.logs import run_logger
from core.names import CLEANUP_FLOW
from core.reports import CleanupReport
from core.settings import get_settings
from db.locks import try_advisory_lock
from db.repositories.live_events import publish_quietly
from flows.guard import current_flow_run_id, late_by, organization_known, store_report
from tasks.maintenance import prune_sessions, prune_table


@flow(name=CLEANUP_FLOW, flow_run_name="cleanup-sessions dry_run={dry_run}", retries=1, retry_delay_seconds=30)
async def cleanup_sessions(
    organization_id: uuid.UUID | None = None,
    retention_days: int | None = None,
    dry_run: bool = False,
    late_after_seconds: int | None = None,
) -> CleanupReport:
    """Delete what is past retention (one organization, or all); ``dry_run`` reports counts and deletes nothing.

    ``retention_days`` overrides every organization's own session retention for this run.
    """
    settings = get_settings()
    log = run_logger("zapsync.cleanup")
    begun = time.perf_counter()
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
    known = organization_id is None or await organization_known(organization_id)
    if (lateness := late_by(late_after_seconds)) is not None:
        report.skipped = f"scheduled run started {lateness:.0f} s late; the next run covers it"
    elif not known:
        report.skipped = f"no organization {organization_id}"
    else:
        async with try_advisory_lock(f"cleanup_sessions:{organization_id or 'all'}") as acquired:
            if acquired:
                await run_cleanup(report, batch_size=settings.maintenance_batch_size)
            else:
                report.skipped = "another cleanup of this scope is running"
    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    d = report.deleted
    log.info(
        "[CLEANUP] %s sessions=%d webhook_events=%d live_events=%d flow_reports=%d batches=%d in %.2fs%s",
        "dry run, would delete" if dry_run else "deleted",
        d.sessions,
        d.webhook_events,
        d.live_events,
        d.flow_reports,
        report.batches,
        report.seconds,
        f" (skipped: {report.skipped})" if report.skipped else "",
    )
    await _publish(report, known=known)
    return report


async def run_cleanup(report: CleanupReport, *, batch_size: int) -> None:
    """Fill ``report``: sessions by retention group, then each pruned table."""
    now = report.started_at
    org, dry = report.organization_id, report.dry_run
    by_retention, batches = await prune_sessions(
        organization_id=org,
        override_days=report.retention_days,
        now=now,
        batch_size=batch_size,
        dry_run=dry,
    )
    report.sessions_by_retention = by_retention
    report.deleted.sessions = sum(by_retention.values())
    report.batches += batches
    for table, days in (
        ("webhook_events", report.webhook_retention_days),
        ("live_events", report.live_event_retention_days),
        ("flow_reports", report.report_retention_days),
    ):
        rows, batches = await prune_table(
            table,
            cutoff=now - timedelta(days=days),
            organization_id=org,
            batch_size=batch_size,
            dry_run=dry,
        )
        setattr(report.deleted, table, rows)
        report.batches += batches


async def _publish(report: CleanupReport, *, known: bool) -> None:
    """Store the report, show it in the Prefect UI, and tell an organization-scoped run's stream."""
    await store_report(
        CLEANUP_FLOW,
        report,
        organization_id=report.organization_id if known else None,
        artifact_key="cleanup-sessions-report",
        description="Cleanup report",
    )
    if report.organization_id is not None and known:
        await publish_quietly(
            [
                event(
                    report.organization_id,
                    Kind.FLOW_RESULT,
                    flow=CLEANUP_FLOW,
                    flow_run_id=report.flow_run_id,
                    dry_run=report.dry_run,
                    skipped=report.skipped,
                    deleted=report.deleted.model_dump(),
                )
            ]
        )
