"""The HTTP plumbing every provider client shares: one AsyncClient, timeouts, retry, breaker, concurrency."""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
import orjson
from pydantic import TypeAdapter, ValidationError

from core.errors import GatewayRequestError, GatewayTransientError
from gateways.resilience import (
    BREAKER_STATES,
    NOTHING_ACCEPTED_STATUS,
    BreakerPolicy,
    RetryPolicy,
    call_once,
    call_with_resilience,
    make_breaker,
    raise_for_status,
    translate_errors,
    translate_once_errors,
)

if TYPE_CHECKING:
    from gateways.prometheus import MetricsAccess

CONNECTIONS_PER_POOL = 8
_JSON_HEADERS = {"Content-Type": "application/json"}


class Sink(Protocol):
    """Takes a response body chunk by chunk."""

    def feed(self, chunk: bytes) -> None: ...


_S = TypeVar("_S", bound=Sink)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One default TLS context per process: building one loads the CA bundle (~60 ms)."""
    return httpx.create_ssl_context()


class HttpGateway:
    """Base for provider clients: keyword-only construction, an async context manager closing its client.

    A provider says how its key travels (:meth:`auth_headers`); the rest of the construction is shared.
    """

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str,
        timeout: httpx.Timeout,
        max_concurrency: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        metrics: MetricsAccess | None = None,
    ) -> None:
        self.name = name
        self.metrics = metrics
        """Where every instance's live state is read in one call (Evolution's or WAHA's `/metrics`), else None."""
        self.live_state_error: str | None = None
        """Why the last ``fetch_states`` could not use ``metrics`` (and fell back), else None."""
        headers = self.auth_headers(api_key)
        # httpcore's pool bookkeeping is quadratic in its connection count (encode/httpcore#1035): several small
        # pools cost ~0.7 ms of CPU per request where one pool of 32 costs ~4 ms.
        shards = -(-max_concurrency // CONNECTIONS_PER_POOL)
        per_pool = -(-max_concurrency // shards)
        self._clients = [
            httpx.AsyncClient(
                base_url=base_url,
                headers=headers,
                timeout=timeout,
                transport=transport,
                verify=_tls_context(),
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
            )
            for _ in range(shards)
        ]
        self._in_flight = [0] * shards
        self._timeouts: dict[float, httpx.Timeout] = {}
        self._retry = retry or RetryPolicy()
        self.breaker = make_breaker(name, breaker or BreakerPolicy())
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self.max_concurrency = max_concurrency

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        """The headers that carry the gateway's key on every request."""
        raise NotImplementedError

    @property
    def breaker_state(self) -> str:
        """`closed`, `open` or `half_open`."""
        return BREAKER_STATES.get(self.breaker.state, str(self.breaker.state))

    async def request_bytes(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """One request with retries behind the breaker; returns the raw body of a 2xx answer (``headers`` are added
        to the client's)."""

        async def attempt() -> bytes:
            async with self._concurrency:
                shard = min(range(len(self._clients)), key=self._in_flight.__getitem__)
                self._in_flight[shard] += 1
                try:
                    with translate_errors(self.name, what):
                        response = await self._clients[shard].request(
                            method, path, json=json, params=params, headers=headers
                        )
                        raise_for_status(self.name, what, response)
                        return await response.aread()
                finally:
                    self._in_flight[shard] -= 1

        return await call_with_resilience(self.name, self.breaker, self._retry, attempt)

    async def request_stream(
        self,
        method: str,
        path: str,
        *,
        what: str,
        sink: Callable[[], _S],
        params: dict[str, Any] | None = None,
    ) -> _S:
        """Like :meth:`request_bytes`, but the 2xx body goes chunk by chunk, as it arrives, to a new ``sink()`` per
        attempt (never joined in memory); returns the sink of the attempt that read the whole body."""

        async def attempt() -> _S:
            async with self._concurrency:
                shard = min(range(len(self._clients)), key=self._in_flight.__getitem__)
                self._in_flight[shard] += 1
                try:
                    with translate_errors(self.name, what):
                        async with self._clients[shard].stream(method, path, params=params) as response:
                            if response.status_code >= 400:
                                await response.aread()
                                raise_for_status(self.name, what, response)
                            target = sink()
                            async for chunk in response.aiter_bytes():
                                target.feed(chunk)
                            return target
                finally:
                    self._in_flight[shard] -= 1

        return await call_with_resilience(self.name, self.breaker, self._retry, attempt)

    async def request_once(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: Any = None,
        timeout_seconds: float | None = None,
    ) -> tuple[int, bytes]:
        """One request that must not be repeated blindly (a send): no retry, behind the breaker.

        Returns (status, body) of any answer but 429/503, which (like a connection that could not be made, or an
        open breaker) raise GatewayTransientError: the gateway took nothing. A timeout or a broken connection after
        the request left raises GatewayOutcomeUnknown. ``timeout_seconds`` bounds the wait for the answer.
        """
        timeout: Any = httpx.USE_CLIENT_DEFAULT if timeout_seconds is None else self._send_timeout(timeout_seconds)
        if json is not None:  # one C-speed encoding, no per-call JSON encoder setup in httpx
            body, headers = orjson.dumps(json), _JSON_HEADERS
        else:
            body, headers = None, None

        async def attempt() -> tuple[int, bytes]:
            async with self._concurrency:
                shard = min(range(len(self._clients)), key=self._in_flight.__getitem__)
                self._in_flight[shard] += 1
                try:
                    with translate_once_errors(self.name, what):
                        response = await self._clients[shard].request(
                            method, path, content=body, headers=headers, timeout=timeout
                        )
                        content = await response.aread()
                finally:
                    self._in_flight[shard] -= 1
            if response.status_code in NOTHING_ACCEPTED_STATUS:
                raise GatewayTransientError(
                    f"{self.name}: {what} answered HTTP {response.status_code}", gateway=self.name
                )
            return response.status_code, content

        return await call_once(self.name, self.breaker, attempt)

    def _send_timeout(self, seconds: float) -> httpx.Timeout:
        """The timeout of a call bounded by ``seconds`` (one object per bound, not one per call)."""
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            connect = self._clients[0].timeout.connect
            timeout = self._timeouts[seconds] = httpx.Timeout(seconds, connect=min(connect or seconds, seconds))
        return timeout

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Like :meth:`request_bytes`, decoding the JSON body (None when empty)."""
        content = await self.request_bytes(method, path, what=what, json=json, params=params)
        return self.decode(content, what=what)

    def decode(self, content: bytes, *, what: str, adapter: TypeAdapter[Any] | None = None) -> Any:
        """Decode a JSON body (straight into ``adapter``'s type when given); bad JSON is a permanent error."""
        try:
            if adapter is not None:
                return adapter.validate_json(content)
            return orjson.loads(content) if content else None
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise GatewayRequestError(
                f"{self.name}: {what} answered an unexpected body",
                upstream_status=200,
                body=content[:200].decode(errors="replace"),
                gateway=self.name,
            ) from exc

    async def aclose(self) -> None:
        """Close the HTTP client."""
        for client in self._clients:
            await client.aclose()

    async def __aenter__(self) -> HttpGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
