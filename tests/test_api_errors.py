"""Error answers and request ids: every response carries `X-Request-ID`; errors answer JSON with that id; an
unexpected exception is a JSON 500 whose logged traceback names the id and holds no SQL parameter."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import StatementError
from starlette.types import Message, Receive, Scope, Send

from api.deps import SessionDep
from api.errors import RequestIds, redacted_traceback
from api.main import create_app
from core.errors import GatewayNotFound, GatewayNotSupported, GatewayTransientError, NotFound
from db.engine import session_scope

SECRET_VALUE = "s3cret-param-9f2c"
BAD_CAST = "SELECT CAST(:value AS integer) AS n"


class Boom(RuntimeError):
    """Raised by the test routes below: nothing in zapsync handles it."""


@pytest.fixture
def app() -> FastAPI:
    """The real app, plus routes that fail the ways production code might (added to this instance only)."""
    app = create_app(check_database=False)

    @app.get("/test/boom")
    async def boom() -> None:
        raise Boom("kaput")

    @app.get("/test/sql")
    async def sql(session: SessionDep) -> None:
        await session.execute(text(BAD_CAST), {"value": SECRET_VALUE})

    @app.get("/test/not-found")
    async def not_found() -> None:
        raise NotFound("no such widget")

    @app.get("/test/gateway/{kind}")
    async def gateway(kind: str) -> None:
        if kind == "not-found":
            raise GatewayNotFound("instance unknown at the gateway", upstream_status=404, gateway="evolution")
        if kind == "transient":
            raise GatewayTransientError("gateway timed out", gateway="evolution")
        raise GatewayNotSupported("no such operation", gateway="megaapi")

    @app.get("/test/count")
    async def count(n: int) -> dict[str, int]:
        return {"n": n}

    return app


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zapsync") as client:
        yield client


def api_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "zapsync.api" and r.levelno == logging.ERROR]


async def test_unexpected_exception_is_a_json_500_logged_with_its_request_id(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="zapsync.api")

    response = await http.get("/test/boom?secret=query-secret")

    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "InternalError" and body["detail"] == "unexpected error; quote the request id"
    assert body["request_id"] and response.headers["x-request-id"] == body["request_id"]
    [record] = api_errors(caplog)
    message = record.getMessage()
    assert body["request_id"] in message and "GET /test/boom" in message
    assert "Traceback (most recent call last):" in message and "in boom" in message
    assert "test_api_errors.Boom: kaput" in message
    assert "query-secret" not in message


async def test_a_supplied_request_id_is_echoed_and_an_odd_one_replaced(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="zapsync.api")

    ok = await http.get("/healthz", headers={"x-request-id": "lb-7f3a.trace_01"})
    failed = await http.get("/test/boom", headers={"x-request-id": "caller-42"})
    odd = await http.get("/healthz", headers={"x-request-id": 'a b"<script>'})
    long = await http.get("/healthz", headers={"x-request-id": "x" * 65})
    fresh = [(await http.get("/healthz")).headers["x-request-id"] for _ in range(2)]

    assert ok.status_code == 200 and ok.headers["x-request-id"] == "lb-7f3a.trace_01"
    assert failed.headers["x-request-id"] == failed.json()["request_id"] == "caller-42"
    assert "caller-42" in api_errors(caplog)[0].getMessage()
    for replaced in (odd, long, *fresh):
        rid = replaced if isinstance(replaced, str) else replaced.headers["x-request-id"]
        assert len(rid) == 32 and all(c in "0123456789abcdef" for c in rid)
    assert fresh[0] != fresh[1]


async def test_zapsync_errors_answer_their_status_with_the_request_id(http: httpx.AsyncClient) -> None:
    not_found = await http.get("/test/not-found", headers={"x-request-id": "req-1"})
    unauthorized = await http.get("/instances/status")

    assert not_found.status_code == 404
    assert not_found.json() == {"error": "NotFound", "detail": "no such widget", "request_id": "req-1"}
    assert not_found.headers["x-request-id"] == "req-1"
    assert unauthorized.status_code == 401 and unauthorized.json()["error"] == "Unauthorized"
    assert unauthorized.json()["request_id"] == unauthorized.headers["x-request-id"]


async def test_gateway_errors_answer_the_status_of_their_class(http: httpx.AsyncClient) -> None:
    answers = {kind: await http.get(f"/test/gateway/{kind}") for kind in ("not-found", "transient", "unsupported")}

    # GatewayNotFound carries the gateway's 404, but zapsync answers 502: the caller's request was fine.
    assert {kind: r.status_code for kind, r in answers.items()} == {
        "not-found": 502,
        "transient": 503,
        "unsupported": 501,
    }
    assert [r.json()["error"] for r in answers.values()] == [
        "GatewayNotFound",
        "GatewayTransientError",
        "GatewayNotSupported",
    ]
    assert all(r.json()["request_id"] == r.headers["x-request-id"] for r in answers.values())


async def test_validation_errors_keep_their_422_with_the_request_id(http: httpx.AsyncClient) -> None:
    response = await http.get("/test/count?n=many", headers={"x-request-id": "req-422"})

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "InvalidInput" and "query.n" in body["detail"] and body["request_id"] == "req-422"


async def test_sql_parameters_never_reach_the_log(http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="zapsync.api")

    response = await http.get("/test/sql")

    assert response.status_code == 500 and response.json()["error"] == "InternalError"
    [record] = api_errors(caplog)
    message = record.getMessage()
    assert response.json()["request_id"] in message
    assert "sqlalchemy.exc.DataError" in message and "InvalidTextRepresentation" in message
    assert "sqlstate=22P02" in message and "CAST(%(value)s AS integer)" in message
    assert SECRET_VALUE not in message


async def test_redacted_traceback_hides_what_the_plain_one_shows() -> None:
    try:
        async with session_scope() as session:
            await session.execute(text(BAD_CAST), {"value": SECRET_VALUE})
    except StatementError as exc:
        plain = "".join(traceback.format_exception(exc))
        redacted = redacted_traceback(exc)
    else:
        pytest.fail("the cast should have failed")

    assert SECRET_VALUE in plain  # what a plain `log.exception` would have written
    assert SECRET_VALUE not in redacted
    assert redacted.count("Traceback (most recent call last):") == plain.count("Traceback (most recent call last):")
    assert "The above exception was the direct cause of the following exception" in redacted


class Recorder:
    """An ASGI `send` that keeps every message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)


async def no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def http_scope() -> Scope:
    return {"type": "http", "method": "GET", "path": "/stream", "headers": [(b"x-request-id", b"stream-1")]}


@pytest.mark.pure
async def test_streaming_responses_pass_through_unbuffered() -> None:
    release = asyncio.Event()

    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"last", "more_body": False})

    sent = Recorder()
    running = asyncio.create_task(RequestIds(streaming_app)(http_scope(), no_body, sent))
    for _ in range(100):  # let the app run until it waits: the first chunk must be through by then
        if len(sent.messages) >= 2:
            break
        await asyncio.sleep(0)

    assert not running.done()
    assert (b"x-request-id", b"stream-1") in sent.messages[0]["headers"]
    assert sent.messages[1]["body"] == b"first"
    release.set()
    await running
    assert [m.get("body") for m in sent.messages[1:]] == [b"first", b"last"]


@pytest.mark.pure
async def test_a_failure_after_the_response_started_is_logged_not_answered_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="zapsync.api")

    async def failing_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise Boom("mid-stream")

    sent = Recorder()
    await RequestIds(failing_stream)(http_scope(), no_body, sent)

    assert [m["type"] for m in sent.messages] == ["http.response.start"]
    [record] = api_errors(caplog)
    assert "stream-1" in record.getMessage() and "mid-stream" in record.getMessage()
