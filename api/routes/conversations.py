"""Conversations and their import (seed 002): on-demand imports, conversation and message lists, live chats.

Every route is organization-scoped like the rest of the API: an organization's token never sees, and never
learns of, another organization's instances, conversations or messages (they answer 404).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from api.deps import BriefPrincipalDep, PrincipalDep, SessionDep, scoped_organization
from api.schemas import WorkItemRead
from core.domain import GatewayChat, WorkKind
from core.errors import GatewayError, InvalidInput, NotFound
from core.reports import ImportReport
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.conversations import (
    InstanceScope,
    decode_cursor,
    encode_cursor,
    get_conversation,
    instance_scope,
    list_chats,
    list_conversations,
    list_messages,
)
from db.repositories.import_runs import import_request, request_imports
from db.repositories.work_queue import read_item
from flows.runs import wait_for_item
from gateways.registry import open_gateways

router = APIRouter(tags=["conversations"])

ConversationStatus = Literal["waiting", "in_progress", "closed", "cancelled"]
Order = Literal["desc", "asc"]


class ImportRequest(BaseModel):
    """Start an import of one instance's history."""

    history_days: int | None = Field(
        default=None, ge=1, le=3650, description="Import this many days (default: the organization's setting)."
    )
    full: bool = Field(default=False, description="Start over instead of resuming an interrupted import.")
    wait: bool = Field(default=False, description="Wait for the run and include its report.")
    timeout_seconds: float = Field(default=300, gt=0, le=1800)


class ImportRunResponse(BaseModel):
    """A queued (and, with wait, finished) import."""

    work_item: WorkItemRead
    report: ImportReport | None = None


class ContactRead(BaseModel):
    """The contact a conversation is with."""

    id: int
    jid: str
    phone: str | None
    name: str | None
    client_id: uuid.UUID | None


class ConversationRead(BaseModel):
    """One conversation (atendimento)."""

    id: int
    organization_id: uuid.UUID
    instance_id: uuid.UUID
    status: str
    contact: ContactRead
    opened_at: datetime
    last_message_at: datetime
    waiting_since: datetime | None
    closed_at: datetime | None
    close_reason: str | None
    assignee_id: str | None
    priority: int
    tags: list[Any]
    created_at: datetime
    updated_at: datetime


class ConversationPage(BaseModel):
    """A page of conversations; pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[ConversationRead]
    next_cursor: str | None


class MessageRead(BaseModel):
    """One message (mensagem)."""

    id: int
    external_id: str | None
    from_me: bool
    sender: str
    type: str
    content: str | None
    media_url: str | None
    media_mime: str | None
    media_name: str | None
    media_size: int | None
    sent_at: datetime
    status: str


class MessagePage(BaseModel):
    """A page of one conversation's messages."""

    conversation_id: int
    items: list[MessageRead]
    next_cursor: str | None


class ChatRead(BaseModel):
    """A chat as the gateway or the database knows it."""

    jid: str
    alt_jid: str | None = None
    name: str | None = None
    phone: str | None = None
    is_group: bool = False
    last_message_at: datetime | None = None
    last_from_me: bool | None = None
    last_preview: str | None = None
    unread: int | None = None
    conversation_id: int | None = None
    status: str | None = None


class ChatsResponse(BaseModel):
    """An instance's chats, saying where they came from."""

    instance_id: uuid.UUID
    source: Literal["gateway", "database"]
    fallback_reason: str | None = None
    """Why the database answered although the gateway was asked (unreachable, not supported…)."""
    items: list[ChatRead]


async def _owned_scope(instance_id: uuid.UUID, organization_id: uuid.UUID | None) -> InstanceScope:
    async with session_scope() as session:
        scope = await instance_scope(session, instance_id, organization_id=organization_id)
    if scope is None:
        raise NotFound(f"no instance {instance_id}")
    return scope


@router.post("/instances/{instance_id}/import", response_model=ImportRunResponse, status_code=202)
async def import_instance(
    instance_id: uuid.UUID, principal: BriefPrincipalDep, http: Request, request: ImportRequest | None = None
) -> ImportRunResponse:
    """Queue an import of the instance's chats, contacts and messages (merged into one already queued); `wait` for
    its report. A worker drains the queue (`zapsync worker`, part of `zapsync up`)."""
    request = request or ImportRequest()
    scope = await _owned_scope(instance_id, principal.organization_id)
    async with session_scope() as session:
        (queued,) = await request_imports(
            session,
            [
                import_request(
                    instance_id,
                    scope.organization_id,
                    trigger="api",
                    history_days=request.history_days,
                    full=request.full,
                )
            ],
        )
    http.app.state.waker.wake(WorkKind.IMPORT)
    async with session_scope() as session:
        item = await read_item(session, queued.id)
    assert item is not None  # written just above
    if request.wait:
        item = await wait_for_item(queued.id, timeout=request.timeout_seconds)
    report = ImportReport.model_validate(item.result) if item.finished and item.result else None
    return ImportRunResponse(work_item=WorkItemRead.of(item), report=report)


def _cursor(cursor: str | None, order: Order) -> tuple[datetime, int] | None:
    if not cursor:  # absent, or `cursor=` (a client sending back an empty next_cursor): the first page
        return None
    try:
        at, row_id, cursor_order = decode_cursor(cursor, 3)
        if cursor_order != order:
            raise ValueError("cursor of another order")
        return datetime.fromisoformat(at), int(row_id)
    except ValueError as exc:
        raise InvalidInput(f"invalid cursor: {exc}") from exc


@router.get("/conversations", response_model=ConversationPage)
async def conversations(
    session: SessionDep,
    principal: PrincipalDep,
    organization_id: uuid.UUID | None = Query(default=None, description="Admin tokens may name one organization."),
    instance_id: uuid.UUID | None = None,
    status: ConversationStatus | None = None,
    phone: str | None = Query(default=None, description="Contact phone (digits; ninth-digit variants match)."),
    updated_since: datetime | None = None,
    cursor: str | None = None,
    order: Order = Query(default="desc", description="By last update: newest first (desc) or oldest first (asc)."),
    limit: int = Query(default=50, ge=1, le=200),
) -> ConversationPage:
    """Conversations of the caller's organization, filtered, keyset-paginated by (updated_at, id)."""
    rows = await list_conversations(
        session,
        organization_id=scoped_organization(principal, organization_id),
        instance_id=instance_id,
        status=status,
        phone=phone,
        updated_since=updated_since,
        after=_cursor(cursor, order),
        order=order,
        limit=limit,
    )
    page, more = rows[:limit], len(rows) > limit
    last = page[-1] if page else None
    return ConversationPage(
        items=[_conversation(r) for r in page],
        next_cursor=encode_cursor([last["updated_at"].isoformat(), last["id"], order]) if more and last else None,
    )


def _conversation(row: dict[str, Any]) -> ConversationRead:
    return ConversationRead(
        **{k: v for k, v in row.items() if not k.startswith("contact_")},
        contact=ContactRead(
            id=row["contact_id"],
            jid=row["contact_jid"],
            phone=row["contact_phone"],
            name=row["contact_name"],
            client_id=row["contact_client_id"],
        ),
    )


@router.get("/conversations/{conversation_id}/messages", response_model=MessagePage)
async def conversation_messages(
    conversation_id: int,
    session: SessionDep,
    principal: PrincipalDep,
    cursor: str | None = None,
    order: Order = Query(default="desc", description="By send time: newest first (desc) or oldest first (asc)."),
    limit: int = Query(default=50, ge=1, le=500),
) -> MessagePage:
    """One conversation's messages, keyset-paginated by (sent_at, id)."""
    if await get_conversation(session, conversation_id, organization_id=principal.organization_id) is None:
        raise NotFound(f"no conversation {conversation_id}")
    rows = await list_messages(session, conversation_id, after=_cursor(cursor, order), order=order, limit=limit)
    page, more = rows[:limit], len(rows) > limit
    last = page[-1] if page else None
    return MessagePage(
        conversation_id=conversation_id,
        items=[MessageRead(**r) for r in page],
        next_cursor=encode_cursor([last["sent_at"].isoformat(), last["id"], order]) if more and last else None,
    )


MAX_OFFSET = 2**63 - 1
"""The largest offset a query param may ask for: PostgreSQL's OFFSET is a bigint (larger answered 500)."""


@router.get("/instances/{instance_id}/chats", response_model=ChatsResponse)
async def instance_chats(
    instance_id: uuid.UUID,
    principal: PrincipalDep,
    live: bool = Query(default=False, description="Ask the gateway; the database answers when it cannot."),
    skip: int = Query(default=0, ge=0, le=MAX_OFFSET, description="Chats to skip (at most 2**63 - 1)."),
    take: int = Query(default=50, ge=1, le=500),
) -> ChatsResponse:
    """The instance's chats from the gateway (`live=true`) or the database, saying which one answered (seed 002:
    the gateway first, the database as the fallback)."""
    scope = await _owned_scope(instance_id, principal.organization_id)
    reason: str | None = None
    if live:
        try:
            chats = await _live_chats(scope, skip=skip, take=take)
        except GatewayError as exc:
            reason = exc.message
        except TimeoutError:
            reason = f"gateway {scope.gateway!r} did not answer in time"
        else:
            return ChatsResponse(
                instance_id=instance_id,
                source="gateway",
                items=[
                    ChatRead(
                        jid=c.jid,
                        alt_jid=c.alt_jid,
                        name=c.name,
                        is_group=c.kind != "contact",
                        last_message_at=c.last_message_at,
                        last_from_me=c.last_from_me,
                        last_preview=c.last_preview,
                        unread=c.unread,
                    )
                    for c in chats
                ],
            )
    async with session_scope() as session:
        rows = await list_chats(session, instance_id, skip=skip, take=take)
    return ChatsResponse(
        instance_id=instance_id,
        source="database",
        fallback_reason=reason,
        items=[
            ChatRead(
                **{k: v for k, v in row.items() if k not in ("client_id", "last_type", "last_preview")},
                last_preview=row["last_preview"] or (f"[{row['last_type']}]" if row["last_type"] else None),
            )
            for row in rows
        ],
    )


async def _live_chats(scope: InstanceScope, *, skip: int, take: int) -> list[GatewayChat]:
    """One page of chats from the instance's gateway, within twice the gateway timeout."""
    budget = 2 * get_settings().gateway_timeout_seconds
    async with open_gateways({scope.gateway}) as gateways:
        gateway = gateways.get(scope.gateway)
        if gateway is None:
            raise GatewayError(f"gateway {scope.gateway!r} is not configured", gateway=scope.gateway)
        async with asyncio.timeout(budget):
            return await gateway.fetch_chats(scope.instance_name, skip=skip, take=take)
