"""Smoke test of the benchmark harness: `python -m bench sync` end to end on a small world, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.pure  # the benchmark runs in a subprocess with a database of its own
def test_bench_sync_applies_exactly_the_injected_drift() -> None:
    # Production defaults and its own throwaway database, not the test session's overrides (0.5 s timeouts, …).
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL" and not key.startswith("ZAPSYNC_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "sync",
            "--instances",
            "50",
            "--latency-ms",
            "0",
            "--json",
            "--baseline-seconds",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON object on stdout; progress goes to stderr
    report = json.loads(lines[0])
    assert {"instances", "seconds", "baseline_seconds", "ratio", "peak_rss_mb"} <= set(report)
    assert report["instances"] == 50
    assert report["expected_changes"] == 5  # --drift defaults to 0.1
    assert report["applied"] == report["expected_changes"]
    assert report["seconds"] > 0 and report["baseline_seconds"] > 0 and report["peak_rss_mb"] > 0
    assert report["baseline_instances_done"] > 0


def _run_bench(*args: str, timeout: float) -> dict[str, object]:
    """`python -m bench ARGS --json` with production defaults and its own throwaway database; its one JSON object."""
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL" and not key.startswith("ZAPSYNC_")}
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON object on stdout; progress goes to stderr
    report: dict[str, object] = json.loads(lines[0])
    return report


@pytest.mark.slow
@pytest.mark.pure
def test_bench_storm_imports_every_instance_after_its_connect_webhook() -> None:
    report = _run_bench("storm", "--instances", "3", "--chats", "2", "--messages", "3", timeout=600)

    assert {"instances", "seconds", "bulk_seconds", "ratio", "flow_runs", "webhook_p99_ms"} <= set(report)
    assert report["instances"] == 3
    assert report["messages"] == 3 * 2 * 3  # exit code 0: every instance held exactly its messages
    assert report["webhook_outcomes"] == {"applied": 3}
    seconds, bulk_seconds = report["seconds"], report["bulk_seconds"]
    assert isinstance(seconds, float) and isinstance(bulk_seconds, float)
    assert seconds > 0 and bulk_seconds > 0
    assert report["ratio"] == round(seconds / bulk_seconds, 2)
    assert isinstance(report["flow_runs"], int) and report["flow_runs"] >= 0
    assert isinstance(report["peak_flow_run_processes"], int)
    assert isinstance(report["webhook_p99_ms"], float) and report["webhook_p99_ms"] > 0


@pytest.mark.slow
@pytest.mark.pure
def test_bench_demo_reports_the_runs_and_cpu_of_zapsync_up() -> None:
    report = _run_bench("demo", "--minutes", "0.5", timeout=600)

    assert {"minutes", "flow_runs", "max_start_lag_s", "max_queue_depth", "cpu_core_fraction"} <= set(report)
    assert report["minutes"] == 0.5
    assert report["stopped"] == "stopped"  # `up` ended on SIGINT, without being terminated or killed
    flow_runs = report["flow_runs"]
    assert isinstance(flow_runs, dict)
    assert "sync-status" in flow_runs  # `up --demo` starts a first status sync once ready
    assert sum(sum(states.values()) for states in flow_runs.values()) == report["flow_runs_total"]
    cpu = report["cpu_core_fraction"]
    assert isinstance(cpu, float) and cpu > 0
    assert isinstance(report["max_queue_depth"], int) and report["max_queue_depth"] >= 0
    lag = report["max_start_lag_s"]
    assert isinstance(lag, float) and lag >= 0


@pytest.mark.slow
@pytest.mark.pure
def test_bench_send_sends_every_message_once_despite_timeouts_and_503s() -> None:
    report = _run_bench("send", "--messages", "60", "--instances", "3", timeout=600)

    assert {"messages", "seconds", "messages_per_s", "duplicates", "lost"} <= set(report)
    assert report["messages"] == 60
    assert report["duplicates"] == 0
    assert report["lost"] == 0
    assert report["statuses"] == {"sent": 60}
    assert report["gateway_sends"] == 60  # the simulator took each message exactly once
    seconds = report["seconds"]
    assert isinstance(seconds, float) and seconds > 0
    assert report["messages_per_s"] == round(60 / seconds, 1)


# -- bench import (issue 14) ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.pure
def test_bench_import_imports_every_message_once_and_reports_its_cpu() -> None:
    report = _run_bench("import", "--chats", "3", "--messages-per-chat", "4", timeout=600)

    assert report["messages"] == 3 * 4  # exit code 0: exactly 3 contacts, 3 conversations and 12 messages
    seconds = report["seconds"]
    assert isinstance(seconds, float) and seconds > 0
    assert report["messages_per_s"] == round(12 / seconds, 1)
    assert isinstance(report["database_cpu_seconds"], float) and report["database_cpu_seconds"] >= 0  # embedded: read


@pytest.mark.slow
@pytest.mark.pure
def test_bench_import_series_runs_each_size_in_its_own_process() -> None:
    report = _run_bench("import", "--series", "6,12", "--messages-per-chat", "3", timeout=900)

    assert report["bench"] == "import" and report["unit"] == "messages"
    points = report["points"]
    assert isinstance(points, list)
    assert [p["size"] for p in points] == [6, 12]
    assert [(p["result"]["chats"], p["result"]["messages"]) for p in points] == [(2, 6), (4, 12)]
    assert all(p["peak_rss_mb"] > 0 and p["seconds"] > 0 for p in points)


@pytest.mark.slow
@pytest.mark.pure
def test_bench_ingest_stores_every_mixed_event_exactly_once() -> None:
    report = _run_bench("ingest", "--events", "200", "--concurrency", "8", "--mix", "mixed", timeout=600)

    assert {"events", "seconds", "events_per_s", "p50_ms", "p99_ms", "errors", "lost", "duplicated"} <= set(report)
    assert report["events"] == 200
    assert report["kinds"] == {"messages": 120, "receipts": 60, "status": 20}
    assert report["errors"] == 0
    assert report["lost"] == 0
    assert report["duplicated"] == 0
    seconds = report["seconds"]
    assert isinstance(seconds, float) and seconds > 0
    assert report["events_per_s"] == round(200 / seconds, 1)
    p50, p99 = report["p50_ms"], report["p99_ms"]
    assert isinstance(p50, float) and isinstance(p99, float) and 0 < p50 <= p99
