"""Baileys message shapes, as Evolution (findMessages records, `messages.upsert` data) and MegaAPI (flat webhook
bodies) both carry them, normalized into :class:`GatewayMessage` (gateways.md §1.3, §2.3, §4).

:func:`from_baileys` checks every field it reads and raises :class:`MalformedMessage` saying which one is wrong.
It is plain code rather than a pydantic model: imports run it on every message of an instance's history, and
validating each record with pydantic measured several times the cost of the JSON parse itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired

from typing_extensions import TypedDict

from core.domain import STATUS_RANK, GatewayMessage


class BaileysKey(TypedDict):
    """`key`: which chat, which message, who sent it; LID chats carry the other address in `remoteJidAlt`."""

    id: str
    remoteJid: str
    fromMe: NotRequired[bool | None]
    participant: NotRequired[str | None]
    remoteJidAlt: NotRequired[str | None]
    addressingMode: NotRequired[str | None]


class BaileysMessage(TypedDict):
    """One message record (the shape :func:`from_baileys` reads); `message` holds the content under its type."""

    key: BaileysKey
    messageTimestamp: Any
    """Epoch seconds as a number, a digit string, or protobuf's `{low, high}` Long."""
    pushName: NotRequired[str | None]
    messageType: NotRequired[str | None]
    message: NotRequired[Any]
    status: NotRequired[Any]
    MessageUpdate: NotRequired[Any]


_STATUS: dict[Any, str] = {
    "ERROR": "failed",
    "PENDING": "pending",
    "SERVER_ACK": "sent",
    "DELIVERY_ACK": "delivered",
    "READ": "read",
    "PLAYED": "played",
    "DELETED": "deleted",
    0: "failed",
    1: "pending",
    2: "sent",
    3: "delivered",
    4: "read",
    5: "played",
}
_TYPES = {
    "conversation": "text",
    "extendedTextMessage": "text",
    "imageMessage": "image",
    "videoMessage": "video",
    "ptvMessage": "video",
    "audioMessage": "audio",
    "documentMessage": "document",
    "documentWithCaptionMessage": "document",
    "stickerMessage": "sticker",
    "locationMessage": "location",
    "liveLocationMessage": "location",
    "contactMessage": "contact",
    "contactsArrayMessage": "contact",
    "reactionMessage": "reaction",
}
_MEDIA = frozenset({"image", "video", "audio", "document", "sticker"})
_NOT_CONTENT = frozenset({"messageContextInfo", "base64", "mediaUrl"})


class MalformedMessage(ValueError):
    """A record that cannot be a message (the reason is safe to show to the sender)."""


def status_from_wire(value: Any) -> str | None:
    """Evolution's `READ`/`DELIVERY_ACK`… or Baileys' numeric ack, as a zapsync status (None when unknown)."""
    if isinstance(value, str):
        return _STATUS.get(value) or _STATUS.get(value.upper())
    if isinstance(value, int) and not isinstance(value, bool):
        return _STATUS.get(value)
    return None


def epoch_seconds(value: Any) -> int:
    """A message timestamp in epoch seconds (milliseconds and protobuf Longs accepted)."""
    if isinstance(value, bool):
        raise MalformedMessage("messageTimestamp must be a number")
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        seconds = int(value)
    elif isinstance(value, dict) and isinstance(value.get("low"), int):
        seconds = (value["low"] & 0xFFFFFFFF) | (int(value.get("high") or 0) << 32)
    else:
        raise MalformedMessage("messageTimestamp must be epoch seconds")
    if seconds > 10**11:
        seconds //= 1000
    if seconds <= 0:
        raise MalformedMessage("messageTimestamp must be positive")
    return seconds


def _best_status(record: Mapping[str, Any]) -> str | None:
    """The most advanced status among the record's own and its `MessageUpdate` entries."""
    best = status_from_wire(record.get("status"))
    updates = record.get("MessageUpdate")
    if isinstance(updates, list):
        for update in updates:
            status = status_from_wire(update.get("status")) if isinstance(update, dict) else None
            if status is not None and (best is None or STATUS_RANK[status] > STATUS_RANK[best]):
                best = status
    return best


def _size(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    low = value.get("low") if isinstance(value, dict) else None
    if isinstance(low, int):
        return (low & 0xFFFFFFFF) | (int(value.get("high") or 0) << 32)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def from_baileys(record: Mapping[str, Any]) -> GatewayMessage:
    """Normalize one record: type, text or caption, media fields, status, LID alternate address."""
    key = record.get("key")
    if not isinstance(key, dict):
        raise MalformedMessage("key must be an object {remoteJid, id, fromMe}")
    key_id, chat = key.get("id"), key.get("remoteJid")
    if not isinstance(key_id, str) or not key_id:
        raise MalformedMessage("key.id must be a non-empty string")
    if not isinstance(chat, str) or not chat:
        raise MalformedMessage("key.remoteJid must be a non-empty string")
    timestamp = epoch_seconds(record.get("messageTimestamp"))
    content_map = record.get("message")
    body: dict[str, Any] = content_map if isinstance(content_map, dict) else {}
    wire_type = record.get("messageType")
    if not isinstance(wire_type, str) or wire_type not in body:
        found = next((k for k in body if k in _TYPES), None)
        if found is None and not isinstance(wire_type, str):
            found = next((k for k in body if k not in _NOT_CONTENT), None)
        wire_type = found or (wire_type if isinstance(wire_type, str) else None)
    kind = _TYPES.get(wire_type, "other") if wire_type else "other"
    inner = body.get(wire_type) if wire_type else None
    if wire_type == "documentWithCaptionMessage" and isinstance(inner, dict):
        inner = (inner.get("message") or {}).get("documentMessage")
    part: dict[str, Any] = inner if isinstance(inner, dict) else {}
    media_url = media_mime = media_name = None
    media_size = None
    if kind == "text":
        content = _text(inner) or _text(part.get("text"))
    elif kind in _MEDIA:
        content = _text(part.get("caption"))
        media_url = _text(body.get("mediaUrl")) or _text(part.get("url"))
        media_mime = _text(part.get("mimetype"))
        media_name = _text(part.get("fileName"))
        media_size = _size(part.get("fileLength"))
    elif kind == "location":
        lat, lng = part.get("degreesLatitude"), part.get("degreesLongitude")
        content = _text(part.get("name")) or (f"{lat},{lng}" if lat is not None and lng is not None else None)
    elif kind == "contact":
        content = _text(part.get("displayName"))
    elif kind == "reaction":
        content = _text(part.get("text"))
    else:
        content = _text(inner)
    alt, participant, push_name = key.get("remoteJidAlt"), key.get("participant"), record.get("pushName")
    return GatewayMessage(
        external_id=key_id,
        chat_jid=chat,
        from_me=key.get("fromMe") is True,
        timestamp=timestamp,
        type=kind,
        content=content,
        alt_jid=alt if isinstance(alt, str) and alt and alt != chat else None,
        media_url=media_url,
        media_mime=media_mime,
        media_name=media_name,
        media_size=media_size,
        status=_best_status(record),
        push_name=push_name if isinstance(push_name, str) and push_name else None,
        participant=participant if isinstance(participant, str) and participant else None,
    )
