"""Flow `import-conversations`: drain the import queue into PostgreSQL: chats, contacts and messages of instances.

A connect (webhook or status sync) or an API call enqueues an import of one instance in the same transaction as the
fact that asks for it (DESIGN.md §5.1). A drain run claims queued imports and works several instances at once
(``import_max_concurrency``); each instance is one task run, which works the first page of each phase itself and
every further page as a nested task run, and its report is kept with its queue item (and shown as an artifact). So
a storm of connects makes a handful of flow runs, not one per connect.

Per instance: its gateway (one that can read history, else "not supported") → the instance's import lock → the
import run to work on (resumed from its checkpoint, or new) → contacts pages → chats pages → message pages (a few at
once) → finalize. Every page fetches, writes and checkpoints in one transaction, so an import killed
anywhere resumes at the first page it had not finished. A reconnect imports incrementally: only messages newer than
the instance's last completed import (``full`` re-reads everything).

Imported history lands in one conversation per contact: open when its newest message is recent (``waiting`` if
the customer wrote last, ``in_progress`` if the business did), closed with reason ``imported`` otherwise — the
state the live path would have reached had zapsync been watching all along.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from prefect import flow, task
from prefect.artifacts import acreate_markdown_artifact, acreate_progress_artifact, aupdate_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import AsyncClientContext
from pydantic import BaseModel, Field

from core.domain import WorkKind
from core.logs import run_logger
from core.names import IMPORT_FLOW
from core.reports import DrainReport, ImportCounts, ImportReport, Outcome
from core.settings import get_settings
from db.engine import session_scope
from db.locks import try_advisory_lock
from db.repositories.conversations import InstanceScope, conversation_targets, instance_scope
from db.repositories.import_runs import (
    ImportRunRow,
    begin_import,
    finish_import,
    import_request,
    last_imported_until,
    read_run,
    request_imports,
)
from db.repositories.work_queue import ClaimedItem, ItemState
from flows.drain import DrainLimits, Handled, drain
from flows.guard import Reporting, current_flow_run_id, fill, guarded
from flows.runs import wait_for_item
from gateways.base import Gateway
from gateways.registry import open_gateways
from tasks.import_pages import (
    ConversationTargets,
    ImportContext,
    PageOutcome,
    copy_chats_page,
    copy_contacts_page,
    copy_messages_page,
    import_chats_page,
    import_contacts_page,
    import_messages_page,
    stretch_conversations,
)
from tasks.options import is_transient

_P = TypeVar("_P")
PageStep = Callable[[Gateway, ImportContext, _P], Awaitable[PageOutcome]]
"""One page of a phase at a position: the plain page function, or its task (same signature, a task run per call)."""

INCREMENTAL_OVERLAP = timedelta(minutes=10)
"""How far before the last import's end a reconnect's import starts reading (inserts are idempotent)."""


def _drain_summary(r: DrainReport) -> str:
    return (
        f"drain: {r.claimed} claimed, {r.done} imported, {r.retried} to retry, {r.failed} failed, "
        f"{r.superseded} superseded, {r.lease_lost} lost their lease"
    )


DRAIN = Reporting(
    IMPORT_FLOW, "IMPORT", "zapsync.imports", "import-conversations-drain", "Import queue", _drain_summary
)


@flow(name=IMPORT_FLOW, flow_run_name="import-conversations", retries=0, log_prints=False)
async def import_conversations(budget_seconds: float | None = None) -> DrainReport:
    """Work through the queued imports until none is due (or ``budget_seconds`` passed), several instances at once.

    Not retried as a whole: a failed instance goes back to the queue with backoff (transient failures) or ends
    `failed` with its reason, and the items of a killed run come back when their lease expires.
    """
    settings = get_settings()
    report = DrainReport(kind=WorkKind.IMPORT, started_at=datetime.now(UTC), flow_run_id=current_flow_run_id())
    limits = DrainLimits(
        concurrency=settings.import_max_concurrency,
        lease_seconds=settings.queue_lease_seconds,
        max_attempts=settings.queue_max_attempts,
        retry_initial_seconds=settings.queue_retry_initial_seconds,
        retry_max_seconds=settings.queue_retry_max_seconds,
        budget_seconds=budget_seconds,
    )
    async with guarded(report, DRAIN) as go:
        if go:
            await drain(WorkKind.IMPORT, _import_item, limits, report)
    return report


async def _import_item(item: ClaimedItem) -> Handled:
    """One queued import: a transient failure is raised (the queue retries it), any other ends in the report."""
    if item.instance_id is None:
        return Handled(error=f"import item {item.id} names no instance")
    payload = item.payload
    report = await import_instance_task(
        item.instance_id,
        trigger=str(payload.get("trigger") or "queue"),
        connection_key=payload.get("connection_key"),
        history_days=payload.get("history_days"),
        full=bool(payload.get("full")),
    )
    return Handled(
        result=report.model_dump(mode="json"),
        summary=_summary(report),
        error=report.error if report.outcome == "failed" else None,
    )


async def import_queued_now(
    instance_id: uuid.UUID,
    *,
    trigger: str,
    connection_key: str | None = None,
    history_days: int | None = None,
    full: bool = False,
    timeout_seconds: float = 3600,
) -> ItemState:
    """Queue an import of one instance and drain the queue in this process until that import finished (a worker may
    take it first: then this waits for it). An instance that does not exist is not queued: its report says so."""
    async with session_scope() as session:
        scope = await instance_scope(session, instance_id)
        if scope is None:
            report = ImportReport(instance_id=instance_id, trigger=trigger, started_at=datetime.now(UTC))
            report.outcome, report.skipped = "skipped", f"no instance {instance_id}"
            return ItemState(0, WorkKind.IMPORT, "done", 0, None, report.model_dump(mode="json"), finished=True)
        (queued,) = await request_imports(
            session,
            [
                import_request(
                    instance_id,
                    scope.organization_id,
                    trigger=trigger,
                    connection_key=connection_key,
                    history_days=history_days,
                    full=full,
                )
            ],
        )
    await import_conversations()
    return await wait_for_item(queued.id, timeout=timeout_seconds)  # a worker may hold it: then wait


def _summary(r: ImportReport) -> str:
    c = r.counts
    return (
        f"{r.instance_name or r.instance_id} {r.outcome}: {c.chats_seen} chats ({c.chats_imported} imported, "
        f"{c.chats_skipped} skipped), {c.contacts_created} contacts created, {c.contacts_linked} linked, "
        f"{c.messages_inserted} messages inserted, {c.messages_present} already present, {c.messages_skipped} "
        f"skipped ({r.messages_per_second:.0f} msg/s){f' (error: {r.error})' if r.error else ''}"
        f"{f' ({r.skipped})' if r.skipped else ''}"
    )


async def import_instance(
    instance_id: uuid.UUID,
    *,
    trigger: str = "manual",
    connection_key: str | None = None,
    history_days: int | None = None,
    full: bool = False,
) -> ImportReport:
    """Import one instance's history: messages of the last ``history_days`` (default: the organization's setting,
    else everything; on a reconnect, only what is newer than its last completed import). An interrupted import
    resumes from its checkpoint unless ``full`` asks for a fresh one; ``connection_key`` (set on connect) makes a
    second import of the same connection a no-op. Raises a transient failure (after marking the run failed, so a
    retry resumes it); any other failure is the report's ``error``."""
    report = ImportReport(
        instance_id=instance_id,
        trigger=trigger,
        connection_key=connection_key,
        full=full,
        history_days=history_days,
        started_at=datetime.now(UTC),
        flow_run_id=current_flow_run_id(),
    )
    begun = asyncio.get_running_loop().time()
    async with session_scope() as session:
        scope = await instance_scope(session, instance_id)
    if scope is not None:
        report.instance_name, report.gateway = scope.instance_name, scope.gateway
    failure: BaseException | None = None
    # One Prefect client for every page task (outside a flow run each task run would build its own: ~50 ms of CPU
    # apiece, for its TLS context, measured).
    async with open_gateways({scope.gateway} if scope else set()) as gateways, AsyncClientContext.get_or_create():
        gateway = gateways.get(scope.gateway) if scope else None
        if (refusal := _refusal(instance_id, scope, gateway)) is not None:
            report.outcome, report.skipped = refusal
        elif scope is not None and gateway is not None:
            async with try_advisory_lock(f"import:{instance_id}") as acquired:
                if not acquired:
                    report.outcome, report.skipped = "skipped", "another import of this instance is running"
                else:
                    try:
                        fill(
                            report,
                            await run_import(
                                gateway,
                                scope,
                                trigger=trigger,
                                connection_key=connection_key,
                                history_days=history_days,
                                full=full,
                                flow_run_id=report.flow_run_id,
                            ),
                        )
                    except ImportFailed as failed:
                        fill(report, failed.result)
                        failure = failed.error
    report.finished_at = datetime.now(UTC)
    report.seconds = round(asyncio.get_running_loop().time() - begun, 3)
    run_logger("zapsync.imports").info("[IMPORT] %s in %.2fs", _summary(report), report.seconds)
    if report.flow_run_id is not None:
        await acreate_markdown_artifact(
            key=_artifact_key("import", report.instance_name or str(instance_id)),
            markdown=report.to_markdown(),
            description="Conversation import",
        )
    if failure is not None and is_transient(failure):
        raise failure
    return report


import_instance_task = task(
    name="import-instance", task_run_name="import {instance_id}", retries=0, cache_policy=NO_CACHE
)(import_instance)
"""One instance's import as a task run of the drain (its pages are nested task runs). Not retried by Prefect: the
queue retries a transient failure with backoff."""


def _artifact_key(prefix: str, name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) naming ``name``."""
    return f"{prefix}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"[:100]


def _refusal(
    instance_id: uuid.UUID, scope: InstanceScope | None, gateway: Gateway | None
) -> tuple[Outcome, str] | None:
    """Why this instance cannot be imported at all (outcome, reason), or None."""
    if scope is None:
        return "skipped", f"no instance {instance_id}"
    if gateway is None:
        return "skipped", f"gateway {scope.gateway!r} is not configured"
    if not gateway.supports_history:
        return "not_supported", (
            f"not supported by this gateway: {gateway.provider} has no API to read chat history; its messages "
            "arrive by webhook only"
        )
    return None


class ImportResult(BaseModel):
    """What one import did: the fields of its report it sets."""

    outcome: Outcome = "completed"
    skipped: str | None = None
    error: str | None = None
    import_run_id: int | None = None
    resumed: bool = False
    history_days: int | None = None
    incremental: bool = False
    since: datetime | None = None
    until: datetime | None = None
    counts: ImportCounts = Field(default_factory=ImportCounts)


class ImportFailed(Exception):
    """An import stopped by ``error``, its run marked failed; ``result`` is what it had done (stored, then the flow
    raises ``error``)."""

    def __init__(self, result: ImportResult, error: BaseException) -> None:
        super().__init__(str(error))
        self.result, self.error = result, error


async def run_import(
    gateway: Gateway,
    scope: InstanceScope,
    *,
    trigger: str,
    connection_key: str | None,
    history_days: int | None,
    full: bool,
    flow_run_id: uuid.UUID | None,
) -> ImportResult:
    """Begin or resume the instance's import run and work through its remaining phases, one task per page.

    On an error the run is marked failed and ImportFailed raised with what the run had done."""
    run: ImportRunRow | None = None
    try:
        begun = await _begin(
            scope,
            trigger=trigger,
            connection_key=connection_key,
            history_days=history_days,
            full=full,
            flow_run_id=flow_run_id,
        )
        if isinstance(begun, str):
            return ImportResult(outcome="skipped", skipped=begun)
        run = begun
        await _work_through(gateway, scope, run)
        return await _finish(run, state="completed")
    except Exception as exc:
        error = exc.exceptions[0] if isinstance(exc, ExceptionGroup) and exc.exceptions else exc
        message = f"{type(error).__name__}: {getattr(error, 'message', error)}"
        done = (
            await _finish(run, state="failed", error=message) if run else ImportResult(outcome="failed", error=message)
        )
        raise ImportFailed(done, error) from None


async def _begin(
    scope: InstanceScope,
    *,
    trigger: str,
    connection_key: str | None,
    history_days: int | None,
    full: bool,
    flow_run_id: uuid.UUID | None,
) -> ImportRunRow | str:
    """The import run to work on: resumed from its checkpoint, or new; a string says why none runs."""
    settings = get_settings()
    now = datetime.now(UTC).replace(microsecond=0)
    days = history_days if history_days is not None or full else scope.import_history_days
    since = now - timedelta(days=days) if days else None
    async with session_scope() as session:  # one transaction: the last import, then the run
        previous = None if full or history_days is not None else await last_imported_until(session, scope.id)
        # A reconnect reads only what is newer than the last import (a margin covers clock skew and late writes).
        incremental = previous is not None and (since is None or previous - INCREMENTAL_OVERLAP > since)
        if incremental and previous is not None:
            since = previous - INCREMENTAL_OVERLAP
        seed = {
            "phase": "chats" if incremental else "contacts",
            "contacts_page": 1,
            "chats_skip": 0,
            "messages": {"below": 1, "done": []},
            "since": since.isoformat() if since else None,
            "until": now.isoformat(),
            "history_days": days,
            "incremental": incremental,
            "page_size": settings.import_page_size,
        }
        return await begin_import(
            session,
            instance_id=scope.id,
            trigger=trigger,
            connection_key=connection_key,
            full=full,
            flow_run_id=flow_run_id,
            cursor=seed,
        )


def _window(run: ImportRunRow) -> tuple[datetime | None, datetime]:
    cursor = run.cursor
    since = datetime.fromisoformat(cursor["since"]) if cursor.get("since") else None
    return since, datetime.fromisoformat(cursor["until"])


async def _work_through(gateway: Gateway, scope: InstanceScope, run: ImportRunRow) -> None:
    """The run's remaining phases, from the phase its checkpoint names."""
    settings = get_settings()
    cursor = run.cursor
    since, until = _window(run)
    # A resumed run keeps its window and its page size: its checkpoints are page numbers of that size.
    page_size = int(cursor.get("page_size") or settings.import_page_size)
    ctx = ImportContext(
        run_id=run.id,
        scope=scope,
        page_size=page_size,
        until=until,
        since=since,
        incremental=bool(cursor.get("incremental")),
    )
    run_logger("zapsync.imports").info(
        "[IMPORT] %s: run %d %s at phase %s (%s)",
        scope.instance_name,
        run.id,
        "resumed" if run.resumed else "started",
        cursor.get("phase"),
        f"{'incremental, ' if cursor.get('incremental') else ''}since {since:%Y-%m-%d %H:%M}"
        if since
        else "all history",
    )
    # The first page of each phase runs inside this instance's task run; every further page is a task run of its
    # own. An instance with one page per phase (most reconnects, most small numbers) costs one task run, not five.
    phase = cursor.get("phase", "contacts")
    if phase == "contacts":
        page = int(cursor.get("contacts_page", 1))
        contacts_page: PageStep[int] = copy_contacts_page
        while not (await contacts_page(gateway, ctx, page)).last:
            page, contacts_page = page + 1, import_contacts_page
        phase = "chats"
    if phase == "chats":
        skip = int(cursor.get("chats_skip", 0))
        chats_page: PageStep[int] = copy_chats_page
        while not (outcome := await chats_page(gateway, ctx, skip)).last:
            skip, chats_page = skip + outcome.counts["chats_seen"], import_chats_page
        phase = "messages"
    if phase == "messages":
        await _message_pages(gateway, ctx, settings.import_page_concurrency)
        phase = "finalize"
    if phase == "finalize":
        await stretch_conversations(ctx)  # one statement: part of the instance's task run


async def _finish(run: ImportRunRow, *, state: str, error: str | None = None) -> ImportResult:
    """Close the run as ``state`` and read back its counts (cumulative over every attempt of the run)."""
    async with session_scope() as session:
        await finish_import(session, run.id, state=state, error=error)
        counts = ImportCounts(**(await read_run(session, run.id)).counts)
    since, until = _window(run)
    return ImportResult(
        outcome="completed" if state == "completed" else "failed",
        error=error,
        import_run_id=run.id,
        resumed=run.resumed,
        history_days=run.cursor.get("history_days"),
        incremental=bool(run.cursor.get("incremental")),
        since=since,
        until=until,
        counts=counts,
    )


async def _message_plan(ctx: ImportContext) -> tuple[dict[str, Any], ConversationTargets]:
    """In one transaction: the run's message checkpoint as it stands now, and where each contact's messages go."""
    async with session_scope() as session:
        cursor = (await read_run(session, ctx.run_id)).cursor
        targets = ConversationTargets(await conversation_targets(session, ctx.scope.id))
    return cursor.get("messages") or {"below": 1, "done": []}, targets


async def _message_pages(gateway: Gateway, ctx: ImportContext, concurrency: int) -> None:
    """Every message page not checkpointed yet, ``concurrency`` at a time, with progress as it goes."""
    state, targets = await _message_plan(ctx)
    below, done, pages = int(state["below"]), set(state["done"]), state.get("pages")
    if pages is None:  # the first page (in the instance's task run) says how many there are
        pages = (await copy_messages_page(gateway, ctx, below, targets)).pages
        done.add(below)
    todo = [p for p in range(below, pages + 1) if p not in done]
    progress = _Progress(ctx.scope.instance_name, pages, pages - len(todo))
    await progress.start()
    semaphore = asyncio.Semaphore(concurrency)

    async def one(page: int) -> None:
        async with semaphore:
            await import_messages_page(gateway, ctx, page, targets)
        await progress.advance()

    try:
        with _young_objects_only():
            async with asyncio.TaskGroup() as group:
                for page in todo:
                    group.create_task(one(page))
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None
    await progress.finish()


@contextlib.contextmanager
def _young_objects_only() -> Iterator[None]:
    """Keep the process's long-lived objects (Prefect, SQLAlchemy, modules…) out of the cyclic collector's passes
    while pages are parsed: every page allocates thousands of containers, and each collection then walked the
    whole heap — measured, parsing took twice as long. Objects are handed back to the collector afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Progress:
    """Message-page progress as a Prefect progress artifact and a log line every 10 %."""

    def __init__(self, name: str, pages: int, done: int) -> None:
        self.name, self.pages, self.done = name, max(pages, 1), done
        self.artifact: uuid.UUID | None = None
        self.logged = self.shown = -1
        self.log = run_logger("zapsync.imports")

    @property
    def percent(self) -> int:
        return min(100, self.done * 100 // self.pages)

    async def start(self) -> None:
        # One page has no progress to show: the artifact would cost three API calls for nothing (a storm of small
        # imports spent a tenth of its Prefect server's time on them, measured).
        if self.pages > 1 and current_flow_run_id() is not None:
            self.artifact = await acreate_progress_artifact(
                progress=float(self.percent),
                key=_artifact_key("import-progress", self.name),
                description=f"Messages of {self.name}",
            )
        await self.advance(step=0)

    async def advance(self, step: int = 1) -> None:
        self.done += step
        percent = self.percent
        if percent // 10 > self.logged:
            self.logged = percent // 10
            self.log.info("[IMPORT] %s: messages %d%% (%d/%d pages)", self.name, percent, self.done, self.pages)
        if self.artifact is not None and percent // 5 > self.shown:
            self.shown = percent // 5
            await aupdate_progress_artifact(self.artifact, progress=float(percent))

    async def finish(self) -> None:
        if self.artifact is not None:
            await aupdate_progress_artifact(self.artifact, progress=100.0)
