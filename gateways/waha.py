"""WAHA client (gateways.md §5, §8.4): every session's status in one call, history by chat, sends once.

WAHA keeps no instance-wide message listing: its messages are read chat by chat. ``fetch_messages`` without a chat
therefore pages over a *plan*: the one-to-one chats active within the window (groups and broadcasts are not read —
imports keep only one-to-one conversations), ordered by chat id so page *n* names the same chats in every process
that builds the plan, :attr:`WahaGateway.chats_per_page` chats a page. A page holds every message of its chats
within the window, newest first. WAHA reports no totals: ``MessagePage.total`` is the number of chats planned.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from core.domain import (
    ChatKind,
    ConnectResult,
    GatewayChat,
    GatewayContact,
    GatewayMessage,
    InstanceStatus,
    MessagePage,
    OutgoingMessage,
    OutgoingType,
    Provider,
    SendResult,
    StatusObservation,
    chat_kind,
)
from core.errors import (
    GatewayAuthError,
    GatewayError,
    GatewayNotFound,
    GatewayOutcomeUnknown,
    GatewayRequestError,
    GatewaySendRejected,
    GatewayTransientError,
    GatewayUnavailable,
)
from core.phones import phone_from_jid
from gateways.base import unreachable
from gateways.http import HttpGateway
from gateways.messages import MalformedMessage, epoch_seconds
from gateways.prometheus import read_live_states
from gateways.status import from_waha, waha_reason
from gateways.waha_messages import chat_id_out, from_waha_message, jid_in, key_id, serialized_id

MISSING_AT_GATEWAY = "instance not found at the gateway"
WEBHOOK_EVENTS = ("session.status", "message.any", "message.ack", "message.revoked")
"""What a session zapsync creates subscribes to (`message.any` includes our own messages: not `message` too)."""
HMAC_KEY_HEADER = "hmac_key"
"""A ``webhook_headers`` entry that becomes the webhook's HMAC key instead of a header (like Evolution's
``jwt_key``); without it the ``X-Webhook-Secret`` value, when given, is the key as well."""
_SEND_PATHS = {
    OutgoingType.IMAGE: "/api/sendImage",
    OutgoingType.VIDEO: "/api/sendVideo",
    OutgoingType.AUDIO: "/api/sendVoice",
    OutgoingType.DOCUMENT: "/api/sendFile",
}
_PLAN_CACHE = 64


class WahaGateway(HttpGateway):
    """One WAHA server, authenticated with its `X-Api-Key`; instances are WAHA sessions."""

    provider = Provider.WAHA
    supports_history = True
    bulk_states = True
    """`GET /api/sessions?all=true` observes every session in one call."""
    chats_per_page = 50
    """Chats one instance-wide message page reads (WAHA lists messages per chat only)."""
    chats_listing_size = 500
    """Chats per listing call while planning the instance-wide message pages."""

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        """WAHA's key in the `X-Api-Key` header."""
        return {"X-Api-Key": api_key}

    @functools.cached_property
    def _plans(self) -> OrderedDict[tuple[str, int | None, int | None], list[str]]:
        """Chat plans of instance-wide message pages, by (session, since, until), newest used last."""
        return OrderedDict()

    # -- sessions -----------------------------------------------------------------------------------------------

    async def fetch_states(
        self,
        instance_names: Sequence[str],
        *,
        db_statuses: Mapping[str, InstanceStatus | None] | None = None,
        confirm: set[str] | None = None,
    ) -> dict[str, StatusObservation]:
        """One `GET /api/sessions?all=true` for every instance (WAHA's listing is live: nothing to confirm).

        With ``metrics``, `GET /metrics` (`waha_session_status`) comes first: a session it lists takes its status from
        there (``live=True``; no number or push name); the listing is read only for the sessions it does not list,
        or for all when `/metrics` fails.
        """
        started = datetime.now(UTC)
        from_metrics = await self._metric_states(instance_names, started)
        missing = [name for name in instance_names if name not in from_metrics]
        if not missing:
            return from_metrics
        return from_metrics | await self._listed_states(missing, started)

    async def _metric_states(self, instance_names: Sequence[str], started: datetime) -> dict[str, StatusObservation]:
        if self.metrics is None:
            return {}
        read = await read_live_states(
            self,
            self.metrics,
            family="waha_session_status",
            name_label="session",
            state_label="status",
            server_setting="WAHA_PROMETHEUS_ENABLED=true",
            credentials_setting="the gateway's metrics_user/metrics_password (ZAPSYNC_GATEWAYS)",
        )
        self.live_state_error = read.error
        states = read.states or {}
        return {
            name: _observation(name, {"status": states[name]}, started).model_copy(update={"live": True})
            for name in instance_names
            if name in states
        }

    async def _listed_states(self, instance_names: Sequence[str], started: datetime) -> dict[str, StatusObservation]:
        try:
            rows = await self.request_json("GET", "/api/sessions", what="sessions", params={"all": "true"})
            if not isinstance(rows, list):
                raise GatewayRequestError(
                    f"{self.name}: sessions answered an unexpected body", upstream_status=200, gateway=self.name
                )
        except GatewayError as exc:
            return {name: unreachable(name, started, exc) for name in instance_names}
        by_name = {row["name"]: row for row in rows if isinstance(row, dict) and isinstance(row.get("name"), str)}
        result: dict[str, StatusObservation] = {}
        for name in instance_names:
            row = by_name.get(name)
            if row is None:
                result[name] = StatusObservation(
                    instance_name=name,
                    status=InstanceStatus.DISCONNECTED,
                    observed_at=started,
                    reason=MISSING_AT_GATEWAY,
                )
                continue
            result[name] = _observation(name, row, started)
        return result

    async def create_instance(
        self,
        instance_name: str,
        *,
        webhook_url: str | None = None,
        webhook_headers: Mapping[str, str] | None = None,
    ) -> ConnectResult:
        """`POST /api/sessions` started at once, with the webhook (HMAC-signed when a key is given); then its QR."""
        body: dict[str, Any] = {"name": instance_name, "start": True}
        if webhook_url:
            headers = dict(webhook_headers or {})
            hmac_key = headers.pop(HMAC_KEY_HEADER, None) or next(
                (value for key, value in headers.items() if key.lower() == "x-webhook-secret"), None
            )
            hook: dict[str, Any] = {
                "url": webhook_url,
                "events": list(WEBHOOK_EVENTS),
                "customHeaders": [{"name": key, "value": value} for key, value in headers.items()],
            }
            if hmac_key:
                hook["hmac"] = {"key": hmac_key}
            body["config"] = {"webhooks": [hook]}
        created = await self.request_json("POST", "/api/sessions", what="create", json=body) or {}
        return await self._with_qr(instance_name, created.get("status") if isinstance(created, dict) else None)

    async def connect(self, instance_name: str) -> ConnectResult:
        """`POST /api/sessions/{s}/start` (a started session is fine), then the raw QR while one is pending."""
        try:
            started = await self.request_json("POST", f"/api/sessions/{instance_name}/start", what="start") or {}
        except GatewayRequestError as exc:
            if exc.upstream_status != 422:  # 422: already started; read where it stands
                raise
            started = await self.request_json("GET", f"/api/sessions/{instance_name}", what="session") or {}
        return await self._with_qr(instance_name, started.get("status") if isinstance(started, dict) else None)

    async def _with_qr(self, instance_name: str, raw: str | None) -> ConnectResult:
        status = from_waha(raw) or InstanceStatus.CONNECTING
        if (raw or "").upper() != "SCAN_QR_CODE":
            return ConnectResult(instance_name=instance_name, status=status, reason=waha_reason(raw))
        try:
            qr = await self.request_json("GET", f"/api/{instance_name}/auth/qr", what="qr", params={"format": "raw"})
        except GatewayRequestError as exc:
            if exc.upstream_status != 422:  # 422: the session left SCAN_QR_CODE meanwhile
                raise
            return ConnectResult(instance_name=instance_name, status=status, reason="QR code not available yet")
        value = qr.get("value") if isinstance(qr, dict) else None
        return ConnectResult(
            instance_name=instance_name,
            status=InstanceStatus.QR_PENDING,
            qr_code=value if isinstance(value, str) and value else None,
            reason=None if value else "QR code not available yet",
        )

    async def restart(self, instance_name: str) -> None:
        """`POST /api/sessions/{s}/restart`."""
        await self.request_json("POST", f"/api/sessions/{instance_name}/restart", what="restart")

    async def logout(self, instance_name: str) -> None:
        """`POST /api/sessions/{s}/logout`."""
        await self.request_json("POST", f"/api/sessions/{instance_name}/logout", what="logout")

    async def delete_instance(self, instance_name: str) -> None:
        """`DELETE /api/sessions/{s}` (WAHA stops and logs the session out itself); gone already is fine."""
        try:
            await self.request_json("DELETE", f"/api/sessions/{instance_name}", what="delete")
        except GatewayNotFound:
            return

    # -- sending ------------------------------------------------------------------------------------------------

    async def send(self, instance_name: str, message: OutgoingMessage, *, timeout_seconds: float) -> SendResult:
        """`POST /api/sendText` (media: sendImage, sendVideo, sendVoice, sendFile by URL), once."""
        body: dict[str, Any] = {"session": instance_name, "chatId": chat_id_out(message.to)}
        if message.type is OutgoingType.TEXT:
            path = "/api/sendText"
            body["text"] = message.text or ""
        else:
            path = _SEND_PATHS[message.type]
            body["file"] = {
                key: value
                for key, value in (
                    ("url", message.media_url),
                    ("mimetype", message.mime_type),
                    ("filename", message.file_name),
                )
                if value
            }
            if message.text:
                body["caption"] = message.text
        answer = await self._post_once(path, body, timeout_seconds=timeout_seconds, what="send")
        found = _sent_key_id(answer)
        if found is None:
            raise GatewayOutcomeUnknown(f"{self.name}: send answered without a message id", gateway=self.name)
        sent_at = None
        if isinstance(answer, dict) and answer.get("timestamp") is not None:
            try:
                sent_at = datetime.fromtimestamp(epoch_seconds(answer.get("timestamp")), UTC)
            except MalformedMessage:
                sent_at = None
        return SendResult(external_id=found, status="sent", sent_at=sent_at)

    async def _post_once(self, path: str, body: dict[str, Any], *, timeout_seconds: float, what: str) -> Any:
        """One POST, never retried; errors sorted by whether the request may have been taken (``Gateway.send``)."""
        if self.breaker.opened:
            raise GatewayUnavailable(f"{self.name}: circuit breaker is open", gateway=self.name)
        async with self._concurrency:
            client = self._clients[0]
            connect = min(timeout_seconds, client.timeout.connect or timeout_seconds)
            try:
                response = await client.post(path, json=body, timeout=httpx.Timeout(timeout_seconds, connect=connect))
                content = await response.aread()
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise GatewayTransientError(f"{self.name}: {what} could not connect", gateway=self.name) from exc
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                raise GatewayOutcomeUnknown(
                    f"{self.name}: {what} got no answer ({type(exc).__name__}); it may have been sent",
                    gateway=self.name,
                ) from exc
        code = response.status_code
        if code < 300:
            return self.decode(content, what=what)
        text = content[:500].decode(errors="replace")
        message = f"{self.name}: {what} answered HTTP {code}"
        if code in (429, 503):
            raise GatewayTransientError(message, gateway=self.name)
        if code in (401, 403):
            raise GatewayAuthError(message, upstream_status=code, body=text, gateway=self.name)
        if code in (502, 504):  # a proxy gave up waiting: the gateway may have sent it
            raise GatewayOutcomeUnknown(message, gateway=self.name)
        if 400 <= code < 500:
            raise GatewaySendRejected(message, upstream_status=code, body=text, gateway=self.name)
        raise GatewayRequestError(message, upstream_status=code, body=text, gateway=self.name)

    # -- history ------------------------------------------------------------------------------------------------

    async def fetch_contacts(self, instance_name: str, *, page: int, page_size: int) -> list[GatewayContact]:
        """`GET /api/contacts/all?session=&limit=&offset=` (1-based ``page`` of ``page_size``)."""
        rows = await self.request_json(
            "GET",
            "/api/contacts/all",
            what="contacts",
            params={"session": instance_name, "limit": page_size, "offset": (max(page, 1) - 1) * page_size},
        )
        contacts = []
        for row in rows if isinstance(rows, list) else []:
            chat = serialized_id(row.get("id")) if isinstance(row, dict) else None
            if chat is None:
                continue
            name = row.get("name") or row.get("pushname") or row.get("pushName")
            contacts.append(
                GatewayContact(
                    jid=jid_in(chat),
                    name=name if isinstance(name, str) and name else None,
                    kind="group" if row.get("isGroup") or chat.endswith("@g.us") else "contact",
                )
            )
        return contacts

    async def fetch_chats(self, instance_name: str, *, skip: int, take: int) -> list[GatewayChat]:
        """`GET /api/{s}/chats?limit=&offset=&sortBy=messageTimestamp&sortOrder=desc`: most recently active first."""
        rows = await self._chat_rows(instance_name, skip=skip, take=take)
        return [chat for chat in (_chat(row) for row in rows) if chat is not None]

    async def _chat_rows(self, instance_name: str, *, skip: int, take: int) -> list[Any]:
        rows = await self.request_json(
            "GET",
            f"/api/{instance_name}/chats",
            what="chats",
            params={"limit": take, "offset": skip, "sortBy": "messageTimestamp", "sortOrder": "desc"},
        )
        return rows if isinstance(rows, list) else []

    async def fetch_messages(
        self,
        instance_name: str,
        *,
        page: int,
        page_size: int,
        since: datetime | None = None,
        until: datetime | None = None,
        chat_jid: str | None = None,
    ) -> MessagePage:
        """One chat's page (`GET /api/{s}/chats/{chat}/messages`, newest first), or a page of the chat plan."""
        gte = int(since.timestamp()) if since is not None else None
        lte = int(until.timestamp()) if until is not None else None
        if chat_jid is not None:
            messages, skipped = await self._chat_messages(
                instance_name, chat_jid, limit=page_size, offset=(max(page, 1) - 1) * page_size, gte=gte, lte=lte
            )
            seen = len(messages) + skipped
            pages = page + 1 if seen >= page_size else page  # no totals: one more page while pages come full
            return MessagePage(
                messages=messages, page=page, pages=pages, total=(page - 1) * page_size + seen, skipped=skipped
            )
        plan = await self._plan(instance_name, gte, lte)
        pages = max(1, math.ceil(len(plan) / self.chats_per_page))
        chats = plan[(page - 1) * self.chats_per_page : page * self.chats_per_page]
        results = await asyncio.gather(
            *(self._all_chat_messages(instance_name, chat, page_size=page_size, gte=gte, lte=lte) for chat in chats)
        )
        messages = [m for found, _ in results for m in found]
        messages.sort(key=lambda m: m.timestamp, reverse=True)
        return MessagePage(
            messages=messages, page=page, pages=pages, total=len(plan), skipped=sum(s for _, s in results)
        )

    async def _plan(self, instance_name: str, gte: int | None, lte: int | None) -> list[str]:
        """The one-to-one chats with a message since ``gte``, by id (cached per instance and window)."""
        key = (instance_name, gte, lte)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        found: set[str] = set()
        skip = 0
        while True:
            rows = await self._chat_rows(instance_name, skip=skip, take=self.chats_listing_size)
            older = False
            for row in rows:
                chat = _chat(row)
                if chat is None or chat.last_message_at is None:
                    continue
                if gte is not None and chat.last_message_at.timestamp() < gte:
                    older = True  # most recently active first: the rest is older still
                    break
                if chat.kind is ChatKind.CONTACT:
                    found.add(chat_id_out(chat.jid))
            if older or len(rows) < self.chats_listing_size:
                break
            skip += len(rows)
        plan = sorted(found)
        self._plans[key] = plan
        while len(self._plans) > _PLAN_CACHE:
            self._plans.popitem(last=False)
        return plan

    async def _all_chat_messages(
        self, instance_name: str, chat_id: str, *, page_size: int, gte: int | None, lte: int | None
    ) -> tuple[list[GatewayMessage], int]:
        messages: list[GatewayMessage] = []
        skipped = offset = 0
        while True:
            batch, bad = await self._chat_messages(
                instance_name, chat_id, limit=page_size, offset=offset, gte=gte, lte=lte
            )
            messages += batch
            skipped += bad
            offset += len(batch) + bad
            if len(batch) + bad < page_size:
                return messages, skipped

    async def _chat_messages(
        self, instance_name: str, chat_id: str, *, limit: int, offset: int, gte: int | None, lte: int | None
    ) -> tuple[list[GatewayMessage], int]:
        params: dict[str, Any] = {"limit": limit, "offset": offset, "downloadMedia": "false"}
        if gte is not None:
            params["filter.timestamp.gte"] = gte
        if lte is not None:
            params["filter.timestamp.lte"] = lte
        rows = await self.request_json(
            "GET", f"/api/{instance_name}/chats/{chat_id_out(chat_id)}/messages", what="messages", params=params
        )
        messages: list[GatewayMessage] = []
        skipped = 0
        for row in rows if isinstance(rows, list) else []:
            try:
                messages.append(from_waha_message(row if isinstance(row, dict) else {}))
            except MalformedMessage:  # one bad record must not block an import
                skipped += 1
        return messages, skipped


def _observation(name: str, row: Mapping[str, Any], observed_at: datetime) -> StatusObservation:
    raw = row.get("status")
    status = from_waha(raw if isinstance(raw, str) else None)
    raw_me = row.get("me")
    me: Mapping[str, Any] = raw_me if isinstance(raw_me, dict) else {}
    if status is None:
        return StatusObservation(
            instance_name=name,
            status=InstanceStatus.ERROR,
            observed_at=observed_at,
            reason=f"unknown session status {raw!r}",
        )
    return StatusObservation(
        instance_name=name,
        status=status,
        observed_at=observed_at,
        reason=None if status is InstanceStatus.CONNECTED else waha_reason(raw) or f"session status {raw}",
        phone_number=phone_from_jid(me.get("id")) if isinstance(me.get("id"), str) else None,
        profile_name=me.get("pushName") if isinstance(me.get("pushName"), str) else None,
    )


def _chat(row: Any) -> GatewayChat | None:
    """A chats-listing row (NOWEB `conversationTimestamp`, WEBJS `timestamp` and `lastMessage`)."""
    if not isinstance(row, dict):
        return None
    chat_id = serialized_id(row.get("id"))
    if chat_id is None:
        return None
    jid = jid_in(chat_id)
    last: GatewayMessage | None = None
    if isinstance(row.get("lastMessage"), dict):
        try:
            last = from_waha_message(row["lastMessage"])
        except MalformedMessage:
            last = None
    stamp = row.get("conversationTimestamp") or row.get("timestamp")
    last_at: datetime | None = last.sent_at if last is not None else None
    if last_at is None and stamp:
        try:
            last_at = datetime.fromtimestamp(epoch_seconds(stamp), UTC)
        except MalformedMessage:
            last_at = None
    unread = row.get("unreadCount")
    name = row.get("name")
    return GatewayChat(
        jid=jid,
        name=name if isinstance(name, str) and name and chat_kind(jid) is not ChatKind.BROADCAST else None,
        last_message_at=last_at,
        last_from_me=last.from_me if last is not None else None,
        last_preview=(last.content or f"[{last.type}]") if last is not None else None,
        unread=unread if isinstance(unread, int) and not isinstance(unread, bool) else None,
    )


def _sent_key_id(answer: Any) -> str | None:
    """The key id of a sent message: NOWEB answers `{key: {id}}`, WEBJS `{id: {_serialized, id}}` or `{id}`."""
    if not isinstance(answer, dict):
        return None
    key = answer.get("key")
    if isinstance(key, dict) and isinstance(key.get("id"), str) and key["id"]:
        return str(key["id"])
    found = answer.get("id")
    if isinstance(found, dict) and isinstance(found.get("id"), str) and found["id"]:
        return str(found["id"])
    serialized = serialized_id(found)
    return key_id(serialized) if serialized else None
