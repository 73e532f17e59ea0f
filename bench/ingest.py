"""`python -m bench ingest`: webhook ingest throughput and latency against the real API, then a count of what stuck.

Setup (not timed): a migrated database with one organization and ``INSTANCES`` connected Evolution instances;
for receipts, messages of the business already stored (status ``sent``) for the receipts to move. Every body is
built before the clock starts, from the simulator's Evolution shapes (``gateways.simulator.sends.chat_message``,
``receipt_bodies``, ``shapes.connection_update_data`` in the emitter's envelope):

* ``messages`` — `messages.upsert` of a customer's text, spread over ``events / 4`` contacts (a conversation gets
  several messages);
* ``receipts`` — `messages.update` DELIVERY_ACK and READ of the stored messages (two per message);
* ``status`` — `connection.update` alternating connecting / close (logged out) per instance, newer each time;
* ``mixed`` — 60 % messages, 30 % receipts, 10 % status, shuffled (fixed seed).

The API runs as `zapsync up` runs it (``zapsync api`` in a subprocess, ``--workers`` passed through). A separate
load-generator process posts the bodies over ``concurrency`` keep-alive connections with raw asyncio streams (no
HTTP client library: the generator must cost little CPU) and times each request. Reported: events/s, p50/p99 per
request, non-2xx answers (``errors``); afterwards every distinct event is checked to have been stored exactly once:
a messages row per external id and an inbox row per message event, each receipted message at its newest status,
each instance at its newest observed status (``lost``, ``duplicated``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import IO, Any

from bench.common import (
    REPO_ROOT,
    BenchDatabase,
    BenchFailure,
    Row,
    bench_database,
    emit,
    load_average,
    percentile,
    positive_int,
    prepare_environment,
    progress,
    render_table,
    run_main,
    tree_cpu_seconds,
    wait_until,
)
from bench.series import add_series_option, run_series

NAME = "ingest"
HELP = "webhook ingest: N real-shaped webhooks at concurrency C against the real API; events/s, p50/p99, lost"
TARGET = {"events_per_s_min": 3_000, "p99_ms_max": 50.0}
SECRET = "bench-webhook-secret"
INSTANCES = 10
MIXES = ("messages", "receipts", "status", "mixed")
MIX_SHARES = {"messages": 0.6, "receipts": 0.3, "status": 0.1}
"""Proportions of the mixed workload."""


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """Command-line options of ``bench ingest``."""

    events: int
    concurrency: int
    mix: str
    workers: int
    as_json: bool


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``bench ingest``'s options."""
    parser.add_argument("--events", type=positive_int, default=10_000, help="webhooks to post (N, default 10,000)")
    parser.add_argument("--concurrency", type=positive_int, default=50, help="connections posting at once (C)")
    parser.add_argument("--mix", choices=MIXES, default="mixed", help="which deliveries (default mixed: 60/30/10)")
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="API worker processes (default: what `zapsync up` uses)"
    )
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object on stdout")
    add_series_option(parser, unit="events")


def run(args: argparse.Namespace) -> int:
    """Entry point: exit code 0, or 1 when an event was lost or duplicated."""
    if args.series:
        extra = ["--workers", str(args.workers)] if args.workers else []
        return run_series(
            NAME,
            args.series,
            lambda size: ["--events", str(size), "--concurrency", str(args.concurrency), "--mix", args.mix, *extra],
            unit="events",
            as_json=args.as_json,
        )
    options = IngestOptions(
        events=args.events,
        concurrency=args.concurrency,
        mix=args.mix,
        workers=args.workers or 0,
        as_json=args.as_json,
    )
    return run_main(lambda out: bench_ingest(options, out))


# -- the workload (built before timing) ------------------------------------------------------------------------


@dataclass(slots=True)
class Workload:
    """Every body to post, and what the database must hold afterwards."""

    bodies: list[bytes]
    message_ids: list[str]
    receipt_targets: dict[str, str]
    """External id of a stored message → the newest status its receipts carry."""
    receipt_events: int
    newest_status: dict[str, tuple[str, dt.datetime]]
    """Instance name → (status, observed time) of its newest `connection.update`."""
    sent_status: dict[str, list[tuple[str, dt.datetime]]]
    """Instance name → (status, observed time) of each of its `connection.update` deliveries."""
    counts: dict[str, int]


def instance_names() -> list[str]:
    """The seeded instances' names."""
    return [f"ingest-{i:02d}" for i in range(INSTANCES)]


def split(events: int, mix: str) -> dict[str, int]:
    """How many events of each kind ``mix`` makes of ``events`` (receipts in pairs)."""
    if mix != "mixed":
        return {kind: (events if kind == mix else 0) for kind in MIX_SHARES}
    receipts = int(events * MIX_SHARES["receipts"]) // 2 * 2
    status = int(events * MIX_SHARES["status"])
    return {"messages": events - receipts - status, "receipts": receipts, "status": status}


def build_workload(events: int, mix: str, *, seed: int = 14) -> Workload:
    """Bodies in the simulator's Evolution shapes, shuffled (fixed seed), with the expected end state."""
    import orjson

    from gateways.simulator import shapes
    from gateways.simulator.sends import chat_message, receipt_bodies
    from gateways.simulator.state import SimInstance, StateChange

    rng = random.Random(seed)
    counts = split(events, mix)
    names = instance_names()
    sims = {
        name: SimInstance(name=name, provider="evolution", instance_id=str(uuid.uuid4()), token="t") for name in names
    }
    now = dt.datetime.now(dt.UTC)
    envelopes: list[dict[str, Any]] = []

    def envelope(event: str, name: str, data: Any, at: dt.datetime) -> dict[str, Any]:
        return {
            "event": event,
            "instance": name,
            "data": data,
            "destination": "http://127.0.0.1/webhooks",
            "date_time": shapes.iso(at),
            "sender": f"5511900000{names.index(name):03d}@s.whatsapp.net",
            "server_url": "http://127.0.0.1:8080",
            "apikey": None,
        }

    contacts = max(1, counts["messages"] // 4)
    message_ids: list[str] = []
    for i in range(counts["messages"]):
        name = names[i % INSTANCES]
        jid = f"5521{(i % contacts):09d}@s.whatsapp.net"
        external_id = f"3EB0IN{i:012d}"
        at = now - dt.timedelta(seconds=counts["messages"] - i)
        message = chat_message(
            sims[name], jid=jid, external_id=external_id, text=f"message {i}", at=at, from_me=False, push_name="Ana"
        )
        envelopes.append(envelope("messages.upsert", name, message, now))
        message_ids.append(external_id)
    receipt_targets: dict[str, str] = {}
    for j in range(counts["receipts"] // 2):
        name = names[j % INSTANCES]
        external_id = receipt_id(j)
        for event, body in receipt_bodies(
            sims[name], jid=receipt_jid(j), external_id=external_id, statuses=("delivered", "read")
        ):
            envelopes.append(envelope(event, name, body, now))
        receipt_targets[external_id] = "read"
    newest: dict[str, tuple[str, dt.datetime]] = {}
    sent: dict[str, list[tuple[str, dt.datetime]]] = {}
    for k in range(counts["status"]):
        name = names[k % INSTANCES]
        state = "connecting" if (k // INSTANCES) % 2 == 0 else "close"
        at = now + dt.timedelta(milliseconds=k + 1)
        change = StateChange(name=name, provider="evolution", old="open", new=state, at=at, reason_code=401)
        envelopes.append(envelope("connection.update", name, shapes.connection_update_data(change), at))
        newest[name] = ("connecting" if state == "connecting" else "disconnected", at)
        sent.setdefault(name, []).append(newest[name])
    rng.shuffle(envelopes)
    return Workload(
        bodies=[orjson.dumps(e) for e in envelopes],
        message_ids=message_ids,
        receipt_targets=receipt_targets,
        receipt_events=counts["receipts"],
        newest_status=newest,
        sent_status=sent,
        counts=counts,
    )


def receipt_id(j: int) -> str:
    """External id of the j-th stored message that receipts move."""
    return f"3EB0RC{j:012d}"


def receipt_jid(j: int) -> str:
    """The chat of the j-th stored message."""
    return f"5531{j:09d}@s.whatsapp.net"


# -- setup (not timed) ---------------------------------------------------------------------------------------------


def seed(database: BenchDatabase, receipts: int) -> uuid.UUID:
    """One organization, its connected instances, and ``receipts`` stored business messages; VACUUM ANALYZE."""
    import psycopg

    from db.repositories.organizations import digest

    names = instance_names()
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        org = conn.execute(
            "INSERT INTO organizations (name, webhook_secret_hash, inactivity_hours) VALUES ('bench', %s, 24) "
            "RETURNING id",
            (digest(SECRET),),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, status, status_observed_at) "
            "SELECT %s, 'evolution', n, 'connected', now() - interval '1 hour' FROM unnest(%s::text[]) n",
            (org, names),
        )
        if receipts:
            conn.execute(
                """
                WITH r AS (
                    SELECT g, '5531' || lpad(g::text, 9, '0') || '@s.whatsapp.net' AS jid,
                           '3EB0RC' || lpad(g::text, 12, '0') AS ext, %(names)s::text[] AS names
                    FROM generate_series(0, %(n)s - 1) g
                ), c AS (
                    INSERT INTO contacts (organization_id, instance_id, jid, phone)
                    SELECT %(org)s, i.id, r.jid, substr(r.jid, 1, 13)
                    FROM r JOIN whatsapp_instances i ON i.instance_name = r.names[1 + r.g %% %(k)s]
                    RETURNING id, instance_id, jid
                ), v AS (
                    INSERT INTO conversations (organization_id, instance_id, contact_id, status, opened_at,
                                               last_message_at)
                    SELECT %(org)s, c.instance_id, c.id, 'in_progress', now() - interval '1 hour',
                           now() - interval '1 hour'
                    FROM c RETURNING id, instance_id, contact_id
                )
                INSERT INTO messages (organization_id, instance_id, conversation_id, external_id, from_me, sender,
                                      content, sent_at, status)
                SELECT %(org)s, v.instance_id, v.id, r.ext, true, 'agent', 'your order shipped',
                       now() - interval '1 hour', 'sent'
                FROM v JOIN c ON c.id = v.contact_id JOIN r ON r.jid = c.jid
                """,
                {"org": org, "names": names, "n": receipts, "k": INSTANCES},
            )
        conn.execute("VACUUM ANALYZE")
    return org


@dataclass(frozen=True, slots=True)
class Api:
    """The API under test."""

    host: str
    port: int
    pid: int
    log_path: str

    def log_count(self, text: str) -> int:
        """How many lines of the API's log so far contain ``text``."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return sum(1 for line in log if text in line)


@contextlib.contextmanager
def api_process(workers: int) -> Iterator[Api]:
    """``zapsync api`` on a free loopback port, as `zapsync up` starts it; stopped afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "zapsync.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    if workers:
        command += ["--workers", str(workers)]
    log_fd, log_path = tempfile.mkstemp(prefix="bench-ingest-api-", suffix=".log")
    os.close(log_fd)
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ), stdout=log_file, stderr=log_file)
    try:

        def ready() -> bool:
            import httpx

            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            if child.poll() is not None:
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    tail = f.read()[-2000:]
                raise BenchFailure(f"the API exited with {child.returncode}:\n{tail}")
            return False

        wait_until("the API", ready, timeout_s=120)
        yield Api("127.0.0.1", port, child.pid, log_path)
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        os.unlink(log_path)


def postmaster_pid(database: BenchDatabase) -> int | None:
    """The local PostgreSQL server's process (its backends' parent), to read its CPU; None when it is elsewhere."""
    import psutil
    import psycopg

    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        try:
            return int(psutil.Process(backend).ppid())
        except psutil.Error:
            return None


# -- the load generator (its own process) --------------------------------------------------------------------------


def request_bytes(host: str, port: int, organization_id: uuid.UUID, body: bytes) -> bytes:
    """One keep-alive HTTP/1.1 POST of ``body`` to the organization's Evolution webhook."""
    head = (
        f"POST /webhooks/evolution/{organization_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nUser-Agent: axios/1.7.9\r\nX-Webhook-Secret: {SECRET}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _post_all(host: str, port: int, requests: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """Post every request over ``concurrency`` connections; per request its status (0: no answer) and latency."""
    statuses = [0] * len(requests)
    latencies = [0.0] * len(requests)
    cursor = iter(range(len(requests)))

    async def connection() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        for index in cursor:
            begun = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                writer.write(requests[index])
                head = await reader.readuntil(b"\r\n\r\n")
                length, close = 0, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                if length:
                    await reader.readexactly(length)
                statuses[index] = int(head[9:12])
                if close:
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, ValueError):
                statuses[index] = 0
                if writer is not None:
                    writer.close()
                writer = None
            latencies[index] = time.perf_counter() - begun
        if writer is not None:
            writer.close()

    begun = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    seconds = time.perf_counter() - begun
    return {"seconds": seconds, "statuses": statuses, "latencies": latencies, "cpu": time.process_time()}


def _generator_child(conn: Connection, host: str, port: int, requests: list[bytes], concurrency: int) -> None:
    conn.send("ready")
    conn.recv()  # go
    cpu_before = time.process_time()
    result = asyncio.run(_post_all(host, port, requests, concurrency))
    result["cpu"] -= cpu_before
    conn.send(result)
    conn.close()


def generate_load(api: Api, organization_id: uuid.UUID, bodies: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """Post ``bodies`` from a separate process (requests built before the clock starts); its timings."""
    requests = [request_bytes(api.host, api.port, organization_id, body) for body in bodies]
    context = multiprocessing.get_context("spawn")
    parent, child_end = context.Pipe()
    child = context.Process(target=_generator_child, args=(child_end, api.host, api.port, requests, concurrency))
    child.start()
    try:
        if parent.recv() != "ready":
            raise BenchFailure("the load generator did not start")
        parent.send("go")
        result: dict[str, Any] = parent.recv()
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    return result


# -- checks ----------------------------------------------------------------------------------------------------


def check(database: BenchDatabase, organization_id: uuid.UUID, workload: Workload) -> dict[str, Any]:
    """Count what was stored against what was sent: ``lost`` and ``duplicated`` distinct events."""
    import psycopg

    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT external_id, count(*) FROM messages WHERE organization_id = %s AND external_id = ANY(%s) "
            "GROUP BY external_id",
            (organization_id, workload.message_ids),
        ).fetchall()
        messages_lost = len(workload.message_ids) - len(rows)
        messages_duplicated = sum(n - 1 for _, n in rows)
        statuses = dict(
            conn.execute(
                "SELECT external_id, status FROM messages WHERE organization_id = %s AND external_id = ANY(%s)",
                (organization_id, list(workload.receipt_targets)),
            ).fetchall()
        )
        receipts_lost = sum(1 for ext, want in workload.receipt_targets.items() if statuses.get(ext) != want)
        inbox = dict(
            conn.execute(
                "SELECT event, count(*) FROM webhook_events WHERE organization_id = %s AND outcome = 'applied' "
                "AND event IN ('messages.upsert', 'messages.update') GROUP BY event",
                (organization_id,),
            ).fetchall()
        )
        inbox_duplicated = conn.execute(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM webhook_events "
            "WHERE organization_id = %s GROUP BY dedupe_key) s",
            (organization_id,),
        ).fetchone()[0]
        instances = {
            name: (status, observed)
            for name, status, observed in conn.execute(
                "SELECT instance_name, status, status_observed_at FROM whatsapp_instances WHERE organization_id = %s",
                (organization_id,),
            ).fetchall()
        }
        conversations = conn.execute(
            "SELECT count(*), count(DISTINCT contact_id) FROM conversations WHERE organization_id = %s "
            "AND status IN ('waiting', 'in_progress')",
            (organization_id,),
        ).fetchone()

    def is_sent(name: str) -> bool:
        status, at = instances.get(name, (None, None))
        return at is not None and any(
            s == status and abs((t - at).total_seconds()) < 0.001 for s, t in workload.sent_status[name]
        )

    # An instance's stored state must be one that was delivered; it is the newest unless a repeat of the state
    # just handled (RepeatFilter, or "state already stored") swallowed a newer delivery that arrived out of order.
    status_lost = sum(1 for name in workload.sent_status if not is_sent(name))
    not_newest = sum(
        1 for name, (status, _) in workload.newest_status.items() if instances.get(name, (None, None))[0] != status
    )
    inbox_lost = max(0, len(workload.message_ids) - inbox.get("messages.upsert", 0)) + max(
        0, workload.receipt_events - inbox.get("messages.update", 0)
    )
    return {
        "lost": messages_lost + receipts_lost + status_lost + inbox_lost,
        "duplicated": messages_duplicated + int(inbox_duplicated) + (conversations[0] - conversations[1]),
        "lost_detail": {
            "messages": messages_lost,
            "receipts": receipts_lost,
            "status": status_lost,
            "inbox": inbox_lost,
        },
        "status_not_newest": not_newest,
    }


# -- the run -----------------------------------------------------------------------------------------------------


def bench_ingest(options: IngestOptions, out: IO[str]) -> None:
    """Set up, measure, check and report (see the module docstring)."""
    prepare_environment()
    for var in ("EVOLUTION_API_URL", "EVOLUTION_API_KEY", "MEGA_API_HOST", "MEGA_API_TOKEN", "ZAPSYNC_GATEWAYS"):
        os.environ.pop(var, None)
    progress(f"ingest: {options.events} events ({options.mix}) at concurrency {options.concurrency}")
    workload = build_workload(options.events, options.mix)
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(bench_database())
        organization_id = seed(database, len(workload.receipt_targets))
        api = stack.enter_context(api_process(options.workers))
        postmaster = postmaster_pid(database)
        load_before = load_average()
        cpu_before = tree_cpu_seconds(api.pid), tree_cpu_seconds(postmaster) if postmaster else 0.0
        timed = generate_load(api, organization_id, workload.bodies, options.concurrency)
        api_cpu = tree_cpu_seconds(api.pid) - cpu_before[0]
        pg_cpu = (tree_cpu_seconds(postmaster) - cpu_before[1]) if postmaster else None
        load_after = load_average()
        fallbacks = api.log_count("applying them one by one")
        checked = check(database, organization_id, workload)
    statuses: list[int] = timed["statuses"]
    latencies_ms = [s * 1000 for s in timed["latencies"]]
    seconds = round(float(timed["seconds"]), 3)  # the rate is the one the reported seconds give
    result: dict[str, Any] = {
        "events": options.events,
        "mix": options.mix,
        "kinds": workload.counts,
        "concurrency": options.concurrency,
        "workers": options.workers or None,
        "seconds": round(seconds, 3),
        "events_per_s": round(options.events / seconds, 1),
        "p50_ms": round(percentile(latencies_ms, 0.50), 2),
        "p99_ms": round(percentile(latencies_ms, 0.99), 2),
        "max_ms": round(max(latencies_ms), 2),
        "errors": sum(1 for s in statuses if not 200 <= s < 300),
        "no_answer": sum(1 for s in statuses if s == 0),
        "lost": checked["lost"],
        "duplicated": checked["duplicated"],
        "lost_detail": checked["lost_detail"],
        "status_not_newest": checked["status_not_newest"],
        "batch_fallbacks": fallbacks,
        "generator_cpu_s": round(float(timed["cpu"]), 2),
        "api_cpu_s": round(api_cpu, 2),
        "postgres_cpu_s": round(pg_cpu, 2) if pg_cpu is not None else None,
        "cpu_ms_per_event": round((api_cpu + (pg_cpu or 0.0)) / options.events * 1000, 3),
        "loadavg": [load_before, load_after],
        "target": TARGET,
    }
    emit(result, as_json=options.as_json, table=result_table(result), out=out)
    if result["lost"] or result["duplicated"]:
        raise BenchFailure(f"{result['lost']} events lost, {result['duplicated']} duplicated")


def result_table(result: dict[str, Any]) -> str:
    """The human-readable summary."""
    rows = [
        Row("events", f"{result['events']:,} ({result['mix']}: {result['kinds']})"),
        Row("concurrency", str(result["concurrency"])),
        Row("seconds", f"{result['seconds']:.3f}"),
        Row("events/s", f"{result['events_per_s']:,.0f} (target ≥ {TARGET['events_per_s_min']:,})"),
        Row("p50 / p99 / max ms", f"{result['p50_ms']:.1f} / {result['p99_ms']:.1f} / {result['max_ms']:.1f}"),
        Row("non-2xx (no answer)", f"{result['errors']} ({result['no_answer']})"),
        Row("lost / duplicated", f"{result['lost']} / {result['duplicated']} {result['lost_detail']}"),
        Row("generator CPU s", f"{result['generator_cpu_s']:.2f}"),
        Row("API / PostgreSQL CPU s", f"{result['api_cpu_s']:.2f} / {result['postgres_cpu_s']}"),
        Row("CPU ms per event (API + PostgreSQL)", f"{result['cpu_ms_per_event']:.3f}"),
        Row("load average before/after", f"{result['loadavg'][0]:.2f} / {result['loadavg'][1]:.2f}"),
    ]
    return render_table("bench ingest", rows)
