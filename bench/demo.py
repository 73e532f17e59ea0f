"""`python -m bench demo`: `zapsync up --demo` left running for M minutes; what its flow runs and processes cost.

Setup (not timed): ``python -m zapsync.cli up --demo`` as a child process, with a throwaway ``ZAPSYNC_HOME`` and
free ports, without the caller's database, Prefect API or gateway settings; the window starts when ``up`` has
written its ``stack.json`` (it does so once everything is ready). During the window: the CPU of ``up`` and all its
descendants (reaped children included), the flow-run processes every second and, when the table exists, the
depth of the ``work_items`` queue every 5 s. At the end, read from the Prefect API ``up`` started: every flow run
by flow and state, and how late each one started. Then ``up`` is stopped with SIGINT and the home removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bench.common import (
    ChildProcess,
    Row,
    emit,
    flow_names_by_id,
    flow_run_processes,
    free_port,
    load_average,
    prepare_environment,
    progress,
    read_all_flow_runs,
    render_table,
    run_main,
    tree_cpu_seconds,
    wait_until,
)

NAME = "demo"
HELP = "`zapsync up --demo` for M minutes: flow runs by flow and state, start lag, queue depth, CPU cores used"
HOST = "127.0.0.1"
QUEUE_EVERY_S = 5.0
TICK_S = 1.0
_FOREIGN_VARS = frozenset(
    {
        "DATABASE_URL",
        "PREFECT_API_URL",
        "PREFECT_HOME",
        "EVOLUTION_API_URL",
        "EVOLUTION_API_KEY",
        "MEGA_API_HOST",
        "MEGA_API_TOKEN",
    }
)
"""The caller's settings that would point `up` at another database, Prefect API or gateway."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """Command-line options of ``bench demo``."""

    minutes: float
    startup_timeout_s: float
    as_json: bool


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``bench demo``'s options."""
    parser.add_argument("--minutes", type=_positive_float, required=True, help="minutes to watch after ready (M)")
    parser.add_argument(
        "--startup-timeout",
        type=_positive_float,
        default=300.0,
        dest="startup_timeout_s",
        help="seconds `zapsync up` may take to be ready",
    )
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench demo``: exit code 0, or 1 when the stack failed."""
    options = DemoOptions(minutes=args.minutes, startup_timeout_s=args.startup_timeout_s, as_json=args.as_json)
    return run_main(lambda out: bench_demo(options, out))


@dataclass(slots=True)
class Window:
    """What the watch window observed."""

    seconds: float
    cpu_seconds: float
    postgres_cpu_seconds: float
    max_queue_depth: int
    queue_table: bool
    peak_processes: int


def child_environment(caller: dict[str, str], home: Path) -> dict[str, str]:
    """The caller's environment for `up`, without what would point it elsewhere, with ``home`` as its home."""
    env = {key: value for key, value in caller.items() if key not in _FOREIGN_VARS and not key.startswith("ZAPSYNC_")}
    env.update({"ZAPSYNC_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    return env


def bench_demo(options: DemoOptions, out: IO[str]) -> None:
    """Start `up --demo`, watch it for the window, read its flow runs, stop it, report."""
    caller = dict(os.environ)  # before prepare_environment: `up` runs with the caller's Prefect settings
    prepare_environment()
    home = Path(tempfile.mkdtemp(prefix="zapsync-bench-demo-"))
    env = child_environment(caller, home)
    ports = _distinct_free_ports(3)
    argv = [sys.executable, "-m", "zapsync.cli", "up", "--demo"]
    argv += ["--api-port", str(ports[0]), "--prefect-port", str(ports[1]), "--sim-port", str(ports[2])]
    up = ChildProcess("zapsync up", argv, env, home.parent / f"{home.name}.log", stop_timeout_s=120.0)
    stopped = "not started"
    try:
        up.start()
        begun = time.perf_counter()
        stack_file = home / "stack.json"
        wait_until(
            "zapsync up",
            lambda: _read_json(stack_file).get("pid") == up.pid,
            timeout_s=options.startup_timeout_s,
            alive=[up],
        )
        record = _read_json(stack_file)
        startup = time.perf_counter() - begun
        progress(f"zapsync up ready in {startup:.1f}s; watching for {options.minutes:g} min")
        load = load_average()
        window = watch(options, up, home)
        load_end = load_average()
        runs = asyncio.run(flow_run_figures(str(record["prefect_api_url"])))
        stopped = up.stop()
        progress(f"zapsync up {stopped}")
    except BaseException:
        tail = up.log_tail()
        if tail:
            progress(f"end of the zapsync up log:\n{tail}")
        raise
    finally:
        up.stop()
        _stop_leftover_postgres(home)
        shutil.rmtree(home, ignore_errors=True)
        with contextlib.suppress(OSError):
            up.log_path.unlink()
    result = {
        "benchmark": NAME,
        "minutes": options.minutes,
        "flow_runs": runs["by_flow"],
        "flow_runs_total": runs["total"],
        "flow_runs_scheduled_ahead": runs["scheduled_ahead"],
        "max_start_lag_s": runs["max_start_lag_s"],
        "max_unstarted_wait_s": runs["max_unstarted_wait_s"],
        "max_queue_depth": window.max_queue_depth,
        "queue_table": window.queue_table,
        "cpu_core_fraction": round(window.cpu_seconds / window.seconds, 3),
        "postgres_cpu_core_fraction": round(window.postgres_cpu_seconds / window.seconds, 3),
        "peak_flow_run_processes": window.peak_processes,
        "window_seconds": round(window.seconds, 1),
        "startup_seconds": round(startup, 1),
        "stopped": stopped,
        "load_average": load,
        "load_average_end": load_end,
    }
    emit(result, as_json=options.as_json, table=result_table(result), out=out)


def watch(options: DemoOptions, up: ChildProcess, home: Path) -> Window:
    """Sample the process tree every second and the queue every 5 s for the window; raise if `up` dies."""
    postmaster = _postmaster(home)
    duration = options.minutes * 60
    conn = _connect(postmaster)
    try:
        cpu0, pg0 = tree_cpu_seconds(up.pid), _postgres_cpu(postmaster)
        began = time.monotonic()
        next_queue = began
        max_depth, has_table, peak = 0, False, 0
        while True:
            now = time.monotonic()
            if now >= next_queue and conn is not None:
                depth = _queue_depth(conn)
                has_table = has_table or depth is not None
                max_depth = max(max_depth, depth or 0)
                next_queue += QUEUE_EVERY_S
            peak = max(peak, len(flow_run_processes([up.pid])))
            up.check_alive()
            if now - began >= duration:
                break
            time.sleep(min(TICK_S, max(0.0, began + duration - time.monotonic())))
        cpu1, pg1 = tree_cpu_seconds(up.pid), _postgres_cpu(postmaster)
        seconds = time.monotonic() - began
    finally:
        if conn is not None:
            conn.close()
    return Window(seconds, cpu1 - cpu0, pg1 - pg0, max_depth, has_table, peak)


async def flow_run_figures(prefect_api_url: str) -> dict[str, Any]:
    """Flow runs due by now, by flow name and state; the largest start lag (started runs; runs still waiting).

    Runs the scheduler created for later times are only counted (``scheduled_ahead``).
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api_url}):
        async with get_client() as client:
            names = await flow_names_by_id(client)
            runs = await read_all_flow_runs(client)
    now = datetime.now(UTC)
    by_flow: dict[str, Counter[str]] = {}
    lags, waits = [0.0], [0.0]
    ahead = 0
    for run in runs:
        expected = run.expected_start_time
        if run.start_time is None and expected is not None and expected > now:
            ahead += 1  # the scheduler's runs for later: not due yet
            continue
        state = run.state.name if run.state else "Unknown"
        by_flow.setdefault(names.get(run.flow_id, str(run.flow_id)), Counter())[state] += 1
        if expected is None:
            continue
        if run.start_time is not None:
            lags.append((run.start_time - expected).total_seconds())
        elif not (run.state and run.state.is_final()) and expected <= now:
            waits.append((now - expected).total_seconds())
    return {
        "by_flow": {flow: dict(sorted(states.items())) for flow, states in sorted(by_flow.items())},
        "total": len(runs) - ahead,
        "scheduled_ahead": ahead,
        "max_start_lag_s": round(max(lags), 1),
        "max_unstarted_wait_s": round(max(waits), 1),
    }


# -- the embedded database `up` started ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Postmaster:
    """The embedded PostgreSQL server of a ZAPSYNC_HOME, from its ``postmaster.pid``."""

    pid: int
    port: int
    socket_dir: str


def _postmaster(home: Path) -> Postmaster | None:
    """Read ``$ZAPSYNC_HOME/pgdata/postmaster.pid`` (pid, data dir, start time, port, socket dir, …)."""
    try:
        lines = (home / "pgdata" / "postmaster.pid").read_text().splitlines()
        return Postmaster(pid=int(lines[0]), port=int(lines[3]), socket_dir=lines[4].strip())
    except (OSError, IndexError, ValueError):
        return None


def _connect(postmaster: Postmaster | None) -> Any:
    """An autocommit connection to the zapsync database of the embedded server (None without one)."""
    import psycopg

    from db.engine import EMBEDDED_DATABASE

    if postmaster is None or not postmaster.socket_dir:
        progress("no embedded PostgreSQL found: the queue depth is not sampled")
        return None
    return psycopg.connect(
        host=postmaster.socket_dir,
        port=postmaster.port,
        user="postgres",
        dbname=EMBEDDED_DATABASE,
        autocommit=True,
        application_name="zapsync-bench-demo",
    )


def _queue_depth(conn: Any) -> int | None:
    """Pending and running work items, or None while there is no ``work_items`` table."""
    if conn.execute("SELECT to_regclass('work_items')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT count(*) FROM work_items WHERE state IN ('pending', 'running')").fetchone()
    return int(row[0])


def _postgres_cpu(postmaster: Postmaster | None) -> float:
    return tree_cpu_seconds(postmaster.pid) if postmaster is not None else 0.0


def _stop_leftover_postgres(home: Path) -> None:
    """Fast shutdown of the embedded server if it outlived `up` (when `up` had to be killed)."""
    import psutil

    postmaster = _postmaster(home)
    if postmaster is None:
        return
    try:
        process = psutil.Process(postmaster.pid)
        if str(home / "pgdata") not in " ".join(process.cmdline()):
            return  # a stale pid file: that pid is someone else's now
        progress(f"stopping the embedded PostgreSQL {postmaster.pid} left behind")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    except (psutil.Error, psutil.TimeoutExpired):
        return


# -- helpers ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(HOST)
        if port not in ports:
            ports.append(port)
    return ports


def result_table(result: dict[str, Any]) -> str:
    """The human-readable summary."""
    rows = [
        Row(
            "minutes",
            f"{result['minutes']:g} (window {result['window_seconds']} s, up ready in {result['startup_seconds']} s)",
        ),
    ]
    for flow, states in result["flow_runs"].items():
        rows.append(Row(f"runs {flow}", ", ".join(f"{state} {count}" for state, count in states.items())))
    rows += [
        Row("max start lag s", f"{result['max_start_lag_s']} (still waiting: {result['max_unstarted_wait_s']})"),
        Row(
            "max queue depth",
            str(result["max_queue_depth"]) if result["queue_table"] else "0 (no work_items table)",
        ),
        Row(
            "CPU cores",
            f"{result['cpu_core_fraction']} (+ PostgreSQL {result['postgres_cpu_core_fraction']}); "
            f"peak flow-run processes {result['peak_flow_run_processes']}",
        ),
        Row("load average", f"{result['load_average']} → {result['load_average_end']}"),
    ]
    return render_table("zapsync bench: zapsync up --demo", rows)


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number
