"""The tasks' retry policy: only transient failures are retried, and only by the layer that should (tasks/options.py).

The predicate is tested on its own; real task runs under the test Prefect server count the attempts.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
from prefect import Task, flow, task
from prefect.context import TaskRunContext
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from core.errors import DatabaseUnavailable, GatewayError, GatewayTransientError, GatewayUnavailable
from db.engine import get_engine
from gateways.resilience import raise_for_status
from tasks.options import TASK_OPTIONS, is_transient, retried_by_task

T = TypeVar("T")
SQL = "SELECT 1"


def gateway_error(status: int) -> GatewayError:
    """The error a gateway client raises for an answer with HTTP ``status``."""
    try:
        raise_for_status("evolution", "fetchInstances", httpx.Response(status))
    except GatewayError as exc:
        return exc
    raise AssertionError(f"HTTP {status} raised nothing")


def lost_connection() -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError(SQL, {}, psycopg.InterfaceError("the connection is lost"), connection_invalidated=True)


TRANSIENT = {
    "gateway-timeout": GatewayTransientError("evolution: fetchInstances timed out"),
    "breaker-open": GatewayUnavailable("evolution: circuit breaker is open"),
    "database-unavailable": DatabaseUnavailable("the database is unreachable: OperationalError"),
    "connection-invalidated": lost_connection(),
    "sqlalchemy-operational": sa_exc.OperationalError(
        SQL, {}, psycopg.OperationalError("server closed the connection")
    ),
    "psycopg-operational": psycopg.OperationalError("server closed the connection unexpectedly"),
    "serialization": psycopg.errors.SerializationFailure("could not serialize access"),
    "deadlock": psycopg.errors.DeadlockDetected("deadlock detected"),
    "serialization-wrapped": sa_exc.DBAPIError(SQL, {}, psycopg.errors.SerializationFailure("could not serialize")),
    "deadlock-wrapped": sa_exc.OperationalError(SQL, {}, psycopg.errors.DeadlockDetected("deadlock detected")),
}

PERMANENT = {
    "value-error": ValueError("a bug"),
    "runtime-error": RuntimeError("a bug"),
    "integrity": sa_exc.IntegrityError(SQL, {}, psycopg.errors.UniqueViolation("duplicate key")),
    "integrity-raw": psycopg.errors.UniqueViolation("duplicate key"),
    "programming": sa_exc.ProgrammingError(SQL, {}, psycopg.errors.UndefinedTable("no such table")),
    "statement-timeout": sa_exc.OperationalError(SQL, {}, psycopg.errors.QueryCanceled("statement timeout")),
    "statement-timeout-raw": psycopg.errors.QueryCanceled("statement timeout"),
    "interface-not-invalidated": sa_exc.DBAPIError(SQL, {}, psycopg.InterfaceError("bad parameter")),
    "gateway-4xx": gateway_error(400),
    "gateway-404": gateway_error(404),
}


@pytest.mark.pure
@pytest.mark.parametrize("error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_failures_a_retry_can_cure_are_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.pure
@pytest.mark.parametrize("error", PERMANENT.values(), ids=PERMANENT.keys())
def test_integrity_programming_and_other_errors_are_permanent(error: BaseException) -> None:
    assert not is_transient(error)
    assert not retried_by_task(error)


@pytest.mark.pure
def test_tasks_leave_gateway_errors_to_the_client_that_already_retried_them() -> None:
    assert not retried_by_task(TRANSIENT["gateway-timeout"])
    assert not retried_by_task(TRANSIENT["breaker-open"])
    assert retried_by_task(TRANSIENT["database-unavailable"])
    assert retried_by_task(TRANSIENT["deadlock-wrapped"])


# -- real task runs ------------------------------------------------------------------------------------------------


async def _raise_sqlstate(code: str) -> None:
    """Make PostgreSQL itself raise an error with SQLSTATE ``code`` (SQLAlchemy wraps it as the driver reports it)."""
    async with get_engine().connect() as conn:
        await conn.execute(text(f"DO $$ BEGIN RAISE EXCEPTION 'raised by the test' USING ERRCODE = '{code}'; END $$"))


def _run_count() -> int:
    """Which run of its task run this is, by Prefect's own count (1 for the first attempt)."""
    context = TaskRunContext.get()
    assert context is not None
    return context.task_run.run_count


async def _in_a_flow(write: Task[[], Coroutine[Any, Any, T]]) -> T | Exception:
    """Call the task once inside a flow run, as the flows do: what it returned, or what it raised."""
    outcome: list[T | Exception] = []

    @flow(name="test-task-retries")
    async def caller() -> None:
        try:
            outcome.append(await write.with_options(retry_delay_seconds=0)())
        except Exception as exc:
            outcome.append(exc)

    await caller()
    return outcome[0]


@pytest.mark.usefixtures("prefect_server")
async def test_a_deadlock_is_retried_until_the_task_succeeds() -> None:
    attempts: list[int] = []

    @task(name="test-deadlocked-write", **TASK_OPTIONS)
    async def write() -> str:
        attempts.append(_run_count())
        if len(attempts) < 3:
            await _raise_sqlstate("40P01")  # deadlock_detected: PostgreSQL aborted this transaction
        return "written"

    outcome = await _in_a_flow(write)

    assert outcome == "written"
    assert attempts == [1, 2, 3]


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("sqlstate", "error"),
    [("23505", sa_exc.IntegrityError), (None, ValueError), ("gateway", GatewayTransientError)],
    ids=["integrity-error", "value-error", "gateway-error-after-client-retries"],
)
async def test_a_permanent_error_is_not_retried(sqlstate: str | None, error: type[Exception]) -> None:
    attempts: list[int] = []

    @task(name="test-failing-write", **TASK_OPTIONS)
    async def write() -> None:
        attempts.append(_run_count())
        if sqlstate == "gateway":
            raise GatewayTransientError("evolution: fetchInstances timed out")
        if sqlstate is not None:
            await _raise_sqlstate(sqlstate)  # unique_violation
        raise ValueError("a bug")

    outcome = await _in_a_flow(write)

    assert isinstance(outcome, error)
    assert attempts == [1]
