"""The link delivers every frame exactly once through outages, with bounded memory.

The server here is a real websockets server on 127.0.0.1 speaking the trainer
side of server/http_api.md (welcome, acks of the highest contiguous seq, commands
resent after cmd_seq), storing frames by seq the way the real store dedupes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from layerscope.trainer import wire
from layerscope.trainer.link import Link, sync_spool
from layerscope.trainer.spool import read_spool
from waiting import wait_until
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class TrainerServer:
    """A stand-in for /ws/trainer: dedupes by seq, acks contiguous seqs, relays commands."""

    def __init__(self, *, ack: bool = True, token: str | None = None) -> None:
        self.ack = ack
        self.token = token
        self.frames: dict[int, dict[str, Any]] = {}
        self.raw: dict[int, str] = {}
        self.received = 0
        self.hellos: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.port = 0
        self._conn: ServerConnection | None = None
        self._next_cmd = 0  # commands[:_next_cmd] went to the current connection
        self._server: Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def contiguous(self) -> int:
        n = 0
        while n + 1 in self.frames:
            n += 1
        return n

    async def _handler(self, ws: ServerConnection) -> None:
        # A trainer that drops the connection mid-session is what these tests do on purpose.
        with contextlib.suppress(ConnectionClosed):
            await self._session(ws)

    async def _session(self, ws: ServerConnection) -> None:
        if self.token is not None:
            auth = ws.request.headers.get("Authorization") if ws.request else None
            if auth != f"Bearer {self.token}":
                await ws.close(wire.CLOSE_POLICY, "bad token")
                return
        hello = wire.validate_hello(wire.decode(await ws.recv()))
        self.hellos.append(hello)
        await ws.send(
            json.dumps(
                {
                    "type": "welcome",
                    "run_id": hello["run_id"],
                    "acked_seq": self.contiguous() if self.ack else 0,
                    "status": "running",
                }
            )
        )
        self._conn = ws
        self._next_cmd = hello["last_cmd_seq"]
        await self._send_commands(ws)
        async for text in ws:
            frame = wire.parse_trainer_frame(text)
            if frame["type"] == "heartbeat":
                self.heartbeats.append(frame)
                continue
            self.received += 1
            self.frames.setdefault(frame["seq"], frame)
            self.raw.setdefault(frame["seq"], str(text))
            if self.ack:
                await ws.send(json.dumps({"type": "ack", "seq": self.contiguous()}))

    async def _send_commands(self, ws: ServerConnection) -> None:
        # The one place a connection is sent commands, each once: a command queued while
        # a reconnecting trainer's hello is handled must not go out from both the resend
        # after the welcome and send_command.
        while self._next_cmd < len(self.commands):
            command = self.commands[self._next_cmd]
            self._next_cmd += 1
            await ws.send(json.dumps(command))

    def start(self) -> TrainerServer:
        async def start() -> None:
            self._server = await serve(self._handler, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

        self._call(start())
        return self

    def stop(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()
            self._conn = None

        self._call(stop())

    def send_command(self, name: str, **args: Any) -> dict[str, Any]:
        command = {
            "type": "command",
            "id": wire.new_id(),
            "cmd_seq": len(self.commands) + 1,
            "name": name,
            "args": args,
            "source": "user",
        }
        self.commands.append(command)

        async def send() -> None:
            if self._conn is not None:
                await self._send_commands(self._conn)

        self._call(send())
        return command

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [
            f for _, f in sorted(self.frames.items()) if f["type"] == "event" and f["kind"] == kind
        ]

    def close(self) -> None:
        if self._server is not None:
            self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def server() -> Any:
    srv = TrainerServer().start()
    yield srv
    srv.close()


def make_hello(run_id: str = "r1") -> dict[str, Any]:
    return {
        "run_id": run_id,
        "name": "link-test",
        "config": {"lr": 0.1},
        "layers": [{"name": "fc1", "kind": "Linear", "units": 4}],
    }


def metrics(step: int) -> dict[str, Any]:
    return {
        "type": "metrics",
        "rows": [{"step": step, "time_s": step * 0.01, "values": {"loss": 1.0 / step}}],
    }


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


def test_no_server_at_all_spools_hello_and_every_frame(tmp_path: Path) -> None:
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


def test_bad_token_is_refused_without_raising(tmp_path: Path) -> None:
    guarded = TrainerServer(token="secret").start()
    try:
        link = Link(make_hello(), spool_path=tmp_path / "a.bin", server=guarded.url, token="wrong")
        link.start()
        link.submit(metrics(1))
        wait_until(lambda: link._failures >= 1)
        link.close()
        assert guarded.frames == {}
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


def test_sync_uploads_a_spool_and_is_resume_safe(server: TrainerServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool.bin"
    link = Link(make_hello("offline"), spool_path=spool, server=None)
    link.start()
    for step in range(1, 61):
        link.submit(metrics(step))
    link.close()
    assert sync_spool(spool, server.url, timeout_s=20) == 60
    assert sorted(server.frames) == list(range(1, 61))
    assert server.hellos[0]["run_id"] == "offline"
    received = server.received
    assert sync_spool(spool, server.url, timeout_s=20) == 60  # already there: nothing resent
    assert server.received == received


def test_sync_to_nowhere_says_so(tmp_path: Path) -> None:
    spool = tmp_path / "spool.bin"
    link = Link(make_hello(), spool_path=spool)
    link.start()
    link.submit(metrics(1))
    link.close()
    dead = TrainerServer().start()
    url = dead.url
    dead.close()
    with pytest.raises(ConnectionError, match="cannot upload"):
        sync_spool(spool, url, timeout_s=5)


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


def test_sync_of_a_damaged_spool_uploads_what_survived(
    server: TrainerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool.bin"
    link = Link(make_hello("damaged"), spool_path=spool)
    link.start()
    for step in range(1, 21):
        link.submit(metrics(step))
    link.close()
    data = bytearray(spool.read_bytes())
    at = data.index(b'"seq":10}')
    data[at + 3] ^= 0x20  # corrupt frame 10's payload: its CRC no longer matches
    spool.write_bytes(bytes(data))
    assert sync_spool(spool, server.url, timeout_s=20) == 9  # confirmed: the frames before the gap
    assert sorted(server.frames) == [*range(1, 10), *range(11, 21)]  # the rest still sent
    assert "frame 10 is missing" in caplog.text
