"""The warm queue worker (`zapsync worker`, and part of `zapsync up`): drains the work queue without a new interpreter.

It LISTENs for the NOTIFY every enqueue sends on commit, and polls as a safety net (a retry coming due, a lease that
expired). When a kind has due work and no drain of that kind is running here, it starts the kind's drain flow in this
process (:mod:`flows.local_runs`): a tracked Prefect flow run, visible in the UI, that claims items until none is left.
A drain already running claims new items itself, so a storm of N events makes a handful of runs, not N.

Any number of workers, on any number of machines, share the queue: claims skip locked rows and lease what they take.
PostgreSQL is the source of truth; Prefect the executor. When Prefect cannot be reached a drain cannot start: the items
wait in the queue and the worker tries again with backoff, so nothing is lost and nobody needs to resend anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prefect import Flow
from sqlalchemy.exc import SQLAlchemyError

from core.errors import DatabaseUnavailable
from db.engine import session_scope
from db.repositories.live_events import listener_conninfo, listening
from db.repositories.work_queue import WORK_CHANNEL, due_kinds, due_line_kinds
from flows.import_conversations import import_conversations
from flows.local_runs import LocalRun, start_local_run
from flows.send_messages import send_messages

log = logging.getLogger("zapsync.worker")

LINE_KINDS = frozenset({"send"})
"""Kinds whose items are claimed only at the head of each instance's line (see ``work_queue.claim_line_runs``)."""


@dataclass(slots=True)
class _Drains:
    """Per kind: the drain running here, and when a failed start may be tried again."""

    running: dict[str, LocalRun] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)

    def idle(self, kind: str, now: float) -> bool:
        run = self.running.get(kind)
        return (run is None or run.task.done()) and now >= self.retry_at.get(kind, 0.0)

    def finished(self, kind: str, run: LocalRun, now: float) -> None:
        """Note how a drain ended: a failure delays the next start (1, 2, 4 … 30 s)."""
        failed = not run.task.cancelled() and run.task.exception() is not None
        if failed:
            self.failures[kind] = self.failures.get(kind, 0) + 1
            self.retry_at[kind] = now + min(30.0, 2.0 ** (self.failures[kind] - 1))
        else:
            self.failures.pop(kind, None)
            self.retry_at.pop(kind, None)


async def run_worker(drains: Mapping[str, Flow[..., Any]], *, stop: asyncio.Event, poll_seconds: float = 5.0) -> None:
    """Drain ``drains`` (kind → drain flow) until ``stop`` is set; then let running drains finish."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    wake.set()
    state = _Drains()

    def drain_ended(kind: str, run: LocalRun, _task: asyncio.Task[Any]) -> None:
        state.finished(kind, run, loop.time())
        wake.set()

    listener = loop.create_task(_listen(wake, stop))
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=poll_seconds)
            wake.clear()
            if stop.is_set():
                break
            now = loop.time()
            idle = [kind for kind in drains if state.idle(kind, now)]
            if not idle:
                continue
            try:
                async with session_scope() as session:
                    due = await due_kinds(session, [k for k in idle if k not in LINE_KINDS])
                    due |= await due_line_kinds(session, [k for k in idle if k in LINE_KINDS])
            except (SQLAlchemyError, DatabaseUnavailable, OSError) as exc:
                log.warning("[WORKER] cannot read the queue: %s", type(exc).__name__)
                continue
            for kind in sorted(due):
                run = start_local_run(drains[kind], {})
                state.running[kind] = run
                run.task.add_done_callback(functools.partial(drain_ended, kind, run))
                log.info("[WORKER] %s: drain started", kind)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        running = [run.task for run in state.running.values() if not run.task.done()]
        if running:
            log.info("[WORKER] waiting for %d running drain(s) to finish", len(running))
            await asyncio.gather(*running, return_exceptions=True)


async def _listen(wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set ``wake`` on every notification; reconnect (and wake, to catch up) after losing the connection."""
    delay = 1.0
    while not stop.is_set():
        try:
            async with listening(listener_conninfo(), WORK_CHANNEL) as conn:
                delay = 1.0
                wake.set()
                async for _ in conn.notifies():
                    wake.set()
        except (psycopg.OperationalError, OSError, DatabaseUnavailable) as exc:
            log.warning("[WORKER] listening failed (%s); retrying in %.0f s", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def lower_priority(increment: int) -> None:
    """Add ``increment`` to this process's niceness (where the platform has it): drains yield the CPU to requests."""
    if increment > 0 and hasattr(os, "nice"):
        os.nice(increment)
        log.info("[WORKER] niceness raised by %d: requests are served before queued work", increment)


def default_drains() -> dict[str, Flow[..., Any]]:
    """The drain flow of every kind of queued work."""
    return {"import": import_conversations, "send": send_messages}


def main() -> None:
    """Run the worker until SIGINT or SIGTERM (`zapsync worker`)."""
    from core.logs import configure_logging
    from core.settings import get_settings

    configure_logging()
    lower_priority(get_settings().worker_nice)

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        log.info("[WORKER] draining %s", ", ".join(default_drains()))
        await run_worker(default_drains(), stop=stop)

    asyncio.run(body())


if __name__ == "__main__":
    main()
