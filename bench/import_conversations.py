"""`python -m bench import`: one conversation import through the real flow, from the simulator into PostgreSQL.

Setup (not timed): a simulator process whose one connected Evolution instance holds ``--chats`` one-to-one chats of
``--messages-per-chat`` messages each — generated page by page, never materialised, with the simulator's usual
variety (LID-keyed chats, numbers without the ninth digit, a media message in four); a migrated database with the
instance row; a temporary Prefect API. Timed: one ``import_conversations`` flow run (contacts, chats, message pages
as Prefect tasks, finalize, report). Checked (exit code 1 otherwise): exactly C contacts, C conversations and
C × M messages, each once. Reported: messages, seconds, messages/s, the bench process's peak RSS, and the CPU
time of the bench process, the simulator and the embedded PostgreSQL (on a shared machine, CPU seconds compare
runs better than wall time).

``--series 10k,100k,1M``: one child process per size (size = messages, as chats of ``--messages-per-chat``, 100
unless given), then a table of how time and peak memory grow (bench/series.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

from bench.common import (
    BenchFailure,
    Row,
    SimSeed,
    SimulatorProcess,
    Stopwatch,
    bench_database,
    configure_gateway,
    emit,
    load_average,
    peak_rss_mb,
    positive_int,
    prefect_api,
    prepare_environment,
    progress,
    render_table,
    run_main,
)
from bench.series import add_series_option, run_series

NAME = "import"
HELP = "conversation import: C chats × M messages from the simulator into PostgreSQL through the real flow"
TARGET_MESSAGES_PER_S = 50_000.0
SERIES_M = 100
"""Messages per chat in a ``--series`` unless ``--messages-per-chat`` says otherwise."""


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """Command-line options of ``bench import``."""

    chats: int
    messages_per_chat: int
    page_size: int | None
    concurrency: int | None
    latency_ms: float
    as_json: bool

    @property
    def messages(self) -> int:
        """Messages the instance holds."""
        return self.chats * self.messages_per_chat


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``bench import``'s options."""
    parser.add_argument(
        "--chats", type=positive_int, default=None, help="one-to-one chats (C; required without --series)"
    )
    parser.add_argument(
        "--messages-per-chat",
        type=positive_int,
        default=None,
        help=f"messages in each chat (M; {SERIES_M} in a series)",
    )
    parser.add_argument(
        "--page-size",
        type=positive_int,
        default=None,
        help="records per gateway page and transaction (default: ZAPSYNC_IMPORT_PAGE_SIZE or 5000)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="message pages in flight (default: ZAPSYNC_IMPORT_PAGE_CONCURRENCY or 3)",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency the simulator adds to each request")
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object on stdout")
    add_series_option(parser, unit="messages")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench import``: exit code 0, or 1 when the imported rows are wrong."""
    if args.series:
        return run_series(
            NAME, args.series, lambda size: series_argv(args, size), unit="messages", as_json=args.as_json
        )
    if args.chats is None or args.messages_per_chat is None:
        raise SystemExit("bench import: --chats and --messages-per-chat are required (or --series)")
    options = ImportOptions(
        chats=args.chats,
        messages_per_chat=args.messages_per_chat,
        page_size=args.page_size,
        concurrency=args.concurrency,
        latency_ms=args.latency_ms,
        as_json=args.as_json,
    )
    return run_main(lambda out: bench_import(options, out))


def series_argv(args: argparse.Namespace, size: int) -> list[str]:
    """One size of ``--series``: ``size`` messages as ⌈size / M⌉ chats of M messages (M = ``--messages-per-chat``,
    else 100), with the other options as given."""
    per_chat = args.messages_per_chat or SERIES_M
    argv = ["--chats", str(max(1, -(-size // per_chat))), "--messages-per-chat", str(per_chat)]
    if args.page_size is not None:
        argv += ["--page-size", str(args.page_size)]
    if args.concurrency is not None:
        argv += ["--concurrency", str(args.concurrency)]
    return [*argv, "--latency-ms", str(args.latency_ms)]


def bench_import(options: ImportOptions, out: IO[str]) -> None:
    """Set up, measure, check and report (see the module docstring)."""
    prepare_environment()
    if options.page_size is not None:
        os.environ["ZAPSYNC_IMPORT_PAGE_SIZE"] = str(options.page_size)
    if options.concurrency is not None:
        os.environ["ZAPSYNC_IMPORT_PAGE_CONCURRENCY"] = str(options.concurrency)
    progress(f"import: {options.chats} chats × {options.messages_per_chat} messages = {options.messages} messages")
    with contextlib.ExitStack() as stack:
        simulator = stack.enter_context(
            SimulatorProcess(
                [SimSeed(1, provider="evolution", prefix="bench", connected_ratio=1.0)], latency_ms=options.latency_ms
            )
        )
        database = stack.enter_context(bench_database())
        stack.enter_context(prefect_api())
        simulator.wait()
        name = simulator.seeded[0].names[0]
        shape = simulator.control(
            "POST",
            f"/instances/{name}/history",
            {"chats": options.chats, "messages_per_chat": options.messages_per_chat},
        )
        if shape["messages"] != options.messages:
            raise BenchFailure(f"the simulator holds {shape['messages']} messages, expected {options.messages}")
        progress(f"simulator serving {name} with {shape['messages']} messages at {simulator.url}")
        configure_gateway("evolution", simulator.url)
        result = asyncio.run(measure(options, name, simulator, embedded=database.embedded))
    emit(result, as_json=options.as_json, table=result_table(result), out=out)


async def measure(
    options: ImportOptions, name: str, simulator: SimulatorProcess, *, embedded: bool = True
) -> dict[str, Any]:
    """Insert the instance row, time one import flow run, check the rows."""
    from core.settings import get_settings
    from db.engine import dispose_engine

    import_one = one_instance_import()
    try:
        instance_id = await insert_instance(name)
        rss_before = peak_rss_mb()
        load = load_average()
        simulator_cpu = simulator.cpu_seconds()
        database_cpu = embedded_database_cpu_seconds() if embedded else None
        progress(f"timed: {import_one.__name__}(instance) …")
        with Stopwatch() as watch:
            report = await import_one(instance_id)
        rss_peak = peak_rss_mb()
        simulator_cpu = simulator.cpu_seconds() - simulator_cpu
        if database_cpu is not None:
            after = embedded_database_cpu_seconds()
            database_cpu = None if after is None else after - database_cpu
        progress(
            f"flow run {report.flow_run_id}: {report.outcome} in {watch.wall:.2f}s, "
            f"{report.counts.messages_inserted} messages inserted, peak RSS {rss_peak} MB"
        )
        await check(options, instance_id, report)
    finally:
        await dispose_engine()
    settings = get_settings()
    seconds = round(watch.wall, 3)  # the rate is of the reported figure, so the report agrees with itself
    rate = options.messages / seconds if seconds > 0 else 0.0
    return {
        "benchmark": NAME,
        "chats": options.chats,
        "messages_per_chat": options.messages_per_chat,
        "messages": options.messages,
        "seconds": seconds,
        "messages_per_s": round(rate, 1),
        "peak_rss_mb": rss_peak,
        "rss_before_flow_mb": rss_before,
        "flow_internal_seconds": report.seconds,
        "cpu_seconds": round(watch.cpu, 2),
        "gateway_cpu_seconds": round(simulator_cpu, 2),
        "database_cpu_seconds": None if database_cpu is None else round(database_cpu, 2),
        "load_average": load,
        "page_size": settings.import_page_size,
        "page_concurrency": settings.import_page_concurrency,
        "pages": report.counts.pages,
        "latency_ms": options.latency_ms,
        "flow_run_id": str(report.flow_run_id),
        "target_messages_per_s": TARGET_MESSAGES_PER_S,
        "target_met": rate >= TARGET_MESSAGES_PER_S,
    }


def embedded_database_cpu_seconds() -> float | None:
    """CPU time (user + system) the embedded PostgreSQL has used so far: its postmaster, the backends it reaped and
    the live ones (None when it cannot be read)."""
    import psutil

    from core.settings import get_settings

    pid_file = get_settings().data_dir / "postmaster.pid"
    if not pid_file.exists():
        return None
    try:
        postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
        times = postmaster.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in postmaster.children():
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    except (psutil.Error, ValueError, IndexError):
        return None
    return float(total)


def one_instance_import() -> Callable[[uuid.UUID], Awaitable[Any]]:
    """The import of one instance as this checkout runs it: the ``import_conversations`` flow (one flow run per
    instance) before the work queue; with it, ``import_instance`` (what the drain flow runs for one queued item)."""
    import flows.import_conversations as module

    one: Callable[[uuid.UUID], Awaitable[Any]] = getattr(module, "import_instance", module.import_conversations)
    return one


async def insert_instance(name: str) -> uuid.UUID:
    """One organization and its connected instance."""
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        organization_id = (
            await session.execute(text("INSERT INTO organizations (name) VALUES ('bench') RETURNING id"))
        ).scalar_one()
        instance_id = (
            await session.execute(
                text(
                    "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, status, "
                    "status_observed_at) "
                    "VALUES (:org, 'evolution', :name, 'connected', now()) RETURNING id"
                ),
                {"org": organization_id, "name": name},
            )
        ).scalar_one()
    return uuid.UUID(str(instance_id))


async def check(options: ImportOptions, instance_id: uuid.UUID, report: Any) -> None:
    """Fail loudly unless the run imported every chat, contact and message exactly once."""
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        contacts, conversations, messages, distinct = (
            await session.execute(
                text(
                    "SELECT (SELECT count(*) FROM contacts WHERE instance_id = :i), "
                    "(SELECT count(*) FROM conversations WHERE instance_id = :i), "
                    "(SELECT count(*) FROM messages WHERE instance_id = :i), "
                    "(SELECT count(DISTINCT external_id) FROM messages WHERE instance_id = :i)"
                ),
                {"i": instance_id},
            )
        ).one()
    problems = []
    if report.outcome != "completed":
        problems.append(f"the run ended {report.outcome}: {report.error or report.skipped}")
    if (contacts, conversations) != (options.chats, options.chats):
        problems.append(f"{contacts} contacts and {conversations} conversations, expected {options.chats} each")
    if messages != options.messages or distinct != messages:
        problems.append(f"{messages} messages ({distinct} distinct), expected {options.messages}")
    if report.counts.messages_inserted != options.messages:
        problems.append(f"the report says {report.counts.messages_inserted} inserted")
    if problems:
        raise BenchFailure("; ".join(problems))
    progress(f"checked: {contacts} contacts, {conversations} conversations, {messages} messages, no duplicates")


def result_table(result: dict[str, Any]) -> str:
    """The human-readable summary."""
    met = "met" if result["target_met"] else "MISSED"
    rows = [
        Row("messages", f"{result['messages']} ({result['chats']} chats × {result['messages_per_chat']})"),
        Row(
            "seconds",
            f"{result['seconds']:.2f} (flow body {result['flow_internal_seconds']:.2f}, "
            f"{result['pages']} pages of {result['page_size']}, {result['page_concurrency']} at once)",
        ),
        Row("messages/s", f"{result['messages_per_s']:.0f} (target {result['target_messages_per_s']:.0f}: {met})"),
        Row("peak RSS MB", f"{result['peak_rss_mb']} (before the flow run {result['rss_before_flow_mb']})"),
        Row(
            "CPU seconds",
            f"bench {result['cpu_seconds']}, simulator {result['gateway_cpu_seconds']}, "
            f"PostgreSQL {result['database_cpu_seconds']}, "
            f"load average {result['load_average']}",
        ),
    ]
    return render_table("zapsync bench: import-conversations", rows)
