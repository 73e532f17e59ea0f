"""The outbox: messages the business sends, written ``pending`` with their queue item, then moved by the sender and
by the gateway's echo and receipts — one row per message, whichever of them comes first.

Functions flush, never commit (the caller's transaction decides), except where a docstring says otherwise.

* :func:`queue_message` writes the row and its work item (kind ``send``, key = the message id) in the caller's
  transaction; a repeat of the same idempotency key (``client_id``, unique per instance) returns the first row.
* The sender marks ``attempted_at`` (committed before its HTTP call), then records the gateway's id
  (:func:`record_sent`, merging a row an echo inserted separately), or ``failed``/``unknown`` with the reason.
* An echo whose key id is not stored yet adopts the attempted, id-less ``pending``/``unknown`` outbox row of the same
  instance and chat with the same content, earliest first (:func:`adopt_echoes`), before the webhook inserts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from core.domain import STATUS_ORDER, STATUS_RANK, GatewayMessage, OutgoingMessage, OutgoingType, WorkKind
from core.errors import Conflict
from core.events import Kind, message_new_event
from core.events import event as live_event
from core.phones import phone_from_jid, phone_variants
from db.engine import driver_connection
from db.repositories.conversations import (
    ContactInput,
    ConversationFact,
    InsertedMessage,
    InstanceScope,
    advance_conversations,
    ensure_conversations,
    upsert_contacts,
)
from db.repositories.live_events import CHANNEL as LIVE_CHANNEL
from db.repositories.live_events import publish
from db.repositories.work_queue import enqueue, make_due_now

OUTSTANDING = ("pending", "unknown")
"""Statuses of an outbox message whose send has not been confirmed."""


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A message whose status moved (announced as ``message.status``)."""

    message_id: int
    conversation_id: int
    instance_id: uuid.UUID
    external_id: str | None
    status: str
    error: str | None = None


def status_events(organization_id: uuid.UUID, changes: Sequence[StatusChange]) -> list[Any]:
    """``message.status`` live events (the agreed payload) for ``changes``."""
    return [
        live_event(
            organization_id,
            Kind.MESSAGE_STATUS,
            message_id=c.message_id,
            conversation_id=c.conversation_id,
            instance_id=str(c.instance_id),
            external_id=c.external_id,
            status=c.status,
            error=c.error,
        )
        for c in changes
    ]


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """An outbox message as the API answers it, with its work item."""

    message: dict[str, Any]
    work_item_id: int | None
    created: bool


_MESSAGE_COLUMNS = (
    "m.id, m.organization_id, m.instance_id, m.conversation_id, m.external_id, m.from_me, m.sender, m.type, "
    "m.content, m.media_url, m.media_mime, m.media_name, m.sent_at, m.status, m.client_id, m.attempted_at, "
    "m.error, m.created_at, c.jid AS to_jid"
)
_MESSAGE_FROM = (
    "FROM messages m JOIN conversations v ON v.id = m.conversation_id JOIN contacts c ON c.id = v.contact_id "
)


async def read_outbox_message(
    session: AsyncSession, message_id: int, *, organization_id: uuid.UUID | None = None
) -> dict[str, Any] | None:
    """One message with its recipient and its latest send item (within ``organization_id`` when given)."""
    row = (
        (
            await session.execute(
                text(
                    f"SELECT {_MESSAGE_COLUMNS}, (SELECT w.id FROM work_items w WHERE w.kind = :kind AND w.key = "
                    f"CAST(m.id AS text) ORDER BY w.id DESC LIMIT 1) AS work_item_id {_MESSAGE_FROM}"
                    "WHERE m.id = :id AND (CAST(:org AS uuid) IS NULL OR m.organization_id = :org)"
                ),
                {"id": message_id, "org": organization_id, "kind": str(WorkKind.SEND)},
            )
        )
        .mappings()
        .one_or_none()
    )
    return dict(row) if row else None


def _same_request(stored: dict[str, Any], to_jid: str, message: OutgoingMessage) -> bool:
    return (
        stored["to_jid"] == to_jid
        and stored["type"] == str(message.type)
        and (stored["content"] or None) == (message.text or None)
        and stored["media_url"] == message.media_url
        and stored["media_mime"] == message.mime_type
        and stored["media_name"] == message.file_name
    )


async def _repeat(
    session: AsyncSession, scope: InstanceScope, client_id: str, to_jid: str, message: OutgoingMessage
) -> QueuedMessage | None:
    found = (
        await session.execute(
            text("SELECT id FROM messages WHERE instance_id = :inst AND client_id = :cid"),
            {"inst": scope.id, "cid": client_id},
        )
    ).scalar_one_or_none()
    if found is None:
        return None
    stored = await read_outbox_message(session, found)
    assert stored is not None
    if not _same_request(stored, to_jid, message):
        raise Conflict(f"idempotency key {client_id!r} was already used for a different message")
    return QueuedMessage(message=stored, work_item_id=stored.pop("work_item_id"), created=False)


_INSERT_SQL = text("""
INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, from_me, sender, type, content,
                      media_url, media_mime, media_name, sent_at, status, client_id)
VALUES (:org, :inst, :conv, NULL, true, 'agent', :type, :content, :murl, :mmime, :mname, :now, 'pending', :cid)
ON CONFLICT (instance_id, client_id) WHERE client_id IS NOT NULL DO NOTHING
RETURNING id, sent_at
""")


async def queue_message(
    session: AsyncSession,
    scope: InstanceScope,
    *,
    to_jid: str,
    message: OutgoingMessage,
    client_id: str | None,
    now: datetime,
) -> QueuedMessage:
    """Write an outbox message ``pending`` with its send item, in the caller's transaction.

    The recipient's contact and conversation are found or made (a new conversation is ``in_progress``); the
    business's reply clears the conversation's waiting marker. A repeat of ``client_id`` on the instance returns
    the first message and queues nothing; the same key for a different message raises Conflict (409).
    """
    if client_id is not None and (repeat := await _repeat(session, scope, client_id, to_jid, message)):
        return repeat
    contacts = await upsert_contacts(session, scope, [ContactInput(to_jid)])
    contact_id = contacts.ids[to_jid]
    refs = await ensure_conversations(
        session, scope, [ConversationFact(contact_id, now, True)], now=now, closed_reason="inactive"
    )
    conversation_id = refs[contact_id].id
    row = (
        await session.execute(
            _INSERT_SQL,
            {
                "org": scope.organization_id,
                "inst": scope.id,
                "conv": conversation_id,
                "type": str(message.type),
                "content": message.text,
                "murl": message.media_url,
                "mmime": message.mime_type,
                "mname": message.file_name,
                "now": now,
                "cid": client_id,
            },
        )
    ).one_or_none()
    if row is None:  # a concurrent request with the same key committed first
        assert client_id is not None
        repeat = await _repeat(session, scope, client_id, to_jid, message)
        assert repeat is not None
        return repeat
    message_id, sent_at = row
    await advance_conversations(session, [InsertedMessage(message_id, conversation_id, "", sent_at, True)])
    queued = await enqueue(
        session,
        kind=WorkKind.SEND,
        key=str(message_id),
        organization_id=scope.organization_id,
        instance_id=scope.id,
        payload={"message_id": message_id},
    )
    await publish(
        [
            message_new_event(
                scope.organization_id,
                instance_id=scope.id,
                message_id=message_id,
                conversation_id=conversation_id,
                external_id=None,
                from_me=True,
                sent_at=sent_at,
            ),
            *status_events(
                scope.organization_id,
                [StatusChange(message_id, conversation_id, scope.id, None, "pending")],
            ),
        ],
        session=session,
    )
    stored = await read_outbox_message(session, message_id)
    assert stored is not None
    stored.pop("work_item_id")
    return QueuedMessage(message=stored, work_item_id=queued.id, created=True)


# -- the sender ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendJob:
    """What the sender needs to know about one outbox message."""

    message_id: int
    organization_id: uuid.UUID
    instance_id: uuid.UUID
    conversation_id: int
    gateway: str
    instance_name: str
    instance_status: str
    logged_out: bool
    to_jid: str
    type: str
    content: str | None
    media_url: str | None
    media_mime: str | None
    media_name: str | None
    status: str
    external_id: str | None
    attempted_at: datetime | None

    def outgoing(self) -> OutgoingMessage:
        """The message as a gateway sends it."""
        return OutgoingMessage(
            to=self.to_jid,
            type=OutgoingType(self.type),
            text=self.content,
            media_url=self.media_url,
            mime_type=self.media_mime,
            file_name=self.media_name,
        )


_JOB_SQL = """
SELECT m.id, m.organization_id, m.instance_id, m.conversation_id, i.gateway, i.instance_name, i.status, i.logged_out,
       c.jid, m.type, m.content, m.media_url, m.media_mime, m.media_name, m.status, m.external_id, m.attempted_at
FROM messages m JOIN conversations v ON v.id = m.conversation_id
JOIN contacts c ON c.id = v.contact_id JOIN whatsapp_instances i ON i.id = m.instance_id
"""


async def load_send_job(session: AsyncSession, message_id: int) -> SendJob | None:
    """The message, its recipient and its instance; None when the message is gone."""
    row = (await session.execute(text(_JOB_SQL + "WHERE m.id = :id"), {"id": message_id})).one_or_none()
    return SendJob(*row) if row else None


async def load_send_jobs(session: AsyncSession, message_ids: Sequence[int]) -> dict[int, SendJob]:
    """:func:`load_send_job` for many messages in one statement (the ones that still exist, by id)."""
    if not message_ids:
        return {}
    rows = await session.execute(text(_JOB_SQL + "WHERE m.id = ANY(:ids)"), {"ids": list(message_ids)})
    return {row[0]: SendJob(*row) for row in rows.all()}


async def mark_attempted(session: AsyncSession, message_id: int) -> datetime | None:
    """Stamp ``attempted_at`` on a message still waiting for its gateway id; None when it has one already (an echo
    adopted it) or is no longer outstanding — then nothing must be sent."""
    return (
        await session.execute(
            text(
                "UPDATE messages SET attempted_at = clock_timestamp() WHERE id = :id AND external_id IS NULL "
                "AND status IN ('pending', 'unknown') RETURNING attempted_at"
            ),
            {"id": message_id},
        )
    ).scalar_one_or_none()


def _later(a: str, b: str) -> str:
    return a if STATUS_RANK.get(a, 0) >= STATUS_RANK.get(b, 0) else b


async def record_sent(
    session: AsyncSession, job: SendJob, *, external_id: str, status: str, sent_at: datetime | None = None
) -> StatusChange | None:
    """Give the message the gateway's id and the status its answer implies (forward only).

    When an echo already stored that id on a row of its own, the two are merged: the echo's row goes, its status is
    kept if further along, and the outbox row (with the client's key) stays. Returns the change, or None when the
    status did not move.
    """
    (change,) = await record_sent_many(session, [Sent(job, external_id, status, sent_at)])
    return change


@dataclass(frozen=True, slots=True)
class Sent:
    """A send the gateway took: its message, the gateway's id and the status the answer implies."""

    job: SendJob
    external_id: str
    status: str
    sent_at: datetime | None = None


_UNNEST_SENT = "unnest(CAST(:ids AS bigint[]), CAST(:insts AS uuid[]), CAST(:exts AS text[])) AS u(id, inst, ext)"


async def record_sent_many(session: AsyncSession, sent: Sequence[Sent]) -> list[StatusChange | None]:
    """:func:`record_sent` for many messages (at most one per instance and gateway id) in four statements; one
    change (or None) per input, in order."""
    if not sent:
        return []
    current = {
        r[0]: (r[1], r[2])
        for r in await session.execute(
            text("SELECT id, status, external_id FROM messages WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"),
            {"ids": sorted({s.job.message_id for s in sent})},
        )
    }
    fresh = [s for s in sent if s.job.message_id in current and current[s.job.message_id][1] is None]
    echoes: dict[int, str] = {}
    elsewhere: set[int] = set()
    if fresh:
        ids = {
            "ids": [s.job.message_id for s in fresh],
            "insts": [s.job.instance_id for s in fresh],
            "exts": [s.external_id for s in fresh],
        }
        # the rows an echo inserted on their own (before the send was recorded) merge into the outbox rows
        deleted = await session.execute(
            text(
                f"DELETE FROM messages d USING {_UNNEST_SENT} WHERE d.instance_id = u.inst AND d.external_id = u.ext "
                "AND d.id <> u.id AND d.attempted_at IS NULL AND d.client_id IS NULL RETURNING u.id, d.status"
            ),
            ids,
        )
        echoes = {r[0]: r[1] for r in deleted}
        # another outbox message holds that id (a reconciliation must never take a sibling's echo): keep it apart
        taken = await session.execute(
            text(
                f"SELECT u.id FROM {_UNNEST_SENT} WHERE EXISTS (SELECT 1 FROM messages x "
                "WHERE x.instance_id = u.inst AND x.external_id = u.ext AND x.id <> u.id)"
            ),
            ids,
        )
        elsewhere = {r[0] for r in taken}
    changes: list[StatusChange | None] = []
    updates: list[tuple[int, str, str, datetime | None]] = []
    for s in sent:
        job = s.job
        if job.message_id not in current or job.message_id in elsewhere:
            changes.append(None)
            continue
        old_status, stored_id = current[job.message_id]
        best = _later(old_status if old_status not in OUTSTANDING else "pending", s.status)
        external_id = s.external_id
        if stored_id is None:
            if job.message_id in echoes:
                best = _later(best, echoes[job.message_id])
        elif stored_id != external_id:  # an echo adopted the row under another id: that one stays
            external_id = stored_id
        updates.append((job.message_id, external_id, best, s.sent_at))
        changed = best != old_status
        changes.append(
            StatusChange(job.message_id, job.conversation_id, job.instance_id, external_id, best) if changed else None
        )
    if updates:
        await session.execute(
            text(
                "UPDATE messages m SET external_id = u.ext, status = u.status, error = NULL, "
                "sent_at = COALESCE(u.sent_at, m.sent_at) FROM unnest(CAST(:ids AS bigint[]), CAST(:exts AS text[]), "
                "CAST(:statuses AS text[]), CAST(:sent_ats AS timestamptz[])) AS u(id, ext, status, sent_at) "
                "WHERE m.id = u.id"
            ),
            {
                "ids": [u[0] for u in updates],
                "exts": [u[1] for u in updates],
                "statuses": [u[2] for u in updates],
                "sent_ats": [u[3] for u in updates],
            },
        )
    return changes


_WAVE_SQL = f"""
WITH rec AS (
    SELECT * FROM jsonb_to_recordset(%(rec)s::jsonb)
        AS r(id bigint, inst uuid, ext text, status text, item_id bigint, token uuid, org uuid, payload jsonb, ord int)
), upd AS (  -- the usual case; an echo's row to merge, an id held elsewhere or a row adopted meanwhile: not here
    UPDATE messages m SET external_id = r.ext, status = r.status, error = NULL
    FROM rec r
    WHERE m.id = r.id AND m.external_id IS NULL AND m.status IN ('pending', 'unknown')
      AND NOT EXISTS (SELECT 1 FROM messages x WHERE x.instance_id = r.inst AND x.external_id = r.ext)
    RETURNING m.id
), ins AS (
    INSERT INTO live_events (organization_id, kind, payload)
    SELECT r.org, %(kind)s, r.payload FROM rec r JOIN upd ON upd.id = r.id ORDER BY r.ord
    RETURNING id, organization_id
), numbered AS (  -- as live_events.publish: the ids per organization, at most 300 per notification
    SELECT id, organization_id, (row_number() OVER (PARTITION BY organization_id ORDER BY id) - 1) / 300 AS chunk
    FROM ins
), notified AS (
    SELECT pg_notify('{LIVE_CHANNEL}', organization_id::text || ':' || string_agg(id::text, ',' ORDER BY id))
    FROM numbered GROUP BY organization_id, chunk
), done AS (
    UPDATE work_items w SET state = 'done', finished_at = now(), result = jsonb_build_object('external_id', r.ext),
        lease_until = NULL, lease_token = NULL, updated_at = now()
    FROM rec r JOIN upd ON upd.id = r.id
    WHERE w.id = r.item_id AND w.lease_token = r.token AND w.state = 'running'
    RETURNING w.id
), held AS (
    SELECT u.message_id FROM jsonb_to_recordset(%(mark)s::jsonb) AS u(message_id bigint, item_id bigint, token uuid)
    JOIN work_items w ON w.id = u.item_id AND w.lease_token = u.token AND w.state = 'running'
), marked AS (
    UPDATE messages m SET attempted_at = clock_timestamp()
    FROM held h, whatsapp_instances i
    WHERE m.id = h.message_id AND i.id = m.instance_id AND i.status = 'connected' AND NOT i.logged_out
      AND m.external_id IS NULL AND m.status = 'pending' AND m.attempted_at IS NULL
    RETURNING m.id
)
SELECT (SELECT array_agg(id) FROM upd), (SELECT array_agg(id) FROM done), (SELECT array_agg(message_id) FROM held),
       (SELECT array_agg(id) FROM marked), (SELECT count(*) FROM notified)
"""
"""The wave statement, run on the driver's connection as a prepared statement (psycopg placeholders): each side
of the wave is one JSON document (one C-speed ``orjson.dumps``; psycopg would adapt lists item by item)."""


def _status_payload(sent: Sent, status: str) -> dict[str, Any]:
    job = sent.job
    change = StatusChange(job.message_id, job.conversation_id, job.instance_id, sent.external_id, status)
    return dict(status_events(job.organization_id, [change])[0].payload)


@dataclass(frozen=True, slots=True)
class WaveWrite:
    """What :func:`write_wave` did."""

    recorded: set[int]
    """Messages it gave their gateway ids (the others need :func:`record_sent_many`)."""
    completed: set[int]
    """Work items it completed (those of the recorded messages still held)."""
    held: set[int]
    """Messages to mark whose work items are still held (the others must not be sent)."""
    marked: set[int]
    """Messages it stamped ``attempted_at`` on."""


async def write_wave(
    session: AsyncSession | AsyncConnection | psycopg.AsyncConnection[Any],
    recorded: Sequence[tuple[Sent, int, uuid.UUID]],
    to_mark: Sequence[tuple[int, int, uuid.UUID]],
) -> WaveWrite:
    """A wave's usual case in one statement: accepted sends (with their work item id and lease token) get their
    gateway ids and status, are announced as ``message.status`` and their items completed; messages to send next
    (message id, work item id, lease token) are stamped as :func:`mark_first_attempts` does.

    A send whose row is not the usual case (an echo's row to merge, its id held by another row, a row an echo
    adopted meanwhile) is left alone: the caller records it with :func:`record_sent_many`. ``session`` may be the
    driver's connection itself (kept by the caller: nothing to look up per wave).
    """
    rec = []
    for ord_, (sent, item_id, token) in enumerate(recorded):
        job = sent.job
        status = _later("pending", sent.status)
        rec.append(
            {
                "id": job.message_id,
                "inst": job.instance_id,
                "ext": sent.external_id,
                "status": status,
                "item_id": item_id,
                "token": token,
                "org": job.organization_id,
                "payload": _status_payload(sent, status),
                "ord": ord_,
            }
        )
    mark = [{"message_id": m[0], "item_id": m[1], "token": m[2]} for m in to_mark]
    driver = session if isinstance(session, psycopg.AsyncConnection) else await driver_connection(session)
    params = {
        "rec": orjson.dumps(rec, default=str).decode(),
        "kind": str(Kind.MESSAGE_STATUS),
        "mark": orjson.dumps(mark).decode(),
    }
    cursor = await driver.execute(_WAVE_SQL, params, prepare=True)
    row = await cursor.fetchone()
    assert row is not None
    return WaveWrite(*(set(ids or ()) for ids in row[:4]))


async def stored_external_ids(session: AsyncSession, instance_id: uuid.UUID, external_ids: Sequence[str]) -> set[str]:
    """Which of ``external_ids`` the instance already has a message for."""
    rows = await session.execute(
        text("SELECT external_id FROM messages WHERE instance_id = :inst AND external_id = ANY(:ids)"),
        {"inst": instance_id, "ids": list(external_ids)},
    )
    return {r[0] for r in rows.all()}


async def restore_attempt(session: AsyncSession, message_id: int, attempted_at: datetime | None) -> None:
    """Put back the previous ``attempted_at`` of a send the gateway certainly did not take (nothing to reconcile)."""
    await session.execute(
        text("UPDATE messages SET attempted_at = :at WHERE id = :id AND external_id IS NULL"),
        {"id": message_id, "at": attempted_at},
    )


async def set_outcome(session: AsyncSession, job: SendJob, *, status: str, error: str | None) -> StatusChange | None:
    """Mark a message still without its gateway id ``failed`` or ``unknown`` with the reason; None when it got its id
    meanwhile (an echo adopted it) or the status was already that."""
    row = (
        await session.execute(
            text(
                "UPDATE messages SET status = :status, error = :error WHERE id = :id AND external_id IS NULL "
                "AND status IN ('pending', 'unknown') RETURNING (SELECT status FROM messages WHERE id = :id)"
            ),
            {"id": job.message_id, "status": status, "error": error},
        )
    ).one_or_none()
    if row is None or row[0] == status:
        return None
    return StatusChange(job.message_id, job.conversation_id, job.instance_id, None, status, error)


# -- the webhook side ----------------------------------------------------------------------------------------------

_ADOPT_SQL = text("""
UPDATE messages m SET external_id = :ext, status = :status, error = NULL
WHERE m.id = (
    SELECT o.id FROM messages o
    JOIN conversations v ON v.id = o.conversation_id JOIN contacts c ON c.id = v.contact_id
    WHERE o.instance_id = :inst AND o.from_me AND o.external_id IS NULL AND o.attempted_at IS NOT NULL
      AND o.status IN ('pending', 'unknown') AND (c.jid = ANY(:chats) OR c.alt_jid = ANY(:chats))
      AND o.type = :type AND o.content IS NOT DISTINCT FROM :content
    ORDER BY o.id LIMIT 1
    FOR UPDATE OF o
)
AND m.external_id IS NULL
AND NOT EXISTS (SELECT 1 FROM messages x WHERE x.instance_id = :inst AND x.external_id = :ext)
RETURNING m.id, m.conversation_id, m.status
""")


async def adopt_echoes(
    session: AsyncSession, scope: InstanceScope, messages: Sequence[GatewayMessage]
) -> tuple[list[StatusChange], set[str]]:
    """Let the business's messages whose key id is not stored yet update the outbox row they echo, if any.

    Returns the status changes and the external ids adopted (the caller does not insert those again).
    """
    changes: list[StatusChange] = []
    adopted: set[str] = set()
    for m in messages:
        if not m.from_me:
            continue
        status = m.status if m.status in STATUS_ORDER and STATUS_RANK[m.status] > STATUS_RANK["sent"] else "sent"
        chats = [jid for jid in (m.chat_jid, m.alt_jid) if jid]
        row = (
            await session.execute(
                _ADOPT_SQL,
                {
                    "inst": scope.id,
                    "ext": m.external_id,
                    "status": status,
                    "chats": chats,
                    "type": m.type,
                    "content": m.content,
                },
            )
        ).one_or_none()
        if row is not None:
            adopted.add(m.external_id)
            changes.append(StatusChange(row[0], row[1], scope.id, m.external_id, row[2]))
    # A message waiting out the grace period of an unknown outcome need not wait any longer: its send item can
    # finish now (the drain sees the external id and sends nothing).
    await make_due_now(session, kind=WorkKind.SEND, keys=[str(c.message_id) for c in changes])
    return changes, adopted


async def known_contact_jid(session: AsyncSession, instance_id: uuid.UUID, jid: str) -> str | None:
    """The JID the instance already knows a phone-number JID's contact by (it may hold another form of the number,
    e.g. without Brazil's ninth digit), or None."""
    variants = list(phone_variants(phone_from_jid(jid)))
    return (
        await session.execute(
            text(
                "SELECT jid FROM contacts WHERE instance_id = :inst AND NOT is_group "
                "AND (jid = :jid OR phone = ANY(:variants)) ORDER BY (jid = :jid) DESC, id LIMIT 1"
            ),
            {"inst": instance_id, "jid": jid, "variants": variants},
        )
    ).scalar_one_or_none()
