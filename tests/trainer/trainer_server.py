"""trainer_server — a stand-in for the server's /ws/trainer for the link and sync tests.

A real websockets server on 127.0.0.1 speaking the trainer side of server/http_api.md
(welcome, acks of the highest contiguous seq, commands resent after cmd_seq), storing
frames by seq the way the real store dedupes them; and the frames those tests send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from http import HTTPStatus
from typing import Any

from layerscope.trainer import wire
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class TrainerServer:
    """A stand-in for /ws/trainer: dedupes by seq, acks contiguous seqs, relays commands."""

    def __init__(
        self,
        *,
        ack: bool = True,
        token: str | None = None,
        ack_delay_s: float = 0.0,
        refuse: str | None = None,
    ) -> None:
        self.ack = ack
        self.refuse = refuse  # answer every hello with this error, as a server refusing the run
        self.ack_delay_s = ack_delay_s  # a slow server: each ack waits this long
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

    def _check_token(self, connection: ServerConnection, request: Any) -> Any:
        # as the real server does: a bad token is an HTTP 403 before the upgrade
        if (
            self.token is not None
            and request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            return connection.respond(HTTPStatus.FORBIDDEN, "bad token\n")
        return None

    async def _session(self, ws: ServerConnection) -> None:
        hello = wire.decode(await ws.recv())
        self.hellos.append(hello)
        hello = wire.validate_hello(hello)
        if self.refuse is not None:
            await ws.send(json.dumps({"type": "error", "message": self.refuse}))
            await ws.close(wire.CLOSE_POLICY, "refused")
            return
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
                if self.ack_delay_s:
                    await asyncio.sleep(self.ack_delay_s)
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
            self._server = await serve(
                self._handler, "127.0.0.1", self.port, process_request=self._check_token
            )
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
