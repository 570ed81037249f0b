"""The viewer socket as a browser sees it: snapshot then live frames, catch-up with after_seq
and no gaps, one slow viewer never holding up the others, and bad input from a viewer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from layerscope.server.hub import TICK_S
from layerscope.trainer import wire
from server_harness import (
    FakeTrainer,
    LiveServer,
    event_frame,
    make_settings,
    metrics_frame,
    open_slow_viewer,
    open_viewer,
    probe_frame,
    recv_until,
    running_server,
    stop_task,
    strict_loads,
    wait_detached,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.anyio

# How long the fast viewer may take to get one 60 kB frame in the slow-viewer test: ~5 ms
# unloaded; a hub that let the slow viewer hold it up would keep it waiting for good.
KEEP_UP_S = 30.0


async def test_a_viewer_gets_a_snapshot_then_live_frames(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    for seq in range(1, 4):
        await trainer.send(metrics_frame(seq, seq, loss=float(seq)))
    await trainer.send(probe_frame(4, 3))
    await trainer.wait_acked(4)
    viewer, snapshot = await open_viewer(shared_server, run_id)
    assert snapshot["type"] == "snapshot"
    assert snapshot["last_seq"] == 4
    assert snapshot["trainer_connected"] is True
    assert snapshot["run"]["id"] == run_id and snapshot["run"]["status"] == "running"
    assert snapshot["series"]["loss"]["steps"] == [1, 2, 3]
    assert snapshot["series"]["loss"]["values"] == [1.0, 2.0, 3.0]
    await trainer.send(metrics_frame(5, 4, loss=4.0))
    await trainer.send(event_frame(6, 4, "alert", message="layer1 is 80% dead"))
    live = await recv_until(viewer, lambda m: m.get("seq") == 6)
    frames = [m for m in live if "seq" in m]
    assert [(m["type"], m["seq"], m["run_id"]) for m in frames] == [
        ("metrics", 5, run_id),
        ("event", 6, run_id),
    ]
    assert frames[0]["rows"][0]["values"] == {"loss": 4.0}
    await viewer.close()
    await trainer.close()


async def test_frames_in_flight_while_a_viewer_joins_are_not_lost(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)

    async def send_all() -> None:
        for seq in range(1, 301):
            await trainer.send(metrics_frame(seq, seq))
            if seq % 10 == 0:
                await asyncio.sleep(0.005)

    sender = asyncio.create_task(send_all())
    # Joins once the server holds some frames (so the snapshot has a loss series) while the
    # rest are still being sent; 50 merely written to the socket may not be stored yet.
    while trainer.acked < 50:
        await asyncio.sleep(0.005)
    viewer, snapshot = await open_viewer(shared_server, run_id)
    await sender
    live = await recv_until(viewer, lambda m: m.get("seq") == 300)
    seen = set(snapshot["series"]["loss"]["steps"]) | {m["seq"] for m in live if "seq" in m}
    assert seen == set(range(1, 301))
    await viewer.close()
    await trainer.close()


async def test_after_seq_catches_up_with_every_missed_frame(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    for seq in range(1, 6):
        await trainer.send(metrics_frame(seq, seq))
    got = await recv_until(viewer, lambda m: m.get("seq") == 5)
    last_seen = max(m["seq"] for m in got if "seq" in m)
    await viewer.close()
    for seq in range(6, 12):  # missed while the tab was away
        await trainer.send(probe_frame(seq, seq) if seq % 2 else metrics_frame(seq, seq))
    await trainer.wait_acked(11)
    viewer, catchup = await open_viewer(shared_server, run_id, after_seq=last_seen)
    assert catchup["type"] == "catchup"
    assert [f["seq"] for f in catchup["frames"]] == list(range(6, 12))
    assert {f["type"] for f in catchup["frames"]} == {"metrics", "probe"}
    await trainer.send(metrics_frame(12, 12))
    live = await recv_until(viewer, lambda m: m.get("seq") == 12)
    assert [m["seq"] for m in live if "seq" in m] == [12]
    await viewer.close()
    await trainer.close()


async def test_a_catch_up_past_its_limits_is_a_fresh_snapshot(tmp_path: Path) -> None:
    """A viewer far behind (a tab back after hours; reviewer's /tmp/revE/t12_catchup_mem.py:
    after_seq=0 on a 110k-frame run was one 130 MB message, built on the event loop) gets
    the snapshot a new connection gets, then live frames from its last_seq; one within the
    limits gets the frames as before."""
    with running_server(make_settings(tmp_path)) as server:
        hub = server.app.state.hub
        hub.catchup_max_frames = 10  # the defaults, at a test's scale
        trainer = await FakeTrainer.connect(server, "far")
        for seq in range(1, 31):
            await trainer.send(probe_frame(seq, seq) if seq % 3 == 0 else metrics_frame(seq, seq))
        await trainer.wait_acked(30)
        for after_seq, last in ((0, 30), (20, 31)):  # 30 and 11 frames behind
            fresh, snapshot = await open_viewer(server, "far")
            await fresh.close()
            assert snapshot["type"] == "snapshot" and snapshot["last_seq"] == last
            viewer, first = await open_viewer(server, "far", after_seq=after_seq)
            # the same snapshot, but for the time since the run's last step (read later)
            assert {**first, "step_quiet_s": 0} == {**snapshot, "step_quiet_s": 0}
            assert first["step_quiet_s"] >= snapshot["step_quiet_s"]
            await trainer.send(metrics_frame(last + 1, last + 1))
            live = await recv_until(viewer, lambda m: "seq" in m)
            assert [m["seq"] for m in live if "seq" in m] == [last + 1]
            await viewer.close()
            await trainer.wait_acked(last + 1)
        for seq in range(33, 51):
            await trainer.send(metrics_frame(seq, seq))
        await trainer.wait_acked(50)
        viewer, catchup = await open_viewer(server, "far", after_seq=40)  # 10 behind: frames
        assert catchup["type"] == "catchup" and catchup["run_id"] == "far"
        assert [f["seq"] for f in catchup["frames"]] == list(range(41, 51))
        assert {f["run_id"] for f in catchup["frames"]} == {"far"}
        await viewer.close()
        hub.catchup_max_bytes = 500  # and by size: ten frames are about 1 kB
        viewer, first = await open_viewer(server, "far", after_seq=40)
        assert first["type"] == "snapshot" and first["last_seq"] == 50
        await viewer.close()
        await trainer.close()


async def test_a_slow_viewer_is_closed_with_1013_and_catches_up_without_gaps(
    tmp_path: Path,
) -> None:
    # A small queue and a viewer with a small receive buffer: the socket fills, then the queue.
    with running_server(make_settings(tmp_path, viewer_queue_frames=20)) as server:
        # Everything this test opens is closed even when an assertion fails: a socket left
        # open failed the next test too (an unraisable ResourceWarning at its garbage collection).
        async with AsyncExitStack() as cleanup:
            trainer = await FakeTrainer.connect(server, "r1")
            cleanup.push_async_callback(trainer.close)
            slow = await open_slow_viewer(server, "r1")
            cleanup.push_async_callback(slow.close)
            fast, _ = await open_viewer(server, "r1")
            cleanup.push_async_callback(fast.close)
            total = 150  # 60 kB event frames: events are never coalesced or skipped
            big_frame = {"type": "event", "step": 1, "kind": "log", "data": {"text": "x" * 60_000}}
            fast_seen: list[int] = []

            def fast_last() -> int:
                return fast_seen[-1] if fast_seen else 0

            async def read_fast() -> None:
                while fast_last() < total:
                    message = strict_loads(await fast.recv())
                    if "seq" in message:
                        fast_seen.append(message["seq"])

            reader = asyncio.create_task(read_fast())
            cleanup.push_async_callback(stop_task, reader)
            loop = asyncio.get_running_loop()
            for seq in range(1, total + 1):
                await trainer.send({**big_frame, "seq": seq})
                # The fast viewer keeps up: the trainer stays at most 5 frames ahead of it. The
                # condition is read afresh before the reader is checked: it ends (normally) on
                # frame `total`, and under load it can read the last six in one sleep.
                deadline = loop.time() + KEEP_UP_S
                while seq - fast_last() > 5:
                    assert not reader.done(), (
                        f"the fast viewer stopped at {fast_last()}: {reader.exception()!r}"
                    )
                    assert loop.time() < deadline, (
                        f"the fast viewer is stuck at {fast_last()}, frame {seq} sent"
                    )
                    await asyncio.sleep(0.002)
            await asyncio.wait_for(reader, 60)
            assert fast_seen == list(range(1, total + 1))  # the slow one held nobody up
            await trainer.wait_acked(total, timeout=60)  # nor the trainer: all of it is stored

            slow_seen: list[int] = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = strict_loads(await asyncio.wait_for(slow.recv(), 20))
                    if "seq" in message:
                        slow_seen.append(message["seq"])
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == wire.CLOSE_TRY_AGAIN
            assert "after_seq" in closed.value.rcvd.reason
            assert slow_seen == list(range(1, len(slow_seen) + 1))  # what did arrive has no holes
            assert len(slow_seen) < total

            again, catchup = await open_viewer(server, "r1", after_seq=max(slow_seen, default=0))
            cleanup.push_async_callback(again.close)
            missed = [f["seq"] for f in catchup["frames"]]
            assert slow_seen + missed == list(range(1, total + 1))


async def test_probe_frames_coalesce_for_a_viewer_that_is_behind(tmp_path: Path) -> None:
    with running_server(make_settings(tmp_path, viewer_queue_frames=20)) as server:
        trainer = await FakeTrainer.connect(server, "r1")
        slow = await open_slow_viewer(server, "r1")
        # ~9 MB, like the 1013 test's: the server's socket send buffer autotunes up to 4 MB
        # (tcp_wmem), which can hold a smaller stream whole, so the viewer never falls behind
        # and nothing coalesces. Large bin counts make the bytes cheap to parse and store: the
        # viewer reads nothing meanwhile, and the server drops a viewer that has not answered
        # its pings for 20 s.
        total = 120
        for seq in range(1, total + 1):
            await trainer.send(probe_frame(seq, seq, layers=20, bins=256, count_base=10**12))
        await trainer.wait_acked(total)
        await trainer.send(metrics_frame(total + 1, total + 1))
        seen: list[int] = []
        while not seen or seen[-1] != total + 1:
            message = strict_loads(await asyncio.wait_for(slow.recv(), 20))
            if "seq" in message:
                seen.append(message["seq"])
        # Behind, it kept only the newest probes, but it was not dropped and saw the latest.
        assert total in seen and len(seen) < total + 1
        assert seen == sorted(seen)
        await slow.close()
        await trainer.close()


async def test_an_unknown_run_is_refused_with_a_reason(
    shared_server: LiveServer, run_id: str
) -> None:
    # a fixed reason, whatever the id's length: a 122-character id's cut reason lost the
    # "not found" the run page stops reconnecting on, and it retried every 5 s for good
    for unknown in ("nope", "n" * 200):
        async with connect(shared_server.ws(f"/ws/runs/{unknown}")) as ws:
            await ws.wait_closed()
            assert ws.close_code == wire.CLOSE_POLICY
            assert ws.close_reason == "run not found"


async def test_a_bad_after_seq_is_refused(shared_server: LiveServer, run_id: str) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    # negative, and past SQLite's integers (that one closed the socket with no close frame)
    for bad in ("-3", "99999999999999999999"):
        async with connect(shared_server.ws(f"/ws/runs/{run_id}?after_seq={bad}")) as ws:
            await ws.wait_closed()
            assert ws.close_code == wire.CLOSE_POLICY and "after_seq" in (ws.close_reason or "")
    await trainer.close()


async def test_bad_viewer_messages_get_errors_and_the_socket_stays_open(
    shared_server: LiveServer, run_id: str
) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send("{not json")
    got = await recv_until(viewer, lambda m: m["type"] == "error")
    assert "malformed JSON" in got[-1]["message"]
    await viewer.send(json.dumps({"type": "subscribe"}))
    got = await recv_until(viewer, lambda m: m["type"] == "error")
    assert "only 'command'" in got[-1]["message"]
    await trainer.send(metrics_frame(1, 1))
    await recv_until(viewer, lambda m: m.get("seq") == 1)
    await viewer.send(b"\x00")
    with pytest.raises(ConnectionClosed) as closed:
        await recv_until(viewer, lambda m: False)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == wire.CLOSE_UNSUPPORTED
    await trainer.close()


async def test_a_viewers_error_quoting_a_huge_field_is_cut_to_its_head_and_tail(
    shared_server: LiveServer, run_id: str
) -> None:
    # A message type of half a megabyte was echoed whole in the error that refused it.
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send(json.dumps({"type": "sub" + "x" * 500_000 + "scribe"}))
    message = (await recv_until(viewer, lambda m: m["type"] == "error"))[-1]["message"]
    assert len(message) < 2100 and "characters cut" in message
    assert message.startswith("unknown message type 'subxx") and message.endswith("only 'command'")
    await viewer.close()
    await trainer.close()


async def test_viewers_see_the_trainer_come_and_go(shared_server: LiveServer, run_id: str) -> None:
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, snapshot = await open_viewer(shared_server, run_id)
    assert snapshot["trainer_connected"] is True
    await trainer.close()
    got = await recv_until(viewer, lambda m: m["type"] == "status")
    assert got[-1]["trainer_connected"] is False and got[-1]["status"] == "running"
    trainer = await FakeTrainer.connect(shared_server, run_id)
    got = await recv_until(viewer, lambda m: m["type"] == "status")
    assert got[-1]["trainer_connected"] is True
    await viewer.close()
    await trainer.close()


async def test_a_new_run_under_a_deleted_runs_id_reaches_its_viewers(
    shared_server: LiveServer, run_id: str
) -> None:
    """The hub remembered the deleted run's shown seqs, so every frame of a new run under
    the same id (seqs from 1 again) was taken for a repeat and never broadcast."""
    import httpx

    old = await FakeTrainer.connect(shared_server, run_id)
    for seq in range(1, 11):
        await old.send(metrics_frame(seq, seq, loss=1.0))
    await old.wait_acked(10)
    await old.close()
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(100):  # 409 until the server has seen the trainer go
            deleted = await client.delete(f"{shared_server}/api/runs/{run_id}")
            if deleted.status_code != 409:
                break
            await asyncio.sleep(0.05)
    assert deleted.status_code == 204
    new = await FakeTrainer.connect(shared_server, run_id)
    assert new.welcome["acked_seq"] == 0
    viewer, snapshot = await open_viewer(shared_server, run_id)
    assert snapshot["last_seq"] == 0
    for seq in range(1, 4):
        await new.send(metrics_frame(seq, seq, loss=0.5))
    live = await recv_until(viewer, lambda m: m.get("seq") == 3)
    assert [m["seq"] for m in live if "seq" in m] == [1, 2, 3]
    await viewer.close()
    await new.close()


async def test_a_command_one_viewer_sends_reaches_the_other_viewers_as_the_log_stores_it(
    shared_server: LiveServer, run_id: str
) -> None:
    """A command is written to the run's event log (who sent what); another tab learned of
    it only on a reload. Now every viewer gets the event as it is stored: the same step,
    data and created_at as GET /events lists, so a page that has both shows it once."""
    import httpx

    trainer = await FakeTrainer.connect(shared_server, run_id)
    await trainer.send(metrics_frame(1, 12))
    await trainer.wait_acked(1)
    sender, _ = await open_viewer(shared_server, run_id)
    other, _ = await open_viewer(shared_server, run_id)
    command = {"type": "command", "id": "c-live", "name": "set_lr_scale", "args": {"value": 0.5}}
    await sender.send(json.dumps(command))
    got = (await recv_until(other, lambda m: m["type"] == "event" and m["kind"] == "command"))[-1]
    async with httpx.AsyncClient(timeout=5) as client:
        logged = (await client.get(f"{shared_server}/api/runs/{run_id}/events?kind=command")).json()
        # a script's command through the REST API reaches them the same way
        posted = await client.post(
            f"{shared_server}/api/runs/{run_id}/commands", json={"id": "c-api", "name": "pause"}
        )
    assert posted.status_code == 202
    assert got == {"type": "event", "run_id": run_id, "v": 1, **logged[0]}
    assert got["step"] == 12 and got["origin"] == "server" and got["seq"] is None
    data = got["data"]
    assert (data["id"], data["name"], data["args"], data["source"]) == (
        "c-live",
        "set_lr_scale",
        {"value": 0.5},
        "user",
    )
    assert data["origin"].startswith("viewer 127.0.0.1:")
    for ws in (sender, other):
        api = await recv_until(
            ws, lambda m: m["type"] == "event" and m["data"].get("id") == "c-api"
        )
        assert (api[-1]["data"]["name"], api[-1]["data"]["source"]) == ("pause", "api")
    await sender.close()
    await other.close()
    await trainer.close()


async def test_a_status_the_server_sets_reaches_viewers_as_an_event(tmp_path: Path) -> None:
    """The server's own status events (a trainer lost) reach the event log of an open page,
    not only its status pill."""
    with running_server(make_settings(tmp_path, heartbeat_timeout_s=0.5)) as server:
        trainer = await FakeTrainer.connect(server, "r1")
        trainer.heartbeat(0.1)  # alive until the viewer is in (a busy machine lost it before)
        await trainer.send(metrics_frame(1, 3))
        await trainer.wait_acked(1)
        viewer, _ = await open_viewer(server, "r1")
        assert trainer._beat is not None
        trainer._beat.cancel()  # silent from here on: lost
        got = await recv_until(viewer, lambda m: m["type"] == "event" and m["kind"] == "status")
        event = got[-1]
        assert (event["origin"], event["step"], event["data"]["status"]) == ("server", 3, "lost")
        assert event["data"]["reason"].startswith("trainer silent")
        await viewer.close()
        await trainer.ws.close()


def _server_events(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server events among a viewer's messages, as GET /events lists them."""
    return [
        {k: v for k, v in m.items() if k not in ("type", "run_id", "v")}
        for m in messages
        if m["type"] == "event" and m.get("origin") == "server"
    ]


async def _drain(ws: ClientConnection, quiet_s: float = 0.3) -> list[dict[str, Any]]:
    """What else arrives until the socket has been quiet for quiet_s."""
    got: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            got.append(strict_loads(await asyncio.wait_for(ws.recv(), quiet_s)))
    return got


async def test_every_command_a_finished_run_settles_reaches_every_viewer_once_in_order(
    shared_server: LiveServer, run_id: str
) -> None:
    """A run that ends with commands pending settles each as never applied, one server
    command_result event each, all in one write. The store handed its listeners one server
    event per write, so open pages saw none of them (a trainer's 'finished' frame) or one
    (a status the server set) until a reload. Now each viewer gets every one, once, in the
    order GET /events lists them."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    await trainer.send(metrics_frame(1, 7))
    await trainer.wait_acked(1)
    url = f"{shared_server}/api/runs/{run_id}/commands"
    async with httpx.AsyncClient(timeout=5) as client:
        for n in range(3):
            posted = await client.post(url, json={"id": f"c{n}", "name": "pause"})
            assert posted.status_code == 202
    viewers = [(await open_viewer(shared_server, run_id))[0] for _ in range(2)]
    await trainer.send(event_frame(2, 7, "status", status="finished"))
    await trainer.wait_acked(2)
    async with httpx.AsyncClient(timeout=5) as client:
        logged = (await client.get(f"{shared_server}/api/runs/{run_id}/events")).json()
    settled = [e for e in logged if e["origin"] == "server" and e["kind"] == "command_result"]
    assert [e["data"]["id"] for e in settled] == ["c0", "c1", "c2"]
    for viewer in viewers:
        got = await recv_until(
            viewer, lambda m: m["type"] == "event" and m["data"].get("id") == "c2"
        )
        got += await _drain(viewer)
        assert _server_events(got) == settled
        await viewer.close()
    await trainer.close()


async def test_a_lost_runs_status_and_settled_commands_all_reach_its_viewers(
    tmp_path: Path,
) -> None:
    """The status the server sets (lost) and each command it settles with it, in one write:
    a viewer got the status alone."""
    with running_server(make_settings(tmp_path, heartbeat_timeout_s=0.5)) as server:
        # made before the trainer connects: making a client blocks the loop (SSL set-up,
        # 0.1 s, several times that under load) that the heartbeats below run on
        client = httpx.AsyncClient(timeout=30)
        trainer = await FakeTrainer.connect(server, "r1")
        # alive (heartbeats on this loop, so the posts must not block it) until the
        # commands are in: on a busy CI machine the run was lost before the first post (409)
        trainer.heartbeat(0.1)
        await trainer.send(metrics_frame(1, 3))
        await trainer.wait_acked(1)
        async with client:
            for n in range(2):
                posted = await client.post(
                    f"{server}/api/runs/r1/commands", json={"id": f"d{n}", "name": "pause"}
                )
                assert posted.status_code == 202
        viewer, _ = await open_viewer(server, "r1")
        assert trainer._beat is not None
        trainer._beat.cancel()  # silent from here on: lost
        got = await recv_until(
            viewer, lambda m: m["type"] == "event" and m["data"].get("id") == "d1"
        )
        got += await _drain(viewer)
        logged = httpx.get(f"{server}/api/runs/r1/events").json()
        ended = [e for e in logged if e["origin"] == "server" and e["kind"] != "command"]
        assert [(e["kind"], e["data"].get("status") or e["data"]["id"]) for e in ended] == [
            ("status", "lost"),
            ("command_result", "d0"),
            ("command_result", "d1"),
        ]
        assert _server_events(got) == ended
        await viewer.close()
        await trainer.ws.close()


async def test_a_server_event_stored_while_a_viewer_joins_reaches_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer is registered before its snapshot is read, so a server event committed in
    between was in its snapshot and then sent again live: twice. The join's snapshot read
    is held here (the only stand-in: it makes that window wide enough to hit every time)
    while a run ends and settles two commands."""
    with running_server(make_settings(tmp_path)) as server:
        store = server.app.state.store
        trainer = await FakeTrainer.connect(server, "r1")
        await trainer.send(metrics_frame(1, 5))
        await trainer.wait_acked(1)
        for n in range(2):
            posted = httpx.post(
                f"{server}/api/runs/r1/commands", json={"id": f"c{n}", "name": "pause"}
            )
            assert posted.status_code == 202
        reading, release = threading.Event(), threading.Event()
        read_snapshot = store.snapshot

        def held_snapshot(run_id: str, **kwargs: Any) -> dict[str, Any]:
            reading.set()
            release.wait(10)
            return read_snapshot(run_id, **kwargs)

        monkeypatch.setattr(store, "snapshot", held_snapshot)
        joining = asyncio.create_task(open_viewer(server, "r1"))
        assert await asyncio.to_thread(reading.wait, 10)
        await trainer.send(event_frame(2, 5, "status", status="finished"))
        await trainer.wait_acked(2)  # committed, and handed to the registered viewer
        release.set()
        viewer, snapshot = await joining
        settled = [
            e
            for e in snapshot["events"]
            if e["origin"] == "server" and e["kind"] == "command_result"
        ]
        assert [e["data"]["id"] for e in settled] == ["c0", "c1"]
        assert _server_events(await _drain(viewer)) == []
        await viewer.close()
        await trainer.close()


async def test_a_quiet_runs_viewer_hears_a_tick_every_few_seconds(
    shared_server: LiveServer, run_id: str
) -> None:
    """A run that sends nothing (quiet, paused) had its viewers hear nothing at all: a page
    could not tell a stalled server (stopped 70 s; /tmp/h15d/s2_sigstop.py) from a live one
    and showed 'running · trainer connected'. The server now sends a quiet viewer a tick
    every TICK_S, so a page that hears nothing for longer knows."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    await trainer.send(metrics_frame(1, 1))
    await trainer.wait_acked(1)
    viewer, _ = await open_viewer(shared_server, run_id)
    try:
        loop = asyncio.get_running_loop()
        arrived: list[float] = []
        longest = 3 * TICK_S  # idle for half a tick, then the next tick: 1.5 ticks (and load)
        for _ in range(2):
            message = strict_loads(await asyncio.wait_for(viewer.recv(), longest))
            assert message == {"v": 1, "type": "tick"}
            arrived.append(loop.time())
        assert arrived[1] - arrived[0] > TICK_S / 2  # one a tick, not a stream
    finally:
        await viewer.close()
        await trainer.close()


async def test_deleting_a_run_closes_its_viewers_saying_so(
    shared_server: LiveServer, run_id: str
) -> None:
    """A run deleted in another tab stayed shown, its socket open, as if it existed
    (/tmp/h15d/s3_trainer_kill_delete.py): its viewers are now closed with 1008 'run
    deleted', and one that reconnects is refused, 'not found'."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    await trainer.send(metrics_frame(1, 1))
    await trainer.wait_acked(1)
    await trainer.close()
    await wait_detached(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    async with httpx.AsyncClient(timeout=10) as client:
        deleted = await client.delete(f"{shared_server}/api/runs/{run_id}")
    assert deleted.status_code == 204
    with pytest.raises(ConnectionClosed) as closed:
        while True:  # a tick may come first
            assert strict_loads(await asyncio.wait_for(viewer.recv(), 5))["type"] == "tick"
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (wire.CLOSE_POLICY, "run deleted")
    async with connect(shared_server.ws(f"/ws/runs/{run_id}?after_seq=1")) as again:
        await again.wait_closed()
        assert again.close_code == wire.CLOSE_POLICY
        assert again.close_reason == "run not found"


async def test_a_snapshot_says_how_long_a_live_run_has_made_no_new_step(
    shared_server: LiveServer, run_id: str
) -> None:
    """A training loop stuck in a hung data loader or a deadlock keeps its link thread
    heartbeating: the run stayed 'running · trainer connected' while its charts stopped,
    and a page opened on it could not tell since when. A joining viewer's snapshot says
    how long the run has been running with its trainer connected and no new step
    (step_quiet_s): from its last new step, or from when it became live again (a resume);
    null while it is paused or has no trainer."""

    async def quiet() -> float | None:
        viewer, snapshot = await open_viewer(shared_server, run_id)
        await viewer.close()
        value = snapshot["step_quiet_s"]
        return None if value is None else float(value)

    trainer = await FakeTrainer.connect(shared_server, run_id)
    try:
        before = await quiet()  # connected, no step yet: counted from the connection
        assert before is not None and before >= 0
        await trainer.send(metrics_frame(1, 1))
        await trainer.wait_acked(1)
        await asyncio.sleep(0.5)
        counted = await quiet()
        assert counted is not None and counted >= 0.5
        sent = time.monotonic()
        await trainer.send(probe_frame(2, 2))  # a new step restarts the count
        await trainer.wait_acked(2)
        after = await quiet()
        # counted on from step 1 it would be over `counted` plus the time since `sent`
        assert after is not None and after <= time.monotonic() - sent + 0.01

        watcher, _ = await open_viewer(shared_server, run_id)
        trainer.heartbeat(status="paused")
        await recv_until(watcher, lambda m: m["type"] == "status" and m["status"] == "paused")
        assert await quiet() is None  # a paused run makes no step, rightly
        await asyncio.sleep(0.5)
        resumed = time.monotonic()
        trainer.status = "running"
        await recv_until(watcher, lambda m: m["type"] == "status" and m["status"] == "running")
        back = await quiet()  # from the resume, not from step 2
        assert back is not None and back <= time.monotonic() - resumed + 0.01
        await watcher.close()
    finally:
        await trainer.close()
    await wait_detached(shared_server, run_id)
    assert await quiet() is None  # no trainer: nothing to be stuck


def beat(step: int, status: str = "running") -> dict[str, Any]:
    """A heartbeat as the trainer's link thread sends it: the training thread's step."""
    return {"type": "heartbeat", "step": step, "status": status}


def timed_rows(seq: int, times: dict[int, float]) -> dict[str, Any]:
    """One metrics frame: a row per step with the trainer's own step_time_s."""
    rows = [
        {"step": step, "time_s": float(step), "values": {"loss": 1.0, "step_time_s": seconds}}
        for step, seconds in times.items()
    ]
    return {"type": "metrics", "seq": seq, "rows": rows}


async def test_the_quiet_time_is_the_heartbeat_steps_and_survives_a_trainer_reconnect(
    shared_server: LiveServer, run_id: str
) -> None:
    """The trainer's link thread reports the training thread's step every second: a step
    that does not change is a loop that does not move, whatever the frames say. A link
    that dropped and reconnected (a network blip) restarted the count, so a link that
    reconnected more often than the threshold hid a stuck loop for good; and a catch-up
    (a page's socket back after a drop) did not say how long the run had been quiet."""

    async def quiet(after_seq: int | None = None) -> dict[str, Any]:
        viewer, first = await open_viewer(shared_server, run_id, after_seq=after_seq)
        await viewer.close()
        return first

    trainer = await FakeTrainer.connect(shared_server, run_id)
    await trainer.send(metrics_frame(1, 1))
    await trainer.send(beat(1))
    await trainer.wait_acked(1)
    await asyncio.sleep(0.6)
    await trainer.close()  # the link drops; the run stays running
    await wait_detached(shared_server, run_id)
    trainer = await FakeTrainer.connect(shared_server, run_id, last_acked_seq=1)
    try:
        await trainer.send(beat(1))  # the same step: the loop has not moved
        caught_up = await quiet(after_seq=1)
        assert caught_up["type"] == "catchup"
        assert caught_up["step_quiet_s"] is not None and caught_up["step_quiet_s"] >= 0.6
        assert (await quiet())["step_quiet_s"] >= 0.6
        await trainer.send(beat(2))  # a step the frames have not brought yet
        await trainer.send(event_frame(2, 1, "log", message="read after the heartbeat"))
        await trainer.wait_acked(2)
        moved = await quiet()
        assert moved["step_quiet_s"] is not None and moved["step_quiet_s"] < 0.3
    finally:
        await trainer.close()


async def test_the_cadence_a_viewer_gets_is_the_trainers_raw_step_times_less_setup_and_pauses(
    shared_server: LiveServer, run_id: str
) -> None:
    """The page took the run's cadence from the snapshot's step_time_s chart series, min
    and max per bucket, whose median leaned slow (40 s for a 1 s run): a page reloaded on a
    stuck run could stay silent. Step 1's time (data loading, compiling) and a step that
    spans a pause counted too and, with few steps, set the median. A joining viewer now
    gets the trainer's latest step times as they came, less those, and the longest healthy
    gap between steps (a validation), which the page's threshold is never below."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    try:
        watcher, _ = await open_viewer(shared_server, run_id)
        await trainer.send(timed_rows(1, {1: 15.0, 2: 0.1, 3: 0.1, 4: 3.0, 5: 0.1}))
        await trainer.send(beat(5, "paused"))
        await recv_until(watcher, lambda m: m["type"] == "status" and m["status"] == "paused")
        await trainer.send(timed_rows(2, {6: 40.0}))  # a step_once while paused
        await trainer.send(beat(6, "running"))
        await recv_until(watcher, lambda m: m["type"] == "status" and m["status"] == "running")
        await trainer.send(timed_rows(3, {7: 50.0, 8: 0.2}))  # 7 spans the pause
        await trainer.wait_acked(3)
        await watcher.close()
        viewer, snapshot = await open_viewer(shared_server, run_id)
        await viewer.close()
        assert snapshot["step_times_s"] == [0.1, 0.1, 3.0, 0.1, 0.2]
        assert snapshot["step_gap_max_s"] == 3.0
        caught_up = await open_viewer(shared_server, run_id, after_seq=3)
        await caught_up[0].close()
        assert caught_up[1]["step_times_s"] == [0.1, 0.1, 3.0, 0.1, 0.2]
    finally:
        await trainer.close()


async def test_a_viewers_unreadable_text_or_huge_integer_gets_an_error_not_a_drop(
    shared_server: LiveServer, run_id: str
) -> None:
    """A 5,000-digit integer (json's ValueError, which decode let through) dropped the
    viewer's socket with no close frame; a lone surrogate in a command's layer names was
    stored and relayed, and every later read of the run's commands failed. Each is named
    in an error frame and the socket goes on."""
    trainer = await FakeTrainer.connect(shared_server, run_id)
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send(
        '{"type":"command","name":"set_lr_scale","args":{"value":' + "9" * 5000 + "}}"
    )
    got = await recv_until(viewer, lambda m: m["type"] == "error")
    assert "an integer literal of more than 4300 digits" in got[-1]["message"]
    frozen = {"layers": ["net.0\udce9"], "frozen": True}
    await viewer.send(json.dumps({"type": "command", "name": "set_frozen", "args": frozen}))
    got = await recv_until(viewer, lambda m: m["type"] == "error")
    assert "args.layers[0] holds U+DCE9, which is not valid UTF-8 text" in got[-1]["message"]
    await viewer.send(json.dumps({"type": "command", "id": "p1", "name": "pause"}))
    got = await recv_until(viewer, lambda m: m["type"] == "command_result")
    assert got[-1]["ok"] is True and got[-1]["id"] == "p1"
    r = httpx.get(shared_server.url(f"/api/runs/{run_id}/commands"))
    assert r.status_code == 200 and [c["name"] for c in r.json()] == ["pause"]
    await viewer.close()
    await trainer.close()


async def test_a_viewer_frame_the_server_fails_on_is_closed_1011_and_logged(
    shared_server: LiveServer,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception reading a viewer's frame was swallowed (asyncio.gather's
    return_exceptions): the socket dropped with no close frame and nothing in the log. A
    fault no frame causes now, so made here by a relay that raises."""
    from layerscope.server import commands

    async def broken(*args: Any) -> dict[str, Any]:
        raise RuntimeError("relay broke")

    trainer = await FakeTrainer.connect(shared_server, run_id)
    monkeypatch.setattr(commands, "relay_viewer_message", broken)
    viewer, _ = await open_viewer(shared_server, run_id)
    await viewer.send(json.dumps({"type": "command", "name": "pause"}))
    with pytest.raises(ConnectionClosed) as closed:
        await recv_until(viewer, lambda m: False)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert "server error reading the frame" in closed.value.rcvd.reason
    assert "relay broke" in caplog.text
    await trainer.close()
