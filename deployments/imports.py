"""Start conversation imports through their deployment: on connect (webhook), after a status sync, on demand."""

from __future__ import annotations

import uuid

import httpx
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from deployments import trigger as runs
from deployments.definitions import IMPORT_ON_DEMAND


async def start_import(
    instance_id: uuid.UUID,
    *,
    trigger: str,
    connection_key: str | None = None,
    history_days: int | None = None,
    full: bool = False,
    idempotency_key: str | None = None,
) -> runs.FlowRunRef:
    """Create an `import-conversations` run (queued behind the deployment's concurrency limit); a reused
    ``idempotency_key`` returns the run it started before."""
    parameters: dict[str, object] = {"instance_id": str(instance_id), "trigger": trigger, "full": full}
    if connection_key is not None:
        parameters["connection_key"] = connection_key
    if history_days is not None:
        parameters["history_days"] = history_days
    return await runs.trigger(IMPORT_ON_DEMAND, parameters, idempotency_key=idempotency_key)


async def import_deployment_registered() -> bool:
    """Whether the import deployment exists (served or deployed); False too when Prefect cannot be reached."""
    try:
        async with get_client() as client:
            await client.read_deployment_by_name(str(IMPORT_ON_DEMAND))
    except (ObjectNotFound, httpx.HTTPError, OSError, RuntimeError):
        return False
    return True
