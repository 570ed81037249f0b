"""Fixtures for server tests: ``live_server`` is a real uvicorn server on 127.0.0.1 (port 0)
serving ``create_app(make_settings(tmp_path / "data"))``; it yields a ``LiveServer``, the base
URL as a str that also carries ``.settings``, ``.app`` and ``.data_dir``. ``shared_server`` is
one such server per test module, for tests that each use their own ``run_id``. The harness itself
(``running_server``, ``make_settings``, ``FakeTrainer``, ...) is in ``server_harness.py``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The harness is imported by name from test modules in any pytest import mode
# (prepend, importlib, or with tests/ turned into packages).
sys.path.insert(0, str(Path(__file__).parent))

from server_harness import LiveServer, make_settings, running_server  # noqa: E402

__all__ = ["LiveServer", "make_settings", "running_server"]


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    with running_server(make_settings(tmp_path / "data")) as server:
        yield server


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for a whole test module, for tests that each use their own ``run_id``."""
    with running_server(make_settings(tmp_path_factory.mktemp("data"))) as server:
        yield server


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A run id no other test uses (for tests on ``shared_server``)."""
    return "run-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
