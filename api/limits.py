"""Request body limits, enforced before a body is read in full, on every route, authenticated or not.

:class:`BodyLimits` is a pure ASGI middleware. A request whose `Content-Length` is over its route's limit is
answered 413 without the application seeing it; a body streamed without one (chunked) is counted as the application
reads it, and the first chunk over the limit ends it: the client gets 413 and the application sees the client gone
(whatever it answers after that is dropped). Webhook routes (`/webhooks/…`) keep ``webhook_max_body_bytes``; every
other route has ``api_max_body_bytes``.

Webhook routes skip the `Content-Length` check: they authenticate before reading the body, so an unauthenticated
post of any size gets 401 with its body never read (the route checks `Content-Length` itself once the sender is
known); what they do read is still counted here.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from core.settings import get_settings

WEBHOOK_PREFIX = "/webhooks/"


def body_limit(path: str) -> int:
    """The largest body (bytes) a request to ``path`` may carry."""
    settings = get_settings()
    return settings.webhook_max_body_bytes if path.startswith(WEBHOOK_PREFIX) else settings.api_max_body_bytes


class BodyLimits:
    """Pure ASGI middleware: 413 (a JSON error) for a body over its route's limit, before it is read in full.

    Installed inside :class:`api.errors.RequestIds`, so the answer carries the request id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = body_limit(path)
        declared = None if path.startswith(WEBHOOK_PREFIX) else Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(scope, send, f"body of {declared} bytes exceeds the {limit}-byte limit")
            return
        received = 0
        started = refused = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _refuse(scope, send, f"body exceeds the {limit}-byte limit")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 went out: the application's own answer is dropped
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # Else the application failed on the body it was refused (it saw the client gone): 413 was answered.


async def _refuse(scope: Scope, send: Send, detail: str) -> None:
    rid = scope.get("state", {}).get("request_id")
    response = JSONResponse(error_body("PayloadTooLarge", detail, rid), status_code=413)
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
