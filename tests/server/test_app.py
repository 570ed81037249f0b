"""create_app(settings): a self-contained app per Settings value, its lifespan (parts on
app.state, data kept across restarts, runs left live by a dead server marked lost unless
their trainer returns) and the health route."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from layerscope.server import __version__
from layerscope.server.hub import Hub, cut_message
from layerscope.server.launcher import Launcher
from layerscope.server.serving import make_server
from layerscope.server.settings import Settings
from layerscope.server.store import Store
from pydantic import BaseModel, ConfigDict, Field
from server_harness import (
    FakeTrainer,
    LiveServer,
    WriterFileLimit,
    hello_frame,
    make_settings,
    metrics_frame,
    open_viewer,
    recv_until,
    run_detail,
    running_server,
    wait_status,
)
from websockets.asyncio.client import connect

pytestmark = pytest.mark.anyio


def test_healthz_answers_ok_with_the_version(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server}/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "version": __version__}


async def test_healthz_is_503_while_the_store_cannot_take_writes_and_ok_once_it_can(
    tmp_path: Path,
) -> None:
    """Reviewer's /tmp/revE/t2_writer_dead.py: the writer process killed twice within 5 s
    left a server that refused every write for good while /healthz said ok. Now another
    writer is started after a backoff, and /healthz answers 503 with the store's state
    meanwhile (a supervisor's health check sees it); a trainer is refused, then stores."""
    with running_server(make_settings(tmp_path)) as server:
        link = server.app.state.store._writes
        first = link.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        while link.pid in (first, None):  # replaced at once the first time
            await asyncio.sleep(0.01)
        trainer = await FakeTrainer.connect(server, "before")  # through the replacement
        await trainer.send(metrics_frame(1, 1))
        await trainer.wait_acked(1)
        await trainer.close()
        replacement = link.pid
        assert replacement is not None
        os.kill(replacement, signal.SIGKILL)  # young: another after 1 s
        async with httpx.AsyncClient(timeout=10) as client:
            deadline = time.monotonic() + 10
            while (health := await client.get(f"{server}/healthz")).status_code == 200:
                assert time.monotonic() < deadline, "healthz said ok with no writer"
                await asyncio.sleep(0.01)
            assert health.status_code == 503
            body = health.json()
            assert (body["ok"], body["version"]) == (False, __version__)
            assert "writer process stopped (exit code -9)" in body["store"]
            assert "takes no writes until another starts" in body["store"]
            async with connect(server.ws("/ws/trainer")) as ws:
                await ws.send(json.dumps(hello_frame("meanwhile")))
                await ws.wait_closed()
            assert ws.close_code == 1011 and "could not record hello" in (ws.close_reason or "")
            while (health := await client.get(f"{server}/healthz")).status_code == 503:
                assert time.monotonic() < deadline + 20, health.json()
                await asyncio.sleep(0.05)
            assert health.json() == {"ok": True, "version": __version__}
        trainer = await FakeTrainer.connect(server, "after")
        await trainer.send(metrics_frame(1, 1))
        await trainer.wait_acked(1)
        await trainer.close()


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
    with (
        running_server(make_settings(tmp_path / "a")) as a,
        running_server(make_settings(tmp_path / "b")) as b,
    ):
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
        # the wait it had was the restart's grace, not the 30 s heartbeat timeout it said
        assert run_detail(server, "gone")["status_reason"] == "no trainer connection for 4 s"
        assert run_detail(server, "returns")["status"] == "running"
        await trainer.close()


def _failed_startup(settings: Settings, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Start a real uvicorn server on ``settings`` that must fail its startup; what it
    logged, one string per record."""
    server, sock, _, _ = make_server(settings)
    exit_codes: list[object] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn's answer to a failed startup, caught by Server
            exit_codes.append(exc.code)

    thread = threading.Thread(target=run, daemon=True)
    uvicorn_log = logging.getLogger("uvicorn.error")  # propagates nothing: listen on it
    uvicorn_log.addHandler(caplog.handler)
    caplog.clear()
    try:
        thread.start()
        thread.join(30)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
        sock.close()
    assert not thread.is_alive() and not server.started and exit_codes == []
    return [record.getMessage() for record in caplog.records if record.name == "uvicorn.error"]


def test_an_app_the_data_dir_refuses_says_why_in_one_line(
    live_server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A program that builds the app itself (tests, an embedding) got a page of traceback
    for a data dir another server holds, and a SQLite file of another program was given
    layerscope's tables."""
    logged = _failed_startup(make_settings(live_server.data_dir), caplog)
    assert logged[0].startswith(f"layerscope: data dir {live_server.data_dir} is in use")
    assert "Application startup failed. Exiting." not in logged  # the line above says so
    assert not any("Traceback" in line for line in logged), logged
    assert httpx.get(f"{live_server}/healthz").json()["ok"] is True  # the holder serves on

    foreign = tmp_path / "foreign" / "layerscope.db"
    foreign.parent.mkdir()
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    logged = _failed_startup(make_settings(foreign.parent), caplog)
    assert "is a SQLite database but not a layerscope one" in logged[0]
    assert not any("Traceback" in line for line in logged), logged
    assert foreign.read_bytes() == before
    # Refused startups leave the data dir free: a server opens it at once.
    foreign.unlink()
    with running_server(make_settings(foreign.parent)) as server:
        assert httpx.get(f"{server}/healthz").json()["ok"] is True


def test_a_missing_page_is_an_html_404_and_the_api_keeps_json(live_server: LiveServer) -> None:
    """A lab page URL with an unknown name (HTML in it: /labs/<b>x</b>) answered the
    browser a bare JSON {"detail": "Not Found"}. A page path's 404 is now an HTML page that
    says what was not found, with the name escaped and a link back to the runs; /api,
    /static and the rest keep their JSON."""
    for path, says in [
        ("/labs/<b>x</b>", "This page does not exist."),
        ("/labs/" + "<i>" * 30, "Lab &#39;&lt;i&gt;&lt;i&gt;"),
        ("/runs/" + "r" * 300, "Run &#39;rrrr"),
        ("/runs/a/b", "This page does not exist."),
        ("/compare/x", "This page does not exist."),
    ]:
        response = httpx.get(f"{live_server}{path}")
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html"), path
        page = response.text
        assert page.startswith("<!doctype html>") and says in page, path
        assert "<b>" not in page and "<i>" not in page, path  # escaped, never markup
        assert '<a href="/">Back to the runs</a>' in page, path
    assert (
        "No page at <code>/labs/&lt;b&gt;x&lt;/b&gt;</code>"
        in httpx.get(f"{live_server}/labs/<b>x</b>").text
    )
    for path, detail in [
        ("/api/runs/ghost", "run 'ghost' not found"),
        ("/api/nope", "Not Found"),
        ("/static/nope.js", "no static file 'nope.js'"),
    ]:
        response = httpx.get(f"{live_server}{path}")
        assert response.status_code == 404, path
        assert response.json() == {"detail": detail}, path


def test_a_validation_error_quoting_a_huge_value_is_cut(live_server: LiveServer) -> None:
    """FastAPI's own 422 echoed what it refused whole: /events?kind= of 60,000 characters
    got a 60 kB answer, and a JSON body's field of half a megabyte (a route taking a
    model; the app's own body routes check their bodies themselves) a half-megabyte one.
    Each msg, input, loc name and ctx value is now cut to 2,000 characters, head and tail
    (hub.cut_message), in FastAPI's shape; what is short is answered as before."""
    response = httpx.get(f"{live_server}/api/runs/x/events", params={"kind": "k" * 60_000})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "kind"] and error["type"] == "string_too_long"
    assert error["msg"] == "String should have at most 64 characters"
    assert error["input"] == cut_message("k" * 60_000) and len(response.content) < 2500
    short = httpx.get(f"{live_server}/api/runs", params={"limit": "many"}).json()["detail"]
    assert short == [
        {
            "type": "int_parsing",
            "loc": ["query", "limit"],
            "msg": "Input should be a valid integer, unable to parse string as an integer",
            "input": "many",
        }
    ]

    live_server.app.add_api_route("/api/test-probe", probe, methods=["POST"])
    url = f"{live_server}/api/test-probe"
    huge_key = "k" * 500_000
    for body, loc, kind in [
        ({"name": "n" * 500_000}, ["body", "name"], "string_too_long"),
        ({"name": ["n"] * 200_000}, ["body", "name"], "string_type"),
        ({"name": "n", huge_key: 1}, ["body", cut_message(huge_key)], "extra_forbidden"),
    ]:
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 422, kind
        (error,) = response.json()["detail"]
        assert (error["loc"], error["type"]) == (loc, kind)
        assert len(response.content) < 4500, kind  # each of loc and input at most 2,000
    assert error["input"] == 1
    big_list = httpx.post(url, json={"name": ["n"] * 200_000}, timeout=30).json()["detail"][0]
    assert big_list["input"] == cut_message(json.dumps(["n"] * 200_000))


class Probe(BaseModel):
    """A body model for the validation-error test (no route of the app takes one)."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(max_length=8)]


def probe(body: Probe) -> None:  # pragma: no cover - every request to it is refused
    raise AssertionError(body)


async def test_a_full_disk_is_503_on_healthz_and_told_to_viewers_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """Reviewer's /tmp/h17c/t2_full.sh and t2_full_page.sh: with the data dir's disk full
    every commit failed, yet /healthz said ok and the run's page said only "the trainer is
    not connected". Now /healthz answers 503 naming the cause and the data dir, the run's
    viewers get a store event saying it (and one with null once it is over), and the frames
    the trainer resends once writes fit again are stored. The fault is real: the writer
    process may not write past byte 1 of any file (RLIMIT_FSIZE), as on a full disk."""
    with running_server(make_settings(tmp_path)) as server:
        store = server.app.state.store
        trainer = await FakeTrainer.connect(server, "full")
        await trainer.send(metrics_frame(1, 1))
        await trainer.wait_acked(1)
        viewer, snapshot = await open_viewer(server, "full")
        assert snapshot["store_problem"] is None
        disk = WriterFileLimit(store)
        try:
            disk.full()
            await trainer.send(metrics_frame(2, 2))
            code, reason = await trainer.closed()
            assert code == 1011
            # the trainer is told why (it printed only "could not store frames; reconnect")
            assert reason.startswith("server could not store frames (cannot store: "), reason
            async with httpx.AsyncClient(timeout=10) as client:
                health = await client.get(f"{server}/healthz")
                assert health.status_code == 503, health.text
                problem = health.json()["store"]
                assert problem.startswith("cannot store: ")
                assert problem.endswith(f" at {server.data_dir}")
                told = (await recv_until(viewer, lambda m: m.get("kind") == "store"))[-1]
                assert told["type"] == "event" and told["data"] == {"problem": problem}
                disk.space_back()
                store._writes.clear_after_s = 0.0
                trainer = await FakeTrainer.connect(server, "full", last_acked_seq=1)
                await trainer.send(metrics_frame(2, 2))
                await trainer.wait_acked(2)
                told = (await recv_until(viewer, lambda m: m.get("kind") == "store"))[-1]
                assert told["data"] == {"problem": None}
                health = await client.get(f"{server}/healthz")
                assert health.json() == {"ok": True, "version": __version__}
                steps = (await client.get(f"{server}/api/runs/full/series")).json()
                assert steps["loss"]["steps"] == [1, 2]
        finally:
            disk.space_back()
            await trainer.close()
            await viewer.close()


def damage(db: Path) -> None:
    """Garbage over most of a database file past its first pages (reviewer's
    /tmp/h17c/t2_midcorrupt.sh wrote 8 KiB of it mid-file)."""
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(size * 4 // 10)
        f.write(b"\xde\xad\xbe\xef" * (size // 8))


async def test_a_stored_frame_that_no_longer_decompresses_is_damage_not_a_traceback(
    tmp_path: Path,
) -> None:
    """Damage inside a page whose b-tree SQLite still reads: a frame's compressed bytes
    come back but do not decompress. The export died with a zlib traceback and a clean-
    looking cut (CI hit this with the damaged-database test's garbage landing in frame
    data). It is the database's damage: the export ends in an error line, writes stop,
    /healthz says why."""
    import sqlite3

    settings = make_settings(tmp_path)
    with running_server(settings) as server:
        trainer = await FakeTrainer.connect(server, "garbled")
        for seq in range(1, 4):
            await trainer.send(metrics_frame(seq, seq))
        await trainer.wait_acked(3)
        await trainer.close()
    with sqlite3.connect(settings.data_dir / "layerscope.db") as conn:
        conn.execute("UPDATE frames SET body = ? WHERE seq = 2", (b"\x78\x9c" + b"\xde\xad" * 40,))
    with running_server(settings) as server:
        server.app.state.store.check_delay_s = 3600.0  # only the read finds it
        async with httpx.AsyncClient(timeout=10) as client:
            lines: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("GET", f"{server}/api/runs/garbled/export") as response:
                    async for line in response.aiter_lines():
                        lines.append(line)
            last = json.loads(lines[-1])
            assert last["type"] == "error" and "cut short after seq 0" in last["message"]
            health = await client.get(f"{server}/healthz")
            assert health.status_code == 503
            assert "a stored frame does not decompress" in health.json()["store"]


async def test_a_brief_write_failure_is_over_once_writes_commit_even_if_the_server_goes_idle(
    tmp_path: Path,
) -> None:
    """Review /tmp/h17n (t1b_transient_full_idle.py): a write failure of half a second, the
    trainer's resent frames stored, then nothing more written: /healthz stayed 503 and every
    page of the run said the server could not store, for good (the problem cleared only
    on a commit 5 s after the last failure). It is over once a commit has succeeded since
    and no write has failed for that long, whether or not anything is written then."""
    with running_server(make_settings(tmp_path)) as server:
        store = server.app.state.store
        store._writes.clear_after_s = 1.0
        trainer = await FakeTrainer.connect(server, "brief")
        await trainer.send(metrics_frame(1, 1))
        await trainer.wait_acked(1)
        viewer, _snapshot = await open_viewer(server, "brief")
        with WriterFileLimit(store) as disk:
            disk.full()
            await trainer.send(metrics_frame(2, 2))
            code, _reason = await trainer.closed()
            assert code == 1011
        trainer = await FakeTrainer.connect(server, "brief", last_acked_seq=1)
        await trainer.send(metrics_frame(2, 2))
        await trainer.wait_acked(2)
        await trainer.close()
        told = (await recv_until(viewer, lambda m: m.get("kind") == "store"))[-1]
        assert told["data"]["problem"].startswith("cannot store: ")
        # nothing more is written: the problem still ends, and the run's viewers are told
        told = (await recv_until(viewer, lambda m: m.get("kind") == "store"))[-1]
        assert told["data"] == {"problem": None}
        async with httpx.AsyncClient(timeout=10) as client:
            health = await client.get(f"{server}/healthz")
            assert health.status_code == 200, health.text
        await viewer.close()


async def test_a_damaged_database_is_503_on_healthz_and_its_export_is_cut_off(
    tmp_path: Path,
) -> None:
    """Reviewer's /tmp/h17c/t2_midcorrupt.sh: a database damaged past its schema pages was
    served as healthy, its export answered 200 and stopped short with a traceback in the
    log, and new runs went into it. Now its background check makes /healthz 503 with why,
    the export's last line says why it stopped and the transfer is cut off (not a clean
    end), and a trainer is refused."""
    settings = make_settings(tmp_path)
    with running_server(settings) as server:
        trainer = await FakeTrainer.connect(server, "big")
        noise = random.Random(0)
        for seq in range(1, 301):
            text = "".join(noise.choice("abcdefghij") for _ in range(3000))
            await trainer.send(
                {"seq": seq, "step": seq, "kind": "log", "type": "event", "data": {"t": text}}
            )
        await trainer.wait_acked(300)
        await trainer.close()
    damage(settings.data_dir / "layerscope.db")
    with running_server(settings) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            deadline = time.monotonic() + 20
            while (health := await client.get(f"{server}/healthz")).status_code == 200:
                assert time.monotonic() < deadline, "the damage was not found"
                await asyncio.sleep(0.05)
            assert health.status_code == 503
            assert "layerscope.db is damaged (PRAGMA quick_check:" in health.json()["store"]
            # one line a person can read (it was 5 KB in 101 lines: one per damaged page)
            assert "\n" not in health.json()["store"] and len(health.json()["store"]) < 600
            lines: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("GET", f"{server}/api/runs/big/export") as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        lines.append(line)
            last = json.loads(lines[-1])
            assert last["type"] == "error" and "cut short" in last["message"]
        # a page catching up on the run meets the damage too: told why (it got a traceback
        # in the log and a 1006 with no reason, which a page can only retry)
        async with connect(server.ws("/ws/runs/big?after_seq=0"), max_size=None) as page:
            await page.wait_closed()
        assert page.close_code == 1011
        assert page.close_reason.startswith("cannot read this run: "), page.close_reason
        async with connect(server.ws("/ws/trainer")) as ws:
            await ws.send(json.dumps(hello_frame("another")))
            await ws.wait_closed()
        assert ws.close_code == 1011
