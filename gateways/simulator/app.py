"""ASGI app of the gateway simulator: Evolution API v2, MegaAPI and WAHA (``simulator.waha``) REST contracts over
:class:`SimulatorState`.

Provider routes follow gateways.md §1 and §4: Evolution's guard order (instance exists → name free on create →
``apikey``), its error envelope and its 200-with-``{"error": true}`` quirk on restart; MegaAPI's bearer token and
``{"error", "message"}`` bodies. The knobs (hang, latency, outage, error rate, flapping) apply to provider routes
only; the ``/_sim`` control routes never see them. JSON is written with orjson.
"""

from __future__ import annotations

import asyncio
import math
import re
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from gateways.simulator import shapes
from gateways.simulator.history import History, HistorySpec
from gateways.simulator.sends import SendBook
from gateways.simulator.state import (
    INTEGRATIONS,
    InstanceExists,
    InstanceNotConnected,
    LiveState,
    ProviderName,
    SimInstance,
    SimulatorState,
)

_SETTING_FIELDS = (
    "rejectCall",
    "msgCall",
    "groupsIgnore",
    "alwaysOnline",
    "readMessages",
    "readStatus",
    "syncFullHistory",
    "wavoipToken",
)
_URL = re.compile(r"^https?://")
_UNAUTHORIZED = shapes.evolution_error(401, "Unauthorized")


def _json(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


class _Reply(Exception):
    """Raised by guards to answer at once with ``response``."""

    def __init__(self, body: Any, status_code: int) -> None:
        super().__init__(status_code)
        self.response = _json(body, status_code)


async def _reply(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Reply)
    return exc.response


def _evolution_fail(status_code: int, message: str) -> _Reply:
    return _Reply(shapes.evolution_error(status_code, [message]), status_code)


def _unavailable(provider: ProviderName, message: str) -> _Reply:
    if provider == "evolution":
        return _evolution_fail(503, message)
    if provider == "waha":
        return _Reply({"statusCode": 503, "message": message}, 503)
    return _Reply(shapes.megaapi_error(message), 503)


async def _gate(state: SimulatorState, provider: ProviderName, call: str) -> None:
    """Count the call, then apply the knobs: hang, latency, outage, seeded error rate, flapping cycle."""
    state.record_call(f"{provider}.{call}")
    config = state.config
    if config.hang:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.hang_s
        # Polled, not an Event: the knob is flipped from other threads and must release waiting requests.
        while state.config.hang and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
    if config.latency_ms > 0:
        await state.sleep(config.latency_ms / 1000)
    if state.config.outage:
        raise _unavailable(provider, "Simulated outage: the gateway is unavailable")
    if state.draw_fault():
        raise _unavailable(provider, "Simulated error: the gateway is unavailable")
    if state.draw_flap():
        raise _unavailable(provider, "Simulated flapping: the gateway is unavailable")


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        raise _evolution_fail(400, "Invalid JSON body") from None
    if not isinstance(body, dict):
        raise _evolution_fail(400, "instance is not of a type(s) object")
    return body


def _evolution_router(state: SimulatorState) -> APIRouter:
    router = APIRouter(tags=["evolution"])

    def instance_for(request: Request, name: str) -> SimInstance:
        """Evolution's guards: the instance must exist (404), then the global key or its own token (401)."""
        inst = state.get(name, "evolution")
        if inst is None:
            raise _evolution_fail(404, f'The "{name}" instance does not exist')
        key = request.headers.get("apikey")
        if not key or key not in (state.config.evolution_api_key, inst.token):
            raise _Reply(_UNAUTHORIZED, 401)
        return inst

    @router.get("/")
    async def info(request: Request) -> Response:
        await _gate(state, "evolution", "info")
        base = str(request.base_url).rstrip("/")
        return _json(
            {
                "status": 200,
                "message": "Welcome to the Evolution API, it is working!",
                "version": state.config.version,
                "clientName": "evolution",
                "manager": f"{base}/manager",
                "documentation": "https://doc.evolution-api.com",
                "whatsappWebVersion": "2.3000.1027934701",
            }
        )

    @router.post("/instance/create")
    async def create(request: Request) -> Response:
        await _gate(state, "evolution", "create")
        body = await _body(request)
        name = body.get("instanceName")
        if isinstance(name, str) and state.get(name) is not None:
            raise _evolution_fail(403, f'This name "{name}" is already in use.')
        if request.headers.get("apikey") != state.config.evolution_api_key:
            raise _Reply(_UNAUTHORIZED, 401)
        if not isinstance(name, str) or not name:
            raise _evolution_fail(400, 'instance requires property "instanceName"')
        integration = body.get("integration")
        if integration not in INTEGRATIONS:
            raise _evolution_fail(400, "Invalid integration")
        webhook = body.get("webhook")
        if isinstance(webhook, dict) and webhook.get("url"):
            webhook = {
                "url": webhook["url"],
                "enabled": True,
                "events": webhook.get("events") or [],
                "headers": webhook.get("headers") or {},
                "byEvents": bool(webhook.get("byEvents")),
                "base64": bool(webhook.get("base64")),
            }
        else:
            webhook = None
        try:
            inst, qr = state.create_instance(
                name,
                token=str(body["token"]) if body.get("token") else None,
                integration=integration,
                qrcode=bool(body.get("qrcode")) and integration == "WHATSAPP-BAILEYS",
                number=body.get("number") or None,
                settings={k: body[k] for k in _SETTING_FIELDS if k in body},
                webhook=webhook,
            )
        except InstanceExists as exc:
            raise _evolution_fail(403, exc.message) from None
        return _json(shapes.create_response(inst, qr), 201)

    @router.get("/instance/fetchInstances")
    async def fetch_instances(request: Request) -> Response:
        await _gate(state, "evolution", "fetchInstances")
        key = request.headers.get("apikey")
        if not key:
            raise _Reply(_UNAUTHORIZED, 401)
        instances = state.instances_of("evolution")
        if key != state.config.evolution_api_key:
            instances = [inst for inst in instances if inst.token == key]
            if not instances:
                raise _Reply(_UNAUTHORIZED, 401)
        params = request.query_params
        for param, attr in (("instanceName", "name"), ("instanceId", "instance_id"), ("number", "number")):
            wanted = params.get(param)
            if wanted:
                instances = [inst for inst in instances if getattr(inst, attr) == wanted]
                if not instances:
                    raise _evolution_fail(404, f'Instance "{wanted}" not found')
        return _json([shapes.evolution_row(inst) for inst in instances])

    @router.get("/instance/connectionState/{instance}")
    async def connection_state(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"connectionState:{instance}")
        return _json(shapes.connection_state(instance_for(request, instance)))

    @router.get("/instance/connect/{instance}")
    async def connect(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"connect:{instance}")
        inst = instance_for(request, instance)
        qr = state.connect(instance, number=request.query_params.get("number") or None)
        return _json(shapes.connection_state(inst) if qr is None else shapes.qr_body(qr))

    @router.post("/instance/restart/{instance}")
    async def restart(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"restart:{instance}")
        inst = instance_for(request, instance)
        try:
            qr = state.restart(instance)
        except InstanceNotConnected as exc:
            return _json({"error": True, "message": exc.message})
        return _json(shapes.connection_state(inst) if qr is None else shapes.qr_body(qr))

    @router.delete("/instance/logout/{instance}")
    async def logout(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"logout:{instance}")
        instance_for(request, instance)
        try:
            state.logout(instance)
        except InstanceNotConnected as exc:
            raise _evolution_fail(400, exc.message) from None
        return _json({"status": "SUCCESS", "error": False, "response": {"message": "Instance logged out"}})

    @router.delete("/instance/delete/{instance}")
    async def delete(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"delete:{instance}")
        instance_for(request, instance)
        state.delete(instance)
        return _json({"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}})

    @router.post("/webhook/set/{instance}")
    async def set_webhook(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"webhookSet:{instance}")
        instance_for(request, instance)
        hook = (await _body(request)).get("webhook")
        if not isinstance(hook, dict):
            raise _evolution_fail(400, 'instance requires property "webhook"')
        if not isinstance(hook.get("url"), str) or not _URL.match(hook["url"]):
            raise _evolution_fail(400, 'Invalid "url" property')
        enabled = bool(hook.get("enabled", True))
        inst = state.set_webhook(
            instance,
            {
                "url": hook["url"],
                "enabled": enabled,
                "events": list(hook.get("events") or []) if enabled else [],
                "headers": hook.get("headers") or {},
                "byEvents": bool(hook.get("byEvents")),
                "base64": bool(hook.get("base64")),
            },
        )
        return _json(shapes.webhook_row(inst), 201)

    @router.get("/webhook/find/{instance}")
    async def find_webhook(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"webhookFind:{instance}")
        return _json(shapes.webhook_row(instance_for(request, instance)))

    @router.post("/chat/findChats/{instance}")
    async def find_chats(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"findChats:{instance}")
        instance_for(request, instance)
        body = await _body(request)
        history = state.history(instance)
        skip, take = _int(body.get("skip"), 0), body.get("take")
        if history is None:
            return _json([])
        return _json(history.chat_rows(skip, _int(take, 0) if take is not None else None))

    @router.post("/chat/findContacts/{instance}")
    async def find_contacts(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"findContacts:{instance}")
        instance_for(request, instance)
        body = await _body(request)
        history = state.history(instance)
        offset = body.get("offset")
        if history is None:
            return _json([])
        return _json(history.contact_rows(_int(body.get("page"), 1), _int(offset, 1) if offset else None))

    @router.post("/chat/findMessages/{instance}")
    async def find_messages(request: Request, instance: str) -> Response:
        await _gate(state, "evolution", f"findMessages:{instance}")
        instance_for(request, instance)
        body = await _body(request)
        page, offset = max(_int(body.get("page"), 1), 1), max(_int(body.get("offset"), 50), 1)
        limit = state.config.fail_find_messages_after_page
        if limit is not None and page > limit:
            raise _evolution_fail(500, f"Simulated failure: findMessages page {page}")
        return _json(
            _messages_page(state.history(instance), body.get("where"), page, offset, sent=state.sends, name=instance)
        )

    return router


def _int(value: Any, default: int) -> int:
    """A non-negative integer from a JSON value (Evolution's DTOs coerce numeric strings)."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        return max(int(value), 0)
    return default


def _epoch(value: Any) -> int | None:
    """What Evolution's `new Date(value).getTime() / 1000` makes of a bound (None if it is unparseable)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value / 1000)  # JavaScript reads a number as milliseconds
    if isinstance(value, str) and value:
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return None
    return None


def _messages_page(
    history: History | None, where: Any, page: int, offset: int, *, sent: SendBook | None = None, name: str = ""
) -> dict[str, Any]:
    """findMessages: `where.key.remoteJid` and `where.messageTimestamp` (only when both bounds are truthy); the
    messages the instance sent to that chat (``sent``) are the newest, so they come first."""
    where = where if isinstance(where, dict) else {}
    key = where.get("key") if isinstance(where.get("key"), dict) else {}
    jid = key.get("remoteJid") if isinstance(key.get("remoteJid"), str) else None
    gte = lte = None
    bounds = where.get("messageTimestamp")
    if isinstance(bounds, dict) and bounds.get("gte") and bounds.get("lte"):
        gte, lte = _epoch(bounds["gte"]), _epoch(bounds["lte"])
    chat: int | None = None
    if history is not None and jid:
        chat = history.chat_index(jid)
        if chat is None:
            history = None
    outbox = sent.stored_messages(name, jid, gte, lte) if sent is not None and jid else []
    if history is None:
        first, end, added = 0, 0, outbox
    else:
        first, end = history.message_window(gte, lte, chat)
        added = outbox + history.extra_window(gte, lte, chat)  # newer than every generated message: first
    total = len(added) + end - first
    lo, hi = (page - 1) * offset, page * offset
    records = added[lo:hi]
    if history is not None and hi > len(added):
        start = first + max(lo - len(added), 0)
        records += history.records(range(start, min(first + hi - len(added), end)), chat)
    return {"messages": {"total": total, "pages": math.ceil(total / offset), "currentPage": page, "records": records}}


def _megaapi_router(state: SimulatorState) -> APIRouter:
    router = APIRouter(prefix="/rest", tags=["megaapi"])

    def instance_for(request: Request, key: str) -> SimInstance:
        """MegaAPI's guard: ``Authorization: Bearer <token>`` (401), then the instance key (404)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != state.config.megaapi_token:
            raise _Reply(shapes.megaapi_error("Unauthorized: invalid or missing token"), 401)
        inst = state.get(key, "megaapi")
        if inst is None:
            raise _Reply(shapes.megaapi_error("instance not found"), 404)
        return inst

    @router.get("/instance/{instance_key}")
    async def status(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"status:{instance_key}")
        return _json(shapes.megaapi_status(instance_for(request, instance_key)))

    @router.get("/instance/qrcode_base64/{instance_key}")
    async def qrcode_base64(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"qrcode:{instance_key}")
        if instance_for(request, instance_key).live_state == "open":
            return _json(shapes.megaapi_error("Instance already connected"))
        qr = state.connect(instance_key)
        if qr is None or qr.base64 is None:
            return _json(shapes.megaapi_error("QR code not available yet, try again"))
        return _json({"error": False, "qrcode": qr.base64})

    @router.get("/instance/pairingCode/{instance_key}")
    async def pairing_code(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"pairingCode:{instance_key}")
        if instance_for(request, instance_key).live_state == "open":
            return _json(shapes.megaapi_error("Instance already connected"))
        phone = request.query_params.get("phoneNumber")
        if not phone:
            return _json(shapes.megaapi_error("phoneNumber is required"), 400)
        qr = state.emit_qr(instance_key, number=phone)
        code = qr.pairing_code or ""
        return _json({"error": False, "pairingCode": f"{code[:4]}-{code[4:]}"})

    @router.post("/instance/init")
    async def init(request: Request) -> Response:
        """Unverified (gateways.md §8.5: one third-party client's call): create an instance by its key."""
        await _gate(state, "megaapi", "init")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != state.config.megaapi_token:
            raise _Reply(shapes.megaapi_error("Unauthorized: invalid or missing token"), 401)
        key = request.query_params.get("instance_key")
        if not key:
            return _json(shapes.megaapi_error("instance_key is required"), 400)
        try:
            state.create_instance(key, provider="megaapi")
        except InstanceExists:
            return _json(shapes.megaapi_error("Instance key already exists"), 400)
        return _json({"error": False, "message": "Instance created", "key": key})

    @router.post("/webhook/{instance_key}/configWebhook")
    async def config_webhook(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"configWebhook:{instance_key}")
        instance_for(request, instance_key)
        data = (await _body(request)).get("messageData")
        if not isinstance(data, dict) or not isinstance(data.get("webhookUrl"), str):
            return _json(shapes.megaapi_error("messageData.webhookUrl is required"), 400)
        enabled = bool(data.get("webhookEnabled", True))
        state.set_webhook(instance_key, {"url": data["webhookUrl"], "enabled": enabled})
        return _json({"error": False, "message": "Webhook configured"})

    @router.delete("/instance/{instance_key}/logout")
    async def logout(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"logout:{instance_key}")
        instance_for(request, instance_key)
        try:
            state.logout(instance_key)
        except InstanceNotConnected:
            return _json(shapes.megaapi_error("instance is not connected"), 400)
        return _json({"error": False, "message": "Instance logged out"})

    @router.delete("/instance/{instance_key}/restart")
    async def restart(request: Request, instance_key: str) -> Response:
        await _gate(state, "megaapi", f"restart:{instance_key}")
        inst = instance_for(request, instance_key)
        try:
            state.restart(instance_key)
        except InstanceNotConnected:
            if inst.paired:
                state.set_state(instance_key, "open")
            else:
                state.connect(instance_key)
        return _json({"error": False, "message": "Instance restarted"})

    return router


class ResetRequest(BaseModel):
    """Body of ``POST /_sim/reset``."""

    keep_config: bool = False


class InstancesRequest(BaseModel):
    """Body of ``POST /_sim/instances``: ``count`` seeds many, ``name`` adds one."""

    provider: ProviderName = "evolution"
    count: int | None = None
    prefix: str = "sim"
    connected_ratio: float = 0.7
    start: int = 1
    name: str | None = None
    live_state: LiveState = "close"
    token: str | None = None


class StateRequest(BaseModel):
    """Body of ``POST /_sim/instances/{name}/state``."""

    state: LiveState
    reason_code: int | None = None


def _control_router(state: SimulatorState) -> APIRouter:
    router = APIRouter(prefix="/_sim", tags=["simulator"])

    def fail(status_code: int, detail: Any) -> _Reply:
        return _Reply({"detail": detail}, status_code)

    def known(name: str) -> SimInstance:
        inst = state.get(name)
        if inst is None:
            raise fail(404, f"no instance {name!r}")
        return inst

    @router.post("/reset")
    async def reset(body: ResetRequest | None = None) -> Response:
        state.reset(keep_config=bool(body and body.keep_config))
        return _json({"ok": True})

    @router.get("/config")
    async def get_config() -> Response:
        return _json(state.config.model_dump())

    @router.post("/config")
    async def update_config(request: Request) -> Response:
        try:
            changes = orjson.loads(await request.body() or b"{}")
            config = state.configure(**changes)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise fail(400, str(exc)) from None
        except ValidationError as exc:
            raise fail(422, exc.errors(include_url=False, include_context=False)) from None
        return _json(config.model_dump())

    @router.get("/instances")
    async def summary() -> Response:
        counts: dict[str, dict[str, int]] = {}
        for inst in list(state.instances.values()):
            per = counts.setdefault(inst.provider, {})
            per[inst.live_state] = per.get(inst.live_state, 0) + 1
        return _json({"total": len(state.instances), "live_states": counts})

    @router.post("/instances")
    async def add_instances(body: InstancesRequest) -> Response:
        try:
            if body.count is not None:
                created = state.seed_instances(
                    body.count,
                    provider=body.provider,
                    prefix=body.prefix,
                    connected_ratio=body.connected_ratio,
                    start=body.start,
                )
            elif body.name:
                created = [state.add_instance(body.name, body.provider, body.live_state, token=body.token)]
            else:
                raise fail(400, "give either count or name")
        except InstanceExists as exc:
            raise fail(409, exc.message) from None
        except ValueError as exc:
            raise fail(400, str(exc)) from None
        return _json({"created": len(created), "instances": [inst.name for inst in created]}, 201)

    @router.get("/instances/{name}")
    async def get_instance(name: str) -> Response:
        return _json(shapes.sim_instance(known(name)))

    @router.post("/instances/{name}/state")
    async def set_state(name: str, body: StateRequest) -> Response:
        known(name)
        try:
            change = state.set_state(name, body.state, reason_code=body.reason_code)
        except ValueError as exc:
            raise fail(400, str(exc)) from None
        return _json(shapes.state_change(change))

    @router.post("/instances/{name}/history")
    async def set_history(name: str, body: HistorySpec) -> Response:
        known(name)
        history = state.set_history(name, body)
        return _json(
            {
                "name": name,
                "chats": history.chat_total,
                "messages": history.total_messages,
                "newest_ts": history.newest_ts,
            }
        )

    @router.post("/instances/{name}/qr")
    async def emit_qr(name: str, number: str | None = None) -> Response:
        known(name)
        qr = state.emit_qr(name, number=number)
        return _json(
            {
                "name": qr.name,
                "code": qr.code,
                "pairing_code": qr.pairing_code,
                "count": qr.count,
                "limit_reached": qr.limit_reached,
            }
        )

    @router.post("/instances/{name}/scan")
    async def scan(name: str) -> Response:
        """A phone scans the current QR code: the session pairs and opens (the `open` webhook follows)."""
        known(name)
        try:
            change = state.scan(name)
        except InstanceNotConnected as exc:
            raise fail(409, exc.message) from None
        return _json(shapes.state_change(change))

    @router.post("/tick")
    async def tick() -> Response:
        return _json({"changes": [shapes.state_change(change) for change in state.tick()]})

    @router.get("/calls")
    async def calls() -> Response:
        return _json(dict(state.calls))

    return router


def create_app(state: SimulatorState) -> FastAPI:
    """Build the simulator's ASGI app over ``state`` (Evolution at ``/``, MegaAPI at ``/rest``, WAHA at ``/api``,
    control ``/_sim``)."""
    app = FastAPI(
        title="zapsync gateway simulator", docs_url="/_sim/docs", redoc_url=None, openapi_url="/_sim/openapi.json"
    )
    app.state.simulator = state
    app.add_exception_handler(_Reply, _reply)
    app.include_router(_evolution_router(state))
    app.include_router(_megaapi_router(state))
    from gateways.simulator.waha import waha_router  # it uses this module's guards

    app.include_router(waha_router(state))
    app.include_router(_control_router(state))
    from gateways.simulator.sends import sends_router  # it builds on this module's guards

    app.include_router(sends_router(state))
    from gateways.simulator.metrics import metrics_router  # Evolution's and WAHA's /metrics (issue 12 §3)

    app.include_router(metrics_router(state))
    return app
