"""create_app(settings): a self-contained app per Settings value, its lifespan (parts on
app.state, data kept across restarts, runs left live by a dead server marked lost unless
their trainer returns) and the health route."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from layerscope.server import __version__
from layerscope.server.hub import Hub
from layerscope.server.launcher import Launcher
from layerscope.server.store import Store
from server_harness import (
    FakeTrainer,
    LiveServer,
    make_settings,
    metrics_frame,
    run_detail,
    running_server,
    wait_status,
)

pytestmark = pytest.mark.anyio


def test_healthz_answers_ok_with_the_version(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server}/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "version": __version__}


def test_the_lifespan_puts_the_parts_on_app_state(live_server: LiveServer) -> None:
    state = live_server.app.state
    assert state.settings is live_server.settings
    assert isinstance(state.store, Store) and isinstance(state.hub, Hub)
    assert isinstance(state.launcher, Launcher)
    assert state.launcher.port == live_server.port  # port 0 became the real one
    assert (live_server.data_dir / "layerscope.db").is_file()


def test_the_read_api_and_pages_are_mounted(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server}/api/runs").json() == []
    page = httpx.get(f"{live_server}/")
    assert page.status_code == 200 and "html" in page.headers["content-type"]


async def test_two_apps_share_nothing(tmp_path: Path) -> None:
    with running_server(make_settings(tmp_path / "a")) as a, running_server(make_settings(tmp_path / "b")) as b:
        trainer = await FakeTrainer.connect(a, "only-in-a")
        assert [r["id"] for r in httpx.get(f"{a}/api/runs").json()] == ["only-in-a"]
        assert httpx.get(f"{b}/api/runs").json() == []
        await trainer.close()


async def test_stored_runs_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with running_server(settings) as server:
        trainer = await FakeTrainer.connect(server, "kept")
        for seq in (1, 2, 3):
            await trainer.send(metrics_frame(seq, seq))
        await trainer.wait_acked(3)
        await trainer.close()
    with running_server(settings) as server:
        detail = run_detail(server, "kept")
        assert detail["last_step"] == 3 and detail["trainer_connected"] is False


async def test_after_a_restart_runs_whose_trainer_does_not_return_are_lost(tmp_path: Path) -> None:
    # The grace runs from the new server's start: long enough that a loaded machine still
    # asks about "gone" and reconnects "returns" inside it.
    settings = make_settings(tmp_path, reconnect_grace_s=4.0, heartbeat_timeout_s=30.0)
    with running_server(settings) as server:
        for run_id in ("returns", "gone"):
            trainer = await FakeTrainer.connect(server, run_id)
            await trainer.send(metrics_frame(1, 1))
            await trainer.wait_acked(1)
            await trainer.close()
    # The old server is gone with both runs still "running"; the new one gives them a grace period.
    with running_server(settings) as server:
        assert run_detail(server, "gone")["status"] == "running"
        trainer = await FakeTrainer.connect(server, "returns", last_acked_seq=1)
        trainer.heartbeat()
        await wait_status(server, "gone", "lost", timeout=15)
        assert run_detail(server, "returns")["status"] == "running"
        await trainer.close()
