"""The layer rules, lint and type check, run with the test suite (so ``.ci/run`` runs them): the contracts in
pyproject.toml ([tool.importlinter]: trainables imports nothing of e2e_search, e2e_search is layered by the flow
of a search, the training core imports no Ray or MLflow, the YAML layer no torch), ruff ([tool.ruff]) and mypy
([tool.mypy]). docs/architecture.md draws the layers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_import_contracts_hold():
    out = _run("lint-imports", "--no-cache")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_ruff_is_clean():
    out = _run("ruff", "check", "e2e_search", "trainables", "tests", "bench")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_mypy_is_clean():
    out = _run("mypy", "--cache-dir", str(ROOT / ".mypy_cache"), timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Success" in out.stdout
