"""Fixtures for server tests: ``live_server`` is a real uvicorn server on 127.0.0.1 (port 0)
serving ``create_app(make_settings(tmp_path / "data"))``; it yields a ``LiveServer``, the base
URL as a str that also carries ``.settings``, ``.app`` and ``.data_dir``. The harness itself
(``running_server``, ``make_settings``, ``FakeTrainer``, ...) is in ``server_harness.py``.
"""

from __future__ import annotations

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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
