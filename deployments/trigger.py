"""Start deployment runs and follow them: how the API and CLI hand work to Prefect."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel

from deployments.definitions import DeploymentName
from zapsync.errors import FlowTriggerFailed, NotFound


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


async def trigger(
    deployment: DeploymentName, parameters: dict[str, Any], *, idempotency_key: str | None = None
) -> FlowRunRef:
    """Create a run of ``deployment`` and return at once; a reused idempotency key returns the earlier run."""
    try:
        run = await run_deployment(
            str(deployment),
            parameters=parameters,
            timeout=0,
            idempotency_key=idempotency_key,
            as_subflow=False,
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
        state=run.state.name if run.state else "Scheduled",
        ui_url=ui_url(run.id),
    )


async def read_run(flow_run_id: uuid.UUID, deployment: str = "") -> FlowRunRef:
    """The current state of a flow run."""
    async with get_client() as client:
        try:
            run = await client.read_flow_run(flow_run_id)
        except ObjectNotFound as exc:
            raise NotFound(f"no flow run {flow_run_id}") from exc
    state = run.state
    return FlowRunRef(
        id=run.id,
        name=run.name,
        deployment=deployment,
        state=state.name if state else "Unknown",
        final=bool(state and state.is_final()),
        ui_url=ui_url(run.id),
    )


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
