"""Status-sync work, one batch per task: observe at the gateway, apply in set-based SQL (the diff is pure, in core)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Generic, TypeVar

from prefect import task

from core.domain import AppliedChange, InstanceRef, StatusObservation, StatusWrite
from db.engine import session_scope
from db.repositories.instances import apply_status_writes
from gateways.base import Gateway
from tasks.import_requests import enqueue_connect_imports
from tasks.options import TASK_OPTIONS


async def observe_instances(
    gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str]
) -> list[StatusObservation]:
    """Ask one gateway about a batch of its instances, in ``refs`` order (an unreachable one has ``status=None``)."""
    observations = await gateway.fetch_states(
        [r.instance_name for r in refs],
        db_statuses={r.instance_name: r.status for r in refs},
        confirm=confirm,
    )
    return [observations[r.instance_name] for r in refs]


async def write_statuses(
    writes: Sequence[StatusWrite],
    *,
    source: str,
    flow_run_id: uuid.UUID | None,
    import_gateways: Collection[str] = (),
) -> list[AppliedChange]:
    """Write one batch of observations in one transaction (newest-wins guard, history, sessions), queueing in the same
    transaction an import for each instance that became connected at one of ``import_gateways``."""
    async with session_scope() as session:
        changes = await apply_status_writes(session, writes, source=source, flow_run_id=flow_run_id)
        await enqueue_connect_imports(session, changes, trigger=source, import_gateways=import_gateways)
        return changes


T = TypeVar("T")


class Unlinked(Generic[T]):
    """A task's result Prefect does not walk: a list returned as such has each element linked to the task run (a
    weak reference and an entry in the flow run's table each, ~0.4 s per 100k observations)."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


@task(name="observe-instances", **TASK_OPTIONS)
async def observe_batch(
    gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str]
) -> Unlinked[list[StatusObservation]]:
    """:func:`observe_instances` as a task run."""
    return Unlinked(await observe_instances(gateway, refs, confirm=confirm))


@task(name="apply-status", **TASK_OPTIONS)
async def apply_batch(
    writes: Sequence[StatusWrite],
    *,
    source: str,
    flow_run_id: uuid.UUID | None,
    import_gateways: Collection[str] = (),
) -> Unlinked[list[AppliedChange]]:
    """:func:`write_statuses` as a task run."""
    return Unlinked(
        await write_statuses(writes, source=source, flow_run_id=flow_run_id, import_gateways=import_gateways)
    )
