"""`GET /events`: server-sent events for the caller's organization (seed 003's live notifications).

Any process publishes into `live_events` and NOTIFYs (zapsync/notify.py). Each API process keeps one LISTEN
connection (:class:`LiveBroker`, started with its first client, closed with its last) and wakes the streams of the
notified organization; a stream then reads the rows by id, filtered by its organization, so no client ever sees
another organization's events. `Last-Event-ID` resumes from the table; a lost LISTEN connection is re-opened and
every stream re-reads what it may have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
import psycopg
from fastapi import APIRouter, Header, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import BriefPrincipalDep, scoped_organization
from db.engine import session_scope
from db.repositories.live_events import (
    StoredLiveEvent,
    events_after,
    events_by_id,
    latest_event_id,
    listener_conninfo,
    listening,
    parse_notification,
)

log = logging.getLogger("zapsync.events")
router = APIRouter(tags=["events"])

RESYNC = -1
"""Queued instead of ids when a stream may have missed notifications: it re-reads from its last event."""
QUEUE_SIZE = 256
BACKLOG_PAGE = 500
PING_SECONDS = 15


class LiveBroker:
    """Fans one LISTEN connection out to this process's streams, by organization (None: every organization)."""

    def __init__(self) -> None:
        self._queues: dict[uuid.UUID | None, set[asyncio.Queue[list[int]]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def subscribe(self, organization_id: uuid.UUID | None) -> asyncio.Queue[list[int]]:
        """A queue of notified event ids for one organization; returns once the LISTEN is in place."""
        queue: asyncio.Queue[list[int]] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._queues[organization_id].add(queue)
        if self._task is None or self._task.done():
            self._ready.clear()
            self._task = asyncio.create_task(self._listen(), name="zapsync-live-events")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=10)
        except TimeoutError:
            log.warning("live events: LISTEN not ready after 10 s; the stream will catch up when it is")
        return queue

    async def unsubscribe(self, organization_id: uuid.UUID | None, queue: asyncio.Queue[list[int]]) -> None:
        """Drop a stream's queue; the LISTEN connection closes with the last one."""
        queues = self._queues.get(organization_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._queues[organization_id]
        if not self._queues and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _offer(self, organization_id: uuid.UUID | None, ids: list[int]) -> None:
        targets = self._queues.get(organization_id, set()) | self._queues.get(None, set())
        for queue in targets:
            try:
                queue.put_nowait(ids)
            except asyncio.QueueFull:  # a slow client: replace its backlog with one re-read
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait([RESYNC])

    async def _listen(self) -> None:
        delay, lost = 0.5, False
        while True:
            try:
                async with listening(listener_conninfo()) as conn:
                    self._ready.set()
                    delay = 0.5
                    if lost:
                        for org in list(self._queues):
                            self._offer(org, [RESYNC])
                    async for note in conn.notifies():
                        parsed = parse_notification(note.payload)
                        if parsed is not None:
                            self._offer(*parsed)
            except (psycopg.Error, OSError) as exc:
                log.warning("live events: LISTEN connection lost (%s); retrying in %.1f s", type(exc).__name__, delay)
                lost = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def broker_for(request: Request) -> LiveBroker:
    """This app's broker (one per API process)."""
    broker = getattr(request.app.state, "live_broker", None)
    if broker is None:
        broker = request.app.state.live_broker = LiveBroker()
    return broker


def _sse(event: StoredLiveEvent) -> ServerSentEvent:
    body = {
        "id": event.id,
        "kind": event.kind,
        "organization_id": str(event.organization_id),
        "created_at": event.created_at.isoformat(),
        "payload": event.payload,
    }
    return ServerSentEvent(data=orjson.dumps(body).decode(), event=event.kind, id=str(event.id))


async def stream_events(
    broker: LiveBroker, organization_id: uuid.UUID | None, queue: asyncio.Queue[list[int]], after: int | None
) -> AsyncIterator[ServerSentEvent]:
    """Backlog after ``after`` (a resumed stream), then every notified event of the organization, in commit order."""
    recent: deque[int] = deque(maxlen=4096)
    try:
        if after is None:
            async with session_scope() as session:
                last = await latest_event_id(session)
            pending: list[int] = []
        else:
            last, pending = after, [RESYNC]
        while True:
            if not pending:
                pending = await queue.get()
            while not queue.empty():
                pending += queue.get_nowait()
            resync = RESYNC in pending
            async with session_scope() as session:
                if resync:
                    found = await events_after(session, last, organization_id=organization_id, limit=BACKLOG_PAGE)
                else:
                    found = await events_by_id(session, pending, organization_id=organization_id)
            pending = [RESYNC] if resync and len(found) == BACKLOG_PAGE else []
            for event in found:
                if event.id in recent:
                    continue
                recent.append(event.id)
                last = max(last, event.id)
                yield _sse(event)
    finally:
        await broker.unsubscribe(organization_id, queue)


@router.get("/events", response_class=EventSourceResponse)
async def events(
    request: Request,
    principal: BriefPrincipalDep,
    organization_id: uuid.UUID | None = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """Live events of the token's organization (an admin token: one organization, or all when none is named).

    Event names: `instance.status`, `instance.qr`, `message.new`, `health.alert`, `health.reconnect`,
    `health.recovered`, `gateway.unhealthy`, `gateway.recovered`, `conversations.closed`, `flow.result`. Each
    event's `id` can be sent back as `Last-Event-ID` to resume.
    """
    scope = scoped_organization(principal, organization_id)
    after = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else None
    broker = broker_for(request)
    queue = await broker.subscribe(scope)
    return EventSourceResponse(
        stream_events(broker, scope, queue, after),
        ping=PING_SECONDS,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
