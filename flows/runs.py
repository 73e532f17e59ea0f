"""Start deployment runs and follow them: how the API, the CLI and the status sync hand work to Prefect."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel

from core.errors import FlowTriggerFailed, NotFound
from core.logs import run_logger
from core.names import IMPORT_ON_DEMAND, DeploymentName
from core.policies.imports import connection_key
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.import_runs import PendingImport, pending_imports
from gateways.registry import history_gateways


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


async def start_run(
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


# -- imports --------------------------------------------------------------------------------------------------


async def start_import(
    instance_id: uuid.UUID,
    *,
    trigger: str,
    connection_key: str | None = None,
    history_days: int | None = None,
    full: bool = False,
    idempotency_key: str | None = None,
) -> FlowRunRef:
    """Create an `import-conversations` run (queued behind the deployment's concurrency limit); a reused
    ``idempotency_key`` returns the run it started before."""
    parameters: dict[str, object] = {"instance_id": str(instance_id), "trigger": trigger, "full": full}
    if connection_key is not None:
        parameters["connection_key"] = connection_key
    if history_days is not None:
        parameters["history_days"] = history_days
    return await start_run(IMPORT_ON_DEMAND, parameters, idempotency_key=idempotency_key)


async def import_deployment_registered() -> bool:
    """Whether the import deployment exists (served or deployed); False too when Prefect cannot be reached."""
    try:
        async with get_client() as client:
            await client.read_deployment_by_name(str(IMPORT_ON_DEMAND))
    except (ObjectNotFound, httpx.HTTPError, OSError, RuntimeError):
        return False
    return True


async def start_pending_imports(
    became_connected: list[uuid.UUID],
    *,
    organization_id: uuid.UUID | None = None,
    instance_id: uuid.UUID | None = None,
) -> int:
    """After a status sync: start imports for connected instances whose current connection is not imported
    (just connected, never imported, or the last import failed or died), those that just connected first.

    Each start carries an idempotency key — the connection's, which a `connection.update` webhook for the same
    connection also uses — so overlapping syncs and the webhook start one run. At most
    ``import_starts_per_sync`` per sync (the rest stay pending for the next one); nothing is tried while the
    import deployment is not registered, and a Prefect that cannot be reached is logged, not raised.
    """
    settings = get_settings()
    log = run_logger("zapsync.imports")
    gateways = history_gateways()
    if not gateways or not await import_deployment_registered():
        return 0
    async with session_scope() as session:
        pending = await pending_imports(
            session,
            gateways=gateways,
            first=became_connected,
            organization_id=organization_id,
            instance_id=instance_id,
            stale_minutes=settings.import_stale_minutes,
            limit=settings.import_starts_per_sync,
        )
    hour = int(datetime.now(UTC).timestamp() // 3600)
    semaphore = asyncio.Semaphore(8)

    async def start(item: PendingImport) -> bool:
        key = connection_key(item.instance_id, item.connected_at) if item.connected_at else None
        # A retry of the same failed run at most once an hour; otherwise the connection's own key.
        if item.reason == "unfinished" or key is None:
            idempotency = f"import:{item.instance_id}:{item.run_id or 'initial'}:{hour}"
        else:
            idempotency = key
        async with semaphore:
            try:
                await start_import(item.instance_id, trigger="sync", connection_key=key, idempotency_key=idempotency)
            except FlowTriggerFailed as exc:
                log.warning("[IMPORT] could not start the import of %s: %s", item.instance_id, exc.message)
                return False
        return True

    started = sum(await asyncio.gather(*(start(item) for item in pending)))
    if pending:
        log.info("[SYNC] %d imports requested for %d connected instances not imported yet", started, len(pending))
    return started
