"""`--series` of `bench close-inactive` and `bench sync`: each size's child gets the same options at its own size."""

from __future__ import annotations

import argparse

import pytest

from bench import close_inactive, sync

pytestmark = pytest.mark.pure


def _parse(configure: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)  # type: ignore[operator]
    return parser.parse_args(argv)


def test_close_inactive_series_keeps_every_option_but_the_size() -> None:
    args = _parse(
        close_inactive.configure,
        ["--series", "10k,1M", "--idle", "0.2", "--rate", "50", "--writers", "2", "--messages", "sql"],
    )
    assert args.series == [10_000, 1_000_000]

    child = _parse(close_inactive.configure, close_inactive.series_argv(args, 1_000_000))

    assert child.conversations == 1_000_000 and child.series is None and not child.as_json
    assert (child.idle, child.rate, child.writers, child.messages) == (0.2, 50.0, 2, "sql")


def test_sync_series_keeps_every_option_but_the_size() -> None:
    args = _parse(
        sync.configure,
        ["--series", "1k,100k", "--latency-ms", "20", "--provider", "megaapi", "--drift", "0.3", "--runs", "2"]
        + ["--baseline-seconds", "4", "--seed", "7", "--max-concurrency", "64"],
    )
    assert args.series == [1_000, 100_000] and args.instances is None

    child = _parse(sync.configure, sync.series_argv(args, 100_000))

    assert child.instances == 100_000 and child.series is None
    assert (child.latency_ms, child.provider, child.drift, child.runs) == (20.0, "megaapi", 0.3, 2)
    assert (child.baseline_seconds, child.seed, child.max_concurrency, child.live_state) == (4.0, 7, 64, "confirm")


def test_sync_without_instances_or_series_is_refused() -> None:
    with pytest.raises(SystemExit, match="--instances"):
        sync.run(_parse(sync.configure, ["--latency-ms", "20"]))
