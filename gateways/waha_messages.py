"""WAHA's message shapes (gateways.md §5, §8.4) normalized into :class:`GatewayMessage`, and its chat ids.

WAHA addresses people as ``<digits>@c.us`` where Baileys (and so Evolution and zapsync's rows) says
``<digits>@s.whatsapp.net``: ids are turned into zapsync's form on the way in (:func:`jid_in`) and back on the way
out (:func:`chat_id_out`), so one number is one contact whichever gateway it came through. A message id is
``<fromMe>_<chat id>_<key id>[_<participant>]``; the key id (what receipts and the echo of a send carry) is
``external_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.domain import GatewayMessage
from gateways.messages import MalformedMessage, epoch_seconds

ACK_STATUS: dict[Any, str] = {
    -1: "failed",
    0: "pending",
    1: "sent",
    2: "delivered",
    3: "read",
    4: "played",
    "ERROR": "failed",
    "PENDING": "pending",
    "SERVER": "sent",
    "DEVICE": "delivered",
    "READ": "read",
    "PLAYED": "played",
}
"""WAHA's `ack` numbers and `ackName`s as message statuses."""

_MIME_TYPES = (("image/webp", "sticker"), ("image/", "image"), ("video/", "video"), ("audio/", "audio"))
_WAHA_TYPES = {
    "chat": "text",
    "image": "image",
    "video": "video",
    "audio": "audio",
    "ptt": "audio",
    "document": "document",
    "sticker": "sticker",
    "location": "location",
    "vcard": "contact",
    "multi_vcard": "contact",
    "reaction": "reaction",
}


def jid_in(chat_id: str) -> str:
    """zapsync's form of a WAHA chat id (``…@c.us`` → ``…@s.whatsapp.net``; groups and LIDs unchanged)."""
    return chat_id[: -len("@c.us")] + "@s.whatsapp.net" if chat_id.endswith("@c.us") else chat_id


def chat_id_out(jid: str) -> str:
    """WAHA's form of a jid (``…@s.whatsapp.net`` → ``…@c.us``; bare digits get ``@c.us``)."""
    if jid.endswith("@s.whatsapp.net"):
        return jid[: -len("@s.whatsapp.net")] + "@c.us"
    return jid if "@" in jid else f"{jid}@c.us"


def serialized_id(value: Any) -> str | None:
    """A message id as a string: WAHA sends ``"true_…"`` or WEBJS's ``{_serialized, id, …}``."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping):
        found = value.get("_serialized") or value.get("id")
        return found if isinstance(found, str) and found else None
    return None


def key_id(message_id: str) -> str:
    """The WhatsApp key id inside a WAHA message id (``true_5511…@c.us_3EB0…`` → ``3EB0…``)."""
    parts = message_id.split("_")
    return parts[2] if len(parts) >= 3 and parts[0] in ("true", "false") else message_id


def status_from_ack(ack: Any, ack_name: Any = None) -> str | None:
    """The message status of a WAHA `ack` (number) or `ackName`; None when neither is known."""
    if isinstance(ack_name, str) and ack_name.upper() in ACK_STATUS:
        return ACK_STATUS[ack_name.upper()]
    if isinstance(ack, int) and not isinstance(ack, bool):
        return ACK_STATUS.get(ack)
    return None


def _media_type(mime: str | None) -> str:
    for prefix, kind in _MIME_TYPES:
        if mime and mime.startswith(prefix):
            return kind
    return "document"


def from_waha_message(record: Mapping[str, Any]) -> GatewayMessage:
    """One WAHA message (`message` webhook payload, chat messages listing); raises MalformedMessage saying why."""
    message_id = serialized_id(record.get("id"))
    if message_id is None:
        raise MalformedMessage("message without 'id'")
    from_me = record.get("fromMe")
    if not isinstance(from_me, bool):
        raise MalformedMessage("message without a boolean 'fromMe'")
    chat = record.get("to") if from_me else record.get("from")
    if not isinstance(chat, str) or "@" not in chat:
        raise MalformedMessage(f"message without its chat ('{'to' if from_me else 'from'}')")
    timestamp = epoch_seconds(record.get("timestamp"))
    raw_data = record.get("_data")
    data: Mapping[str, Any] = raw_data if isinstance(raw_data, Mapping) else {}
    media = record.get("media") if isinstance(record.get("media"), Mapping) else None
    body = record.get("body") if isinstance(record.get("body"), str) and record.get("body") else None
    wire_type = data.get("type") if isinstance(data.get("type"), str) else None
    if record.get("hasMedia") or media is not None:
        mime = media.get("mimetype") if media else None
        kind = _WAHA_TYPES.get(wire_type or "", _media_type(mime if isinstance(mime, str) else None))
    else:
        kind = _WAHA_TYPES.get(wire_type or "", "text" if body is not None else "other")
    push_name = data.get("notifyName") or data.get("pushName") or data.get("pushname")
    participant = record.get("participant")
    return GatewayMessage(
        external_id=key_id(message_id),
        chat_jid=jid_in(chat),
        from_me=from_me,
        timestamp=timestamp,
        type=kind,
        content=body,
        media_url=_str(media.get("url")) if media else None,
        media_mime=_str(media.get("mimetype")) if media else None,
        media_name=_str(media.get("filename")) if media else None,
        status=status_from_ack(record.get("ack"), record.get("ackName")),
        push_name=push_name if isinstance(push_name, str) and push_name else None,
        participant=jid_in(participant) if isinstance(participant, str) and participant else None,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
