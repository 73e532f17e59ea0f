"""Evolution API v2 client (gateways.md §1): bulk status from fetchInstances, live confirmation where it lags."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NotRequired

import msgspec
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from core.domain import (
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
)
from core.errors import (
    GatewayError,
    GatewayInstanceExists,
    GatewayNotFound,
    GatewayRequestError,
)
from core.phones import phone_from_jid
from gateways.base import unreachable
from gateways.http import HttpGateway
from gateways.json_stream import ArrayStreamDecoder
from gateways.messages import MalformedMessage, from_baileys
from gateways.prometheus import LiveRead, read_live_states
from gateways.sending import raise_for_send_status, recipient_number, send_result
from gateways.status import LOGGED_OUT_CODES, from_evolution

MISSING_AT_GATEWAY = "instance not found at the gateway"
WEBHOOK_EVENTS = (
    "CONNECTION_UPDATE",
    "QRCODE_UPDATED",
    "LOGOUT_INSTANCE",
    "INSTANCE_DELETE",
    "REMOVE_INSTANCE",
    "MESSAGES_SET",
    "MESSAGES_UPSERT",
    "MESSAGES_UPDATE",
    "MESSAGES_DELETE",
    "SEND_MESSAGE",
    "SEND_MESSAGE_UPDATE",
    "CONTACTS_UPSERT",
    "CONTACTS_UPDATE",
    "CHATS_UPSERT",
)
"""What zapsync subscribes an instance it creates to (gateways.md §2.2): the events it applies or stores."""


class EvolutionGateway(HttpGateway):
    """One Evolution API v2 server, authenticated with its global `apikey`."""

    provider = Provider.EVOLUTION
    supports_history = True
    bulk_states = True
    """One listing call observes every instance (observed in one task, not in batches)."""

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        """Evolution's global key in the `apikey` header."""
        return {"apikey": api_key}

    async def fetch_states(
        self,
        instance_names: Sequence[str],
        *,
        db_statuses: Mapping[str, InstanceStatus | None] | None = None,
        confirm: set[str] | None = None,
    ) -> dict[str, StatusObservation]:
        """One fetchInstances call for all; `connectionState` for those whose lagging `open` needs confirming.

        With ``metrics``, `GET /metrics` is read alongside: an instance it lists takes its live state from there
        (``live=True``, nothing to confirm); one it does not list (not loaded in memory) keeps its column, confirmed
        as without metrics. When `/metrics` fails, every instance is handled as without metrics. The listing is
        decoded as it streams in (never held whole: it is ~1 kB per instance).
        """
        started = datetime.now(UTC)
        live_read = asyncio.ensure_future(self._read_metrics())
        try:
            rows = await self._fetch_rows()
        except GatewayError as exc:
            live = (await live_read).states or {}
            return {
                name: _from_live(name, live[name], started) if name in live else _unreachable(name, started, exc)
                for name in instance_names
            }
        except BaseException:
            live_read.cancel()
            raise
        live = (await live_read).states or {}
        db_statuses = db_statuses or {}
        by_name = {row.name: row for row in rows}
        confirm = confirm or set()
        result: dict[str, StatusObservation] = {}
        to_confirm: list[str] = []
        for name in instance_names:
            row = by_name.get(name)
            state = live.get(name)
            if row is None:
                result[name] = (
                    _from_live(name, state, started)
                    if state is not None
                    else StatusObservation(
                        instance_name=name,
                        status=InstanceStatus.DISCONNECTED,
                        observed_at=started,
                        reason=MISSING_AT_GATEWAY,
                    )
                )
                continue
            observation = _from_row(name, row, started, live_state=state)
            if state is not None:
                result[name] = observation
                continue
            result[name] = observation
            # The column is written on open, QR and non-reconnectable close only: just `open` can be stale.
            if observation.status is InstanceStatus.CONNECTED and (
                db_statuses.get(name) is not InstanceStatus.CONNECTED or name in confirm
            ):
                to_confirm.append(name)
        if to_confirm:
            confirmed = await asyncio.gather(*(self._live_state(result[name]) for name in to_confirm))
            result.update({obs.instance_name: obs for obs in confirmed})
        return result

    async def _read_metrics(self) -> LiveRead:
        """Every loaded instance's live state from `/metrics` (known states only), or why not."""
        if self.metrics is None:
            return LiveRead(None)
        read = await read_live_states(
            self,
            self.metrics,
            family="evolution_instance_state",
            name_label="instance",
            state_label="state",
            server_setting="PROMETHEUS_METRICS=true",
            credentials_setting=(
                "metrics_user/metrics_password (EVOLUTION_METRICS_USER/EVOLUTION_METRICS_PASSWORD, or the gateway's "
                "entry in ZAPSYNC_GATEWAYS) against the gateway's METRICS_USER/METRICS_PASSWORD"
            ),
        )
        self.live_state_error = read.error
        if read.states is None:
            return read
        # `unknown` (no state in memory yet) tells nothing: such an instance is handled as one not listed.
        return LiveRead({name: state for name, state in read.states.items() if state in _LIVE_STATES})

    async def list_instance_names(self) -> list[str]:
        """Every instance this gateway has (one fetchInstances call), for adopting untracked ones."""
        return [row.name for row in await self._fetch_rows()]

    async def _fetch_rows(self) -> list[FetchedRow]:
        """Every fetchInstances row, decoded as the body streams in."""
        decoder = await self.request_stream(
            "GET",
            "/instance/fetchInstances",
            what="fetchInstances",
            sink=lambda: ArrayStreamDecoder(_FETCHED_DECODER),
        )
        try:
            return decoder.finish()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise GatewayRequestError(
                f"{self.name}: fetchInstances answered an unexpected body",
                upstream_status=200,
                body=bytes(decoder.head).decode(errors="replace"),
                gateway=self.name,
            ) from exc

    async def _live_state(self, bulk: StatusObservation) -> StatusObservation:
        name = bulk.instance_name
        started = datetime.now(UTC)
        try:
            body = await self.request_json("GET", f"/instance/connectionState/{name}", what="connectionState")
        except GatewayNotFound:
            return StatusObservation(
                instance_name=name,
                status=InstanceStatus.DISCONNECTED,
                observed_at=started,
                reason="instance not loaded at the gateway",
            )
        except GatewayError as exc:
            return _unreachable(name, started, exc)
        state = ((body or {}).get("instance") or {}).get("state")
        status = from_evolution(state)
        if status is None:
            return _unreachable(name, started, GatewayError(f"{self.name}: unknown state {state!r}"))
        return bulk.model_copy(
            update={
                "status": status,
                "observed_at": started,
                "reason": None if status is InstanceStatus.CONNECTED else f"live state {state}",
            }
        )

    async def create_instance(
        self,
        instance_name: str,
        *,
        webhook_url: str | None = None,
        webhook_headers: Mapping[str, str] | None = None,
    ) -> ConnectResult:
        """POST /instance/create with a QR code; subscribes the webhook (the events zapsync handles) when a URL is
        given. A name already in use raises :class:`GatewayInstanceExists` (Evolution answers 403 for it)."""
        body: dict[str, Any] = {
            "instanceName": instance_name,
            "integration": "WHATSAPP-BAILEYS",
            "qrcode": True,
        }
        if webhook_url:
            body["webhook"] = {
                "url": webhook_url,
                "byEvents": False,
                "base64": False,
                "headers": dict(webhook_headers or {}),
                "events": list(WEBHOOK_EVENTS),
            }
        try:
            created = await self.request_json("POST", "/instance/create", what="create", json=body)
        except GatewayRequestError as exc:
            if exc.upstream_status in (403, 409) and "already in use" in exc.body:
                raise GatewayInstanceExists(
                    f"{self.name}: instance {instance_name!r} already exists",
                    upstream_status=exc.upstream_status,
                    body=exc.body,
                    gateway=self.name,
                ) from exc
            raise
        qrcode = (created or {}).get("qrcode") or {}
        state = ((created or {}).get("instance") or {}).get("status")
        code = qrcode.get("code") or None
        status = from_evolution(state, qr_emitted=bool(code)) or InstanceStatus.DISCONNECTED
        return ConnectResult(
            instance_name=instance_name,
            status=status,
            qr_code=code,
            pairing_code=qrcode.get("pairingCode") or None,
        )

    async def connect(self, instance_name: str) -> ConnectResult:
        """GET /instance/connect: the raw QR code (and pairing code), or the live state when already open.

        ``{"count": 0}`` (the socket started, no QR code yet) is ``connecting``; the QR arrives by webhook.
        """
        body = await self.request_json("GET", f"/instance/connect/{instance_name}", what="connect") or {}
        _raise_for_error_body(self.name, "connect", body)
        if "instance" in body:
            state = (body["instance"] or {}).get("state")
            status = from_evolution(state) or InstanceStatus.DISCONNECTED
            reason = "QR code limit reached: ask for a new QR code" if state == "refused" else None
            return ConnectResult(instance_name=instance_name, status=status, reason=reason)
        code = body.get("code") or None
        return ConnectResult(
            instance_name=instance_name,
            status=InstanceStatus.QR_PENDING if code else InstanceStatus.CONNECTING,
            qr_code=code,
            pairing_code=body.get("pairingCode") or None,
            reason=None if code else "waiting for the gateway's QR code",
        )

    async def restart(self, instance_name: str) -> None:
        """POST /instance/restart (Evolution answers HTTP 200 with `error: true` when it cannot)."""
        body = await self.request_json("POST", f"/instance/restart/{instance_name}", what="restart")
        _raise_for_error_body(self.name, "restart", body or {})

    async def delete_instance(self, instance_name: str) -> None:
        """DELETE /instance/delete (Evolution logs an open session out first); 404 raises GatewayNotFound."""
        await self.request_json("DELETE", f"/instance/delete/{instance_name}", what="delete")

    async def send(self, instance_name: str, message: OutgoingMessage, *, timeout_seconds: float) -> SendResult:
        """`POST /message/sendText` (`{number, text}`) or `/message/sendMedia` (media by URL), once: 201 answers the
        stored message object, whose `key.id` is the external id (see :mod:`gateways.sending` for the errors)."""
        number = recipient_number(message)
        if message.type is OutgoingType.TEXT:
            path, what = f"/message/sendText/{instance_name}", "sendText"
            body: dict[str, Any] = {"number": number, "text": message.text or ""}
        else:
            path, what = f"/message/sendMedia/{instance_name}", "sendMedia"
            body = {"number": number, "mediatype": str(message.type), "media": message.media_url}
            if message.mime_type:
                body["mimetype"] = message.mime_type
            if message.text:
                body["caption"] = message.text
            if message.file_name:
                body["fileName"] = message.file_name
        status, content = await self.request_once("POST", path, what=what, json=body, timeout_seconds=timeout_seconds)
        record = raise_for_send_status(self.name, what, status, content)
        return send_result(self.name, what, record)

    async def logout(self, instance_name: str) -> None:
        """DELETE /instance/logout."""
        await self.request_json("DELETE", f"/instance/logout/{instance_name}", what="logout")

    async def fetch_contacts(self, instance_name: str, *, page: int, page_size: int) -> list[GatewayContact]:
        """`POST /chat/findContacts` with `page` (1-based) and `offset` (the page size, gateways.md §1.3)."""
        content = await self.request_bytes(
            "POST",
            f"/chat/findContacts/{instance_name}",
            what="findContacts",
            json={"where": {}, "page": page, "offset": page_size},
        )
        rows: list[ContactRow] = self.decode(content, what="findContacts", adapter=_CONTACTS)
        return [
            GatewayContact(
                jid=row["remoteJid"],
                name=row.get("pushName") or None,
                kind=row.get("type") or ("group" if row.get("isGroup") else "contact"),
            )
            for row in rows
            if row.get("remoteJid")
        ]

    async def fetch_chats(self, instance_name: str, *, skip: int, take: int) -> list[GatewayChat]:
        """`POST /chat/findChats` with `take`/`skip`, most recently active first (no totals)."""
        content = await self.request_bytes(
            "POST",
            f"/chat/findChats/{instance_name}",
            what="findChats",
            json={"where": {}, "take": take, "skip": skip},
        )
        rows: list[ChatRow] = self.decode(content, what="findChats", adapter=_CHATS)
        return [_chat(row) for row in rows if row.get("remoteJid")]

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
        """`POST /chat/findMessages`: `page` (1-based) and `offset` (page size), newest first.

        Evolution applies a time filter only when both bounds are given, so a missing bound is sent open-ended.
        The body is parsed with orjson and only its envelope with pydantic (records are checked field by field as
        they are normalized; a record that is not a message is dropped and counted).
        """
        where: dict[str, Any] = {}
        if chat_jid:
            where["key"] = {"remoteJid": chat_jid}
        if since is not None or until is not None:
            where["messageTimestamp"] = {"gte": _iso(since or _EPOCH), "lte": _iso(until or _FAR_FUTURE)}
        content = await self.request_bytes(
            "POST",
            f"/chat/findMessages/{instance_name}",
            what="findMessages",
            json={"where": where, "page": page, "offset": page_size},
        )
        body = self.decode(content, what="findMessages")
        try:
            block: MessagesBlock = _BLOCK.validate_python((body or {}).get("messages"))
        except (ValidationError, AttributeError) as exc:
            raise GatewayRequestError(
                f"{self.name}: findMessages answered an unexpected body",
                upstream_status=200,
                body=content[:200].decode(errors="replace"),
                gateway=self.name,
            ) from exc
        messages: list[GatewayMessage] = []
        skipped = 0
        for record in block["records"]:
            try:
                messages.append(from_baileys(record if isinstance(record, dict) else {}))
            except MalformedMessage:  # one bad record must not block an import
                skipped += 1
        return MessagePage(
            messages=messages, page=block["currentPage"], pages=block["pages"], total=block["total"], skipped=skipped
        )


def _raise_for_error_body(gateway: str, what: str, body: Any) -> None:
    if isinstance(body, dict) and body.get("error") is True:
        raise GatewayRequestError(
            f"{gateway}: {what} refused: {str(body.get('message'))[:200]}", upstream_status=200, gateway=gateway
        )


class ContactRow(TypedDict):
    """A `findContacts` row (the fields imports read)."""

    remoteJid: str
    pushName: NotRequired[str | None]
    isGroup: NotRequired[bool | None]
    type: NotRequired[str | None]


class ChatRow(TypedDict):
    """A `findChats` row: v2.3 rows carry `pushName` and `lastMessage`; older Chat-table rows carry `name`."""

    remoteJid: str
    pushName: NotRequired[str | None]
    name: NotRequired[str | None]
    unreadCount: NotRequired[int | None]
    updatedAt: NotRequired[str | None]
    lastMessage: NotRequired[Any]
    """Validated on its own: a malformed last message must not hide the chat."""


class MessagesBlock(TypedDict):
    """`findMessages`' `messages` object (records are normalized one by one, see ``gateways.messages``)."""

    total: int
    pages: int
    currentPage: int
    records: list[Any]


_CONTACTS = TypeAdapter(list[ContactRow])
_CHATS = TypeAdapter(list[ChatRow])
_BLOCK = TypeAdapter(MessagesBlock)
_EPOCH = datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
_FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


def _iso(moment: datetime) -> str:
    """JavaScript's ISO form, which Evolution's `new Date(...)` parses."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _chat(row: ChatRow) -> GatewayChat:
    last = row.get("lastMessage")
    message: GatewayMessage | None = None
    if last:
        try:
            message = from_baileys(last) if isinstance(last, dict) else None
        except MalformedMessage:
            message = None
    alt = message.alt_jid if message is not None and message.chat_jid == row["remoteJid"] else None
    return GatewayChat(
        jid=row["remoteJid"],
        alt_jid=alt,
        name=row.get("pushName") or row.get("name") or None,
        last_message_at=message.sent_at if message is not None else None,
        last_from_me=message.from_me if message is not None else None,
        last_preview=(message.content or f"[{message.type}]") if message is not None else None,
        unread=row.get("unreadCount"),
    )


def _from_row(name: str, row: FetchedRow, observed_at: datetime, *, live_state: str | None = None) -> StatusObservation:
    """A fetchInstances row's observation, corrected by the live state from `/metrics` when one is given.

    Live `connecting` while the column says a QR code is pending stays ``qr_pending`` (Evolution shows a QR wait as
    `connecting` in memory); a live state that agrees with the column keeps the column's reason (a logout's code).
    One model is built per row (its construction is most of the listing's cost at 100k instances).
    """
    state = row.connectionStatus
    code = row.disconnectionReasonCode
    logged_out = state == "close" and isinstance(code, int) and code in LOGGED_OUT_CODES
    status = from_evolution(state, qr_emitted=True)
    reason = None
    if status is None:
        status, reason = InstanceStatus.ERROR, f"unknown connectionStatus {state!r}"
    elif logged_out:
        reason = f"logged out (code {code})"
    elif status is not InstanceStatus.CONNECTED and code is not None:
        reason = f"closed (code {code})"
    if live_state is not None:
        live = from_evolution(live_state) or InstanceStatus.ERROR
        if live is InstanceStatus.CONNECTING and status is InstanceStatus.QR_PENDING:
            live = InstanceStatus.QR_PENDING
        if live is not status:
            status = live
            reason = None if live is InstanceStatus.CONNECTED else f"live state {live_state}"
            logged_out = logged_out and live is not InstanceStatus.CONNECTED
    return StatusObservation(
        instance_name=name,
        status=status,
        observed_at=observed_at,
        reason=reason,
        phone_number=phone_from_jid(row.ownerJid),
        profile_name=row.profileName,
        logged_out=logged_out,
        live=live_state is not None,
    )


_LIVE_STATES = frozenset({"open", "connecting", "close"})
"""The states of `evolution_instance_state` that say something (`unknown` does not; `refused` never appears)."""


def _from_live(name: str, state: str, observed_at: datetime) -> StatusObservation:
    """An instance known only from `/metrics` (no fetchInstances row: no number, no close code)."""
    status = from_evolution(state) or InstanceStatus.ERROR
    return StatusObservation(
        instance_name=name,
        status=status,
        observed_at=observed_at,
        reason=None if status is InstanceStatus.CONNECTED else f"live state {state}",
        live=True,
    )


def _unreachable(name: str, observed_at: datetime, exc: GatewayError) -> StatusObservation:
    return unreachable(name, observed_at, exc)


class FetchedRow(msgspec.Struct):
    """The fields of a `fetchInstances` row status sync reads; msgspec skips the rest without building it.

    A 100k-instance listing is ~100 MB of JSON: decoding only these fields keeps the sync's memory near its floor.
    """

    name: str
    connectionStatus: str | None = None
    ownerJid: str | None = None
    profileName: str | None = None
    disconnectionReasonCode: int | None = None


_FETCHED_DECODER = msgspec.json.Decoder(list[FetchedRow])


def _decode_fetched(gateway: str, content: bytes) -> list[FetchedRow]:
    try:
        return _FETCHED_DECODER.decode(content)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise GatewayRequestError(
            f"{gateway}: fetchInstances answered an unexpected body",
            upstream_status=200,
            body=content[:200].decode(errors="replace"),
            gateway=gateway,
        ) from exc
