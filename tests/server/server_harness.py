"""server_harness — a real server and real wire peers for tests (imported by tests/server/conftest.py).

* ``running_server(settings)`` — ``create_app(settings)`` served by uvicorn on its host
  (127.0.0.1 unless the settings say otherwise) in a background thread; yields a ``LiveServer``, which *is* the base URL (a str) and also
  carries ``.settings``, ``.app``, ``.server`` and ``.data_dir``.
  ``make_settings(data_dir, **overrides)`` builds test settings (port 0, quick commits).
* ``FakeTrainer`` — a ``websockets`` client that speaks the trainer side of the protocol
  (hello, frames, acks, commands); a real peer, not a mock of the server.
* ``open_viewer`` / ``recv_until`` — the browser side of ``/ws/runs/{id}``; ``stop_task`` for
  a test's cleanup of a reader task.
* ``exported`` / ``run_detail`` / ``wait_status`` / ``wait_detached`` — what the server stored
  and holds, through its REST API.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import httpx
from fastapi import FastAPI
from layerscope.server.serving import Server, make_server
from layerscope.server.settings import Settings, local_host
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

START_TIMEOUT_S = 15.0


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: port 0, quick commits, a short reconnect grace. Tests of
    liveness set ``heartbeat_timeout_s`` themselves; the default is long because a
    ``FakeTrainer`` sends no heartbeats unless asked, and an async test that makes a few
    blocking HTTP calls can keep its trainer silent for seconds on a loaded machine (the
    server then dropped it mid-test: 409 'no trainer connected')."""
    values: dict[str, Any] = {
        "data_dir": Path(data_dir),
        "port": 0,
        "commit_interval_s": 0.02,
        "heartbeat_timeout_s": 60.0,
        "reconnect_grace_s": 3.0,
    }
    values.update(overrides)
    return Settings(**values)


class Endpoint(str):
    """Where a server listens: the base URL (a str) plus its port and websocket URLs.
    A server started as a separate process is reached through one of these. ``host`` is
    URL-ready (an IPv6 address bracketed)."""

    port: int
    host: str

    def __new__(cls, port: int, host: str = "127.0.0.1") -> Self:
        self = super().__new__(cls, f"http://{host}:{port}")
        self.port = port
        self.host = host
        return self

    def url(self, path: str) -> str:
        return f"{self}{path}"

    def ws(self, path: str) -> str:
        return f"ws://{self.host}:{self.port}{path}"


class LiveServer(Endpoint):
    """A server running in this process: the Endpoint plus its settings, app and uvicorn server."""

    settings: Settings
    app: FastAPI
    server: Server

    def __new__(cls, port: int, settings: Settings, app: FastAPI, server: Server) -> Self:
        self = super().__new__(cls, port, local_host(settings.host))
        self.settings = settings
        self.app = app
        self.server = server
        return self

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir


@contextmanager
def running_server(settings: Settings) -> Iterator[LiveServer]:
    server, sock, settings, app = make_server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(settings.port, settings, app, server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# ---- wire frames ----


def metrics_frame(seq: int, step: int, **values: float | None) -> dict[str, Any]:
    values = values or {"loss": 1.0 / (step + 1)}
    return {
        "type": "metrics",
        "seq": seq,
        "rows": [{"step": step, "time_s": 0.01 * step, "values": values}],
    }


def probe_frame(
    seq: int, step: int, layers: int = 3, bins: int = 8, count_base: int = 0
) -> dict[str, Any]:
    """``count_base`` inflates every bin count: more bytes on the wire at the same parse cost."""
    return {
        "type": "probe",
        "seq": seq,
        "step": step,
        "layers": [
            {
                "name": f"layer{i}",
                "mean": 0.1 * i,
                "std": 1.0,
                "min": -1.0,
                "max": 1.0,
                "zero_frac": 0.0,
                "nonfinite": 0,
                "dead_ratio": 0.25,
                "hist": {
                    "lo": -1.0,
                    "hi": 1.0,
                    "counts": [count_base + step % 7 + j for j in range(bins)],
                },
            }
            for i in range(layers)
        ],
    }


def event_frame(seq: int, step: int, kind: str, **data: Any) -> dict[str, Any]:
    return {"type": "event", "seq": seq, "step": step, "kind": kind, "data": data}


def strict_loads(text: str | bytes) -> Any:
    """``JSON.parse`` semantics: NaN/Infinity literals are an error."""

    def reject(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def hello_frame(
    run_id: str,
    last_acked_seq: int = 0,
    last_cmd_seq: int = 0,
    name: str | None = None,
    layers: int = 3,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "type": "hello",
        "v": 1,
        "run_id": run_id,
        "name": name or run_id,
        "config": {"lr": 0.1},
        "layers": [{"name": f"layer{i}", "kind": "Linear", "units": 8} for i in range(layers)],
        "last_acked_seq": last_acked_seq,
        "last_cmd_seq": last_cmd_seq,
        **extra,
    }


# ---- clients ----


class FakeTrainer:
    """The trainer side of /ws/trainer over a real websocket. Like a real link thread it
    reads everything the server sends as it arrives (recording acks, commands and errors);
    ``recv``/``wait_for`` then consume those messages in order."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.acked = 0
        self.commands: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._inbox: asyncio.Queue[dict[str, Any] | ConnectionClosed] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self._beat: asyncio.Task[None] | None = None
        self.status = "running"  # what heartbeat() says

    @classmethod
    async def connect(
        cls,
        server: Endpoint,
        run_id: str,
        *,
        last_acked_seq: int = 0,
        last_cmd_seq: int = 0,
        headers: dict[str, str] | None = None,
        name: str | None = None,
        layers: int = 3,
        **extra: Any,
    ) -> FakeTrainer:
        """``extra``: more hello fields (``instance``, ``device``, ...)."""
        ws = await connect(server.ws("/ws/trainer"), additional_headers=headers, max_size=None)
        await ws.send(
            json.dumps(hello_frame(run_id, last_acked_seq, last_cmd_seq, name, layers, **extra))
        )
        welcome = strict_loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome", welcome
        return cls(ws, welcome)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = strict_loads(raw)
                if message["type"] == "ack":
                    self.acked = max(self.acked, message["seq"])
                elif message["type"] == "command":
                    self.commands.append(message)
                elif message["type"] == "error":
                    self.errors.append(message["message"])
                self._inbox.put_nowait(message)
            await self.ws.recv()  # raises the ConnectionClosed that ended the iteration
        except ConnectionClosed as exc:
            self._inbox.put_nowait(exc)

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        """A dict is sent as a JSON text frame; str and bytes go out exactly as given."""
        if isinstance(frame, dict):
            frame = json.dumps({"v": 1, **frame}, separators=(",", ":"))
        await self.ws.send(frame)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        message = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(message, ConnectionClosed):
            self._inbox.put_nowait(message)  # every later recv sees the close too
            raise message
        return message

    def drain(self) -> list[dict[str, Any]]:
        """Discard (and return) what has arrived but was not consumed yet."""
        drained = []
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            if isinstance(message, ConnectionClosed):
                self._inbox.put_nowait(message)
                break
            drained.append(message)
        return drained

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("no matching message from the server")
            message = await self.recv(left)
            if match(message):
                return message

    async def wait_acked(self, seq: int, timeout: float = 10.0) -> None:
        """Consume messages up to the ack that covers ``seq`` (at once if one already did)."""
        if self.acked < seq:
            await self.wait_for(lambda m: m["type"] == "ack" and m["seq"] >= seq, timeout)

    async def error(self, timeout: float = 10.0) -> str:
        message = await self.wait_for(lambda m: m["type"] == "error", timeout)
        return str(message["message"])

    async def closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        """Read until the server closes; returns (close code, reason)."""
        try:
            while True:
                await self.recv(timeout)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else "")

    def heartbeat(self, period_s: float = 0.2, status: str = "running") -> None:
        """Heartbeat in the background, as a live trainer's link thread does; ``status``
        is what each says (``self.status``, which a test may change meanwhile)."""
        self.status = status

        async def beat() -> None:
            step = 0
            while True:
                await self.ws.send(
                    json.dumps({"type": "heartbeat", "v": 1, "step": step, "status": self.status})
                )
                step += 1
                await asyncio.sleep(period_s)

        self._beat = asyncio.create_task(beat())

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        await self.ws.close()
        await self._reader


async def open_viewer(
    server: Endpoint, run_id: str, *, after_seq: int | None = None, **kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """A viewer socket and its first message (snapshot, or catchup with ``after_seq``)."""
    query = f"?after_seq={after_seq}" if after_seq is not None else ""
    ws = await connect(server.ws(f"/ws/runs/{run_id}{query}"), max_size=None, **kwargs)
    first = strict_loads(await asyncio.wait_for(ws.recv(), 10))
    return ws, first


async def open_slow_viewer(server: Endpoint, run_id: str) -> ClientConnection:
    """A viewer that reads nothing until told to: a tiny receive buffer and a one-message
    client queue and no compression, so the server meets back-pressure after a few frames,
    not megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    return await connect(
        server.ws(f"/ws/runs/{run_id}"), sock=sock, max_size=None, max_queue=1, compression=None
    )


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, however it ends: for a test's cleanup,
    which must not leave a reader running (or its socket open) into the next test."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def recv_until(
    ws: ClientConnection, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Every message up to and including the first that matches."""
    seen: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError(f"no matching message; got {[m.get('type') for m in seen]}")
        message = strict_loads(await asyncio.wait_for(ws.recv(), left))
        seen.append(message)
        if match(message):
            return seen


def exported(server: str, run_id: str) -> list[dict[str, Any]]:
    """Every stored frame of a run, through the export endpoint (header line dropped)."""
    response = httpx.get(f"{server}/api/runs/{run_id}/export", timeout=10)
    response.raise_for_status()
    lines = [strict_loads(line) for line in response.text.splitlines() if line.strip()]
    return [line for line in lines if "seq" in line and line.get("type") != "hello"]


def run_detail(server: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server}/api/runs/{run_id}", timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def wait_detached(server: str, run_id: str, timeout: float = 15.0) -> None:
    """Until the server has let go of the run's trainer. A closed client socket is not
    enough: the server answers the close handshake before its handler has run the detach."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            response = await client.get(f"{server}/api/runs/{run_id}")
            if response.status_code == 200 and response.json()["trainer_connected"] is False:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server still holds run {run_id}'s trainer")
            await asyncio.sleep(0.05)


async def wait_status(
    server: str, run_id: str, status: str, timeout: float = 15.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            response = await client.get(f"{server}/api/runs/{run_id}")
            if response.status_code == 200 and response.json()["status"] == status:
                body: dict[str, Any] = response.json()
                return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is {response.json().get('status')}, not {status}")
            await asyncio.sleep(0.05)


class WriterFileLimit:
    """A full disk, for real: the store's writer process may not write past byte 1 of any
    file (RLIMIT_FSIZE), so SQLite's commits fail as on a full disk (``full``), until
    ``space_back``. Put back on exit whatever happened."""

    def __init__(self, store: Any) -> None:
        import psutil

        self._limit = psutil.RLIMIT_FSIZE
        self._proc = psutil.Process(store._writes.pid)
        _soft, self._hard = self._proc.rlimit(self._limit)

    def full(self) -> None:
        self._proc.rlimit(self._limit, (1, self._hard))

    def space_back(self) -> None:
        self._proc.rlimit(self._limit, (self._hard, self._hard))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.space_back()
