"""The layers contract (docs/architecture.md): imports go down, never up or sideways, on the real import graph."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "db", "gateways", "tasks", "flows", "deployments", "api", "zapsync")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([lint, "--no-cache"], cwd=cwd, capture_output=True, text=True, check=False, timeout=300)


def test_imports_go_one_way() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement"),
    [
        ("core/phones.py", "import api.main"),  # the leaf importing the top
        ("db/locks.py", "from gateways.base import Gateway"),  # siblings
        ("tasks/status.py", "    from flows.guard import late_by"),  # upward, and inside a function
    ],
)
def test_the_contract_catches_an_upward_or_sideways_import(tmp_path: Path, module: str, statement: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.html"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    if statement.startswith(" "):
        target.write_text(target.read_text() + f"\n\ndef _smuggled() -> None:\n{statement}\n")
    else:
        target.write_text(target.read_text() + f"\n{statement}\n")

    result = _lint_imports(tmp_path)

    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert module.removesuffix(".py").replace("/", ".") in result.stdout
