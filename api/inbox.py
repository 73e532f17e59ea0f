"""Webhook handling after authentication: dedupe, store, and apply the cheap effects in one transaction.

Status events go through the same repository function as the periodic sync (newest observation wins, one
history row per real transition). A gateway stuck in a reconnect loop repeats the same `connection.update`
dozens of times a second; a repeat of the state already stored costs a lookup in this process's memory
(:class:`RepeatFilter`), or at most one indexed row lock, and writes no inbox row.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from db.engine import session_scope
from db.repositories.instances import AppliedChange, StatusWrite, apply_status_writes
from db.repositories.webhooks import lock_instance, store_event
from gateways.base import Provider
from gateways.webhooks import EventKind, WebhookEvent, dedupe_key, observation_time
from zapsync.settings import get_settings

log = logging.getLogger("zapsync.webhooks")

Outcome = Literal["applied", "duplicate", "ignored", "stored"]


@dataclass(frozen=True)
class HandlingResult:
    """What became of one delivery."""

    outcome: Outcome
    detail: str | None = None
    changes: tuple[AppliedChange, ...] = ()


class RepeatFilter:
    """Remembers, per instance, the last status event this process handled, for a few seconds.

    A delivery equal to that last one (same state, reason and QR code) within the window is a repeat and costs
    only this lookup. Only the *last* state counts, so a real flip-flop (open, connecting, open) is never
    swallowed. Bounded (LRU) so a flood across many instances cannot grow it without limit.
    """

    def __init__(self, window_seconds: float, max_entries: int = 50_000) -> None:
        self.window = window_seconds
        self.max_entries = max_entries
        self._last: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @staticmethod
    def keys(organization_id: uuid.UUID, event: WebhookEvent) -> tuple[str, str]:
        """(which instance, which state) of a status event, ignoring its timestamp."""
        qr = hashlib.sha1(event.qr_code.encode()).hexdigest() if event.qr_code else ""
        return (f"{organization_id}|{event.provider}|{event.instance_name}",
                f"{event.status}|{event.reason}|{qr}")

    def is_repeat(self, instance_key: str, state_key: str) -> bool:
        """True when ``state_key`` is the instance's last handled state and the window has not passed."""
        last = self._last.get(instance_key)
        return last is not None and last[0] == state_key and last[1] > time.monotonic()

    def remember(self, instance_key: str, state_key: str) -> None:
        """Make ``state_key`` the instance's last handled state for the window."""
        self._last[instance_key] = (state_key, time.monotonic() + self.window)
        self._last.move_to_end(instance_key)
        while len(self._last) > self.max_entries:
            self._last.popitem(last=False)


def gateways_for(provider: Provider) -> list[str]:
    """Names of the configured gateways speaking ``provider`` (its own name too, for unconfigured setups)."""
    names = [name for name, config in get_settings().gateways().items() if config.provider == provider]
    return names or [str(provider)]


async def handle_event(
    organization_id: uuid.UUID,
    event: WebhookEvent,
    payload: dict[str, Any],
    *,
    repeats: RepeatFilter,
    received_at: datetime | None = None,
) -> HandlingResult:
    """Dedupe, store and apply one authenticated, parsed delivery."""
    received_at = received_at or datetime.now(UTC)
    if event.kind is EventKind.STATUS:
        instance_key, state_key = repeats.keys(organization_id, event)
        if repeats.is_repeat(instance_key, state_key):
            return HandlingResult("duplicate", "repeat of the state just handled")
        result = await _handle_status(organization_id, event, payload, received_at)
        if result.outcome in ("applied", "duplicate"):
            repeats.remember(instance_key, state_key)
        return result
    key = dedupe_key(organization_id, event, payload)
    async with session_scope() as session:
        stored = await store_event(
            session, organization_id=organization_id, provider=event.provider, event=event.event,
            instance_name=event.instance_name, dedupe_key=key, payload=payload, outcome="stored",
        )
    return HandlingResult("stored" if stored else "duplicate")


async def _handle_status(
    organization_id: uuid.UUID, event: WebhookEvent, payload: dict[str, Any], received_at: datetime
) -> HandlingResult:
    assert event.status is not None
    assert event.instance_name is not None
    tolerance = timedelta(seconds=get_settings().webhook_event_time_tolerance_seconds)
    observed_at = observation_time(event.event_time, received_at, tolerance)
    key = dedupe_key(organization_id, event, payload)
    store = {
        "organization_id": organization_id, "provider": event.provider, "event": event.event,
        "instance_name": event.instance_name, "dedupe_key": key, "payload": payload,
    }
    async with session_scope() as session:
        instance = await lock_instance(
            session, organization_id=organization_id, gateways=gateways_for(event.provider),
            instance_name=event.instance_name,
        )
        if instance is None:
            detail = "no instance of that name in this organization"
            await store_event(session, **store, outcome="ignored", error=detail)
            return HandlingResult("ignored", detail)
        if instance.status_observed_at is not None and observed_at <= instance.status_observed_at:
            detail = "older than the stored observation"
            await store_event(session, **store, outcome="ignored", error=detail)
            return HandlingResult("ignored", detail)
        write = StatusWrite(
            instance_id=instance.id, status=event.status, observed_at=observed_at, reason=event.reason,
            phone_number=event.phone_number, profile_name=event.profile_name, qr_code=event.qr_code,
            logged_out=event.logged_out,
        )
        repeat = instance.status == event.status and (event.qr_code is None or event.qr_code == instance.qr_code)
        changes = await apply_status_writes(session, [write], source="webhook")
        if repeat:
            return HandlingResult("duplicate", "state already stored")
        await store_event(session, **store, outcome="applied")
    return HandlingResult("applied", changes=tuple(changes))
