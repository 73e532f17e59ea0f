"""Webhook receivers: authenticate → bound and parse the body → dedupe, store, apply → 200 fast.

The organization's secret travels in a header set in the gateway's webhook config (`X-Webhook-Secret`, or
`Authorization: Bearer <secret>`); a gateway that cannot send headers (MegaAPI, Evolution's global webhook) may put
it in the query (`?secret=`), which zapsync never logs. Signed deliveries are checked too, keyed by the same secret:
WAHA's `X-Webhook-Hmac` (HMAC-SHA512 of the raw body) and Evolution's `Authorization: Bearer <HS256 JWT>`; each
organization chooses per provider which methods it accepts (``organizations.webhook_auth``,
``core.webhook_signatures``). Credentials are checked before the body is read (an unsigned, unauthenticated post
of any size gets 401); an HMAC needs the body, which is read within the size limit first. A 4xx is answered only
for permanent rejects (gateways do not retry those).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel

from api.deps import BearerDep, bearer
from api.group_commit import webhook_credentials_of
from api.inbox import RepeatFilter, handle_event
from api.schemas import EVOLUTION_WEBHOOK, MEGAAPI_WEBHOOK, WAHA_WEBHOOK, webhook_request_body
from api.spool import SpoolRecord, app_spool, spool_delivery
from core.domain import Provider
from core.errors import DatabaseUnavailable, InvalidInput, PayloadTooLarge, Unauthorized
from core.settings import get_settings
from core.webhook_signatures import (
    SIGNED_METHODS,
    WebhookAuth,
    hmac_matches,
    jwt_matches,
    looks_like_jwt,
    mode_for,
)
from db.repositories.organizations import WebhookCredentials, digest
from gateways.webhook_payloads import (
    EventKind,
    MalformedPayload,
    WebhookEvent,
    parse_delivery,
)

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


_NO_SEALED_SECRET = (
    "this organization's webhook secret predates sealed secrets: rotate it (zapsync org rotate-secret) to accept "
    "signed deliveries, or send the secret in the X-Webhook-Secret header"
)


async def authenticated_body(
    request: Request, organization_id: uuid.UUID, provider: Provider, presented: str | None
) -> bytes:
    """Authenticate the delivery as the organization chose for ``provider``, then return its raw body.

    The strongest credential the delivery carries among those allowed is checked: WAHA's HMAC, then Evolution's
    JWT, then the shared secret; a delivery carrying none gets 401 before its body is read. Every comparison is
    constant-time, and an unknown organization is compared against a dummy so timing does not tell ids apart.
    """
    credentials = await _credentials(request, organization_id)
    mode = mode_for(credentials.webhook_auth if credentials else None, provider)
    allowed = {WebhookAuth.SECRET, *SIGNED_METHODS[provider]} if mode is WebhookAuth.ANY else {mode}
    signature = request.headers.get("x-webhook-hmac")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if WebhookAuth.HMAC in allowed and signature:
        algorithm = request.headers.get("x-webhook-hmac-algorithm", "sha512").lower()
        if algorithm != "sha512":
            raise Unauthorized(f"unsupported webhook HMAC algorithm {algorithm!r}: configure sha512")
        key = _signing_key(credentials)
        body = await read_limited_body(request)
        if not hmac_matches(key, body, signature):
            raise Unauthorized("wrong webhook signature (X-Webhook-Hmac) for this organization")
        return body
    if WebhookAuth.JWT in allowed and token and looks_like_jwt(token):
        leeway = get_settings().webhook_jwt_leeway_seconds
        if not jwt_matches(_signing_key(credentials), token, leeway_seconds=leeway):
            raise Unauthorized("wrong or expired webhook JWT for this organization")
        return await read_limited_body(request)
    if WebhookAuth.SECRET in allowed and presented:
        stored = credentials.secret_hash if credentials else None
        # Compare even when the organization is unknown, so timing does not tell which ids exist.
        if not (hmac.compare_digest(stored or "0" * 64, digest(presented)) and stored is not None):
            raise Unauthorized("wrong webhook secret for this organization")
        return await read_limited_body(request)
    raise Unauthorized(f"missing webhook credentials: this organization accepts {_expected(provider, allowed)}")


async def _credentials(request: Request, organization_id: uuid.UUID) -> WebhookCredentials | None:
    """The organization's webhook credentials, remembered per process: while the database is unreachable, the last
    ones loaded are used, so deliveries can still be checked (and spooled); one never loaded since start → 503."""
    cache: dict[uuid.UUID, WebhookCredentials] | None = getattr(request.app.state, "webhook_credentials", None)
    if cache is None:
        cache = request.app.state.webhook_credentials = {}
    try:
        credentials = await webhook_credentials_of(organization_id)  # one lookup for the deliveries arriving meanwhile
    except DatabaseUnavailable:
        if organization_id not in cache:
            raise
        return cache[organization_id]
    if credentials is None:
        cache.pop(organization_id, None)
    else:
        cache[organization_id] = credentials
    return credentials


def _signing_key(credentials: WebhookCredentials | None) -> str:
    """The organization's secret in clear, which signed deliveries are keyed by."""
    if credentials is None:
        raise Unauthorized("wrong webhook signature for this organization")
    key = credentials.secret()
    if key is None:
        raise Unauthorized(_NO_SEALED_SECRET)
    return key


def _expected(provider: Provider, allowed: AbstractSet[WebhookAuth]) -> str:
    words = {
        WebhookAuth.SECRET: "the secret in X-Webhook-Secret (or ?secret=)",
        WebhookAuth.HMAC: "an X-Webhook-Hmac signature (HMAC-SHA512 of the body)",
        WebhookAuth.JWT: "an Authorization: Bearer JWT (Evolution's jwt_key)",
    }
    return " or ".join(words[method] for method in sorted(allowed) if method in words) + f" from {provider}"


async def receive(
    request: Request,
    organization_id: uuid.UUID,
    provider: Provider,
    secret: str | None,
    path_event: str | None = None,
) -> WebhookAck:
    """The shared receive path of every provider."""
    begun = time.perf_counter()
    body = await authenticated_body(request, organization_id, provider, secret)
    try:
        payload, event = parse_delivery(provider, body, path_event=path_event)
    except MalformedPayload as exc:
        log.info("[WEBHOOK] %s org=%s rejected: %s", provider, organization_id, exc)
        raise InvalidInput(str(exc)) from exc
    repeats: RepeatFilter = request.app.state.repeat_filter
    # -- the spool (issue 13 §4): behind older spooled deliveries, or with the database down, journal and answer 202
    journal = app_spool(request.app)
    record = SpoolRecord(datetime.now(UTC), organization_id, provider, path_event, body)
    if journal is not None and journal.backlog:
        await spool_delivery(request.app, record, event, "older deliveries are spooled")
    try:
        result = await handle_event(organization_id, event, payload, repeats=repeats)
    except DatabaseUnavailable:
        if journal is None:
            raise
        await spool_delivery(request.app, record, event, "the database is unreachable")
    # -- end of the spool
    metrics = request.app.state.metrics
    metrics.webhook_events.labels(str(provider), metric_event_label(event), result.outcome).inc()
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


def acknowledged(ack: WebhookAck) -> Response:
    """The 200 answer to a delivery, serialized directly: the routes declare ``response_model=WebhookAck`` for the
    OpenAPI document, but FastAPI's validation and encoding of the returned model cost more than the answer itself."""
    body = {"outcome": ack.outcome, "event": ack.event, "instance": ack.instance, "detail": ack.detail}
    return Response(orjson.dumps(body), media_type="application/json")


def metric_event_label(event: WebhookEvent) -> str:
    """The event name as a metrics label: names zapsync acts on as sent, any other as ``other`` (a sender must not
    be able to create label values, and so time series, at will)."""
    return event.event if event.kind is not EventKind.OTHER else "other"


@router.post(
    "/evolution/{organization_id}",
    response_model=WebhookAck,
    openapi_extra=webhook_request_body(EVOLUTION_WEBHOOK, required=("event",)),
)
async def evolution_webhook(request: Request, organization_id: uuid.UUID, secret: SecretDep) -> Response:
    """Evolution API v2 deliveries (all events to one URL)."""
    return acknowledged(await receive(request, organization_id, Provider.EVOLUTION, secret))


@router.post(
    "/evolution/{organization_id}/{event_suffix}",
    response_model=WebhookAck,
    openapi_extra=webhook_request_body(EVOLUTION_WEBHOOK),
)
async def evolution_webhook_by_event(
    request: Request, organization_id: uuid.UUID, event_suffix: str, secret: SecretDep
) -> Response:
    """Evolution API v2 deliveries in by-events mode (`.../connection-update`)."""
    return acknowledged(await receive(request, organization_id, Provider.EVOLUTION, secret, path_event=event_suffix))


@router.post(
    "/megaapi/{organization_id}", response_model=WebhookAck, openapi_extra=webhook_request_body(MEGAAPI_WEBHOOK)
)
async def megaapi_webhook(request: Request, organization_id: uuid.UUID, secret: SecretDep) -> Response:
    """MegaAPI deliveries."""
    return acknowledged(await receive(request, organization_id, Provider.MEGAAPI, secret))


@router.post(
    "/waha/{organization_id}",
    response_model=WebhookAck,
    openapi_extra=webhook_request_body(WAHA_WEBHOOK, required=("event",)),
)
async def waha_webhook(request: Request, organization_id: uuid.UUID, secret: SecretDep) -> Response:
    """WAHA deliveries (every event to one URL), HMAC-signed or with the secret in a custom header."""
    return acknowledged(await receive(request, organization_id, Provider.WAHA, secret))
