"""`python -m bench close-inactive`: close a tenth of N open conversations while messages keep arriving.

Setup (not timed): a migrated database with one organization (24 h inactivity), N contacts with one open
conversation each and one message each; ``--idle`` of them (default a tenth) last spoke 2–3 days ago, the others
within the last 20 hours; a temporary Prefect API. Then a writer process starts sending messages to random open
conversations at ``--rate`` per second, each timed end to end:

* **webhook mode** — when the API applies `messages.upsert` (the import/message slice): real-shaped Evolution
  webhooks posted to a separate API process over loopback;
* **SQL mode** — otherwise: what the message handler will do, in one transaction per message (insert the message,
  move the conversation's `last_message_at`), over its own connection.

Timed: one `close_inactive_conversations` flow run. Reported: seconds, closed rows/s, and the p50/p99 latency of
the message writes that started while the run was going (and over a quiet second before it, for reference). The
result is checked: every idle conversation closed unless a message reached it first, one system message each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import IO, Any, Literal

from bench.common import (
    BenchDatabase,
    BenchFailure,
    Row,
    bench_database,
    emit,
    peak_rss_mb,
    positive_int,
    prefect_api,
    prepare_environment,
    progress,
    render_table,
    run_main,
)
from bench.series import add_series_option, run_series

NAME = "close-inactive"
HELP = "inactive-conversation closing on N conversations, with webhook-insert latency measured meanwhile"
TARGET = {"closed": 100_000, "seconds_max": 3.0, "p99_ms_max": 50.0}
SECRET = "bench-webhook-secret"
INSTANCES = 20
Mode = Literal["webhook", "sql"]


@dataclass(frozen=True, slots=True)
class CloseOptions:
    """Command-line options of ``bench close-inactive``."""

    conversations: int
    idle: float
    rate: float
    writers: int
    messages: str
    as_json: bool


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``bench close-inactive``'s options."""
    parser.add_argument(
        "--conversations", type=positive_int, default=1_000_000, help="open conversations (N, default 1,000,000)"
    )
    parser.add_argument("--idle", type=float, default=0.1, help="fraction of them that are idle (default 0.1)")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="messages per second arriving during the run (default 200)"
    )
    parser.add_argument("--writers", type=positive_int, default=4, help="concurrent message senders (default 4)")
    parser.add_argument(
        "--messages",
        choices=("auto", "webhook", "sql"),
        default="auto",
        help="how messages arrive: webhooks when the API applies them (auto), or forced",
    )
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object on stdout")
    add_series_option(parser, unit="conversations")


def series_argv(args: argparse.Namespace, size: int) -> list[str]:
    """One size of ``--series``: the same options with ``--conversations size``."""
    return [
        "--conversations",
        str(size),
        "--idle",
        f"{args.idle:g}",
        "--rate",
        f"{args.rate:g}",
        "--writers",
        str(args.writers),
        "--messages",
        args.messages,
    ]


def run(args: argparse.Namespace) -> int:
    """Entry point: exit code 0, or 1 when the run's result is wrong."""
    if not 0 < args.idle <= 1:
        raise SystemExit("--idle must be within (0, 1]")
    if args.series:
        return run_series(
            NAME, args.series, lambda size: series_argv(args, size), unit="conversations", as_json=args.as_json
        )
    options = CloseOptions(
        conversations=args.conversations,
        idle=args.idle,
        rate=args.rate,
        writers=args.writers,
        messages=args.messages,
        as_json=args.as_json,
    )
    return run_main(lambda out: bench_close(options, out))


def bench_close(options: CloseOptions, out: IO[str]) -> None:
    """Set up, measure, check and report (see the module docstring)."""
    prepare_environment()
    idle_n = int(options.conversations * options.idle)
    progress(
        f"close-inactive: {options.conversations} conversations, {idle_n} idle; "
        f"{options.rate:g} messages/s from {options.writers} writers"
    )
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(bench_database())
        organization_id = seed(database, options.conversations, idle_n)
        stack.enter_context(prefect_api())
        api = stack.enter_context(api_process())
        applies = probe_webhook(api, database, organization_id)
        if options.messages == "webhook" and not applies:
            raise BenchFailure("the API does not apply messages.upsert: use --messages sql")
        mode: Mode = "webhook" if applies and options.messages != "sql" else "sql"
        progress(
            f"message writes: {'webhooks to the API' if mode == 'webhook' else 'SQL transactions'}"
            + ("" if applies else " (the API does not apply messages.upsert yet)")
        )
        result = measure(options, database, organization_id, idle_n, mode, api)
    emit(result, as_json=options.as_json, table=result_table(result), out=out)


# -- setup (not timed) ---------------------------------------------------------------------------------------------


def seed(database: BenchDatabase, n: int, idle_n: int) -> uuid.UUID:
    """One organization, its instances, N contacts with one open conversation and one message each; VACUUM ANALYZE."""
    import psycopg

    from db.repositories.organizations import digest

    begun = time.perf_counter()
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        org = conn.execute(
            "INSERT INTO organizations (name, webhook_secret_hash, inactivity_hours) VALUES ('bench', %s, 24) "
            "RETURNING id",
            (digest(SECRET),),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, status) "
            "SELECT %s, 'evolution', 'bench-' || lpad(g::text, 2, '0'), 'connected' FROM generate_series(1, %s) g",
            (org, INSTANCES),
        )
        conn.execute(
            """
            INSERT INTO contacts (organization_id, instance_id, jid, phone)
            SELECT %(org)s, i.ids[1 + g %% %(k)s], '5511' || lpad(g::text, 9, '0') || '@s.whatsapp.net',
                   '5511' || lpad(g::text, 9, '0')
            FROM generate_series(1, %(n)s) g,
                 (SELECT array_agg(id ORDER BY instance_name) AS ids FROM whatsapp_instances) i
        """,
            {"org": org, "k": INSTANCES, "n": n},
        )
        # Exactly idle_n idle rows, spread evenly: row g is idle when floor(g·f) steps up at g.
        conn.execute(
            """
            INSERT INTO conversations (organization_id, instance_id, contact_id, status, opened_at, last_message_at)
            SELECT organization_id, instance_id, id, 'in_progress', at - interval '1 hour', at
            FROM (SELECT c.*, CASE WHEN floor(c.id * %(f)s) <> floor((c.id - 1) * %(f)s)
                                   THEN now() - interval '48 hours' - random() * interval '24 hours'
                                   ELSE now() - random() * interval '20 hours' END AS at
                  FROM contacts c) s
        """,
            {"f": idle_n / n},
        )
        conn.execute("""
            INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, from_me, sender,
                                  content, sent_at)
            SELECT organization_id, instance_id, id, 'seed-' || id, true, 'agent', 'how can I help?', last_message_at
            FROM conversations
        """)
        conn.execute("VACUUM ANALYZE contacts, conversations, messages")
        conn.execute("CHECKPOINT")  # the seed's own writes are not the timed run's to flush
        found = conn.execute(
            "SELECT count(*) FROM conversations WHERE last_message_at < now() - interval '24 hours'"
        ).fetchone()[0]
    if found != idle_n:
        raise BenchFailure(f"seeded {found} idle conversations, expected {idle_n}")
    progress(f"seeded {n} contacts, conversations and messages ({idle_n} idle) in {time.perf_counter() - begun:.1f}s")
    return uuid.UUID(str(org))


@dataclass(frozen=True, slots=True)
class ApiProcess:
    """The zapsync API in a separate uvicorn process (so its latency is not the benchmark process's)."""

    url: str


@contextlib.contextmanager
def api_process() -> Any:
    """Start `uvicorn api.main:create_app` on a free loopback port; stop it afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if child.poll() is not None or time.monotonic() > deadline:
                raise BenchFailure("the API process did not start")
            time.sleep(0.2)
        yield ApiProcess(url)
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()


def webhook_body(instance_name: str, jid: str) -> dict[str, Any]:
    """A `messages.upsert` delivery as Evolution v2.3 sends it (gateways.md §2.1, §2.3)."""
    now = time.time()
    return {
        "event": "messages.upsert",
        "instance": instance_name,
        "data": {
            "key": {"remoteJid": jid, "fromMe": False, "id": "3EB0" + uuid.uuid4().hex[:16].upper()},
            "pushName": "Ana",
            "status": "DELIVERY_ACK",
            "message": {"conversation": "ainda aí?"},
            "messageType": "conversation",
            "messageTimestamp": int(now),
            "instanceId": str(uuid.uuid4()),
            "source": "android",
        },
        "destination": "http://127.0.0.1/webhooks",
        "date_time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now)),
        "sender": "5511900000000@s.whatsapp.net",
        "server_url": "http://127.0.0.1",
        "apikey": None,
    }


def probe_webhook(api: ApiProcess, database: BenchDatabase, organization_id: uuid.UUID) -> bool:
    """Whether the API turns a `messages.upsert` into a message row (the import/message slice has landed)."""
    import httpx
    import psycopg

    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        conversation_id, jid, name = conn.execute(
            "SELECT c.id, ct.jid, i.instance_name FROM conversations c JOIN contacts ct ON ct.id = c.contact_id "
            "JOIN whatsapp_instances i ON i.id = c.instance_id WHERE c.last_message_at > now() - interval '20 hours' "
            "LIMIT 1"
        ).fetchone()
        before = conn.execute(
            "SELECT count(*) FROM messages WHERE conversation_id = %s", (conversation_id,)
        ).fetchone()[0]
        response = httpx.post(
            f"{api.url}/webhooks/evolution/{organization_id}",
            json=webhook_body(name, jid),
            headers={"x-webhook-secret": SECRET},
            timeout=10,
        )
        after = conn.execute("SELECT count(*) FROM messages WHERE conversation_id = %s", (conversation_id,)).fetchone()[
            0
        ]
    return response.status_code == 200 and after > before


# -- the message writers (a separate process) ----------------------------------------------------------------------


def _writer_child(
    conn: Connection, mode: Mode, conninfo: str, api_url: str, organization_id: str, rate: float, writers: int
) -> None:
    """Child process: load targets, then send paced messages until told to stop; send back (start, seconds)."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as db:
        targets = db.execute(
            "SELECT c.id, ct.jid, i.instance_name FROM conversations c JOIN contacts ct ON ct.id = c.contact_id "
            "JOIN whatsapp_instances i ON i.id = c.instance_id WHERE c.status IN ('waiting', 'in_progress')"
        ).fetchall()
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def one_writer(seed: int) -> None:
        rng = random.Random(seed)
        interval = writers / rate
        next_at = time.perf_counter() + rng.random() * interval
        if mode == "webhook":
            import httpx

            async with httpx.AsyncClient(base_url=api_url, headers={"x-webhook-secret": SECRET}, timeout=30) as http:
                while not stop.is_set():
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    _, jid, name = rng.choice(targets)
                    begun, wall = time.perf_counter(), time.time()
                    response = await http.post(f"/webhooks/evolution/{organization_id}", json=webhook_body(name, jid))
                    response.raise_for_status()
                    samples.append((wall, time.perf_counter() - begun))
                    next_at += interval
            return
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=False) as aconn:
            while not stop.is_set():
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                conversation_id = rng.choice(targets)[0]
                begun, wall = time.perf_counter(), time.time()
                await aconn.execute(
                    "INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, sender, "
                    "content, sent_at) SELECT organization_id, instance_id, id, %s, 'client', 'ainda aí?', now() "
                    "FROM conversations WHERE id = %s",
                    (uuid.uuid4().hex, conversation_id),
                )
                await aconn.execute(
                    "UPDATE conversations SET last_message_at = now(), waiting_since = COALESCE(waiting_since, now()), "
                    "updated_at = now() WHERE id = %s",
                    (conversation_id,),
                )
                await aconn.commit()
                samples.append((wall, time.perf_counter() - begun))
                next_at += interval

    async def main() -> None:
        tasks = [asyncio.create_task(one_writer(i)) for i in range(writers)]
        conn.send("ready")
        await asyncio.to_thread(conn.recv)  # "stop"
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    conn.send(samples)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


# -- measurement ---------------------------------------------------------------------------------------------------


def measure(
    options: CloseOptions, database: BenchDatabase, organization_id: uuid.UUID, idle_n: int, mode: Mode, api: ApiProcess
) -> dict[str, Any]:
    """Start the writers, time one flow run, stop the writers, check the result."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(
        target=_writer_child,
        name="zapsync-bench-writers",
        daemon=True,
        args=(child, mode, database.conninfo, api.url, str(organization_id), options.rate, options.writers),
    )
    process.start()
    child.close()
    if not parent.poll(120) or parent.recv() != "ready":
        raise BenchFailure("the writer process did not start")
    try:
        time.sleep(2.0)  # a quiet period for the reference latency
        report, window = asyncio.run(_timed_run(organization_id))
    finally:
        parent.send("stop")
        samples: list[tuple[float, float]] = parent.recv() if parent.poll(60) else []
        process.join(timeout=10)
    during = [s * 1000 for wall, s in samples if window[0] <= wall <= window[1]]
    quiet = [s * 1000 for wall, s in samples if window[0] - 1.5 <= wall < window[0]]
    if not during:
        raise BenchFailure("no message write started during the run: raise --rate")
    check = asyncio.run(_check(organization_id, report))
    seconds = window[1] - window[0]
    result: dict[str, Any] = {
        "benchmark": NAME,
        "conversations": options.conversations,
        "idle": idle_n,
        "idle_at_run_start": report.idle,
        "closed": report.closed,
        "raced": report.raced,
        "seconds": round(seconds, 3),
        "flow_internal_seconds": report.seconds,
        "rows_per_second": round(report.closed / seconds, 1) if seconds else None,
        "message_mode": mode,
        "message_rate": options.rate,
        "message_writes_during_run": len(during),
        "message_p50_ms": round(statistics.median(during), 2),
        "message_p99_ms": round(percentile(during, 99), 2),
        "message_max_ms": round(max(during), 2),
        "quiet_p99_ms": round(percentile(quiet, 99), 2) if quiet else None,
        "system_messages": check["system_messages"],
        "still_idle": check["still_idle"],
        "peak_rss_mb": peak_rss_mb(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "flow_run_id": str(report.flow_run_id),
        "database": "embedded" if database.embedded else database.url,
    }
    if options.conversations * options.idle >= TARGET["closed"]:
        scaled = result["seconds"] * TARGET["closed"] / max(report.closed, 1)
        result["targets"] = {
            **TARGET,
            "seconds_per_100k": round(scaled, 3),
            "met": scaled <= TARGET["seconds_max"] and result["message_p99_ms"] < TARGET["p99_ms_max"],
        }
    return result


async def _timed_run(organization_id: uuid.UUID) -> tuple[Any, tuple[float, float]]:
    from db.engine import dispose_engine
    from flows.close_inactive import close_inactive_conversations

    try:
        # Warm-up (not timed): the first flow run of a process pays Prefect's one-time setup.
        await close_inactive_conversations(organization_id=organization_id, dry_run=True)
        progress("timed: close_inactive_conversations() …")
        start = time.time()
        report = await close_inactive_conversations(organization_id=organization_id)
        end = time.time()
    finally:
        await dispose_engine()
    progress(
        f"flow run {report.flow_run_id}: closed={report.closed} raced={report.raced} in {end - start:.3f}s "
        f"(flow body {report.seconds:.3f}s)"
    )
    return report, (start, end)


async def _check(organization_id: uuid.UUID, report: Any) -> dict[str, int]:
    """Fail unless every closed conversation has its system message and nothing idle was left but raced rows."""
    from sqlalchemy import text

    from db.engine import dispose_engine, session_scope

    try:
        async with session_scope() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT (SELECT count(*) FROM conversations WHERE organization_id = :org AND status = 'closed' "
                        "        AND close_reason = 'inactive'), "
                        "       (SELECT count(*) FROM messages WHERE organization_id = :org AND sender = 'system'), "
                        "       (SELECT count(*) FROM conversations WHERE organization_id = :org "
                        "        AND status IN ('waiting', 'in_progress') AND last_message_at < :cutoff "
                        "        AND waiting_since IS NULL)"
                    ),
                    {"org": organization_id, "cutoff": report.organizations[0].cutoff},
                )
            ).one()
    finally:
        await dispose_engine()
    closed, notes, still_idle = (int(v) for v in row)
    problems = []
    if report.skipped:
        problems.append(f"the run was skipped: {report.skipped}")
    if closed != report.closed or notes != report.closed:
        problems.append(f"report says {report.closed} closed; database has {closed} closed and {notes} notes")
    if still_idle > report.raced:
        problems.append(f"{still_idle} idle conversations left open, only {report.raced} raced")
    if problems:
        raise BenchFailure("; ".join(problems))
    progress(f"checked: {closed} closed with a system message each; {still_idle} idle left (raced)")
    return {"system_messages": notes, "still_idle": still_idle}


# -- output --------------------------------------------------------------------------------------------------------


def result_table(result: dict[str, Any]) -> str:
    """The human-readable summary."""
    rows = [
        Row("conversations", f"{result['conversations']} ({result['idle']} idle)"),
        Row("closed", f"{result['closed']} ({result['raced']} raced by new messages or locks)"),
        Row("seconds", f"{result['seconds']:.3f} (flow body {result['flow_internal_seconds']:.3f})"),
        Row("closed rows/s", f"{result['rows_per_second']:.0f}"),
        Row(
            "message writes",
            f"{result['message_writes_during_run']} during the run at {result['message_rate']:g}/s "
            f"({result['message_mode']})",
        ),
        Row(
            "message latency",
            f"p50 {result['message_p50_ms']} ms, p99 {result['message_p99_ms']} ms, "
            f"max {result['message_max_ms']} ms (quiet p99 {result['quiet_p99_ms']} ms)",
        ),
        Row("peak RSS MB", str(result["peak_rss_mb"])),
        Row("machine", f"{result['cpus']} CPUs, load average {result['load_average_1m']} when the run ended"),
    ]
    if "targets" in result:
        t = result["targets"]
        rows.append(
            Row(
                "target",
                f"{'met' if t['met'] else 'MISSED'}: 100k closed in ≤ {t['seconds_max']:g} s "
                f"(scaled {t['seconds_per_100k']} s), p99 < {t['p99_ms_max']:g} ms",
            )
        )
    return render_table("zapsync bench: close-inactive", rows)
