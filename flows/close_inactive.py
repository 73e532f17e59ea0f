"""Flow `close-inactive-conversations`: close open conversations idle past their organization's limit (§5).

Hourly. Per organization: idle = open, no message for `inactivity_hours`, and — unless the organization sets
`close_waiting_conversations` — not waiting on an agent's reply (Chatwoot's `auto_resolve_ignore_waiting`,
peers.md §2.1). Candidates are read without locks, then closed in short transactions that lock the conversation
and its contact with SKIP LOCKED and repeat the idle predicate in the UPDATE: a message that lands in between, or
one a handler is writing right now (it holds the contact), keeps its conversation open; a message that comes after
waits for the transaction and then opens a new conversation. Each closed conversation records
`close_reason='inactive'`, `closed_at` and a system message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from prefect import flow

from core.batching import chunks
from core.events import Kind, event
from core.logs import run_logger
from core.names import CLOSE_FLOW
from core.policies.inactivity import closing_message
from core.reports import CloseInactiveReport, OrganizationClose
from core.settings import get_settings
from db.engine import session_scope
from db.locks import try_advisory_lock
from db.repositories.live_events import publish_quietly
from db.repositories.maintenance import ClosePolicy, organizations_closing
from flows.guard import current_flow_run_id, late_by, organization_known, store_report
from tasks.maintenance import (
    close_conversations,
    count_idle_conversations,
    count_waiting_conversations,
    select_idle_conversations,
)

BeforeUpdate = Callable[[Sequence[int]], Awaitable[None]]
"""Called with the candidate ids between selection and update (a test seam)."""


@flow(name=CLOSE_FLOW, flow_run_name="close-inactive dry_run={dry_run}", retries=1, retry_delay_seconds=30)
async def close_inactive_conversations(
    organization_id: uuid.UUID | None = None,
    dry_run: bool = False,
    late_after_seconds: int | None = None,
) -> CloseInactiveReport:
    """Close idle conversations of one organization (or all); ``dry_run`` counts them and closes nothing."""
    settings = get_settings()
    log = run_logger("zapsync.close_inactive")
    begun = time.perf_counter()
    report = CloseInactiveReport(
        dry_run=dry_run,
        organization_id=organization_id,
        started_at=datetime.now(UTC),
        flow_run_id=current_flow_run_id(),
    )
    known = organization_id is None or await organization_known(organization_id)
    if (lateness := late_by(late_after_seconds)) is not None:
        report.skipped = f"scheduled run started {lateness:.0f} s late; the next run covers it"
    elif not known:
        report.skipped = f"no organization {organization_id}"
    else:
        async with try_advisory_lock(f"close_inactive:{organization_id or 'all'}") as acquired:
            if acquired:
                await run_close(
                    report, batch_size=settings.maintenance_batch_size, concurrency=settings.close_inactive_concurrency
                )
            else:
                report.skipped = "another run of this scope is running"
    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    log.info(
        "[CLOSE] %s closed=%d idle=%d kept_waiting=%d raced=%d organizations=%d in %.2fs%s",
        "dry run" if dry_run else "apply",
        report.closed,
        report.idle,
        report.kept_waiting,
        report.raced,
        len(report.organizations),
        report.seconds,
        f" (skipped: {report.skipped})" if report.skipped else "",
    )
    await _publish(report, known=known)
    return report


async def run_close(report: CloseInactiveReport, *, batch_size: int, concurrency: int) -> None:
    """Fill ``report``, one organization after another."""
    now = report.started_at
    async with session_scope() as session:
        organizations = await organizations_closing(session, organization_id=report.organization_id)
    for org_id, hours, close_waiting in organizations:
        policy = ClosePolicy(
            organization_id=org_id,
            inactivity_hours=hours,
            close_waiting=close_waiting,
            cutoff=now - timedelta(hours=hours),
        )
        summary = await close_organization(
            policy, closed_at=now, dry_run=report.dry_run, batch_size=batch_size, concurrency=concurrency
        )
        report.organizations.append(summary)
        report.closed += summary.closed
        report.idle += summary.idle
        report.kept_waiting += summary.kept_waiting
        report.raced += summary.raced


async def close_organization(
    policy: ClosePolicy,
    *,
    closed_at: datetime,
    dry_run: bool,
    batch_size: int,
    concurrency: int = 1,
    as_tasks: bool = True,
    before_update: BeforeUpdate | None = None,
) -> OrganizationClose:
    """Count (dry run) or close one organization's idle conversations.

    Each round reads up to ``batch_size × concurrency`` candidates after the previous round's last one and closes
    them in ``concurrency`` parallel batches; rows that raced stay behind the keyset and wait for the next run.
    """
    count = count_idle_conversations if as_tasks else count_idle_conversations.fn
    count_waiting = count_waiting_conversations if as_tasks else count_waiting_conversations.fn
    begun = time.perf_counter()
    summary = OrganizationClose(
        organization_id=policy.organization_id,
        inactivity_hours=policy.inactivity_hours,
        close_waiting=policy.close_waiting,
        cutoff=policy.cutoff,
    )
    if dry_run:
        summary.idle, summary.kept_waiting = await count(policy)
    else:
        summary.kept_waiting, _ = await asyncio.gather(
            count_waiting(policy),
            _close_rounds(
                policy,
                summary,
                closed_at=closed_at,
                batch_size=batch_size,
                concurrency=concurrency,
                as_tasks=as_tasks,
                before_update=before_update,
            ),
        )
        summary.idle = summary.closed + summary.raced
    summary.seconds = round(time.perf_counter() - begun, 3)
    return summary


async def _close_rounds(
    policy: ClosePolicy,
    summary: OrganizationClose,
    *,
    closed_at: datetime,
    batch_size: int,
    concurrency: int,
    as_tasks: bool,
    before_update: BeforeUpdate | None,
) -> None:
    transaction_size = get_settings().close_transaction_size
    select = select_idle_conversations if as_tasks else select_idle_conversations.fn
    close = close_conversations if as_tasks else close_conversations.fn
    message = closing_message(policy.inactivity_hours)
    limit = batch_size * concurrency
    candidates = await select(policy, after=None, limit=limit)
    while candidates:
        # Closed in id order: rows written together sit together on disk and in the indexes (about twice as fast
        # as the selection's last-message order at a million conversations).
        ids = sorted(c.id for c in candidates)
        if before_update is not None:
            await before_update(ids)
        # The next round's candidates lie past this round's keyset: read them while this round closes.
        upcoming = (
            asyncio.ensure_future(select(policy, after=candidates[-1], limit=limit))
            if len(candidates) == limit
            else None
        )
        results = await asyncio.gather(
            *(
                close(policy, batch, closed_at=closed_at, message=message, transaction_size=transaction_size)
                for batch in chunks(ids, batch_size)
            )
        )
        closed = sum(len(r) for r in results)
        summary.closed += closed
        summary.raced += len(ids) - closed
        summary.batches += len(results)
        candidates = await upcoming if upcoming is not None else []


async def _publish(report: CloseInactiveReport, *, known: bool) -> None:
    """Store the report, show it in the Prefect UI, and tell each organization that had work done."""
    await store_report(
        CLOSE_FLOW,
        report,
        organization_id=report.organization_id if known else None,
        artifact_key="close-inactive-report",
        description="Inactive conversations report",
    )
    await publish_quietly(
        [
            event(
                o.organization_id,
                Kind.FLOW_RESULT,
                flow=CLOSE_FLOW,
                flow_run_id=report.flow_run_id,
                dry_run=report.dry_run,
                closed=o.closed,
                idle=o.idle,
                kept_waiting=o.kept_waiting,
                raced=o.raced,
            )
            for o in report.organizations
            if o.closed or o.raced or report.organization_id is not None
        ]
    )
