"""The code stays lint- and type-clean: ruff over the tree, mypy over the package,
benchmarks and example (pyproject.toml configures both)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_is_clean() -> None:
    out = _tool("ruff", "check", ".")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    out = _tool("mypy", "server", "trainer", "benchmarks", "examples")
    assert out.returncode == 0, out.stdout + out.stderr
