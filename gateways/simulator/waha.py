"""WAHA in the simulator (gateways.md §5, §8.4): its routes, shapes, `X-Api-Key` auth and webhooks.

WAHA sessions are instances of provider ``waha`` in the shared :class:`SimulatorState`; their WAHA status is mapped
from the shared live state (``open`` → WORKING, ``connecting`` → SCAN_QR_CODE while a QR code is pending, else
STARTING, ``close`` → STOPPED, ``refused`` → FAILED) unless ``SimInstance.waha_status`` overrides it (the passkey
states). Chats, contacts and messages are the instance's generated :class:`History` in WAHA's shapes (``@c.us``
ids, ``true_<chat>_<key id>`` message ids). The knobs (latency, outage, error rate, hang) apply as for the others.

Webhooks: :func:`deliver_change` turns state changes into ``session.status`` deliveries, :func:`emit_event` posts
any event; both in WAHA's envelope with its headers, signed with HMAC-SHA512 when the session's webhook (or the
emitter's default) has a key.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from core.webhook_signatures import hmac_sha512
from gateways.simulator.app import _gate, _json, _Reply
from gateways.simulator.sends import SendDelivery, accept_send
from gateways.simulator.state import (
    InstanceExists,
    InstanceNotConnected,
    SimEvent,
    SimInstance,
    SimulatorState,
    StateChange,
    qr_image,
)

if TYPE_CHECKING:
    from gateways.simulator.emitter import WebhookEmitter

VERSION = "2026.8.2"
ENGINE = "NOWEB"
_ACK_NAMES = {-1: "ERROR", 0: "PENDING", 1: "SERVER", 2: "DEVICE", 3: "READ", 4: "PLAYED"}
_ACK_OF_STATUS = {"ERROR": -1, "PENDING": 0, "SERVER_ACK": 1, "DELIVERY_ACK": 2, "READ": 3, "PLAYED": 4}
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_SEND_ROUTES = ("sendText", "sendImage", "sendFile", "sendVideo", "sendVoice")


def c_us(jid: str | None) -> str | None:
    """WAHA's form of a jid (``…@s.whatsapp.net`` → ``…@c.us``)."""
    if jid is None:
        return None
    return jid.replace("@s.whatsapp.net", "@c.us") if jid.endswith("@s.whatsapp.net") else jid


def status_of(inst: SimInstance) -> str:
    """The instance's WAHA session status."""
    if inst.waha_status:
        return inst.waha_status
    if inst.live_state == "open":
        return "WORKING"
    if inst.live_state == "connecting":
        return "SCAN_QR_CODE" if inst.qr_code else "STARTING"
    return "FAILED" if inst.live_state == "refused" else "STOPPED"


def me_of(owner_jid: str | None, push_name: str | None) -> dict[str, Any] | None:
    """WAHA's ``me`` (None until the session was paired)."""
    return {"id": c_us(owner_jid), "pushName": push_name} if owner_jid else None


def session_info(inst: SimInstance) -> dict[str, Any]:
    """A ``GET /api/sessions`` item."""
    status = status_of(inst)
    hook = inst.webhook
    return {
        "name": inst.name,
        "status": status,
        "me": me_of(inst.owner_jid, inst.profile_name) if status == "WORKING" else None,
        "assignedWorker": None,
        "engine": {"engine": ENGINE},
        "config": {
            "metadata": {},
            "proxy": None,
            "debug": False,
            "webhooks": [_public_hook(hook)] if hook and hook.get("url") else [],
        },
    }


def _public_hook(hook: Mapping[str, Any]) -> dict[str, Any]:
    return {key: hook[key] for key in ("url", "events", "hmac", "retries", "customHeaders") if key in hook}


def ulid_like() -> str:
    """26 Crockford base32 characters: 48 bits of milliseconds then 80 random bits (a ULID's layout)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


# -- messages -------------------------------------------------------------------------------------------------


def waha_message(record: Mapping[str, Any], owner_jid: str | None) -> dict[str, Any]:
    """A generated (Baileys-shaped) history record in WAHA's message shape."""
    key = record["key"]
    chat = c_us(key["remoteJid"]) or ""
    own = c_us(owner_jid) or "0@c.us"
    from_me = bool(key.get("fromMe"))
    participant = c_us(key.get("participant"))
    message_id = f"{'true' if from_me else 'false'}_{chat}_{key['id']}" + (f"_{participant}" if participant else "")
    content = record.get("message") or {}
    wire_type = record.get("messageType") or "conversation"
    media = None
    body = content.get("conversation")
    if wire_type != "conversation" and isinstance(content.get(wire_type), dict):
        inner = content[wire_type]
        body = inner.get("caption")
        media = {"url": inner.get("url"), "mimetype": inner.get("mimetype"), "filename": inner.get("fileName")}
    statuses = [u.get("status") for u in record.get("MessageUpdate") or []] + [record.get("status")]
    ack = max((_ACK_OF_STATUS[s] for s in statuses if s in _ACK_OF_STATUS), default=1 if from_me else 2)
    return {
        "id": message_id,
        "timestamp": record["messageTimestamp"],
        "from": own if from_me else chat,
        "fromMe": from_me,
        "source": "app",
        "to": chat if from_me else own,
        "participant": participant,
        "body": body or "",
        "hasMedia": media is not None,
        "media": media,
        "ack": ack,
        "ackName": _ACK_NAMES[ack],
        "replyTo": None,
        "_data": {"notifyName": record.get("pushName")},
    }


def _chat_row(row: Mapping[str, Any], owner_jid: str | None) -> dict[str, Any]:
    last = row.get("lastMessage")
    return {
        "id": c_us(row["remoteJid"]),
        "name": row.get("name"),
        "conversationTimestamp": last["messageTimestamp"] if last else None,
        "unreadCount": row.get("unreadCount", 0),
        "lastMessage": waha_message(last, owner_jid) if last else None,
    }


def _int(value: str | None, default: int) -> int:
    return max(int(value), 0) if value is not None and value.isdigit() else default


# -- routes ---------------------------------------------------------------------------------------------------


def waha_router(state: SimulatorState) -> APIRouter:
    """WAHA's REST routes over ``state`` (sessions, auth, chats, contacts, sending) and a control route."""
    router = APIRouter(tags=["waha"])

    def fail(status_code: int, message: str) -> _Reply:
        return _Reply({"statusCode": status_code, "message": message, "error": message}, status_code)

    async def guard(request: Request, call: str) -> None:
        await _gate(state, "waha", call)
        if request.headers.get("x-api-key") != state.config.waha_api_key:
            raise _Reply({"message": "Unauthorized", "statusCode": 401}, 401)

    def session(name: str) -> SimInstance:
        inst = state.get(name, "waha")
        if inst is None:
            raise fail(404, f"Session '{name}' does not exist")
        return inst

    @router.get("/api/sessions")
    async def sessions(request: Request) -> Response:
        await guard(request, "sessions")
        every = request.query_params.get("all") in ("true", "1")
        rows = [session_info(inst) for inst in state.instances_of("waha")]
        return _json(rows if every else [row for row in rows if row["status"] != "STOPPED"])

    @router.post("/api/sessions")
    async def create(request: Request) -> Response:
        await guard(request, "create")
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            raise fail(400, "Invalid JSON body") from None
        name = body.get("name") or "default"
        hooks = (body.get("config") or {}).get("webhooks") or []
        hook = hooks[0] if hooks and isinstance(hooks[0], dict) and hooks[0].get("url") else None
        try:
            inst, _ = state.create_instance(name, provider="waha", qrcode=body.get("start", True), webhook=hook)
        except InstanceExists:
            raise fail(422, f"Session '{name}' already exists") from None
        return _json(session_info(inst), 201)

    @router.get("/api/sessions/{name}")
    async def get_session(request: Request, name: str) -> Response:
        await guard(request, f"session:{name}")
        return _json(session_info(session(name)))

    @router.get("/api/sessions/{name}/me")
    async def me(request: Request, name: str) -> Response:
        await guard(request, f"me:{name}")
        inst = session(name)
        return _json(me_of(inst.owner_jid, inst.profile_name) if status_of(inst) == "WORKING" else None)

    @router.post("/api/sessions/{name}/start")
    async def start(request: Request, name: str) -> Response:
        await guard(request, f"start:{name}")
        inst = session(name)
        if inst.live_state in ("open", "connecting"):
            raise fail(422, f"Session '{name}' is already started")
        if inst.paired:
            state.set_state(name, "open")
        else:
            state.connect(name)
        return _json(session_info(inst), 201)

    @router.post("/api/sessions/{name}/stop")
    async def stop(request: Request, name: str) -> Response:
        await guard(request, f"stop:{name}")
        inst = session(name)
        if inst.live_state != "close":
            state.set_state(name, "close")
        return _json(session_info(inst), 201)

    @router.post("/api/sessions/{name}/restart")
    async def restart(request: Request, name: str) -> Response:
        await guard(request, f"restart:{name}")
        inst = session(name)
        try:
            state.restart(name)
        except InstanceNotConnected:  # WAHA restarts a stopped session too
            if inst.paired:
                state.set_state(name, "open")
            else:
                state.connect(name)
        return _json(session_info(inst), 201)

    @router.post("/api/sessions/{name}/logout")
    async def logout(request: Request, name: str) -> Response:
        await guard(request, f"logout:{name}")
        inst = session(name)
        if inst.live_state != "close":
            state.logout(name)
        return _json(session_info(inst), 201)

    @router.delete("/api/sessions/{name}")
    async def delete(request: Request, name: str) -> Response:
        await guard(request, f"delete:{name}")
        session(name)
        state.delete(name)
        return _json({}, 200)

    @router.get("/api/{name}/auth/qr")
    async def qr(request: Request, name: str) -> Response:
        await guard(request, f"qr:{name}")
        inst = session(name)
        status = status_of(inst)
        if status != "SCAN_QR_CODE" or inst.qr_code is None:
            raise fail(422, f"Can get QR code only in SCAN_QR_CODE status. The current status is '{status}'")
        if request.query_params.get("format") == "raw":
            return _json({"value": inst.qr_code})
        png = qr_image(inst.qr_code).split(",", 1)[1]
        if "application/json" in request.headers.get("accept", ""):
            return _json({"mimetype": "image/png", "data": png})
        return Response(base64.b64decode(png), media_type="image/png")

    @router.get("/api/{name}/chats")
    async def chats(request: Request, name: str) -> Response:
        await guard(request, f"chats:{name}")
        inst = session(name)
        history = state.history(name)
        if history is None:
            return _json([])
        params = request.query_params
        offset, limit = _int(params.get("offset"), 0), params.get("limit")
        rows = history.chat_rows(offset, _int(limit, 0) if limit is not None else None)
        return _json([_chat_row(row, inst.owner_jid) for row in rows])

    @router.get("/api/{name}/chats/{chat_id}/messages")
    async def chat_messages(request: Request, name: str, chat_id: str) -> Response:
        await guard(request, f"messages:{name}")
        inst = session(name)
        history = state.history(name)
        params = request.query_params
        limit, offset = max(_int(params.get("limit"), 100), 1), _int(params.get("offset"), 0)
        gte = _int(params.get("filter.timestamp.gte"), -1)
        lte = _int(params.get("filter.timestamp.lte"), -1)
        chat = history.chat_index(chat_id.replace("@c.us", "@s.whatsapp.net")) if history else None
        if history is None or chat is None:
            return _json([])
        bounds = (gte if gte >= 0 else None, lte if lte >= 0 else None)
        first, end = history.message_window(*bounds, chat)
        added = history.extra_window(*bounds, chat)
        records = added[offset : offset + limit]
        if offset + limit > len(added):
            start = first + max(offset - len(added), 0)
            records += history.records(range(start, min(first + offset + limit - len(added), end)), chat)
        return _json([waha_message(record, inst.owner_jid) for record in records])

    @router.get("/api/contacts/all")
    async def contacts(request: Request) -> Response:
        params = request.query_params
        name = params.get("session") or "default"
        await guard(request, f"contacts:{name}")
        session(name)
        history = state.history(name)
        if history is None:
            return _json([])
        offset, limit = _int(params.get("offset"), 0), params.get("limit")
        everything = list(history.contacts())
        chosen = everything[offset : offset + _int(limit, 0)] if limit is not None else everything[offset:]
        return _json(
            [
                {
                    "id": c_us(info.jid),
                    "number": info.phone,
                    "name": info.name,
                    "pushname": info.name,
                    "isGroup": info.kind == "group",
                    "isMyContact": True,
                }
                for info in chosen
            ]
        )

    for route in _SEND_ROUTES:
        router.add_api_route(f"/api/{route}", _send_handler(route, state, guard, session, fail), methods=["POST"])

    @router.post("/_sim/waha/{name}/status")
    async def override_status(name: str, request: Request) -> Response:
        inst = session(name)
        body = orjson.loads(await request.body() or b"{}")
        inst.waha_status = body.get("status") or None
        return _json(session_info(inst))

    return router


_SEND_KINDS = {
    "sendText": "text",
    "sendImage": "image",
    "sendVideo": "video",
    "sendVoice": "audio",
    "sendFile": "document",
}


def _send_handler(
    route: str, state: SimulatorState, guard: Any, session: Any, fail: Callable[[int, str], _Reply]
) -> Any:
    def send_fail(status_code: int, message: Any) -> _Reply:
        return fail(status_code, message if isinstance(message, str) else orjson.dumps(message).decode())

    async def send(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            body = {}
        name = body.get("session") or "default"
        await guard(request, f"{route}:{name}")
        inst = session(name)
        if status_of(inst) != "WORKING":
            raise fail(422, f"Session status is not as expected. Try again later or restart the session ({name})")
        chat = body.get("chatId")
        if not isinstance(chat, str) or not chat.endswith(("@c.us", "@g.us", "@lid", "@s.whatsapp.net")):
            raise fail(400, "chatId must be a WhatsApp chat id such as 5511999990000@c.us")
        if route == "sendText" and not body.get("text"):
            raise fail(400, "text should not be empty")
        file = body.get("file")
        if route != "sendText" and not (isinstance(file, dict) and file.get("url")):
            raise fail(400, "file.url should not be empty")
        media = (
            {"url": file.get("url"), "mimetype": file.get("mimetype"), "fileName": file.get("filename")}
            if route != "sendText" and isinstance(file, dict)
            else {}
        )
        message, late = await accept_send(
            state,
            inst,
            number=chat.replace("@c.us", "@s.whatsapp.net"),
            kind=_SEND_KINDS[route],
            text=(body.get("text") if route == "sendText" else body.get("caption")) or None,
            media=media,
            fail=send_fail,
        )
        if late:
            await state.sleep(state.config.send_hang_s)
        # NOWEB answers the Baileys message it sent.
        return _json({key: message[key] for key in ("key", "message", "messageTimestamp", "status")}, 201)

    return send


# -- webhooks -------------------------------------------------------------------------------------------------


def envelope(
    event: str, session: str, payload: Any, *, me: dict[str, Any] | None, at_ms: int | None = None
) -> dict[str, Any]:
    """WAHA's webhook envelope (gateways.md §8.4)."""
    return {
        "id": f"evt_{ulid_like()}",
        "timestamp": at_ms if at_ms is not None else int(time.time() * 1000),
        "event": event,
        "session": session,
        "metadata": {},
        "me": me,
        "payload": payload,
        "engine": ENGINE,
        "environment": {"version": VERSION, "engine": ENGINE, "tier": "CORE", "browser": None},
    }


def signed_headers(body: bytes, hmac_key: str | None, *, at_ms: int) -> dict[str, str]:
    """The headers WAHA sends with a delivery (the HMAC pair only with a key)."""
    headers = {
        "User-Agent": f"WAHA/{VERSION}",
        "X-Webhook-Request-Id": ulid_like(),
        "X-Webhook-Timestamp": str(at_ms),
    }
    if hmac_key:
        headers["X-Webhook-Hmac"] = hmac_sha512(hmac_key, body)
        headers["X-Webhook-Hmac-Algorithm"] = "sha512"
    return headers


async def emit_event(
    emitter: WebhookEmitter,
    session: str,
    event: str,
    payload: Any,
    *,
    hook: Mapping[str, Any] | None = None,
    me: dict[str, Any] | None = None,
    envelope_id: str | None = None,
) -> bool:
    """POST one WAHA event to the session's webhook (``hook``) or the emitter's default WAHA receiver.

    ``envelope_id`` repeats an earlier delivery's id (WAHA's retries keep it)."""
    target = _target(emitter, hook, event)
    if target is None:
        emitter.stats["skipped"] += 1
        return False
    url, key, custom = target
    body = envelope(event, session, payload, me=me)
    if envelope_id is not None:
        body["id"] = envelope_id
    headers = {**custom, **signed_headers(orjson.dumps(body), key, at_ms=body["timestamp"])}
    return await emitter._post(url, body, headers)  # the emitter serializes with orjson.dumps: the signed bytes


def _target(
    emitter: WebhookEmitter, hook: Mapping[str, Any] | None, event: str
) -> tuple[str, str | None, dict[str, str]] | None:
    """(URL, HMAC key, custom headers) of the session's own webhook, else the emitter's default."""
    if hook and hook.get("url"):
        events = hook.get("events") or []
        if "*" not in events and event not in events:
            return None
        hmac_conf = hook.get("hmac") or {}
        custom = {h["name"]: str(h["value"]) for h in hook.get("customHeaders") or [] if h.get("name")}
        return str(hook["url"]), hmac_conf.get("key") or None, custom
    if emitter.waha_url is None:
        return None
    return emitter.waha_url, emitter.waha_hmac_key, dict(emitter.waha_headers)


async def deliver_change(emitter: WebhookEmitter, change: SimEvent) -> int:
    """A ``session.status`` delivery for a state change of a WAHA session (QR refreshes send none)."""
    if not isinstance(change, StateChange):
        emitter.stats["skipped"] += 1
        return 0
    status = _status_of_change(change)
    at_ms = int(change.at.timestamp() * 1000)
    payload = {"name": change.name, "status": status, "statuses": [{"status": status, "timestamp": at_ms}]}
    me = me_of(change.owner_jid, change.profile_name) if change.new == "open" else None
    return int(await emit_event(emitter, change.name, "session.status", payload, hook=change.webhook, me=me))


def _status_of_change(change: StateChange) -> str:
    if change.new == "open":
        return "WORKING"
    if change.new == "connecting":
        return "STARTING" if change.owner_jid else "SCAN_QR_CODE"
    return "FAILED" if change.new == "refused" else "STOPPED"


# -- messages: the echo of a send, inbound messages, receipts -------------------------------------------------


def send_bodies(
    inst: SimInstance, message: Mapping[str, Any], *, kind: str, receipts: bool
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """An API send's echo, ``message.any`` with ``fromMe`` (WAHA sends ``message`` only for inbound messages), and,
    with ``receipts``, its ``message.ack`` 1 (SERVER), 2 (DEVICE), 3 (READ) and, for a voice message, 4 (PLAYED)."""
    echo = {**waha_message(message, inst.owner_jid), "source": "api"}
    bodies: list[tuple[str, dict[str, Any]]] = [("message.any", echo)]
    if receipts:
        acks = (1, 2, 3, 4) if kind == "audio" else (1, 2, 3)
        bodies += [("message.ack", _ack(echo, ack)) for ack in acks]
    return tuple(bodies)


def message_bodies(inst: SimInstance, message: Mapping[str, Any]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """A message that is not an API send: inbound, both ``message`` and ``message.any``; typed on the owner's phone,
    ``message.any`` only."""
    payload = waha_message(message, inst.owner_jid)
    if payload["fromMe"]:
        return (("message.any", payload),)
    return (("message", payload), ("message.any", payload))


def receipt_bodies(
    inst: SimInstance, *, jid: str, external_id: str, statuses: tuple[str, ...]
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``message.ack`` of the session's own message ``external_id`` to ``jid``, one per status, in order."""
    chat = c_us(jid) or jid
    sent = {"id": f"true_{chat}_{external_id}", "from": c_us(inst.owner_jid) or "0@c.us", "to": chat}
    return tuple(("message.ack", _ack(sent, _ACK_OF_RECEIPT[s])) for s in statuses)


_ACK_OF_RECEIPT = {"sent": 1, "delivered": 2, "read": 3, "played": 4}


def _ack(message: Mapping[str, Any], ack: int) -> dict[str, Any]:
    """A ``message.ack`` payload: the acknowledging chat in ``from`` (gateways.md §8.4)."""
    return {
        "id": message["id"],
        "from": message["to"],
        "to": message["from"],
        "participant": None,
        "fromMe": True,
        "ack": ack,
        "ackName": _ACK_NAMES[ack],
        "_data": {},
    }


async def deliver_send(emitter: WebhookEmitter, delivery: SendDelivery) -> int:
    """A delivery's bodies (an echo and its receipts, a message, receipts), one after another, to the session's
    webhook with its HMAC key."""
    me = me_of(delivery.owner_jid, delivery.profile_name)
    delivered = 0
    for event, payload in delivery.bodies:
        delivered += int(await emit_event(emitter, delivery.name, event, payload, hook=delivery.webhook, me=me))
    return delivered
