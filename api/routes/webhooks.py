"""Webhook receivers: authenticate → bound and parse the body → dedupe, store, apply → 200 fast.

The organization's secret travels in a header set in the gateway's webhook config (`X-Webhook-Secret`, or
`Authorization: Bearer <secret>`); MegaAPI, which cannot send headers, may put it in the query (`?secret=`),
which zapsync never logs. A 4xx is answered only for permanent rejects (gateways do not retry those).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel

from api.deps import BearerDep, bearer
from api.inbox import RepeatFilter, handle_event
from core.domain import Provider
from core.errors import InvalidInput, PayloadTooLarge, Unauthorized
from core.settings import get_settings
from db.engine import session_scope
from db.repositories.organizations import webhook_secret_matches
from gateways.webhook_payloads import MalformedPayload, WebhookEvent, decode_json, parse_evolution, parse_megaapi

log = logging.getLogger("zapsync.webhooks")
router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookAck(BaseModel):
    """The answer to a delivery."""

    outcome: str
    event: str
    instance: str | None = None
    detail: str | None = None


async def read_limited_body(request: Request) -> bytes:
    """The raw body, refusing anything over the configured size before reading it all."""
    limit = get_settings().webhook_max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def presented_secret(
    request: Request,
    credentials: BearerDep,
    header: Annotated[str | None, Header(alias="x-webhook-secret")] = None,
) -> str | None:
    """The webhook secret as sent: `X-Webhook-Secret`, else `Authorization: Bearer`, else `?secret=` (MegaAPI)."""
    return header or bearer(credentials) or request.query_params.get("secret")


SecretDep = Annotated[str | None, Depends(presented_secret)]


async def authenticate(organization_id: uuid.UUID, presented: str | None) -> None:
    """Check the organization's webhook secret (constant time); 401 otherwise."""
    if not presented:
        raise Unauthorized("missing webhook secret: send it in the X-Webhook-Secret header")
    async with session_scope() as session:
        if not await webhook_secret_matches(session, organization_id, presented):
            raise Unauthorized("wrong webhook secret for this organization")


async def receive(
    request: Request,
    organization_id: uuid.UUID,
    provider: Provider,
    secret: str | None,
    path_event: str | None = None,
) -> WebhookAck:
    """The shared receive path of every provider."""
    begun = time.perf_counter()
    body = await read_limited_body(request)
    await authenticate(organization_id, secret)
    try:
        payload = decode_json(body)
        event: WebhookEvent = (
            parse_evolution(payload, path_event=path_event)
            if provider is Provider.EVOLUTION
            else parse_megaapi(payload)
        )
    except MalformedPayload as exc:
        log.info("[WEBHOOK] %s org=%s rejected: %s", provider, organization_id, exc)
        raise InvalidInput(str(exc)) from exc
    repeats: RepeatFilter = request.app.state.repeat_filter
    result = await handle_event(organization_id, event, payload, repeats=repeats)
    metrics = request.app.state.metrics
    metrics.webhook_events.labels(str(provider), event.event, result.outcome).inc()
    metrics.webhook_seconds.labels(str(provider)).observe(time.perf_counter() - begun)
    log.info(
        "[WEBHOOK] %s %s %s -> %s in %.1f ms",
        provider,
        event.event,
        event.instance_name or "-",
        result.outcome,
        (time.perf_counter() - begun) * 1000,
    )
    hooks = getattr(request.app.state, "after_webhook", [])
    for hook in hooks:
        await hook(organization_id, event, result)
    return WebhookAck(outcome=result.outcome, event=event.event, instance=event.instance_name, detail=result.detail)


@router.post("/evolution/{organization_id}", response_model=WebhookAck)
async def evolution_webhook(request: Request, organization_id: uuid.UUID, secret: SecretDep) -> WebhookAck:
    """Evolution API v2 deliveries (all events to one URL)."""
    return await receive(request, organization_id, Provider.EVOLUTION, secret)


@router.post("/evolution/{organization_id}/{event_suffix}", response_model=WebhookAck)
async def evolution_webhook_by_event(
    request: Request, organization_id: uuid.UUID, event_suffix: str, secret: SecretDep
) -> WebhookAck:
    """Evolution API v2 deliveries in by-events mode (`.../connection-update`)."""
    return await receive(request, organization_id, Provider.EVOLUTION, secret, path_event=event_suffix)


@router.post("/megaapi/{organization_id}", response_model=WebhookAck)
async def megaapi_webhook(request: Request, organization_id: uuid.UUID, secret: SecretDep) -> WebhookAck:
    """MegaAPI deliveries."""
    return await receive(request, organization_id, Provider.MEGAAPI, secret)
