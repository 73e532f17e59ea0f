"""Start deployment runs, follow them, and wake the drains of queued work: how the API, the CLI and the status sync
hand work to Prefect."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import State, StateType
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel

from core.domain import WorkKind
from core.errors import FlowTriggerFailed, NotFound
from core.logs import run_logger
from core.names import IMPORT_DRAIN, SEND_DRAIN, DeploymentName
from db.engine import session_scope
from db.repositories.work_queue import ItemState, listening_workers, read_item


class FlowRunRef(BaseModel):
    """A flow run as the API reports it."""

    id: uuid.UUID
    name: str
    deployment: str
    state: str
    final: bool = False
    ui_url: str | None = None


def ui_url(flow_run_id: uuid.UUID) -> str | None:
    """Where the run is shown in the Prefect UI."""
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None


def _state_name(state: State[Any] | None, default: str) -> str:
    """The state's name (Prefect names a state after its type when not told otherwise), or ``default`` without one."""
    return state.name if state is not None and state.name is not None else default


async def start_run(
    deployment: DeploymentName, parameters: dict[str, Any], *, idempotency_key: str | None = None
) -> FlowRunRef:
    """Create a run of ``deployment`` and return at once; a reused idempotency key returns the earlier run."""
    try:
        async with get_client() as client:  # arun_deployment leaves a client it opens itself unclosed
            run = await arun_deployment(
                str(deployment),
                parameters=parameters,
                timeout=0,
                idempotency_key=idempotency_key,
                as_subflow=False,
                client=client,
            )
    except ObjectNotFound as exc:
        raise FlowTriggerFailed(
            f"deployment {deployment} is not registered: start `zapsync serve` (or `zapsync up`)"
        ) from exc
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        raise FlowTriggerFailed(f"Prefect API unreachable while starting {deployment}: {type(exc).__name__}") from exc
    return FlowRunRef(
        id=run.id,
        name=run.name,
        deployment=str(deployment),
        state=_state_name(run.state, "Scheduled"),
        ui_url=ui_url(run.id),
    )


async def read_run(flow_run_id: uuid.UUID, deployment: str = "") -> FlowRunRef:
    """The current state of a flow run."""
    ref, _ = await read_run_and_parameters(flow_run_id, deployment)
    return ref


async def read_run_and_parameters(flow_run_id: uuid.UUID, deployment: str = "") -> tuple[FlowRunRef, dict[str, Any]]:
    """The current state of a flow run and the parameters it was started with."""
    async with get_client() as client:
        try:
            run = await client.read_flow_run(flow_run_id)
        except ObjectNotFound as exc:
            raise NotFound(f"no flow run {flow_run_id}") from exc
    state = run.state
    ref = FlowRunRef(
        id=run.id,
        name=run.name,
        deployment=deployment,
        state=_state_name(state, "Unknown"),
        final=bool(state and state.is_final()),
        ui_url=ui_url(run.id),
    )
    return ref, dict(run.parameters or {})


async def wait_for_run(flow_run_id: uuid.UUID, *, timeout: float, deployment: str = "") -> FlowRunRef:  # noqa: ASYNC109
    """Follow a run until it reaches a final state or ``timeout`` seconds pass (then return it as it is)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        run = await read_run(flow_run_id, deployment)
        if run.final or time.monotonic() >= deadline:
            return run
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 2.0)


async def wait_for_item(item_id: int, *, timeout: float) -> ItemState:  # noqa: ASYNC109
    """Follow a queue item until it finished or ``timeout`` seconds pass (then return it as it is)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        async with session_scope() as session:
            item = await read_item(session, item_id)
        if item is None:  # pruned: only long after it finished
            raise NotFound(f"no work item {item_id}")
        if item.finished or time.monotonic() >= deadline:
            return item
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 1.0)


# -- waking drains --------------------------------------------------------------------------------------------

DRAINS = {WorkKind.IMPORT: IMPORT_DRAIN, WorkKind.SEND: SEND_DRAIN}
"""The deployment that drains each kind of queued work when no warm worker does."""


async def wake_drain(kind: WorkKind) -> FlowRunRef | None:
    """Make sure someone drains ``kind`` soon after an enqueue committed.

    A warm worker LISTENing on the queue's channel was already woken by the enqueue's NOTIFY: nothing to do. Without
    one (work-pool mode with Prefect workers only), start a run of the kind's drain deployment, unless one is
    already waiting to start — a running drain may have passed its last claim, so only a waiting one counts.
    Prefect being unreachable is logged, not raised: the item stays queued and the status sync wakes it again.
    """
    async with session_scope() as session:
        if await listening_workers(session):
            return None
    deployment = DRAINS[kind]
    try:
        async with get_client() as client:
            found = await client.read_deployment_by_name(str(deployment))
            waiting = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING]))
                ),
                limit=1,
            )
        if waiting:
            return None
        return await start_run(deployment, {})
    except ObjectNotFound:
        run_logger("zapsync.runs").warning("[QUEUE] %s waits: no worker and no %s deployment", kind, deployment)
    except (FlowTriggerFailed, httpx.HTTPError, OSError, RuntimeError) as exc:
        run_logger("zapsync.runs").warning("[QUEUE] %s waits: Prefect unreachable (%s)", kind, type(exc).__name__)
    return None


class Waker:
    """Wakes drains after enqueues in a process that takes many events (the API): at most one wake of a kind in
    flight, and a wake asked for meanwhile runs once after it."""

    def __init__(self) -> None:
        self._running: dict[WorkKind, asyncio.Task[None]] = {}
        self._again: set[WorkKind] = set()

    def wake(self, kind: WorkKind) -> None:
        """Ask for a wake of ``kind`` in the background."""
        task = self._running.get(kind)
        if task is not None and not task.done():
            self._again.add(kind)
            return
        self._running[kind] = asyncio.get_running_loop().create_task(self._wake(kind))

    async def _wake(self, kind: WorkKind) -> None:
        while True:
            self._again.discard(kind)
            with contextlib.suppress(Exception):  # wake_drain logs; nothing here may fail a request
                await wake_drain(kind)
            if kind not in self._again:
                return

    async def settle(self) -> None:
        """Wait for the wakes in flight (tests, shutdown)."""
        while pending := [t for t in self._running.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
