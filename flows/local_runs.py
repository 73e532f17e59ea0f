"""Run a flow in this process as a tracked Prefect flow run: warm, no new interpreter, still visible in the Prefect UI.

A served deployment starts every run in a new Python process, which costs seconds of CPU here before any work
(prefect-notes.md). Short, scoped work asked for by a person (the dashboard's Sync button, `POST /instances/sync`) and
the queue's drain runs are called in the long-lived process that holds the request or the queue, instead: the flow
function is awaited in a background task, and the flow run's id is known the moment Prefect creates it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import Flow
from prefect.client.schemas.objects import FlowRun, State

log = logging.getLogger("zapsync.runs")

_running: set[asyncio.Task[Any]] = set()
"""Strong references to the runs started here (the event loop keeps only weak ones)."""


@dataclass(slots=True)
class LocalRun:
    """A flow run started in this process: its id once Prefect created it, and the task awaiting its result."""

    task: asyncio.Task[Any]
    started: asyncio.Future[FlowRun] = field(repr=False)

    async def flow_run(self, timeout: float = 30.0) -> FlowRun:  # noqa: ASYNC109
        """The flow run, as soon as it is running (raises the flow's error if it failed before)."""
        done, _ = await asyncio.wait({self.started, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.started.done():
            return self.started.result()
        if self.task.done():
            self.task.result()  # the run failed before it was created: raise why
        raise TimeoutError(f"the flow run was not created within {timeout:.0f} s")

    async def result(self) -> Any:
        """The flow's return value (its error when it failed)."""
        return await self.task


def start_local_run(flow: Flow[..., Any], parameters: Mapping[str, Any]) -> LocalRun:
    """Start ``flow`` with ``parameters`` in this process's event loop and return at once."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[FlowRun] = loop.create_future()

    # Named as in Prefect's FlowStateHook protocol (its parameters may be passed by keyword), used or not.
    def on_running(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:  # noqa: ARG001
        if not started.done():
            loop.call_soon_threadsafe(_resolve, started, flow_run)

    tracked = flow.with_options(on_running=[*flow.on_running_hooks, on_running])
    task: asyncio.Task[Any] = loop.create_task(tracked(**dict(parameters)))
    _running.add(task)
    task.add_done_callback(_running.discard)
    task.add_done_callback(lambda t: _log_failure(flow.name, t))
    return LocalRun(task=task, started=started)


def _resolve(future: asyncio.Future[FlowRun], flow_run: FlowRun) -> None:
    if not future.done():
        future.set_result(flow_run)


def _log_failure(name: str, task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    if (error := task.exception()) is not None:
        log.warning("[RUN] %s failed in this process: %s", name, type(error).__name__)
