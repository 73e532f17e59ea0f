"""Status-sync work, one batch per task: observe at the gateway, diff (pure), apply in set-based SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.domain import AppliedChange, InstanceRef, StatusObservation, StatusWrite
from db.engine import session_scope
from db.repositories.instances import apply_status_writes
from gateways.base import Gateway


@task(name="observe-instances", cache_policy=NO_CACHE, retries=0)
async def observe_batch(gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str]) -> list[StatusObservation]:
    """Ask one gateway about a batch of its instances (the client retries and breaks on its own)."""
    observations = await gateway.fetch_states(
        [r.instance_name for r in refs],
        db_statuses={r.instance_name: r.status for r in refs},
        confirm=confirm,
    )
    return [observations[r.instance_name] for r in refs]


@task(name="apply-status", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
async def apply_batch(
    writes: Sequence[StatusWrite], *, source: str, flow_run_id: uuid.UUID | None
) -> list[AppliedChange]:
    """Write one batch of observations in one transaction (newest-wins guard, history, sessions)."""
    async with session_scope() as session:
        return await apply_status_writes(session, writes, source=source, flow_run_id=flow_run_id)
