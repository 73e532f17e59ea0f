"""Sending one outbox message through its instance's gateway, once, and recording what became of it.

Per message (a ``send`` queue item, key = the message id):

1. Nothing to do when it already has the gateway's id (an echo adopted it) or is no longer outstanding.
2. ``failed`` for good when its instance is logged out (it needs a new QR code) or its gateway is not configured;
   an instance that is not connected waits (retried with backoff).
3. A message whose earlier attempt has an unknown outcome (``unknown``, or attempted by a drain that died) waits
   ``send_unknown_grace_seconds`` after that attempt for the gateway's echo; then, where the gateway reads history,
   a fromMe message in that chat since the attempt with the same content is adopted; only if none is found is it
   sent again.
4. ``attempted_at`` is committed before the HTTP call (an echo can only adopt a message that was tried); the call is
   made once: accepted → the gateway's id and ``sent`` (merged with a row its echo inserted); refused for good →
   ``failed`` with the reason; not taken (503, connection refused, open breaker) → retried with backoff; no answer →
   ``unknown``, retried after the grace period. Every status change is published as ``message.status``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import (
    GatewayError,
    GatewayOutcomeUnknown,
    GatewayTransientError,
)
from core.policies.backoff import should_give_up
from db.engine import session_scope
from db.repositories.live_events import publish
from db.repositories.outbox import (
    OUTSTANDING,
    SendJob,
    Sent,
    load_send_job,
    mark_attempted,
    record_sent,
    record_sent_many,
    restore_attempt,
    set_outcome,
    status_events,
    stored_external_ids,
    write_wave,
)
from db.repositories.work_queue import ClaimedItem, complete_many
from gateways.base import Gateway

LOGGED_OUT = "instance logged out"
RECONCILE_SKEW = timedelta(seconds=2)
"""How far before the attempt a gateway's message may be stamped (WhatsApp stamps whole seconds)."""
RECONCILE_PAGE = 50


@dataclass(frozen=True, slots=True)
class SendPolicy:
    """How a drain sends."""

    timeout_seconds: float
    unknown_grace_seconds: float
    max_attempts: int


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What became of one item: done (with a summary), failed for good (``error``), or to be tried again after
    ``retry_after`` seconds (``error`` says why). A transient failure is raised instead (the queue's backoff)."""

    summary: str | None = None
    error: str | None = None
    retry_after: float | None = None
    external_id: str | None = None


async def _outcome(job: SendJob, *, status: str, error: str, session: AsyncSession | None = None) -> None:
    if session is None:
        async with session_scope() as own:
            await _outcome(job, status=status, error=error, session=own)
        return
    change = await set_outcome(session, job, status=status, error=error)
    if change is not None:
        await publish(status_events(job.organization_id, [change]), session=session)


async def _adopt(job: SendJob, *, external_id: str, status: str, sent_at: datetime | None) -> bool:
    async with session_scope() as session:
        return await _adopt_in(session, job, external_id=external_id, status=status, sent_at=sent_at)


async def _adopt_in(
    session: AsyncSession, job: SendJob, *, external_id: str, status: str, sent_at: datetime | None
) -> bool:
    change = await record_sent(session, job, external_id=external_id, status=status, sent_at=sent_at)
    if change is not None:
        await publish(status_events(job.organization_id, [change]), session=session)
    current = await load_send_job(session, job.message_id)
    return current is not None and current.external_id is not None


async def reconcile(gateway: Gateway, job: SendJob) -> str | None:
    """Look for the message at the gateway (a fromMe message in its chat since the attempt with the same content)
    and adopt it; returns its id, or None when not found (or the gateway cannot read history)."""
    if not gateway.supports_history or job.attempted_at is None:
        return None
    since = job.attempted_at - RECONCILE_SKEW
    page = await gateway.fetch_messages(
        job.instance_name, page=1, page_size=RECONCILE_PAGE, since=since, chat_jid=job.to_jid
    )
    candidates = sorted(
        (m for m in page.messages if m.from_me and m.type == job.type and (m.content or None) == (job.content or None)),
        key=lambda m: m.timestamp,
    )
    if not candidates:
        return None
    async with session_scope() as session:  # one transaction: the lookup and the adoption
        taken = await stored_external_ids(session, job.instance_id, [m.external_id for m in candidates])
        for found in candidates:
            if found.external_id in taken:
                continue
            status = found.status if found.status not in (None, "pending", "failed") else "sent"
            if await _adopt_in(session, job, external_id=found.external_id, status=status, sent_at=found.sent_at):
                return found.external_id
    return None


async def send_item(
    item: ClaimedItem, gateways: Mapping[str, Gateway], policy: SendPolicy, *, loaded: SendJob | None = None
) -> SendOutcome:
    """Send one queued outbox message (the rules in the module's docstring); transient failures are raised.
    ``loaded``: the message as read in the transaction that claimed the item (not read again)."""
    message_id = int(item.payload.get("message_id") or item.key)
    job = loaded
    if job is None:
        async with session_scope() as session:
            job = await load_send_job(session, message_id)
    if job is None:
        return SendOutcome(summary=f"message {message_id} no longer exists")
    if job.external_id is not None:
        return SendOutcome(summary=f"message {message_id} already {job.status}", external_id=job.external_id)
    if job.status not in OUTSTANDING:
        return SendOutcome(summary=f"message {message_id} already {job.status}")
    if job.logged_out:
        await _outcome(job, status="failed", error=LOGGED_OUT)
        return SendOutcome(error=LOGGED_OUT)
    gateway = gateways.get(job.gateway)
    if gateway is None:
        error = f"gateway {job.gateway!r} is not configured"
        await _outcome(job, status="failed", error=error)
        return SendOutcome(error=error)
    if job.instance_status != "connected":
        return await _transient(
            job, item, policy, GatewayTransientError(f"instance {job.instance_name} is not connected")
        )
    if job.attempted_at is not None:  # an earlier attempt's outcome is unknown
        waited = (datetime.now(UTC) - job.attempted_at).total_seconds()
        if waited < policy.unknown_grace_seconds:
            reason = job_reason(job)
            await _outcome(job, status="unknown", error=reason)
            return SendOutcome(error=reason, retry_after=policy.unknown_grace_seconds - waited)
        if (found := await reconcile(gateway, job)) is not None:
            return SendOutcome(summary=f"message {message_id} found at the gateway as {found}", external_id=found)
    async with session_scope() as session:
        attempted = await mark_attempted(session, message_id)
    if attempted is None:  # an echo adopted it meanwhile
        return SendOutcome(summary=f"message {message_id} already sent")
    try:
        result = await gateway.send(job.instance_name, job.outgoing(), timeout_seconds=policy.timeout_seconds)
    except GatewayError as exc:
        return await failed_send(job, item, policy, exc)
    await _adopt(job, external_id=result.external_id, status=result.status, sent_at=None)
    return SendOutcome(summary=f"message {message_id} sent as {result.external_id}", external_id=result.external_id)


async def failed_send(
    job: SendJob, item: ClaimedItem, policy: SendPolicy, exc: GatewayError, *, session: AsyncSession | None = None
) -> SendOutcome:
    """What becomes of a message whose one call (made after ``attempted_at`` was committed) raised ``exc``: refused
    for good → ``failed``; no answer → ``unknown``, retried after the grace period; not taken → ``attempted_at`` put
    back and the error raised (the queue's backoff), or ``failed`` once the item used its attempts. ``session``: the
    caller's transaction to write in (it then also finishes the item: one transaction per fault); else its own."""
    if isinstance(exc, GatewayOutcomeUnknown):
        if should_give_up(item.attempts, policy.max_attempts):
            error = f"gave up after {item.attempts} attempts: {_reason(exc)}"
            await _outcome(job, status="unknown", error=error, session=session)
            return SendOutcome(error=error)
        await _outcome(job, status="unknown", error=_reason(exc), session=session)
        return SendOutcome(error=_reason(exc), retry_after=policy.unknown_grace_seconds)
    if isinstance(exc, GatewayTransientError):
        if session is None:
            async with session_scope() as own:
                await restore_attempt(own, job.message_id, job.attempted_at)
        else:
            await restore_attempt(session, job.message_id, job.attempted_at)
        return await _transient(job, item, policy, exc, session=session)
    # refused for good (number not on WhatsApp), or auth, not found, not supported: a retry cannot cure it
    await _outcome(job, status="failed", error=_reason(exc), session=session)
    return SendOutcome(error=_reason(exc))


# -- the set-based path: many instances' messages per statement (a wave) ------------------------------------------


def fast_gateway(job: SendJob | None, gateways: Mapping[str, Gateway]) -> Gateway | None:
    """The gateway of a message that can go the set-based way (never attempted, ``pending``, its instance connected
    and its gateway configured); None sends it down :func:`send_item`'s one-message path."""
    if job is None or job.external_id is not None or job.status != "pending" or job.attempted_at is not None:
        return None
    if job.logged_out or job.instance_status != "connected":
        return None
    return gateways.get(job.gateway)


MARKED = "marked"
"""What :func:`run_wave` answers for a message it stamped ``attempted_at`` on: it may be sent now."""
LEASE_LOST = "lease lost"
"""What :func:`run_wave` answers for a message whose item another drain holds now: it must not be sent."""

Recorded = tuple[ClaimedItem, Sent]
"""An accepted send to record, with its item."""
ToMark = tuple[ClaimedItem, SendJob]
"""A message about to be sent, with its item."""


async def run_wave(
    wave: Sequence[tuple[Recorded | None, ToMark | None]],
    *,
    connection: psycopg.AsyncConnection[Any] | None = None,
) -> list[tuple[bool, str | None]]:
    """One wave of lines, each with the send it just finished and/or the message it sends next, in one statement.

    The accepted sends get their gateway ids (merged with rows their echoes inserted), their status changes are
    announced and their items done; then the next messages get ``attempted_at`` (committed before any of them is
    sent; only never-attempted ``pending`` messages of connected instances whose items are still held). Per entry:
    whether the recorded item was still held (the send is recorded either way), and the mark's answer —
    :data:`MARKED`, None when not stamped (the one-message rules decide), or :data:`LEASE_LOST`. ``connection``:
    a driver connection in autocommit to run the wave's statement on (no BEGIN, COMMIT or pool pre-ping for
    it).
    """
    recorded = [entry for entry, _ in wave if entry is not None]
    to_mark = [entry for _, entry in wave if entry is not None]
    recording = [(sent, item.id, item.lease_token) for item, sent in recorded]
    marking = [(job.message_id, item.id, item.lease_token) for item, job in to_mark]
    if connection is not None:  # one statement: atomic on its own, on a connection in autocommit
        written = await write_wave(connection, recording, marking)
    else:
        async with session_scope() as session:
            written = await write_wave(session, recording, marking)
    held = set(written.completed)
    rest = [(item, sent) for item, sent in recorded if sent.job.message_id not in written.recorded]
    if rest:  # rare: an echo's row to merge, an id held elsewhere, a row an echo adopted meanwhile
        async with session_scope() as session:
            changes = await record_sent_many(session, [sent for _, sent in rest])
            events = [
                event
                for (_, sent), change in zip(rest, changes, strict=True)
                if change is not None
                for event in status_events(sent.job.organization_id, [change])
            ]
            await publish(events, session=session)
            held |= await complete_many(session, [(item, {"external_id": sent.external_id}) for item, sent in rest])
    answers: list[tuple[bool, str | None]] = []
    for entry, mark in wave:
        answer: str | None = None
        if mark is not None:
            message_id = mark[1].message_id
            answer = LEASE_LOST if message_id not in written.held else MARKED if message_id in written.marked else None
        answers.append((entry is not None and entry[0].id in held, answer))
    return answers


def job_reason(job: SendJob) -> str:
    """Why a message waits: its earlier attempt got no answer."""
    return f"no answer from the gateway to the attempt at {job.attempted_at:%H:%M:%S}; waiting for its echo"


async def _transient(
    job: SendJob,
    item: ClaimedItem,
    policy: SendPolicy,
    exc: GatewayTransientError,
    *,
    session: AsyncSession | None = None,
) -> SendOutcome:
    """Raise ``exc`` (the queue retries it with backoff), or fail the message once the item used its attempts."""
    if not should_give_up(item.attempts, policy.max_attempts):
        raise exc
    error = f"gave up after {item.attempts} attempts: {_reason(exc)}"
    await _outcome(job, status="failed", error=error, session=session)
    return SendOutcome(error=error)


def _reason(exc: GatewayError) -> str:
    """The error's sentence without the gateway's name in front (it is the instance's own gateway)."""
    message = exc.message
    if exc.gateway and message.startswith(f"{exc.gateway}: "):
        message = message[len(exc.gateway) + 2 :]
    return message[:500]
