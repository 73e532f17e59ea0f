"""Contacts, conversations and messages: the writes imports and webhooks share, and the API's reads.

Functions flush, never commit. Every write is idempotent: contacts by (instance, jid) — matched on either address
of a LID/phone-number pair —, messages by (instance, external id), at most one open conversation per contact.

Conversation rules (DESIGN.md §3), one place for both paths:
* A contact's *current* conversation is its open one, else its most recent one.
* Messages go to the current conversation unless it is closed and they are newer than its last message — then a
  new conversation opens (a customer writing again after closing starts a new attendance).
* A new conversation is open only when its newest message is recent (within the organization's
  ``inactivity_hours``): ``waiting`` when the customer wrote last, ``in_progress`` when the business did; an older
  one is created closed (``close_reason`` given by the caller: ``imported`` for history).
* ``waiting_since`` marks the first unanswered customer message; the business's reply clears it and moves a
  waiting conversation to ``in_progress``.

Arrival order does not decide (issue 13 §6): an older message arriving late re-marks ``waiting_since`` from the
stored messages; a receipt arriving before its message waits in ``pending_receipts`` and is applied when the message
is stored; a contact's name is the one observed last (``name_observed_at``: a push name at its message's send time, a
contact event at its own time, an import now), whatever order they arrive in.

Large arrays travel as one delimited string per column and are split by ``string_to_array`` in SQL: binding
Python lists makes psycopg adapt every element in Python, which cost more than PostgreSQL's whole insert.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from core.domain import STATUS_ORDER, STATUS_RANK, GatewayMessage
from core.phones import phone_from_jid, phone_variants

OPEN_STATUSES = ("waiting", "in_progress")
_SEP, _NULL = "\x1f", "\x1e"
_SCRUB = str.maketrans({"\x00": None, _SEP: " ", _NULL: " "})
_PHONE_SERVERS = ("@s.whatsapp.net", "@c.us")
_PHONE_JID = r"@(s\.whatsapp\.net|c\.us)$"
Order = Literal["asc", "desc"]


def _pack(values: Iterable[object]) -> str:
    """One column as a delimited string for ``string_to_array(value, E'\\x1f', E'\\x1e')`` (None and '' → NULL)."""
    return _SEP.join(
        _NULL if v is None or v == "" else ("t" if v is True else "f" if v is False else str(v)) for v in values
    )


def _pack_text(values: Sequence[str | None]) -> str:
    """Like :func:`_pack` for text: NUL bytes (which PostgreSQL refuses) and the delimiters are scrubbed.

    The common case — no value holds either — costs one join and two scans of the result.
    """
    joined = _SEP.join([v if v else _NULL for v in values])
    if "\x00" not in joined and joined.count(_SEP) == len(values) - 1:
        return joined
    return _SEP.join([(v.translate(_SCRUB) or _NULL) if v else _NULL for v in values])


def _col(name: str, sql_type: str) -> str:
    return f"CAST(string_to_array(:{name}, E'\\x1f', E'\\x1e') AS {sql_type}[])"


# -- instances ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceScope:
    """The instance rows are written for, with the organization settings the rules need."""

    id: uuid.UUID
    organization_id: uuid.UUID
    gateway: str
    instance_name: str
    status: str
    inactivity_hours: int
    import_history_days: int | None


_SCOPE_SQL = (
    "SELECT i.id, i.organization_id, i.gateway, i.instance_name, i.status, o.inactivity_hours, "
    "o.import_history_days FROM whatsapp_instances i JOIN organizations o ON o.id = i.organization_id "
)


async def instance_scope(
    session: AsyncSession, instance_id: uuid.UUID, *, organization_id: uuid.UUID | None = None
) -> InstanceScope | None:
    """The instance with its organization's settings (only within ``organization_id`` when given)."""
    row = (
        await session.execute(
            text(_SCOPE_SQL + "WHERE i.id = :id AND (CAST(:org AS uuid) IS NULL OR i.organization_id = :org)"),
            {"id": instance_id, "org": organization_id},
        )
    ).one_or_none()
    return InstanceScope(*row) if row else None


async def instance_scope_by_name(
    session: AsyncSession, *, organization_id: uuid.UUID, gateways: Sequence[str], instance_name: str
) -> InstanceScope | None:
    """The organization's instance of that name at one of ``gateways`` (no row lock: messages never need one)."""
    row = (
        await session.execute(
            text(
                _SCOPE_SQL + "WHERE i.organization_id = :org AND i.instance_name = :name "
                "AND i.gateway = ANY(:gateways) ORDER BY i.gateway LIMIT 1"
            ),
            {"org": organization_id, "name": instance_name, "gateways": list(gateways)},
        )
    ).one_or_none()
    return InstanceScope(*row) if row else None


_SCOPES_BY_NAME_SQL = text(
    "SELECT DISTINCT ON (k.n) k.n, i.id, i.organization_id, i.gateway, i.instance_name, i.status, "
    "o.inactivity_hours, o.import_history_days "
    "FROM unnest(CAST(:orgs AS uuid[]), CAST(:names AS text[]), CAST(:gateways AS text[])) WITH ORDINALITY "
    "AS k(org, name, gateways, n) "
    "JOIN whatsapp_instances i ON i.organization_id = k.org AND i.instance_name = k.name "
    "AND i.gateway = ANY(string_to_array(k.gateways, ',')) "
    "JOIN organizations o ON o.id = i.organization_id ORDER BY k.n, i.gateway"
)


async def instance_scopes_by_name(
    session: AsyncSession, wanted: Sequence[tuple[uuid.UUID, Sequence[str], str]]
) -> list[InstanceScope | None]:
    """:func:`instance_scope_by_name` for many (organization, gateways, instance name) in one statement, in order."""
    if not wanted:
        return []
    rows = await session.execute(
        _SCOPES_BY_NAME_SQL,
        {
            "orgs": [org for org, _, _ in wanted],
            "names": [name for _, _, name in wanted],
            "gateways": [",".join(gateways) for _, gateways, _ in wanted],
        },
    )
    found = {row[0]: InstanceScope(*row[1:]) for row in rows.all()}
    return [found.get(n) for n in range(1, len(wanted) + 1)]


# -- contacts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactInput:
    """A one-to-one contact as a gateway names it: its jid, maybe its other address, maybe a display name."""

    jid: str
    alt_jid: str | None = None
    name: str | None = None
    name_at: datetime | None = None
    """When the name was observed (a message's send time, a contact event's time); None: now."""


@dataclass(frozen=True, slots=True)
class ContactsWritten:
    """Contact ids by every address given, and what changed."""

    ids: dict[str, int]
    created: int = 0
    linked: int = 0
    """Contacts newly linked to a CRM client by phone."""


def _merge_contacts(contacts: Iterable[ContactInput]) -> list[ContactInput]:
    """One input per person: pairs sharing an address merge; the phone-number form becomes the jid."""
    merged: list[ContactInput] = []
    where: dict[str, int] = {}
    for contact in contacts:
        jid, alt = contact.jid, contact.alt_jid if contact.alt_jid != contact.jid else None
        if alt and alt.endswith(_PHONE_SERVERS) and not jid.endswith(_PHONE_SERVERS):
            jid, alt = alt, jid
        index = where.get(jid, where.get(alt) if alt else None)
        if index is None:
            where[jid] = len(merged)
            if alt:
                where[alt] = len(merged)
            merged.append(ContactInput(jid, alt, contact.name, contact.name_at if contact.name else None))
            continue
        known = merged[index]
        newer = contact.name is not None and (known.name is None or _not_older(contact.name_at, known.name_at))
        merged[index] = ContactInput(
            known.jid,
            known.alt_jid or (alt if alt != known.jid else jid),
            contact.name if newer else known.name,
            contact.name_at if newer else known.name_at,
        )
        for address in (jid, alt):
            if address:
                where[address] = index
    return merged


def _not_older(at: datetime | None, than: datetime | None) -> bool:
    """Whether a name observed ``at`` replaces one observed ``than`` (None is now; a tie goes to the later input)."""
    return at is None or (than is not None and at >= than)


def _phone(contact: ContactInput) -> str | None:
    for address in (contact.jid, contact.alt_jid):
        if address and address.endswith(_PHONE_SERVERS):
            return phone_from_jid(address)
    return None


_UPSERT_CONTACTS_SQL = text(f"""
WITH input AS (
    SELECT * FROM unnest({_col("jids", "text")}, {_col("alts", "text")}, {_col("phones", "text")},
                         {_col("names", "text")}, {_col("variants", "text")}, {_col("names_at", "timestamptz")})
    AS i(jid, alt, phone, name, variants, name_at)
),
matched AS (
    SELECT DISTINCT ON (i.jid) i.jid, c.id, c.client_id,
           c.jid <> i.jid AND i.jid ~ :phone_jid AND c.jid !~ :phone_jid AND NOT EXISTS (
               SELECT 1 FROM contacts x WHERE x.instance_id = :inst AND x.jid = i.jid) AS swap
    FROM input i JOIN contacts c ON c.instance_id = :inst AND (c.jid = i.jid OR c.jid = i.alt OR c.alt_jid = i.jid)
    ORDER BY i.jid, (c.jid = i.jid) DESC, c.id
),
linked AS (
    SELECT i.jid, (
        SELECT cl.id FROM clients cl
        WHERE cl.organization_id = :org AND cl.phone = ANY(string_to_array(i.variants, ','))
        ORDER BY array_position(string_to_array(i.variants, ','), cl.phone), cl.created_at, cl.id LIMIT 1
    ) AS client_id
    FROM input i WHERE i.variants IS NOT NULL
),
updated AS (
    UPDATE contacts c SET
        jid = CASE WHEN m.swap THEN i.jid ELSE c.jid END,
        name = CASE WHEN i.name IS NOT NULL AND (c.name_observed_at IS NULL
                                                 OR COALESCE(i.name_at, now()) >= c.name_observed_at)
                    THEN i.name ELSE c.name END,
        name_observed_at = CASE WHEN i.name IS NOT NULL AND (c.name_observed_at IS NULL
                                                             OR COALESCE(i.name_at, now()) >= c.name_observed_at)
                                THEN COALESCE(i.name_at, now()) ELSE c.name_observed_at END,
        alt_jid = CASE WHEN m.swap THEN c.jid
                       ELSE COALESCE(c.alt_jid, NULLIF(CASE WHEN c.jid = i.jid THEN i.alt ELSE i.jid END, c.jid)) END,
        phone = COALESCE(c.phone, i.phone),
        client_id = COALESCE(c.client_id, l.client_id),
        updated_at = now()
    FROM matched m JOIN input i ON i.jid = m.jid LEFT JOIN linked l ON l.jid = i.jid
    WHERE c.id = m.id AND (
        m.swap
        OR (i.name IS NOT NULL AND (c.name_observed_at IS NULL OR COALESCE(i.name_at, now()) >= c.name_observed_at)
            AND (c.name IS DISTINCT FROM i.name OR i.name_at > c.name_observed_at))
        OR (c.alt_jid IS NULL AND NULLIF(CASE WHEN c.jid = i.jid THEN i.alt ELSE i.jid END, c.jid) IS NOT NULL)
        OR (c.phone IS NULL AND i.phone IS NOT NULL)
        OR (c.client_id IS NULL AND l.client_id IS NOT NULL))
    RETURNING c.id, (m.client_id IS NULL AND c.client_id IS NOT NULL) AS newly_linked
),
inserted AS (
    INSERT INTO contacts (organization_id, instance_id, jid, alt_jid, phone, name, name_observed_at, client_id)
    SELECT :org, :inst, i.jid, i.alt, i.phone, i.name, CASE WHEN i.name IS NOT NULL THEN COALESCE(i.name_at, now()) END,
           l.client_id
    FROM input i LEFT JOIN linked l ON l.jid = i.jid
    WHERE NOT EXISTS (SELECT 1 FROM matched m WHERE m.jid = i.jid)
    ON CONFLICT (instance_id, jid) DO UPDATE SET  -- a concurrent insert won: its name yields to a newer one
        name = CASE WHEN EXCLUDED.name IS NOT NULL AND (contacts.name_observed_at IS NULL
                                                        OR EXCLUDED.name_observed_at >= contacts.name_observed_at)
                    THEN EXCLUDED.name ELSE contacts.name END,
        name_observed_at = CASE
            WHEN EXCLUDED.name IS NOT NULL AND (contacts.name_observed_at IS NULL
                                                OR EXCLUDED.name_observed_at >= contacts.name_observed_at)
            THEN EXCLUDED.name_observed_at ELSE contacts.name_observed_at END,
        updated_at = contacts.updated_at
    RETURNING id, jid, (xmax = 0) AS created, client_id IS NOT NULL AS has_client
)
SELECT m.jid, m.id, false, COALESCE(u.newly_linked, false) FROM matched m LEFT JOIN updated u ON u.id = m.id
UNION ALL
SELECT n.jid, n.id, n.created, n.created AND n.has_client FROM inserted n
""")


async def upsert_contacts(
    session: AsyncSession, scope: InstanceScope, contacts: Iterable[ContactInput]
) -> ContactsWritten:
    """Insert or refresh one-to-one contacts in one statement and link new matches to CRM clients by phone.

    A contact known by either address of a LID/phone-number pair is the same row, keyed by the phone-number jid
    once it is known (the LID moves to ``alt_jid``); names and the missing address are filled in; a client link,
    once made, is kept. Returns the contact id of every address given.
    """
    people = _merge_contacts(contacts)
    if not people:
        return ContactsWritten(ids={})
    phones = [_phone(p) for p in people]
    rows = (
        await session.execute(
            _UPSERT_CONTACTS_SQL,
            {
                "org": scope.organization_id,
                "inst": scope.id,
                "phone_jid": _PHONE_JID,
                "jids": _pack(p.jid for p in people),
                "alts": _pack(p.alt_jid for p in people),
                "phones": _pack(phones),
                "names": _pack_text([p.name for p in people]),
                "variants": _pack(",".join(phone_variants(phone)) or None for phone in phones),
                "names_at": _pack(p.name_at.isoformat() if p.name and p.name_at else None for p in people),
            },
        )
    ).all()
    by_jid = {jid: contact_id for jid, contact_id, _, _ in rows}
    ids: dict[str, int] = {}
    for person in people:
        contact_id = by_jid[person.jid]
        ids[person.jid] = contact_id
        if person.alt_jid:
            ids[person.alt_jid] = contact_id
    return ContactsWritten(ids=ids, created=sum(1 for r in rows if r[2]), linked=sum(1 for r in rows if r[3]))


# -- conversations ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversationFact:
    """What is known of a contact's newest message: enough to pick or open its conversation."""

    contact_id: int
    last_at: datetime
    last_from_me: bool


@dataclass(frozen=True, slots=True)
class ConversationRef:
    """The conversation a contact's messages go to."""

    id: int
    contact_id: int
    status: str
    created: bool


_LOCK_CONTACTS_SQL = text("SELECT id FROM contacts WHERE id = ANY(:ids) ORDER BY id FOR UPDATE")

_ENSURE_SQL = text("""
WITH f AS (
    SELECT * FROM unnest(CAST(:contacts AS bigint[]), CAST(:last_at AS timestamptz[]), CAST(:from_me AS boolean[]))
    AS f(contact_id, last_at, from_me)
),
cur AS (
    SELECT DISTINCT ON (c.contact_id) c.contact_id, c.id, c.status, c.last_message_at
    FROM conversations c JOIN f ON f.contact_id = c.contact_id
    ORDER BY c.contact_id, (c.status IN ('waiting', 'in_progress')) DESC, c.last_message_at DESC, c.id DESC
),
need AS (
    SELECT f.* FROM f LEFT JOIN cur ON cur.contact_id = f.contact_id
    WHERE cur.id IS NULL
       OR (:split AND cur.status NOT IN ('waiting', 'in_progress') AND f.last_at > cur.last_message_at)
),
created AS (
    INSERT INTO conversations (organization_id, instance_id, contact_id, status, opened_at, last_message_at,
                               waiting_since, closed_at, close_reason)
    SELECT :org, :inst, n.contact_id,
           CASE WHEN n.last_at < :open_after THEN 'closed' WHEN n.from_me THEN 'in_progress' ELSE 'waiting' END,
           n.last_at, n.last_at,
           CASE WHEN n.last_at >= :open_after AND NOT n.from_me THEN n.last_at END,
           CASE WHEN n.last_at < :open_after THEN now() END,
           CASE WHEN n.last_at < :open_after THEN CAST(:reason AS text) END
    FROM need n
    RETURNING id, contact_id, status
)
SELECT id, contact_id, status, true FROM created
UNION ALL
SELECT cur.id, cur.contact_id, cur.status, false FROM cur WHERE cur.contact_id NOT IN (SELECT contact_id FROM need)
""")


async def ensure_conversations(
    session: AsyncSession,
    scope: InstanceScope,
    facts: Iterable[ConversationFact],
    *,
    now: datetime,
    closed_reason: str,
    split_closed: bool = True,
) -> dict[int, ConversationRef]:
    """The conversation each contact's messages go to, opening (or creating closed) the ones that are missing.

    Locks the contacts first (in id order), so a webhook and an import never open two conversations for one
    contact. ``split_closed`` off keeps newer messages in a closed conversation (a stray chat met mid-import).
    """
    newest: dict[int, ConversationFact] = {}
    for fact in facts:
        known = newest.get(fact.contact_id)
        if known is None or fact.last_at > known.last_at:
            newest[fact.contact_id] = fact
    if not newest:
        return {}
    await session.execute(_LOCK_CONTACTS_SQL, {"ids": sorted(newest)})
    ordered = list(newest.values())
    rows = (
        await session.execute(
            _ENSURE_SQL,
            {
                "org": scope.organization_id,
                "inst": scope.id,
                "split": split_closed,
                "reason": closed_reason,
                "open_after": now - timedelta(hours=scope.inactivity_hours),
                "contacts": [f.contact_id for f in ordered],
                "last_at": [f.last_at for f in ordered],
                "from_me": [f.last_from_me for f in ordered],
            },
        )
    ).all()
    return {row[1]: ConversationRef(*row) for row in rows}


_ADVANCE_SQL = text("""
WITH ins AS (
    SELECT * FROM unnest(CAST(:convs AS bigint[]), CAST(:sent AS timestamptz[]), CAST(:from_me AS boolean[]))
    AS i(conversation_id, sent_at, from_me)
),
agg AS (
    SELECT conversation_id, min(sent_at) AS oldest, max(sent_at) AS newest,
           (array_agg(from_me ORDER BY sent_at DESC))[1] AS newest_from_me,
           max(sent_at) FILTER (WHERE from_me) AS last_out
    FROM ins GROUP BY conversation_id
)
UPDATE conversations c SET
    opened_at = LEAST(c.opened_at, a.oldest),
    last_message_at = GREATEST(c.last_message_at, a.newest),
    waiting_since = CASE
        WHEN a.oldest < c.last_message_at THEN CASE
            -- an older message arrived late: the first customer message after the business's last one, from the
            -- stored messages (these included), as if they had arrived in order
            WHEN c.status NOT IN ('waiting', 'in_progress') THEN c.waiting_since
            ELSE (SELECT min(m.sent_at) FROM messages m
                  WHERE m.conversation_id = c.id AND NOT m.from_me AND m.sent_at > COALESCE(
                      (SELECT max(o.sent_at) FROM messages o WHERE o.conversation_id = c.id AND o.from_me),
                      '-infinity'))
            END
        WHEN a.newest_from_me THEN NULL
        WHEN a.last_out IS NOT NULL THEN (
            SELECT min(i.sent_at) FROM ins i
            WHERE i.conversation_id = c.id AND NOT i.from_me AND i.sent_at > a.last_out)
        ELSE COALESCE(c.waiting_since, (
            SELECT min(i.sent_at) FROM ins i
            WHERE i.conversation_id = c.id AND NOT i.from_me AND i.sent_at >= c.last_message_at))
    END,
    status = CASE
        WHEN a.newest >= c.last_message_at AND a.newest_from_me AND c.status = 'waiting' THEN 'in_progress'
        -- a business message arriving late still answered the customer, as when it arrived in order
        WHEN a.oldest < c.last_message_at AND a.last_out IS NOT NULL AND c.status = 'waiting' THEN 'in_progress'
        ELSE c.status END,
    updated_at = now()
FROM agg a
WHERE c.id = a.conversation_id
""")


async def advance_conversations(session: AsyncSession, inserted: Sequence[InsertedMessage]) -> None:
    """Move conversations forward for newly stored messages: times, the waiting marker, waiting → in progress."""
    if not inserted:
        return
    await session.execute(
        _ADVANCE_SQL,
        {
            "convs": [m.conversation_id for m in inserted],
            "sent": [m.sent_at for m in inserted],
            "from_me": [m.from_me for m in inserted],
        },
    )


_FINALIZE_SQL = text("""
WITH span AS (
    SELECT c.id,
           (SELECT min(m.sent_at) FROM messages m WHERE m.conversation_id = c.id) AS oldest,
           (SELECT max(m.sent_at) FROM messages m WHERE m.conversation_id = c.id) AS newest
    FROM conversations c WHERE c.instance_id = :inst
),
waiting AS (
    SELECT c.id, (
        SELECT min(m.sent_at) FROM messages m
        WHERE m.conversation_id = c.id AND NOT m.from_me AND m.sent_at > COALESCE(
            (SELECT max(o.sent_at) FROM messages o WHERE o.conversation_id = c.id AND o.from_me), '-infinity')
    ) AS first_unanswered
    FROM conversations c
    WHERE c.instance_id = :inst AND c.status IN ('waiting', 'in_progress') AND c.waiting_since IS NOT NULL
)
UPDATE conversations c SET
    opened_at = LEAST(c.opened_at, s.oldest),
    last_message_at = GREATEST(c.last_message_at, s.newest),
    waiting_since = COALESCE(w.first_unanswered, c.waiting_since),
    updated_at = now()
FROM span s LEFT JOIN waiting w ON w.id = s.id
WHERE c.id = s.id AND (c.opened_at > s.oldest OR c.last_message_at < s.newest
                       OR c.waiting_since IS DISTINCT FROM COALESCE(w.first_unanswered, c.waiting_since))
""")


async def finalize_conversations(session: AsyncSession, instance_id: uuid.UUID) -> int:
    """After an import: stretch each conversation over its messages and re-mark the first unanswered message."""
    result = await session.execute(_FINALIZE_SQL, {"inst": instance_id})
    return int(getattr(result, "rowcount", 0) or 0)


async def conversation_targets(session: AsyncSession, instance_id: uuid.UUID) -> dict[str, int]:
    """Every contact address of the instance → its current conversation (where imported messages go)."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT ON (v.contact_id) c.jid, c.alt_jid, v.id FROM conversations v "
            "JOIN contacts c ON c.id = v.contact_id WHERE v.instance_id = :inst "
            "ORDER BY v.contact_id, (v.status IN ('waiting', 'in_progress')) DESC, v.last_message_at DESC, v.id DESC"
        ),
        {"inst": instance_id},
    )
    targets: dict[str, int] = {}
    for jid, alt, conversation_id in rows.all():
        targets[jid] = conversation_id
        if alt:
            targets[alt] = conversation_id
    return targets


# -- messages -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MessageRows:
    """Messages to store with the conversation each goes to (what one insert statement takes)."""

    conversation_id: list[int] = field(default_factory=list)
    messages: list[GatewayMessage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)

    def append(self, conversation_id: int, message: GatewayMessage) -> None:
        """Add one message, bound for ``conversation_id``."""
        self.conversation_id.append(conversation_id)
        self.messages.append(message)


@dataclass(frozen=True, slots=True)
class InsertedMessage:
    """A message that was not stored before."""

    id: int
    conversation_id: int
    external_id: str
    sent_at: datetime
    from_me: bool


_RANKS = "ARRAY[" + ", ".join(f"'{status}'" for status in STATUS_ORDER) + "]::text[]"


def furthest_status_sql(stored: str, other: str) -> str:
    """SQL for the further of two statuses (``stored`` when ``other`` is NULL, unknown or behind it)."""
    return (
        f"CASE WHEN array_position({_RANKS}, {other}) > array_position({_RANKS}, {stored}) THEN {other} "
        f"ELSE {stored} END"
    )


RECEIPTS_LOCK_SQL = (
    "SELECT pg_advisory_xact_lock{mode}(hashtextextended('pending-receipts:' || CAST(:inst AS text), 0))"
)
"""Orders receipts for messages not stored yet against the messages' insertion, per instance: an insert holds it
shared (and so sees every pending receipt committed before), a receipt that finds its message missing holds it
exclusively (and so sees every message committed before). Format ``mode`` with ``_shared`` or ''."""
_LOCK_SHARED_SQL = text(RECEIPTS_LOCK_SQL.format(mode="_shared"))
_LOCK_EXCLUSIVE_SQL = text(RECEIPTS_LOCK_SQL.format(mode=""))


async def lock_receipts(session: AsyncSession, instance_id: uuid.UUID, *, exclusive: bool) -> None:
    """Take the instance's pending-receipt lock for the transaction (see :data:`RECEIPTS_LOCK_SQL`)."""
    await session.execute(_LOCK_EXCLUSIVE_SQL if exclusive else _LOCK_SHARED_SQL, {"inst": instance_id})


CLAIM_PENDING_SQL = """
claimed AS (
    DELETE FROM pending_receipts p USING {source} s
    WHERE p.instance_id = {inst} AND p.external_id = s.ext
    RETURNING p.external_id, p.status
)"""
"""A CTE taking the pending receipts of the messages in ``source`` (a relation with column ``ext``): an insert
joins ``claimed`` on ``external_id`` and stores the further of its status and the receipt's."""

_INSERT_MESSAGES_SQL = f"""
WITH m AS (
    SELECT * FROM unnest({_col("convs", "bigint")}, {_col("exts", "text")}, {_col("fms", "boolean")},
                         {_col("types", "text")}, {_col("contents", "text")}, {_col("murls", "text")},
                         {_col("mmimes", "text")}, {_col("mnames", "text")}, {_col("msizes", "bigint")},
                         {_col("tss", "bigint")}, {_col("statuses", "text")})
    AS m(conv, ext, fm, type, content, murl, mmime, mname, msize, ts, status)
),{CLAIM_PENDING_SQL.format(source="m", inst=":inst")}
INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, from_me, sender, type, content,
                      media_url, media_mime, media_name, media_size, sent_at, status)
SELECT :org, :inst, m.conv, m.ext, m.fm, CASE WHEN m.fm THEN 'agent' ELSE 'client' END, m.type, m.content,
       m.murl, m.mmime, m.mname, m.msize, to_timestamp(m.ts),
       {furthest_status_sql("COALESCE(m.status, CASE WHEN m.fm THEN 'sent' ELSE 'delivered' END)", "r.status")}
FROM m LEFT JOIN claimed r ON r.external_id = m.ext
ON CONFLICT (instance_id, external_id) DO NOTHING
"""
_INSERT_COUNT_SQL = text(_INSERT_MESSAGES_SQL)
_INSERT_RETURNING_SQL = text(_INSERT_MESSAGES_SQL + "RETURNING id, conversation_id, external_id, sent_at, from_me")


_FIELD = {name: index for index, name in enumerate(GatewayMessage._fields)}


def _message_params(scope: InstanceScope, rows: MessageRows) -> dict[str, Any]:
    columns = list(zip(*rows.messages, strict=True))  # the messages' fields, column by column

    def column(name: str) -> Sequence[Any]:
        return columns[_FIELD[name]]

    return {
        "org": scope.organization_id,
        "inst": scope.id,
        "convs": _SEP.join(map(str, rows.conversation_id)),
        "exts": _pack_text(column("external_id")),
        "fms": _SEP.join(["t" if v else "f" for v in column("from_me")]),
        "types": _SEP.join(column("type")),
        "contents": _pack_text(column("content")),
        "murls": _pack_text(column("media_url")),
        "mmimes": _pack_text(column("media_mime")),
        "mnames": _pack_text(column("media_name")),
        "msizes": _pack(column("media_size")),
        "tss": _SEP.join(map(str, column("timestamp"))),
        "statuses": _pack(column("status")),
    }


async def insert_messages(session: AsyncSession, scope: InstanceScope, rows: MessageRows) -> int:
    """Store messages not stored yet (by external id) in one statement, each at the furthest of its status and a
    receipt that arrived before it (which is then forgotten); returns how many were new."""
    if not len(rows):
        return 0
    await lock_receipts(session, scope.id, exclusive=False)
    result = await session.execute(_INSERT_COUNT_SQL, _message_params(scope, rows))
    return int(getattr(result, "rowcount", 0) or 0)


async def insert_messages_returning(
    session: AsyncSession, scope: InstanceScope, rows: MessageRows
) -> list[InsertedMessage]:
    """Like :func:`insert_messages`, returning the rows that were new (the webhook path advances from them)."""
    if not len(rows):
        return []
    await lock_receipts(session, scope.id, exclusive=False)
    result = await session.execute(_INSERT_RETURNING_SQL, _message_params(scope, rows))
    return [InsertedMessage(*row) for row in result.all()]


_STATUS_SQL = text(f"""
WITH r AS (SELECT * FROM unnest({_col("exts", "text")}, {_col("statuses", "text")}) AS r(ext, status)),
moved AS (
    UPDATE messages m SET status = r.status
    FROM r
    WHERE m.instance_id = :inst AND m.external_id = r.ext
      AND array_position(CAST(:order AS text[]), r.status) > array_position(CAST(:order AS text[]), m.status)
    RETURNING m.id, m.conversation_id, m.external_id, m.status
),
kept AS (
    INSERT INTO pending_receipts AS p (instance_id, external_id, status)
    SELECT :inst, r.ext, r.status FROM r
    WHERE NOT EXISTS (SELECT 1 FROM messages x WHERE x.instance_id = :inst AND x.external_id = r.ext)
    ON CONFLICT (instance_id, external_id) DO UPDATE SET status = EXCLUDED.status, observed_at = now()
    WHERE array_position(CAST(:order AS text[]), EXCLUDED.status) > array_position(CAST(:order AS text[]), p.status)
),
pruned AS (  -- the bound: a receipt whose message has not come in a week never will (a group's, a deleted chat's)
    DELETE FROM pending_receipts WHERE instance_id = :inst AND observed_at < now() - interval '7 days'
)
SELECT id, conversation_id, external_id, status FROM moved
""")
_MISSING_SQL = text(f"""
SELECT r.ext FROM unnest({_col("exts", "text")}) AS r(ext)
WHERE NOT EXISTS (SELECT 1 FROM messages x WHERE x.instance_id = :inst AND x.external_id = r.ext)
""")


async def unstored_messages(session: AsyncSession, scope: InstanceScope, external_ids: Iterable[str]) -> set[str]:
    """Which of ``external_ids`` have no stored message (read only: no row is locked)."""
    wanted = list(dict.fromkeys(external_ids))
    if not wanted:
        return set()
    rows = await session.execute(_MISSING_SQL, {"inst": scope.id, "exts": _pack_text(wanted)})
    return {row[0] for row in rows.all()}


async def advance_message_status(
    session: AsyncSession, scope: InstanceScope, updates: Sequence[tuple[str, str]]
) -> int:
    """Apply receipts (external id, status): a status only moves forward (sent < delivered < read < played, and
    deleted is final). Returns how many messages changed."""
    return len(await advance_message_statuses(session, scope, updates))


async def advance_message_statuses(
    session: AsyncSession, scope: InstanceScope, updates: Sequence[tuple[str, str]], *, locked: bool = False
) -> list[tuple[int, int, str, str]]:
    """Like :func:`advance_message_status`, returning (id, conversation id, external id, new status) of each
    message that moved.

    A receipt for a message not stored yet is remembered (``pending_receipts``, at the furthest status) and applied
    when the message is stored. Before remembering one, the instance's receipt lock is taken exclusively (see
    :data:`RECEIPTS_LOCK_SQL`), unless the caller already holds it (``locked``)."""
    best: dict[str, str] = {}
    for external_id, status in updates:
        if status in STATUS_ORDER and (external_id not in best or STATUS_RANK[status] > STATUS_RANK[best[external_id]]):
            best[external_id] = status
    if not best:
        return []
    if not locked and await unstored_messages(session, scope, best):
        await lock_receipts(session, scope.id, exclusive=True)
    result = await session.execute(
        _STATUS_SQL,
        {
            "inst": scope.id,
            "exts": _pack_text(list(best)),
            "statuses": _pack(best.values()),
            "order": list(STATUS_ORDER),
        },
    )
    return [(r[0], r[1], r[2], r[3]) for r in result.all()]


# -- reads (API) ----------------------------------------------------------------------------------------------------


def encode_cursor(values: Sequence[object]) -> str:
    """An opaque page cursor."""
    return base64.urlsafe_b64encode(orjson.dumps([str(v) for v in values])).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> list[str]:
    """The values of a cursor made by :func:`encode_cursor`; ValueError when it is not one."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(values, list) or len(values) != size or not all(isinstance(v, str) for v in values):
        raise ValueError("invalid cursor")
    return values


_CONVERSATION_COLUMNS = (
    "v.id, v.organization_id, v.instance_id, v.status, v.opened_at, v.last_message_at, v.waiting_since, "
    "v.closed_at, v.close_reason, v.assignee_id, v.priority, v.tags, v.created_at, v.updated_at, "
    "c.id AS contact_id, c.jid AS contact_jid, c.phone AS contact_phone, c.name AS contact_name, "
    "c.client_id AS contact_client_id"
)


async def list_conversations(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID | None,
    instance_id: uuid.UUID | None = None,
    status: str | None = None,
    phone: str | None = None,
    updated_since: datetime | None = None,
    after: tuple[datetime, int] | None = None,
    order: Order = "desc",
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Conversations with their contact, keyset-paginated by (updated_at, id); ``limit + 1`` rows tell whether
    another page follows."""
    compare = "<" if order == "desc" else ">"
    variants = list(phone_variants(phone)) if phone else None
    rows = await session.execute(
        text(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations v JOIN contacts c ON c.id = v.contact_id "
            "WHERE (CAST(:org AS uuid) IS NULL OR v.organization_id = :org) "
            "AND (CAST(:inst AS uuid) IS NULL OR v.instance_id = :inst) "
            "AND (CAST(:status AS text) IS NULL OR v.status = :status) "
            "AND (CAST(:phones AS text[]) IS NULL OR c.phone = ANY(:phones)) "
            "AND (CAST(:since AS timestamptz) IS NULL OR v.updated_at >= :since) "
            f"AND (CAST(:after_at AS timestamptz) IS NULL OR (v.updated_at, v.id) {compare} (:after_at, :after_id)) "
            f"ORDER BY v.updated_at {order}, v.id {order} LIMIT :limit"
        ),
        {
            "org": organization_id,
            "inst": instance_id,
            "status": status,
            "phones": variants,
            "since": updated_since,
            "after_at": after[0] if after else None,
            "after_id": after[1] if after else None,
            "limit": limit + 1,
        },
    )
    return [dict(r) for r in rows.mappings().all()]


async def get_conversation(
    session: AsyncSession, conversation_id: int, *, organization_id: uuid.UUID | None
) -> dict[str, Any] | None:
    """One conversation with its contact, only within ``organization_id`` when given."""
    row = await session.execute(
        text(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations v JOIN contacts c ON c.id = v.contact_id "
            "WHERE v.id = :id AND (CAST(:org AS uuid) IS NULL OR v.organization_id = :org)"
        ),
        {"id": conversation_id, "org": organization_id},
    )
    found = row.mappings().one_or_none()
    return dict(found) if found else None


async def list_messages(
    session: AsyncSession,
    conversation_id: int,
    *,
    after: tuple[datetime, int] | None = None,
    order: Order = "desc",
    limit: int = 50,
) -> list[dict[str, Any]]:
    """A conversation's messages keyset-paginated by (sent_at, id); ``limit + 1`` rows as above."""
    compare = "<" if order == "desc" else ">"
    rows = await session.execute(
        text(
            "SELECT id, external_id, from_me, sender, type, content, media_url, media_mime, media_name, media_size, "
            "sent_at, status, created_at FROM messages WHERE conversation_id = :conv "
            f"AND (CAST(:after_at AS timestamptz) IS NULL OR (sent_at, id) {compare} (:after_at, :after_id)) "
            f"ORDER BY sent_at {order}, id {order} LIMIT :limit"
        ),
        {
            "conv": conversation_id,
            "after_at": after[0] if after else None,
            "after_id": after[1] if after else None,
            "limit": limit + 1,
        },
    )
    return [dict(r) for r in rows.mappings().all()]


async def list_chats(
    session: AsyncSession, instance_id: uuid.UUID, *, skip: int = 0, take: int = 50
) -> list[dict[str, Any]]:
    """The instance's chats as the database knows them (contacts with a conversation), most recent first."""
    rows = await session.execute(
        text(
            "SELECT c.jid, c.alt_jid, c.name, c.phone, c.client_id, v.id AS conversation_id, v.status, "
            "v.last_message_at, lm.from_me AS last_from_me, lm.content AS last_preview, lm.type AS last_type "
            "FROM contacts c "
            "JOIN LATERAL (SELECT id, status, last_message_at FROM conversations WHERE contact_id = c.id "
            "  ORDER BY (status IN ('waiting', 'in_progress')) DESC, last_message_at DESC, id DESC LIMIT 1) v ON true "
            "LEFT JOIN LATERAL (SELECT from_me, content, type FROM messages WHERE conversation_id = v.id "
            "  ORDER BY sent_at DESC, id DESC LIMIT 1) lm ON true "
            "WHERE c.instance_id = :inst ORDER BY v.last_message_at DESC, c.id DESC OFFSET :skip LIMIT :take"
        ),
        {"inst": instance_id, "skip": skip, "take": take},
    )
    return [dict(r) for r in rows.mappings().all()]
