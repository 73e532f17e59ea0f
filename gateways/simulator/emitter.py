"""Webhook deliveries of the simulator: real-shaped Evolution and MegaAPI POSTs for every state change.

Evolution (gateways.md §2.1–2.5): the envelope ``{event, instance, data, destination, date_time, sender,
server_url, apikey}`` for ``connection.update`` (no delivery for a reconnectable close, as in Evolution) and
``qrcode.updated``; ``by_events`` appends ``/connection-update`` or ``/qrcode-updated``; the configured headers are
sent as-is, except ``jwt_key``, which becomes ``Authorization: Bearer <HS256 JWT>`` like Evolution 2.3.x. An
instance with its own webhook (create body or ``/webhook/set``) is delivered there instead, honouring its events.

WAHA (§8.4): ``session.status``, ``message``/``message.any`` and ``message.ack`` in WAHA's envelope, HMAC-signed,
to the session's webhook (see ``simulator.waha``).

MegaAPI (§4): flat ``connection_update`` bodies alternating between the official shape and the 2026 ``phone_*``
shape, so receivers are exercised with both.

Deliveries never raise into the state: failures are logged and counted in :attr:`WebhookEmitter.stats`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import httpx
import jwt
import orjson

from gateways.simulator import shapes
from gateways.simulator.sends import SendDelivery
from gateways.simulator.state import InstanceRemoved, SimEvent, SimulatorState, StateChange

logger = logging.getLogger(__name__)

UrlKind = Literal["evolution", "megaapi"]
EVOLUTION_USER_AGENT = "axios/1.7.9"
EVOLUTION_REMOVALS = ("instance.delete", "remove.instance")
"""What Evolution fires, in this order, when an instance is deleted."""


class _Envelope(Protocol):
    """What an Evolution envelope says about the instance an event is from."""

    @property
    def name(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def owner_jid(self) -> str | None: ...
    @property
    def token(self) -> str | None: ...


def event_suffix(event: str) -> str:
    """Evolution's by-events URL suffix: ``connection.update`` → ``connection-update``."""
    return re.sub(r"[._-]", "-", event).lower()


def delivery_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as Evolution sends them: static ones as-is, ``jwt_key`` replaced by a signed bearer token."""
    out = {key: str(value) for key, value in headers.items() if key != "jwt_key"}
    secret = headers.get("jwt_key")
    if secret:
        iat = int(time.time())
        claims = {"iat": iat, "exp": iat + 600, "app": "evolution", "action": "webhook"}
        out["Authorization"] = "Bearer " + jwt.encode(claims, secret, algorithm="HS256")
    return out


class WebhookEmitter:
    """Listens to a :class:`SimulatorState` and POSTs each change to the configured receivers.

    State changes may happen on any thread (the simulator's server thread, a test); they are handed to this
    emitter's event loop and delivered by ``max_concurrency`` workers over one shared ``httpx.AsyncClient``.
    Changes made before :meth:`start` are not delivered; :meth:`flush` waits for everything published so far.
    """

    def __init__(
        self,
        state: SimulatorState,
        *,
        evolution_url: str | None,
        megaapi_url: str | None,
        headers: dict[str, str] | None = None,
        by_events: bool = False,
        megaapi_headers: dict[str, str] | None = None,
        server_url: str = "http://127.0.0.1:8080",
        expose_apikey: bool = True,
        max_concurrency: int = 16,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        waha_url: str | None = None,
        waha_hmac_key: str | None = None,
        waha_headers: dict[str, str] | None = None,
    ) -> None:
        self.state = state
        self.waha_url = waha_url
        """WAHA sessions without a webhook of their own deliver here (``simulator.waha``), signed with
        ``waha_hmac_key`` when set."""
        self.waha_hmac_key = waha_hmac_key
        self.waha_headers = dict(waha_headers or {})
        self.evolution_url = evolution_url
        self.megaapi_url = megaapi_url
        self.headers = dict(headers or {})
        self.by_events = by_events
        self.megaapi_headers = dict(megaapi_headers or {})
        self.server_url = server_url
        self.expose_apikey = expose_apikey
        self.stats: Counter[str] = Counter()
        """``delivered``, ``failed`` and ``skipped`` (events the provider would not send, or with no receiver)."""
        self.last_error: str | None = None
        self._max_concurrency = max(1, max_concurrency)
        self._timeout = httpx.Timeout(timeout_s)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[SimEvent] | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._megaapi_seq = 0

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`aclose` has not."""
        return self._client is not None

    async def start(self) -> None:
        """Open the HTTP client, start the workers and subscribe to the state (idempotent)."""
        if self._client is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(
            timeout=self._timeout,
            transport=self._transport,
            limits=httpx.Limits(max_connections=self._max_concurrency),
        )
        self._queue = asyncio.Queue()
        self._semaphore = asyncio.Semaphore(self._max_concurrency)
        self._workers = [
            self._loop.create_task(self._work(), name=f"sim-webhook-{i}") for i in range(self._max_concurrency)
        ]
        self._unsubscribe = self.state.subscribe(self._on_event)

    async def aclose(self) -> None:
        """Unsubscribe, deliver what is pending, stop the workers and close the client."""
        if self._client is None:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.flush()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self._client.aclose()
        self._client = None
        self._loop = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def flush(self) -> None:
        """Wait until every event published so far has been delivered or has failed."""
        while self._pending and self._queue is not None:
            await self._queue.join()
            if self._pending:
                await asyncio.sleep(0)  # let events scheduled from other threads reach the queue

    def _on_event(self, event: SimEvent) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._pending_lock:
            self._pending += 1
        try:
            loop.call_soon_threadsafe(self._enqueue, event)
        except RuntimeError:  # the loop closed in between
            self._done()

    def _enqueue(self, event: SimEvent) -> None:
        if self._queue is None:
            self._done()
            return
        self._queue.put_nowait(event)

    def _done(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            event = await queue.get()
            try:
                await self.emit_change(event)
            except Exception:
                logger.exception("simulator webhook for %s failed", event.name)
            finally:
                queue.task_done()
                self._done()

    async def emit_change(self, change: SimEvent) -> int:
        """Deliver one event the way its provider would; returns the number of successful POSTs."""
        if isinstance(change, SendDelivery):
            return await self._emit_send(change)
        if change.provider == "waha":
            from gateways.simulator.waha import deliver_change  # WAHA's envelope, headers and signing

            return await deliver_change(self, change)
        if change.provider == "megaapi":
            target = self._megaapi_target(change.webhook)
            if not isinstance(change, StateChange) or target is None:
                self.stats["skipped"] += 1
                return 0
            variant, self._megaapi_seq = self._megaapi_seq % 2, self._megaapi_seq + 1
            payload = shapes.megaapi_connection_update(change, variant=variant)
            return int(await self._post(target[0], payload, target[1]))
        if isinstance(change, InstanceRemoved):
            return await self._emit_removed(change)
        if isinstance(change, StateChange):
            event, data = "connection.update", shapes.connection_update_data(change)
        else:
            event, data = "qrcode.updated", shapes.qrcode_updated_data(change)
        if data is None:
            self.stats["skipped"] += 1
            return 0
        return await self._post_evolution(change.webhook, event, data, change)

    async def _post_evolution(self, hook: Mapping[str, Any] | None, event: str, data: Any, source: _Envelope) -> int:
        """One Evolution delivery of ``event`` about ``source``'s instance to its webhook (or the default one)."""
        target = self._evolution_target(hook, event)
        if target is None:
            self.stats["skipped"] += 1
            return 0
        url, destination, headers = target
        envelope = {
            "event": event,
            "instance": source.name,
            "data": data,
            "destination": destination,
            "date_time": shapes.iso(source.at),
            "sender": source.owner_jid or "",
            "server_url": self.server_url,
            "apikey": source.token if self.expose_apikey else None,
        }
        return int(await self._post(url, envelope, {"User-Agent": EVOLUTION_USER_AGENT, **headers}))

    def _megaapi_target(self, hook: Mapping[str, Any] | None) -> tuple[str, dict[str, str]] | None:
        """The instance's own MegaAPI webhook (its secret in the URL), else the default receiver with its headers."""
        hook = hook or {}
        if hook.get("url") and hook.get("enabled", True):
            return str(hook["url"]), {}
        return (self.megaapi_url, self.megaapi_headers) if self.megaapi_url is not None else None

    async def _emit_removed(self, removed: InstanceRemoved) -> int:
        """Evolution's delete: ``instance.delete`` then ``remove.instance``, both ``{instanceName, instanceId}``."""
        data = {"instanceName": removed.name, "instanceId": removed.instance_id}
        return sum([await self._post_evolution(removed.webhook, e, data, removed) for e in EVOLUTION_REMOVALS])

    async def _emit_send(self, delivery: SendDelivery) -> int:
        """An accepted send's echo and receipts, one after another (so they arrive in order)."""
        if delivery.provider == "waha":
            from gateways.simulator.waha import deliver_send  # WAHA's envelope, headers and signing

            return await deliver_send(self, delivery)
        delivered = 0
        for event, data in delivery.bodies:
            if delivery.provider != "megaapi":
                delivered += await self._post_evolution(delivery.webhook, event, data, delivery)
            elif (target := self._megaapi_target(delivery.webhook)) is None:
                self.stats["skipped"] += 1
            else:
                delivered += int(await self._post(target[0], data, target[1]))
        return delivered

    async def emit_raw(self, url_kind: UrlKind, payload: Mapping[str, Any]) -> bool:
        """POST ``payload`` as-is to the Evolution or MegaAPI receiver (Evolution: headers and by-events suffix)."""
        if url_kind == "megaapi":
            if self.megaapi_url is None:
                raise ValueError("no megaapi_url configured")
            return await self._post(self.megaapi_url, payload, self.megaapi_headers)
        if self.evolution_url is None:
            raise ValueError("no evolution_url configured")
        url = self.evolution_url
        event = payload.get("event")
        if self.by_events and isinstance(event, str):
            url = f"{url}/{event_suffix(event)}"
        return await self._post(url, payload, {"User-Agent": EVOLUTION_USER_AGENT, **delivery_headers(self.headers)})

    def _evolution_target(self, hook: Mapping[str, Any] | None, event: str) -> tuple[str, str, dict[str, str]] | None:
        """(post URL, ``destination``, headers): the instance's own webhook if it has one, else the default."""
        if hook and hook.get("url") and hook.get("enabled", True):
            events = hook.get("events") or []
            if events and event.replace(".", "_").upper() not in events:
                return None
            base = str(hook["url"])
            url = f"{base}/{event_suffix(event)}" if hook.get("byEvents") else base
            return url, base, delivery_headers(hook.get("headers") or {})
        if self.evolution_url is None:
            return None
        base = self.evolution_url
        url = f"{base}/{event_suffix(event)}" if self.by_events else base
        return url, base, delivery_headers(self.headers)

    async def _post(self, url: str, payload: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
        if self._client is None or self._semaphore is None:
            raise RuntimeError("WebhookEmitter.start() has not been called")
        async with self._semaphore:
            try:
                response = await self._client.post(
                    url, content=orjson.dumps(payload), headers={"Content-Type": "application/json", **headers}
                )
            except httpx.HTTPError as exc:
                return self._failed(url, f"{type(exc).__name__}: {exc}")
        if response.is_success:
            self.stats["delivered"] += 1
            return True
        return self._failed(url, f"HTTP {response.status_code}")

    def _failed(self, url: str, error: str) -> bool:
        self.stats["failed"] += 1
        self.last_error = error
        logger.warning("simulator webhook to %s failed: %s", url, error)
        return False
