"""Serve every deployment from this process (`zapsync serve`, or `python -m deployments.serve`)."""

from __future__ import annotations

import os

from prefect import serve

from deployments.definitions import build_deployments


def serve_deployments() -> None:
    """Register the deployments and run their schedules and triggered runs until interrupted.

    Schedules stay active when this process stops (`pause_on_shutdown=False`: a restart must not switch the
    5-minute sync off), and triggered runs are picked up within about two seconds.
    """
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    serve(*build_deployments(), pause_on_shutdown=False, print_starting_message=False)


if __name__ == "__main__":
    serve_deployments()
