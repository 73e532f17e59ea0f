"""`--series 1k,10k,100k`: run one benchmark at several sizes and show how its time and memory grow with the work.

Each size runs in its own child process (``python -m bench <name> ... --json``), so every size starts from a cold
process and the peak resident memory reported is that size's own (read from the child's resource usage with
``os.wait4``, not this process's). A bench module supports a series by adding :func:`add_series_option` to its
parser and, in ``run``, returning :func:`run_series` when ``args.series`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from bench.common import BenchFailure, progress, run_main

_SUFFIXES = {"k": 1_000, "m": 1_000_000}


def size_list(value: str) -> list[int]:
    """An argparse type: comma-separated sizes with optional k/M suffixes (``1k,10k,100k`` → 1000, 10000, 100000)."""
    sizes: list[int] = []
    for part in value.split(","):
        text = part.strip().lower()
        if not text:
            continue
        factor = _SUFFIXES.get(text[-1], 1)
        digits = text[:-1] if text[-1] in _SUFFIXES else text
        try:
            number = int(float(digits) * factor)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a size such as 1000, 10k or 1M") from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: sizes must be at least 1")
        sizes.append(number)
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size, e.g. 1k,10k,100k")
    return sizes


def add_series_option(parser: argparse.ArgumentParser, *, unit: str) -> None:
    """Add ``--series`` to a bench's parser; ``unit`` names what a size counts (messages, conversations…)."""
    parser.add_argument(
        "--series",
        type=size_list,
        default=None,
        metavar="SIZES",
        help=f"run once per size ({unit}, e.g. 1k,10k,100k), each in its own process, and print how time and "
        "memory grow",
    )


@dataclass(frozen=True, slots=True)
class Point:
    """One size of a series: what the child reported, and its own peak memory."""

    size: int
    seconds: float
    peak_rss_mb: float
    result: dict[str, Any]


def run_child(argv: Sequence[str]) -> tuple[dict[str, Any], float]:
    """Run ``python -m bench <argv>``; return its JSON result and its peak RSS in MB."""
    child = subprocess.Popen([sys.executable, "-m", "bench", *argv], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise BenchFailure(f"`python -m bench {' '.join(argv)}` exited with {child.returncode}")
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        raise BenchFailure(f"`python -m bench {' '.join(argv)}` printed no result")
    return json.loads(lines[-1]), round(usage.ru_maxrss / 1024, 1)


def growth_table(name: str, unit: str, points: Sequence[Point]) -> str:
    """How time and memory grow: per size, seconds, cost per unit, and each step's growth against the work's."""
    header = f"{'size':>10} | {'seconds':>9} | {'µs/' + unit[:-1] if unit.endswith('s') else 'µs/unit':>14} | "
    header += f"{unit + '/s':>16} | {'peak RSS MB':>11} | {'time ×':>7} | {'work ×':>7}"
    lines = [f"{name} series ({unit})", header, "-" * len(header)]
    previous: Point | None = None
    for point in points:
        per_unit = point.seconds / point.size * 1e6
        rate = point.size / point.seconds if point.seconds > 0 else float("inf")
        time_growth = f"{point.seconds / previous.seconds:.1f}" if previous and previous.seconds > 0 else "-"
        work_growth = f"{point.size / previous.size:.0f}" if previous else "-"
        lines.append(
            f"{point.size:>10,} | {point.seconds:>9.3f} | {per_unit:>14.2f} | {rate:>16,.0f} | "
            f"{point.peak_rss_mb:>11.1f} | {time_growth:>7} | {work_growth:>7}"
        )
        previous = point
    return "\n".join(lines)


def run_series(
    name: str,
    sizes: Sequence[int],
    argv_for: Callable[[int], list[str]],
    *,
    unit: str,
    seconds_key: str = "seconds",
    as_json: bool = False,
) -> int:
    """Run bench ``name`` once per size (``argv_for(size)`` gives its arguments, without ``--json``) and print the
    growth table, or one JSON object with every point when ``as_json``."""

    def body(out: IO[str]) -> None:
        points: list[Point] = []
        for size in sizes:
            progress(f"series {name}: size {size:,}")
            result, rss = run_child([name, *argv_for(size), "--json"])
            points.append(Point(size, float(result[seconds_key]), rss, result))
        if as_json:
            payload = {
                "bench": name,
                "unit": unit,
                "points": [
                    {"size": p.size, "seconds": p.seconds, "peak_rss_mb": p.peak_rss_mb, "result": p.result}
                    for p in points
                ],
            }
            out.write(json.dumps(payload, default=str) + "\n")
        else:
            out.write(growth_table(name, unit, points) + "\n")
        out.flush()

    return run_main(body)
