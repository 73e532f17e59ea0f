"""Flow `send-messages`: drain the send queue (the outbox) through the instances' gateways.

The API writes each message ``pending`` with its queue item (kind ``send``, key = the message id). A drain run claims
the RUN of each instance's line in one statement (``work_queue.claim_line_runs``: up to ``RUN_LENGTH`` consecutive due
items, none behind an item that is not due; claims serialized by an advisory lock, so two drains never send one
instance's messages out of order or twice), and works up to ``send_max_concurrency`` lines at once, each line's
messages one after another, in order, at least ``send_min_interval_seconds`` apart.

The database work is set-based: the lines' messages that are ready at the same moment form a wave — one statement
marks the wave attempted (committed before its HTTP calls), the calls go out concurrently, and one transaction records
the wave's accepted sends, announces their ``message.status`` events and completes their items. A wave is not
lock-step: a line whose call hangs (a timeout after the gateway took it) does not hold up the others' next waves.
The rare rest goes one message at a time, by the rules of :func:`tasks.send.send_item`: a message the gateway did
not take (backoff), one whose outcome is unknown (it waits for its echo, then the gateway's history), one refused
for good, one whose instance is not connected. A message that must wait holds its line: the rest of its run is
given back unsent (``work_queue.release_unsent``), so nothing overtakes it.

In-process entry point (tests, the benchmark): :func:`send_queued_now`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from prefect import flow

from core.domain import WorkKind
from core.errors import GatewayError, GatewayTransientError
from core.names import SEND_FLOW
from core.reports import DrainedItem, DrainReport
from core.settings import get_settings
from db.engine import KeptConnections, session_scope
from db.repositories.outbox import SendJob, Sent, load_send_jobs
from db.repositories.work_queue import (
    ClaimedItem,
    ItemState,
    claim_line_runs,
    extend_leases,
    release_unsent,
    seconds_to_next_head,
)
from flows.drain import DrainLimits, Handled, count_item, finish_in, finish_item
from flows.guard import Reporting, current_flow_run_id, guarded
from flows.runs import wait_for_item
from gateways.base import Gateway
from gateways.registry import open_gateways
from tasks.send import (
    LEASE_LOST,
    Recorded,
    SendOutcome,
    SendPolicy,
    ToMark,
    failed_send,
    fast_gateway,
    run_wave,
    send_item,
)

T = TypeVar("T")
R = TypeVar("R")

RUN_LENGTH = 25
"""Items of one line claimed together (its run); what the line does not get to is given back unsent."""
WAVES_IN_FLIGHT = 3
"""Wave transactions a drain runs at once (each holds a database connection)."""
POLL_SECONDS = 0.5
"""How often a drain with a free line looks for newly due lines at most (it also looks when a line ends)."""
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
    lines = _Lines(gateways, policy, limits, report, gap)
    heartbeat = asyncio.create_task(lines.keep_leases())
    try:
        while True:
            left = None if limits.budget_seconds is None else limits.budget_seconds - (time.monotonic() - begun)
            if left is not None and left <= 0:
                return
            await lines.drain(left)
            async with session_scope() as session:
                wait = await seconds_to_next_head(session, kind=WorkKind.SEND, min_gap_seconds=gap)
            if wait is None or wait > LINGER_SECONDS + gap:
                return
            await asyncio.sleep(wait + 0.01)
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        await lines.links.close()


class _GroupCommit(Generic[T, R]):
    """Calls ``flush`` once for all the entries submitted while it waited for one of ``parallel`` slots (or in the
    same turn of the event loop): coroutines that each submit one entry share one statement or transaction — a
    wave. A few waves may be in flight at once, so an entry rarely waits for a whole wave before its own starts."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], *, parallel: int = 1) -> None:
        self._flush = flush
        self._slots = asyncio.Semaphore(parallel)
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._collecting = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, entry: T) -> R:
        """Add ``entry`` to the next wave; its result (or the wave's exception)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((entry, future))
        if not self._collecting:
            self._collecting = True
            task = asyncio.create_task(self._collect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _collect(self) -> None:
        async with self._slots:
            await asyncio.sleep(0)  # whoever gets ready in this turn of the loop joins the wave
            wave, self._waiting = self._waiting, []
            self._collecting = False
            try:
                results = await self._flush([entry for entry, _ in wave])
            except Exception as exc:
                for _, future in wave:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(wave, results, strict=True):
                    if not future.done():
                        future.set_result(result)


_Worked = tuple[Handled | None, Exception | None]
"""How one message's work went: what the handler made of it, or the exception it raised."""


@dataclass(frozen=True, slots=True)
class _Carry:
    """A send the gateway accepted, to be recorded in the line's next wave."""

    item: ClaimedItem
    sent: Sent
    begun: float


@dataclass(frozen=True, slots=True)
class _Failed:
    """A marked message whose send raised, to be finished by :meth:`_Lines.failed`."""

    job: SendJob
    error: GatewayError
    begun: float


class _Lines:
    """One drain's lines: the runs it holds, its waves, and the heartbeat that keeps their leases."""

    def __init__(
        self,
        gateways: Mapping[str, Gateway],
        policy: SendPolicy,
        limits: DrainLimits,
        report: DrainReport,
        gap: float,
    ) -> None:
        self.gateways = gateways
        self.policy = policy
        self.limits = limits
        self.report = report
        self.gap = gap
        self.held: dict[int, ClaimedItem] = {}
        self.links = KeptConnections()
        self.waves = _GroupCommit(self._run_wave, parallel=WAVES_IN_FLIGHT)

    async def _run_wave(self, wave: list[tuple[Recorded | None, ToMark | None]]) -> list[tuple[bool, str | None]]:
        """:func:`tasks.send.run_wave` on a kept autocommit connection (one round trip)."""
        async with self.links.lend() as connection:
            return await run_wave(wave, connection=connection)

    async def drain(self, budget_seconds: float | None) -> None:
        """Claim runs while lines are free and work them, until nothing is due (or the budget is spent)."""
        begun = time.monotonic()
        running: set[asyncio.Task[None]] = set()

        def budget_left() -> bool:
            return budget_seconds is None or time.monotonic() - begun < budget_seconds

        while True:
            free = self.limits.concurrency - len(running)
            next_due: float | None = None
            if free > 0 and budget_left():
                async with session_scope() as session:
                    runs = await claim_line_runs(
                        session,
                        kind=WorkKind.SEND,
                        lines=free,
                        run_length=RUN_LENGTH,
                        lease_seconds=self.limits.lease_seconds,
                        min_gap_seconds=self.gap,
                    )
                    jobs = await load_send_jobs(session, [_message_id(item) for run in runs for item in run])
                    if len(runs) < free and running:
                        next_due = await seconds_to_next_head(session, kind=WorkKind.SEND, min_gap_seconds=self.gap)
                for run in runs:
                    self.held.update((item.id, item) for item in run)
                    running.add(asyncio.create_task(self.work_run(run, jobs)))
            if not running:
                return
            # With a free line, look for due lines again when the next comes due (a retry), at least every half second.
            slack = self.limits.concurrency - len(running) > 0 and budget_left()
            timeout = None if not slack else POLL_SECONDS if next_due is None else min(POLL_SECONDS, next_due + 0.02)
            done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            running -= done
            for task in done:
                task.result()

    async def work_run(self, run: list[ClaimedItem], jobs: Mapping[int, SendJob]) -> None:
        """Send a line's run in order, paced; give back the rest once one of its messages must wait. ``jobs``: the
        messages as read in the claim's transaction.

        Without pacing, the wave that records a send also marks the line's next message (one transaction per
        message and line); with pacing, the send is recorded first, then the line waits, then the next is marked.
        """
        carry: _Carry | None = None
        for index, item in enumerate(run):
            job = jobs.get(_message_id(item))
            gateway = fast_gateway(job, self.gateways)
            if carry is not None and (self.gap or gateway is None or job is None):
                stopped, _ = await self.step(carry, None)
                carry = None
                if stopped:
                    await self.release(run[index:])
                    return
            if index and self.gap:
                await asyncio.sleep(self.gap)
            begun = time.monotonic()
            outcome: _Carry | _Failed | DrainedItem | tuple[Handled | None, Exception | None]
            if gateway is None or job is None:  # the head as claimed (its read is fresh), or anything unusual
                outcome = await self.one(item, job if index == 0 else None)
            else:
                stopped, marked = await self.step(carry, (item, job))
                carry = None
                if stopped:
                    await self.release(run[index:])
                    return
                outcome = await self.fast(item, job, gateway, marked)
            if isinstance(outcome, _Carry):
                carry = outcome
                continue
            rest = run[index + 1 :]
            if isinstance(outcome, _Failed):
                ended = await self.failed(item, outcome, rest)
                self.count(ended)
                if ended.outcome not in ("done", "failed"):  # the rest went back with it
                    for later in rest:
                        self.held.pop(later.id, None)
                    return
                continue
            if isinstance(outcome, DrainedItem):
                ended = outcome
                self.count(ended)
                if ended.outcome not in ("done", "failed"):
                    await self.release(rest)
                    return
                continue
            handled, failure = outcome
            ended = await self.finish(item, handled, failure, begun, rest=rest)
            self.count(ended)
            if ended.outcome not in ("done", "failed"):  # the rest went back with it
                for later in rest:
                    self.held.pop(later.id, None)
                return
        if carry is not None:
            await self.step(carry, None)

    async def step(self, carry: _Carry | None, to_mark: ToMark | None) -> tuple[bool, str | None]:
        """The line's part of the next wave: record ``carry`` and/or mark ``to_mark``. Returns (stopped, the mark's
        answer); stopped when the wave failed (``carry`` goes back to the queue, ``to_mark`` was not marked)."""
        try:
            held, marked = await self.waves.submit((None if carry is None else (carry.item, carry.sent), to_mark))
        except Exception as exc:
            if carry is not None:
                self.count(await finish_item(carry.item, None, exc, self.limits, begun=carry.begun))
            return True, None
        if carry is not None:
            summary = f"message {carry.sent.job.message_id} sent as {carry.sent.external_id}"
            self.count(_ended(carry.item, carry.begun, outcome="done" if held else "lease_lost", summary=summary))
        return False, marked

    async def fast(
        self, item: ClaimedItem, job: SendJob, gateway: Gateway, marked: str | None
    ) -> _Carry | _Failed | DrainedItem | _Worked:
        """Send a marked message: an accepted send is carried to the next wave; anything else is to be finished."""
        if marked == LEASE_LOST:
            return _ended(item, time.monotonic(), outcome="lease_lost", error="another drain holds the item")
        if marked is None:  # something changed since the run was loaded: the one-message rules decide
            return await self.one(item, None)
        begun = time.monotonic()
        try:
            result = await gateway.send(job.instance_name, job.outgoing(), timeout_seconds=self.policy.timeout_seconds)
        except GatewayError as exc:
            return _Failed(job, exc, begun)
        return _Carry(item, Sent(job, result.external_id, result.status), begun)

    async def failed(self, item: ClaimedItem, failed: _Failed, rest: Sequence[ClaimedItem]) -> DrainedItem:
        """A send that raised: the message's outcome, the item's finish and (when it goes back to the queue) the rest
        of its run given back, in one transaction; should that transaction fail, the item is finished on its own."""
        try:
            async with session_scope() as session:
                try:
                    outcome = _handled(await failed_send(failed.job, item, self.policy, failed.error, session=session))
                    handled, failure = outcome, None
                except GatewayTransientError as raised:  # not taken: the queue's backoff
                    handled, failure = None, raised
                ended = await finish_in(session, item, handled, failure, self.limits, begun=failed.begun)
                if ended.outcome not in ("done", "failed") and rest:
                    await release_unsent(session, rest)
            return ended
        except Exception as exc:
            return await self.finish(item, None, exc, failed.begun, rest=rest)

    async def one(self, item: ClaimedItem, loaded: SendJob | None) -> _Worked:
        """One message by the one-message rules (:func:`tasks.send.send_item`)."""
        try:
            return _handled(await send_item(item, self.gateways, self.policy, loaded=loaded)), None
        except Exception as exc:
            return None, exc

    async def finish(
        self,
        item: ClaimedItem,
        handled: Handled | None,
        failure: Exception | None,
        begun: float,
        *,
        rest: Sequence[ClaimedItem],
    ) -> DrainedItem:
        """Finish the item; when it goes back to the queue, give back the rest of its run in the same transaction."""
        async with session_scope() as session:
            ended = await finish_in(session, item, handled, failure, self.limits, begun=begun)
            if ended.outcome not in ("done", "failed") and rest:
                await release_unsent(session, rest)
        return ended

    def count(self, ended: DrainedItem) -> None:
        """The item is no longer held; add its ending to the report."""
        self.held.pop(ended.item_id, None)
        self.report.claimed += 1  # the items given back unsent are not counted: a later claim works them
        count_item(self.report, ended)

    async def release(self, rest: Sequence[ClaimedItem]) -> None:
        """Give back a run's items that were not sent (a failure to do so only leaves them to their leases)."""
        for item in rest:
            self.held.pop(item.id, None)
        if rest:
            with contextlib.suppress(Exception):
                async with session_scope() as session:
                    await release_unsent(session, rest)

    async def keep_leases(self) -> None:
        """Extend the leases of every held item every third of the lease, in one statement."""
        while True:
            await asyncio.sleep(max(self.limits.lease_seconds / 3, 0.05))
            held = list(self.held.values())
            with contextlib.suppress(Exception):  # a missed heartbeat only shortens the leases; the next may land
                async with session_scope() as session:
                    await extend_leases(session, held, self.limits.lease_seconds)


def _message_id(item: ClaimedItem) -> int:
    return int(item.payload.get("message_id") or item.key)


def _ended(item: ClaimedItem, begun: float, **fields: Any) -> DrainedItem:
    return DrainedItem(
        item_id=item.id,
        key=item.key,
        instance_id=item.instance_id,
        attempt=item.attempts,
        seconds=round(time.monotonic() - begun, 3),
        **fields,
    )


def _handled(outcome: SendOutcome) -> Handled:
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
