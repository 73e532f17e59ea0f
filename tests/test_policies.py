"""The pure rules of core/: status diffing, health thresholds and messages, closing messages, import keys, phones.

No database, no Prefect, no HTTP: plain values in, plain values out.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from core.domain import HealthOutcome, InstanceRef, InstanceStatus, Provider, StatusObservation
from core.phones import digits, phone_from_jid, phone_variants
from core.policies.health import (
    alert_message,
    can_reconnect,
    classify,
    describe_issues,
    reconnect_method,
    transitions,
)
from core.policies.imports import connection_key
from core.policies.inactivity import closing_message
from core.policies.status import diff_observations, pick_live_confirmations

pytestmark = pytest.mark.pure

ORG = uuid.UUID("00000000-0000-4000-8000-000000000001")
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ref(name: str, status: InstanceStatus, *, confirmed_at: datetime | None = None) -> InstanceRef:
    """An instance row as status sync reads it."""
    return InstanceRef(
        id=uuid.uuid5(ORG, name),
        organization_id=ORG,
        gateway="evolution",
        instance_name=name,
        status=status,
        status_observed_at=None,
        live_confirmed_at=confirmed_at,
    )


def seen(name: str, status: InstanceStatus | None, **fields: Any) -> StatusObservation:
    """What a gateway said about ``name`` (``status=None``: it could not be asked)."""
    return StatusObservation(instance_name=name, status=status, observed_at=NOW, **fields)


# -- status sync ----------------------------------------------------------------------------------------------


def test_forced_live_confirmation_covers_every_connected_instance_and_nothing_else() -> None:
    refs = [
        ref("a", InstanceStatus.CONNECTED, confirmed_at=NOW),
        ref("b", InstanceStatus.CONNECTED),
        ref("c", InstanceStatus.DISCONNECTED),
        ref("d", InstanceStatus.CONNECTING),
    ]
    assert pick_live_confirmations(refs, force=True, budget=0) == {"a", "b"}


def test_live_confirmation_takes_the_never_confirmed_then_the_stalest_within_budget() -> None:
    refs = [
        ref("recent", InstanceStatus.CONNECTED, confirmed_at=NOW),
        ref("old", InstanceStatus.CONNECTED, confirmed_at=NOW - timedelta(hours=3)),
        ref("never", InstanceStatus.CONNECTED),
        ref("down", InstanceStatus.DISCONNECTED),
    ]
    assert pick_live_confirmations(refs, force=False, budget=1) == {"never"}
    assert pick_live_confirmations(refs, force=False, budget=2) == {"never", "old"}
    assert pick_live_confirmations(refs, force=False, budget=10) == {"never", "old", "recent"}
    assert pick_live_confirmations(refs, force=False, budget=0) == set()


def test_an_unreachable_observation_is_reported_and_never_becomes_a_write() -> None:
    refs = [ref("lost", InstanceStatus.CONNECTED), ref("up", InstanceStatus.DISCONNECTED)]
    observations = [seen("lost", None, error="timed out"), seen("up", InstanceStatus.CONNECTED)]

    drifts, unreachable, writes = diff_observations(refs, observations)

    assert [(u.instance_name, u.gateway, u.error) for u in unreachable] == [("lost", "evolution", "timed out")]
    assert [w.instance_id for w in writes] == [refs[1].id]
    assert [d.instance_name for d in drifts] == ["up"]


def test_drift_only_where_the_status_differs_and_every_reachable_observation_is_written() -> None:
    refs = [ref("same", InstanceStatus.CONNECTED), ref("moved", InstanceStatus.CONNECTED)]
    observations = [
        seen("same", InstanceStatus.CONNECTED, phone_number="5511999990000"),
        seen("moved", InstanceStatus.DISCONNECTED, reason="428", logged_out=False),
    ]

    drifts, unreachable, writes = diff_observations(refs, observations, confirmed={"same"})

    assert unreachable == []
    assert [(d.instance_name, d.db_status, d.gateway_status, d.reason) for d in drifts] == [
        ("moved", "connected", "disconnected", "428")
    ]
    assert drifts[0].organization_id == ORG and drifts[0].applied is False
    same, moved = writes
    assert (same.status, same.phone_number, same.live_confirmed, same.observed_at) == (
        InstanceStatus.CONNECTED,
        "5511999990000",
        True,
        NOW,
    )
    assert (moved.status, moved.reason, moved.live_confirmed) == (InstanceStatus.DISCONNECTED, "428", False)


def test_observations_must_match_the_rows_one_to_one() -> None:
    with pytest.raises(ValueError, match="shorter"):
        diff_observations([ref("a", InstanceStatus.CONNECTED), ref("b", InstanceStatus.CONNECTED)], [seen("a", None)])


# -- health monitor -------------------------------------------------------------------------------------------

HEALTHY = HealthOutcome(
    instance_id=uuid.uuid5(ORG, "acme-01"),
    organization_id=ORG,
    user_id="user-1",
    gateway="evolution",
    instance_name="acme-01",
    status=InstanceStatus.DISCONNECTED,
    logged_out=False,
    failures_before=0,
    failures=0,
    health_before="healthy",
    health="disconnected",
    auto_reconnect=True,
    paired=True,
)
ALERT_AFTER, RECONNECT_AFTER = 2, 3


def outcome(**changes: Any) -> HealthOutcome:
    """A recorded check, reconnectable unless ``changes`` say otherwise."""
    return dataclasses.replace(HEALTHY, **changes)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, (False, "unhealthy")),
        (InstanceStatus.CONNECTED, (True, "healthy")),
        (InstanceStatus.CONNECTING, (False, "unhealthy")),
        (InstanceStatus.QR_PENDING, (False, "disconnected")),
        (InstanceStatus.DISCONNECTED, (False, "disconnected")),
        (InstanceStatus.ERROR, (False, "error")),
    ],
)
def test_classify_one_check(status: InstanceStatus | None, expected: tuple[bool, str]) -> None:
    assert classify(seen("acme-01", status)) == expected


@pytest.mark.parametrize(
    ("before", "now", "expected"),
    [
        (0, 1, []),
        (1, 2, ["alert"]),
        (2, 3, ["reconnect"]),
        (3, 4, []),  # each threshold is crossed once
        (0, 3, ["alert", "reconnect"]),  # a jump crosses both
        (2, 0, ["recovered"]),
        (1, 0, []),  # no alert was raised, so there is no recovery to announce
        (0, 0, []),
    ],
)
def test_transitions_at_the_alert_and_reconnect_thresholds(before: int, now: int, expected: list[str]) -> None:
    found = transitions(
        outcome(failures_before=before, failures=now), alert_after=ALERT_AFTER, reconnect_after=RECONNECT_AFTER
    )
    assert found == expected


def test_no_reconnect_transition_when_a_reconnect_cannot_help() -> None:
    logged_out = outcome(failures_before=2, failures=3, logged_out=True)
    switched_off = outcome(failures_before=0, failures=3, auto_reconnect=False)
    assert transitions(logged_out, alert_after=ALERT_AFTER, reconnect_after=RECONNECT_AFTER) == []
    assert transitions(switched_off, alert_after=ALERT_AFTER, reconnect_after=RECONNECT_AFTER) == ["alert"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, True),
        ({"auto_reconnect": False}, False),
        ({"logged_out": True}, False),
        ({"paired": False}, False),
        ({"status": InstanceStatus.QR_PENDING}, False),
        ({"status": InstanceStatus.CONNECTING}, True),
    ],
)
def test_can_reconnect(changes: dict[str, object], expected: bool) -> None:
    assert can_reconnect(outcome(**changes)) is expected


def test_reconnect_method_follows_evolution_semantics() -> None:
    assert reconnect_method(Provider.EVOLUTION, InstanceStatus.DISCONNECTED) == "connect"
    assert reconnect_method(Provider.EVOLUTION, InstanceStatus.ERROR) == "connect"
    assert reconnect_method(Provider.EVOLUTION, InstanceStatus.CONNECTING) == "restart"
    assert reconnect_method(Provider.MEGAAPI, InstanceStatus.DISCONNECTED) == "restart"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"logged_out": True}, "WhatsApp logged this number out: scan a new QR code to reconnect."),
        (
            {"auto_reconnect": False},
            "2 failed checks in a row; automatic reconnection is off for this organization.",
        ),
        ({"paired": False}, "2 failed checks in a row; this number was never connected: scan the QR code."),
        ({}, "2 failed checks in a row; reconnecting after 3."),
    ],
)
def test_alert_message(changes: dict[str, object], expected: str) -> None:
    assert alert_message(outcome(failures=2, **changes), reconnect_after=RECONNECT_AFTER) == expected


def test_a_checked_healthy_instance_has_no_issues() -> None:
    instance = {"status": "connected", "consecutive_failures": 0, "last_health_check_at": NOW}
    gateway = {"gateway": "evolution", "health": "healthy"}
    assert describe_issues(instance, gateway, alert_after=ALERT_AFTER, reconnect_after=RECONNECT_AFTER) == []


def test_issues_come_most_urgent_first() -> None:
    instance = {
        "status": InstanceStatus.ERROR,
        "status_reason": "device removed",
        "logged_out": True,
        "consecutive_failures": 3,
        "auto_reconnect": False,
        "last_health_check_at": None,
    }
    gateway = {"gateway": "evolution", "health": "unhealthy", "last_error": "connection refused"}

    issues = describe_issues(instance, gateway, alert_after=ALERT_AFTER, reconnect_after=RECONNECT_AFTER)

    assert issues == [
        "gateway evolution is unreachable (connection refused): the instance's state is unknown",
        "logged out by WhatsApp: scan a new QR code",
        "3 failed health checks in a row (alert raised)",
        "automatic reconnection is off for this organization",
        "gateway reports an error (device removed)",
        "not checked by the health monitor yet",
    ]


def test_issues_below_the_thresholds() -> None:
    instance = {
        "status": InstanceStatus.QR_PENDING,
        "consecutive_failures": 1,
        "auto_reconnect": False,
        "last_health_check_at": NOW,
    }
    issues = describe_issues(instance, None, alert_after=ALERT_AFTER, reconnect_after=RECONNECT_AFTER)
    assert issues == ["1 failed health check in a row", "waiting for a QR code scan"]


# -- inactivity, imports --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hours", "span"),
    [(1, "1 hour"), (2, "2 hours"), (24, "1 day"), (36, "36 hours"), (48, "2 days"), (720, "30 days")],
)
def test_closing_message_says_days_when_the_hours_make_whole_days(hours: int, span: str) -> None:
    assert closing_message(hours) == f"Conversation closed automatically after {span} of inactivity."


def test_connection_key_names_the_moment_whatever_the_time_zone() -> None:
    instance_id = uuid.uuid5(ORG, "acme-01")
    utc = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    sao_paulo = utc.astimezone(timezone(timedelta(hours=-3)))

    assert connection_key(instance_id, sao_paulo) == connection_key(instance_id, utc)
    assert connection_key(instance_id, utc) == f"import:{instance_id}:2026-03-01T12:00:00+00:00"
    assert connection_key(instance_id, utc + timedelta(seconds=1)) != connection_key(instance_id, utc)
    assert connection_key(uuid.uuid5(ORG, "acme-02"), utc) != connection_key(instance_id, utc)


# -- phones ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("+55 (11) 98765-4321", "5511987654321"), ("", None), (None, None), ("no digits", None)],
)
def test_digits(value: str | None, expected: str | None) -> None:
    assert digits(value) == expected


@pytest.mark.parametrize(
    ("phone", "variants"),
    [
        ("5511987654321", ("5511987654321", "551187654321", "11987654321", "1187654321")),
        ("+55 11 8765-4321", ("551187654321", "5511987654321", "11987654321", "1187654321")),
        ("551132654321", ("551132654321",)),  # a landline never gains a ninth digit
        ("14155550100", ("14155550100",)),  # not Brazilian
        (None, ()),
    ],
)
def test_phone_variants(phone: str | None, variants: tuple[str, ...]) -> None:
    assert phone_variants(phone) == variants


@pytest.mark.parametrize(
    ("jid", "phone"),
    [
        ("5511999990000@s.whatsapp.net", "5511999990000"),
        ("5511999990000:12@s.whatsapp.net", "5511999990000"),
        ("5511999990000@c.us", "5511999990000"),
        ("status@broadcast", None),
        (None, None),
    ],
)
def test_phone_from_jid(jid: str | None, phone: str | None) -> None:
    assert phone_from_jid(jid) == phone
