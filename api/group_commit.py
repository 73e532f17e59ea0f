"""Group commit: work items arriving while a transaction commits are gathered and applied in one transaction.

There is no timer: the first item of a quiet moment is applied alone, at once; items that arrive while a batch
is in flight wait in the queue, and when it ends the queue is taken (up to ``max_batch``) as the next batch. A
second batch runs beside the first (up to ``max_inflight``) only once ``min_parallel`` items wait: a batch of one
costs a transaction like a batch of a hundred. So at low load nothing waits, and at high load each transaction
carries the items that arrived during the previous one: the batch size follows the load. Each caller is answered
when the batch that carried its item has committed (or failed).

A batch that fails for lack of a database fails every caller with that error (:class:`DatabaseUnavailable`);
any other failure (one bad item) is retried item by item, each in its own transaction, so one item cannot fail the
others. ``apply_batch`` may also leave an item to be applied alone (:data:`ALONE` in its answer), after the batch.

The same queue serves reads that many requests make at once (:func:`webhook_credentials_of`): one lookup, started
after each waiter arrived, answers all of them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Generic, Literal, TypeVar

import psycopg
from sqlalchemy import exc as sa_exc

from core.errors import DatabaseUnavailable
from db.engine import driver_connection, get_engine
from db.repositories.organizations import WebhookCredentials, webhook_credentials_many

log = logging.getLogger("zapsync.webhooks")

T = TypeVar("T")
R = TypeVar("R")


class _Alone(enum.Enum):
    ALONE = "alone"


ALONE: Final = _Alone.ALONE
"""An ``apply_batch`` answer: apply this item alone, after the batch."""
Alone = Literal[_Alone.ALONE]


class GroupCommitter(Generic[T, R]):
    """Applies submitted items in batches (see the module docstring); one per event loop."""

    def __init__(
        self,
        apply_batch: Callable[[Sequence[T]], Awaitable[Sequence[R | Alone]]],
        apply_one: Callable[[T], Awaitable[R]],
        *,
        max_batch: int = 256,
        max_inflight: int = 3,
        min_parallel: int = 4,
    ) -> None:
        self._apply_batch = apply_batch
        self._apply_one = apply_one
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.min_parallel = min_parallel
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Batches applied so far (of any size)."""
        self.largest = 0
        """The largest batch so far."""

    async def submit(self, item: T) -> R:
        """Apply ``item`` with whatever else is waiting; its result once its transaction has committed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        while self._queue and (
            self._inflight == 0 or (self._inflight < self.max_inflight and len(self._queue) >= self.min_parallel)
        ):
            size = min(len(self._queue), self.max_batch)
            batch = [self._queue.popleft() for _ in range(size)]
            self._inflight += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            if len(batch) == 1:
                await self._alone(*batch[0])
                return
            try:
                results = await self._apply_batch([item for item, _ in batch])
            except DatabaseUnavailable as exc:
                for _, future in batch:
                    _fail(future, exc)
                return
            except Exception as exc:  # one bad item: apply each alone, so it cannot fail the others
                log.warning("group commit of %d deliveries failed (%s): applying them one by one", len(batch), exc)
                for item, future in batch:
                    await self._alone(item, future)
                return
            for (item, future), result in zip(batch, results, strict=True):
                if result is ALONE:
                    await self._alone(item, future)
                elif not future.done():
                    future.set_result(result)
        except BaseException as exc:  # cancelled (shutdown): nobody may wait for ever
            for _, future in batch:
                _fail(future, exc if isinstance(exc, Exception) else DatabaseUnavailable("the API is stopping"))
            raise
        finally:
            self._inflight -= 1
            self._kick()

    async def _alone(self, item: T, future: asyncio.Future[R]) -> None:
        try:
            result = await self._apply_one(item)
        except Exception as exc:
            _fail(future, exc)
        else:
            if not future.done():
                future.set_result(result)


def _fail(future: asyncio.Future[R], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# -- shared reads --------------------------------------------------------------------------------------------------


_UNREACHABLE = (
    OSError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
"""What a lost database raises (as :func:`db.engine.session_scope` maps it), through SQLAlchemy or psycopg."""


async def _read_credentials(organization_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, WebhookCredentials]:
    """One statement on a pooled connection in autocommit: the pool's pre-ping and the read, no BEGIN or COMMIT, no
    ORM session (a connection kept out of the pool would outlive the engine's disposal)."""
    try:
        async with get_engine().connect() as connection:
            driver = await driver_connection(await connection.execution_options(isolation_level="AUTOCOMMIT"))
            try:
                return await webhook_credentials_many(driver, list(dict.fromkeys(organization_ids)))
            except (psycopg.OperationalError, psycopg.InterfaceError):  # cut under us: not back into the pool
                await connection.invalidate()
                raise
    except _UNREACHABLE as exc:
        raise DatabaseUnavailable(f"the database is unreachable: {type(exc).__name__}") from exc


async def _credentials_batch(organization_ids: Sequence[uuid.UUID]) -> list[WebhookCredentials | None]:
    found = await _read_credentials(organization_ids)
    return [found.get(org) for org in organization_ids]


async def _credentials_one(organization_id: uuid.UUID) -> WebhookCredentials | None:
    return (await _read_credentials([organization_id])).get(organization_id)


_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommitter[uuid.UUID, WebhookCredentials | None]] = (
    weakref.WeakKeyDictionary()
)


async def webhook_credentials_of(organization_id: uuid.UUID) -> WebhookCredentials | None:
    """The organization's webhook credentials as :func:`webhook_credentials` reads them, one lookup (one statement
    on a pooled autocommit connection) answering every delivery that arrived while the previous lookup ran."""
    loop = asyncio.get_running_loop()
    reader = _readers.get(loop)
    if reader is None:
        reader = _readers[loop] = GroupCommitter(_credentials_batch, _credentials_one)
    return await reader.submit(organization_id)
