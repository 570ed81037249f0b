"""store — layerscope's record of every run: one SQLite database (WAL) under data_dir.

Owns: the database's lifecycle, the single writer process (store_writer.py, which
group-commits), the two threads that feed it and settle its results, replacing a writer
that died, and the public Store API the rest of the server calls (shapes:
http_api.md). Writes are coroutines that resolve only after the commit that
holds them, so an ack sent on their result is never ahead of the disk. Reads run on
per-thread read connections, each in its own read transaction (a consistent WAL
snapshot) and never wait for the writer.

Never: blocks the event loop on a write (the SQL runs in the writer process), never
loses a committed row to one bad operation (each runs in a savepoint), never keeps
a NaN/Inf (stored as NULL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import orjson
from layerscope.server import queries
from layerscope.server.checks import RunNotFound, StoreError, dumps
from layerscope.server.schema import DB_NAME, SchemaError, connect
from layerscope.server.store_writer import raise_error

__all__ = ["RunNotFound", "Store", "StoreError"]

T = TypeVar("T")
log = logging.getLogger(__name__)
EXPORT_PAGE_FRAMES = 500
SNAPSHOT_EVENTS = 200

_STOP = object()
STOP_TIMEOUT_S = 60.0  # a writer that has not committed and exited by then is killed
RESTART_AFTER_S = 5.0  # a replacement writer dying younger than this is not replaced again
# An operation on its way to the writer process: (id, Writer method, args, urgent:
# commit at once instead of at the group-commit deadline).
_Op = tuple[int, str, tuple[Any, ...], bool]


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the awaiting coroutine was cancelled; the write still happened
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _encode(frame: dict[str, Any]) -> bytes:
    """A validated frame's JSON for the writer process: orjson (a twentieth of a
    millisecond for a 50-layer probe frame, and the writer stores these very bytes),
    json where orjson refuses (an integer past 64 bits)."""
    try:
        return orjson.dumps(frame)
    except (TypeError, orjson.JSONEncodeError):
        return dumps(frame).encode()


class _WriterProcess:
    """One writer process, the queue of operations for it, and the two threads that feed
    it and settle its results. A Store has one at a time; a new one replaces a writer
    that died."""

    def __init__(self) -> None:
        self.queue: queue.Queue[_Op | object] = queue.Queue()
        self.proc: subprocess.Popen[bytes] | None = None
        self.threads: list[threading.Thread] = []
        self.started = 0.0

    def launch(self, path: Path, commit_interval_s: float) -> tuple[Connection, Connection]:
        """Start the process and wait until its database is open; SchemaError or
        StoreError when it cannot be."""
        ops_r, ops_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-P",  # not the server's working directory first on sys.path
                    "-m",
                    "layerscope.server.store_writer",
                    str(path),
                    repr(commit_interval_s),
                    str(ops_r),
                    str(out_w),
                ],
                pass_fds=(ops_r, out_w),
                stdin=subprocess.DEVNULL,
                # Its own session: signals for the server's process group (Ctrl-C, a
                # service manager's SIGTERM) do not reach it; the server stops it in order.
                start_new_session=True,
            )
        except BaseException:
            os.close(ops_w)
            os.close(out_r)
            raise
        finally:
            os.close(ops_r)
            os.close(out_w)
        to_child = Connection(ops_w, readable=False)
        from_child = Connection(out_r, writable=False)
        try:
            first = from_child.recv()
        except Exception as exc:  # EOFError: it exited before it was ready
            self.proc.kill()
            code = self.proc.wait()
            first = ("failed", "store", f"the store's writer process ended (code {code}): {exc!r}")
        if first[0] != "ready":
            to_child.close()
            from_child.close()
            self.proc.wait()
            raise SchemaError(first[2]) if first[1] == "schema" else StoreError(first[2])
        self.started = time.monotonic()
        return to_child, from_child

    def stop(self) -> None:
        """Ask the process to commit what it has and exit; wait for it (killing it after
        STOP_TIMEOUT_S) and then for its threads, which end with it."""
        self.queue.put(_STOP)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("the store's writer process did not stop; killing it")
                self.proc.kill()
                self.proc.wait()
        for thread in self.threads:
            thread.join()


class Store:
    """One SQLite database (WAL) under data_dir: layerscope.db. Writes go to one writer
    process (store_writer.py) that group-commits about every commit_interval_s; each
    write coroutine resolves only after the commit that contains it. Reads use
    connections in this process and never block the writer."""

    def __init__(self, data_dir: Path, *, commit_interval_s: float = 0.1) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self.commit_interval_s = commit_interval_s
        self._writer: _WriterProcess | None = None
        self._writers: list[_WriterProcess] = []  # every one started, replacements included
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._pending_lock = threading.Lock()
        self._next_op = 0
        self._refusing: StoreError | None = None  # set when writes can no longer be taken
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._sparklines: dict[int, tuple[float, list[float | None]]] = {}
        self.commits = 0  # how many group commits so far (tests and benchmarks read it)
        self._commits_before = 0  # commits by writers that died
        self.writer_restarts = 0

    # ---- lifecycle ----

    async def open(self) -> None:
        """Create data_dir and start the writer process (which creates the schema or
        checks its version: SchemaError when it is another's)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        writer = _WriterProcess()
        await asyncio.to_thread(self._start, writer)
        self._writer = writer
        self._writers.append(writer)

    def _start(self, writer: _WriterProcess) -> None:
        to_child, from_child = writer.launch(self.path, self.commit_interval_s)
        writer.threads = [
            threading.Thread(
                target=self._feed, args=(writer, to_child), name="layerscope-store-feed"
            ),
            threading.Thread(
                target=self._receive, args=(writer, from_child), name="layerscope-store-results"
            ),
        ]
        for thread in writer.threads:
            thread.daemon = True
            thread.start()

    async def close(self) -> None:
        """Commit what is queued, stop the writer process, close every connection."""
        with self._pending_lock:
            if self._closed:
                return
            self._closed = True  # from here on no writer is replaced
            writers = list(self._writers)
        # In start order: stopping a writer that died joins the thread that may be starting
        # its replacement, so that one has its process by the time it is stopped.
        for writer in writers:
            await asyncio.to_thread(writer.stop)
        with self._pending_lock:
            self._refusing = self._refusing or StoreError("the store is closed")
        self._fail_pending(str(self._refusing))
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    # ---- the writer process ----

    def _feed(self, writer: _WriterProcess, conn: Connection) -> None:
        """Operations to the writer process in the order they were submitted."""
        try:
            while True:
                item = writer.queue.get()
                if item is _STOP:
                    conn.send(("stop",))
                    return
                assert isinstance(item, tuple)
                op_id, name, args, urgent = item
                try:
                    if name == "append_validated":
                        run_id, frames = args
                        args = (run_id, [_encode(f) for f in frames])
                    message = pickle.dumps(
                        ("op", op_id, name, args, urgent), pickle.HIGHEST_PROTOCOL
                    )
                except Exception as exc:  # an argument that cannot be carried
                    self._settle(op_id, None, StoreError(f"cannot store {name}: {exc}"))
                    continue
                conn.send_bytes(message)
        except OSError:  # the writer process is gone; _receive deals with it
            pass
        finally:
            conn.close()

    def _receive(self, writer: _WriterProcess, conn: Connection) -> None:
        """Results from the writer process, each after the commit that holds it."""
        try:
            while True:
                message = pickle.loads(conn.recv_bytes())
                if message[0] == "stopped":
                    return
                _done, commits, results = message
                self.commits = self._commits_before + commits
                for op_id, result, error in results:
                    self._settle(op_id, result, None if error is None else raise_error(error))
        except (EOFError, OSError):
            self._writer_died(writer)
        finally:
            conn.close()

    def _writer_died(self, writer: _WriterProcess) -> None:
        """Fail the writes it held (none of them was acknowledged, so callers resend) and
        start another writer, unless the store is closing or the last one died young."""
        assert writer.proc is not None
        code = writer.proc.wait()
        why = f"the store's writer process stopped (exit code {code})"
        # A replacement that dies young would die again: stop replacing then.
        young = self.writer_restarts > 0 and time.monotonic() - writer.started < RESTART_AFTER_S
        replacement = None
        with self._pending_lock:
            first_new = self._next_op + 1
            self._commits_before = self.commits
            if self._closed or young:
                self._refusing = StoreError(f"{why}; the store takes no more writes")
            else:
                replacement = _WriterProcess()
                self._writer = replacement  # new writes queue for it while it starts
                self._writers.append(replacement)
        writer.queue.put(_STOP)  # ends the feeder; what it still held is failed below
        log.error("%s%s", why, "; starting another" if replacement else "")
        # It may have died between a commit and its report: a resend is safe (a stored
        # seq or command id is stored once).
        self._fail_pending(
            f"{why}; this write may not have been stored: send it again", below=first_new
        )
        if replacement is None:
            return
        self.writer_restarts += 1  # before it starts: its first results may come at once
        try:
            self._start(replacement)
        except Exception as exc:
            log.exception("could not start another store writer")
            with self._pending_lock:
                self._refusing = StoreError(f"{why}; another could not start: {exc}")
            self._fail_pending(str(self._refusing))

    def _fail_pending(self, message: str, below: int | None = None) -> None:
        """Fail every pending write (those numbered below ``below``), each with its own
        StoreError: one exception raised in many places would keep every traceback."""
        with self._pending_lock:
            ids = [op_id for op_id in self._pending if below is None or op_id < below]
        for op_id in ids:
            self._settle(op_id, None, StoreError(message))

    def _settle(self, op_id: int, result: Any, error: BaseException | None) -> None:
        with self._pending_lock:
            pending = self._pending.pop(op_id, None)
        if pending is None:
            return
        loop, fut = pending
        with contextlib.suppress(RuntimeError):  # that event loop has closed
            loop.call_soon_threadsafe(_settle, fut, result, error)

    async def _submit(self, name: str, *args: Any, urgent: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._pending_lock:
            if self._closed or self._writer is None:
                raise StoreError("the store is not open")
            if self._refusing is not None:
                raise StoreError(str(self._refusing))  # a new one: see _fail_pending
            self._next_op += 1
            op_id = self._next_op
            self._pending[op_id] = (loop, fut)
            self._writer.queue.put((op_id, name, args, urgent))
        return await fut

    # ---- writes (resolve after commit) ----

    async def create_run(
        self,
        run_id: str,
        name: str,
        config: dict[str, Any],
        *,
        status: str = "starting",
        launched: bool = False,
    ) -> None:
        await self._submit("create_run", run_id, name, config, status, launched)

    async def hello(self, hello: dict[str, Any]) -> int:
        """Create or resume the run of a validated hello; returns its acked seq."""
        acked: int = await self._submit("hello", hello)
        return acked

    async def append(
        self, run_id: str, frames: list[dict[str, Any]], *, validated: bool = False
    ) -> int:
        """Store metrics/probe/event frames; returns the highest contiguous committed seq.
        A stored (run_id, seq) is a no-op. validated: every frame is
        wire.parse_trainer_frame's output (ingest's case), so the writer stores its JSON
        without checking it again; otherwise each frame is checked as it is stored."""
        if validated:
            acked: int = await self._submit("append_validated", run_id, frames)
        else:
            acked = await self._submit("append", run_id, frames)
        return acked

    async def set_status(self, run_id: str, status: str, *, reason: str | None = None) -> None:
        await self._submit("set_status", run_id, status, reason)

    async def add_command(
        self, run_id: str, cmd: dict[str, Any], *, origin: str
    ) -> tuple[dict[str, Any], bool]:
        """(row, duplicate): the same id again returns the stored row and True."""
        row, duplicate = await self._submit("add_command", run_id, cmd, origin, urgent=True)
        return row, duplicate

    async def delete_run(self, run_id: str) -> bool:
        deleted: bool = await self._submit("delete_run", run_id)
        return deleted

    # ---- reads ----

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("the store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn inside one read transaction: every query sees the same committed state."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    def acked_seq(self, run_id: str) -> int:
        """Highest contiguous committed seq; 0 for a run not stored yet."""
        return self._read(lambda c: queries.acked_seq(c, run_id))

    def run(self, run_id: str) -> dict[str, Any] | None:
        return self._read(lambda c: queries.run_detail(c, run_id))

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first, each with a loss sparkline (cached per run until it changes)."""

        def read(c: sqlite3.Connection) -> list[dict[str, Any]]:
            out = []
            for row in queries.run_rows(c):
                rk, updated_at = row[0], row[11]
                cached = self._sparklines.get(rk)
                if cached is None or cached[0] != updated_at:
                    cached = (updated_at, queries.sparkline(c, rk))
                    self._sparklines[rk] = cached
                out.append(queries.run_summary(row, cached[1]))
            return out

        return self._read(read)

    def runs_with_status(self, statuses: set[str]) -> list[str]:
        return self._read(lambda c: queries.runs_with_status(c, statuses))

    def commands(self, run_id: str, *, after_cmd_seq: int = 0) -> list[dict[str, Any]]:
        return self._read(lambda c: queries.commands(c, run_id, after_cmd_seq))

    def frames_after(self, run_id: str, seq: int, limit: int | None = None) -> list[dict[str, Any]]:
        """Stored frames with seq > seq, in seq order, as the dicts that were appended."""
        return self._read(lambda c: queries.frames_after(c, run_id, seq, limit))

    def series(
        self,
        run_id: str,
        names: list[str] | None,
        start: int | None = None,
        end: int | None = None,
        max_points: int = 1500,
    ) -> dict[str, dict[str, list[Any]]]:
        return self._read(lambda c: queries.series(c, run_id, names, start, end, max_points))

    def probe_series(
        self,
        run_id: str,
        layer: str,
        stats: list[str],
        start: int | None = None,
        end: int | None = None,
        max_points: int = 1500,
    ) -> dict[str, Any]:
        return self._read(
            lambda c: queries.probe_series(c, run_id, layer, stats, start, end, max_points)
        )

    def probe_matrix(
        self,
        run_id: str,
        stat: str,
        start: int | None = None,
        end: int | None = None,
        max_steps: int = 300,
    ) -> dict[str, Any]:
        return self._read(lambda c: queries.probe_matrix(c, run_id, stat, start, end, max_steps))

    def histograms(
        self,
        run_id: str,
        layer: str,
        start: int | None = None,
        end: int | None = None,
        max_steps: int = 200,
        bins: int = 64,
    ) -> dict[str, Any]:
        return self._read(
            lambda c: queries.histograms(c, run_id, layer, start, end, max_steps, bins)
        )

    def histogram_at(self, run_id: str, step: int) -> dict[str, Any] | None:
        return self._read(lambda c: queries.histogram_at(c, run_id, step))

    def probe_steps(self, run_id: str) -> list[int]:
        return self._read(lambda c: queries.probe_steps(c, run_id))

    def events(
        self, run_id: str, kind: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        return self._read(lambda c: queries.events(c, run_id, kind, limit))

    def export_lines(self, run_id: str) -> Iterator[str]:
        """JSON Lines, each ending in a newline: a hello-like header carrying the run
        detail, then every stored frame in seq order. Raises RunNotFound before the
        first line; reads in pages, so a long run streams without loading it whole."""
        detail = self.run(run_id)
        if detail is None:
            raise RunNotFound(run_id)
        return self._export(detail)

    def _export(self, detail: dict[str, Any]) -> Iterator[str]:
        header = {
            "type": "hello",
            "v": 1,
            "run_id": detail["id"],
            "name": detail["name"],
            "config": detail["config"],
            "layers": detail["layers"],
            "run": detail,
        }
        yield dumps(header) + "\n"
        seq = 0
        while True:
            page = self.frames_after(detail["id"], seq, EXPORT_PAGE_FRAMES)
            for frame in page:
                yield dumps({"v": 1, **frame}) + "\n"
            if len(page) < EXPORT_PAGE_FRAMES:
                return
            seq = page[-1]["seq"]

    def snapshot(self, run_id: str, *, max_points: int = 500) -> dict[str, Any]:
        """The viewer's snapshot body (http_api.md) minus trainer_connected: the run, every
        series downsampled to max_points, the last probe frame, the newest events, all
        commands, the acknowledged control state, and last_seq = the acked seq (a viewer
        that reconnects with after_seq=last_seq misses nothing)."""

        def read(c: sqlite3.Connection) -> dict[str, Any]:
            detail = queries.run_detail(c, run_id)
            if detail is None:
                raise RunNotFound(run_id)
            rk = queries.run_key(c, run_id)
            probe = queries.last_probe_frame(c, rk)
            return {
                "type": "snapshot",
                "run": detail,
                "series": queries.series(c, run_id, None, None, None, max_points),
                "probes": [] if probe is None else [probe],
                "events": queries.events(c, run_id, None, SNAPSHOT_EVENTS),
                "commands": queries.commands(c, run_id, 0),
                "control": detail["control"],
                "last_seq": detail["acked_seq"],
            }

        return self._read(read)
