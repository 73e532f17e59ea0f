"""Repository-wide gates: lint, format, types, prefect.yaml in step with the served deployments, no secrets in logs."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.pure
def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.pure
def test_ruff_format_is_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "format", "--check", str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


TYPED_PACKAGES = ("core", "db", "gateways", "tasks", "flows", "deployments", "api", "zapsync")
"""Packages `mypy` checks under the strict configuration of pyproject.toml ([tool.mypy])."""


@pytest.mark.pure
def test_mypy_is_clean() -> None:
    mypy = shutil.which("mypy") or str(Path(sys.executable).with_name("mypy"))
    packages = [arg for package in TYPED_PACKAGES for arg in ("-p", package)]
    result = subprocess.run(
        [mypy, "--config-file", str(ROOT / "pyproject.toml"), *packages],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.pure
def test_prefect_yaml_declares_every_served_deployment() -> None:
    from deployments.definitions import build_deployments

    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    by_key = {(d["entrypoint"].rsplit(":", 1)[1], d["name"]): d for d in declared}
    for served in build_deployments():
        function = served.entrypoint.rsplit(".", 1)[1]
        entry = by_key.get((function, served.name))
        assert entry is not None, f"prefect.yaml lacks {served.flow_name}/{served.name}"
        module_file = served.entrypoint.rsplit(".", 1)[0].replace(".", "/") + ".py"
        assert entry["entrypoint"] == f"{module_file}:{function}"
        limit = served.concurrency_limit
        if limit is not None:
            assert entry["concurrency_limit"]["limit"] == limit
        schedules = entry.get("schedules", [])
        assert len(schedules) == len(served.schedules or [])


@pytest.mark.usefixtures("simulator")
async def test_secrets_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    from core.reports import SyncScope
    from flows.sync_status import check_status

    caplog.set_level(logging.DEBUG)
    from tests.factories import make_instance, make_organization

    org = await make_organization(secret="org-secret-value")
    await make_instance(org, "acme-01")
    await check_status(SyncScope())
    text = caplog.text
    for secret in ("sim-evolution-key", "sim-megaapi-token", "org-secret-value", "test-admin-token"):
        assert secret not in text
