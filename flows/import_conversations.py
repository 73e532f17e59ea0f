"""Flow `import-conversations`: bring one instance's chats, contacts and messages into PostgreSQL (DESIGN.md §5).

instance → its gateway (one that can read history, else "not supported") → the instance's import lock → the run
to work on (resumed from its checkpoint, or new) → contacts pages → chats pages → message pages (a few at once) →
finalize → report (returned, stored, and a Prefect artifact). Every page is one task that fetches, writes and
checkpoints in one transaction, so a run killed anywhere resumes at the first page it had not finished.

Imported history lands in one conversation per contact: open when its newest message is recent (``waiting`` if
the customer wrote last, ``in_progress`` if the business did), closed with reason ``imported`` otherwise — the
state the live path would have reached had zapsync been watching all along.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

from core.logs import run_logger
from core.names import IMPORT_FLOW
from core.reports import ImportCounts, ImportReport
from core.settings import get_settings
from db.engine import session_scope
from db.locks import try_advisory_lock
from db.repositories.conversations import InstanceScope, instance_scope
from db.repositories.import_runs import ImportRunRow, begin_import, finish_import, read_run
from flows.guard import current_flow_run_id, store_report
from gateways.base import Gateway
from gateways.registry import open_gateways
from tasks.import_pages import (
    ImportContext,
    finalize_import,
    import_chats_page,
    import_contacts_page,
    import_messages_page,
    load_targets,
)


@flow(name=IMPORT_FLOW, flow_run_name="import {instance_id}", retries=1, retry_delay_seconds=30, log_prints=False)
async def import_conversations(
    instance_id: uuid.UUID,
    history_days: int | None = None,
    full: bool = False,
    trigger: str = "manual",
    connection_key: str | None = None,
) -> ImportReport:
    """Import the instance's history: messages of the last ``history_days`` (default: the organization's
    setting, else everything). An interrupted import resumes from its checkpoint unless ``full`` asks for a
    fresh one; ``connection_key`` (set on connect) makes a second import of the same connection a no-op."""
    log = run_logger("zapsync.imports")
    begun = time.perf_counter()
    report = ImportReport(
        instance_id=instance_id,
        trigger=trigger,
        connection_key=connection_key,
        full=full,
        history_days=history_days,
        started_at=datetime.now(UTC),
        flow_run_id=current_flow_run_id(),
    )
    async with session_scope() as session:
        scope = await instance_scope(session, instance_id)
    failure: BaseException | None = None
    if scope is None:
        report.outcome, report.skipped = "skipped", f"no instance {instance_id}"
    else:
        report.instance_name, report.gateway = scope.instance_name, scope.gateway
        async with open_gateways({scope.gateway}) as gateways:
            gateway = gateways.get(scope.gateway)
            if gateway is None:
                report.outcome, report.skipped = "skipped", f"gateway {scope.gateway!r} is not configured"
            elif not gateway.supports_history:
                report.outcome = "not_supported"
                report.skipped = (
                    f"not supported by this gateway: {gateway.provider} has no API to read chat "
                    "history; its messages arrive by webhook only"
                )
            else:
                async with try_advisory_lock(f"import:{instance_id}") as acquired:
                    if not acquired:
                        report.outcome, report.skipped = "skipped", "another import of this instance is running"
                    else:
                        failure = await _guarded(report, gateway, scope, history_days=history_days, full=full)
    report.finished_at = datetime.now(UTC)
    report.seconds = round(time.perf_counter() - begun, 3)
    c = report.counts
    log.info(
        "[IMPORT] %s %s: %d chats (%d imported, %d skipped), %d contacts created, %d linked, %d messages "
        "inserted, %d already present, %d skipped in %.2fs (%.0f msg/s)%s",
        report.instance_name or instance_id,
        report.outcome,
        c.chats_seen,
        c.chats_imported,
        c.chats_skipped,
        c.contacts_created,
        c.contacts_linked,
        c.messages_inserted,
        c.messages_present,
        c.messages_skipped,
        report.seconds,
        report.messages_per_second,
        f" ({report.skipped or report.error})" if report.skipped or report.error else "",
    )
    await _publish(report, scope)
    if failure is not None:
        raise failure
    return report


async def _guarded(
    report: ImportReport, gateway: Gateway, scope: InstanceScope, *, history_days: int | None, full: bool
) -> BaseException | None:
    """Run the import; on failure mark its run failed and return the error (the flow re-raises it)."""
    try:
        await run_import(report, gateway, scope, history_days=history_days, full=full)
    except Exception as exc:
        error = exc.exceptions[0] if isinstance(exc, ExceptionGroup) and exc.exceptions else exc
        report.outcome, report.error = "failed", f"{type(error).__name__}: {getattr(error, 'message', error)}"
        if report.import_run_id is not None:
            async with session_scope() as session:
                await finish_import(session, report.import_run_id, state="failed", error=report.error)
                report.counts = ImportCounts(**(await read_run(session, report.import_run_id)).counts)
        return error
    return None


async def run_import(
    report: ImportReport, gateway: Gateway, scope: InstanceScope, *, history_days: int | None, full: bool
) -> None:
    """Begin or resume the instance's import run and work through its remaining phases; fills ``report``."""
    settings = get_settings()
    log = run_logger("zapsync.imports")
    now = datetime.now(UTC).replace(microsecond=0)
    days = history_days if history_days is not None or full else scope.import_history_days
    seed = {
        "phase": "contacts",
        "contacts_page": 1,
        "chats_skip": 0,
        "messages": {"below": 1, "done": []},
        "since": (now - timedelta(days=days)).isoformat() if days else None,
        "until": now.isoformat(),
        "history_days": days,
        "page_size": settings.import_page_size,
    }
    async with session_scope() as session:
        run = await begin_import(
            session,
            instance_id=scope.id,
            trigger=report.trigger,
            connection_key=report.connection_key,
            full=full,
            flow_run_id=report.flow_run_id,
            cursor=seed,
        )
    if isinstance(run, str):
        report.outcome, report.skipped = "skipped", run
        return
    cursor = run.cursor
    since = datetime.fromisoformat(cursor["since"]) if cursor.get("since") else None
    until = datetime.fromisoformat(cursor["until"])
    report.import_run_id, report.resumed = run.id, run.resumed
    report.since, report.until, report.history_days = since, until, cursor.get("history_days")
    # A resumed run keeps its window and its page size: its checkpoints are page numbers of that size.
    page_size = int(cursor.get("page_size") or settings.import_page_size)
    ctx = ImportContext(run_id=run.id, scope=scope, page_size=page_size, until=until, since=since)
    log.info(
        "[IMPORT] %s: run %d %s at phase %s (%s)",
        scope.instance_name,
        run.id,
        "resumed" if run.resumed else "started",
        cursor.get("phase"),
        f"since {since:%Y-%m-%d}" if since else "all history",
    )
    phase = cursor.get("phase", "contacts")
    if phase == "contacts":
        page = int(cursor.get("contacts_page", 1))
        while not (await import_contacts_page(gateway, ctx, page)).last:
            page += 1
        phase = "chats"
    if phase == "chats":
        skip = int(cursor.get("chats_skip", 0))
        while not (outcome := await import_chats_page(gateway, ctx, skip)).last:
            skip += outcome.counts["chats_seen"]
        phase = "messages"
    if phase == "messages":
        await _message_pages(gateway, ctx, await _fresh_cursor(run), settings.import_page_concurrency, scope)
        phase = "finalize"
    if phase == "finalize":
        await finalize_import(ctx)
    async with session_scope() as session:
        await finish_import(session, run.id, state="completed")
        report.counts = ImportCounts(**(await read_run(session, run.id)).counts)


async def _fresh_cursor(run: ImportRunRow) -> dict[str, Any]:
    async with session_scope() as session:
        return (await read_run(session, run.id)).cursor


async def _message_pages(
    gateway: Gateway, ctx: ImportContext, cursor: dict[str, Any], concurrency: int, scope: InstanceScope
) -> None:
    """Every message page not checkpointed yet, ``concurrency`` at a time, with progress as it goes."""
    targets = await load_targets(scope)
    state = cursor.get("messages") or {"below": 1, "done": []}
    below, done, pages = int(state["below"]), set(state["done"]), state.get("pages")
    if pages is None:
        pages = (await import_messages_page(gateway, ctx, below, targets)).pages
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
        if current_flow_run_id() is not None:
            self.artifact = await acreate_progress_artifact(
                progress=float(self.percent), key="import-progress", description=f"Messages of {self.name}"
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


async def _publish(report: ImportReport, scope: InstanceScope | None) -> None:
    """Store the report for the API and dashboard, and show it in the Prefect UI."""
    await store_report(
        IMPORT_FLOW,
        report,
        organization_id=scope.organization_id if scope else None,
        artifact_key="import-conversations-report",
        description="Conversation import",
    )
