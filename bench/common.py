"""Shared plumbing of the benchmarks: environment, throwaway database, simulator process, Prefect, output.

Nothing heavy is imported at module level: Prefect reads its settings (logging level, analytics) when it is first
imported, so :func:`prepare_environment` must run before anything imports ``prefect`` or zapsync's flows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO, Any, Literal

ProviderName = Literal["evolution", "megaapi"]

SIM_EVOLUTION_KEY = "bench-evolution-key"
SIM_MEGAAPI_TOKEN = "bench-megaapi-token"
_GATEWAY_VARS = (
    "EVOLUTION_API_URL",
    "EVOLUTION_API_KEY",
    "EVOLUTION_METRICS",
    "MEGA_API_HOST",
    "MEGA_API_TOKEN",
    "ZAPSYNC_GATEWAYS",
)
_STARTED = time.perf_counter()


class BenchFailure(Exception):
    """The benchmark ran but its result is wrong (exit code 1)."""


# -- messages and output ----------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """One progress line on stderr, stamped with seconds since the process started."""
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (children not included)."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kilobytes / 1024, 1)


def load_average() -> float:
    """The machine's 1-minute load average: timings on a busy machine are not comparable with quiet ones."""
    return round(os.getloadavg()[0], 2)


@dataclass(slots=True)
class Stopwatch:
    """Wall-clock and CPU time (all threads) of one block, and the cyclic garbage collector's pauses in it.

    ``with Stopwatch() as sw: ...``; ``gc_seconds`` is the time spent in collections, ``gc_full`` the number of
    full (generation 2) collections.
    """

    wall: float = 0.0
    cpu: float = 0.0
    gc_seconds: float = 0.0
    gc_full: int = 0
    _begun: tuple[float, float] = (0.0, 0.0)
    _gc_started: float = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._gc_started
            self.gc_full += info.get("generation") == 2

    def __enter__(self) -> Stopwatch:
        import gc

        gc.callbacks.append(self._on_gc)
        self._begun = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        self.wall = time.perf_counter() - self._begun[0]
        self.cpu = time.process_time() - self._begun[1]
        gc.callbacks.remove(self._on_gc)


@contextlib.contextmanager
def reserved_stdout() -> Iterator[IO[str]]:
    """Send everything written to stdout (by us, libraries or child processes) to stderr for the block.

    Yields a stream on the real stdout, so that a ``--json`` run prints exactly one JSON object there.
    """
    sys.stdout.flush()
    saved_fd = os.dup(1)
    real = os.fdopen(os.dup(saved_fd), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        real.flush()
        real.close()


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table."""

    label: str
    value: str


def render_table(title: str, rows: Sequence[Row]) -> str:
    """A plain two-column table (readable in a terminal and in a pasted report)."""
    width = max(len(row.label) for row in rows)
    value_width = max(len(row.value) for row in rows)
    rule = "-" * (width + value_width + 3)
    lines = [title, rule]
    lines += [f"{row.label:<{width}} | {row.value}" for row in rows]
    lines.append(rule)
    return "\n".join(lines)


def emit(result: dict[str, Any], *, as_json: bool, table: str, out: IO[str]) -> None:
    """Write the result: one JSON object, or the human table."""
    if as_json:
        out.write(json.dumps(result, sort_keys=False, default=str) + "\n")
    else:
        out.write(table + "\n")
    out.flush()


# -- command-line values ----------------------------------------------------------------------------------------


def positive_int(value: str) -> int:
    """An argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def fraction(value: str) -> float:
    """An argparse type: a number within [0, 1]."""
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError("must be within [0, 1]")
    return number


# -- environment ------------------------------------------------------------------------------------------------


def prepare_environment() -> None:
    """Quiet, private settings for Prefect and the gateway clients; call before importing prefect or zapsync."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def configure_gateway(
    provider: ProviderName, url: str, *, max_concurrency: int | None = None, metrics: bool = False
) -> None:
    """Point zapsync's only configured gateway (named after the provider) at the simulator and reload settings.

    The seeds' variables (``EVOLUTION_API_URL``/``EVOLUTION_API_KEY``, ``MEGA_API_HOST``/``MEGA_API_TOKEN``) by default;
    ``ZAPSYNC_GATEWAYS`` when ``max_concurrency`` is given, the only way to set a gateway's concurrency. ``metrics``
    reads Evolution's live states from its `/metrics` (``EVOLUTION_METRICS=true``, or the gateway's ``metrics``).
    """
    from core.settings import get_settings

    for var in _GATEWAY_VARS:
        os.environ.pop(var, None)
    key = SIM_EVOLUTION_KEY if provider == "evolution" else SIM_MEGAAPI_TOKEN
    if max_concurrency is not None:
        config = {"provider": provider, "url": url, "api_key": key, "max_concurrency": max_concurrency}
        if metrics:
            config["metrics"] = True
        os.environ["ZAPSYNC_GATEWAYS"] = json.dumps({provider: config})
    elif provider == "evolution":
        os.environ.update({"EVOLUTION_API_URL": url, "EVOLUTION_API_KEY": key})
        if metrics:
            os.environ["EVOLUTION_METRICS"] = "true"
    else:
        os.environ.update({"MEGA_API_HOST": url, "MEGA_API_TOKEN": key})
    get_settings.cache_clear()


# -- database ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchDatabase:
    """The database a benchmark runs on."""

    url: str
    """SQLAlchemy URL, password masked (for messages)."""
    conninfo: str
    """libpq connection string (for the naive baselines, which use plain psycopg)."""
    embedded: bool


def libpq_conninfo(url: Any) -> str:
    """A libpq connection string from a SQLAlchemy URL (host may be a unix-socket folder in the query)."""
    from psycopg.conninfo import make_conninfo

    params: dict[str, Any] = {
        "host": url.host or url.query.get("host"),
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    return make_conninfo(**{key: value for key, value in params.items() if value is not None})


@contextlib.contextmanager
def bench_database() -> Iterator[BenchDatabase]:
    """A migrated database with empty zapsync tables.

    Without ``DATABASE_URL``: an embedded PostgreSQL in a throwaway ``ZAPSYNC_HOME``, removed afterwards. With it:
    that database, migrated to head, and **every zapsync table truncated**.
    """
    import psycopg

    home: str | None = None
    if not os.environ.get("DATABASE_URL"):
        home = tempfile.mkdtemp(prefix="zapsync-bench-")
        os.environ["ZAPSYNC_HOME"] = home
    from core.settings import get_settings
    from db.engine import database_url, safe_url, stop_embedded_postgres
    from db.migrate import upgrade

    get_settings.cache_clear()
    try:
        url = database_url()
        where = f"embedded PostgreSQL in {home}" if home else safe_url(url)
        progress(f"database: {where}; migrating")
        upgrade()
        conninfo = libpq_conninfo(url)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            tables = truncate_zapsync_tables(conn)
        if not home:
            progress(f"truncated {len(tables)} zapsync tables in {safe_url(url)}")
        yield BenchDatabase(url=safe_url(url), conninfo=conninfo, embedded=home is not None)
    finally:
        if home is not None:
            stop_embedded_postgres()
            os.environ.pop("DATABASE_URL", None)  # set by database_url() for child processes
            get_settings.cache_clear()
            shutil.rmtree(home, ignore_errors=True)


def truncate_zapsync_tables(conn: Any) -> list[str]:
    """Empty every table zapsync's models declare that exists in the database; returns their names."""
    from db.models import Base

    declared = [table.name for table in Base.metadata.sorted_tables]
    existing = {
        row[0]
        for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename = ANY(%s)",
            (declared,),
        )
    }
    tables = [name for name in declared if name in existing]
    if tables:
        conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    return tables


# -- gateway simulator in a child process -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimSeed:
    """Instances the simulator creates before it serves (``SimulatorState.seed_instances``)."""

    count: int
    provider: ProviderName = "evolution"
    prefix: str = "sim"
    connected_ratio: float = 0.7


@dataclass(slots=True)
class SeededInstances:
    """What one seed created: names and their live states, in creation order."""

    provider: ProviderName
    names: list[str]
    live_states: list[str]


def _simulator_child(conn: Connection, seeds: Sequence[SimSeed], config: dict[str, Any]) -> None:
    """Child process: seed the simulator, serve it on a loopback port, report, then wait for the parent."""
    import gc

    from gateways.simulator import SimulatorConfig, SimulatorServer, SimulatorState

    state = SimulatorState(SimulatorConfig(**config))
    seeded = []
    for seed in seeds:
        created = state.seed_instances(
            seed.count, provider=seed.provider, prefix=seed.prefix, connected_ratio=seed.connected_ratio
        )
        seeded.append(SeededInstances(seed.provider, [i.name for i in created], [i.live_state for i in created]))
        del created
    # The seeded world lives for the whole run: keep it out of the cyclic collector's passes so the simulated
    # gateway answers at the speed of its wire format, not of Python's GC over 100k objects.
    gc.collect()
    gc.freeze()
    with SimulatorServer(state) as server:
        conn.send((server.url, seeded))
        del seeded
        with contextlib.suppress(EOFError, KeyboardInterrupt):
            conn.recv()  # "stop", or EOF when the parent dies


@dataclass
class SimulatorProcess:
    """The gateway simulator (``gateways.simulator``) served by uvicorn in a separate process.

    A separate process keeps the simulator's memory and CPU out of the measured process's figures. ``start`` spawns
    it and returns at once (seeding 100k instances takes a few seconds, overlapped with other setup); ``wait``
    returns its URL and the seeded instances.
    """

    seeds: Sequence[SimSeed]
    latency_ms: float = 0.0
    startup_timeout_s: float = 180.0
    knobs: dict[str, Any] = field(default_factory=dict)
    """More :class:`SimulatorConfig` knobs (e.g. ``prometheus_metrics``)."""
    url: str = ""
    seeded: list[SeededInstances] = field(default_factory=list)
    _conn: Connection | None = None
    _process: BaseProcess | None = None

    def start(self) -> SimulatorProcess:
        """Spawn the child (it seeds, then serves)."""
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        config = {
            "latency_ms": self.latency_ms,
            "evolution_api_key": SIM_EVOLUTION_KEY,
            "megaapi_token": SIM_MEGAAPI_TOKEN,
            **self.knobs,
        }
        process = ctx.Process(
            target=_simulator_child, args=(child, list(self.seeds), config), name="zapsync-bench-simulator", daemon=True
        )
        process.start()
        child.close()
        self._conn, self._process = parent, process
        return self

    def wait(self) -> SimulatorProcess:
        """Block until the child serves; raises if it died or took too long."""
        if self.url:
            return self
        if self._conn is None or self._process is None:
            raise RuntimeError("SimulatorProcess.start() first")
        if not self._conn.poll(self.startup_timeout_s):
            raise RuntimeError("the simulator process did not start in time")
        try:
            self.url, self.seeded = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the simulator process exited (code {self._process.exitcode})") from None
        return self

    def control(self, method: str, path: str, body: Any = None) -> Any:
        """Call a ``/_sim`` control route (counters, knobs) and return its JSON."""
        import httpx

        response = httpx.request(method, f"{self.wait().url}/_sim{path}", json=body, timeout=60)
        response.raise_for_status()
        return response.json()

    def call_counts(self) -> dict[str, int]:
        """Provider requests served so far, by route (``evolution.connectionState``), instances merged."""
        merged: dict[str, int] = {}
        for key, count in self.control("GET", "/calls").items():
            route = key.split(":", 1)[0]
            merged[route] = merged.get(route, 0) + int(count)
        return merged

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the simulator process has used so far."""
        import psutil

        if self._process is None or self._process.pid is None:
            return 0.0
        times = psutil.Process(self._process.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        """Ask the child to exit; terminate it if it does not."""
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("stop")
            conn.close()
        if process is not None:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def call_count_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Requests per route made between two :meth:`SimulatorProcess.call_counts` snapshots."""
    return {route: after[route] - before.get(route, 0) for route in sorted(after) if after[route] != before.get(route)}


# -- Prefect ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def prefect_api(startup_timeout_s: int = 90) -> Iterator[None]:
    """A real, temporary Prefect API (``prefect_test_harness``: a server subprocess on SQLite) for flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    begun = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=startup_timeout_s):
        progress(f"Prefect API up in {time.perf_counter() - begun:.1f}s")
        yield


PREFECT_SERVER_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_V2_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}
"""The settings `zapsync up` starts its Prefect server with (zapsync/stack.py)."""


@contextlib.contextmanager
def prefect_server(startup_timeout_s: float = 180.0) -> Iterator[str]:
    """A full Prefect server (``prefect server start``, scheduler and all services) as `zapsync up` runs it, in a
    child process with a throwaway ``PREFECT_HOME``; this process's Prefect client points at it for the block.

    Unlike :func:`prefect_api` (an ephemeral server without background services), it runs the scheduler, so
    scheduled deployments (the 5-minute status sync, the health monitor) create their runs. Yields the API URL.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = Path(tempfile.mkdtemp(prefix="zapsync-bench-prefect-"))
    host = "127.0.0.1"
    port = free_port(host)
    api_url = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, **PREFECT_SERVER_ENV}
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    server = ChildProcess("prefect-server", argv, env, home / "server.log")

    def healthy() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        return False

    begun = time.perf_counter()
    try:
        server.start()
        wait_until("the Prefect server", healthy, timeout_s=startup_timeout_s, alive=[server])
        progress(f"Prefect server at {api_url} up in {time.perf_counter() - begun:.1f}s")
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def read_all_flow_runs(client: Any, *, flow_name: str | None = None, page: int = 200) -> list[Any]:
    """Every flow run the Prefect API holds (of ``flow_name`` when given), read page by page.

    Oldest expected start first, so runs created while paging land on later pages; deduplicated by id.
    """
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    flow_filter = FlowFilter(name=FlowFilterName(any_=[flow_name])) if flow_name else None
    runs: dict[Any, Any] = {}
    offset = 0
    while True:
        batch = await client.read_flow_runs(
            flow_filter=flow_filter, sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=page, offset=offset
        )
        runs.update({run.id: run for run in batch})
        offset += len(batch)
        if len(batch) < page:
            return list(runs.values())


async def flow_names_by_id(client: Any) -> dict[Any, str]:
    """Flow id → flow name, for every flow the Prefect API knows."""
    names: dict[Any, str] = {}
    offset = 0
    while True:
        batch = await client.read_flows(limit=200, offset=offset)
        names.update({flow.id: flow.name for flow in batch})
        offset += len(batch)
        if len(batch) < 200:
            return names


# -- child processes --------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout the benchmarks run from: children start here so that ``python -m api…`` finds this code."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ChildProcess:
    """A zapsync process the benchmark starts (API, flow runner, whole stack), its output in a log file.

    Stopped like `zapsync up` stops its children: SIGINT, then SIGTERM and SIGKILL after timeouts.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    stop_timeout_s: float = 20.0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        """Start the process in the checkout's root with stdout and stderr appended to its log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        progress(f"{self.name} started (pid {self.process.pid}), log {self.log_path}")
        return self

    @property
    def pid(self) -> int:
        """The child's pid."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def check_alive(self) -> None:
        """Raise BenchFailure, with the end of its log, if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise BenchFailure(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")

    def stop(self) -> str:
        """Stop the process (idempotent); returns how it ended: stopped, terminated, killed or exited."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return "exited"
        steps = ((signal.SIGINT, self.stop_timeout_s, "stopped"), (signal.SIGTERM, 5.0, "terminated"))
        for sig, timeout, how in steps:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
                return how
            except subprocess.TimeoutExpired:
                continue
        process.kill()
        process.wait()
        return "killed"

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the log (to show why the child failed)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_until(what: str, ready: Callable[[], bool], *, timeout_s: float, alive: Sequence[ChildProcess] = ()) -> None:
    """Poll ``ready()`` (with a growing pause) until it holds; BenchFailure on timeout or when a child dies."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while not ready():
        for child in alive:
            child.check_alive()
        if time.monotonic() > deadline:
            raise BenchFailure(f"{what} was not ready after {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def zapsync_command_exists(command: str) -> bool:
    """Whether ``python -m zapsync.cli COMMAND --help`` succeeds in this checkout."""
    result = subprocess.run(
        [sys.executable, "-m", "zapsync.cli", command, "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return result.returncode == 0


def is_flow_run_process(cmdline: Sequence[str]) -> bool:
    """Whether a command line runs a Prefect flow run: ``python -m prefect.engine`` (a deployment pulled from
    storage) or a multiprocessing spawn child (how ``serve()`` runs a flow it holds in memory)."""
    line = " ".join(cmdline)
    return "prefect.engine" in line or "spawn_main" in line


def flow_run_processes(root_pids: Sequence[int]) -> list[int]:
    """Pids of the live flow-run processes below the given processes (a flow runner, a worker)."""
    import psutil

    found: list[int] = []
    for root in root_pids:
        try:
            descendants = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            continue
        for proc in descendants:
            with contextlib.suppress(psutil.Error):
                if is_flow_run_process(proc.cmdline()):
                    found.append(proc.pid)
    return found


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds (user + system) used so far by a process, its live descendants and every child they reaped.

    A process that exited was reaped by its parent, whose ``children_user``/``children_system`` then hold its
    time, so two readings of the tree give the CPU used in between, exited processes included.
    """
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` 0.99 → p99) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


# -- running a subcommand ---------------------------------------------------------------------------------------


def run_main(body: Callable[[IO[str]], None]) -> int:
    """Run a subcommand's ``body(out)`` with stdout reserved for its result; map failures to exit codes."""
    with reserved_stdout() as out:
        try:
            body(out)
        except BenchFailure as exc:
            progress(f"FAILED: {exc}")
            return 1
    return 0
