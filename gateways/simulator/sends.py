"""Sending at the simulated gateways: Evolution's `message/sendText` and `message/sendMedia`, MegaAPI's
`rest/sendMessage/{key}/text` and `/mediaUrl` (gateways.md §1.2–1.3, §4, §8.5); WAHA's send routes
(``simulator.waha``) go through the same :func:`accept_send`.

Every accepted send is recorded in the :class:`SendBook` (``GET /_sim/sends`` lists the records and counts them per
(instance, to, text), so tests and the benchmark can count duplicates) and echoed by webhook like the real gateways:
Evolution ``send.message`` with the stored message object (``fromMe: true``), MegaAPI a flat fromMe message, WAHA
``message.any`` with ``fromMe`` (never ``message``, which is for inbound messages only) — followed, when the
``receipts`` knob is on, by the receipts (Evolution ``messages.update`` SERVER_ACK → DELIVERY_ACK → READ; MegaAPI
``message.ack`` 2/3/4; WAHA ``message.ack`` ack 1/2/3, and 4 for a voice message), all delivered in order by one
emitter worker. Messages that are not API sends (inbound, or typed on the owner's phone) and out-of-order receipts
are built by :func:`message_bodies` and :func:`receipt_bodies` (``SimulatorState.receive_message`` and
``SimulatorState.send_receipts``).

Knobs (:class:`~gateways.simulator.state.SimulatorConfig`, seeded draws): ``send_error_rate`` answers 503 before
accepting (nothing recorded); ``send_timeout_rate`` accepts, records and echoes, then answers only after
``send_hang_s`` (longer than a client's timeout); ``send_drop_next`` loses the next sends inside the gateway (nothing
recorded, answered as late); ``not_on_whatsapp`` lists numbers answered with
Evolution's 400 ``exists: false``. Evolution's ``findMessages`` lists the messages an instance sent, as the real
gateway stores them, so an unknown outcome can be looked up.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

if TYPE_CHECKING:
    from gateways.simulator.state import SimInstance, SimulatorState

SendType = Literal["text", "image", "video", "audio", "document"]
MEDIA_TYPES = ("image", "video", "audio", "document")
_WIRE = {"image": "imageMessage", "video": "videoMessage", "audio": "audioMessage", "document": "documentMessage"}
_MIME = {"image": "image/jpeg", "video": "video/mp4", "audio": "audio/ogg", "document": "application/pdf"}
EVOLUTION_RECEIPTS = ("SERVER_ACK", "DELIVERY_ACK", "READ")
MEGAAPI_RECEIPTS = (2, 3, 4)


@dataclass(frozen=True, slots=True)
class SendRecord:
    """One send a gateway accepted."""

    seq: int
    instance: str
    provider: str
    to: str
    """The recipient's JID."""
    type: str
    text: str | None
    """The text, or the media's caption."""
    media_url: str | None
    external_id: str
    at: datetime
    timed_out: bool = False
    """Accepted but answered only after ``send_hang_s`` (the client gave up first)."""
    stored: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    """The message object as the gateway stores it (what ``findMessages`` lists afterwards)."""


@dataclass(frozen=True, slots=True)
class SendDelivery:
    """Webhook bodies one accepted send causes, delivered in order (the echo, then its receipts).

    ``bodies`` are ``(event, data)`` pairs: Evolution's envelope is added by the emitter; for MegaAPI ``data`` is the
    whole flat body and ``event`` only names it.
    """

    name: str
    provider: str
    bodies: tuple[tuple[str, dict[str, Any]], ...]
    at: datetime
    owner_jid: str | None = None
    token: str | None = None
    webhook: Mapping[str, Any] | None = None
    profile_name: str | None = None
    """The owner's push name (WAHA's envelope ``me``)."""


@dataclass(slots=True)
class SendBook:
    """The sends a simulated host accepted, with the seeded draws of the send knobs. Thread-safe."""

    seed: int = 0
    records: list[SendRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rng: random.Random = field(default_factory=random.Random)
    _by_chat: dict[tuple[str, str], list[SendRecord]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.clear(self.seed)

    def clear(self, seed: int) -> None:
        """Forget every record and re-seed the draws."""
        with self._lock:
            self.records.clear()
            self._by_chat.clear()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the seeded draws from ``seed``."""
        with self._lock:
            self.seed = seed
            self._rng = random.Random(f"sends:{seed}")

    def draw(self, rate: float) -> bool:
        """Seeded draw: True with probability ``rate``."""
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def external_id(self) -> str:
        """A Baileys-like message id (``3EB0`` and 16 hex digits)."""
        with self._lock:
            return f"3EB0{self._rng.getrandbits(64):016X}"

    def record(self, **fields: Any) -> SendRecord:
        """Record one accepted send."""
        with self._lock:
            record = SendRecord(seq=len(self.records) + 1, **fields)
            self.records.append(record)
            self._by_chat.setdefault((record.instance, record.to), []).append(record)
            return record

    def stored_messages(self, instance: str, jid: str, gte: int | None, lte: int | None) -> list[dict[str, Any]]:
        """The instance's sent messages to ``jid`` within [gte, lte] (epoch seconds), newest first, as the gateway
        lists them in ``findMessages`` (it stores what it sends)."""
        with self._lock:
            found = list(self._by_chat.get((instance, jid), ()))
        return [
            dict(r.stored)
            for r in reversed(found)
            if r.stored is not None
            and (gte is None or r.at.timestamp() >= gte)
            and (lte is None or r.at.timestamp() <= lte)
        ]

    def summary(self) -> dict[str, Any]:
        """Records, counts per (instance, to, type, text, media url) and how many sends repeated one of them."""
        with self._lock:
            records = list(self.records)
        counts = Counter((r.instance, r.to, r.type, r.text, r.media_url) for r in records)
        return {
            "sends": [{**asdict(r), "at": r.at.isoformat(), "stored": None} for r in records],
            "counts": [
                {"instance": i, "to": to, "type": t, "text": text, "media_url": url, "count": n}
                for (i, to, t, text, url), n in counts.items()
            ],
            "total": len(records),
            "duplicates": sum(n - 1 for n in counts.values()),
        }


def to_jid(number: str) -> str:
    """A recipient as a JID: digits become a phone-number JID; a JID stays as it is."""
    return number if "@" in number else f"{number}@s.whatsapp.net"


def _digits(number: str) -> str:
    return number.split("@", 1)[0]


def message_object(
    inst: SimInstance,
    *,
    jid: str,
    external_id: str,
    kind: str,
    text: str | None,
    media: Mapping[str, Any],
    at: datetime,
) -> dict[str, Any]:
    """The stored message object Evolution answers a send with (and echoes in ``send.message``)."""
    content: dict[str, Any]
    if kind == "text":
        wire, content = "conversation", {"conversation": text or ""}
    else:
        part: dict[str, Any] = {"url": media.get("url"), "mimetype": media.get("mimetype") or _MIME[kind]}
        if text:
            part["caption"] = text
        if media.get("fileName"):
            part["fileName"] = media["fileName"]
        wire, content = _WIRE[kind], {_WIRE[kind]: part}
    return {
        "key": {"remoteJid": jid, "fromMe": True, "id": external_id},
        "pushName": inst.profile_name or "",
        "status": "PENDING",
        "message": content,
        "contextInfo": None,
        "messageType": wire,
        "messageTimestamp": int(at.timestamp()),
        "instanceId": inst.instance_id,
        "source": "unknown",
    }


def evolution_bodies(
    inst: SimInstance, message: dict[str, Any], *, receipts: bool
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The ``send.message`` echo and, with ``receipts``, its ``messages.update`` receipts."""
    bodies: list[tuple[str, dict[str, Any]]] = [("send.message", message)]
    if receipts:
        key = message["key"]
        bodies += [
            ("messages.update", _evolution_receipt(inst, key["remoteJid"], key["id"], status))
            for status in EVOLUTION_RECEIPTS
        ]
    return tuple(bodies)


def megaapi_bodies(
    inst: SimInstance, message: dict[str, Any], *, receipts: bool
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The flat message (for a send, its fromMe echo) and, with ``receipts``, its ``message.ack`` 2/3/4."""
    echo = {
        "instance_key": inst.name,
        "jid": inst.owner_jid or "",
        "messageType": message["messageType"],
        "key": {**message["key"], "participant": ""},
        "messageTimestamp": message["messageTimestamp"],
        "pushName": message["pushName"],
        "status": "",
        "message": message["message"],
    }
    bodies: list[tuple[str, dict[str, Any]]] = [("message", echo)]
    if receipts:
        key = message["key"]
        bodies += [("message.ack", _megaapi_receipt(inst, key["remoteJid"], key["id"], s)) for s in MEGAAPI_RECEIPTS]
    return tuple(bodies)


def send_bodies(
    inst: SimInstance, message: dict[str, Any], *, kind: str, receipts: bool
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The webhook bodies an accepted send causes at ``inst``'s provider (its echo, then its receipts)."""
    if inst.provider == "evolution":
        return evolution_bodies(inst, message, receipts=receipts)
    if inst.provider == "megaapi":
        return megaapi_bodies(inst, message, receipts=receipts)
    from gateways.simulator.waha import send_bodies as waha_send_bodies

    return waha_send_bodies(inst, message, kind=kind, receipts=receipts)


async def accept_send(
    state: SimulatorState,
    inst: SimInstance,
    *,
    number: str,
    kind: str,
    text: str | None,
    media: Mapping[str, Any],
    fail: Any,
) -> tuple[dict[str, Any], bool]:
    """The send knobs, then record and echo one send at any provider; returns (message object, whether to answer
    late). ``fail(status, message)`` builds the provider's error reply (``message`` may be Evolution's
    ``exists: false`` object)."""
    book = state.sends
    config = state.config
    if book.draw(config.send_error_rate):
        raise fail(503, "Simulated error: the gateway is unavailable")
    if inst.live_state != "open":
        raise fail(400, "Connection Closed")
    jid = to_jid(number)
    if _digits(number) in config.not_on_whatsapp:
        raise fail(400, {"jid": jid, "exists": False, "number": _digits(number)})
    if config.send_drop_next > 0:
        state.configure(send_drop_next=config.send_drop_next - 1)
        await state.sleep(config.send_hang_s)
        raise fail(504, "Simulated loss: the send never reached WhatsApp")
    late = book.draw(config.send_timeout_rate)
    at = datetime.now(UTC)
    external_id = book.external_id()
    message = message_object(inst, jid=jid, external_id=external_id, kind=kind, text=text, media=media, at=at)
    book.record(
        instance=inst.name,
        provider=inst.provider,
        to=jid,
        type=kind,
        text=text,
        media_url=media.get("url"),
        external_id=external_id,
        at=at,
        timed_out=late,
        stored=message if inst.provider == "evolution" else None,
    )
    state.publish_send(delivery(inst, send_bodies(inst, message, kind=kind, receipts=config.receipts), at=at))
    return message, late


def delivery(inst: SimInstance, bodies: tuple[tuple[str, dict[str, Any]], ...], *, at: datetime) -> SendDelivery:
    """``bodies`` to deliver in order to ``inst``'s webhook, with what its provider's envelope says about it."""
    return SendDelivery(
        name=inst.name,
        provider=inst.provider,
        bodies=bodies,
        at=at,
        owner_jid=inst.owner_jid,
        token=inst.token,
        webhook=inst.webhook,
        profile_name=inst.profile_name,
    )


# -- messages that reach an instance, and receipts -------------------------------------------------------------

_EVOLUTION_ACK = {"sent": "SERVER_ACK", "delivered": "DELIVERY_ACK", "read": "READ", "played": "PLAYED"}
_MEGAAPI_ACK = {"sent": 2, "delivered": 3, "read": 4, "played": 5}
RECEIPT_STATUSES = tuple(_EVOLUTION_ACK)


def chat_message(
    inst: SimInstance, *, jid: str, external_id: str, text: str, at: datetime, from_me: bool, push_name: str | None
) -> dict[str, Any]:
    """A text message in a one-to-one chat as the gateway stores it: from ``jid`` to the instance, or (``from_me``)
    typed on the owner's phone to ``jid``."""
    return {
        "key": {"remoteJid": jid, "fromMe": from_me, "id": external_id},
        "pushName": (inst.profile_name or "") if from_me else (push_name or ""),
        "status": "SERVER_ACK" if from_me else "DELIVERY_ACK",
        "message": {"conversation": text},
        "contextInfo": None,
        "messageType": "conversation",
        "messageTimestamp": int(at.timestamp()),
        "instanceId": inst.instance_id,
        "source": "android",
    }


def message_bodies(inst: SimInstance, message: dict[str, Any]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """How ``inst``'s provider delivers a message that is not an API send: Evolution ``messages.upsert``, MegaAPI
    its flat message, WAHA ``message`` (inbound only) and ``message.any`` (gateways.md §2.3, §4, §8.4)."""
    if inst.provider == "evolution":
        return (("messages.upsert", message),)
    if inst.provider == "megaapi":
        return megaapi_bodies(inst, message, receipts=False)
    from gateways.simulator.waha import message_bodies as waha_message_bodies

    return waha_message_bodies(inst, message)


def receipt_bodies(
    inst: SimInstance, *, jid: str, external_id: str, statuses: tuple[str, ...]
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Receipts (``sent``, ``delivered``, ``read``, ``played``) of the instance's message ``external_id`` to ``jid``,
    in the given order, in its provider's shape."""
    if inst.provider == "evolution":
        return tuple(
            ("messages.update", _evolution_receipt(inst, jid, external_id, _EVOLUTION_ACK[s])) for s in statuses
        )
    if inst.provider == "megaapi":
        return tuple(("message.ack", _megaapi_receipt(inst, jid, external_id, _MEGAAPI_ACK[s])) for s in statuses)
    from gateways.simulator.waha import receipt_bodies as waha_receipt_bodies

    return waha_receipt_bodies(inst, jid=jid, external_id=external_id, statuses=statuses)


def _evolution_receipt(inst: SimInstance, jid: str, external_id: str, status: str) -> dict[str, Any]:
    return {
        "keyId": external_id,
        "remoteJid": jid,
        "fromMe": True,
        "participant": None,
        "status": status,
        "pollUpdates": None,
        "instanceId": inst.instance_id,
        "messageId": f"c{external_id.lower()}",
    }


def _megaapi_receipt(inst: SimInstance, jid: str, external_id: str, status: int) -> dict[str, Any]:
    key = {"remoteJid": jid, "id": external_id}
    return {"instance_key": inst.name, "messageType": "message.ack", "key": key, "update": {"status": status}}


def sends_router(state: SimulatorState) -> APIRouter:
    """The send routes of both providers and ``GET /_sim/sends``."""
    from gateways.simulator import shapes
    from gateways.simulator.app import _body, _evolution_fail, _gate, _json, _Reply

    router = APIRouter(tags=["sending"])
    book = state.sends

    def evolution_instance(request: Request, name: str) -> SimInstance:
        inst = state.get(name, "evolution")
        if inst is None:
            raise _evolution_fail(404, f'The "{name}" instance does not exist')
        key = request.headers.get("apikey")
        if not key or key not in (state.config.evolution_api_key, inst.token):
            raise _Reply(shapes.evolution_error(401, "Unauthorized"), 401)
        return inst

    def megaapi_instance(request: Request, key: str) -> SimInstance:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != state.config.megaapi_token:
            raise _Reply(shapes.megaapi_error("Unauthorized: invalid or missing token"), 401)
        inst = state.get(key, "megaapi")
        if inst is None:
            raise _Reply(shapes.megaapi_error("instance not found"), 404)
        return inst

    async def accept(
        inst: SimInstance,
        *,
        number: str,
        kind: str,
        text: str | None,
        media: Mapping[str, Any],
        fail: Any,
    ) -> tuple[dict[str, Any], bool]:
        return await accept_send(state, inst, number=number, kind=kind, text=text, media=media, fail=fail)

    async def answer_late(late: bool) -> None:
        if late:
            await state.sleep(state.config.send_hang_s)

    def evolution_fail(status: int, message: Any) -> _Reply:
        return _Reply(shapes.evolution_error(status, [message]), status)

    @router.post("/message/sendText/{instance}")
    async def send_text(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"sendText:{instance}")
        inst = evolution_instance(request, instance)
        body = await _body(request)
        number, text = body.get("number"), body.get("text")
        if not isinstance(number, str) or not number:
            raise evolution_fail(400, 'instance requires property "number"')
        if not isinstance(text, str) or not text:
            raise evolution_fail(400, 'instance requires property "text"')
        message, late = await accept(inst, number=number, kind="text", text=text, media={}, fail=evolution_fail)
        await answer_late(late)
        return _json(message, 201)

    @router.post("/message/sendMedia/{instance}")
    async def send_media(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"sendMedia:{instance}")
        inst = evolution_instance(request, instance)
        body = await _body(request)
        number, kind, media = body.get("number"), body.get("mediatype"), body.get("media")
        if not isinstance(number, str) or not number:
            raise evolution_fail(400, 'instance requires property "number"')
        if kind not in MEDIA_TYPES:
            raise evolution_fail(400, "mediatype must be one of image, video, audio, document")
        if not isinstance(media, str) or not media:
            raise evolution_fail(400, 'instance requires property "media"')
        caption = body.get("caption") if isinstance(body.get("caption"), str) else None
        message, late = await accept(
            inst,
            number=number,
            kind=str(kind),
            text=caption or None,
            media={"url": media, "mimetype": body.get("mimetype"), "fileName": body.get("fileName")},
            fail=evolution_fail,
        )
        await answer_late(late)
        return _json(message, 201)

    def megaapi_fail(status: int, message: Any) -> _Reply:
        text = "number not on WhatsApp" if isinstance(message, dict) else str(message)
        return _Reply(shapes.megaapi_error(text), status)

    async def megaapi_data(request: Request) -> dict[str, Any]:
        body = await _body(request)
        data = body.get("messageData")
        if not isinstance(data, dict) or not isinstance(data.get("to"), str) or not data["to"]:
            raise megaapi_fail(400, "messageData.to is required")
        return data

    @router.post("/rest/sendMessage/{instance_key}/text")
    async def megaapi_text(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"sendMessage:{instance_key}")
        inst = megaapi_instance(request, instance_key)
        data = await megaapi_data(request)
        text = data.get("text")
        if not isinstance(text, str) or not text:
            raise megaapi_fail(400, "messageData.text is required")
        message, late = await accept(inst, number=data["to"], kind="text", text=text, media={}, fail=megaapi_fail)
        await answer_late(late)
        return _json({"error": False, "message": "Message sent successfully", "data": message})

    @router.post("/rest/sendMessage/{instance_key}/mediaUrl")
    async def megaapi_media(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"sendMessage:{instance_key}")
        inst = megaapi_instance(request, instance_key)
        data = await megaapi_data(request)
        kind, url = data.get("type"), data.get("url")
        if kind not in MEDIA_TYPES or not isinstance(url, str) or not url:
            raise megaapi_fail(400, "messageData.type (image, video, audio, document) and messageData.url are required")
        caption = data.get("caption") if isinstance(data.get("caption"), str) else None
        message, late = await accept(
            inst,
            number=data["to"],
            kind=str(kind),
            text=caption or None,
            media={"url": url, "fileName": data.get("fileName")},
            fail=megaapi_fail,
        )
        await answer_late(late)
        return _json({"error": False, "message": "Message sent successfully", "data": message})

    @router.get("/_sim/sends")
    async def sends() -> Response:
        return _json(book.summary())

    return router
