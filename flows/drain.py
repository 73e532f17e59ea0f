"""Working through the queue of one kind: claim under a lease, work with bounded concurrency, finish each item.

A drain claims as many items as it has free slots, starts each with the kind's handler, and claims again whenever a
slot frees, until nothing is due (or its time budget is spent). While an item is worked its lease is extended; an
item whose lease was lost (the process stalled past it and another drain took it over) cannot be finished by this one.
A handler's transient failure puts the item back with backoff, until it has used its attempts; any other failure is
final, with its reason. Each claim and each finish is a short transaction of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.policies.backoff import retry_delay, should_give_up
from core.reports import REPORT_LIST_CAP, DrainedItem, DrainReport
from db.engine import session_scope
from db.repositories import work_queue as queue
from db.repositories.work_queue import ClaimedItem
from tasks.options import is_transient


@dataclass(frozen=True, slots=True)
class Handled:
    """What a handler made of one item: its result to keep, a one-line summary, and whether it failed for good."""

    result: dict[str, Any] | None = None
    summary: str | None = None
    error: str | None = None
    """Set when the work failed for a reason a retry cannot cure (the item ends `failed`)."""
    retry_after: float | None = None
    """Set when the item must be tried again after this many seconds (whatever its attempts so far): it goes back to
    the queue with ``error`` as its last error (a send whose outcome is unknown waits for the gateway's echo)."""


Handler = Callable[[ClaimedItem], Awaitable[Handled]]
Claimer = Callable[[AsyncSession, int, float], Awaitable[list[ClaimedItem]]]
"""Leases up to ``limit`` items for ``lease_seconds`` in the given session (default: ``work_queue.claim``)."""


@dataclass(frozen=True, slots=True)
class DrainLimits:
    """How hard one drain works."""

    concurrency: int
    lease_seconds: float
    max_attempts: int
    retry_initial_seconds: float
    retry_max_seconds: float
    budget_seconds: float | None = None
    """Stop claiming after this long (the next drain goes on); None: until nothing is due."""


async def drain(
    kind: str, handler: Handler, limits: DrainLimits, report: DrainReport, *, claim: Claimer | None = None
) -> None:
    """Work through the due items of ``kind``; every item's ending is added to ``report``. ``claim`` replaces the
    queue's own claim (sends claim only the head of each instance's line)."""
    begun = time.monotonic()
    running: dict[asyncio.Task[DrainedItem], ClaimedItem] = {}

    def budget_left() -> bool:
        return limits.budget_seconds is None or time.monotonic() - begun < limits.budget_seconds

    while True:
        free = limits.concurrency - len(running)
        claimed: list[ClaimedItem] = []
        if free > 0 and budget_left():
            async with session_scope() as session:
                if claim is None:
                    claimed = await queue.claim(session, kind=kind, limit=free, lease_seconds=limits.lease_seconds)
                else:
                    claimed = await claim(session, free, limits.lease_seconds)
            report.claimed += len(claimed)
            for item in claimed:
                running[asyncio.create_task(_work(item, handler, limits))] = item
        if not running:
            return
        # With a free slot, look for new items every half second (they arrive while others are worked).
        slack = limits.concurrency - len(running) > 0 and budget_left()
        done, _ = await asyncio.wait(running, timeout=0.5 if slack else None, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            running.pop(task)
            count_item(report, task.result())


def count_item(report: DrainReport, item: DrainedItem) -> None:
    """Add one item's ending to the report."""
    match item.outcome:
        case "done":
            report.done += 1
        case "retry":
            report.retried += 1
        case "failed":
            report.failed += 1
        case "superseded":
            report.superseded += 1
        case "lease_lost":
            report.lease_lost += 1
    if len(report.items) < REPORT_LIST_CAP:
        report.items.append(item)


async def _work(item: ClaimedItem, handler: Handler, limits: DrainLimits) -> DrainedItem:
    """Run the handler under a kept-alive lease and finish the item according to how it went."""
    begun = time.monotonic()
    heartbeat = asyncio.create_task(_keep_lease(item, limits.lease_seconds))
    handled: Handled | None = None
    failure: BaseException | None = None
    try:
        handled = await handler(item)
    except Exception as exc:
        failure = exc
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    return await finish_item(item, handled, failure, limits, begun=begun)


async def finish_item(
    item: ClaimedItem, handled: Handled | None, failure: BaseException | None, limits: DrainLimits, *, begun: float
) -> DrainedItem:
    """Finish one item in a transaction of its own according to how its work went (``handled``, or the exception
    it raised): done, back to the queue (an asked-for retry, or a transient failure with backoff), or failed."""
    async with session_scope() as session:
        return await finish_in(session, item, handled, failure, limits, begun=begun)


async def finish_in(
    session: AsyncSession,
    item: ClaimedItem,
    handled: Handled | None,
    failure: BaseException | None,
    limits: DrainLimits,
    *,
    begun: float,
) -> DrainedItem:
    """:func:`finish_item` in the caller's transaction."""
    ended = functools.partial(
        DrainedItem,
        item_id=item.id,
        key=item.key,
        instance_id=item.instance_id,
        attempt=item.attempts,
        seconds=round(time.monotonic() - begun, 3),
    )
    if handled is not None and handled.retry_after is not None:
        error = handled.error or "to be tried again"
        state = await queue.retry_later(
            session, item.id, item.lease_token, error=error, delay_seconds=handled.retry_after
        )
        match state:
            case "pending":
                return ended(outcome="retry", error=error, summary=handled.summary)
            case "done":
                return ended(outcome="superseded", error=error, summary=handled.summary)
            case _:
                return ended(outcome="lease_lost", error=error, summary=handled.summary)
    if handled is not None and handled.error is None:
        held = await queue.complete(session, item.id, item.lease_token, result=handled.result)
        return ended(outcome="done" if held else "lease_lost", summary=handled.summary)
    error = handled.error if handled is not None and handled.error is not None else _describe(failure)
    result = handled.result if handled is not None else None
    if failure is not None and is_transient(failure) and not should_give_up(item.attempts, limits.max_attempts):
        delay = retry_delay(item.attempts, initial=limits.retry_initial_seconds, cap=limits.retry_max_seconds)
        state = await queue.retry_later(session, item.id, item.lease_token, error=error, delay_seconds=delay)
        match state:
            case "pending":
                return ended(outcome="retry", error=error)
            case "done":  # a newer request superseded the item meanwhile
                return ended(outcome="superseded", error=error)
            case _:  # None: another drain holds the item now
                return ended(outcome="lease_lost", error=error)
    if failure is not None and is_transient(failure):
        error = f"gave up after {item.attempts} attempts: {error}"
    held = await queue.fail(session, item.id, item.lease_token, error=error, result=result)
    return ended(outcome="failed" if held else "lease_lost", error=error)


async def _keep_lease(item: ClaimedItem, lease_seconds: float) -> None:
    """Extend the item's lease every third of it while the work goes on."""
    while True:
        await asyncio.sleep(max(lease_seconds / 3, 0.05))
        with contextlib.suppress(Exception):  # a missed heartbeat only shortens the lease; the next one may land
            async with session_scope() as session:
                if not await queue.extend_lease(session, item.id, item.lease_token, lease_seconds):
                    return


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, ExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    message = getattr(error, "message", None) or str(error)
    return f"{type(error).__name__}: {message}"[:2000]
