"""Sending (seed 004): queue a message to a conversation or, through an instance, to a phone number or JID.

The message row is written ``pending`` with its queue item in one transaction and answered at once (201); the send
drain delivers it through the instance's gateway and the gateway's echo and receipts move its status (announced as
``message.status`` on ``/events``). An ``Idempotency-Key`` header (or ``client_id`` in the body; the header wins)
makes a repeat answer the same message (200) and send nothing twice; the same key for another message is a 409.
Organization-scoped like every route: another organization's instance or conversation answers 404.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, Field

from api.deps import BriefPrincipalDep
from core.domain import ChatKind, OutgoingMessage, OutgoingType, WorkKind, chat_kind
from core.errors import InvalidInput, NotFound
from core.phones import digits
from db.engine import session_scope
from db.repositories.conversations import InstanceScope, get_conversation, instance_scope
from db.repositories.outbox import QueuedMessage, known_contact_jid, queue_message

router = APIRouter(tags=["sending"])

MAX_TEXT = 65_536
MAX_CAPTION = 1024
_URL = re.compile(r"^https?://[^\s/$.?#][^\s]*$", re.IGNORECASE)
_JID_SERVERS = ("@s.whatsapp.net", "@c.us", "@lid")


class SendRequest(BaseModel):
    """A message to send: text, or media by URL (image, video, audio, document) with an optional caption."""

    type: OutgoingType = OutgoingType.TEXT
    text: str | None = Field(default=None, max_length=MAX_TEXT, description="Required for text messages.")
    media_url: str | None = Field(default=None, max_length=2048, description="http(s) URL of the media.")
    mime_type: str | None = Field(default=None, max_length=128)
    file_name: str | None = Field(default=None, max_length=255)
    caption: str | None = Field(default=None, max_length=MAX_CAPTION)
    client_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Idempotency key (the Idempotency-Key header wins)."
    )


class InstanceSendRequest(SendRequest):
    """A message to a phone number (digits, with country code) or a JID, through one instance."""

    to: str = Field(min_length=3, max_length=128)


class OutboxMessageRead(BaseModel):
    """An outbox message and where its send stands."""

    id: int
    organization_id: uuid.UUID
    instance_id: uuid.UUID
    conversation_id: int
    to: str
    external_id: str | None
    type: str
    text: str | None
    media_url: str | None
    mime_type: str | None
    file_name: str | None
    status: str
    error: str | None
    client_id: str | None
    sent_at: datetime
    attempted_at: datetime | None
    created_at: datetime


class SendResponse(BaseModel):
    """The queued message and the queue item that sends it."""

    message: OutboxMessageRead
    work_item_id: int | None


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=128)]


def outgoing(request: SendRequest, to_jid: str) -> OutgoingMessage:
    """The request as a message to send, or InvalidInput (422) saying what is wrong with it."""
    if request.type is OutgoingType.TEXT:
        if not request.text or not request.text.strip():
            raise InvalidInput("a text message needs a non-empty `text`")
        if request.media_url:
            raise InvalidInput("a text message takes no `media_url`; set `type` to the media's kind")
        return OutgoingMessage(to=to_jid, type=request.type, text=request.text)
    if not request.media_url or not _URL.match(request.media_url):
        raise InvalidInput(f"a {request.type} message needs `media_url`, an http(s) URL")
    caption = request.caption if request.caption is not None else request.text
    if caption is not None and len(caption) > MAX_CAPTION:
        raise InvalidInput(f"a caption is at most {MAX_CAPTION} characters")
    return OutgoingMessage(
        to=to_jid,
        type=request.type,
        text=caption or None,
        media_url=request.media_url,
        mime_type=request.mime_type,
        file_name=request.file_name,
    )


def recipient_jid(to: str) -> str:
    """A phone number (digits, `+`, spaces and dashes allowed) or a one-to-one JID, as a JID; else InvalidInput."""
    value = to.strip()
    if "@" in value:
        if not value.endswith(_JID_SERVERS) or chat_kind(value) is not ChatKind.CONTACT:
            raise InvalidInput("`to` must be a phone number or a one-to-one JID (…@s.whatsapp.net or …@lid)")
        return value
    number = digits(value)
    if number is None or not 8 <= len(number) <= 15 or re.search(r"[^\d+\s().-]", value):
        raise InvalidInput("`to` must be a phone number with its country code (8 to 15 digits) or a JID")
    return f"{number}@s.whatsapp.net"


def _read(queued: QueuedMessage) -> SendResponse:
    row: dict[str, Any] = queued.message
    return SendResponse(
        message=OutboxMessageRead(
            id=row["id"],
            organization_id=row["organization_id"],
            instance_id=row["instance_id"],
            conversation_id=row["conversation_id"],
            to=row["to_jid"],
            external_id=row["external_id"],
            type=row["type"],
            text=row["content"],
            media_url=row["media_url"],
            mime_type=row["media_mime"],
            file_name=row["media_name"],
            status=row["status"],
            error=row["error"],
            client_id=row["client_id"],
            sent_at=row["sent_at"],
            attempted_at=row["attempted_at"],
            created_at=row["created_at"],
        ),
        work_item_id=queued.work_item_id,
    )


async def _queue(
    http: Request,
    response: Response,
    scope: InstanceScope,
    to_jid: str,
    request: SendRequest,
    idempotency_key: str | None,
) -> SendResponse:
    message = outgoing(request, to_jid)
    client_id = idempotency_key or request.client_id
    async with session_scope() as session:
        queued = await queue_message(
            session, scope, to_jid=to_jid, message=message, client_id=client_id, now=datetime.now(UTC)
        )
    if queued.created:
        http.app.state.waker.wake(WorkKind.SEND)
    response.status_code = 201 if queued.created else 200
    return _read(queued)


@router.post("/instances/{instance_id}/messages", response_model=SendResponse, status_code=201)
async def send_through_instance(
    instance_id: uuid.UUID,
    request: InstanceSendRequest,
    principal: BriefPrincipalDep,
    http: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> SendResponse:
    """Queue a message to a phone number or JID through the instance (a contact and an `in_progress` conversation
    are made when needed). 201 for a new message, 200 for a repeat of its idempotency key."""
    jid = recipient_jid(request.to)
    async with session_scope() as session:
        scope = await instance_scope(session, instance_id, organization_id=principal.organization_id)
        if scope is None:
            raise NotFound(f"no instance {instance_id}")
        if "@" not in request.to:  # the number may be known under another form (ninth digit)
            jid = await known_contact_jid(session, scope.id, jid) or jid
    return await _queue(http, response, scope, jid, request, idempotency_key)


@router.post("/conversations/{conversation_id}/messages", response_model=SendResponse, status_code=201)
async def send_to_conversation(
    conversation_id: int,
    request: SendRequest,
    principal: BriefPrincipalDep,
    http: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> SendResponse:
    """Queue a message to the conversation's contact (a closed conversation's contact gets a new one). 201 for a
    new message, 200 for a repeat of its idempotency key."""
    async with session_scope() as session:
        conversation = await get_conversation(session, conversation_id, organization_id=principal.organization_id)
        if conversation is None:
            raise NotFound(f"no conversation {conversation_id}")
        scope = await instance_scope(session, conversation["instance_id"])
    if scope is None:
        raise NotFound(f"no conversation {conversation_id}")
    return await _queue(http, response, scope, conversation["contact_jid"], request, idempotency_key)
