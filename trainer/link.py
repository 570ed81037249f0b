"""link — the trainer's one connection to the server, on its own thread (DESIGN §5, §6).

Owns: the background thread and its asyncio loop, turning flushed batches and
events into numbered frames (seq 1, 2, 3, ...), appending every frame to the
spool before it is sent, the websocket session (hello, welcome, resend,
stream, acks, commands, heartbeats) and reconnecting with backoff. Uploading a
spool later is ``sync``'s.

Never: raises into the training thread, blocks it (the training thread only
hands items over with ``call_soon_threadsafe``), or keeps more than a bounded
number of unacknowledged frames in memory: past the bound they are re-read
from the spool when a resend needs them, so a stalled server never grows RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from layerscope.trainer import wire
from layerscope.trainer.spool import SpoolError, SpoolWriter, set_aside_other_run
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

_fast_dumps: Callable[[Any], bytes] | None
try:
    from orjson import dumps as _fast_dumps
except ImportError:  # pragma: no cover - orjson is a dependency; json still works alone
    _fast_dumps = None


def encode(message: dict[str, Any]) -> str:
    """``wire.encode`` with orjson's encoder: a probe frame is written ~14x faster, on
    the link thread, whose Python time the training thread waits for (the GIL)."""
    return wire.encode(message, _fast_dumps)


log = logging.getLogger(__name__)

MAX_FRAMES_IN_MEMORY = 2_000
MAX_BYTES_IN_MEMORY = 32 * 1024 * 1024
HEARTBEAT_S = 1.0
BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 5.0
OPEN_TIMEOUT_S = 5.0
WELCOME_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # how long close() waits for the server to ack the last frames
TRAINER_PATH = "/ws/trainer"
_SOCKET_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


class LinkError(RuntimeError):
    """The server answered, but not with what the protocol promises."""


class Batch(Protocol):
    """A flush handed over by the training thread; turned into frame bodies off the loop."""

    def materialize(self) -> list[dict[str, Any]]: ...


class _Close:
    pass


_CLOSE = _Close()


class _Barrier:
    """An inbox item that says when every item before it has been processed."""

    def __init__(self) -> None:
        self.reached = threading.Event()


def http_base(server: str) -> str:
    """The server's HTTP base URL from any form ``train`` and ``sync`` take: ``http(s)://``,
    ``ws(s)://`` (with or without the trainer socket's path) or a bare ``host:port``."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    path = path.removesuffix(TRAINER_PATH)
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def dashboard_url(server: str, run_id: str) -> str | None:
    """The run's page on the server ``server`` names (any form ``train`` takes: ``ws://``,
    ``http://``, the trainer socket's URL, a bare ``host:port``), or None for a run id the
    server would refuse: the line ``train --server`` and ``watch(server=..., progress=True)``
    print first."""
    if wire.run_id_problem(run_id) is not None:
        return None
    return f"{http_base(server)}/runs/{run_id}"


def trainer_url(server: str) -> str:
    """``ws://host:port`` (or http://, a bare host:port, a path prefix behind a proxy) ->
    the trainer socket URL ``.../ws/trainer``, as ``layerscope train`` and ``sync`` read the
    same LAYERSCOPE_SERVER (a path that already ends in /ws/trainer is kept)."""
    server = server.strip()
    parts = urlsplit(server if "://" in server else f"ws://{server}")
    scheme = _SOCKET_SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(
            f"server URL {server!r} must look like ws://HOST:PORT (or http://, wss://, https://)"
        )
    path = parts.path.rstrip("/")
    if not path.endswith(TRAINER_PATH):
        path += TRAINER_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Link:
    """Numbers, spools and streams one run's frames; owns the socket on a daemon thread."""

    def __init__(
        self,
        hello: dict[str, Any],
        *,
        spool_path: str | Path,
        server: str | None = None,
        token: str | None = None,
        on_command: Callable[[dict[str, Any]], None] | None = None,
        max_frames_in_memory: int = MAX_FRAMES_IN_MEMORY,
        max_bytes_in_memory: int = MAX_BYTES_IN_MEMORY,
        heartbeat_s: float = HEARTBEAT_S,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.hello = wire.validate_hello(dict(hello, type="hello"))
        self.url = trainer_url(server) if server else None
        self.token = token
        self.on_command = on_command or (lambda command: None)
        self.max_frames_in_memory = max(1, max_frames_in_memory)
        self.max_bytes_in_memory = max_bytes_in_memory
        self.heartbeat_s = heartbeat_s
        self.close_timeout_s = close_timeout_s

        # Read by the heartbeat; written by the training thread (plain attribute stores).
        self.step = 0
        self.status = "starting"

        self.last_seq = 0
        self.acked_seq = 0
        self.max_cmd_seq = 0
        self.connected = False
        self.ever_connected = False
        self.max_frames_in_memory_seen = 0
        self._sent = 0
        self._failures = 0
        self._outage_warned = False
        self._refusal: str | None = None  # the server's reason when it refused the hello
        self._spool_warned = False
        self._submit_warned = False
        self._pending: OrderedDict[int, str] = OrderedDict()
        self._pending_bytes = 0
        self._offsets = array("q")  # spool offset of seq k at index k-1; -1 if the write failed
        self._backoff_s = BACKOFF_FIRST_S

        set_aside_other_run(Path(spool_path), str(hello.get("run_id")))
        self.spool = SpoolWriter(spool_path)
        self.spool.append(encode(self.hello))
        self._loop = asyncio.new_event_loop()
        self._inbox: asyncio.Queue[dict[str, Any] | Batch | _Close | _Barrier] = asyncio.Queue()
        self._new_frame = asyncio.Event()
        self._acked = asyncio.Event()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="layerscope-link", daemon=True)
        self._closing = False

    # ---- training-thread side ----

    def start(self) -> None:
        self._thread.start()

    @property
    def steerable(self) -> bool:
        """A server is configured and connected now, or the first connection is still being
        tried (a run's first flush may come before its socket opens)."""
        if self.url is None:
            return False
        return self.connected or (not self.ever_connected and not self._failures)

    @property
    def frames_in_memory(self) -> int:
        return len(self._pending)

    def submit(self, item: dict[str, Any] | Batch) -> None:
        """Hand a frame body (``{"type": ..., ...}`` without seq) or a Batch to the link."""
        self._put(item)

    def settle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every item submitted before this call has been
        processed: its frames recorded, a flush's rules evaluated (their commands queued on
        the Control). False on timeout or when the link thread has stopped."""
        barrier = _Barrier()
        self._put(barrier)
        return barrier.reached.wait(timeout_s)

    def _put(self, item: dict[str, Any] | Batch | _Close | _Barrier) -> None:
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)
        except RuntimeError:
            if not self._submit_warned:
                self._submit_warned = True
                log.warning("layerscope: the link thread has stopped; later frames are lost")

    def close(self) -> None:
        """Send what is pending, wait up to close_timeout_s for acks, stop the thread."""
        if self._closing:
            return
        self._closing = True
        if not self._thread.is_alive():
            self.spool.close()
            return
        self._put(_CLOSE)
        self._thread.join(self.close_timeout_s + 10.0)
        if self._thread.is_alive():
            log.warning("layerscope: the link thread did not stop in time; the spool has the run")

    # ---- link thread ----

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
        except Exception:
            log.exception("layerscope: the link thread failed; the spool keeps what it wrote")
        finally:
            self.spool.close()
            self._loop.close()

    async def _main(self) -> None:
        connection = asyncio.create_task(self._connection()) if self.url else None
        try:
            await self._pump()
            await self._wait_for_acks()
        finally:
            if connection is not None:
                # Ask the session to end with a normal close (1000); cancelling it inside
                # ``async with connect`` would close with 1011 "internal error".
                self._stopping.set()
                done, _ = await asyncio.wait([connection], timeout=2.0)
                if not done:
                    connection.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connection

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._inbox.get()
            if isinstance(item, _Close):
                return
            if isinstance(item, _Barrier):
                item.reached.set()
                continue
            try:
                if isinstance(item, dict):
                    bodies = [item]
                else:
                    # Waiting on the device event and decoding run off the loop, so acks,
                    # commands and heartbeats keep flowing meanwhile.
                    bodies = await loop.run_in_executor(None, item.materialize)
                for body in bodies:
                    self._add_frame(body)
            except Exception:
                log.exception("layerscope: could not record a flush or event; it is lost")

    def _add_frame(self, body: dict[str, Any]) -> None:
        seq = self.last_seq + 1
        text = encode({**body, "seq": seq})
        if len(text) > wire.MAX_FRAME_BYTES:
            log.warning(
                "layerscope: a %s frame of %d bytes exceeds the %d-byte limit and was dropped",
                body.get("type"),
                len(text),
                wire.MAX_FRAME_BYTES,
            )
            return
        self.last_seq = seq
        try:
            offset = self.spool.append(text)
        except (OSError, ValueError) as exc:
            offset = -1
            if not self._spool_warned:
                self._spool_warned = True
                log.warning(
                    "layerscope: spool write failed (%s); unacked frames past the in-memory "
                    "bound cannot be resent",
                    exc,
                )
        self._offsets.append(offset)
        if self.url is None:
            return
        self._pending[seq] = text
        self._pending_bytes += len(text)
        while len(self._pending) > 1 and (
            len(self._pending) > self.max_frames_in_memory
            or self._pending_bytes > self.max_bytes_in_memory
        ):
            # The oldest unacked frame leaves memory; a resend re-reads it from the spool.
            _, old = self._pending.popitem(last=False)
            self._pending_bytes -= len(old)
        self.max_frames_in_memory_seen = max(self.max_frames_in_memory_seen, len(self._pending))
        self._new_frame.set()

    def _frame_text(self, seq: int) -> str | None:
        text = self._pending.get(seq)
        if text is not None:
            return text
        offset = self._offsets[seq - 1]
        if offset < 0:
            return None
        try:
            return self.spool.read_at(offset)
        except SpoolError as exc:
            log.warning("layerscope: cannot resend frame %d: %s", seq, exc)
            return None

    def _on_ack(self, seq: int) -> None:
        seq = min(seq, self.last_seq)
        if seq <= self.acked_seq:
            return
        self.acked_seq = seq
        while self._pending:
            first = next(iter(self._pending))
            if first > seq:
                break
            self._pending_bytes -= len(self._pending.pop(first))
        self._acked.set()

    async def _wait_for_acks(self) -> None:
        if self.url is None:
            return
        deadline = time.monotonic() + self.close_timeout_s
        while self.acked_seq < self.last_seq:
            if not self.ever_connected and self._failures and self._refusal is not None:
                token = self._refusal.startswith("the trainer token")
                log.warning(
                    "layerscope: %s refused run %s; the run is in %s: upload it %s",
                    self.url,
                    self.hello["run_id"],
                    self.spool.path,
                    # sync reads the token from the environment only (not the process list)
                    f"with the right token: `LAYERSCOPE_TRAINER_TOKEN=T layerscope sync "
                    f"{self.spool.path} --server {self.url}`"
                    if token
                    else f"under another run id with `layerscope sync {self.spool.path}"
                    f" --server {self.url} --run-id NEW`",
                )
                return
            if not self.ever_connected and self._failures:
                # never reached the server: nobody to wait for, the spool has the run
                log.warning(
                    "layerscope: the server at %s was never reached; the run is in %s:"
                    " run `layerscope sync %s --server %s` to upload it",
                    self.url,
                    self.spool.path,
                    self.spool.path,
                    self.url,
                )
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "layerscope: server acked %d of %d frames before close; run "
                    "`layerscope sync %s --server %s` to upload the rest",
                    self.acked_seq,
                    self.last_seq,
                    self.spool.path,
                    self.url,
                )
                return
            self._acked.clear()
            # Short waits so a first connection attempt that fails ends the wait early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), min(left, 0.1))

    # ---- the websocket session ----

    async def _connection(self) -> None:
        assert self.url is not None
        while not self._stopping.is_set():
            try:
                async with connect(
                    self.url,
                    additional_headers=auth_headers(self.token),
                    open_timeout=OPEN_TIMEOUT_S,
                    close_timeout=1.0,
                    max_size=wire.MAX_FRAME_BYTES,
                ) as ws:
                    await self._session(ws)
                reason: str = "the server closed the connection"
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if exc.response.status_code in (401, 403):  # reached, and told no
                    self._refusal = (
                        f"the trainer token was refused (HTTP {exc.response.status_code}): "
                        "check LAYERSCOPE_TRAINER_TOKEN (or watch()'s token=) against the "
                        "server's --trainer-token"
                    )
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            self.connected = False
            if self._stopping.is_set():
                return
            self._failures += 1
            if isinstance(refused := self._refusal, str):
                if not self._outage_warned:
                    self._outage_warned = True
                    log.warning(
                        "layerscope: %s refused run %s: %s. Training continues and the whole "
                        "run stays in %s; retrying in the background",
                        self.url,
                        self.hello["run_id"],
                        refused,
                        self.spool.path,
                    )
            elif not self._outage_warned:
                self._outage_warned = True
                log.warning(
                    "layerscope: no connection to %s (%s); training continues, frames are "
                    "spooled to %s and resent on reconnect",
                    self.url,
                    reason,
                    self.spool.path,
                )
            else:
                log.debug("layerscope: reconnect to %s failed: %s", self.url, reason)
            # Jitter keeps many trainers from reconnecting in lockstep after a restart.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), random.uniform(0.5, 1.0) * self._backoff_s
                )
            self._backoff_s = min(BACKOFF_CAP_S, self._backoff_s * 2)

    async def _session(self, ws: ClientConnection) -> None:
        hello = dict(self.hello, last_acked_seq=self.acked_seq, last_cmd_seq=self.max_cmd_seq)
        await ws.send(encode(hello))
        welcome = wire.decode(await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT_S))
        if welcome["type"] == "error":
            self._refusal = str(welcome.get("message"))
            raise LinkError(f"server refused the run: {welcome.get('message')}")
        self._refusal = None
        if welcome["type"] != "welcome":
            raise LinkError(f"expected welcome, got {welcome['type']!r}")
        acked = welcome.get("acked_seq", 0)
        if isinstance(acked, bool) or not isinstance(acked, int) or acked < 0:
            raise LinkError(f"welcome has a bad acked_seq {acked!r}")
        if acked > self.last_seq:
            log.warning(
                "layerscope: the server already holds %d frames for run %s; this process's "
                "frames repeat those seqs and will be ignored. Use a new run_id.",
                acked,
                self.hello["run_id"],
            )
        self._on_ack(acked)
        self._sent = min(acked, self.last_seq)
        self.connected = self.ever_connected = True
        self._backoff_s = BACKOFF_FIRST_S
        if self._outage_warned:
            self._outage_warned = False
            log.warning("layerscope: connected to %s; resending from seq %d", self.url, acked + 1)
        tasks = [
            asyncio.create_task(self._send_frames(ws)),
            asyncio.create_task(self._receive(ws)),
            asyncio.create_task(self._heartbeat(ws)),
            asyncio.create_task(self._stopping.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc

    async def _send_frames(self, ws: ClientConnection) -> None:
        while True:
            while self._sent < self.last_seq:
                seq = self._sent + 1
                text = self._frame_text(seq)
                if text is not None:
                    await ws.send(text)
                self._sent = seq
            self._new_frame.clear()
            await self._new_frame.wait()

    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                msg = wire.decode(raw)
                kind = msg["type"]
                if kind == "ack":
                    seq = msg.get("seq")
                    if isinstance(seq, int) and not isinstance(seq, bool):
                        self._on_ack(seq)
                elif kind == "command":
                    command = wire.validate_command_frame(msg)
                    self.max_cmd_seq = max(self.max_cmd_seq, command["cmd_seq"])
                    self.on_command(command)
                elif kind == "error":
                    log.warning("layerscope: server says: %s", msg.get("message"))
            except wire.WireError as exc:
                log.warning("layerscope: ignored a bad frame from the server: %s", exc)

    async def _heartbeat(self, ws: ClientConnection) -> None:
        while True:
            await ws.send(encode({"type": "heartbeat", "step": self.step, "status": self.status}))
            await asyncio.sleep(self.heartbeat_s)
