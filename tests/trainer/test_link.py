"""The link delivers every frame exactly once through outages, with bounded memory.

The server here is trainer_server.py's real websockets stand-in for /ws/trainer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from layerscope.trainer.link import Link
from layerscope.trainer.spool import read_spool
from trainer_server import TrainerServer, make_hello, metrics
from waiting import wait_until

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))  # server_harness: the real server


@pytest.fixture
def server() -> Iterator[TrainerServer]:
    srv = TrainerServer().start()
    yield srv
    srv.close()


def spooled_frames(path: Path) -> dict[int, str]:
    records = list(read_spool(path))
    assert json.loads(records[0])["type"] == "hello"
    return {json.loads(r)["seq"]: r for r in records[1:]}


def test_frames_survive_a_server_restart_exactly_once(
    server: TrainerServer, tmp_path: Path
) -> None:
    # close() waits for the acks of the last frames: on a loaded machine the reconnect after
    # the restart can come after a backoff of seconds, longer than the default 5 s wait.
    link = Link(
        make_hello(), spool_path=tmp_path / "spool.bin", server=server.url, close_timeout_s=60
    )
    link.start()
    for step in range(1, 101):
        link.submit(metrics(step))
    wait_until(lambda: link.acked_seq == 100)
    server.stop()
    for step in range(101, 201):  # produced while the server is down
        link.submit(metrics(step))
        if step == 150:
            link.submit({"type": "event", "step": step, "kind": "log", "data": {"msg": "outage"}})
    # The server has closed its side; the link thread sees the close when it next runs.
    wait_until(lambda: link.last_seq == 201 and not link.connected)
    server.start()  # same port
    for step in range(201, 251):
        link.submit(metrics(step))
    link.close()
    assert link.acked_seq == link.last_seq == 251
    assert sorted(server.frames) == list(range(1, 252))
    assert len(server.hellos) >= 2 and server.hellos[-1]["last_acked_seq"] >= 100
    # What the server holds is exactly what was spooled and sent, frame by frame.
    assert server.raw == spooled_frames(tmp_path / "spool.bin")
    steps = [
        f["rows"][0]["step"] for _, f in sorted(server.frames.items()) if f["type"] == "metrics"
    ]
    assert steps == list(range(1, 251))


def test_no_server_at_all_spools_hello_and_every_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A port nothing listens on: connection refused, training goes on, spool keeps the run.
    dead = TrainerServer().start()
    url = dead.url
    dead.close()
    link = Link(make_hello(), spool_path=tmp_path / "spool.bin", server=url)
    link.start()
    for step in range(1, 41):
        link.submit(metrics(step))
    link.close()
    assert link.acked_seq == 0
    assert f"layerscope sync {tmp_path / 'spool.bin'}" in caplog.text  # how to upload it
    records = list(read_spool(tmp_path / "spool.bin"))
    assert json.loads(records[0])["run_id"] == "r1"
    assert [json.loads(r)["seq"] for r in records[1:]] == list(range(1, 41))


def test_memory_stays_bounded_when_the_server_never_acks(tmp_path: Path) -> None:
    stalled = TrainerServer(ack=False).start()
    try:
        link = Link(
            make_hello(),
            spool_path=tmp_path / "spool.bin",
            server=stalled.url,
            max_frames_in_memory=25,
        )
        link.start()
        for step in range(1, 301):
            link.submit(metrics(step))
        wait_until(lambda: len(stalled.frames) == 300)
        assert link.acked_seq == 0
        assert link.frames_in_memory <= 25 and link.max_frames_in_memory_seen <= 25
        # The server comes back acking: the resend re-reads the spilled frames from the spool.
        stalled.ack = True
        stalled.frames.clear()
        stalled.raw.clear()
        stalled.stop()
        stalled.start()
        wait_until(lambda: link.acked_seq == 300)
        link.close()
        assert sorted(stalled.frames) == list(range(1, 301))
        assert stalled.raw == spooled_frames(tmp_path / "spool.bin")
        assert link.max_frames_in_memory_seen <= 25
    finally:
        stalled.close()


def test_commands_reach_the_callback_once_and_heartbeats_flow(
    server: TrainerServer, tmp_path: Path
) -> None:
    got: list[dict[str, Any]] = []
    link = Link(
        make_hello(),
        spool_path=tmp_path / "spool.bin",
        server=server.url,
        on_command=got.append,
        heartbeat_s=0.05,
    )
    link.start()
    wait_until(lambda: link.connected)
    sent = server.send_command("set_lr_scale", value=0.5)
    wait_until(lambda: len(got) == 1)
    assert got[0]["id"] == sent["id"] and got[0]["args"] == {"value": 0.5}
    link.status = "paused"
    wait_until(lambda: any(h["status"] == "paused" for h in server.heartbeats))
    # Reconnect: the hello says which commands the trainer already has, so none repeat.
    server.stop()
    server.start()
    wait_until(lambda: len(server.hellos) == 2)
    assert server.hellos[1]["last_cmd_seq"] == 1
    server.send_command("resume")
    wait_until(lambda: len(got) == 2)
    link.close()
    assert [c["name"] for c in got] == ["set_lr_scale", "resume"]


def test_bad_token_is_refused_without_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guarded = TrainerServer(token="secret").start()
    try:
        link = Link(make_hello(), spool_path=tmp_path / "a.bin", server=guarded.url, token="wrong")
        link.start()
        link.submit(metrics(1))
        wait_until(lambda: link._failures >= 1)
        link.close()
        assert guarded.frames == {}
        # reached and told no: said so, not 'never reached', and how to upload it after all
        assert (
            "the trainer token was refused" in caplog.text
            and "LAYERSCOPE_TRAINER_TOKEN=T layerscope sync" in caplog.text
        )
        assert "never reached" not in caplog.text
        # what there is to check: `layerscope train` has no --token
        assert "check LAYERSCOPE_TRAINER_TOKEN (or watch()'s token=)" in caplog.text
        assert "--token /" not in caplog.text
        good = Link(
            make_hello("r2"),
            spool_path=tmp_path / "b.bin",
            server=guarded.url,
            token="secret",
            close_timeout_s=60,  # close() waits for the ack; a loaded machine is slow to give it
        )
        good.start()
        good.submit(metrics(1))
        good.close()
        assert sorted(guarded.frames) == [1]
    finally:
        guarded.close()


def test_a_refused_run_says_why_once_and_keeps_the_run_in_its_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server refusing the hello (its run id holds another process's run) is not an
    outage: the warning names the server's reason, and the spool keeps everything."""
    reason = "run id r1 already holds a run recorded by another trainer process"
    refusing = TrainerServer(refuse=reason).start()
    try:
        link = Link(make_hello(), spool_path=tmp_path / "a.bin", server=refusing.url)
        link.start()
        for seq in (1, 2):
            link.submit(metrics(seq))
        wait_until(lambda: link._failures >= 2)
        link.close()
    finally:
        refusing.close()
    warned = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(warned) == 1 and "refused run r1" in warned[0], caplog.text  # once, with why
    assert "no connection" not in caplog.text and "never reached" not in caplog.text
    assert "--run-id NEW" in caplog.text  # at close: how to upload it after all
    assert len(list(read_spool(tmp_path / "a.bin"))) == 3  # the hello and both frames


def test_watch_hellos_carry_a_fresh_instance_per_watch(tmp_path: Path) -> None:
    """The hello names the process's own instance (one per watch(), kept across its
    reconnects and in its spool), so a server can tell a rerun under the same run id
    from a reconnect."""
    from layerscope.trainer.watch import watch
    from torch import nn

    model = nn.Linear(2, 2)
    server = TrainerServer().start()
    try:
        instances = []
        for i in range(2):
            with watch(model, server=server.url, run_id="same", run_dir=tmp_path / str(i)) as w:
                wait_until(lambda: w.link is not None and w.link.connected)
            instances.append(server.hellos[-1]["instance"])
            first = json.loads(next(iter(read_spool(tmp_path / str(i) / "spool.bin"))))
            assert first["instance"] == instances[-1]
        assert instances[0] != instances[1] and all(len(x) == 32 for x in instances)
    finally:
        server.close()


def test_watch_applies_server_commands_and_heartbeats_while_paused(
    server: TrainerServer, tmp_path: Path
) -> None:
    import torch
    from layerscope.trainer import link as link_module
    from layerscope.trainer.watch import watch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)

    def train_step() -> torch.Tensor:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    assert link_module.HEARTBEAT_S <= 1.0
    with watch(model, opt, run="steered", server=server.url, every=10, run_dir=tmp_path) as w:
        assert w.link is not None
        for _ in range(3):
            w.step(loss=train_step())
        wait_until(lambda: w.link is not None and w.link.connected)
        half = server.send_command("set_lr_scale", value=0.5)
        # Applied at the next step boundary, on the training thread.
        wait_until(lambda: not w.control.commands.empty())
        w.step(loss=train_step())
        assert w.control_state["lr_scale"] == 0.5
        w.step(loss=train_step())

        server.send_command("pause")
        # The step must find the pause queued, or it finishes unpaused and nothing blocks.
        wait_until(lambda: not w.control.commands.empty())
        stepper = threading.Thread(target=lambda: w.step(loss=train_step()), daemon=True)
        stepper.start()
        wait_until(lambda: w.control_state["paused"])
        assert stepper.is_alive()  # blocked in w.step()
        seen = len(server.heartbeats)
        wait_until(lambda: sum(h["status"] == "paused" for h in server.heartbeats[seen:]) >= 2)
        assert stepper.is_alive()
        server.send_command("resume")
        stepper.join(10)
        assert not stepper.is_alive()
        server.send_command("stop")
        wait_until(lambda: not w.control.commands.empty())
        w.step(loss=train_step())
        assert w.should_stop
    results = server.events("command_result")
    assert [r["data"]["name"] for r in results] == ["set_lr_scale", "pause", "resume", "stop"]
    assert results[0]["data"]["id"] == half["id"] and results[0]["data"]["ok"] is True
    assert results[0]["data"]["applied_at_step"] == 4  # after step 4; step 5 is the first scaled
    assert [r["data"]["cmd_seq"] for r in results] == [1, 2, 3, 4]
    assert results[-1]["data"]["state"]["stopping"] is True
    rows = [
        row for _, f in sorted(server.frames.items()) if f["type"] == "metrics" for row in f["rows"]
    ]
    lr_by_step = {row["step"]: row["values"]["lr"] for row in rows}
    assert lr_by_step[4] == 0.1 and lr_by_step[5] == 0.05  # the lr the optimizer actually used
    statuses = [e["data"]["status"] for e in server.events("status")]
    assert statuses == ["running", "paused", "running", "stopped"]
    assert sorted(server.frames) == list(range(1, len(server.frames) + 1))
    assert [p["step"] for _, p in sorted(server.frames.items()) if p["type"] == "probe"] == [1]


def test_a_reused_spool_path_gets_a_fresh_spool_per_run(tmp_path: Path) -> None:
    """A run directory used twice (`--run-dir out` run again), even by the same run id (a
    new link numbers its frames from 1 again): the new run never appends to the old spool,
    which sync would upload with it or drop as repeated seqs; the old one is moved aside
    under its run id, numbered when that name is taken."""
    spool = tmp_path / "spool.bin"

    def run(run_id: str, steps: int) -> None:
        link = Link(make_hello(run_id), spool_path=spool)
        link.start()
        for step in range(1, steps + 1):
            link.submit(metrics(step))
        link.close()

    def seqs(path: Path) -> list[tuple[str, Any]]:
        return [
            (f["type"], f.get("run_id", f.get("seq"))) for f in map(json.loads, read_spool(path))
        ]

    run("first", 3)
    run("first", 2)  # the same run id again
    run("second", 5)
    assert seqs(tmp_path / "spool-first.bin") == [("hello", "first")] + [
        ("metrics", k) for k in (1, 2, 3)
    ]
    assert seqs(tmp_path / "spool-first-2.bin") == [
        ("hello", "first"),
        ("metrics", 1),
        ("metrics", 2),
    ]
    assert seqs(spool) == [("hello", "second")] + [("metrics", k) for k in range(1, 6)]
    run("third", 1)
    assert seqs(tmp_path / "spool-second.bin")[0] == ("hello", "second")


def test_reconnects_back_off_doubling_with_jitter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts TCP and hangs up before the websocket handshake: the link
    tries again after a wait that doubles from BACKOFF_FIRST_S, each drawn from half to all
    of it (jitter: many trainers do not come back in lockstep after a restart)."""
    from layerscope.trainer import link as link_module

    attempts: list[float] = []
    ready = threading.Event()
    port: list[int] = []

    async def serve() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            attempts.append(time.monotonic())
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await asyncio.sleep(15.0)

    drawn: list[tuple[float, float, float]] = []
    uniform = link_module.random.uniform

    def spy(a: float, b: float) -> float:
        value = uniform(a, b)
        drawn.append((a, b, value))
        return value

    monkeypatch.setattr(link_module.random, "uniform", spy)
    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    link = Link(make_hello(), spool_path=tmp_path / "spool.bin", server=f"ws://127.0.0.1:{port[0]}")
    link.start()
    wait_until(lambda: len(attempts) >= 7, timeout_s=30)
    link.close()
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)][:6]
    first = link_module.BACKOFF_FIRST_S
    # each wait is a fresh draw from half to all of a backoff that doubles from the first
    assert [(a, b) for a, b, _ in drawn[:6]] == [(0.5, 1.0)] * 6
    for k, (gap, (_, _, factor)) in enumerate(zip(gaps, drawn, strict=False)):
        assert gap >= factor * first * 2**k - 0.01, (k, gaps, drawn)
    assert gaps[5] > 4 * gaps[0], gaps


def test_watch_and_the_cli_read_a_server_url_alike() -> None:
    """watch() kept a URL's path as the socket's (behind a proxy at /layerscope it
    connected to /layerscope), while train and sync appended /ws/trainer: one
    LAYERSCOPE_SERVER reached two different endpoints."""
    from layerscope.trainer.experiment import trainer_socket_url
    from layerscope.trainer.link import trainer_url

    for given in ("ws://h:1", "http://h:1/", "h:1", "https://h/layerscope", "ws://h:1/ws/trainer",
                  "wss://h/layerscope/ws/trainer/"):  # fmt: skip
        assert trainer_url(given) == trainer_socket_url(given), given
    assert trainer_url("https://h/layerscope") == "wss://h/layerscope/ws/trainer"


def test_a_frame_the_server_refuses_does_not_hold_back_the_rest_of_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Against the real server: an event over its 64 KiB data limit (a command_result echoing
    a 530 KB set_frozen) was refused on each resend and acks stopped below it, so close()
    waited out its timeout and told the user to run `layerscope sync`, which could not
    finish either. The server records the refusal in the frame's place and acks past it:
    every frame is acked by close(), and the trainer's log says which frame was refused."""
    from server_harness import exported, make_settings, running_server

    with running_server(make_settings(tmp_path / "data")) as server:
        link = Link(
            make_hello("refused-live"),
            spool_path=tmp_path / "spool.bin",
            server=server.ws("/ws/trainer"),
            close_timeout_s=10,
        )
        link.start()
        link.submit(metrics(1))
        link.submit({"type": "event", "step": 1, "kind": "log", "data": {"message": "x" * 100_000}})
        link.submit(metrics(2))
        started = time.monotonic()
        link.close()
        assert time.monotonic() - started < 5
        assert (link.acked_seq, link.last_seq) == (3, 3)
        frames = exported(server, "refused-live")
    assert [(f["seq"], f["type"]) for f in frames] == [(1, "metrics"), (2, "event"), (3, "metrics")]
    assert frames[1]["data"]["refused"] == {
        "type": "event",
        "seq": 2,
        "bytes": frames[1]["data"]["refused"]["bytes"],
    }
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [
        "layerscope: server says: event frame seq 2 not stored: event data exceeds 65536 bytes;"
        " recorded in its place as refused (in the run's event log) and acked, so the frames"
        " after it are stored"
    ]
