"""Status-sync work, one batch per task: observe at the gateway, diff (pure), apply in set-based SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from db.engine import session_scope
from db.repositories.instances import AppliedChange, InstanceRef, StatusWrite, apply_status_writes
from gateways.base import Gateway, StatusObservation
from zapsync.reports import Drift, UnreachableInstance


def pick_live_confirmations(refs: Sequence[InstanceRef], *, force: bool, budget: int) -> set[str]:
    """Connected instances whose bulk `open` is confirmed live anyway: all when forced, else the stalest few.

    A gateway's bulk view can keep saying "open" after a silent drop (gateways.md §1.3); confirming a rotating
    slice each run bounds how long such a drop can hide without paying one call per instance every time.
    """
    connected = [r for r in refs if r.status == "connected"]
    if force:
        return {r.instance_name for r in connected}
    connected.sort(key=lambda r: (r.live_confirmed_at is not None, r.live_confirmed_at))
    return {r.instance_name for r in connected[:budget]}


@task(name="observe-instances", cache_policy=NO_CACHE, retries=0)
async def observe_batch(gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str]) -> list[StatusObservation]:
    """Ask one gateway about a batch of its instances (the client retries and breaks on its own)."""
    observations = await gateway.fetch_states(
        [r.instance_name for r in refs],
        db_statuses={r.instance_name: r.status for r in refs},
        confirm=confirm,
    )
    return [observations[r.instance_name] for r in refs]


def diff_observations(
    refs: Sequence[InstanceRef],
    observations: Sequence[StatusObservation],
    *,
    confirmed: set[str] | None = None,
) -> tuple[list[Drift], list[UnreachableInstance], list[StatusWrite]]:
    """Compare database rows with observations: drift, unreachable instances, and the writes to apply.

    Pure: no I/O. An unreachable observation never becomes a write.
    """
    confirmed = confirmed or set()
    drifts: list[Drift] = []
    unreachable: list[UnreachableInstance] = []
    writes: list[StatusWrite] = []
    for ref, obs in zip(refs, observations, strict=True):
        if obs.status is None:
            unreachable.append(
                UnreachableInstance(
                    instance_id=ref.id,
                    instance_name=ref.instance_name,
                    gateway=ref.gateway,
                    error=obs.error,
                )
            )
            continue
        writes.append(
            StatusWrite(
                instance_id=ref.id,
                status=obs.status,
                observed_at=obs.observed_at,
                reason=obs.reason,
                phone_number=obs.phone_number,
                profile_name=obs.profile_name,
                live_confirmed=ref.instance_name in confirmed,
                logged_out=obs.logged_out,
            )
        )
        if obs.status != ref.status:
            drifts.append(
                Drift(
                    instance_id=ref.id,
                    organization_id=ref.organization_id,
                    instance_name=ref.instance_name,
                    gateway=ref.gateway,
                    db_status=ref.status,
                    gateway_status=obs.status,
                    reason=obs.reason,
                )
            )
    return drifts, unreachable, writes


@task(name="apply-status", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
async def apply_batch(
    writes: Sequence[StatusWrite], *, source: str, flow_run_id: uuid.UUID | None
) -> list[AppliedChange]:
    """Write one batch of observations in one transaction (newest-wins guard, history, sessions)."""
    async with session_scope() as session:
        return await apply_status_writes(session, writes, source=source, flow_run_id=flow_run_id)
