"""Retry with full-jitter backoff and a circuit breaker per gateway, around one HTTP request.

Retryable (seed 003): connection refused/reset, DNS, timeouts, 429 and 502/503/504 — 3 tries, 1 s initial
delay doubling to a 30 s cap, each delay drawn uniformly from [0, cap] ("full jitter"). Permanent errors
(other 4xx) never retry and never trip the breaker. After 5 consecutive transient failures the breaker opens for
30 s; the next call after that is a trial (half-open) that closes it again on success.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from core.errors import (
    GatewayAuthError,
    GatewayError,
    GatewayNotFound,
    GatewayOutcomeUnknown,
    GatewayRequestError,
    GatewayTransientError,
    GatewayUnavailable,
)
from core.settings import api_key_setting

log = logging.getLogger("zapsync.gateways")

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is retried."""

    attempts: int = 3
    initial_seconds: float = 1.0
    max_seconds: float = 30.0


@dataclass(frozen=True)
class BreakerPolicy:
    """When a gateway's breaker opens and for how long."""

    failure_threshold: int = 5
    recovery_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    """Monotonic seconds the recovery is measured on (tests pass a clock they advance)."""


BREAKER_STATES = {STATE_CLOSED: "closed", STATE_OPEN: "open", STATE_HALF_OPEN: "half_open"}


class ClockedBreaker(CircuitBreaker):  # type: ignore[misc]  # circuitbreaker is untyped (Any to mypy)
    """`circuitbreaker.CircuitBreaker` measuring its recovery on ``clock`` instead of ``time.monotonic``.

    The library stamps ``_opened`` with ``monotonic()`` when a failure reaches the threshold and compares it with
    ``monotonic()`` in ``open_remaining``; both places are re-done here on the injected clock.
    """

    def __init__(self, *, clock: Callable[[], float], **kwargs: Any) -> None:
        self._clock = clock
        super().__init__(**kwargs)
        self._opened = clock()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        suppress: bool = super().__exit__(exc_type, exc_value, traceback)
        if self._failure_count >= self._failure_threshold:  # this failure (re)opened the breaker
            self._opened = self._clock()
        return suppress

    @property
    def open_remaining(self) -> int:
        """Whole seconds the breaker stays open (rounded like the library: up while open, down after)."""
        remain: float = (self._opened + self._recovery_timeout) - self._clock()
        return math.ceil(remain) if remain > 0 else math.floor(remain)


def make_breaker(gateway: str, policy: BreakerPolicy) -> CircuitBreaker:
    """A breaker counting consecutive transient failures of one gateway."""
    return ClockedBreaker(
        clock=policy.clock,
        failure_threshold=policy.failure_threshold,
        recovery_timeout=policy.recovery_seconds,
        expected_exception=GatewayTransientError,
        name=f"gateway:{gateway}",
    )


@contextlib.contextmanager
def translate_errors(gateway: str, what: str) -> Iterator[None]:
    """Map httpx exceptions to zapsync's gateway errors, in one place (messages carry no secrets)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise GatewayTransientError(f"{gateway}: {what} timed out", gateway=gateway) from exc
    except httpx.TransportError as exc:
        raise GatewayTransientError(f"{gateway}: {what} failed: {type(exc).__name__}", gateway=gateway) from exc


NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
"""Transport failures that happen before a request leaves: a retry cannot duplicate anything."""
NOTHING_ACCEPTED_STATUS = frozenset({429, 503})
"""Answers that say the gateway took nothing (rate limited, unavailable): a send may be tried again."""


@contextlib.contextmanager
def translate_once_errors(gateway: str, what: str) -> Iterator[None]:
    """Like :func:`translate_errors` for a request that must not be repeated blindly (a send): a failure before the
    request left is transient; a timeout or a broken connection after it left is an unknown outcome."""
    try:
        yield
    except NOT_SENT_ERRORS as exc:
        raise GatewayTransientError(f"{gateway}: {what} failed: {type(exc).__name__}", gateway=gateway) from exc
    except httpx.TimeoutException as exc:
        raise GatewayOutcomeUnknown(
            f"{gateway}: {what} got no answer in time ({type(exc).__name__})", gateway=gateway
        ) from exc
    except httpx.TransportError as exc:
        raise GatewayOutcomeUnknown(
            f"{gateway}: {what} lost its connection before the answer ({type(exc).__name__})", gateway=gateway
        ) from exc


def auth_failure(gateway: str, what: str, code: int) -> str:
    """What a 401/403 means to an operator: the key was refused, and which setting holds it."""
    return f"{gateway}: {what} was refused (HTTP {code}): authentication failed, check {api_key_setting(gateway)}"


def raise_for_status(gateway: str, what: str, response: httpx.Response) -> None:
    """Raise the gateway error matching a non-2xx answer."""
    code = response.status_code
    if code < 400:
        return
    body = response.text[:500]
    message = f"{gateway}: {what} answered HTTP {code}"
    if code in RETRYABLE_STATUS:
        raise GatewayTransientError(message, gateway=gateway)
    if code in (401, 403):
        raise GatewayAuthError(auth_failure(gateway, what, code), upstream_status=code, body=body, gateway=gateway)
    if code == 404:
        raise GatewayNotFound(message, upstream_status=code, body=body, gateway=gateway)
    raise GatewayRequestError(message, upstream_status=code, body=body, gateway=gateway)


def is_retryable(exc: BaseException) -> bool:
    """Transient failures retry; an open breaker does not (it would only wait out its own timer)."""
    return isinstance(exc, GatewayTransientError) and not isinstance(exc, GatewayUnavailable)


async def call_once(gateway: str, breaker: CircuitBreaker, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run ``attempt`` once behind the breaker (no retry): an open breaker fails fast with GatewayUnavailable."""
    if breaker.opened:
        raise GatewayUnavailable(f"{gateway}: circuit breaker is open", gateway=gateway)
    result: T = await breaker.call_async(attempt)
    return result


async def call_with_resilience(
    gateway: str,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
) -> T:
    """Run ``attempt`` behind the breaker, retrying transient failures with full-jitter backoff."""

    async def once() -> T:
        if breaker.opened:
            raise GatewayUnavailable(f"{gateway}: circuit breaker is open", gateway=gateway)
        result: T = await breaker.call_async(attempt)
        return result

    retrying = AsyncRetrying(
        stop=stop_after_attempt(retry.attempts),
        wait=wait_random_exponential(multiplier=retry.initial_seconds, max=retry.max_seconds),
        retry=retry_if_exception(is_retryable),
        reraise=True,
        before_sleep=lambda state: log.debug(
            "[GATEWAY] %s retry %d after %s",
            gateway,
            state.attempt_number,
            type(state.outcome.exception()).__name__ if state.outcome else "?",
        ),
    )
    async for try_ in retrying:
        with try_:
            return await once()
    raise GatewayError(f"{gateway}: no attempt made", gateway=gateway)  # pragma: no cover
