"""`python -m bench send`: N outbox messages across I instances through the simulator, with faults; nothing twice.

Setup (not timed): a simulator process with I connected Evolution instances whose sends fail now and then
(``--timeout-rate`` of them are taken, then answered too late: an unknown outcome; ``--error-rate`` are refused
with 503 before being taken); a migrated database with one organization and the I instances ``connected``; a
temporary Prefect API; N messages queued through the outbox (``db.repositories.outbox.queue_message``, the API's
path), round-robin over the instances, each to one of ``--recipients`` numbers per instance, each text unique.
Pacing is off (``ZAPSYNC_SEND_MIN_INTERVAL=0``), the send timeout short and the grace of an unknown outcome one
second, so the faults cost retries and lookups rather than waiting.

Timed: real ``send-messages`` flow runs in this process until every message's queue item has finished.

Reported: ``messages``, ``seconds``, ``messages_per_s``; ``duplicates`` (sends the simulator took more than once for
one message), ``lost`` (messages the simulator never took, or whose row did not end ``sent``), the rows' final
statuses, the faults drawn, and the peak memory of this process. Exit code 1 when anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import uuid
from collections import Counter
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
    fraction,
    load_average,
    peak_rss_mb,
    positive_int,
    prefect_api,
    prepare_environment,
    progress,
    render_table,
    run_main,
)

NAME = "send"
HELP = "outbox throughput: N messages across I instances with timeouts and 5xx; duplicates and losses"
QUEUE_BATCH = 500
"""Messages queued per transaction during the setup."""
SEND_TIMEOUT_S = 0.5
HANG_S = 2.0
"""How late a timed-out send is answered: longer than the send timeout."""


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Command-line options of ``bench send``."""

    messages: int
    instances: int
    recipients: int
    timeout_rate: float
    error_rate: float
    concurrency: int | None
    latency_ms: float
    as_json: bool
    drains: int = 1


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``bench send``'s options."""
    parser.add_argument("--messages", type=positive_int, required=True, help="messages to send (N)")
    parser.add_argument("--instances", type=positive_int, required=True, help="instances they go through (I)")
    parser.add_argument("--recipients", type=positive_int, default=20, help="distinct recipients per instance")
    parser.add_argument(
        "--timeout-rate", type=fraction, default=0.05, help="share of sends taken, then answered too late (unknown)"
    )
    parser.add_argument("--error-rate", type=fraction, default=0.02, help="share of sends refused with 503 (transient)")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="instances served at once (default: every instance, at most 1024)",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency the simulator adds to each request")
    parser.add_argument(
        "--drains", type=positive_int, default=1, help="drain processes at once (1: flow runs in this process)"
    )
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench send``: exit code 0, or 1 when a message was lost or sent twice."""
    options = SendOptions(
        messages=args.messages,
        instances=args.instances,
        recipients=args.recipients,
        timeout_rate=args.timeout_rate,
        error_rate=args.error_rate,
        concurrency=args.concurrency,
        latency_ms=args.latency_ms,
        as_json=args.as_json,
        drains=args.drains,
    )
    return run_main(lambda out: bench_send(options, out))


def bench_send(options: SendOptions, out: IO[str]) -> None:
    """Set up, measure, check and report (see the module docstring)."""
    prepare_environment()
    os.environ.update(
        {
            "ZAPSYNC_SEND_MIN_INTERVAL": "0",
            "ZAPSYNC_SEND_TIMEOUT": str(SEND_TIMEOUT_S),
            "ZAPSYNC_SEND_UNKNOWN_GRACE": "1",
            "ZAPSYNC_QUEUE_RETRY_INITIAL": "0.1",
            "ZAPSYNC_QUEUE_RETRY_MAX": "1",
            "ZAPSYNC_SEND_MAX_CONCURRENCY": str(options.concurrency or min(options.instances, 1024)),
        }
    )
    progress(
        f"send: {options.messages} messages across {options.instances} instances, "
        f"{options.timeout_rate:.0%} time out after being taken, {options.error_rate:.0%} answered 503"
    )
    with contextlib.ExitStack() as stack:
        simulator = stack.enter_context(
            SimulatorProcess(
                [SimSeed(options.instances, provider="evolution", prefix="send", connected_ratio=1.0)],
                latency_ms=options.latency_ms,
            )
        )
        stack.enter_context(bench_database())
        stack.enter_context(prefect_api())
        simulator.wait()
        simulator.control(
            "POST",
            "/config",
            {"send_timeout_rate": options.timeout_rate, "send_error_rate": options.error_rate, "send_hang_s": HANG_S},
        )
        configure_gateway("evolution", simulator.url, max_concurrency=min(options.instances, 1024))
        result = asyncio.run(measure(options, simulator.seeded[0].names, simulator))
    emit(result, as_json=options.as_json, table=result_table(result), out=out)
    if result["lost"] or result["duplicates"]:
        raise BenchFailure(f"{result['lost']} messages lost, {result['duplicates']} sent twice")


async def measure(options: SendOptions, names: list[str], simulator: SimulatorProcess) -> dict[str, Any]:
    """Queue the messages, time the drains, check the simulator's records and the rows."""
    from db.engine import dispose_engine
    from flows.send_messages import send_messages

    try:
        texts = await queue_messages(options, names)
        rss_before = peak_rss_mb()
        load = load_average()
        simulator_cpu = simulator.cpu_seconds()
        progress(f"timed: send-messages flow runs until {options.messages} queue items finished …")
        runs = 0
        children_cpu = _children_cpu()
        with Stopwatch() as watch:
            if options.drains > 1:
                runs = await run_drain_processes(options.drains)
            while await outstanding() and runs < 100:
                await send_messages()
                runs += 1
        drains_cpu = _children_cpu() - children_cpu
        left = await outstanding()
        statuses = await final_statuses()
    finally:
        await dispose_engine()
    sends = simulator.control("GET", "/sends")
    taken = Counter((s["instance"], s["text"]) for s in sends["sends"])
    duplicates = sum(n - 1 for n in taken.values())
    never_taken = sum(1 for key in texts if key not in taken)
    not_sent = options.messages - statuses.get("sent", 0) - statuses.get("delivered", 0) - statuses.get("read", 0)
    timed_out = sum(1 for s in sends["sends"] if s["timed_out"])
    seconds = round(watch.wall, 3)  # the rate is of the reported figure, so the report agrees with itself
    return {
        "benchmark": NAME,
        "messages": options.messages,
        "instances": options.instances,
        "seconds": seconds,
        "messages_per_s": round(options.messages / seconds, 1) if seconds > 0 else None,
        "duplicates": duplicates,
        "lost": max(never_taken, not_sent),
        "statuses": dict(sorted(statuses.items())),
        "outstanding_items": left,
        "flow_runs": runs,
        "gateway_sends": sends["total"],
        "gateway_timeouts": timed_out,
        "drains": options.drains,
        "cpu_seconds": round(watch.cpu + drains_cpu, 2),
        "simulator_cpu_seconds": round(simulator.cpu_seconds() - simulator_cpu, 2),
        "peak_rss_mb": round(max(peak_rss_mb(), rss_before), 1),
        "load_average": round(load, 2),
        "timeout_rate": options.timeout_rate,
        "error_rate": options.error_rate,
    }


DRAIN_WORKER = "import asyncio, bench.send as s; print(asyncio.run(s.drain_until_done()))"
"""What each of ``--drains`` K processes runs."""


async def run_drain_processes(drains: int) -> int:
    """K drain processes at once (the send deployment's shape), each running ``send-messages`` flow runs until no
    send item is left; returns the flow runs they made."""
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", DRAIN_WORKER, env=env, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(drains)
    ]
    outputs = await asyncio.gather(*(child.communicate() for child in children))
    for child in children:
        if child.returncode:
            raise BenchFailure(f"a drain process exited with code {child.returncode}")
    return sum(int(out.strip().splitlines()[-1]) for out, _ in outputs)


async def drain_until_done(max_runs: int = 200) -> int:
    """One drain process: ``send-messages`` flow runs until no send item is pending or running; returns the runs."""
    from db.engine import dispose_engine
    from flows.send_messages import send_messages

    runs = 0
    try:
        while await outstanding() and runs < max_runs:
            report = await send_messages()
            runs += 1
            if not report.claimed:  # the other drain holds what is left: look again shortly
                await asyncio.sleep(0.2)
    finally:
        await dispose_engine()
    return runs


def _children_cpu() -> float:
    """CPU time (user + system) of this process's finished children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def queue_messages(options: SendOptions, names: list[str]) -> set[tuple[str, str]]:
    """One organization, its instances connected, and the messages queued; returns (instance, text) of each."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from core.domain import OutgoingMessage
    from db.engine import session_scope
    from db.repositories.conversations import instance_scope
    from db.repositories.organizations import create_organization
    from db.repositories.outbox import queue_message

    async with session_scope() as session:
        org = await create_organization(session, name="bench-send", webhook_secret="bench-send-secret")
        rows = await session.execute(
            text(
                "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, status, status_observed_at) "
                "SELECT :org, 'evolution', name, 'connected', now() FROM unnest(CAST(:names AS text[])) AS name "
                "RETURNING id"
            ),
            {"org": org.id, "names": names},
        )
        instance_ids = [uuid.UUID(str(r[0])) for r in rows.all()]
    scopes = []
    async with session_scope() as session:
        for instance_id in instance_ids:
            scope = await instance_scope(session, instance_id)
            assert scope is not None
            scopes.append(scope)
    texts: set[tuple[str, str]] = set()
    with Stopwatch() as watch:
        for start in range(0, options.messages, QUEUE_BATCH):
            async with session_scope() as session:
                for i in range(start, min(start + QUEUE_BATCH, options.messages)):
                    scope = scopes[i % len(scopes)]
                    recipient = (i // len(scopes)) % options.recipients
                    body = f"bench message {i}"
                    to = f"55119{recipient:08d}@s.whatsapp.net"
                    await queue_message(
                        session,
                        scope,
                        to_jid=to,
                        message=OutgoingMessage(to=to, text=body),
                        client_id=f"bench-{i}",
                        now=datetime.now(UTC),
                    )
                    texts.add((scope.instance_name, body))
    progress(f"queued {options.messages} messages in {watch.wall:.1f}s (not timed)")
    return texts


async def outstanding() -> int:
    """Send items not finished yet."""
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        found = await session.execute(
            text("SELECT count(*) FROM work_items WHERE kind = 'send' AND state IN ('pending', 'running')")
        )
        return int(found.scalar_one())


async def final_statuses() -> dict[str, int]:
    """Outbox messages by status."""
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        found = await session.execute(
            text("SELECT status, count(*) FROM messages WHERE client_id IS NOT NULL GROUP BY status")
        )
        return {str(status): int(n) for status, n in found.all()}


def result_table(result: dict[str, Any]) -> str:
    """The human-readable report."""
    return render_table(
        "bench send",
        [
            Row("messages", f"{result['messages']} across {result['instances']} instances"),
            Row("seconds", f"{result['seconds']:.2f} ({result['flow_runs']} flow runs, {result['drains']} drains)"),
            Row("messages/s", f"{result['messages_per_s']}"),
            Row("duplicates", f"{result['duplicates']}"),
            Row("lost", f"{result['lost']}"),
            Row("statuses", ", ".join(f"{k} {v}" for k, v in result["statuses"].items())),
            Row("gateway", f"{result['gateway_sends']} sends taken, {result['gateway_timeouts']} answered too late"),
            Row("cpu", f"{result['cpu_seconds']} s here, {result['simulator_cpu_seconds']} s in the simulator"),
            Row("peak RSS", f"{result['peak_rss_mb']} MB"),
        ],
    )
