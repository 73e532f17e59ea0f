"""Evolution API v2 client (gateways.md §1): bulk status from fetchInstances, live confirmation where it lags."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import BaseModel, TypeAdapter

from gateways.base import (
    ConnectResult,
    GatewayError,
    GatewayNotFound,
    GatewayRequestError,
    InstanceStatus,
    Provider,
    StatusObservation,
)
from gateways.http import HttpGateway
from gateways.resilience import BreakerPolicy, RetryPolicy
from gateways.status import LOGGED_OUT_CODES, from_evolution, phone_from_jid

MISSING_AT_GATEWAY = "instance not found at the gateway"


class EvolutionGateway(HttpGateway):
    """One Evolution API v2 server, authenticated with its global `apikey`."""

    provider = Provider.EVOLUTION

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str,
        timeout: httpx.Timeout,
        max_concurrency: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        super().__init__(
            name=name, base_url=base_url, headers={"apikey": api_key}, timeout=timeout,
            max_concurrency=max_concurrency, transport=transport, retry=retry, breaker=breaker,
        )

    async def fetch_states(
        self,
        instance_names: Sequence[str],
        *,
        db_statuses: Mapping[str, InstanceStatus | None] | None = None,
        confirm: set[str] | None = None,
    ) -> dict[str, StatusObservation]:
        """One fetchInstances call for all; `connectionState` for those whose lagging `open` needs confirming."""
        started = datetime.now(UTC)
        try:
            content = await self.request_bytes("GET", "/instance/fetchInstances", what="fetchInstances")
            rows: list[FetchedInstance] = self.decode(content, what="fetchInstances", adapter=_FETCHED)
        except GatewayError as exc:
            return {name: _unreachable(name, started, exc) for name in instance_names}
        del content
        by_name = {row.name: row for row in rows}
        db_statuses = db_statuses or {}
        confirm = confirm or set()
        result: dict[str, StatusObservation] = {}
        to_confirm: list[str] = []
        for name in instance_names:
            row = by_name.get(name)
            if row is None:
                result[name] = StatusObservation(
                    instance_name=name, status=InstanceStatus.DISCONNECTED, observed_at=started,
                    reason=MISSING_AT_GATEWAY,
                )
                continue
            observation = _from_row(name, row, started)
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

    async def _live_state(self, bulk: StatusObservation) -> StatusObservation:
        name = bulk.instance_name
        started = datetime.now(UTC)
        try:
            body = await self.request_json(
                "GET", f"/instance/connectionState/{name}", what="connectionState"
            )
        except GatewayNotFound:
            return StatusObservation(
                instance_name=name, status=InstanceStatus.DISCONNECTED, observed_at=started,
                reason="instance not loaded at the gateway",
            )
        except GatewayError as exc:
            return _unreachable(name, started, exc)
        state = ((body or {}).get("instance") or {}).get("state")
        status = from_evolution(state)
        if status is None:
            return _unreachable(name, started, GatewayError(f"{self.name}: unknown state {state!r}"))
        return bulk.model_copy(update={
            "status": status, "observed_at": started,
            "reason": None if status is InstanceStatus.CONNECTED else f"live state {state}",
        })

    async def create_instance(
        self, instance_name: str, *, webhook_url: str | None = None,
        webhook_headers: Mapping[str, str] | None = None,
    ) -> ConnectResult:
        """POST /instance/create with a QR code; subscribes the webhook when a URL is given."""
        body: dict[str, Any] = {
            "instanceName": instance_name, "integration": "WHATSAPP-BAILEYS", "qrcode": True,
        }
        if webhook_url:
            body["webhook"] = {
                "url": webhook_url, "byEvents": False, "base64": False,
                "headers": dict(webhook_headers or {}),
                "events": ["CONNECTION_UPDATE", "QRCODE_UPDATED", "MESSAGES_UPSERT", "MESSAGES_UPDATE",
                           "MESSAGES_DELETE", "SEND_MESSAGE", "CONTACTS_UPSERT", "CHATS_UPSERT"],
            }
        created = await self.request_json("POST", "/instance/create", what="create", json=body)
        qrcode = (created or {}).get("qrcode") or {}
        state = ((created or {}).get("instance") or {}).get("status")
        status = from_evolution(state, qr_emitted=bool(qrcode.get("base64"))) or InstanceStatus.DISCONNECTED
        return ConnectResult(
            instance_name=instance_name, status=status,
            qr_code=qrcode.get("base64"), pairing_code=qrcode.get("pairingCode"),
        )

    async def connect(self, instance_name: str) -> ConnectResult:
        """GET /instance/connect: the QR code, or the live state when already open."""
        body = await self.request_json("GET", f"/instance/connect/{instance_name}", what="connect") or {}
        _raise_for_error_body(self.name, "connect", body)
        if "instance" in body:
            status = from_evolution((body["instance"] or {}).get("state")) or InstanceStatus.DISCONNECTED
            return ConnectResult(instance_name=instance_name, status=status)
        qr = body.get("base64")
        return ConnectResult(
            instance_name=instance_name,
            status=InstanceStatus.QR_PENDING if qr else InstanceStatus.CONNECTING,
            qr_code=qr, pairing_code=body.get("pairingCode"),
        )

    async def restart(self, instance_name: str) -> None:
        """POST /instance/restart (Evolution answers HTTP 200 with `error: true` when it cannot)."""
        body = await self.request_json("POST", f"/instance/restart/{instance_name}", what="restart")
        _raise_for_error_body(self.name, "restart", body or {})

    async def logout(self, instance_name: str) -> None:
        """DELETE /instance/logout."""
        await self.request_json("DELETE", f"/instance/logout/{instance_name}", what="logout")


def _raise_for_error_body(gateway: str, what: str, body: Any) -> None:
    if isinstance(body, dict) and body.get("error") is True:
        raise GatewayRequestError(
            f"{gateway}: {what} refused: {str(body.get('message'))[:200]}", status_code=200, gateway=gateway
        )


class FetchedInstance(BaseModel):
    """The fields of a `fetchInstances` row that status sync reads (the rest is never materialised)."""

    name: str
    connectionStatus: str | None = None
    ownerJid: str | None = None
    profileName: str | None = None
    disconnectionReasonCode: int | None = None


_FETCHED = TypeAdapter(list[FetchedInstance])


def _from_row(name: str, row: FetchedInstance, observed_at: datetime) -> StatusObservation:
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
    return StatusObservation(
        instance_name=name, status=status, observed_at=observed_at, reason=reason,
        phone_number=phone_from_jid(row.ownerJid), profile_name=row.profileName,
        logged_out=logged_out,
    )


def _unreachable(name: str, observed_at: datetime, exc: GatewayError) -> StatusObservation:
    return StatusObservation(instance_name=name, status=None, observed_at=observed_at, error=exc.message)
