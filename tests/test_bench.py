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
