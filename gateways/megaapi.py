"""MegaAPI client (gateways.md §4): one status call per instance, with bounded concurrency.

MegaAPI documents no API to read chat history (chats, contacts or stored messages): the read methods raise
:class:`GatewayNotSupported`, and its messages reach zapsync through webhooks only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import urlencode

from core.domain import (
    ConnectResult,
    GatewayChat,
    GatewayContact,
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
    GatewayNotSupported,
    GatewayRequestError,
    GatewaySendRejected,
)
from core.phones import phone_from_jid
from gateways.base import unreachable
from gateways.http import HttpGateway
from gateways.sending import raise_for_send_status, recipient_number, send_result
from gateways.status import from_megaapi


class MegaApiGateway(HttpGateway):
    """One MegaAPI host, authenticated with `Authorization: Bearer <token>`; instances are `instance_key`s."""

    provider = Provider.MEGAAPI
    supports_history = False
    bulk_states = False
    """One listing call observes every instance (observed in one task, not in batches)."""

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        """MegaAPI's token as a bearer token."""
        return {"Authorization": f"Bearer {api_key}"}

    async def fetch_states(
        self,
        instance_names: Sequence[str],
        *,
        db_statuses: Mapping[str, InstanceStatus | None] | None = None,
        confirm: set[str] | None = None,
    ) -> dict[str, StatusObservation]:
        """`GET /rest/instance/{key}` for every instance, at most ``max_concurrency`` at a time."""
        observations = await asyncio.gather(*(self._status(name) for name in instance_names))
        return {obs.instance_name: obs for obs in observations}

    async def _status(self, name: str) -> StatusObservation:
        started = datetime.now(UTC)
        try:
            body = await self.request_json("GET", f"/rest/instance/{name}", what="instance status")
        except GatewayNotFound:
            return StatusObservation(
                instance_name=name,
                status=InstanceStatus.DISCONNECTED,
                observed_at=started,
                reason="instance not found at the gateway",
            )
        except GatewayError as exc:
            return unreachable(name, started, exc)
        instance = (body or {}).get("instance") or {}
        raw = instance.get("status")
        user = instance.get("user") or {}
        status = from_megaapi(raw)
        return StatusObservation(
            instance_name=name,
            status=status,
            observed_at=started,
            reason=None if status is InstanceStatus.CONNECTED else f"gateway status {raw}",
            phone_number=phone_from_jid(user.get("id")),
            profile_name=user.get("name"),
        )

    async def create_instance(
        self,
        instance_name: str,
        *,
        webhook_url: str | None = None,
        webhook_headers: Mapping[str, str] | None = None,
    ) -> ConnectResult:
        """Unverified: `POST /rest/instance/init?instance_key=<name>` (one third-party client's call, gateways.md §8.5),
        then `POST /rest/webhook/{key}/configWebhook`. MegaAPI sends no custom headers, so an `X-Webhook-Secret`
        header travels as the URL's `?secret=` instead. Then the QR code, as MegaAPI gives it (an image)."""
        try:
            body = await self.request_json(
                "POST", "/rest/instance/init", what="create", params={"instance_key": instance_name}
            )
        except GatewayRequestError as exc:
            if "exist" in exc.body.lower():
                raise GatewayInstanceExists(
                    f"{self.name}: instance {instance_name!r} already exists",
                    upstream_status=exc.upstream_status,
                    body=exc.body,
                    gateway=self.name,
                ) from exc
            raise
        if isinstance(body, dict) and body.get("error") is True:
            message = str(body.get("message"))[:200]
            error = GatewayInstanceExists if "exist" in message.lower() else GatewayRequestError
            raise error(f"{self.name}: create refused: {message}", upstream_status=200, gateway=self.name)
        if webhook_url:
            secret = (webhook_headers or {}).get("X-Webhook-Secret")
            url = f"{webhook_url}?{urlencode({'secret': secret})}" if secret else webhook_url
            await self.request_json(
                "POST",
                f"/rest/webhook/{instance_name}/configWebhook",
                what="configWebhook",
                json={"messageData": {"webhookUrl": url, "webhookEnabled": True}},
            )
        return await self.connect(instance_name)

    async def connect(self, instance_name: str) -> ConnectResult:
        """The QR code as MegaAPI gives it, a PNG data URL (`GET /rest/instance/qrcode_base64/{key}`)."""
        body = await self.request_json("GET", f"/rest/instance/qrcode_base64/{instance_name}", what="qrcode") or {}
        qr = body.get("qrcode")
        if not qr and "connected" in str(body.get("message", "")).lower():
            return ConnectResult(instance_name=instance_name, status=InstanceStatus.CONNECTED)
        return ConnectResult(
            instance_name=instance_name,
            status=InstanceStatus.QR_PENDING if qr else InstanceStatus.CONNECTING,
            qr_code=qr,
        )

    async def restart(self, instance_name: str) -> None:
        """`DELETE /rest/instance/{key}/restart`."""
        await self.request_json("DELETE", f"/rest/instance/{instance_name}/restart", what="restart")

    async def delete_instance(self, instance_name: str) -> None:
        """Not available: MegaAPI documents no API to delete an instance."""
        raise GatewayNotSupported(
            f"{self.name}: MegaAPI documents no API to delete an instance; delete it in the MegaAPI panel",
            gateway=self.name,
        )

    async def send(self, instance_name: str, message: OutgoingMessage, *, timeout_seconds: float) -> SendResult:
        """`POST /rest/sendMessage/{key}/text` (`{"messageData": {"to", "text"}}`, gateways.md §8.5), once.

        Media goes to `/rest/sendMessage/{key}/mediaUrl` (`{"messageData": {"to", "url", "type", "caption",
        "fileName"}}`): that route and the answer's shape (a message object, bare or under `data`, with `key.id`)
        are unverified — no stored source shows them.
        """
        to = recipient_number(message)
        if message.type is OutgoingType.TEXT:
            path, what = f"/rest/sendMessage/{instance_name}/text", "sendMessage text"
            data: dict[str, Any] = {"to": to, "text": message.text or ""}
        else:
            path, what = f"/rest/sendMessage/{instance_name}/mediaUrl", "sendMessage mediaUrl"
            data = {"to": to, "url": message.media_url, "type": str(message.type)}
            if message.text:
                data["caption"] = message.text
            if message.file_name:
                data["fileName"] = message.file_name
        status, content = await self.request_once(
            "POST", path, what=what, json={"messageData": data}, timeout_seconds=timeout_seconds
        )
        body = raise_for_send_status(self.name, what, status, content)
        if isinstance(body, dict) and body.get("error") is True:
            raise GatewaySendRejected(
                f"{self.name}: {what} refused: {str(body.get('message'))[:200]}",
                upstream_status=status,
                body=content.decode(errors="replace"),
                gateway=self.name,
            )
        record = body.get("data") if isinstance(body, dict) and isinstance(body.get("data"), dict) else body
        return send_result(self.name, what, record)

    async def logout(self, instance_name: str) -> None:
        """`DELETE /rest/instance/{key}/logout`."""
        await self.request_json("DELETE", f"/rest/instance/{instance_name}/logout", what="logout")

    async def fetch_contacts(self, instance_name: str, *, page: int, page_size: int) -> list[GatewayContact]:
        """Not available: MegaAPI has no documented contacts listing."""
        self._no_history("contacts")

    async def fetch_chats(self, instance_name: str, *, skip: int, take: int) -> list[GatewayChat]:
        """Not available: MegaAPI has no documented chats listing."""
        self._no_history("chats")

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
        """Not available: MegaAPI has no documented message history."""
        self._no_history("message history")

    def _no_history(self, what: str) -> NoReturn:
        raise GatewayNotSupported(
            f"{self.name}: MegaAPI has no API to read {what}; its messages arrive by webhook only",
            gateway=self.name,
        )
