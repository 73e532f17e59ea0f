"""The dashboard's conversation view: one conversation's messages with their statuses, and a reply box."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.deps import SESSION_COOKIE, BearerDep, SessionDep, bearer, principal_for_request
from api.routes.dashboard import templates
from core.errors import NotFound, Unauthorized
from db.repositories.conversations import get_conversation, list_messages

router = APIRouter(include_in_schema=False)

SHOWN_MESSAGES = 200


@router.get("/dashboard/conversations/{conversation_id}", response_class=HTMLResponse)
async def conversation_page(
    request: Request, conversation_id: int, session: SessionDep, credentials: BearerDep
) -> Response:
    """The conversation's latest messages, oldest first, each with its status; replies go through the outbox."""
    try:
        principal = await principal_for_request(session, bearer(credentials), request.cookies.get(SESSION_COOKIE))
    except Unauthorized:
        return RedirectResponse("/", status_code=303)
    conversation = await get_conversation(session, conversation_id, organization_id=principal.organization_id)
    if conversation is None:
        raise NotFound(f"no conversation {conversation_id}")
    messages = await list_messages(session, conversation_id, order="desc", limit=SHOWN_MESSAGES)
    context = {
        "principal": principal,
        "conversation": conversation,
        "messages": list(reversed(messages[:SHOWN_MESSAGES])),
    }
    return templates.TemplateResponse(request, "conversation.html", context)
