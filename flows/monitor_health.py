"""Flow `monitor-health`: check every instance each minute; alert, reconnect, recover (DESIGN.md §5, seeds 003/004).

Per gateway, one bulk observation (`fetch_states`: one call at Evolution, bounded concurrency at MegaAPI). A
gateway that answers for none of its instances (or whose breaker opened) is the failure: it is recorded once as
unhealthy and its instances' counters are left alone. Otherwise every instance is judged: connected passes;
anything else adds to `consecutive_failures` and sets `health`. At 2 failures an alert, at 3 a reconnect through
the gateway (when the organization has `auto_reconnect`, never for a logged-out session), and a recovery event
when an alerted instance passes again — each on its transition only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

from prefect import flow

from core.batching import chunks
from core.domain import HealthOutcome, InstanceRef, StatusObservation
from core.logs import run_logger
from core.names import MONITOR_FLOW
from core.policies.health import HealthDecision
from core.policies.status import pick_live_confirmations
from core.reports import GatewayHealthSummary, HealthReport, HealthTransition
from core.settings import get_settings
from db.engine import session_scope
from db.locks import try_advisory_lock
from db.repositories.health import GatewayCheck, failing_instance_ids
from db.repositories.instances import load_instances
from flows.guard import current_flow_run_id, late_by, store_report
from gateways.base import Gateway
from gateways.registry import open_gateways
from tasks.instance_health import reconnect, record_checks, record_gateways
from tasks.status import observe_batch


@flow(name=MONITOR_FLOW, flow_run_name="monitor-health", retries=0, log_prints=False)
async def monitor_health(late_after_seconds: int | None = None) -> HealthReport:
    """One health check of every instance (a run later than ``late_after_seconds`` skips: the next one covers it)."""
    log = run_logger("zapsync.health")
    begun = time.perf_counter()
    report = HealthReport(started_at=datetime.now(UTC), flow_run_id=current_flow_run_id())
    if (lateness := late_by(late_after_seconds)) is not None:
        report.skipped = f"scheduled run started {lateness:.0f} s late; the next run covers it"
    else:
        async with try_advisory_lock("monitor_health") as acquired:
            if acquired:
                await run_monitor(report)
            else:
                report.skipped = "another health check is running"
    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    down = sorted(name for name, g in report.by_gateway.items() if g.health != "healthy")
    log.info(
        "[HEALTH] checked=%d healthy=%d failing=%d not_judged=%d alerts=%d reconnects=%d recoveries=%d "
        "gateways_down=%s in %.2fs%s",
        report.checked,
        report.healthy,
        report.failing,
        report.not_judged,
        report.alerts,
        report.reconnects,
        report.recoveries,
        ",".join(down) or "-",
        report.seconds,
        f" (skipped: {report.skipped})" if report.skipped else "",
    )
    await _publish(report)
    return report


async def _observe(
    gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str], batch_size: int
) -> list[StatusObservation]:
    batches = [refs] if gateway.bulk_states else chunks(refs, batch_size)
    results = await asyncio.gather(*(observe_batch(gateway, batch, confirm=confirm) for batch in batches))
    return [obs for batch in results for obs in batch]


def _confirmations(refs: Sequence[InstanceRef], failing: set[uuid.UUID], budget: int) -> set[str]:
    """Instances whose bulk `open` is confirmed live: every failing one (its streak must be exact), plus a rotating
    few healthy ones (a silent drop hides behind Evolution's lagging column, gateways.md §1.3)."""
    return {r.instance_name for r in refs if r.id in failing} | pick_live_confirmations(
        refs, force=False, budget=budget
    )


async def run_monitor(report: HealthReport) -> None:
    """Fill ``report``: observe per gateway, record checks and transitions, reconnect, record gateway health."""
    settings = get_settings()
    log = run_logger("zapsync.health")
    async with session_scope() as session:
        refs = await load_instances(session)
        failing = await failing_instance_ids(session)
    by_gateway: dict[str, list[InstanceRef]] = defaultdict(list)
    for ref in refs:
        by_gateway[ref.gateway].append(ref)
    checked_at = report.started_at
    gateway_checks: list[GatewayCheck] = []
    decisions: list[HealthDecision] = []

    async with open_gateways(set(by_gateway)) as gateways:
        names = sorted(by_gateway)
        confirm = {name: _confirmations(by_gateway[name], failing, settings.monitor_confirm_budget) for name in names}
        started = time.perf_counter()
        observed = await asyncio.gather(
            *(
                _observe(gateways[name], by_gateway[name], confirm=confirm[name], batch_size=settings.sync_batch_size)
                if name in gateways
                else _unconfigured(by_gateway[name], name, checked_at)
                for name in names
            )
        )
        seconds = round(time.perf_counter() - started, 3)
        judged_refs: list[InstanceRef] = []
        judged_obs: list[StatusObservation] = []
        for name, observations in zip(names, observed, strict=True):
            breaker = getattr(gateways.get(name), "breaker_state", "closed")
            reachable = any(o.reachable for o in observations) and breaker != "open"
            errors = [o.error for o in observations if o.error]
            summary = report.by_gateway.setdefault(name, GatewayHealthSummary())
            summary.checked, summary.reachable, summary.seconds = len(observations), reachable, seconds
            summary.error = None if reachable else (errors[0] if errors else "no answer")
            gateway_checks.append(
                GatewayCheck(gateway=name, reachable=reachable, error=summary.error, checked_at=checked_at)
            )
            if reachable:
                judged_refs += by_gateway[name]
                judged_obs += observations
            else:
                report.not_judged += len(observations)

        confirmed = set().union(*confirm.values()) if confirm else set()
        recorded = await asyncio.gather(
            *(
                record_checks(
                    refs_batch,
                    obs_batch,
                    confirmed=confirmed,
                    checked_at=checked_at,
                    alert_after=settings.monitor_alert_after,
                    reconnect_after=settings.monitor_reconnect_after,
                    flow_run_id=report.flow_run_id,
                )
                for refs_batch, obs_batch in zip(
                    chunks(judged_refs, settings.sync_batch_size),
                    chunks(judged_obs, settings.sync_batch_size),
                    strict=True,
                )
            )
        )
        for batch in recorded:
            decisions += batch.decisions
            report.status_changes += batch.status_changes

        to_reconnect: dict[str, list[HealthOutcome]] = defaultdict(list)
        for d in decisions:
            if "reconnect" in d.kinds:
                to_reconnect[d.outcome.gateway].append(d.outcome)
        attempts = await asyncio.gather(
            *(reconnect(gateways[name], outcomes) for name, outcomes in sorted(to_reconnect.items()))
        )

    organizations: dict[str, set[uuid.UUID]] = defaultdict(set)
    for ref in refs:
        organizations[ref.gateway].add(ref.organization_id)
    for g in await record_gateways(gateway_checks, dict(organizations)):
        summary = report.by_gateway[g.gateway]
        summary.health = "healthy" if g.health == "healthy" else "unhealthy"
        summary.consecutive_failures = g.consecutive_failures
        if g.health != g.health_before and not (g.health_before is None and g.health == "healthy"):
            summary.transition = "unhealthy" if g.health == "unhealthy" else "recovered"

    failed_reconnects = {r.outcome.instance_id: r.error for batch in attempts for r in batch if not r.ok}
    for d in decisions:
        o = d.outcome
        report.checked += 1
        if o.failures == 0:
            report.healthy += 1
        else:
            report.failing += 1
        for kind in d.kinds:
            detail = failed_reconnects.get(o.instance_id) if kind == "reconnect" else None
            report.transitions.append(
                HealthTransition(
                    instance_id=o.instance_id,
                    organization_id=o.organization_id,
                    instance_name=o.instance_name,
                    gateway=o.gateway,
                    kind=kind,
                    consecutive_failures=o.failures,
                    health=o.health,
                    detail=detail,
                )
            )
    report.checked += report.not_judged
    report.alerts = sum(1 for t in report.transitions if t.kind == "alert")
    report.reconnects = sum(1 for t in report.transitions if t.kind == "reconnect")
    report.reconnect_failures = len(failed_reconnects)
    report.recoveries = sum(1 for t in report.transitions if t.kind == "recovered")
    report.transitions = report.transitions[:500]
    for t in report.transitions[:20]:
        log.info(
            "[HEALTH] %s/%s: %s after %d failures%s",
            t.gateway,
            t.instance_name,
            t.kind,
            t.consecutive_failures,
            f" ({t.detail})" if t.detail else "",
        )


async def _unconfigured(refs: Sequence[InstanceRef], name: str, at: datetime) -> list[StatusObservation]:
    error = f"gateway {name!r} is not configured"
    return [StatusObservation(instance_name=r.instance_name, status=None, observed_at=at, error=error) for r in refs]


async def _publish(report: HealthReport) -> None:
    """Store the report and show it in the Prefect UI (transitions went out as live events already)."""
    await store_report(
        MONITOR_FLOW,
        report,
        organization_id=None,
        artifact_key="monitor-health-report",
        description="Health check report",
    )
