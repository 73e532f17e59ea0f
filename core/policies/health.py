"""Health-monitor rules: judging one check, the thresholds it crosses, how to reconnect, what to tell a person."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.domain import HealthOutcome, InstanceStatus, Provider, StatusObservation

TransitionKind = Literal["alert", "reconnect", "recovered"]
ReconnectMethod = Literal["restart", "connect"]

_HEALTH_OF_STATUS = {
    InstanceStatus.CONNECTED: "healthy",
    InstanceStatus.CONNECTING: "unhealthy",
    InstanceStatus.QR_PENDING: "disconnected",
    InstanceStatus.DISCONNECTED: "disconnected",
    InstanceStatus.ERROR: "error",
}


def classify(observation: StatusObservation) -> tuple[bool, str]:
    """(passed, health) of one observation; an instance its (reachable) gateway could not answer for is unhealthy."""
    if observation.status is None:
        return False, "unhealthy"
    return observation.status is InstanceStatus.CONNECTED, _HEALTH_OF_STATUS[observation.status]


def can_reconnect(outcome: HealthOutcome) -> bool:
    """Whether a reconnect can help: allowed by the organization, and the session does not need a new QR scan."""
    return (
        outcome.auto_reconnect
        and not outcome.logged_out
        and outcome.paired
        and outcome.status != InstanceStatus.QR_PENDING
    )


def transitions(outcome: HealthOutcome, *, alert_after: int, reconnect_after: int) -> list[TransitionKind]:
    """What crossing a threshold in this check means: alert, reconnect, or recovery after an alert."""
    before, now = outcome.failures_before, outcome.failures
    if now == 0:
        return ["recovered"] if before >= alert_after else []
    found: list[TransitionKind] = []
    if before < alert_after <= now:
        found.append("alert")
    if before < reconnect_after <= now and can_reconnect(outcome):
        found.append("reconnect")
    return found


def reconnect_method(provider: Provider, status: str) -> ReconnectMethod:
    """Which gateway call reconnects an instance in ``status``.

    Evolution (gateways.md §1.3): `restart` only works on a live socket (`open`/`connecting`) and answers
    `{"error": true}` on a closed one, while `connect` starts a closed session (and resumes a paired one from its
    stored credentials). So a closed or refused session is connected, a stuck `connecting` one restarted. MegaAPI's
    restart brings back a paired session in any state, and its "connect" only fetches a QR code.
    """
    if provider is Provider.EVOLUTION and status in (InstanceStatus.DISCONNECTED, InstanceStatus.ERROR):
        return "connect"
    return "restart"


def alert_message(outcome: HealthOutcome, *, reconnect_after: int) -> str:
    """What the instance's user should read in an alert."""
    if outcome.logged_out:
        return "WhatsApp logged this number out: scan a new QR code to reconnect."
    if not outcome.auto_reconnect:
        return f"{outcome.failures} failed checks in a row; automatic reconnection is off for this organization."
    if not outcome.paired:
        return f"{outcome.failures} failed checks in a row; this number was never connected: scan the QR code."
    return f"{outcome.failures} failed checks in a row; reconnecting after {reconnect_after}."


@dataclass(frozen=True, slots=True)
class HealthDecision:
    """A recorded check and the transitions it crossed."""

    outcome: HealthOutcome
    kinds: tuple[TransitionKind, ...]


def describe_issues(
    instance: dict[str, object], gateway: dict[str, object] | None, *, alert_after: int, reconnect_after: int
) -> list[str]:
    """Problems a person should know about one instance (seed 003's "problems detected"), most urgent first."""
    issues: list[str] = []
    if gateway is not None and gateway.get("health") == "unhealthy":
        issues.append(
            f"gateway {gateway['gateway']} is unreachable ({gateway.get('last_error') or 'no answer'}): "
            "the instance's state is unknown"
        )
    if instance.get("logged_out"):
        issues.append("logged out by WhatsApp: scan a new QR code")
    failures = int(str(instance.get("consecutive_failures") or 0))
    if failures:
        issues.append(
            f"{failures} failed health check{'s' if failures != 1 else ''} in a row"
            + (" (alert raised)" if failures >= alert_after else "")
        )
        if failures >= reconnect_after and not instance.get("auto_reconnect"):
            issues.append("automatic reconnection is off for this organization")
    if instance.get("status") == InstanceStatus.QR_PENDING:
        issues.append("waiting for a QR code scan")
    elif instance.get("status") == InstanceStatus.ERROR:
        issues.append(f"gateway reports an error ({instance.get('status_reason') or 'no reason given'})")
    if instance.get("last_health_check_at") is None:
        issues.append("not checked by the health monitor yet")
    return issues
