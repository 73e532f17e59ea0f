"""Gateway webhook payloads parsed into typed, provider-neutral events (gateways.md §2, §4 and, for WAHA, §8.4).

Both known shapes are accepted wherever a gateway varies (MegaAPI's two `connection_update` forms, Evolution's
`instance` as a name or an object, `contacts.*` as an array or a single object, `chats.*` rows with or without
`remoteJid`). An event zapsync does not act on is still parsed (kind OTHER) so it can be stored and acknowledged; a
payload that is not what its event promises raises :class:`MalformedPayload`.

Hostile input is rejected here, where the body is parsed, with a message the sender can act on (issue 13 §2):
nesting deeper than :data:`MAX_DEPTH`, numbers outside a 64-bit integer's range, message timestamps past year 9999,
identifiers longer than their columns (:data:`MAX_ID_LENGTH`, :data:`MAX_INSTANCE_NAME`: real gateways stay well
inside them). NUL and lone surrogates are not rejected: :func:`decode_json` returns a
:class:`core.storable.SanitizedPayload` whose strings are storable and which keeps the original for the inbox.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

import orjson

from core.domain import ChatKind, GatewayContact, GatewayMessage, InstanceStatus, Provider, chat_kind
from core.phones import phone_from_jid
from core.storable import SanitizedPayload, has_unstorable
from gateways.messages import MalformedMessage, from_baileys, status_from_wire
from gateways.status import LOGGED_OUT_CODES, from_evolution, from_megaapi, from_waha, waha_reason
from gateways.waha_messages import from_waha_message, key_id, serialized_id, status_from_ack


class MalformedPayload(ValueError):
    """The body cannot be what it claims to be; the message says why (safe to return to the sender)."""


class EventKind(enum.StrEnum):
    """What zapsync does with an event."""

    STATUS = "status"
    """Changes the instance's connection status (and maybe its QR code)."""
    MESSAGES = "messages"
    """New (or history) messages: contact, conversation and message upserts."""
    RECEIPTS = "receipts"
    """Delivery/read receipts and deletions: message statuses move forward."""
    CONTACTS = "contacts"
    """Contact names and addresses."""
    OTHER = "other"
    """Stored and acknowledged; no inline effect yet."""


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One delivery, normalized."""

    provider: Provider
    event: str
    instance_name: str | None
    kind: EventKind
    status: InstanceStatus | None = None
    reason: str | None = None
    phone_number: str | None = None
    profile_name: str | None = None
    qr_code: str | None = None
    """The raw QR string (what a phone scans), never an image."""
    logged_out: bool = False
    event_time: datetime | None = None
    event_id: str | None = None
    """An id the gateway gave the delivery (WAHA), when there is one."""
    messages: tuple[GatewayMessage, ...] = ()
    receipts: tuple[tuple[str, str], ...] = ()
    """(message key id, new status) pairs."""
    contacts: tuple[GatewayContact, ...] = ()
    dedupe_id: str | None = None
    """What makes a delivery the same event (instance, message key id, event[, status]); else the body decides."""
    pairing_code: str | None = None
    """The code a user types instead of scanning, when the gateway made one (a QR event asked with a number)."""


class _Envelope(TypedDict):
    """The fields every event of a delivery shares, spread into each :class:`WebhookEvent`."""

    provider: Provider
    event: str
    instance_name: str | None
    event_time: datetime | None


MAX_DEPTH = 64
"""Deepest nesting of objects and arrays a payload may have (real deliveries stay under 15)."""
MAX_INTEGER = 2**63 - 1
"""Numbers must fit a signed 64-bit integer (PostgreSQL's bigint; JavaScript gateways send at most 2**53)."""
MAX_ID_LENGTH = 128
"""Longest key id or jid stored (the columns' width; Evolution's own schema keeps `remoteJid` in 100)."""
MAX_PHONE_DIGITS = 32
"""Most digits a jid's user part may have (the phone columns' width; E.164 numbers have at most 15)."""
MAX_INSTANCE_NAME = 255
"""Longest instance name (the column's width, as Evolution's `Instance.name VARCHAR(255)`)."""
MAX_EPOCH_SECONDS = 253_402_300_799
"""The last second of year 9999: later message timestamps are not real."""


def decode_json(body: bytes) -> dict[str, Any]:
    """The body as a bounded JSON object, or MalformedPayload with the reason (see :func:`checked_payload`)."""
    if not body.strip():
        raise MalformedPayload("empty body: expected a JSON object")
    # A NUL can only come from a `\u0000` escape (a raw one is not JSON) and a lone surrogate only through the
    # fallback parser: other bodies need no look at their strings.
    try:
        value = orjson.loads(body)
        strings = b"\\u0000" in body
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise MalformedPayload(f"body is not valid JSON: {exc}") from exc
        value, strings = _loads_with_lone_surrogates(body), True
    if not isinstance(value, dict):
        raise MalformedPayload(f"expected a JSON object, got {type(value).__name__}")
    return checked_payload(value, strings=strings)


def checked_payload(value: dict[str, Any], *, strings: bool = True) -> dict[str, Any]:
    """``value`` when its nesting and numbers are within bounds and its text is storable; a
    :class:`SanitizedPayload` (NUL as "␀", lone surrogates as "�", the original kept) when some text is not;
    MalformedPayload when a bound is crossed. Replaying a stored original goes through here too. ``strings=False``
    skips the look at the text (the caller knows it is storable)."""
    if _walk(value, 1, "body", strings):
        return SanitizedPayload(value)
    return value


def _loads_with_lone_surrogates(body: bytes) -> Any:
    """The standard library's parser, which accepts the lone-surrogate escapes orjson refuses."""

    def refuse(constant: str) -> Any:
        raise MalformedPayload(f"body is not valid JSON: {constant} is not a JSON number")

    try:
        return json.loads(body, parse_constant=refuse)
    except RecursionError as exc:
        raise MalformedPayload(f"body is nested deeper than {MAX_DEPTH} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        if isinstance(exc, MalformedPayload):
            raise
        raise MalformedPayload(f"body is not valid JSON: {exc}") from exc


def _walk(value: Any, depth: int, key: object, strings: bool) -> bool:
    """Check depth and numbers below ``value`` (the value of field ``key``); True when ``strings`` and some string
    (or object key) is not storable."""
    if isinstance(value, str):
        return strings and has_unstorable(value)
    if isinstance(value, dict):
        if depth > MAX_DEPTH:
            raise MalformedPayload(f"body is nested deeper than {MAX_DEPTH} levels")
        found = False
        for name, item in value.items():
            if isinstance(item, str):  # inline: most values are strings
                hit = strings and (has_unstorable(item) or has_unstorable(name))
            else:
                hit = _walk(item, depth + 1, name, strings) or (strings and has_unstorable(name))
            found = found or hit
        return found
    if isinstance(value, list):
        if depth > MAX_DEPTH:
            raise MalformedPayload(f"body is nested deeper than {MAX_DEPTH} levels")
        found = False
        for item in value:
            if _walk(item, depth + 1, key, strings):
                found = True
        return found
    if value is None or isinstance(value, bool):
        return False
    in_range = (
        -MAX_INTEGER - 1 <= value <= MAX_INTEGER
        if isinstance(value, int)
        else not isinstance(value, float) or (math.isfinite(value) and abs(value) <= MAX_INTEGER)
    )
    if not in_range:
        raise MalformedPayload(f"{str(key)[:64]!r} is out of range: {value!r} (numbers must fit a 64-bit integer)")
    return False


def event_name_from_suffix(suffix: str) -> str:
    """Evolution's by-events URL suffix (`connection-update`) back to its event name (`connection.update`)."""
    special = {"group-participants-update": "group-participants.update"}
    return special.get(suffix, suffix.replace("-", "."))


def parse_evolution(payload: dict[str, Any], *, path_event: str | None = None) -> WebhookEvent:
    """An Evolution API v2 delivery: envelope `{event, instance, data, date_time, ...}`."""
    event = payload.get("event") or (event_name_from_suffix(path_event) if path_event else None)
    if not isinstance(event, str) or not event:
        raise MalformedPayload("missing 'event' (a string such as 'connection.update')")
    event = event.lower().replace("_", ".") if event.isupper() else event
    instance = payload.get("instance")
    if isinstance(instance, dict):
        instance = instance.get("instanceName") or instance.get("name")
    if instance is not None and not isinstance(instance, str):
        raise MalformedPayload("'instance' must be the instance name")
    _check_instance_name(instance, "instance")
    data = payload.get("data")
    event_time = _parse_time(payload.get("date_time"))
    base = _Envelope(provider=Provider.EVOLUTION, event=event, instance_name=instance, event_time=event_time)

    if event == "connection.update":
        if not instance:
            raise MalformedPayload("connection.update without 'instance'")
        if not isinstance(data, dict) or not isinstance(data.get("state"), str):
            raise MalformedPayload("connection.update needs data.state (open, connecting, close or refused)")
        state = data["state"]
        status = from_evolution(state)
        if status is None:
            raise MalformedPayload(f"connection.update has unknown state {state!r}")
        code = data.get("statusReason")
        logged_out = state == "close" and isinstance(code, int) and code in LOGGED_OUT_CODES
        reason = None
        if logged_out:
            reason = f"logged out (code {code})"
        elif state == "refused":
            reason = QR_LIMIT_REASON
        elif status is not InstanceStatus.CONNECTED and code not in (None, 200):
            reason = f"{state} (code {code})"
        return WebhookEvent(
            **base,
            kind=EventKind.STATUS,
            status=status,
            reason=reason,
            logged_out=logged_out,
            phone_number=_phone(data.get("wuid")),
            profile_name=_text(data.get("profileName")),
        )
    if event == "qrcode.updated":
        if not instance:
            raise MalformedPayload("qrcode.updated without 'instance'")
        if not isinstance(data, dict):
            raise MalformedPayload("qrcode.updated needs a data object")
        qrcode = data.get("qrcode")
        if isinstance(qrcode, dict) and isinstance(qrcode.get("code"), str) and qrcode["code"]:
            pairing = qrcode.get("pairingCode")
            return WebhookEvent(
                **base,
                kind=EventKind.STATUS,
                status=InstanceStatus.QR_PENDING,
                qr_code=qrcode["code"],
                pairing_code=pairing if isinstance(pairing, str) and 0 < len(pairing) <= MAX_PAIRING_CODE else None,
            )
        if data.get("message"):  # QR limit reached: the session ends as refused
            message = str(data.get("message"))
            reason = QR_LIMIT_REASON if "limit" in message.lower() else message[:200]
            return WebhookEvent(**base, kind=EventKind.STATUS, status=InstanceStatus.ERROR, reason=reason)
        raise MalformedPayload("qrcode.updated needs data.qrcode.code or data.message")
    if event == "logout.instance" and instance:
        return WebhookEvent(
            **base, kind=EventKind.STATUS, status=InstanceStatus.DISCONNECTED, reason="logged out", logged_out=True
        )
    if event in DELETE_EVENTS:
        name = instance or (data.get("instanceName") if isinstance(data, dict) else None)
        if not isinstance(name, str) or not name:
            raise MalformedPayload(f"{event} without 'instance' (or data.instanceName)")
        _check_instance_name(name, "data.instanceName")
        named = _Envelope(
            provider=base["provider"], event=base["event"], instance_name=name, event_time=base["event_time"]
        )
        return WebhookEvent(
            **named,
            kind=EventKind.STATUS,
            status=InstanceStatus.DISCONNECTED,
            reason=DELETED_REASON,
        )
    if event in MESSAGE_EVENTS:
        return _evolution_messages(base, event, instance, data)
    if event in RECEIPT_EVENTS or event == "messages.delete":
        return _evolution_receipts(base, event, instance, data)
    if event.startswith("contacts."):
        return _contacts(base, event, instance, data)
    if event.startswith("chats."):
        _rows(event, data, strings=event == "chats.delete")  # store and acknowledge, whatever the variant
    elif event == "presence.update" and not isinstance(data, dict):
        raise MalformedPayload("presence.update needs a data object {id, presences}")
    return WebhookEvent(**base, kind=EventKind.OTHER)


QR_LIMIT_REASON = "QR code limit reached: ask for a new QR code"
"""The status reason once Evolution stops making QR codes for a session (`QRCODE_LIMIT`, state `refused`)."""

DELETE_EVENTS = frozenset({"instance.delete", "remove.instance"})
"""Evolution's events for an instance deleted at the gateway (`{instanceName, instanceId}`)."""
DELETED_REASON = "deleted at the gateway"

MESSAGE_EVENTS = frozenset({"messages.upsert", "send.message", "messages.set"})
RECEIPT_EVENTS = frozenset({"messages.update", "send.message.update"})


def _message(event: str, raw: dict[str, Any]) -> GatewayMessage:
    """One Baileys message record, or MalformedPayload saying what is wrong with it."""
    try:
        message = from_baileys(raw)
    except MalformedMessage as exc:
        raise MalformedPayload(f"{event}: {exc}") from exc
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. a `{low, high}` whose `high` is not a number
        raise MalformedPayload(f"{event}: messageTimestamp or fileLength is not a number ({exc})") from exc
    return _bounded(event, message, id_field="key.id", jid_field="key.remoteJid")


MAX_PAIRING_CODE = 32
"""Longest pairing code kept (the column's width; WhatsApp's are 8 characters)."""


def _bounded(event: str, message: GatewayMessage, *, id_field: str, jid_field: str) -> GatewayMessage:
    """``message`` when its identifiers fit their columns and its time is real; MalformedPayload otherwise. A media
    size out of a 64-bit integer's range becomes unknown."""
    if message.timestamp > MAX_EPOCH_SECONDS:
        raise MalformedPayload(f"{event}: messageTimestamp {message.timestamp} is out of range (after year 9999)")
    _check_id(message.external_id, f"{event}: {id_field}")
    _check_jid(message.chat_jid, f"{event}: {jid_field}")
    if message.alt_jid is not None:
        _check_jid(message.alt_jid, f"{event}: key.remoteJidAlt")
    if message.participant is not None:
        _check_jid(message.participant, f"{event}: participant")
    if message.media_size is not None and not 0 <= message.media_size <= MAX_INTEGER:
        return message._replace(media_size=None)
    if message.media_mime is not None and len(message.media_mime) > MAX_ID_LENGTH:
        return message._replace(media_mime=None)
    return message


def _check_id(value: str, field: str) -> None:
    if len(value) > MAX_ID_LENGTH:
        raise MalformedPayload(f"{field} is {len(value)} characters long: at most {MAX_ID_LENGTH} are accepted")


def _check_jid(value: str, field: str) -> None:
    _check_id(value, field)
    digits = phone_from_jid(value)
    if digits is not None and len(digits) > MAX_PHONE_DIGITS:
        raise MalformedPayload(f"{field} has {len(digits)} digits: a phone has at most {MAX_PHONE_DIGITS}")


def _check_instance_name(value: str | None, field: str) -> None:
    if value is not None and len(value) > MAX_INSTANCE_NAME:
        raise MalformedPayload(
            f"'{field}' is {len(value)} characters long: instance names have at most {MAX_INSTANCE_NAME}"
        )


def _phone(jid: Any) -> str | None:
    """The digits of a status event's own jid, or None when it is not a jid or they cannot be a phone."""
    digits = phone_from_jid(jid) if isinstance(jid, str) else None
    return digits if digits is not None and len(digits) <= MAX_PHONE_DIGITS else None


def _evolution_messages(base: _Envelope, event: str, instance: str | None, data: Any) -> WebhookEvent:
    if not instance:
        raise MalformedPayload(f"{event} without 'instance'")
    records = data if isinstance(data, list) else [data]
    if not records or not all(isinstance(r, dict) for r in records):
        raise MalformedPayload(f"{event} needs data as a message object {{key, message, messageTimestamp}}")
    messages = tuple(_message(event, r) for r in records)
    single = len(messages) == 1 and not isinstance(data, list)
    return WebhookEvent(
        **base,
        kind=EventKind.MESSAGES,
        messages=messages,
        dedupe_id=f"{instance}|{event}|{messages[0].external_id}" if single else None,
    )


def _evolution_receipts(base: _Envelope, event: str, instance: str | None, data: Any) -> WebhookEvent:
    if not instance:
        raise MalformedPayload(f"{event} without 'instance'")
    rows = data if isinstance(data, list) else [data]
    receipts: list[tuple[str, str]] = []
    for row in rows:
        if not isinstance(row, dict):
            raise MalformedPayload(f"{event} needs data as an object")
        raw_key = row.get("key")
        key: dict[str, Any] = raw_key if isinstance(raw_key, dict) else {}
        status: str | None
        if event == "messages.delete":
            key_id, status, field = (key or row).get("id"), "deleted", "id"
        else:
            key_id, status, field = row.get("keyId") or key.get("id"), status_from_wire(row.get("status")), "keyId"
        if not isinstance(key_id, str) or not key_id:
            raise MalformedPayload(f"{event} needs the message id (data.{field})")
        _check_id(key_id, f"{event}: data.{field}")
        if status is not None:
            receipts.append((key_id, status))
    if not receipts:  # e.g. a poll vote: nothing to apply
        return WebhookEvent(**base, kind=EventKind.OTHER)
    tail = "|".join(f"{k}:{v}" for k, v in receipts)
    return WebhookEvent(
        **base, kind=EventKind.RECEIPTS, receipts=tuple(receipts), dedupe_id=f"{instance}|{event}|{tail}"
    )


def _rows(event: str, data: Any, *, strings: bool = False) -> list[Any]:
    """`data` as a list of rows: an array, or one object (both occur); strings allowed for `chats.delete`."""
    rows = data if isinstance(data, list) else [data]
    allowed = (dict, str) if strings else (dict,)
    if not rows or not all(isinstance(r, allowed) for r in rows):
        raise MalformedPayload(f"{event} needs data as an object or an array of objects")
    return rows


def _contacts(base: _Envelope, event: str, instance: str | None, data: Any) -> WebhookEvent:
    if not instance:
        raise MalformedPayload(f"{event} without 'instance'")
    contacts = tuple(
        GatewayContact(jid=row["remoteJid"], name=row.get("pushName") if isinstance(row.get("pushName"), str) else None)
        for row in _rows(event, data)
        if isinstance(row.get("remoteJid"), str) and chat_kind(row["remoteJid"]) is ChatKind.CONTACT
    )
    for contact in contacts:
        _check_jid(contact.jid, f"{event}: remoteJid")
    return WebhookEvent(**base, kind=EventKind.CONTACTS if contacts else EventKind.OTHER, contacts=contacts)


MEGAAPI_CONNECTION_MESSAGES = {"phone_connected": "connected", "phone_disconnected": "disconnected"}


def _text(value: object) -> str | None:
    """``value`` when it is a non-empty string, else None (a name or label sent as a number, list or object)."""
    return value if isinstance(value, str) and value else None


def parse_megaapi(payload: dict[str, Any]) -> WebhookEvent:
    """A MegaAPI delivery: flat, typed by `messageType` (both `connection_update` shapes accepted)."""
    kind = payload.get("messageType") or payload.get("type")
    if not isinstance(kind, str) or not kind:
        raise MalformedPayload("missing 'messageType'")
    instance = payload.get("instance_key") or payload.get("instanceKey")
    if instance is not None and not isinstance(instance, str):
        raise MalformedPayload("'instance_key' must be a string")
    _check_instance_name(instance, "instance_key")
    event_time = _parse_time(payload.get("timestamp"))
    base = _Envelope(provider=Provider.MEGAAPI, event=kind, instance_name=instance, event_time=event_time)
    if kind == "connection_update":
        if not instance:
            raise MalformedPayload("connection_update without 'instance_key'")
        if isinstance(payload.get("connection_state"), str):  # the official sample's shape
            raw = payload["connection_state"]
        elif _text(payload.get("message")) in MEGAAPI_CONNECTION_MESSAGES:  # the 2026 client's shape
            raw = MEGAAPI_CONNECTION_MESSAGES[payload["message"]]
        else:
            raise MalformedPayload(
                "connection_update needs 'connection_state' or 'message' (phone_connected/phone_disconnected)"
            )
        status = from_megaapi(raw)
        close_reason = payload.get("closeReason")
        return WebhookEvent(
            **base,
            kind=EventKind.STATUS,
            status=status,
            reason=None
            if status is InstanceStatus.CONNECTED
            else f"{raw}" + (f" ({close_reason})" if close_reason else ""),
            phone_number=_phone(payload.get("jid")),
            profile_name=_text(payload.get("pushName")),
        )
    key = payload.get("key")
    if kind == "message.ack":
        if not instance:
            raise MalformedPayload("message.ack without 'instance_key'")
        update = payload.get("update")
        key_id = key.get("id") if isinstance(key, dict) else None
        if not isinstance(key_id, str) or not key_id or not isinstance(update, dict):
            raise MalformedPayload("message.ack needs key.id and update.status")
        _check_id(key_id, "message.ack: key.id")
        ack = status_from_wire(update.get("status"))
        if ack is None:
            raise MalformedPayload(f"message.ack has unknown status {update.get('status')!r}")
        return WebhookEvent(
            **base,
            kind=EventKind.RECEIPTS,
            receipts=((key_id, ack),),
            dedupe_id=f"{instance}|message.ack|{key_id}|{ack}",
        )
    if isinstance(key, dict):  # a flat Baileys message typed by its content (`conversation`, `imageMessage`…)
        if not instance:
            raise MalformedPayload(f"{kind} message without 'instance_key'")
        message = _message(kind, payload)
        return WebhookEvent(
            **base, kind=EventKind.MESSAGES, messages=(message,), dedupe_id=f"{instance}|message|{message.external_id}"
        )
    return WebhookEvent(**base, kind=EventKind.OTHER)


def observation_time(event_time: datetime | None, received_at: datetime, tolerance: timedelta) -> datetime:
    """When the event was observed: its own time when plausible, else the time it was received.

    Gateways stamp events unreliably (Evolution writes local wall time with a `Z`), so a stamp is trusted only
    when it is not in the future and not older than ``tolerance``; a redelivery minutes later then keeps its
    original time and loses to anything observed since.
    """
    if event_time is None or event_time > received_at or received_at - event_time > tolerance:
        return received_at
    return event_time


def dedupe_key(organization_id: object, event: WebhookEvent, payload: dict[str, Any]) -> str:
    """A key equal for redeliveries of the same event: the gateway's id when it has one, then what identifies a
    message event (instance, key id, event[, status] — a retry may differ in envelope fields), else the body's
    hash."""
    if event.event_id:
        material = f"{organization_id}|{event.provider}|id|{event.event_id}"
    elif event.dedupe_id:
        material = f"{organization_id}|{event.provider}|key|{event.dedupe_id}"
    else:
        body_hash = hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()
        material = f"{organization_id}|{event.provider}|body|{body_hash}"
    return hashlib.sha256(material.encode()).hexdigest()


def untracked_key(organization_id: object, event: WebhookEvent) -> str:
    """The one key of every delivery of ``event``'s name for an instance the organization does not track: nothing
    in the body counts (a reconnect loop changes `date_time` on every delivery)."""
    material = f"{organization_id}|{event.provider}|untracked|{event.instance_name}|{event.event}"
    return hashlib.sha256(material.encode()).hexdigest()


def _parse_time(value: Any) -> datetime | None:
    """An envelope's time; None (unknown: the receive time counts) when absent, unreadable or out of range."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        seconds = value / 1000 if value > 10**11 else value
        return datetime.fromtimestamp(seconds, UTC) if seconds <= MAX_EPOCH_SECONDS else None
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


# -- WAHA -------------------------------------------------------------------------------------------------------

WAHA_MESSAGE_EVENTS = frozenset({"message", "message.any"})


def parse_waha(payload: dict[str, Any]) -> WebhookEvent:
    """A WAHA delivery: envelope `{id, timestamp, event, session, me, payload, engine, environment}` (§8.4).

    The envelope `id` (kept by WAHA's retries) is the event id deliveries are deduplicated by. `session.status`
    changes the status, `message`/`message.any` (the latter with our own messages) add messages, `message.ack` moves
    statuses and `message.revoked` marks a message deleted; every other event is stored, not applied.
    """
    event = payload.get("event")
    if not isinstance(event, str) or not event:
        raise MalformedPayload("missing 'event' (a string such as 'session.status')")
    session = payload.get("session")
    if session is not None and not isinstance(session, str):
        raise MalformedPayload("'session' must be the session name")
    _check_instance_name(session, "session")
    event_id = payload.get("id")
    if event_id is not None and not isinstance(event_id, str):
        raise MalformedPayload("'id' must be the event id (a string such as 'evt_01K…')")
    body = payload.get("payload")
    base = _Envelope(
        provider=Provider.WAHA, event=event, instance_name=session, event_time=_parse_time(payload.get("timestamp"))
    )
    if event in ("session.status", *WAHA_MESSAGE_EVENTS, "message.ack", "message.revoked"):
        if not session:
            raise MalformedPayload(f"{event} without 'session'")
        if not isinstance(body, dict):
            raise MalformedPayload(f"{event} needs a payload object")
    else:
        return WebhookEvent(**base, kind=EventKind.OTHER, event_id=event_id)
    assert isinstance(body, dict)
    if event == "session.status":
        raw = body.get("status")
        status = from_waha(raw) if isinstance(raw, str) else None
        if status is None:
            raise MalformedPayload(f"session.status has unknown status {raw!r}")
        me = payload.get("me") if isinstance(payload.get("me"), dict) else {}
        assert isinstance(me, dict)
        connected = status is InstanceStatus.CONNECTED
        return WebhookEvent(
            **base,
            kind=EventKind.STATUS,
            event_id=event_id,
            status=status,
            reason=None if connected else waha_reason(raw) or f"session status {raw}",
            phone_number=_phone(me.get("id")) if connected else None,
            profile_name=me.get("pushName") if connected and isinstance(me.get("pushName"), str) else None,
        )
    if event in WAHA_MESSAGE_EVENTS:
        try:
            message = from_waha_message(body)
        except MalformedMessage as exc:
            raise MalformedPayload(f"{event}: {exc}") from exc
        except (TypeError, ValueError, OverflowError) as exc:
            raise MalformedPayload(f"{event}: payload.timestamp is not a number ({exc})") from exc
        message = _bounded(event, message, id_field="payload.id", jid_field="payload.from/to")
        return WebhookEvent(
            **base,
            kind=EventKind.MESSAGES,
            event_id=event_id,
            messages=(message,),
            dedupe_id=f"{session}|message|{message.external_id}",
        )
    if event == "message.ack":
        raw_id = serialized_id(body.get("id"))
        ack = status_from_ack(body.get("ack"), body.get("ackName"))
        if raw_id is None or ack is None:
            raise MalformedPayload("message.ack needs payload.id and payload.ack (-1..4) or payload.ackName")
        found = key_id(raw_id)
        _check_id(found, "message.ack: payload.id")
        return WebhookEvent(
            **base,
            kind=EventKind.RECEIPTS,
            event_id=event_id,
            receipts=((found, ack),),
            dedupe_id=f"{session}|message.ack|{found}|{ack}",
        )
    before = body.get("before") if isinstance(body.get("before"), dict) else {}
    assert isinstance(before, dict)
    revoked = body.get("revokedMessageId") or serialized_id(before.get("id"))
    if not isinstance(revoked, str) or not revoked:
        raise MalformedPayload("message.revoked needs payload.revokedMessageId or payload.before.id")
    found = key_id(revoked)
    _check_id(found, "message.revoked: payload.revokedMessageId")
    return WebhookEvent(
        **base,
        kind=EventKind.RECEIPTS,
        event_id=event_id,
        receipts=((found, "deleted"),),
        dedupe_id=f"{session}|message.revoked|{found}",
    )


def parse_delivery(
    provider: Provider, body: bytes, *, path_event: str | None = None
) -> tuple[dict[str, Any], WebhookEvent]:
    """The payload and parsed event of one raw delivery from ``provider`` (``path_event``: Evolution's by-events URL
    suffix); MalformedPayload when it does not parse."""
    payload = decode_json(body)
    if provider is Provider.EVOLUTION:
        return payload, parse_evolution(payload, path_event=path_event)
    if provider is Provider.MEGAAPI:
        return payload, parse_megaapi(payload)
    return payload, parse_waha(payload)
