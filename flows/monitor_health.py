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
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prefect import flow
from pydantic import BaseModel

from core.batching import chunks
from core.domain import HealthOutcome, InstanceRef, StatusObservation
from core.logs import run_logger
from core.names import MONITOR_FLOW
from core.policies.health import HealthDecision
from core.policies.status import pick_live_confirmations
from core.reports import REPORT_LIST_CAP, GatewayHealthSummary, HealthReport, HealthTransition
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.health import GatewayCheck, GatewayOutcome, failing_instance_ids
from db.repositories.instances import load_instances
from flows.guard import Reporting, current_flow_run_id, fill, guarded
from gateways.base import Gateway
from gateways.registry import open_gateways
from tasks.instance_health import ReconnectResult, reconnect, record_checks, record_gateways
from tasks.status import observe_batch


def _summary(r: HealthReport) -> str:
    down = sorted(name for name, g in r.by_gateway.items() if g.health != "healthy")
    return (
        f"checked={r.checked} healthy={r.healthy} failing={r.failing} not_judged={r.not_judged} alerts={r.alerts} "
        f"reconnects={r.reconnects} recoveries={r.recoveries} gateways_down={','.join(down) or '-'}"
    )


MONITOR = Reporting(MONITOR_FLOW, "HEALTH", "zapsync.health", "monitor-health-report", "Health check report", _summary)


@flow(name=MONITOR_FLOW, flow_run_name="monitor-health", retries=0, log_prints=False)
async def monitor_health(late_after_seconds: int | None = None) -> HealthReport:
    """One health check of every instance (a run later than ``late_after_seconds`` skips: the next one covers it).

    Not retried as a whole: the next run, a minute later, is the retry. Transitions go out as live events as they
    are recorded.
    """
    report = HealthReport(started_at=datetime.now(UTC), flow_run_id=current_flow_run_id())
    async with guarded(
        report,
        MONITOR,
        lock="monitor_health",
        busy="another health check is running",
        late_after_seconds=late_after_seconds,
    ) as go:
        if go:
            fill(report, await run_monitor(checked_at=report.started_at, flow_run_id=report.flow_run_id))
    return report


class HealthResult(BaseModel):
    """What one health check found and did (the counts and lists of its report)."""

    checked: int
    healthy: int
    failing: int
    not_judged: int
    status_changes: int
    alerts: int
    reconnects: int
    reconnect_failures: int
    recoveries: int
    by_gateway: dict[str, GatewayHealthSummary]
    transitions: list[HealthTransition]


@dataclass(slots=True)
class _Judged:
    """The observations of one check, split by whether their gateway answered."""

    refs: list[InstanceRef] = field(default_factory=list)
    observations: list[StatusObservation] = field(default_factory=list)
    not_judged: int = 0
    gateways: dict[str, GatewayHealthSummary] = field(default_factory=dict)
    checks: list[GatewayCheck] = field(default_factory=list)


async def run_monitor(*, checked_at: datetime, flow_run_id: uuid.UUID | None) -> HealthResult:
    """Observe per gateway, record checks and transitions, reconnect, record gateway health; one task per batch."""
    settings = get_settings()
    async with session_scope() as session:
        refs = await load_instances(session)
        failing = await failing_instance_ids(session)
    by_gateway: dict[str, list[InstanceRef]] = defaultdict(list)
    for ref in refs:
        by_gateway[ref.gateway].append(ref)
    names = sorted(by_gateway)
    confirm = {name: _confirmations(by_gateway[name], failing, settings.monitor_confirm_budget) for name in names}

    async with open_gateways(set(by_gateway)) as gateways:
        judged = await _observe(gateways, by_gateway, confirm=confirm, checked_at=checked_at)
        confirmed = set().union(*confirm.values())
        recorded = await asyncio.gather(
            *(
                record_checks(
                    refs_batch,
                    obs_batch,
                    confirmed=confirmed,
                    checked_at=checked_at,
                    alert_after=settings.monitor_alert_after,
                    reconnect_after=settings.monitor_reconnect_after,
                    flow_run_id=flow_run_id,
                )
                for refs_batch, obs_batch in zip(
                    chunks(judged.refs, settings.sync_batch_size),
                    chunks(judged.observations, settings.sync_batch_size),
                    strict=True,
                )
            )
        )
        decisions = [d for batch in recorded for d in batch.decisions]
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
    gateway_outcomes = await record_gateways(judged.checks, dict(organizations))
    return _result(
        judged,
        decisions,
        [r for batch in attempts for r in batch],
        gateway_outcomes,
        status_changes=sum(batch.status_changes for batch in recorded),
    )


def _confirmations(refs: Sequence[InstanceRef], failing: set[uuid.UUID], budget: int) -> set[str]:
    """Instances whose bulk `open` is confirmed live: every failing one (its streak must be exact), plus a rotating
    few healthy ones (a silent drop hides behind Evolution's lagging column, gateways.md §1.3)."""
    return {r.instance_name for r in refs if r.id in failing} | pick_live_confirmations(
        refs, force=False, budget=budget
    )


async def _observe(
    gateways: dict[str, Gateway],
    by_gateway: dict[str, list[InstanceRef]],
    *,
    confirm: dict[str, set[str]],
    checked_at: datetime,
) -> _Judged:
    """Observe every gateway's instances at once; judge only those of gateways that answered."""
    batch_size = get_settings().sync_batch_size
    names = sorted(by_gateway)
    started = time.perf_counter()
    observed = await asyncio.gather(
        *(
            _observe_gateway(gateways[name], by_gateway[name], confirm=confirm[name], batch_size=batch_size)
            if name in gateways
            else _unconfigured(by_gateway[name], name, checked_at)
            for name in names
        )
    )
    seconds = round(time.perf_counter() - started, 3)
    judged = _Judged()
    for name, observations in zip(names, observed, strict=True):
        breaker = getattr(gateways.get(name), "breaker_state", "closed")
        reachable = any(o.reachable for o in observations) and breaker != "open"
        errors = [o.error for o in observations if o.error]
        error = None if reachable else (errors[0] if errors else "no answer")
        auth_failed = bool(observations) and all(o.auth_failed for o in observations)  # the key, not one instance
        judged.gateways[name] = GatewayHealthSummary(
            checked=len(observations), reachable=reachable, seconds=seconds, error=error, auth_failed=auth_failed
        )
        judged.checks.append(GatewayCheck(gateway=name, reachable=reachable, error=error, checked_at=checked_at))
        if reachable:
            judged.refs += by_gateway[name]
            judged.observations += observations
        else:
            judged.not_judged += len(observations)
    return judged


async def _observe_gateway(
    gateway: Gateway, refs: Sequence[InstanceRef], *, confirm: set[str], batch_size: int
) -> list[StatusObservation]:
    batches = [refs] if gateway.bulk_states else chunks(refs, batch_size)
    results = await asyncio.gather(*(observe_batch(gateway, batch, confirm=confirm) for batch in batches))
    return [obs for batch in results for obs in batch.value]


async def _unconfigured(refs: Sequence[InstanceRef], name: str, at: datetime) -> list[StatusObservation]:
    error = f"gateway {name!r} is not configured"
    return [StatusObservation(instance_name=r.instance_name, status=None, observed_at=at, error=error) for r in refs]


def _result(
    judged: _Judged,
    decisions: list[HealthDecision],
    attempts: list[ReconnectResult],
    gateway_outcomes: list[GatewayOutcome],
    *,
    status_changes: int,
) -> HealthResult:
    """The report's counts and lists: gateway health and transitions, each instance's transitions."""
    for g in gateway_outcomes:
        summary = judged.gateways[g.gateway]
        summary.health = "healthy" if g.health == "healthy" else "unhealthy"
        summary.consecutive_failures = g.consecutive_failures
        if g.health != g.health_before and not (g.health_before is None and g.health == "healthy"):
            summary.transition = "unhealthy" if g.health == "unhealthy" else "recovered"
    failed_reconnects = {r.outcome.instance_id: r.error for r in attempts if not r.ok}
    transitions = [
        HealthTransition(
            instance_id=d.outcome.instance_id,
            organization_id=d.outcome.organization_id,
            instance_name=d.outcome.instance_name,
            gateway=d.outcome.gateway,
            kind=kind,
            consecutive_failures=d.outcome.failures,
            health=d.outcome.health,
            detail=failed_reconnects.get(d.outcome.instance_id) if kind == "reconnect" else None,
        )
        for d in decisions
        for kind in d.kinds
    ]
    _log_transitions(transitions)
    healthy = sum(1 for d in decisions if d.outcome.failures == 0)
    return HealthResult(
        checked=len(decisions) + judged.not_judged,
        healthy=healthy,
        failing=len(decisions) - healthy,
        not_judged=judged.not_judged,
        status_changes=status_changes,
        alerts=sum(1 for t in transitions if t.kind == "alert"),
        reconnects=sum(1 for t in transitions if t.kind == "reconnect"),
        reconnect_failures=len(failed_reconnects),
        recoveries=sum(1 for t in transitions if t.kind == "recovered"),
        by_gateway=judged.gateways,
        transitions=transitions[:REPORT_LIST_CAP],
    )


def _log_transitions(transitions: Sequence[HealthTransition]) -> None:
    log = run_logger("zapsync.health")
    for t in transitions[:20]:
        log.info(
            "[HEALTH] %s/%s: %s after %d failures%s",
            t.gateway,
            t.instance_name,
            t.kind,
            t.consecutive_failures,
            f" ({t.detail})" if t.detail else "",
        )
