"""The one option set of zapsync's Prefect tasks: retry a task only when a retry can help and no layer below retried.

Retry budget per call path: each failure is retried by one layer only, so attempts do not multiply.

| layer | attempts | retries |
|---|---|---|
| gateway client (`gateways/resilience.py`, tenacity) | 3 | connection errors, timeouts, 429, 502/503/504 (1) |
| every task (`TASK_OPTIONS`) | 3 | transient database failures only, after 1 s and 5 s (2) |
| task `reconnect-instances` | 1 | none (3) |
| queue item (import) | 5 | transient failures, full-jitter backoff 5 s ×2 capped at 300 s (4) |
| flow `import-conversations` (the drain) | 1 | none (4) |
| flow `cleanup-sessions` | 2 | any failure, after 5 min (5) |
| flows `sync-status`, `monitor-health`, `close-inactive-conversations` | 1 | none (6) |

1. Full-jitter backoff (1 s ×2, 30 s cap) behind the gateway's breaker (5 failures → open 30 s): only the client
   sees HTTP statuses and the breaker.
2. Database unreachable, connection lost, serialization failure, deadlock (`is_transient`). A batch commits whole or
   in idempotent steps, so a rerun repeats nothing half-done. A gateway error reaches a task only after the
   client's 3 attempts (or from an open breaker): the task does not retry it, which would make 9.
3. A reconnect is asked once per failure streak; a failed one asks the user to act.
4. The drain retries each instance, not the whole run: a transient failure puts the item back with backoff and the
   import resumes at its checkpoint, so only the page that failed is asked again; a killed drain's items come back
   when their lease expires.
5. Safe: it deletes only what is still past retention. Useful: the schedule is daily, and a retry 5 min later
   outlasts a database restart that the task retries (6 s) do not.
6. The schedule is the retry (5 min, 1 min, hourly) and redoes the whole scope; an on-demand caller hears of the
   failure at once instead of after a retry.

So one gateway call is attempted at most 3 times per task attempt. A page task retried for a database failure
fetches its page again: 9 calls only if the database fails twice and the gateway needs every attempt each time;
an import retried from the queue asks again for the one page that failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import psycopg
from prefect import Task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.client.schemas.objects import State, TaskRun
from sqlalchemy import exc as sa_exc

from core.errors import DatabaseUnavailable, GatewayError, GatewayTransientError


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may cure ``exc``: a gateway or database that is briefly away, a lost connection, or a
    transaction PostgreSQL aborted to resolve a conflict (serialization failure, deadlock).

    Integrity and programming errors, bugs and every other exception are permanent. So is a cancelled statement
    (`statement_timeout`): run again, it would be as slow and cancelled again.
    """
    if isinstance(exc, GatewayTransientError | DatabaseUnavailable):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or _transient_driver_error(exc.orig):
            return True
        return isinstance(exc, sa_exc.OperationalError) and not isinstance(exc.orig, psycopg.errors.QueryCanceled)
    return _transient_driver_error(exc)


def _transient_driver_error(exc: BaseException | None) -> bool:
    """psycopg's operational errors (connection lost, server shutting down, serialization failure, deadlock)."""
    return isinstance(exc, psycopg.OperationalError) and not isinstance(exc, psycopg.errors.QueryCanceled)


def retried_by_task(exc: BaseException) -> bool:
    """Whether a task retries ``exc``: transient, and not a gateway error (the gateway client retried it already)."""
    return is_transient(exc) and not isinstance(exc, GatewayError)


def retry_on_transient(_task: Task[..., Any], _run: TaskRun, state: State[Any]) -> bool:
    """Prefect's `retry_condition_fn`: the failed state carries the exception the task raised."""
    return isinstance(state.data, BaseException) and retried_by_task(state.data)


class TaskOptions(TypedDict):
    """Keyword arguments of `prefect.task` shared by zapsync's tasks."""

    cache_policy: CachePolicy
    retries: int
    retry_delay_seconds: list[float]
    retry_condition_fn: Callable[[Task[..., Any], TaskRun, State[Any]], bool]


TASK_OPTIONS: TaskOptions = {
    "cache_policy": NO_CACHE,  # tasks take clients and rows: never hash them into cache keys
    "retries": 2,
    "retry_delay_seconds": [1, 5],
    "retry_condition_fn": retry_on_transient,
}
"""Every task's options: ``@task(name=..., **TASK_OPTIONS)``."""
