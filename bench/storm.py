"""`python -m bench storm`: N instances reconnect at once (an Evolution restart); how long until all are imported.

Setup (not timed): a simulator process with N never-connected Evolution instances, each holding ``--chats``
one-to-one chats of ``--messages`` messages, and one more instance for the bulk comparison; a migrated database
with one organization (webhook secret) and the N instances as ``disconnected`` rows; a Prefect server
(``prefect server start`` with its scheduler, as `zapsync up` runs it; ``--prefect harness``: the ephemeral test
server, without schedules); the real API (uvicorn serving ``api.main:create_app``) and the deployments served
(``python -m deployments.serve``) as child processes, plus ``zapsync worker`` when this checkout has it.

Timed: for every instance, the simulator is told it is ``open`` and one real-shaped Evolution ``connection.update``
(``state: open``) is posted to ``/webhooks/evolution/{organization}``, spread over at most 10 s with bounded
concurrency; then the database is polled until every instance holds all its messages. Only what is visible from
outside is observed (webhooks in; rows, Prefect flow runs and processes out), so the benchmark runs unchanged
whichever way the API hands imports over.

Reported: ``seconds`` (first webhook → every instance fully imported), the ``import-conversations`` flow runs
created, the peak number of flow-run processes at once, the webhooks' p99 latency, and ``bulk_seconds``: the same
number of messages imported by one in-process flow run (``bench import``'s path), for ``ratio``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bench.common import (
    BenchDatabase,
    BenchFailure,
    ChildProcess,
    Row,
    SimSeed,
    SimulatorProcess,
    bench_database,
    configure_gateway,
    emit,
    flow_names_by_id,
    flow_run_processes,
    free_port,
    load_average,
    percentile,
    positive_int,
    prefect_api,
    prefect_server,
    prepare_environment,
    progress,
    read_all_flow_runs,
    render_table,
    run_main,
    wait_until,
    zapsync_command_exists,
)

NAME = "storm"
HELP = "reconnect storm: N instances connect at once; seconds until every history is imported, flow runs, processes"
IMPORT_FLOW = "import-conversations"
SERVED_DEPLOYMENT = "sync-status/on-demand"
"""Polled once the flow runner serves its deployments (what `zapsync up` waits for); exists before and after the
work queue, unlike the import deployment (``import-conversations/on-demand``, later ``…/drain``)."""
SECRET = "bench-storm-webhook-secret"
HOST = "127.0.0.1"
MAX_SPREAD_S = 10.0
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True, slots=True)
class StormOptions:
    """Command-line options of ``bench storm``."""

    instances: int
    chats: int
    messages: int
    spread_s: float
    concurrency: int
    timeout_s: float
    prefect: str
    as_json: bool

    @property
    def messages_per_instance(self) -> int:
        """Messages each instance holds."""
        return self.chats * self.messages


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``bench storm``'s options."""
    parser.add_argument("--instances", type=positive_int, required=True, help="instances that reconnect (N)")
    parser.add_argument("--chats", type=positive_int, default=10, help="one-to-one chats per instance")
    parser.add_argument("--messages", type=positive_int, default=10, help="messages per chat")
    parser.add_argument(
        "--spread-seconds",
        type=float,
        default=None,
        dest="spread_s",
        help=f"seconds the webhooks are spread over (default: 0.1 s per instance, at most {MAX_SPREAD_S:g})",
    )
    parser.add_argument("--concurrency", type=positive_int, default=20, help="webhooks in flight at once")
    parser.add_argument(
        "--timeout", type=float, default=600.0, dest="timeout_s", help="seconds to wait for every import"
    )
    parser.add_argument(
        "--prefect",
        choices=("server", "harness"),
        default="server",
        help="server: `prefect server start` with its scheduler, as `zapsync up` runs it (default); "
        "harness: the lighter ephemeral test server, without schedules",
    )
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench storm``: exit code 0, or 1 when the imports did not complete or rows are wrong."""
    spread = args.spread_s if args.spread_s is not None else min(MAX_SPREAD_S, 0.1 * args.instances)
    options = StormOptions(
        instances=args.instances,
        chats=args.chats,
        messages=args.messages,
        spread_s=max(0.0, spread),
        concurrency=args.concurrency,
        timeout_s=args.timeout_s,
        prefect=args.prefect,
        as_json=args.as_json,
    )
    return run_main(lambda out: bench_storm(options, out))


@dataclass(frozen=True, slots=True)
class World:
    """What the setup created: the organization and the instances (name → row id)."""

    organization_id: uuid.UUID
    instances: dict[str, uuid.UUID]


@dataclass(slots=True)
class StormFigures:
    """What the timed part observed."""

    seconds: float
    latencies_s: list[float]
    outcomes: Counter[str]
    peak_processes: int
    flow_runs: int
    flow_runs_by_flow: dict[str, int] = field(default_factory=dict)


def bench_storm(options: StormOptions, out: IO[str]) -> None:
    """Set up, measure the storm, measure the bulk import, report (see the module docstring)."""
    from bench.import_conversations import ImportOptions, measure

    prepare_environment()
    n = options.instances
    progress(
        f"storm: {n} instances × {options.chats} chats × {options.messages} messages "
        f"= {n * options.messages_per_instance} messages, webhooks over {options.spread_s:g} s"
    )
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zapsync-bench-storm-")))
        simulator = stack.enter_context(
            SimulatorProcess(
                [
                    SimSeed(n, provider="evolution", prefix="storm", connected_ratio=0.0),
                    SimSeed(1, provider="evolution", prefix="bulk", connected_ratio=1.0),
                ]
            )
        )
        database = stack.enter_context(bench_database())
        stack.enter_context(prefect_server() if options.prefect == "server" else prefect_api())
        simulator.wait()
        names, bulk_name = simulator.seeded[0].names, simulator.seeded[1].names[0]
        for name in names:
            _set_history(simulator, name, options.chats, options.messages)
        _set_history(simulator, bulk_name, n * options.chats, options.messages)
        progress(f"simulator serving {n} closed instances with history at {simulator.url}")
        configure_gateway("evolution", simulator.url)
        world = asyncio.run(seed_rows(names))
        children, api_url = start_children(logs)
        for child in children:
            stack.callback(child.stop)
        wait_for_children(children, api_url)
        load = load_average()
        roots = [child.pid for child in children[1:]]  # the flow runner and the worker start flow runs
        figures = asyncio.run(storm(options, world, database, simulator.url, api_url, roots))
        load_end = load_average()
        for child in reversed(children):
            progress(f"{child.name} {child.stop()}")
        progress(f"bulk comparison: one in-process import of {n * options.messages_per_instance} messages")
        bulk = asyncio.run(
            measure(
                ImportOptions(
                    chats=n * options.chats,
                    messages_per_chat=options.messages,
                    page_size=None,
                    concurrency=None,
                    latency_ms=0.0,
                    as_json=True,
                ),
                bulk_name,
                simulator,
            )
        )
    result = build_result(options, figures, bulk, load, load_end, worker=len(children) > 2)
    emit(result, as_json=options.as_json, table=result_table(result), out=out)


def _set_history(simulator: SimulatorProcess, name: str, chats: int, messages: int) -> None:
    shape = simulator.control("POST", f"/instances/{name}/history", {"chats": chats, "messages_per_chat": messages})
    if shape["messages"] != chats * messages:
        raise BenchFailure(f"the simulator holds {shape['messages']} messages for {name}, expected {chats * messages}")


async def seed_rows(names: list[str]) -> World:
    """One organization (webhook secret :data:`SECRET`) and its instances, disconnected five minutes ago."""
    from sqlalchemy import text

    from db.engine import dispose_engine, session_scope
    from db.repositories.organizations import create_organization

    try:
        async with session_scope() as session:
            org = await create_organization(session, name="bench-storm", webhook_secret=SECRET)
            rows = await session.execute(
                text(
                    "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, status, "
                    "status_observed_at) "
                    "SELECT :org, 'evolution', name, 'disconnected', now() - interval '5 minutes' "
                    "FROM unnest(CAST(:names AS text[])) AS name RETURNING instance_name, id"
                ),
                {"org": org.id, "names": names},
            )
            instances = {str(name): uuid.UUID(str(row_id)) for name, row_id in rows.all()}
            organization_id = uuid.UUID(str(org.id))
    finally:
        await dispose_engine()
    progress(f"organization {organization_id} with {len(instances)} disconnected instances")
    return World(organization_id, instances)


def start_children(logs: Path) -> tuple[list[ChildProcess], str]:
    """The API, the flow runner and (when this checkout has it) the worker, as `zapsync up` runs them; returns
    them (API first) and the API's URL."""
    from prefect.settings import PREFECT_API_URL

    port = free_port(HOST)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    api_argv = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", HOST, "--port"]
    api_argv += [str(port), "--log-level", "warning", "--no-access-log"]
    children = [
        ChildProcess("api", api_argv, env, logs / "api.log").start(),
        ChildProcess("serve", [sys.executable, "-m", "deployments.serve"], env, logs / "serve.log").start(),
    ]
    if zapsync_command_exists("worker"):
        worker = [sys.executable, "-m", "zapsync.cli", "worker"]
        children.append(ChildProcess("worker", worker, env, logs / "worker.log").start())
    else:
        progress("no `zapsync worker` in this checkout: imports run as served flow runs only")
    return children, f"http://{HOST}:{port}"


def wait_for_children(children: list[ChildProcess], api_url: str) -> None:
    """Until the API answers ``/readyz`` and the runner has polled :data:`SERVED_DEPLOYMENT` (it serves them all)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    prefect_url = str(PREFECT_API_URL.value()).rstrip("/")

    def api_ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
        return False

    def deployment_polled() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{prefect_url}/deployments/name/{SERVED_DEPLOYMENT}", timeout=2)
            return response.status_code == 200 and response.json().get("last_polled") is not None
        return False

    begun = time.perf_counter()
    wait_until("the API", api_ready, timeout_s=120, alive=children)
    wait_until(f"the deployment {SERVED_DEPLOYMENT}", deployment_polled, timeout_s=180, alive=children)
    progress(f"API at {api_url} and deployments served in {time.perf_counter() - begun:.1f}s")


class ProcessSampler:
    """Counts the flow-run processes below ``roots`` every half second, in a thread; keeps the peak."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-process-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, len(flow_run_processes(self.roots)))
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def connection_open_webhook(name: str, sim: dict[str, Any], simulator_url: str, url: str) -> dict[str, Any]:
    """An Evolution ``connection.update`` delivery with ``state: open``, shaped like the simulator's emitter."""
    return {
        "event": "connection.update",
        "instance": name,
        "data": {
            "instance": name,
            "state": "open",
            "statusReason": 200,
            "wuid": sim.get("owner_jid"),
            "profileName": sim.get("profile_name"),
            "profilePictureUrl": None,
        },
        "destination": url,
        "date_time": datetime.now(UTC).isoformat(),
        "sender": sim.get("owner_jid") or "",
        "server_url": simulator_url,
        "apikey": sim.get("token"),
    }


async def storm(
    options: StormOptions,
    world: World,
    database: BenchDatabase,
    simulator_url: str,
    api_url: str,
    roots: list[int],
) -> StormFigures:
    """Post the webhooks, wait until every instance holds all its messages, count the flow runs."""
    import httpx

    n = options.instances
    url = f"{api_url}/webhooks/evolution/{world.organization_id}"
    headers = {"Content-Type": "application/json", "User-Agent": "axios/1.7.9", "X-Webhook-Secret": SECRET}
    semaphore = asyncio.Semaphore(options.concurrency)
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    first_sent: list[float] = []
    limits = httpx.Limits(max_connections=options.concurrency * 2, max_keepalive_connections=options.concurrency * 2)

    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def fire(index: int, name: str, t0: float) -> None:
            await asyncio.sleep(max(0.0, t0 + index * options.spread_s / n - time.perf_counter()))
            async with semaphore:
                (
                    await http.post(f"{simulator_url}/_sim/instances/{name}/state", json={"state": "open"})
                ).raise_for_status()
                sim_response = await http.get(f"{simulator_url}/_sim/instances/{name}")
                sim_response.raise_for_status()
                body = json.dumps(connection_open_webhook(name, sim_response.json(), simulator_url, url))
                begun = time.perf_counter()
                if not first_sent:
                    first_sent.append(begun)
                response = await http.post(url, content=body, headers=headers)
                latencies.append(time.perf_counter() - begun)
            if response.status_code != 200:
                raise BenchFailure(f"webhook for {name}: HTTP {response.status_code} {response.text[:300]}")
            outcomes[str(response.json().get("outcome"))] += 1

        started_at = datetime.now(UTC)
        progress(f"timed: {n} connection.update webhooks, then waiting for every import …")
        with ProcessSampler(roots) as sampler:
            t0 = time.perf_counter()
            firing = asyncio.gather(*(fire(i, name, t0) for i, name in enumerate(world.instances)))
            try:
                done_at = await wait_imported(options, world, database, firing)
                await firing
            finally:
                if not firing.done():
                    firing.cancel()
                    with contextlib.suppress(BaseException):
                        await firing
    seconds = done_at - first_sent[0]
    progress(f"every instance imported {seconds:.1f}s after the first webhook; peak {sampler.peak} flow-run processes")
    flow_runs, by_flow = await count_flow_runs(started_at)
    return StormFigures(seconds, latencies, outcomes, sampler.peak, flow_runs, by_flow)


async def wait_imported(
    options: StormOptions, world: World, database: BenchDatabase, firing: asyncio.Future[Any]
) -> float:
    """Poll the message counts until every instance holds exactly its messages; returns the perf_counter then."""
    import psycopg

    expected = options.messages_per_instance
    ids = list(world.instances.values())
    deadline = time.monotonic() + options.timeout_s
    last_report = 0.0
    async with await psycopg.AsyncConnection.connect(database.conninfo, autocommit=True) as conn:
        while True:
            if firing.done() and firing.exception() is not None:
                raise firing.exception()  # type: ignore[misc]
            rows = await (
                await conn.execute(
                    "SELECT instance_id, count(*) FROM messages WHERE instance_id = ANY(%s) GROUP BY instance_id",
                    (ids,),
                )
            ).fetchall()
            now = time.perf_counter()
            counts = {row[0]: int(row[1]) for row in rows}
            over = {str(k): v for k, v in counts.items() if v > expected}
            if over:
                raise BenchFailure(f"instances with more than {expected} messages (duplicates?): {over}")
            complete = sum(1 for count in counts.values() if count == expected)
            if complete == len(ids):
                return now
            if time.monotonic() > deadline:
                raise BenchFailure(
                    f"after {options.timeout_s:.0f}s only {complete} of {len(ids)} instances hold all their "
                    f"{expected} messages ({sum(counts.values())} messages in all)"
                )
            if now - last_report >= 15:
                last_report = now
                progress(f"{complete}/{len(ids)} instances imported, {sum(counts.values())} messages")
            await asyncio.sleep(SAMPLE_EVERY_S)


async def count_flow_runs(since: datetime) -> tuple[int, dict[str, int]]:
    """``import-conversations`` runs created since ``since``, and the runs of every flow created since then
    (not counting the ones the scheduler created for later times)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        names = await flow_names_by_id(client)
        runs = await read_all_flow_runs(client)
    now = datetime.now(UTC)
    runs = [
        run
        for run in runs
        if (run.created is None or run.created >= since)
        and (run.start_time is not None or run.expected_start_time is None or run.expected_start_time <= now)
    ]
    by_flow = Counter(names.get(run.flow_id, str(run.flow_id)) for run in runs)
    return by_flow.get(IMPORT_FLOW, 0), dict(sorted(by_flow.items()))


def build_result(
    options: StormOptions,
    figures: StormFigures,
    bulk: dict[str, Any],
    load: float,
    load_end: float,
    *,
    worker: bool,
) -> dict[str, Any]:
    """The JSON object of one run."""
    # The ratio is of the printed (rounded) figures, so a reader can check it from the report.
    seconds = round(figures.seconds, 3)
    bulk_seconds = round(float(bulk["seconds"]), 3)
    latencies_ms = [1000 * s for s in figures.latencies_s]
    return {
        "benchmark": NAME,
        "instances": options.instances,
        "seconds": seconds,
        "bulk_seconds": bulk_seconds,
        "ratio": round(seconds / bulk_seconds, 2) if bulk_seconds > 0 else None,
        "flow_runs": figures.flow_runs,
        "webhook_p99_ms": round(percentile(latencies_ms, 0.99), 1),
        "webhook_p50_ms": round(percentile(latencies_ms, 0.50), 1),
        "webhook_max_ms": round(max(latencies_ms), 1),
        "webhook_outcomes": dict(figures.outcomes),
        "peak_flow_run_processes": figures.peak_processes,
        "flow_runs_by_flow": figures.flow_runs_by_flow,
        "messages": options.instances * options.messages_per_instance,
        "chats": options.chats,
        "messages_per_chat": options.messages,
        "spread_seconds": round(options.spread_s, 3),
        "webhook_concurrency": options.concurrency,
        "worker": worker,
        "prefect": options.prefect,
        "load_average": load,
        "load_average_end": load_end,
    }


def result_table(result: dict[str, Any]) -> str:
    """The human-readable summary."""
    runs = ", ".join(f"{name} {count}" for name, count in result["flow_runs_by_flow"].items()) or "none"
    rows = [
        Row(
            "instances",
            f"{result['instances']} × {result['chats']} chats × {result['messages_per_chat']} messages "
            f"= {result['messages']} messages",
        ),
        Row("seconds", f"{result['seconds']:.2f} (first webhook → every instance imported)"),
        Row("bulk seconds", f"{result['bulk_seconds']:.2f} (the same messages in one in-process flow run)"),
        Row("ratio", f"{result['ratio']}"),
        Row("import flow runs", f"{result['flow_runs']} (all flow runs meanwhile: {runs})"),
        Row("peak flow-run procs", str(result["peak_flow_run_processes"])),
        Row(
            "webhook ms",
            f"p50 {result['webhook_p50_ms']}, p99 {result['webhook_p99_ms']}, max {result['webhook_max_ms']} "
            f"({result['webhook_outcomes']})",
        ),
        Row(
            "load average",
            f"{result['load_average']} → {result['load_average_end']}; worker: {'yes' if result['worker'] else 'no'}",
        ),
    ]
    return render_table("zapsync bench: reconnect storm", rows)
