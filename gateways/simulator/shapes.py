"""Wire shapes of Evolution API v2 and MegaAPI built from simulator state (gateways.md §1.3, §2.1–2.3, §4).

Plain dicts, ready for ``orjson.dumps``; timestamps are Prisma-style ISO strings (``2025-10-21T11:40:39.123Z``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from gateways.simulator.state import NON_RECONNECTABLE_CODES, QrCode, QrEmitted, SimInstance, StateChange

QR_LIMIT_MESSAGE = "QR code limit reached, please login again"
_HTTP_ERRORS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_DEFAULT_SETTINGS: dict[str, Any] = {
    "rejectCall": False,
    "msgCall": "",
    "groupsIgnore": False,
    "alwaysOnline": False,
    "readMessages": False,
    "readStatus": False,
    "syncFullHistory": False,
    "wavoipToken": "",
}


@lru_cache(maxsize=8192)
def iso(dt: datetime) -> str:
    """Prisma/JavaScript ISO form: UTC, milliseconds, ``Z``."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def evolution_error(status: int, message: str | list[str]) -> dict[str, Any]:
    """Evolution's global error envelope ``{status, error, response: {message}}``."""
    return {"status": status, "error": _HTTP_ERRORS.get(status, "Error"), "response": {"message": message}}


def megaapi_error(message: str) -> dict[str, Any]:
    """MegaAPI's error body."""
    return {"error": True, "message": message}


def settings_of(inst: SimInstance) -> dict[str, Any]:
    """The instance's settings with Evolution's defaults filled in."""
    return {**_DEFAULT_SETTINGS, **inst.settings}


def evolution_row(inst: SimInstance) -> dict[str, Any]:
    """One ``fetchInstances`` element: the raw Prisma ``Instance`` row with relations (column state, not live)."""
    created, updated = iso(inst.created_at), iso(inst.updated_at)
    return {
        "id": inst.instance_id,
        "name": inst.name,
        "connectionStatus": inst.column_state,
        "ownerJid": inst.owner_jid,
        "profileName": inst.profile_name if inst.owner_jid else None,
        "profilePicUrl": inst.profile_pic_url,
        "integration": inst.integration,
        "number": inst.number,
        "businessId": None,
        "token": inst.token,
        "clientName": "evolution",
        "disconnectionReasonCode": inst.disconnection_reason_code,
        "disconnectionObject": None,
        "disconnectionAt": iso(inst.disconnection_at) if inst.disconnection_at else None,
        "createdAt": created,
        "updatedAt": updated,
        "Chatwoot": None,
        "Proxy": None,
        "Rabbitmq": None,
        "Nats": None,
        "Sqs": None,
        "Websocket": None,
        "Setting": {
            "id": "c" + inst.instance_id.replace("-", "")[:24],
            **settings_of(inst),
            "createdAt": created,
            "updatedAt": created,
            "instanceId": inst.instance_id,
        },
        "_count": {"Message": inst.message_count, "Contact": inst.contact_count, "Chat": inst.chat_count},
    }


def connection_state(inst: SimInstance) -> dict[str, Any]:
    """``GET /instance/connectionState``: the live state."""
    return {"instance": {"instanceName": inst.name, "state": inst.live_state}}


def qr_body(qr: QrCode) -> dict[str, Any]:
    """Evolution's QR object; ``{"count": 0}`` while no QR code exists yet."""
    if qr.code is None:
        return {"count": qr.count}
    return {"pairingCode": qr.pairing_code, "code": qr.code, "base64": qr.base64, "count": qr.count}


def webhook_row(inst: SimInstance) -> dict[str, Any] | None:
    """Evolution's Prisma ``Webhook`` row for ``/webhook/find``."""
    hook = inst.webhook
    if hook is None:
        return None
    return {
        "id": hook["id"],
        "url": hook.get("url"),
        "headers": hook.get("headers") or {},
        "enabled": hook.get("enabled", True),
        "events": hook.get("events") or [],
        "webhookByEvents": hook.get("byEvents", False),
        "webhookBase64": hook.get("base64", False),
        "createdAt": iso(hook["createdAt"]),
        "updatedAt": iso(hook["updatedAt"]),
        "instanceId": inst.instance_id,
    }


def create_response(inst: SimInstance, qr: QrEmitted | None) -> dict[str, Any]:
    """``POST /instance/create`` 201 body (v2.3.6 shape: ``hash`` is the instance token string)."""
    hook = inst.webhook or {}
    body: dict[str, Any] = {
        "instance": {
            "instanceName": inst.name,
            "instanceId": inst.instance_id,
            "integration": inst.integration,
            "webhookWaBusiness": None,
            "accessTokenWaBusiness": "",
            "status": inst.live_state,
        },
        "hash": inst.token,
        "webhook": {
            "webhookUrl": hook.get("url"),
            "webhookHeaders": hook.get("headers") or {},
            "webhookByEvents": hook.get("byEvents", False),
            "webhookBase64": hook.get("base64", False),
        },
        "websocket": {},
        "rabbitmq": {},
        "nats": {},
        "sqs": {},
        "settings": settings_of(inst),
    }
    if qr is not None:
        body["qrcode"] = {"pairingCode": qr.pairing_code, "code": qr.code, "base64": qr.base64, "count": qr.count}
    return body


def megaapi_status(inst: SimInstance) -> dict[str, Any]:
    """``GET /rest/instance/{key}``: ``connected`` only when the live state is ``open`` (no ``user`` otherwise)."""
    if inst.live_state == "open":
        return {
            "error": False,
            "instance": {"status": "connected", "user": {"id": inst.owner_jid, "name": inst.profile_name}},
        }
    return {"error": False, "instance": {"status": "disconnected"}}


def connection_update_data(change: StateChange) -> dict[str, Any] | None:
    """Evolution ``connection.update`` data; None for a reconnectable close, which Evolution never sends."""
    if change.new == "open":
        return {
            "instance": change.name,
            "state": "open",
            "statusReason": 200,
            "wuid": change.owner_jid,
            "profileName": change.profile_name,
            "profilePictureUrl": change.profile_pic_url,
        }
    if change.new == "connecting":
        return {"instance": change.name, "state": "connecting", "statusReason": 200}
    if change.new == "refused":
        return {
            "instance": change.name,
            "state": "refused",
            "statusReason": change.reason_code or 428,
            "wuid": change.owner_jid,
            "profileName": change.profile_name,
            "profilePictureUrl": change.profile_pic_url,
        }
    if change.reason_code in NON_RECONNECTABLE_CODES:
        return {"instance": change.name, "state": "close", "statusReason": change.reason_code}
    return None


def qrcode_updated_data(qr: QrEmitted) -> dict[str, Any]:
    """Evolution ``qrcode.updated`` data (or the limit-reached message)."""
    if qr.limit_reached:
        return {"message": QR_LIMIT_MESSAGE, "statusCode": 500}
    return {"qrcode": {"instance": qr.name, "pairingCode": qr.pairing_code, "code": qr.code, "base64": qr.base64}}


def megaapi_connection_update(change: StateChange, *, variant: int) -> dict[str, Any]:
    """MegaAPI ``connection_update``: variant 0 = official sample shape, 1 = the 2026 ``phone_*`` shape."""
    if variant == 0:
        return {
            "instance_key": change.name,
            "messageType": "connection_update",
            "connection_state": "close" if change.new == "refused" else change.new,
            "timestamp": int(change.at.timestamp()),
            "closeReason": None if change.new == "open" else change.reason_code,
        }
    return {
        "messageType": "connection_update",
        "message": "phone_connected" if change.new == "open" else "phone_disconnected",
        "jid": change.owner_jid,
        "pushName": change.profile_name,
        "instance_key": change.name,
    }


def sim_instance(inst: SimInstance) -> dict[str, Any]:
    """The whole simulator record of an instance (control routes)."""
    return {
        "name": inst.name,
        "provider": inst.provider,
        "instance_id": inst.instance_id,
        "token": inst.token,
        "live_state": inst.live_state,
        "column_state": inst.column_state,
        "owner_jid": inst.owner_jid,
        "profile_name": inst.profile_name,
        "qr_count": inst.qr_count,
        "disconnection_reason_code": inst.disconnection_reason_code,
        "paired": inst.paired,
        "created_at": iso(inst.created_at),
        "updated_at": iso(inst.updated_at),
    }


def state_change(change: StateChange) -> dict[str, Any]:
    """A change as JSON (control routes)."""
    return {
        "name": change.name,
        "provider": change.provider,
        "old": change.old,
        "new": change.new,
        "reason_code": change.reason_code,
        "column": change.column,
        "at": iso(change.at),
    }
