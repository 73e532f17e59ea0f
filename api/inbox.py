"""Webhook handling after authentication: dedupe, store, and apply the cheap effects in one transaction.

Status events go through the same repository function as the periodic sync (newest observation wins, one
history row per real transition). Message events (messages, receipts, contacts) write through the same contact,
conversation and message functions as imports, in the transaction that stores the delivery: a redelivery finds
its inbox row and changes nothing. A gateway stuck in a reconnect loop repeats the same `connection.update`
dozens of times a second; a repeat of the state already stored costs a lookup in this process's memory
(:class:`RepeatFilter`), or at most one indexed row lock, and writes no inbox row.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cachetools import TTLCache
from sqlalchemy.ext.asyncio import AsyncSession

from api.group_commit import ALONE, Alone, GroupCommitter
from core.domain import AppliedChange, ChatKind, GatewayMessage, InstanceStatus, Provider, StatusWrite, WorkKind
from core.events import NewLiveEvent, message_new_event, qr_event, status_change_events
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.conversations import (
    ContactInput,
    ConversationFact,
    InsertedMessage,
    InstanceScope,
    MessageRows,
    advance_conversations,
    advance_message_statuses,
    ensure_conversations,
    insert_messages_returning,
    instance_scope_by_name,
    instance_scopes_by_name,
    unstored_messages,
    upsert_contacts,
)
from db.repositories.instances import apply_status_writes
from db.repositories.live_events import publish
from db.repositories.outbox import StatusChange, adopt_echoes, status_events
from db.repositories.provisioning import set_pairing_code
from db.repositories.webhook_events import (
    InboxRow,
    lock_instance,
    store_event,
    store_events,
    store_untracked_event,
)
from flows.runs import Waker
from gateways.registry import client_class
from gateways.webhook_payloads import (
    QR_LIMIT_REASON,
    EventKind,
    WebhookEvent,
    dedupe_key,
    observation_time,
    untracked_key,
)
from tasks.import_requests import enqueue_connect_imports

log = logging.getLogger("zapsync.webhooks")

Outcome = Literal["applied", "duplicate", "ignored", "stored"]


@dataclass(frozen=True)
class HandlingResult:
    """What became of one delivery."""

    outcome: Outcome
    detail: str | None = None
    imports_queued: int = 0
    """Imports this delivery queued (instances it connected)."""


AfterWebhook = Callable[[uuid.UUID, "WebhookEvent", HandlingResult], Awaitable[None]]
"""What runs after a delivery's commit (waking drains); never fails the delivery. Live events are published in the
delivery's own transaction."""


@dataclass(slots=True)
class _Seen:
    """An instance's last handled state and the newest observation time seen for it."""

    state: str
    newest: datetime | None


class RepeatFilter:
    """Remembers, per instance, the last status event this process handled, for a few seconds.

    A delivery equal to that last one (same state, reason and QR code) within the window is a repeat and costs
    only this lookup. Only the *last* state counts, so a real flip-flop (open, connecting, open) is never
    swallowed. The newest observation time seen for the instance is remembered too, a swallowed repeat's
    included: a delivery older than it, arriving late, is stale (the repeat it is older than was not written, so
    the database alone could not tell). A TTL cache, bounded (least recently used first out) so a flood across many
    instances cannot grow it without limit; ``timer`` is its clock (tests pass one they can advance). A window of 0
    disables it.
    """

    def __init__(
        self, window_seconds: float, max_entries: int = 50_000, *, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window_seconds
        self.max_entries = max_entries
        self._last: TTLCache[str, _Seen] | None = (
            TTLCache(maxsize=max_entries, ttl=window_seconds, timer=timer) if window_seconds > 0 else None
        )

    @staticmethod
    def keys(organization_id: uuid.UUID, event: WebhookEvent) -> tuple[str, str]:
        """(which instance, which state) of a status event, ignoring its timestamp."""
        qr = hashlib.sha1(event.qr_code.encode()).hexdigest() if event.qr_code else ""
        return (f"{organization_id}|{event.provider}|{event.instance_name}", f"{event.status}|{event.reason}|{qr}")

    def is_repeat(self, instance_key: str, state_key: str) -> bool:
        """True when ``state_key`` is the instance's last handled state and the window has not passed."""
        seen = self._last.get(instance_key) if self._last is not None else None
        return seen is not None and seen.state == state_key

    def is_stale(self, instance_key: str, observed_at: datetime) -> bool:
        """True when an observation newer than ``observed_at`` was seen for the instance within the window."""
        seen = self._last.get(instance_key) if self._last is not None else None
        return seen is not None and seen.newest is not None and observed_at < seen.newest

    def remember(self, instance_key: str, state_key: str, observed_at: datetime | None = None) -> None:
        """Make ``state_key`` the instance's last handled state for the window (and ``observed_at`` its newest
        observation, unless a newer one was already seen)."""
        if self._last is None:
            return
        seen = self._last.get(instance_key)
        if seen is None or seen.state != state_key:
            self._last[instance_key] = seen = _Seen(state_key, None)  # a new state starts its window
        if observed_at is not None and (seen.newest is None or observed_at > seen.newest):
            seen.newest = observed_at  # changed in place: a repeat does not extend the window


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
    reapply: bool = False,
) -> HandlingResult:
    """Dedupe, store and apply one authenticated, parsed delivery.

    ``reapply`` (`zapsync webhooks replay`, after a bug fix): a message, receipt or contact delivery whose inbox row
    exists is applied again instead of being answered as a duplicate; its effects are idempotent (a message already
    stored stays one row, statuses only move forward). Status deliveries need no flag: an observation not newer
    than the stored one is ignored either way."""
    received_at = received_at or datetime.now(UTC)
    if event.kind in (EventKind.MESSAGES, EventKind.RECEIPTS):
        return await message_committer().submit(Delivery(organization_id, event, payload, received_at, reapply))
    if event.kind is EventKind.CONTACTS:
        return await _handle_messages(organization_id, event, payload, received_at, reapply=reapply)
    if event.kind is EventKind.STATUS:
        instance_key, state_key = repeats.keys(organization_id, event)
        observed_at = _observed_at(event, received_at)
        if repeats.is_repeat(instance_key, state_key):
            repeats.remember(instance_key, state_key, observed_at)
            return HandlingResult("duplicate", "repeat of the state just handled")
        if repeats.is_stale(instance_key, observed_at):
            return HandlingResult("ignored", STALE)
        result = await _handle_status(organization_id, event, payload, received_at)
        if result.outcome in ("applied", "duplicate") or result.detail == UNTRACKED:
            repeats.remember(instance_key, state_key, observed_at)
        return result
    key = dedupe_key(organization_id, event, payload)
    async with session_scope() as session:
        if event.instance_name and not await instance_scope_by_name(
            session,
            organization_id=organization_id,
            gateways=gateways_for(event.provider),
            instance_name=event.instance_name,
        ):
            return await _store_untracked(session, organization_id, event, payload, acted_on=False)
        stored = await store_event(session, inbox_row(organization_id, event, payload, key, outcome="stored"))
    return HandlingResult("stored" if stored else "duplicate")


def inbox_row(
    organization_id: uuid.UUID,
    event: WebhookEvent,
    payload: dict[str, Any],
    key: str,
    *,
    outcome: str = "applied",
    error: str | None = None,
) -> InboxRow:
    """The delivery's inbox row with ``outcome`` (a handler ``replace``s it when the outcome turns out otherwise)."""
    return InboxRow(
        organization_id=organization_id,
        provider=event.provider,
        event=event.event,
        instance_name=event.instance_name,
        dedupe_key=key,
        payload=payload,
        outcome=outcome,
        error=error,
    )


STALE = "older than an observation this process already handled"


def _observed_at(event: WebhookEvent, received_at: datetime) -> datetime:
    """When the gateway saw the state a status delivery reports (its own time, within tolerance of receipt)."""
    tolerance = timedelta(seconds=get_settings().webhook_event_time_tolerance_seconds)
    return observation_time(event.event_time, received_at, tolerance)


async def _handle_status(
    organization_id: uuid.UUID, event: WebhookEvent, payload: dict[str, Any], received_at: datetime
) -> HandlingResult:
    assert event.status is not None
    assert event.instance_name is not None
    observed_at = _observed_at(event, received_at)
    key = dedupe_key(organization_id, event, payload)
    store = inbox_row(organization_id, event, payload, key)
    async with session_scope() as session:
        instance = await lock_instance(
            session,
            organization_id=organization_id,
            gateways=gateways_for(event.provider),
            instance_name=event.instance_name,
        )
        if instance is None:
            return await _store_untracked(session, organization_id, event, payload)
        if observed_at == instance.status_observed_at and _later_qr_step(event, instance.status):
            # Evolution stamps to the millisecond: a QR code and the `connecting` it follows (or the QR limit and the
            # last QR code) can tie. The QR lifecycle says which is newer.
            observed_at = observed_at + timedelta(microseconds=1)
        if instance.status_observed_at is not None and observed_at <= instance.status_observed_at:
            detail = "older than the stored observation"
            await store_event(session, replace(store, outcome="ignored", error=detail))
            return HandlingResult("ignored", detail)
        write = StatusWrite(
            instance_id=instance.id,
            status=event.status,
            observed_at=observed_at,
            reason=event.reason or after_qr_reason(InstanceStatus(instance.status), event.status),
            phone_number=event.phone_number,
            profile_name=event.profile_name,
            qr_code=event.qr_code,
            logged_out=event.logged_out,
        )
        repeat = instance.status == event.status and (event.qr_code is None or event.qr_code == instance.qr_code)
        changes = await apply_status_writes(session, [write], source="webhook")
        if repeat:
            return HandlingResult("duplicate", "state already stored")
        if event.qr_code is not None:
            await set_pairing_code(session, instance.id, event.pairing_code)
        queued = await enqueue_connect_imports(
            session, changes, trigger="connect", import_gateways=_history_gateways(event.provider)
        )
        # Announced in the delivery's transaction: listeners are notified on its commit, and the gateway's 200 waits
        # for one transaction, not two.
        await publish(status_news(organization_id, event, instance.id, changes), session=session)
        await store_event(session, store)
    return HandlingResult("applied", imports_queued=len(queued))


def status_news(
    organization_id: uuid.UUID, event: WebhookEvent, instance_id: uuid.UUID, changes: Sequence[AppliedChange]
) -> list[NewLiveEvent]:
    """The live events of an applied status delivery: its transitions, and its QR code when it carries one."""
    news = status_change_events(changes, source="webhook")
    if event.qr_code and event.instance_name:
        news.append(
            qr_event(
                organization_id,
                instance_id=instance_id,
                instance_name=event.instance_name,
                qr_code=event.qr_code,
                pairing_code=event.pairing_code,
            )
        )
    return news


UNTRACKED = "no instance of that name in this organization"


async def _store_untracked(
    session: AsyncSession,
    organization_id: uuid.UUID,
    event: WebhookEvent,
    payload: dict[str, Any],
    *,
    acted_on: bool = True,
) -> HandlingResult:
    """A delivery for an instance the organization does not track: one inbox row per instance and event name,
    refreshed at most once per window, whatever changes between deliveries (Evolution's `date_time` in a
    reconnect loop). ``ignored`` (``stored`` for an event zapsync never acts on) when the row was written,
    ``duplicate`` when the window had not passed."""
    assert event.instance_name is not None
    outcome: Outcome = "ignored" if acted_on else "stored"
    written = await store_untracked_event(
        session,
        organization_id=organization_id,
        provider=event.provider,
        event=event.event,
        instance_name=event.instance_name,
        dedupe_key=untracked_key(organization_id, event),
        payload=payload,
        outcome=outcome,
        error=UNTRACKED if acted_on else None,
        refresh_after_seconds=get_settings().webhook_untracked_window_seconds,
    )
    return HandlingResult(outcome if written else "duplicate", UNTRACKED if acted_on else None)


QR_EXPIRED_REASON = "the QR code expired before it was scanned: ask for a new QR code"
QR_GONE_REASON = "the QR code is no longer valid: the gateway is reconnecting"


def after_qr_reason(stored: InstanceStatus, new: InstanceStatus) -> str | None:
    """Why a session waiting for a scan left that state without connecting (a clear reason, not a silent stall)."""
    if stored is not InstanceStatus.QR_PENDING:
        return None
    if new is InstanceStatus.DISCONNECTED:
        return QR_EXPIRED_REASON
    if new is InstanceStatus.CONNECTING:
        return QR_GONE_REASON
    return None


def _later_qr_step(event: WebhookEvent, stored: str) -> bool:
    """Whether ``event`` comes after the stored state in a QR login: connecting → QR code → QR limit."""
    if event.qr_code is not None:
        return stored == InstanceStatus.CONNECTING
    return event.reason == QR_LIMIT_REASON and stored == InstanceStatus.QR_PENDING


def _history_gateways(provider: Provider) -> list[str]:
    """The configured gateways of ``provider`` whose client reads history (imports on connect)."""
    return gateways_for(provider) if client_class(provider).supports_history else []


async def _handle_messages(
    organization_id: uuid.UUID,
    event: WebhookEvent,
    payload: dict[str, Any],
    received_at: datetime,
    *,
    reapply: bool = False,
) -> HandlingResult:
    """Store the delivery (deduped by instance, message key and event) and apply it in the same transaction."""
    assert event.instance_name is not None
    store = inbox_row(organization_id, event, payload, dedupe_key(organization_id, event, payload))
    async with session_scope() as session:
        scope = await instance_scope_by_name(
            session,
            organization_id=organization_id,
            gateways=gateways_for(event.provider),
            instance_name=event.instance_name,
        )
        if scope is None:
            return await _store_untracked(session, organization_id, event, payload)
        people = [m for m in event.messages if m.kind is ChatKind.CONTACT]
        ignored = (
            "group and broadcast chats are not imported" if event.kind is EventKind.MESSAGES and not people else None
        )
        if ignored is not None:
            stored = await store_event(session, replace(store, outcome="ignored", error=ignored))
            return HandlingResult("ignored" if stored else "duplicate", ignored)
        if not await store_event(session, store) and not reapply:
            return HandlingResult("duplicate")
        if event.kind is EventKind.MESSAGES:
            inserted = await apply_messages(session, scope, people, now=received_at)
            detail = f"{len(inserted)} new of {len(people)} messages"
        elif event.kind is EventKind.RECEIPTS:
            moved = await advance_message_statuses(session, scope, event.receipts)
            await publish(
                status_events(
                    scope.organization_id,
                    [StatusChange(i, conv, scope.id, ext, status) for i, conv, ext, status in moved],
                ),
                session=session,
            )
            detail = f"{len(moved)} of {len(event.receipts)} message statuses moved forward"
        else:
            # A name is as new as the event that carries it: an older push name arriving later does not win.
            tolerance = timedelta(seconds=get_settings().webhook_event_time_tolerance_seconds)
            seen_at = observation_time(event.event_time, received_at, tolerance)
            written = await upsert_contacts(
                session, scope, (ContactInput(c.jid, c.alt_jid, c.name, seen_at) for c in event.contacts)
            )
            detail = f"{len(event.contacts)} contacts ({written.created} new)"
    return HandlingResult("applied", detail)


async def apply_messages(
    session: AsyncSession,
    scope: InstanceScope,
    messages: Sequence[GatewayMessage],
    *,
    now: datetime,
    announce: list[NewLiveEvent] | None = None,
) -> list[InsertedMessage]:
    """Contacts, conversations (found or opened) and messages for live one-to-one messages; conversations move
    forward (last message, waiting marker) for the ones not stored before, which are announced live (published
    here, or added to ``announce`` for the caller to publish in the same transaction).

    The business's own messages (the gateway's echo of a send) first adopt the outbox row they echo, which then
    moves to ``sent`` (announced as ``message.status``) instead of a second row being inserted."""
    echoed, adopted = await adopt_echoes(session, scope, [m for m in messages if m.from_me])
    if echoed:
        if announce is not None:
            announce.extend(status_events(scope.organization_id, echoed))
        else:
            await publish(status_events(scope.organization_id, echoed), session=session)
        messages = [m for m in messages if m.external_id not in adopted]
        if not messages:
            return []
    contacts = await upsert_contacts(
        session,
        scope,
        (ContactInput(m.chat_jid, m.alt_jid, None if m.from_me else m.push_name, m.sent_at) for m in messages),
    )
    refs = await ensure_conversations(
        session,
        scope,
        (ConversationFact(contacts.ids[m.chat_jid], m.sent_at, m.from_me) for m in messages),
        now=now,
        closed_reason="inactive",
    )
    rows = MessageRows()
    for m in messages:
        rows.append(refs[contacts.ids[m.chat_jid]].id, m)
    inserted = await insert_messages_returning(session, scope, rows)
    await advance_conversations(session, inserted)
    news = [
        message_new_event(
            scope.organization_id,
            instance_id=scope.id,
            message_id=m.id,
            conversation_id=m.conversation_id,
            external_id=m.external_id,
            from_me=m.from_me,
            sent_at=m.sent_at,
        )
        for m in inserted
    ]
    if announce is not None:
        announce.extend(news)
    else:
        await publish(news, session=session)
    return inserted


def wake_imports_on_connect(waker: Waker) -> AfterWebhook:
    """After a webhook's commit: when it connected an instance (and so queued its import), make sure a drain runs.

    A warm worker was already woken by the enqueue's NOTIFY; without one a drain deployment run is started (see
    ``flows.runs.wake_drain``). It runs in the background: the gateway gets its 200 now.
    """

    async def after(_organization_id: uuid.UUID, _event: WebhookEvent, result: HandlingResult) -> None:
        if result.imports_queued:
            waker.wake(WorkKind.IMPORT)

    return after


# -- group commit of message deliveries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One authenticated, parsed message delivery waiting for its transaction."""

    organization_id: uuid.UUID
    event: WebhookEvent
    payload: dict[str, Any]
    received_at: datetime
    reapply: bool = False
    """Applied even when its inbox row exists (see :func:`handle_event`)."""


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommitter[Delivery, HandlingResult]] = (
    weakref.WeakKeyDictionary()
)


def message_committer() -> GroupCommitter[Delivery, HandlingResult]:
    """The running loop's group committer of message and receipt deliveries (built on first use)."""
    loop = asyncio.get_running_loop()
    committer = _committers.get(loop)
    if committer is None:
        committer = GroupCommitter(apply_message_batch, _apply_alone)
        _committers[loop] = committer
    return committer


async def _apply_alone(delivery: Delivery) -> HandlingResult:
    return await _handle_messages(
        delivery.organization_id, delivery.event, delivery.payload, delivery.received_at, reapply=delivery.reapply
    )


async def apply_message_batch(batch: Sequence[Delivery]) -> list[HandlingResult | Alone]:
    """Store and apply message and receipt deliveries in one transaction, set-based; the result of each (ALONE for
    one to apply alone: an instance the organization does not track).

    Equivalent to applying them one by one in some order: inbox rows are inserted together (a key met twice is a
    duplicate the second time), then per instance, in id order, all new messages together (each contact's messages
    go where its newest one goes, as when the newest arrives first), then all receipts (after the messages, as when
    they arrive after them; each message moves once, to the furthest status, as when that receipt arrives first).
    A receipt whose message is neither stored nor in the batch is applied alone (ALONE), where it is remembered until
    the message comes (see :func:`db.repositories.conversations.advance_message_statuses`).
    """
    results: list[HandlingResult | Alone] = [ALONE] * len(batch)
    wanted = [(d.organization_id, tuple(gateways_for(d.event.provider)), d.event.instance_name or "") for d in batch]
    distinct = list(dict.fromkeys(wanted))
    async with session_scope() as session:
        scopes = dict(zip(distinct, await instance_scopes_by_name(session, distinct), strict=True))
        early = await _receipts_before_messages(session, batch, [scopes[w] for w in wanted])
        rows: list[InboxRow] = []
        planned: list[tuple[int, InstanceScope, str, list[GatewayMessage], str | None]] = []
        keys: set[str] = set()
        for index, delivery in enumerate(batch):
            scope, event = scopes[wanted[index]], delivery.event
            if scope is None or index in early:
                continue
            key = dedupe_key(delivery.organization_id, event, delivery.payload)
            if key in keys:
                results[index] = HandlingResult("duplicate")
                continue
            keys.add(key)
            people = [m for m in event.messages if m.kind is ChatKind.CONTACT]
            ignored = (
                "group and broadcast chats are not imported"
                if event.kind is EventKind.MESSAGES and not people
                else None
            )
            outcome = "ignored" if ignored else "applied"
            rows.append(
                inbox_row(delivery.organization_id, event, delivery.payload, key, outcome=outcome, error=ignored)
            )
            planned.append((index, scope, key, people, ignored))
        stored = await store_events(session, rows)
        messages: dict[uuid.UUID, list[tuple[int, list[GatewayMessage]]]] = {}
        receipts: dict[uuid.UUID, list[tuple[int, Sequence[tuple[str, str]]]]] = {}
        by_id: dict[uuid.UUID, InstanceScope] = {}
        for index, scope, key, people, ignored in planned:
            if key not in stored and not batch[index].reapply:
                results[index] = HandlingResult("duplicate")
            elif ignored is not None:
                results[index] = HandlingResult("ignored", ignored)
            else:
                by_id[scope.id] = scope
                if batch[index].event.kind is EventKind.MESSAGES:
                    messages.setdefault(scope.id, []).append((index, people))
                else:
                    receipts.setdefault(scope.id, []).append((index, batch[index].event.receipts))
        now = max(d.received_at for d in batch)
        announce: list[NewLiveEvent] = []
        for scope_id in sorted(by_id):
            scope = by_id[scope_id]
            if scope_id in messages:
                # By chat (stable), so concurrent batches lock contacts in the same order.
                every = sorted((m for _, people in messages[scope_id] for m in people), key=lambda m: m.chat_jid)
                inserted = await apply_messages(session, scope, every, now=now, announce=announce)
                new = {m.external_id for m in inserted}
                for index, people in messages[scope_id]:
                    count = 0
                    for m in people:
                        if m.external_id in new:
                            new.discard(m.external_id)
                            count += 1
                    results[index] = HandlingResult("applied", f"{count} new of {len(people)} messages")
            if scope_id in receipts:
                updates = [r for _, some in receipts[scope_id] for r in some]
                # Every message they are for is stored (or was in the batch): no receipt lock needed.
                moved = await advance_message_statuses(session, scope, updates, locked=True)
                announce.extend(
                    status_events(
                        scope.organization_id,
                        [StatusChange(i, conv, scope.id, ext, status) for i, conv, ext, status in moved],
                    )
                )
                final = {ext: status for _, _, ext, status in moved}
                for index, some in receipts[scope_id]:
                    count = 0
                    for ext, status in some:
                        if final.get(ext) == status:
                            del final[ext]
                            count += 1
                    results[index] = HandlingResult("applied", f"{count} of {len(some)} message statuses moved forward")
        await publish(announce, session=session)
    return results


async def _receipts_before_messages(
    session: AsyncSession, batch: Sequence[Delivery], scopes: Sequence[InstanceScope | None]
) -> set[int]:
    """The receipt deliveries of ``batch`` for a message neither stored nor in the batch: each is applied alone,
    after the batch, where it takes the instance's receipt lock before any other (a batch taking it after its
    contacts' row locks could deadlock with a message insert)."""
    acked: dict[uuid.UUID, dict[str, list[int]]] = {}
    batched: dict[uuid.UUID, set[str]] = {}
    by_id: dict[uuid.UUID, InstanceScope] = {}
    for index, (delivery, scope) in enumerate(zip(batch, scopes, strict=True)):
        if scope is None:
            continue
        by_id[scope.id] = scope
        if delivery.event.kind is EventKind.RECEIPTS:
            for ext, _ in delivery.event.receipts:
                acked.setdefault(scope.id, {}).setdefault(ext, []).append(index)
        else:
            batched.setdefault(scope.id, set()).update(
                m.external_id for m in delivery.event.messages if m.kind is ChatKind.CONTACT
            )
    early: set[int] = set()
    for scope_id in sorted(acked):
        wanted = [ext for ext in acked[scope_id] if ext not in batched.get(scope_id, ())]
        for ext in await unstored_messages(session, by_id[scope_id], wanted):
            early.update(acked[scope_id][ext])
    return early
