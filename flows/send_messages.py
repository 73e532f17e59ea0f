"""Flow `send-messages`: drain the send queue (the outbox) through the instances' gateways.

The API writes each message ``pending`` with its queue item (kind ``send``, key = the message id). A drain run claims
only the head of each instance's line (``work_queue.claim_line_heads``: claims serialized by an advisory lock, so
two drains never send one instance's messages out of order or twice), so per instance the messages go one after
another, in order, at least ``send_min_interval_seconds`` apart, while up to ``send_max_concurrency`` instances are
served at once. A message that waits for its retry (backoff, or the grace period of an unknown outcome) holds its
instance's line. What happens to each message is :func:`tasks.send.send_item`.

In-process entry point (tests, the benchmark): :func:`send_queued_now`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from prefect import flow
from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import WorkKind
from core.names import SEND_FLOW
from core.reports import DrainReport
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.work_queue import ClaimedItem, ItemState, claim_line_heads, seconds_to_next_head
from flows.drain import DrainLimits, Handled, drain
from flows.guard import Reporting, current_flow_run_id, guarded
from flows.runs import wait_for_item
from gateways.base import Gateway
from gateways.registry import open_gateways
from tasks.send import SendPolicy, send_item

LINGER_SECONDS = 2.0
"""A drain whose remaining messages come due within this long (plus the pacing interval) waits for them rather
than ending (pacing would otherwise end it after every instance's first message)."""


def _drain_summary(r: DrainReport) -> str:
    return (
        f"drain: {r.claimed} claimed, {r.done} sent, {r.retried} to retry, {r.failed} failed, "
        f"{r.superseded} superseded, {r.lease_lost} lost their lease"
    )


DRAIN = Reporting(SEND_FLOW, "SEND", "zapsync.sends", "send-messages-drain", "Send queue", _drain_summary)


@flow(name=SEND_FLOW, flow_run_name="send-messages", retries=0, log_prints=False)
async def send_messages(budget_seconds: float | None = None) -> DrainReport:
    """Send the queued messages until none is due soon (or ``budget_seconds`` passed), several instances at once.

    Not retried as a whole: a message the gateway did not take goes back to the queue with backoff; one whose
    outcome is unknown waits for its echo; a killed run's items come back when their lease expires.
    """
    settings = get_settings()
    report = DrainReport(kind=WorkKind.SEND, started_at=datetime.now(UTC), flow_run_id=current_flow_run_id())
    limits = DrainLimits(
        concurrency=settings.send_max_concurrency,
        lease_seconds=max(settings.queue_lease_seconds, settings.send_timeout_seconds * 2),
        max_attempts=settings.queue_max_attempts,
        retry_initial_seconds=settings.queue_retry_initial_seconds,
        retry_max_seconds=settings.queue_retry_max_seconds,
        budget_seconds=budget_seconds,
    )
    policy = SendPolicy(
        timeout_seconds=settings.send_timeout_seconds,
        unknown_grace_seconds=settings.send_unknown_grace_seconds,
        max_attempts=settings.queue_max_attempts,
    )
    gap = settings.send_min_interval_seconds
    async with guarded(report, DRAIN) as go:
        if go:
            async with open_gateways() as gateways:
                await _drain_lines(gateways, policy, limits, report, gap)
    return report


async def _drain_lines(
    gateways: Mapping[str, Gateway], policy: SendPolicy, limits: DrainLimits, report: DrainReport, gap: float
) -> None:
    """Drain until nothing is due within the linger time (or the budget is spent)."""
    begun = time.monotonic()

    async def claim(session: AsyncSession, limit: int, lease_seconds: float) -> list[ClaimedItem]:
        return await claim_line_heads(
            session, kind=WorkKind.SEND, limit=limit, lease_seconds=lease_seconds, min_gap_seconds=gap
        )

    handler = functools.partial(_send, gateways=gateways, policy=policy)
    while True:
        left = None if limits.budget_seconds is None else limits.budget_seconds - (time.monotonic() - begun)
        if left is not None and left <= 0:
            return
        await drain(WorkKind.SEND, handler, _with_budget(limits, left), report, claim=claim)
        async with session_scope() as session:
            wait = await seconds_to_next_head(session, kind=WorkKind.SEND, min_gap_seconds=gap)
        if wait is None or wait > LINGER_SECONDS + gap:
            return
        await asyncio.sleep(wait + 0.01)


def _with_budget(limits: DrainLimits, left: float | None) -> DrainLimits:
    if left is None:
        return limits
    return DrainLimits(
        concurrency=limits.concurrency,
        lease_seconds=limits.lease_seconds,
        max_attempts=limits.max_attempts,
        retry_initial_seconds=limits.retry_initial_seconds,
        retry_max_seconds=limits.retry_max_seconds,
        budget_seconds=left,
    )


async def _send(item: ClaimedItem, *, gateways: Mapping[str, Gateway], policy: SendPolicy) -> Handled:
    outcome = await send_item(item, gateways, policy)
    result = {"external_id": outcome.external_id} if outcome.external_id else None
    return Handled(result=result, summary=outcome.summary, error=outcome.error, retry_after=outcome.retry_after)


async def send_queued_now(work_item_ids: Sequence[int] = (), *, timeout_seconds: float = 600) -> list[ItemState]:
    """Drain the send queue in this process (a real `send-messages` flow run), then wait until the named items
    finished (a worker may hold some: then this waits for them). Returns their states, in order."""
    await send_messages()
    deadline = time.monotonic() + timeout_seconds
    states: list[ItemState] = []
    for item_id in work_item_ids:
        states.append(await wait_for_item(item_id, timeout=max(0.0, deadline - time.monotonic())))
    return states
