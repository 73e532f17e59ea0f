"""Flow `sync-status`: make each instance's status in PostgreSQL match its gateway (DESIGN.md §5).

load rows → observe at the gateways (bulk where the provider allows, bounded concurrency elsewhere) → diff (pure)
→ apply in set-based batches with the newest-wins guard → report (returned, stored, and a Prefect artifact).
Check mode stops after the diff and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeVar, cast

from prefect import flow
from prefect.utilities.annotations import quote
from pydantic import BaseModel

from core.batching import chunks
from core.domain import AppliedChange, InstanceRef, StatusObservation, StatusWrite, WorkKind
from core.logs import run_logger
from core.names import SYNC_FLOW
from core.policies.status import diff_observations, pick_live_confirmations
from core.reports import REPORT_LIST_CAP, Drift, GatewaySummary, SyncReport, SyncScope, UnreachableInstance
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.instances import load_instances
from db.repositories.live_events import publish_status_changes
from flows.guard import Reporting, current_flow_run_id, fill, guarded
from flows.runs import wake_drain
from gateways.base import Gateway
from gateways.registry import history_gateways, open_gateways
from tasks.import_requests import enqueue_missing_imports
from tasks.status import apply_batch, observe_batch, observe_instances


def _summary(r: SyncReport) -> str:
    return (
        f"{r.mode} scope={r.scope.key} checked={r.checked} drifted={r.drifted} applied={r.applied} "
        f"superseded={r.superseded} unreachable={r.unreachable}"
    )


SYNC = Reporting(SYNC_FLOW, "SYNC", "zapsync.sync", "sync-status-report", "Status sync report", _summary)


@flow(name=SYNC_FLOW, flow_run_name="sync-status {mode}", retries=0, log_prints=False)
async def sync_status(
    scope: SyncScope | None = None,
    mode: Literal["check", "apply"] = "apply",
    force: bool = False,
    late_after_seconds: int | None = None,
) -> SyncReport:
    """Compare every instance in ``scope`` with its gateway; in apply mode, write what drifted.

    ``force`` confirms every connected instance live at providers whose bulk view lags. A scheduled run sets
    ``late_after_seconds`` (its interval) so that a run started later than that — a pile-up after downtime —
    does nothing and leaves the work to the next one. Not retried as a whole: the next scheduled run is the retry.
    """
    scope = scope or SyncScope()
    report = SyncReport(mode=mode, scope=scope, started_at=datetime.now(UTC), flow_run_id=current_flow_run_id())
    async with guarded(
        report,
        SYNC,
        lock=f"sync_status:{scope.key}",
        busy=f"another sync of scope {scope.key} is running",
        late_after_seconds=late_after_seconds,
        organization_id=scope.organization_id,
    ) as go:
        if go:
            fill(report, await run_sync(scope, mode, force=force, flow_run_id=report.flow_run_id))
    if mode == "apply" and report.skipped is None:
        await enqueue_missing_imports(
            report.became_connected, organization_id=scope.organization_id, instance_id=scope.instance_id
        )
        await wake_drain(WorkKind.IMPORT)
    return report


class SyncResult(BaseModel):
    """What one sync found and did (the counts and lists of its report)."""

    checked: int
    in_sync: int
    drifted: int
    applied: int
    superseded: int
    unreachable: int
    by_gateway: dict[str, GatewaySummary]
    changes: list[Drift]
    unreachable_instances: list[UnreachableInstance]
    became_connected: list[uuid.UUID]
    failed_gateways: list[str]


async def run_sync(
    scope: SyncScope, mode: Literal["check", "apply"], *, force: bool, flow_run_id: uuid.UUID | None
) -> SyncResult:
    """Observe every instance in ``scope``, diff, and in apply mode write what drifted; one task per batch."""
    with _long_lived_objects_frozen():
        seen = await observe_scope(scope, force=force, observe=_observe_in_task)
        drifts, unreachable, writes = diff_observations(seen.refs, seen.observations, confirmed=seen.confirmed)
        seen.observations = []  # the writes hold what is applied: free ~1 kB per instance before applying
        applied = await _apply(writes, flow_run_id=flow_run_id) if mode == "apply" and writes else []
    result = sync_result(seen, drifts, unreachable, applied, mode=mode)
    _log_drifts(result.changes)
    return result


async def check_status(scope: SyncScope, *, force: bool = False) -> SyncReport:
    """Check mode without Prefect (the API's read-only `GET /instances/status`): observe and diff, write nothing."""
    report = SyncReport(mode="check", scope=scope, started_at=datetime.now(UTC))
    begun = time.perf_counter()
    seen = await observe_scope(scope, force=force, observe=observe_instances)
    drifts, unreachable, _ = diff_observations(seen.refs, seen.observations, confirmed=seen.confirmed)
    fill(report, sync_result(seen, drifts, unreachable, [], mode="check"))
    _log_drifts(report.changes)
    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    return report


class Observe(Protocol):
    """Observes one batch of one gateway's instances (a task run, or the plain function)."""

    def __call__(
        self, gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str]
    ) -> Awaitable[list[StatusObservation]]: ...


@dataclass(slots=True)
class ScopeObservation:
    """Every instance of a scope as its gateway sees it (instances of unconfigured gateways apart)."""

    total: int
    """Instances in the scope, unconfigured gateways included."""
    refs: list[InstanceRef] = field(default_factory=list)
    observations: list[StatusObservation] = field(default_factory=list)
    """One per ref, in the same order."""
    confirmed: set[str] = field(default_factory=set)
    by_gateway: dict[str, GatewaySummary] = field(default_factory=dict)
    unconfigured: list[UnreachableInstance] = field(default_factory=list)


async def observe_scope(scope: SyncScope, *, force: bool, observe: Observe) -> ScopeObservation:
    """Load the scope's instances and observe them at their gateways, the gateways concurrently."""
    settings = get_settings()
    async with session_scope() as session:
        refs = await load_instances(session, organization_id=scope.organization_id, instance_id=scope.instance_id)
    run_logger("zapsync.sync").info("[SYNC] %d instances in scope %s", len(refs), scope.key)
    by_gateway: dict[str, list[InstanceRef]] = defaultdict(list)
    for ref in refs:
        by_gateway[ref.gateway].append(ref)
    seen = ScopeObservation(total=len(refs))
    async with open_gateways(set(by_gateway)) as gateways:
        for name in sorted(set(by_gateway) - set(gateways)):
            error = f"gateway {name!r} is not configured"
            seen.unconfigured += [
                UnreachableInstance(instance_id=r.id, instance_name=r.instance_name, gateway=name, error=error)
                for r in by_gateway[name]
            ]
            count = len(by_gateway[name])
            seen.by_gateway[name] = GatewaySummary(checked=count, unreachable=count, breaker="unconfigured")
        names = sorted(gateways)
        observed = await asyncio.gather(
            *(
                _observe_gateway(
                    gateways[name],
                    by_gateway[name],
                    force=force,
                    budget=settings.sync_confirm_budget,
                    batch_size=settings.sync_batch_size,
                    observe=observe,
                )
                for name in names
            )
        )
    for name, (observations, confirm, summary) in zip(names, observed, strict=True):
        seen.refs += by_gateway[name]
        seen.observations += observations
        seen.confirmed |= confirm
        seen.by_gateway[name] = summary
    return seen


async def _observe_gateway(
    gateway: Gateway,
    refs: Sequence[InstanceRef],
    *,
    force: bool,
    budget: int,
    batch_size: int,
    observe: Observe,
) -> tuple[list[StatusObservation], set[str], GatewaySummary]:
    begun = time.perf_counter()
    confirm = pick_live_confirmations(refs, force=force, budget=budget)
    batches = [refs] if gateway.bulk_states else chunks(refs, batch_size)
    results = await asyncio.gather(*(observe(gateway, batch, confirm=confirm) for batch in batches))
    observations = [obs for batch in results for obs in batch]
    summary = GatewaySummary(
        checked=len(observations),
        unreachable=sum(1 for obs in observations if obs.status is None),
        confirmed_live=len(confirm),
        breaker=getattr(gateway, "breaker_state", "closed"),
        seconds=round(time.perf_counter() - begun, 3),
        # The whole gateway refused the key (one 401 at MegaAPI may be one logged-out instance).
        auth_error=observations[0].error if observations and all(o.auth_failed for o in observations) else None,
        live_in_bulk=sum(1 for obs in observations if obs.live),
        live_state_error=getattr(gateway, "live_state_error", None),
    )
    return observations, confirm, summary


async def _observe_in_task(
    gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str]
) -> list[StatusObservation]:
    """One `observe-instances` task run (quoted: Prefect would otherwise walk and copy every element)."""
    return (await observe_batch(gateway, _quoted(refs), confirm=_quoted(confirm))).value


_T = TypeVar("_T")


def _quoted(value: _T) -> _T:
    """``value`` in Prefect's `quote`, typed as what the task function receives: Prefect unwraps it unwalked."""
    return cast(_T, quote(value))  # quote[T] is a 1-tuple to mypy; Prefect passes the task its content


async def _apply(writes: Sequence[StatusWrite], *, flow_run_id: uuid.UUID | None) -> list[AppliedChange]:
    """Write the observations, one `apply-status` task per batch (each queueing the imports of the instances it
    connected), and announce what changed."""
    import_gateways = frozenset(history_gateways())
    batches = await asyncio.gather(
        *(
            apply_batch(_quoted(batch), source="sync", flow_run_id=flow_run_id, import_gateways=import_gateways)
            for batch in chunks(writes, _apply_batch_size(len(writes)))
        )
    )
    applied = [change for batch in batches for change in batch.value]
    await publish_status_changes(applied, source="sync")
    return applied


def _apply_batch_size(count: int) -> int:
    """Writes per `apply-status` task: ``sync_batch_size``, larger when that would make more than
    ``sync_apply_tasks`` task runs."""
    settings = get_settings()
    return max(settings.sync_batch_size, -(-count // settings.sync_apply_tasks))


def sync_result(
    seen: ScopeObservation,
    drifts: list[Drift],
    unreachable: list[UnreachableInstance],
    applied: list[AppliedChange],
    *,
    mode: Literal["check", "apply"],
) -> SyncResult:
    """The counts and lists of a sync's report; each drift is marked applied when it was written."""
    applied_ids = {change.instance_id for change in applied}
    for drift in drifts:
        drift.applied = drift.instance_id in applied_ids
    unreachable = seen.unconfigured + unreachable
    return SyncResult(
        checked=seen.total,
        in_sync=seen.total - len(drifts) - len(unreachable),
        drifted=len(drifts),
        applied=len(applied),
        superseded=len(drifts) - len(applied) if mode == "apply" else 0,
        unreachable=len(unreachable),
        by_gateway=seen.by_gateway,
        changes=drifts[:REPORT_LIST_CAP],
        unreachable_instances=unreachable[:REPORT_LIST_CAP],
        became_connected=[c.instance_id for c in applied if c.to_status == "connected"],
        failed_gateways=sorted(
            name
            for name, g in seen.by_gateway.items()
            if g.checked and g.unreachable == g.checked and g.breaker != "unconfigured"
        ),
    )


def _log_drifts(drifts: Sequence[Drift]) -> None:
    log = run_logger("zapsync.sync")
    for drift in drifts[:20]:
        log.info(
            "[SYNC] %s/%s: %s -> %s%s",
            drift.gateway,
            drift.instance_name,
            drift.db_status,
            drift.gateway_status,
            "" if drift.applied else " (not applied)",
        )


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Keep the process's long-lived objects out of the cyclic collector's passes while batches allocate many
    small objects, and collect young ones less often (handed back afterwards)."""
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
