"""Retry timing for queued work: exponential backoff with full jitter, and when to stop trying."""

from __future__ import annotations

import random
from collections.abc import Callable

_MAX_EXPONENT = 62  # 2**62 seconds is far past any cap; keeps the arithmetic finite for absurd attempt counts


def retry_delay(attempts: int, *, initial: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempts`` (1 = the first try):
    uniform in [0, min(cap, initial * 2**(attempts-1))) ("full jitter"), so a burst of failures spreads out."""
    exponent = min(max(attempts, 1) - 1, _MAX_EXPONENT)
    return min(cap, initial * 2.0**exponent) * rand()


def should_give_up(attempts: int, max_attempts: int) -> bool:
    """Whether an item that has failed ``attempts`` times (counted at claim) must not be tried again."""
    return attempts >= max_attempts
