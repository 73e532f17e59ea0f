"""`python -m bench <subcommand>`: zapsync's benchmarks.

Each subcommand is a module of this package exposing ``NAME``, ``HELP``, ``configure(parser)`` and
``run(args) -> int``; add a benchmark by adding its module name to :data:`SUBCOMMANDS`. Modules are imported
lazily, and import nothing heavy at module level (Prefect reads its settings on first import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: tuple[str, ...] = ("sync", "close_inactive", "import_conversations", "storm", "demo", "send", "ingest")
"""Modules of ``bench`` that are subcommands, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per benchmark module."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="zapsync benchmarks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for module_name in SUBCOMMANDS:
        module = importlib.import_module(f"bench.{module_name}")
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.configure(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen benchmark; returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
