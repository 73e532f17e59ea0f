"""Which Prefect API this process talks to.

`zapsync up` runs a local Prefect server and records it in ``$ZAPSYNC_HOME/stack.json``. A later command in another
terminal (`zapsync sync`, `zapsync serve`) should show its runs in that same UI, so at CLI startup
:func:`configure_prefect_env` points the process at it when it answers. Otherwise Prefect's defaults stand (an
ephemeral server for the process). An explicit ``PREFECT_API_URL`` always wins.

Prefect reads its settings when it is imported: call this before the first ``import prefect``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx

from core.settings import get_settings

DEFAULT_PREFECT_PORT = 4200
LOCAL_HOST = "127.0.0.1"
STACK_FILE = "stack.json"


def stack_file(home: Path | None = None) -> Path:
    """Where `zapsync up` records the URLs of the stack it runs."""
    return (home or get_settings().home) / STACK_FILE


def read_stack(home: Path | None = None) -> dict[str, object]:
    """The running stack's record, or an empty dict when there is none (or it is unreadable)."""
    try:
        data = json.loads(stack_file(home).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def prefect_healthy(api_url: str, *, timeout: float = 0.5) -> bool:
    """Whether a Prefect API answers its health check at ``api_url`` (ending in ``/api``)."""
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _already_configured() -> str | None:
    """An API URL already in force: the environment's, or (when Prefect is imported) its live settings'."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" in sys.modules:  # e.g. a test harness set it through Prefect's settings context
        from prefect.settings import get_current_settings

        return get_current_settings().api.url
    return None


def local_candidates(home: Path | None = None) -> list[str]:
    """API URLs where a local server started by `zapsync up` may answer: the recorded one first, then port 4200."""
    candidates: list[str] = []
    recorded = read_stack(home).get("prefect_api_url")
    if isinstance(recorded, str) and recorded:
        candidates.append(recorded)
    default = f"http://{LOCAL_HOST}:{DEFAULT_PREFECT_PORT}/api"
    if default not in candidates:
        candidates.append(default)
    return candidates


def configure_prefect_env(home: Path | None = None) -> str | None:
    """Point this process at the local Prefect server of `zapsync up` when one answers; returns the API URL in use.

    Leaves everything alone when ``PREFECT_API_URL`` is already set (or Prefect is already configured), and when no
    local server answers (Prefect then runs an ephemeral server, its default). Returns None in that last case.
    """
    configured = _already_configured()
    if configured:
        return configured
    for api_url in local_candidates(home):
        if prefect_healthy(api_url, timeout=0.5):
            os.environ["PREFECT_API_URL"] = api_url
            return api_url
    return None
