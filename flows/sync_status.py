"""Flow `sync-status`: make each instance's status in PostgreSQL match its gateway (DESIGN.md §5).

load rows → observe at the gateways (bulk where the provider allows, bounded concurrency elsewhere) → diff (pure)
→ apply in set-based batches with the newest-wins guard → report (returned, stored, and a Prefect artifact).
Check mode stops after the diff and writes nothing.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from prefect import flow
from prefect.utilities.annotations import quote

from core.batching import chunks
from core.domain import AppliedChange, InstanceRef, StatusObservation
from core.logs import run_logger
from core.names import SYNC_FLOW
from core.policies.status import diff_observations, pick_live_confirmations
from core.reports import GatewaySummary, SyncReport, SyncScope, UnreachableInstance
from core.settings import get_settings
from db.engine import session_scope
from db.locks import try_advisory_lock
from db.repositories.instances import load_instances
from db.repositories.live_events import publish_status_changes
from flows.guard import current_flow_run_id, late_by, store_report
from flows.runs import start_pending_imports
from gateways.base import Gateway
from gateways.registry import open_gateways
from tasks.status import apply_batch, observe_batch


async def _observe_gateway(
    gateway: Gateway,
    refs: Sequence[InstanceRef],
    *,
    force: bool,
    budget: int,
    batch_size: int,
    summary: GatewaySummary,
    as_tasks: bool,
) -> tuple[list[StatusObservation], set[str]]:
    begun = time.perf_counter()
    confirm = pick_live_confirmations(refs, force=force, budget=budget)
    batches = [refs] if gateway.bulk_states else chunks(refs, batch_size)
    if as_tasks:  # quote(): Prefect would otherwise walk (and copy) every element of the arguments
        results = await asyncio.gather(
            *(observe_batch(gateway, quote(batch), confirm=quote(confirm)) for batch in batches)
        )
    else:
        results = await asyncio.gather(*(observe_batch.fn(gateway, batch, confirm=confirm) for batch in batches))
    observations = [obs for batch in results for obs in batch]
    summary.checked = len(observations)
    summary.unreachable = sum(1 for obs in observations if obs.status is None)
    summary.confirmed_live = len(confirm)
    summary.breaker = getattr(gateway, "breaker_state", "closed")
    summary.seconds = round(time.perf_counter() - begun, 3)
    return observations, confirm


@flow(name=SYNC_FLOW, flow_run_name="sync-status {mode}", retries=1, retry_delay_seconds=10, log_prints=False)
async def sync_status(
    scope: SyncScope | None = None,
    mode: Literal["check", "apply"] = "apply",
    force: bool = False,
    late_after_seconds: int | None = None,
) -> SyncReport:
    """Compare every instance in ``scope`` with its gateway; in apply mode, write what drifted.

    ``force`` confirms every connected instance live at providers whose bulk view lags. A scheduled run sets
    ``late_after_seconds`` (its interval) so that a run started later than that — a pile-up after downtime —
    does nothing and leaves the work to the next one.
    """
    scope = scope or SyncScope()
    log = run_logger("zapsync.sync")
    settings = get_settings()
    begun = time.perf_counter()
    report = SyncReport(mode=mode, scope=scope, started_at=datetime.now(UTC), flow_run_id=current_flow_run_id())

    if (lateness := late_by(late_after_seconds)) is not None:
        report.skipped = f"scheduled run started {lateness:.0f} s late; the next run covers it"
    else:
        async with try_advisory_lock(f"sync_status:{scope.key}") as acquired:
            if not acquired:
                report.skipped = f"another sync of scope {scope.key} is running"
            else:
                gc.freeze()
                thresholds = gc.get_threshold()
                gc.set_threshold(100_000, 50, 1000)
                try:
                    await run_sync(
                        report, force=force, batch_size=settings.sync_batch_size, budget=settings.sync_confirm_budget
                    )
                finally:
                    gc.set_threshold(*thresholds)
                    gc.unfreeze()

    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    log.info(
        "[SYNC] %s scope=%s checked=%d drifted=%d applied=%d superseded=%d unreachable=%d in %.2fs%s",
        mode,
        scope.key,
        report.checked,
        report.drifted,
        report.applied,
        report.superseded,
        report.unreachable,
        report.seconds,
        f" (skipped: {report.skipped})" if report.skipped else "",
    )
    await _publish(report)
    if mode == "apply" and report.skipped is None:
        await start_pending_imports(
            report.became_connected, organization_id=scope.organization_id, instance_id=scope.instance_id
        )
    return report


async def check_status(scope: SyncScope, *, force: bool = False) -> SyncReport:
    """Check mode without Prefect (the API's read-only `GET /instances/status`): observe and diff, write nothing."""
    settings = get_settings()
    report = SyncReport(mode="check", scope=scope, started_at=datetime.now(UTC))
    begun = time.perf_counter()
    await run_sync(
        report, force=force, batch_size=settings.sync_batch_size, budget=settings.sync_confirm_budget, as_tasks=False
    )
    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    return report


async def run_sync(report: SyncReport, *, force: bool, batch_size: int, budget: int, as_tasks: bool = True) -> None:
    """Fill ``report`` for its scope and mode: observe, diff and (apply mode) write; one task per batch."""
    log = run_logger("zapsync.sync")
    scope, mode, settings_batch = report.scope, report.mode, batch_size
    async with session_scope() as session:
        refs = await load_instances(session, organization_id=scope.organization_id, instance_id=scope.instance_id)
    log.info("[SYNC] %d instances in scope %s", len(refs), scope.key)
    by_gateway: dict[str, list[InstanceRef]] = defaultdict(list)
    for ref in refs:
        by_gateway[ref.gateway].append(ref)

    async with open_gateways(set(by_gateway)) as gateways:
        unconfigured = sorted(set(by_gateway) - set(gateways))
        for name in unconfigured:
            report.unreachable_instances.extend(
                UnreachableInstance(
                    instance_id=r.id,
                    instance_name=r.instance_name,
                    gateway=name,
                    error=f"gateway {name!r} is not configured",
                )
                for r in by_gateway[name]
            )
            report.by_gateway[name] = GatewaySummary(
                checked=len(by_gateway[name]), unreachable=len(by_gateway[name]), breaker="unconfigured"
            )
        names = sorted(gateways)
        observed = await asyncio.gather(
            *(
                _observe_gateway(
                    gateways[name],
                    by_gateway[name],
                    force=force,
                    budget=budget,
                    as_tasks=as_tasks,
                    batch_size=settings_batch,
                    summary=report.by_gateway.setdefault(name, GatewaySummary()),
                )
                for name in names
            )
        )

    ordered_refs = [ref for name in names for ref in by_gateway[name]]
    observations = [obs for result, _ in observed for obs in result]
    confirmed = set().union(*(confirm for _, confirm in observed)) if observed else set()
    drifts, unreachable, writes = diff_observations(ordered_refs, observations, confirmed=confirmed)
    unreachable = report.unreachable_instances + unreachable

    applied: list[AppliedChange] = []
    if mode == "apply" and writes:
        batches = await asyncio.gather(
            *(
                apply_batch(quote(batch), source="sync", flow_run_id=report.flow_run_id)
                for batch in chunks(writes, settings_batch)
            )
        )
        applied = [change for batch in batches for change in batch]
        await publish_status_changes(applied, source="sync")
    applied_ids = {change.instance_id for change in applied}
    for drift in drifts:
        drift.applied = drift.instance_id in applied_ids

    report.checked = len(refs)
    report.unreachable = len(unreachable)
    report.drifted = len(drifts)
    report.in_sync = report.checked - report.drifted - report.unreachable
    report.applied = len(applied)
    report.superseded = report.drifted - report.applied if mode == "apply" else 0
    report.changes = drifts[:500]
    report.unreachable_instances = unreachable[:500]
    report.became_connected = [c.instance_id for c in applied if c.to_status == "connected"]
    for drift in drifts[:20]:
        log.info(
            "[SYNC] %s/%s: %s -> %s%s",
            drift.gateway,
            drift.instance_name,
            drift.db_status,
            drift.gateway_status,
            "" if drift.applied else " (not applied)",
        )


async def _publish(report: SyncReport) -> None:
    """Store the report for the API and dashboard, and show it in the Prefect UI."""
    await store_report(
        SYNC_FLOW,
        report,
        organization_id=report.scope.organization_id,
        artifact_key="sync-status-report",
        description="Status sync report",
    )
