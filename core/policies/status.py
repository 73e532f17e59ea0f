"""Status-sync rules: which connected instances to confirm live, and what an observation changes."""

from __future__ import annotations

from collections.abc import Sequence

from core.domain import InstanceRef, StatusObservation, StatusWrite
from core.reports import Drift, UnreachableInstance


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


def diff_observations(
    refs: Sequence[InstanceRef],
    observations: Sequence[StatusObservation],
    *,
    confirmed: set[str] | None = None,
) -> tuple[list[Drift], list[UnreachableInstance], list[StatusWrite]]:
    """Compare database rows with observations: drift, unreachable instances, and the writes to apply.

    Pure: no I/O. An unreachable observation never becomes a write. A write is live-confirmed when its instance was
    picked for confirmation, or when a live state read in bulk (``obs.live``) changes its status: marking every
    bulk-live observation would rewrite every row on every run.
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
                live_confirmed=ref.instance_name in confirmed or (obs.live and obs.status != ref.status),
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
