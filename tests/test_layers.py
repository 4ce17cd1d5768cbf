"""The package's layers, enforced: imports only go downward (contracts in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "upward", "contract"),
    [
        ("engine/claim.py", "import pgdurable.runtime.worker", "The engine knows no processes"),
        ("client/bulk.py", "import pgdurable.contract.fsm", "The client stays light"),
        ("db/queries.py", "import pgdurable.engine", "Layers: imports only go downward"),
        ("client/__init__.py", "import pgdurable.engine.commit", "Layers: imports only go downward"),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path, module, upward, contract):
    """The check can fail: the same contracts on a copy of the package with one bad import."""
    shutil.copytree(ROOT / "pgdurable", tmp_path / "pgdurable", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "pgdurable" / module
    target.write_text(target.read_text() + f"\n{upward}  # noqa\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert f"{contract}" in done.stdout and "BROKEN" in done.stdout, done.stdout
