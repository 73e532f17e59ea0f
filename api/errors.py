"""One place that turns errors into HTTP answers: `{"error": ClassName, "detail": message, "request_id": id}`.

Every request gets a request id (the caller's `X-Request-ID` when it is a sane token, else a new one), echoed in
the `X-Request-ID` header of every response and in every error body. A zapsync error answers with its class's
status; an unexpected exception answers a JSON 500 and is logged once, with that id and a traceback whose
messages cannot carry SQL parameters.

Unexpected exceptions are caught by :class:`RequestIds`, a pure ASGI middleware, rather than by a handler
registered for `Exception`: Starlette runs such a handler in `ServerErrorMiddleware`, outside every user
middleware (its response would miss the header), and re-raises afterwards, so the server would log the raw
traceback, SQL parameters included, a second time.
"""

from __future__ import annotations

import logging
import re
import traceback
import uuid
from http import HTTPStatus

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.exc import StatementError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.openapi import install_openapi, served_routes
from core.errors import ZapsyncError

log = logging.getLogger("zapsync.api")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
INTERNAL_ERROR_DETAIL = "unexpected error; quote the request id"


def request_id(request: Request) -> str | None:
    """The id :class:`RequestIds` gave this request."""
    return getattr(request.state, "request_id", None)


def error_body(error: str, detail: str, rid: str | None) -> dict[str, str | None]:
    """The JSON body of every error answer."""
    return {"error": error, "detail": detail, "request_id": rid}


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers and the request-id middleware (which also answers unexpected exceptions), and make
    the OpenAPI document declare these answers (:mod:`api.openapi`)."""
    install_openapi(app)

    @app.exception_handler(ZapsyncError)
    async def zapsync_error(request: Request, exc: ZapsyncError) -> JSONResponse:
        # The class's status: GatewayRequestError's instance attribute of that name is the gateway's own answer.
        status = type(exc).status_code
        return JSONResponse(error_body(type(exc).__name__, exc.message, request_id(request)), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()[:10]]
        detail = "; ".join(problems) or "invalid request"
        return JSONResponse(error_body("InvalidInput", detail, request_id(request)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Routing's own answers (no such path, method not allowed) in the same shape as every other error.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = ", ".join(allowed_methods(request))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allowed})
            headers["Allow"] = allowed
        name = _status_name(exc.status_code)
        body = error_body(name, str(exc.detail), request_id(request))
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    app.add_middleware(RequestIds)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path, plus OPTIONS.

    Starlette's 405 lists only the methods of the first route whose path matched, so a path served by a GET route
    and a PATCH route (the organization settings) would advertise GET alone.
    """
    path = request.scope.get("path", "")
    methods = {"OPTIONS"}
    for view in served_routes(request.app.routes):
        if view.path_regex is not None and view.path_regex.match(path):
            methods |= view.methods
    return sorted(methods)


def _status_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    except ValueError:
        return "HTTPError"


class RequestIds:
    """Pure ASGI middleware: a request id per HTTP request, echoed in `X-Request-ID`; unexpected exceptions are
    logged (redacted, with the id) and answered with a JSON 500. Streaming responses pass through unbuffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = accepted_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != header[0]]
                message = {**message, "headers": [*kept, header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error(
                "[API] unexpected error in %s %s (request id %s)\n%s",
                scope.get("method"),
                scope.get("path"),  # never the query string: MegaAPI webhooks may carry ?secret=
                rid,
                redacted_traceback(exc),
            )
            if started:  # too late for a status: the client sees the response cut short
                return
            response = JSONResponse(error_body("InternalError", INTERNAL_ERROR_DETAIL, rid), status_code=500)
            await response(scope, receive, send_with_id)


def accepted_request_id(value: str | None) -> str | None:
    """``value`` when it is a sane request id (at most 64 of `A-Z a-z 0-9 . _ -`), else None."""
    return value if value is not None and _SANE_REQUEST_ID.fullmatch(value) else None


def redacted_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` and the exceptions it was raised from, as :mod:`traceback` prints it, except
    for messages that may hold values: SQLAlchemy statement errors show the statement without parameters,
    database driver errors only their SQLSTATE, pydantic validation errors only where and what failed."""
    return "".join(_chain(exc, set()))


def _chain(exc: BaseException, seen: set[int]) -> list[str]:
    seen.add(id(exc))
    lines: list[str] = []
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        lines += [*_chain(cause, seen), "\nThe above exception was the direct cause of the following exception:\n\n"]
    elif context is not None and not exc.__suppress_context__ and id(context) not in seen:
        lines += [*_chain(context, seen), "\nDuring handling of the above exception, another exception occurred:\n\n"]
    lines.append("Traceback (most recent call last):\n")
    lines += traceback.format_tb(exc.__traceback__)
    lines.append(f"{_describe(exc)}\n")
    if isinstance(exc, BaseExceptionGroup):
        for number, inner in enumerate(exc.exceptions, 1):
            lines += [f"+-- sub-exception {number} --\n", *_chain(inner, seen)]
    return lines


def _name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StatementError):
        orig = f"{_name(exc.orig)}{_sqlstate(exc.orig)}" if exc.orig is not None else "no driver error"
        return f"{_name(exc)}: ({orig}) [SQL: {exc.statement}] [parameters hidden]"
    if isinstance(exc, psycopg.Error):
        return f"{_name(exc)}{_sqlstate(exc)}: [message hidden: it may quote parameter values]"
    if isinstance(exc, ValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['type']}" for e in exc.errors()[:10])
        return f"{_name(exc)}: {exc.error_count()} errors for {exc.title} ({where}) [input values hidden]"
    message = str(exc)
    return f"{_name(exc)}: {message}" if message else _name(exc)


def _sqlstate(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    return f" sqlstate={state}" if state else ""
