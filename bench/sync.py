"""`python -m bench sync`: the status-sync flow against the naive per-instance loop of the seeds.

Setup (not timed): simulator process seeded with N instances, a migrated database holding the same N rows with a
``drift`` fraction deliberately disagreeing with the gateway, a temporary Prefect API. Timed: one
``sync_status(mode="apply")`` flow run. Then the run is checked (every drifted row written, nothing else), the
drift is put back, and the baseline does what seed 000's cron does — one status request and one committed UPDATE
per instance, one at a time — for at most ``--baseline-seconds``, extrapolated to N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import IO, Any

from bench.common import (
    SIM_EVOLUTION_KEY,
    SIM_MEGAAPI_TOKEN,
    BenchDatabase,
    BenchFailure,
    ProviderName,
    Row,
    SeededInstances,
    SimSeed,
    SimulatorProcess,
    Stopwatch,
    bench_database,
    call_count_delta,
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
from bench.series import add_series_option, run_series

NAME = "sync"
HELP = "status sync: the sync-status flow vs one request + one UPDATE per instance"
TARGETS: dict[int, dict[str, float]] = {
    10_000: {"seconds_max": 2.0, "ratio_min": 100.0},
    100_000: {"seconds_max": 5.0, "peak_rss_mb_max": 400.0},
}
"""Targets at ``--latency-ms 20`` with Evolution (bench/README.md)."""


@dataclass(frozen=True, slots=True)
class SyncOptions:
    """Command-line options of ``bench sync``."""

    instances: int
    latency_ms: float
    provider: ProviderName
    drift: float
    baseline_seconds: float
    seed: int
    runs: int
    max_concurrency: int | None
    as_json: bool
    live_state: str = "confirm"
    """`confirm`: fetchInstances + per-instance connectionState; `metrics`: fetchInstances + one `/metrics`."""


@dataclass(frozen=True, slots=True)
class World:
    """The seeded instances: what the gateway says, what the database says before the sync, which rows drift."""

    provider: ProviderName
    names: list[str]
    gateway_statuses: list[str]
    db_statuses: list[str]
    drifted: list[int]
    """Indices into ``names`` whose database status disagrees with the gateway."""

    @property
    def drifted_names(self) -> set[str]:
        """Names of the drifted instances."""
        return {self.names[i] for i in self.drifted}

    @property
    def drifted_to_connected(self) -> int:
        """Drifted rows the gateway says are connected (Evolution confirms each with one live call)."""
        return sum(1 for i in self.drifted if self.gateway_statuses[i] == "connected")


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare ``bench sync``'s options."""
    parser.add_argument("--instances", type=positive_int, default=None, help="simulated instances (N; required)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency the simulator adds to each request")
    parser.add_argument("--provider", choices=("evolution", "megaapi"), default="evolution")
    parser.add_argument(
        "--drift", type=fraction, default=0.1, help="fraction of rows that disagree with the gateway (default 0.1)"
    )
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=10.0,
        help="time cap of the naive baseline; beyond it the baseline is extrapolated to N",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the drift draw")
    parser.add_argument(
        "--runs",
        type=positive_int,
        default=1,
        help="flow runs to time (drift re-injected before each); `seconds` is the first, cold one",
    )
    parser.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=None,
        help="the gateway's parallel calls (set through ZAPSYNC_GATEWAYS; zapsync's default is 32)",
    )
    parser.add_argument(
        "--live-state",
        choices=("confirm", "metrics"),
        default="confirm",
        help="Evolution's live states: confirmed one by one (connectionState), or all from one GET /metrics",
    )
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object on stdout")
    add_series_option(parser, unit="instances")


def series_argv(args: argparse.Namespace, size: int) -> list[str]:
    """One size of ``--series``: the same options with ``--instances size``."""
    argv = [
        "--instances",
        str(size),
        "--latency-ms",
        f"{args.latency_ms:g}",
        "--provider",
        args.provider,
        "--drift",
        f"{args.drift:g}",
        "--baseline-seconds",
        f"{args.baseline_seconds:g}",
        "--seed",
        str(args.seed),
        "--runs",
        str(args.runs),
        "--live-state",
        args.live_state,
    ]
    if args.max_concurrency is not None:
        argv += ["--max-concurrency", str(args.max_concurrency)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench sync``: exit code 0, or 1 when the flow's result is wrong."""
    if args.series:
        return run_series(
            NAME, args.series, lambda size: series_argv(args, size), unit="instances", as_json=args.as_json
        )
    if args.instances is None:
        raise SystemExit("bench sync: --instances (or --series) is required")
    options = SyncOptions(
        instances=args.instances,
        latency_ms=args.latency_ms,
        provider=args.provider,
        drift=args.drift,
        baseline_seconds=args.baseline_seconds,
        seed=args.seed,
        runs=args.runs,
        max_concurrency=args.max_concurrency,
        as_json=args.as_json,
        live_state=args.live_state,
    )
    if options.live_state == "metrics" and options.provider != "evolution":
        raise SystemExit("--live-state metrics: only Evolution serves per-instance metrics in bench sync")
    return run_main(lambda out: bench_sync(options, out))


def bench_sync(options: SyncOptions, out: IO[str]) -> None:
    """Set up, measure, check and report (see the module docstring)."""
    prepare_environment()
    progress(
        f"sync: {options.instances} {options.provider} instances, latency {options.latency_ms:g} ms, "
        f"drift {options.drift:g}, live state by {options.live_state}"
    )
    with contextlib.ExitStack() as stack:
        simulator = stack.enter_context(
            SimulatorProcess(
                [SimSeed(options.instances, provider=options.provider)],
                latency_ms=options.latency_ms,
                knobs={"prometheus_metrics": options.live_state == "metrics"},
            )
        )
        database = stack.enter_context(bench_database())
        stack.enter_context(prefect_api())
        simulator.wait()
        progress(f"simulator serving {options.instances} instances at {simulator.url} (separate process)")
        configure_gateway(
            options.provider,
            simulator.url,
            max_concurrency=options.max_concurrency,
            metrics=options.live_state == "metrics",
        )
        world = plan_world(simulator.seeded[0], drift=options.drift, seed=options.seed)
        simulator.seeded.clear()
        result = asyncio.run(measure(options, world, simulator, database))
    emit(result, as_json=options.as_json, table=result_table(result), out=out)


def plan_world(seeded: SeededInstances, *, drift: float, seed: int) -> World:
    """Pick the drifted rows (seeded draw) and the status each row starts with in the database."""
    from gateways.status import from_evolution, from_megaapi

    def to_status(live: str) -> str:
        if seeded.provider == "evolution":
            return str(from_evolution(live, qr_emitted=True))
        return str(from_megaapi("connected" if live == "open" else live))

    gateway_statuses = [to_status(live) for live in seeded.live_states]
    # A stream of its own: Random(seed) would replay the simulator's draw of which instances are connected.
    rng = random.Random(f"bench-drift:{seed}")
    drifted = sorted(rng.sample(range(len(seeded.names)), round(len(seeded.names) * drift)))
    db_statuses = list(gateway_statuses)
    for i in drifted:
        db_statuses[i] = "disconnected" if gateway_statuses[i] == "connected" else "connected"
    return World(seeded.provider, seeded.names, gateway_statuses, db_statuses, drifted)


async def measure(
    options: SyncOptions, world: World, simulator: SimulatorProcess, database: BenchDatabase
) -> dict[str, Any]:
    """Seed the rows, time the apply-mode flow run(s), check each, then run the capped baseline."""
    from core.settings import get_settings
    from db.engine import dispose_engine
    from flows.sync_status import sync_status

    runs: list[dict[str, Any]] = []
    try:
        organization_id = await insert_rows(world)
        progress(
            f"inserted {len(world.names)} rows ({len(world.drifted)} drifted, "
            f"{world.drifted_to_connected} of them connected at the gateway) for organization {organization_id}"
        )
        rss_before = peak_rss_mb()
        for attempt in range(options.runs):
            if attempt:
                await reset_drift(world)
            calls_before = await asyncio.to_thread(simulator.call_counts)
            gateway_cpu_before = simulator.cpu_seconds()
            loadavg = load_average()
            progress(f"timed: sync_status(mode='apply') run {attempt + 1}/{options.runs} (load average {loadavg}) …")
            with Stopwatch() as watch:
                report = await sync_status(mode="apply")
            gateway_cpu = simulator.cpu_seconds() - gateway_cpu_before
            progress(
                f"flow run {report.flow_run_id} took {watch.wall:.3f}s (CPU {watch.cpu:.2f}s, "
                f"GC {watch.gc_seconds:.2f}s): "
                f"checked={report.checked} drifted={report.drifted} applied={report.applied} "
                f"unreachable={report.unreachable}"
            )
            calls = call_count_delta(calls_before, await asyncio.to_thread(simulator.call_counts))
            await check_flow_result(world, report)
            gateway = report.by_gateway.get(world.provider)
            runs.append(
                {
                    "seconds": round(watch.wall, 3),
                    "cpu_seconds": round(watch.cpu, 2),
                    "gc_seconds": round(watch.gc_seconds, 2),
                    "gc_full_collections": watch.gc_full,
                    "gateway_cpu_seconds": round(gateway_cpu, 2),
                    "load_average": loadavg,
                    "flow_internal_seconds": report.seconds,
                    "observe_seconds": gateway.seconds if gateway else None,
                    "confirmed_live": gateway.confirmed_live if gateway else None,
                    "live_in_bulk": gateway.live_in_bulk if gateway else None,
                    "gateway_calls": calls,
                    "applied": report.applied,
                    "drifted": report.drifted,
                    "checked": report.checked,
                    "unreachable": report.unreachable,
                    "flow_run_id": str(report.flow_run_id),
                }
            )
        rss_peak = peak_rss_mb()
        await reset_drift(world)
        baseline = await run_baseline(world, simulator.url, database.conninfo, cap_seconds=options.baseline_seconds)
    finally:
        await dispose_engine()

    first = runs[0]
    seconds = first["seconds"]
    ratio = baseline["seconds"] / seconds if seconds > 0 else None
    result: dict[str, Any] = {
        "benchmark": NAME,
        "instances": options.instances,
        "provider": options.provider,
        "latency_ms": options.latency_ms,
        "drift": options.drift,
        "live_state": options.live_state,
        "max_concurrency": get_settings().gateways()[world.provider].max_concurrency,
        "seconds": seconds,
        "instances_per_second": round(options.instances / seconds, 1),
        "baseline_seconds": round(baseline["seconds"], 3),
        "baseline_extrapolated": baseline["extrapolated"],
        "baseline_instances_done": baseline["done"],
        "baseline_measured_seconds": round(baseline["measured_seconds"], 3),
        "baseline_changes": baseline["changes"],
        "ratio": round(ratio, 1) if ratio is not None else None,
        "peak_rss_mb": rss_peak,
        "rss_before_flow_mb": rss_before,
        "expected_changes": len(world.drifted),
        "drifted_to_connected": world.drifted_to_connected,
        **{key: value for key, value in first.items() if key != "seconds"},
        "database": "embedded" if database.embedded else database.url,
    }
    if len(runs) > 1:
        repeats = [run["seconds"] for run in runs[1:]]
        result["repeat_seconds"] = repeats
        result["repeat_seconds_median"] = round(statistics.median(repeats), 3)
    standard = options.latency_ms == 20 and options.provider == "evolution" and options.drift == 0.1
    if (target := TARGETS.get(options.instances)) and standard:
        result["targets"] = {**target, "met": targets_met(result, target)}
    return result


def targets_met(result: dict[str, Any], target: dict[str, float]) -> bool:
    """Whether a result meets the targets given for its size."""
    checks = [
        result["seconds"] <= target.get("seconds_max", float("inf")),
        (result["ratio"] or 0) >= target.get("ratio_min", 0),
        result["peak_rss_mb"] <= target.get("peak_rss_mb_max", float("inf")),
    ]
    return all(checks)


# -- setup and checks (not timed) ---------------------------------------------------------------------------------


async def insert_rows(world: World) -> uuid.UUID:
    """One organization and one row per instance, in two set-based statements; then ANALYZE."""
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        organization_id = (
            await session.execute(text("INSERT INTO organizations (name) VALUES ('bench') RETURNING id"))
        ).scalar_one()
        # Rows last observed five minutes ago, as after a previous scheduled run.
        await session.execute(
            text(
                "INSERT INTO whatsapp_instances (organization_id, gateway, instance_name, status, status_observed_at, "
                "last_checked_at) SELECT CAST(:org AS uuid), :gateway, t.name, t.status, "
                "now() - interval '5 minutes', now() - interval '5 minutes' "
                "FROM unnest(CAST(:names AS text[]), CAST(:statuses AS text[])) AS t(name, status)"
            ),
            {"org": organization_id, "gateway": world.provider, "names": world.names, "statuses": world.db_statuses},
        )
    async with session_scope() as session:
        await session.execute(text("ANALYZE whatsapp_instances"))
    return uuid.UUID(str(organization_id))


async def mismatches(world: World) -> int:
    """Rows whose status differs from the gateway's."""
    from sqlalchemy import text

    from db.engine import session_scope

    async with session_scope() as session:
        return int(
            (
                await session.execute(
                    text(
                        "SELECT count(*) FROM whatsapp_instances i "
                        "JOIN unnest(CAST(:names AS text[]), CAST(:statuses AS text[])) AS g(name, status) "
                        "ON i.gateway = :gateway AND i.instance_name = g.name WHERE i.status <> g.status"
                    ),
                    {"names": world.names, "statuses": world.gateway_statuses, "gateway": world.provider},
                )
            ).scalar_one()
        )


async def check_flow_result(world: World, report: Any) -> None:
    """Fail loudly unless the run wrote exactly the injected drift, with one history row each (of this run)."""
    from sqlalchemy import text

    from db.engine import session_scope

    expected = len(world.drifted)
    problems = []
    if report.skipped:
        problems.append(f"the run was skipped: {report.skipped}")
    if report.checked != len(world.names):
        problems.append(f"checked {report.checked} instances, expected {len(world.names)}")
    if report.unreachable:
        problems.append(f"{report.unreachable} instances unreachable")
    if report.applied != expected or report.drifted != expected:
        problems.append(f"drifted={report.drifted} applied={report.applied}, injected drift {expected}")
    if (left := await mismatches(world)) != 0:
        problems.append(f"{left} rows still disagree with the gateway")
    async with session_scope() as session:
        history = int(
            (
                await session.execute(
                    text("SELECT count(*) FROM instance_status_changes WHERE source = 'sync' AND flow_run_id = :run"),
                    {"run": report.flow_run_id},
                )
            ).scalar_one()
        )
    if history != expected:
        problems.append(f"{history} status-history rows, expected {expected}")
    if problems:
        raise BenchFailure("; ".join(problems))
    progress(f"checked: {expected} changes applied, every row agrees with the gateway, {history} history rows")


async def reset_drift(world: World) -> None:
    """Put the drifted rows back to their wrong status, so the baseline has the same changes to write."""
    from sqlalchemy import text

    from db.engine import session_scope

    names = [world.names[i] for i in world.drifted]
    statuses = [world.db_statuses[i] for i in world.drifted]
    async with session_scope() as session:
        await session.execute(
            text(
                "UPDATE whatsapp_instances i SET status = d.status, status_observed_at = now() - interval '5 minutes' "
                "FROM unnest(CAST(:names AS text[]), CAST(:statuses AS text[])) AS d(name, status) "
                "WHERE i.gateway = :gateway AND i.instance_name = d.name"
            ),
            {"names": names, "statuses": statuses, "gateway": world.provider},
        )
    if (wrong := await mismatches(world)) != len(world.drifted):
        raise BenchFailure(f"drift reset left {wrong} rows drifted, expected {len(world.drifted)}")


# -- the naive baseline ------------------------------------------------------------------------------------------


async def run_baseline(world: World, url: str, conninfo: str, *, cap_seconds: float) -> dict[str, Any]:
    """Seed 000's loop: read every row, then per instance one status request and one committed UPDATE.

    One request at a time over one keep-alive connection, plain psycopg; stops after ``cap_seconds`` and
    extrapolates linearly to all rows.
    """
    import httpx
    import psycopg

    from gateways.status import from_evolution, from_megaapi

    if world.provider == "evolution":
        headers, path = {"apikey": SIM_EVOLUTION_KEY}, "/instance/connectionState/{}"
    else:
        headers, path = {"Authorization": f"Bearer {SIM_MEGAAPI_TOKEN}"}, "/rest/instance/{}"
    drifted = world.drifted_names
    done = changes = wrong = 0
    progress(f"baseline: one request + one UPDATE per instance, capped at {cap_seconds:g}s …")
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client,
        await psycopg.AsyncConnection.connect(conninfo) as conn,
    ):
        begun = time.perf_counter()
        cursor = await conn.execute(
            "SELECT id, instance_name, status FROM whatsapp_instances WHERE gateway = %s ORDER BY instance_name",
            (world.provider,),
        )
        rows = await cursor.fetchall()
        await conn.commit()
        for instance_id, name, status in rows:
            if time.perf_counter() - begun >= cap_seconds:
                break
            response = await client.get(path.format(name))
            response.raise_for_status()
            body = response.json()["instance"]
            if world.provider == "evolution":
                observed = str(from_evolution(body["state"]))
            else:
                observed = str(from_megaapi(body["status"]))
            await conn.execute(
                "UPDATE whatsapp_instances SET status = %s, last_checked_at = now(), updated_at = now() WHERE id = %s",
                (observed, instance_id),
            )
            await conn.commit()
            done += 1
            if observed != status:
                changes += 1
                wrong += name not in drifted
        measured = time.perf_counter() - begun
    expected = sum(1 for _, name, _ in rows[:done] if name in drifted)
    if changes != expected or wrong:
        raise BenchFailure(f"baseline wrote {changes} changes ({wrong} unexpected), expected {expected}")
    extrapolated = done < len(rows)
    seconds = measured * len(rows) / done if extrapolated and done else measured
    progress(
        f"baseline: {done} of {len(rows)} instances in {measured:.2f}s ({changes} changes)"
        + (f", extrapolated to {seconds:.1f}s" if extrapolated else "")
    )
    return {
        "seconds": seconds,
        "measured_seconds": measured,
        "done": done,
        "extrapolated": extrapolated,
        "changes": changes,
    }


# -- output ---------------------------------------------------------------------------------------------------------


def result_table(result: dict[str, Any]) -> str:
    """The human-readable summary."""
    baseline = f"{result['baseline_seconds']:.2f}"
    if result["baseline_extrapolated"]:
        baseline += (
            f" (extrapolated from {result['baseline_instances_done']} instances in "
            f"{result['baseline_measured_seconds']:.2f}s)"
        )
    rows = [
        Row(
            "instances",
            f"{result['instances']} ({result['provider']}, latency {result['latency_ms']:g} ms, "
            f"drift {result['drift']:g}, live state by {result['live_state']})",
        ),
        Row(
            "zapsync seconds",
            f"{result['seconds']:.3f} (flow body {result['flow_internal_seconds']:.3f}, "
            f"observe {result['observe_seconds']}; CPU {result['cpu_seconds']:.2f}, "
            f"GC {result['gc_seconds']:.2f}, simulator CPU {result['gateway_cpu_seconds']:.2f}; "
            f"load {result['load_average']})",
        ),
        Row("instances/s", f"{result['instances_per_second']:.0f}"),
        Row("baseline seconds", baseline),
        Row("ratio baseline/zapsync", f"{result['ratio']}x"),
        Row("peak RSS MB", f"{result['peak_rss_mb']} (before the flow run {result['rss_before_flow_mb']})"),
        Row("applied changes", f"{result['applied']} of {result['expected_changes']} injected"),
        Row("gateway calls", ", ".join(f"{k}={v}" for k, v in result["gateway_calls"].items()) or "none"),
    ]
    if "repeat_seconds" in result:
        rows.insert(
            2, Row("repeated runs seconds", f"{result['repeat_seconds']} (median {result['repeat_seconds_median']})")
        )
    if "targets" in result:
        rows.append(
            Row(
                "targets",
                ("met: " if result["targets"]["met"] else "MISSED: ")
                + ", ".join(f"{k}={v:g}" for k, v in result["targets"].items() if k != "met"),
            )
        )
    return render_table("zapsync bench: sync-status (apply)", rows)
