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
from datetime import UTC, datetime, timedelta

from prefect import flow
from pydantic import BaseModel

from core.batching import chunks
from core.events import Kind, event
from core.names import CLOSE_FLOW
from core.policies.inactivity import closing_message
from core.reports import CloseInactiveReport, OrganizationClose
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.live_events import publish_quietly
from db.repositories.maintenance import ClosePolicy, organizations_closing
from flows.guard import Reporting, current_flow_run_id, fill, guarded, unknown_organization
from tasks.maintenance import (
    Opaque,
    close_conversations,
    count_idle_conversations,
    count_waiting_conversations,
    select_idle_conversations,
)


def _summary(r: CloseInactiveReport) -> str:
    return (
        f"{'dry run' if r.dry_run else 'apply'} closed={r.closed} idle={r.idle} kept_waiting={r.kept_waiting} "
        f"raced={r.raced} organizations={len(r.organizations)}"
    )


CLOSE = Reporting(
    CLOSE_FLOW, "CLOSE", "zapsync.close_inactive", "close-inactive-report", "Inactive conversations report", _summary
)


@flow(name=CLOSE_FLOW, flow_run_name="close-inactive dry_run={dry_run}", retries=0)
async def close_inactive_conversations(
    organization_id: uuid.UUID | None = None,
    dry_run: bool = False,
    late_after_seconds: int | None = None,
) -> CloseInactiveReport:
    """Close idle conversations of one organization (or all); ``dry_run`` counts them and closes nothing.

    Not retried as a whole: the next hourly run is the retry.
    """
    report = CloseInactiveReport(
        dry_run=dry_run,
        organization_id=organization_id,
        started_at=datetime.now(UTC),
        flow_run_id=current_flow_run_id(),
    )
    unknown = await unknown_organization(organization_id)
    async with guarded(
        report,
        CLOSE,
        lock=f"close_inactive:{organization_id or 'all'}",
        busy="another run of this scope is running",
        late_after_seconds=late_after_seconds,
        skip=unknown,
        organization_id=None if unknown else organization_id,
    ) as go:
        if go:
            fill(report, await run_close(organization_id, dry_run=dry_run, now=report.started_at))
    await _announce(report)
    return report


class CloseResult(BaseModel):
    """What one run closed (or, dry, found idle), in total and per organization."""

    closed: int
    idle: int
    kept_waiting: int
    raced: int
    organizations: list[OrganizationClose]


async def run_close(organization_id: uuid.UUID | None, *, dry_run: bool, now: datetime) -> CloseResult:
    """Close (or count) idle conversations as of ``now``, one organization after another."""
    settings = get_settings()
    async with session_scope() as session:
        closing = await organizations_closing(session, organization_id=organization_id)
    organizations = [
        await close_organization(
            ClosePolicy(
                organization_id=org, inactivity_hours=hours, close_waiting=waiting, cutoff=now - timedelta(hours=hours)
            ),
            closed_at=now,
            dry_run=dry_run,
            batch_size=settings.maintenance_batch_size,
            concurrency=settings.close_inactive_concurrency,
        )
        for org, hours, waiting in closing
    ]
    return CloseResult(
        closed=sum(o.closed for o in organizations),
        idle=sum(o.idle for o in organizations),
        kept_waiting=sum(o.kept_waiting for o in organizations),
        raced=sum(o.raced for o in organizations),
        organizations=organizations,
    )


async def close_organization(
    policy: ClosePolicy, *, closed_at: datetime, dry_run: bool, batch_size: int, concurrency: int = 1
) -> OrganizationClose:
    """Count (dry run) or close one organization's idle conversations; one task per query or batch."""
    begun = time.perf_counter()
    summary = OrganizationClose(
        organization_id=policy.organization_id,
        inactivity_hours=policy.inactivity_hours,
        close_waiting=policy.close_waiting,
        cutoff=policy.cutoff,
    )
    if dry_run:
        summary.idle, summary.kept_waiting = await count_idle_conversations(policy)
    else:
        summary.kept_waiting, (summary.closed, summary.raced, summary.batches) = await asyncio.gather(
            count_waiting_conversations(policy),
            _close_rounds(policy, closed_at=closed_at, batch_size=batch_size, concurrency=concurrency),
        )
        summary.idle = summary.closed + summary.raced
    summary.seconds = round(time.perf_counter() - begun, 3)
    return summary


ROUND_CANDIDATES = 100_000
"""Candidates read per round (at least ``batch_size × concurrency``): closed in id order, a round touches each page
of the table and its indexes once, so the bigger the round the fewer times a page is read, dirtied and logged."""


async def _close_rounds(
    policy: ClosePolicy, *, closed_at: datetime, batch_size: int, concurrency: int
) -> tuple[int, int, int]:
    """Close the idle conversations round by round; (closed, raced, batches).

    Each round reads up to ``max(ROUND_CANDIDATES, batch_size × concurrency)`` candidates after the previous round's
    last one (a keyset: rows that raced stay behind it and wait for the next run), sorts them by id and closes them in
    batches of ``batch_size``, ``concurrency`` at a time, in id order.
    """
    transaction_size = get_settings().close_transaction_size
    message = closing_message(policy.inactivity_hours)
    limit = max(ROUND_CANDIDATES, batch_size * concurrency)
    slots = asyncio.Semaphore(concurrency)
    closed = raced = batches = 0

    async def close_batch(batch: list[int]) -> int:
        async with slots:
            done = await close_conversations(
                policy, Opaque(batch), closed_at=closed_at, message=message, transaction_size=transaction_size
            )
        return len(done.value)

    candidates = (await select_idle_conversations(policy, after=None, limit=limit)).value
    while candidates:
        # Closed in id order: rows written together sit together on disk and in the indexes, so each heap and index
        # page is read, locked and WAL-logged (its full-page image after a checkpoint) once per round instead of
        # once per batch — the candidates' last-message order scatters every batch over the whole table.
        ids = sorted(c.id for c in candidates)
        # The next round's candidates lie past this round's keyset: read them while this round closes.
        upcoming = (
            asyncio.ensure_future(select_idle_conversations(policy, after=candidates[-1], limit=limit))
            if len(candidates) == limit
            else None
        )
        results = await asyncio.gather(*(close_batch(list(batch)) for batch in chunks(ids, batch_size)))
        done = sum(results)
        closed, raced, batches = closed + done, raced + len(ids) - done, batches + len(results)
        candidates = (await upcoming).value if upcoming is not None else []
    return closed, raced, batches


async def _announce(report: CloseInactiveReport) -> None:
    """Tell each organization that had work done (or that this run was scoped to) what the run did."""
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
