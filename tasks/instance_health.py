"""Health-monitor work: judge observations (pure), record them with their transitions, reconnect through gateways
(plain functions, each wrapped by one thin task).

Transitions are derived from the failure counter the same statement increments, and their live events are
written in that transaction, so each alert, reconnect decision and recovery is announced exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.domain import HealthCheck, HealthOutcome, InstanceRef, StatusObservation
from core.errors import GatewayError
from core.events import Kind, NewLiveEvent, event, qr_event, status_change_events
from core.policies.health import HealthDecision, ReconnectMethod, alert_message, classify, reconnect_method, transitions
from core.policies.status import diff_observations
from db.engine import session_scope
from db.repositories.health import GatewayCheck, GatewayOutcome, record_gateway_checks, record_health
from db.repositories.instances import apply_status_writes
from db.repositories.live_events import publish
from gateways.base import Gateway
from gateways.registry import history_gateways
from tasks.import_requests import enqueue_connect_imports
from tasks.options import TASK_OPTIONS


def _instance_fields(outcome: HealthOutcome) -> dict[str, object]:
    return {
        "instance_id": str(outcome.instance_id),
        "instance_name": outcome.instance_name,
        "user_id": outcome.user_id,
        "gateway": outcome.gateway,
        "status": outcome.status,
        "health": outcome.health,
        "consecutive_failures": outcome.failures,
    }


@dataclass(frozen=True, slots=True)
class RecordedChecks:
    """What one batch of checks wrote."""

    decisions: list[HealthDecision]
    status_changes: int


async def record_health_checks(
    refs: Sequence[InstanceRef],
    observations: Sequence[StatusObservation],
    *,
    confirmed: set[str],
    checked_at: datetime,
    alert_after: int,
    reconnect_after: int,
    flow_run_id: uuid.UUID | None,
) -> RecordedChecks:
    """In one transaction: apply observed statuses (newest wins), queue the imports of instances that connected,
    count failures, and publish the transitions."""
    _, _, writes = diff_observations(refs, observations, confirmed=confirmed)
    checks = []
    for ref, observation in zip(refs, observations, strict=True):
        ok, health = classify(observation)
        checks.append(HealthCheck(instance_id=ref.id, ok=ok, health=health, checked_at=checked_at))
    async with session_scope() as session:
        changes = await apply_status_writes(session, writes, source="monitor", flow_run_id=flow_run_id)
        await enqueue_connect_imports(session, changes, trigger="monitor", import_gateways=history_gateways())
        outcomes = await record_health(session, checks)
        decisions = [
            HealthDecision(o, tuple(transitions(o, alert_after=alert_after, reconnect_after=reconnect_after)))
            for o in outcomes
        ]
        events = status_change_events(changes, source="monitor")
        for decision in decisions:
            o = decision.outcome
            if "alert" in decision.kinds:
                events.append(
                    event(
                        o.organization_id,
                        Kind.HEALTH_ALERT,
                        **_instance_fields(o),
                        logged_out=o.logged_out,
                        reconnect="reconnect" in decision.kinds,
                        message=alert_message(o, reconnect_after=reconnect_after),
                    )
                )
            if "recovered" in decision.kinds:
                events.append(
                    event(
                        o.organization_id,
                        Kind.HEALTH_RECOVERED,
                        **_instance_fields(o),
                        failed_checks=o.failures_before,
                        message="Reconnected: the number is back.",
                    )
                )
        await publish(events, session=session)
    return RecordedChecks(decisions=decisions, status_changes=len(changes))


record_checks = task(name="record-health", **TASK_OPTIONS)(record_health_checks)


@dataclass(frozen=True, slots=True)
class ReconnectResult:
    """One reconnect attempt through the gateway."""

    outcome: HealthOutcome
    method: ReconnectMethod
    ok: bool
    error: str | None = None
    qr_code: str | None = None
    pairing_code: str | None = None


async def _reconnect_one(gateway: Gateway, outcome: HealthOutcome) -> ReconnectResult:
    method = reconnect_method(gateway.provider, outcome.status)
    try:
        if method == "connect":
            result = await gateway.connect(outcome.instance_name)
            return ReconnectResult(outcome, method, ok=True, qr_code=result.qr_code, pairing_code=result.pairing_code)
        await gateway.restart(outcome.instance_name)
        return ReconnectResult(outcome, method, ok=True)
    except GatewayError as exc:
        return ReconnectResult(outcome, method, ok=False, error=exc.message)


async def reconnect_instances(gateway: Gateway, outcomes: Sequence[HealthOutcome]) -> list[ReconnectResult]:
    """Reconnect instances at one gateway (the client bounds concurrency); announce each attempt and any QR code."""
    results = list(await asyncio.gather(*(_reconnect_one(gateway, o) for o in outcomes)))
    events: list[NewLiveEvent] = []
    for r in results:
        o = r.outcome
        message = (
            "Reconnecting…"
            if r.ok and not r.qr_code
            else "Scan the new QR code to reconnect."
            if r.ok
            else "Automatic reconnection failed: reconnect manually."
        )
        events.append(
            event(
                o.organization_id,
                Kind.HEALTH_RECONNECT,
                **_instance_fields(o),
                method=r.method,
                ok=r.ok,
                error=r.error,
                needs_qr=r.qr_code is not None,
                message=message,
            )
        )
        if r.qr_code:
            events.append(
                qr_event(
                    o.organization_id,
                    instance_id=o.instance_id,
                    instance_name=o.instance_name,
                    qr_code=r.qr_code,
                    pairing_code=r.pairing_code,
                )
            )
    await publish(events)
    return results


# retries=0: a reconnect is asked once per failure streak, and a failed one asks the user to act.
reconnect = task(name="reconnect-instances", cache_policy=NO_CACHE, retries=0)(reconnect_instances)


async def record_gateway_health(
    checks: Sequence[GatewayCheck], organizations: dict[str, set[uuid.UUID]]
) -> list[GatewayOutcome]:
    """Store each gateway's health; tell every organization with instances there when it goes down or recovers."""
    async with session_scope() as session:
        outcomes = await record_gateway_checks(session, checks)
        errors = {c.gateway: c.error for c in checks}
        events = []
        for g in outcomes:
            if g.health == g.health_before or (g.health_before is None and g.health == "healthy"):
                continue
            kind = Kind.GATEWAY_UNHEALTHY if g.health == "unhealthy" else Kind.GATEWAY_RECOVERED
            message = (
                f"Gateway {g.gateway} is unreachable: its instances' status is unknown until it answers."
                if g.health == "unhealthy"
                else f"Gateway {g.gateway} answers again."
            )
            events += [
                event(org, kind, gateway=g.gateway, error=errors.get(g.gateway), message=message)
                for org in sorted(organizations.get(g.gateway, set()))
            ]
        await publish(events, session=session)
    return outcomes


record_gateways = task(name="record-gateway-health", **TASK_OPTIONS)(record_gateway_health)
