"""Request and response bodies of the management API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from core.reports import SyncReport
from db.repositories.work_queue import ItemState
from flows.runs import FlowRunRef


class SyncRequest(BaseModel):
    """Start a status sync."""

    organization_id: uuid.UUID | None = Field(default=None, description="Admin tokens may name one organization.")
    mode: Literal["check", "apply"] = "apply"
    force: bool = Field(default=False, description="Confirm every connected instance live, not a rotating few.")
    wait: bool = Field(default=False, description="Wait for the run and include its report.")
    timeout_seconds: float = Field(default=120, gt=0, le=900)


class FlowRunResponse(BaseModel):
    """A started (and, with wait, finished) flow run."""

    flow_run: FlowRunRef
    report: SyncReport | None = None


class InstanceCheck(BaseModel):
    """One instance: what the database says, what the gateway says."""

    id: uuid.UUID
    organization_id: uuid.UUID
    instance_name: str
    gateway: str
    db_status: str
    gateway_status: str
    drift: bool
    reason: str | None = None


class StatusCheckResponse(BaseModel):
    """The read-only status check: nothing was written."""

    checked: int
    in_sync: int
    drifted: int
    unreachable: int
    seconds: float
    instances: list[InstanceCheck]


class InstanceStatusResponse(BaseModel):
    """One instance's stored status and its live check."""

    id: uuid.UUID
    instance_name: str
    gateway: str
    status: str
    is_connected: bool
    status_reason: str | None
    status_observed_at: datetime | None
    last_checked_at: datetime | None
    phone_number: str | None
    profile_name: str | None
    health: str
    gateway_status: str
    drift: bool


class WorkItemRead(BaseModel):
    """One queue item: its state, attempts, last error and, once finished, its result."""

    id: int
    kind: str
    state: str
    attempts: int
    last_error: str | None
    finished: bool
    result: dict[str, object] | None = None

    @classmethod
    def of(cls, item: ItemState) -> WorkItemRead:
        """The item as the API shows it."""
        return cls(
            id=item.id,
            kind=item.kind,
            state=item.state,
            attempts=item.attempts,
            last_error=item.last_error,
            finished=item.finished,
            result=item.result,
        )


class ErrorBody(BaseModel):
    """The body of every error answer (api/errors.py): what failed, why, and the request id to quote."""

    error: str = Field(description="The error's class name, e.g. `Unauthorized`, `NotFound`, `InvalidInput`.")
    detail: str = Field(description="What went wrong, in words safe to show the caller.")
    request_id: str | None = Field(description="This request's id, also in the `X-Request-ID` response header.")


# -- webhook request bodies (declared for users and fuzzers; the routes read the raw body) -------------------------
# Loose on purpose: every property is optional unless the parser always needs it, any other property is allowed,
# and value types are as wide as gateways/webhook_payloads.py accepts (e.g. `instance` as a name or an object).

_ANY_TIME = {"anyOf": [{"type": "number"}, {"type": "string"}], "description": "Epoch seconds or ms, or ISO 8601."}

EVOLUTION_WEBHOOK: dict[str, object] = {
    "title": "EvolutionWebhook",
    "type": "object",
    "description": "An Evolution API v2 delivery (gateways.md §2): `{event, instance, data, date_time, ...}`. "
    "`data` depends on the event: `connection.update` {state, statusReason, wuid, profileName}, `qrcode.updated` "
    "{qrcode: {code, pairingCode}}, `messages.upsert` a Baileys message {key, message, messageTimestamp, pushName} "
    "(or an array), `messages.update` {keyId | key.id, status}, `contacts.*`/`chats.*` an object or an array.",
    "properties": {
        "event": {"type": "string", "description": "`connection.update`, `messages.upsert`… (or `MESSAGES_UPSERT`)."},
        "instance": {
            "anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": True}],
            "description": "The instance name, or an object with `instanceName`.",
        },
        "data": {"description": "The event's data (object or array)."},
        "date_time": _ANY_TIME,
        "server_url": {"type": "string"},
        "apikey": {"type": "string", "description": "The instance's key (redacted when stored)."},
        "sender": {"type": "string"},
    },
    "additionalProperties": True,
    "example": {
        "event": "connection.update",
        "instance": "sales-01",
        "data": {"instance": "sales-01", "state": "open", "statusReason": 200, "wuid": "5511999990000@s.whatsapp.net"},
        "date_time": "2026-01-01T12:00:00.000Z",
    },
}

MEGAAPI_WEBHOOK: dict[str, object] = {
    "title": "MegaAPIWebhook",
    "type": "object",
    "description": "A MegaAPI delivery (gateways.md §4): flat, typed by `messageType`: `connection_update` "
    "{instance_key, connection_state | message: phone_connected/phone_disconnected, jid, pushName}, `message.ack` "
    "{instance_key, key.id, update.status}, or a flat Baileys message {instance_key, key, message, "
    "messageTimestamp}.",
    "properties": {
        "messageType": {"type": "string", "description": "`connection_update`, `message.ack`, `conversation`…"},
        "type": {"type": "string", "description": "Older clients' name for `messageType`."},
        "instance_key": {"type": "string"},
        "instanceKey": {"type": "string"},
        "connection_state": {"type": "string"},
        "message": {"description": "Connection message or the message content."},
        "key": {"type": "object", "additionalProperties": True},
        "update": {"type": "object", "additionalProperties": True},
        "jid": {"type": "string"},
        "pushName": {"type": "string"},
        "timestamp": _ANY_TIME,
    },
    "additionalProperties": True,
    "example": {
        "instance_key": "sales-01",
        "messageType": "connection_update",
        "connection_state": "open",
        "jid": "5511999990000@s.whatsapp.net",
    },
}

WAHA_WEBHOOK: dict[str, object] = {
    "title": "WAHAWebhook",
    "type": "object",
    "description": "A WAHA delivery (gateways.md §8.4): `{id, timestamp, event, session, me, payload, engine, "
    "environment}`: `session.status` {status}, `message`/`message.any` a message, `message.ack` {id, ack | ackName}, "
    "`message.revoked` {revokedMessageId | before.id}.",
    "properties": {
        "id": {"type": "string", "description": "The event id (kept by WAHA's retries)."},
        "timestamp": _ANY_TIME,
        "event": {"type": "string", "description": "`session.status`, `message`, `message.ack`…"},
        "session": {"type": "string", "description": "The session (instance) name."},
        "me": {"type": "object", "additionalProperties": True},
        "payload": {"type": "object", "additionalProperties": True},
        "engine": {"type": "string"},
        "environment": {"type": "object", "additionalProperties": True},
    },
    "additionalProperties": True,
    "example": {
        "id": "evt_01JEXAMPLE",
        "timestamp": 1767268800000,
        "event": "session.status",
        "session": "sales-01",
        "payload": {"status": "WORKING"},
    },
}


def webhook_request_body(schema: dict[str, object], *, required: tuple[str, ...] = ()) -> dict[str, object]:
    """`openapi_extra` for a webhook route: its JSON request body (``required`` names properties it must have)."""
    body = {**schema, "required": list(required)} if required else schema
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}
