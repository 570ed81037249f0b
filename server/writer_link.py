"""writer_link — the server's side of the store's writer process (store_writer.py).

Owns: starting the writer process and waiting until its database is open, the queue of
write operations and the feeder thread that pickles them down its pipe (validated
frames as orjson bytes, which the writer also stores), the results thread that settles
each operation's future after the commit that holds it, replacing a writer that died
(the writes it held fail with a clear error; none was acknowledged: at once after one
that had lived, then after a backoff, 1 s doubling to ``RESTART_CAP_S``, while each
replacement dies young or cannot start, refusing writes meanwhile: ``refusing`` says
why, for ``/healthz``), what the writer's commits say of the database (``failing``: the
disk is full or an I/O error, from a failed batch until one commits FAILING_CLEAR_S after
the last that failed; writes are still sent, so once they fit again it clears. ``damaged``: SQLITE_CORRUPT, or ``mark_damaged``
after a check found the file damaged; from then on every write is refused, so nothing more
goes into a damaged file), and stopping it in order (queued writes committed, then the
process waited for, killed after ``STOP_TIMEOUT_S``).

Never: blocks the event loop (pipes are the threads' business), resolves a write before
its commit, or raises one exception instance in many places (each failed write gets its
own StoreError).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from layerscope.server.checks import StoreError, json_bytes
from layerscope.server.schema import SchemaError
from layerscope.server.store_writer import Fault, exception_of, is_damage

log = logging.getLogger(__name__)

_STOP = object()
STOP_TIMEOUT_S = 60.0  # a writer that has not committed and exited by then is killed
# A writer that lived this long is replaced at once; a younger one (or one that could not
# start) after RESTART_FIRST_S, doubling each time up to RESTART_CAP_S: one that dies at
# once (a full disk, a database it cannot open) is retried without spinning.
RESTART_AFTER_S = 5.0
RESTART_FIRST_S = 1.0
RESTART_CAP_S = 30.0
# ``failing`` is cleared once a batch has committed since the last failed one and none has
# failed for this long: on a full disk a small commit (a trainer's hello, in WAL space
# freed by a checkpoint) fits while its frames do not, so one commit that fits does not
# mean the store stores again; nor does an idle server stay failing for good after one.
FAILING_CLEAR_S = 5.0
# An operation on its way to the writer process: (id, Writer method, args, urgent:
# commit at once instead of at the group-commit deadline).
_Op = tuple[int, str, tuple[Any, ...], bool]


def damage_message(path: Path, what: str) -> str:
    """Why writes are refused once the database at ``path`` is found damaged (``what``:
    what found it, and SQLite's words)."""
    return (
        f"the database {path} is damaged ({what}); layerscope stores nothing more in it:"
        " stop the server, then restore it from a backup or move it away"
    )


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the awaiting coroutine was cancelled; the write still happened
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


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
        if first[1] is not None:  # it upgraded the database's schema: the log says so
            log.warning("layerscope: %s", first[1])
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


class WriterLink:
    """One writer process at a time (a replacement after one died), fed by one thread and
    read by another; ``submit`` is the only way a write reaches the database."""

    def __init__(self, path: Path, commit_interval_s: float) -> None:
        self.path = path
        self.commit_interval_s = commit_interval_s
        self._writer: _WriterProcess | None = None
        self._writers: list[_WriterProcess] = []  # every one started, replacements included
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._pending_lock = threading.Lock()
        self._next_op = 0
        self._refusing: str | None = None  # why writes cannot be taken now
        self._failing: str | None = None  # why batches do not commit (None: they do)
        self._committed_since_failure = False
        self.failed_at = 0.0  # when the last batch failed (monotonic)
        self.clear_after_s = FAILING_CLEAR_S
        self.damaged: str | None = None  # why the database is damaged: writes refused for good
        self._closed = False
        self._closing = threading.Event()  # wakes a replacement's backoff wait
        self._backoff = 0.0  # before the next replacement starts (0: at once)
        self.commits = 0  # how many group commits so far (tests and benchmarks read it)
        self._commits_before = 0  # commits by writers that died
        self.writer_restarts = 0

    @property
    def refusing(self) -> str | None:
        """Why writes are refused now (no writer: closed, or waiting to start another), or
        None while they are taken."""
        with self._pending_lock:
            if self.damaged is not None:
                return self.damaged
            if self._refusing is None and self._writer is None:
                return "the store is not open"
            return self._refusing

    def mark_damaged(self, why: str) -> None:
        """The database is damaged (``why``: what says so and where): every write from now on
        is refused with it, and those waiting fail, none acknowledged (their senders keep
        them). The first reason stays."""
        with self._pending_lock:
            if self.damaged is not None:
                return
            self.damaged = why
        log.error("layerscope: %s", why)
        self._fail_pending(why)

    @property
    def failing(self) -> str | None:
        """Why batches do not commit, or None while they do: set by a failed batch, cleared
        once one has committed since and none has failed for clear_after_s (read lazily,
        so a server that goes idle after it recovered is not failing for good)."""
        why = self._failing
        if (
            why is not None
            and self._committed_since_failure
            and time.monotonic() - self.failed_at >= self.clear_after_s
        ):
            self._failing = None
            log.warning("layerscope: the store commits again (it could not: %s)", why)
            return None
        return why

    def _note_fault(self, fault: Fault | None) -> None:
        """A batch's outcome: None (it committed) counts toward clearing ``failing``; a
        fault sets it, or marks the database damaged."""
        if fault is None:
            if self._failing is not None:
                self._committed_since_failure = True
            return
        self.failed_at = time.monotonic()
        self._committed_since_failure = False
        if is_damage(fault):
            self.mark_damaged(damage_message(self.path, f"a write: {fault[1]}"))
            return
        why = f"cannot store: {fault[1]} at {self.path.parent}"
        if why != self._failing:
            log.error("layerscope: %s; writes are retried as trainers resend them", why)
        self._failing = why

    @property
    def pid(self) -> int | None:
        """The current writer process's pid (None before open or while one starts)."""
        writer = self._writer
        return writer.proc.pid if writer is not None and writer.proc is not None else None

    async def open(self) -> None:
        """Start the writer process (which creates the schema, upgrades an older one after
        copying it, or refuses a newer one: SchemaError)."""
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
        """Commit what is queued and stop the writer process; later writes are refused."""
        with self._pending_lock:
            if self._closed:
                return
            self._closed = True  # from here on no writer is replaced
            writers = list(self._writers)
        self._closing.set()  # a replacement waiting out its backoff gives up now
        # In start order: stopping a writer that died joins the thread that may be starting
        # its replacement, so that one has its process by the time it is stopped.
        for writer in writers:
            await asyncio.to_thread(writer.stop)
        with self._pending_lock:
            self._refusing = self._refusing or "the store is closed"
        self._fail_pending(self._refusing)

    # ---- feeding it, reading its results, replacing it ----

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
                        # The writer stores these very bytes as the frames' bodies.
                        args = (run_id, [json_bytes(f) for f in frames])
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
                _done, commits, results, fault = message
                self.commits = self._commits_before + commits
                self._note_fault(fault)  # before the writes fail: their handlers read it
                for op_id, result, error in results:
                    self._settle(op_id, result, None if error is None else exception_of(error))
        except (EOFError, OSError):
            self._writer_died(writer)
        finally:
            conn.close()

    def _writer_died(self, writer: _WriterProcess) -> None:
        """Fail the writes it held (none of them was acknowledged, so callers resend) and
        start another writer, unless the store is closing."""
        assert writer.proc is not None
        code = writer.proc.wait()
        why = f"the store's writer process stopped (exit code {code})"
        if time.monotonic() - writer.started >= RESTART_AFTER_S:
            self._backoff = 0.0  # it had lived: its replacement starts at once
        with self._pending_lock:
            first_new = self._next_op + 1
            self._commits_before = self.commits
            # From here no write is queued for the dead writer: new ones wait for its
            # replacement when that starts at once, and are refused until one starts else.
            replacement = self._assign() if self._backoff == 0 else None
            if replacement is None:  # _replace waits self._backoff first: say so already
                self._refusing = (
                    f"{why}; the store takes no writes until another starts"
                    f" (in {self._backoff:g} s)"
                )
        writer.queue.put(_STOP)  # ends the feeder; what it still held is failed below
        # It may have died between a commit and its report: a resend is safe (a stored
        # seq or command id is stored once).
        self._fail_pending(
            f"{why}; this write may not have been stored: send it again", below=first_new
        )
        self._replace(why, replacement)

    def _assign(self) -> _WriterProcess | None:
        """(With _pending_lock held.) A new writer, which takes every write from now on
        while it starts; None once the store is closing."""
        if self._closed:
            self._refusing = self._refusing or "the store is closed"
            return None
        replacement = _WriterProcess()
        self._refusing = None
        self._writer = replacement
        self._writers.append(replacement)
        return replacement

    def _refuse(self, why: str) -> None:
        with self._pending_lock:
            self._refusing = why
        self._fail_pending(why)

    def _replace(self, why: str, replacement: _WriterProcess | None) -> None:
        """Start writers until one runs or the store closes: ``replacement`` (assigned
        already) at once, else after the backoff, which doubles while replacements die
        young or cannot start. Meanwhile every write is refused at once (a trainer's link
        reconnects and resends later) instead of waiting on a writer that may never come."""
        died = why
        while True:
            delay = self._backoff
            self._backoff = min(RESTART_CAP_S, max(RESTART_FIRST_S, 2 * delay))
            if replacement is None:
                if self._closed:
                    break
                log.error("%s; starting another in %g s", why, delay)
                self._refuse(
                    f"{why}; the store takes no writes until another starts (in {delay:g} s)"
                )
                self._closing.wait(delay)
                with self._pending_lock:
                    replacement = self._assign()
                if replacement is None:
                    break
            else:
                log.error("%s; starting another", why)
            self.writer_restarts += 1  # before it starts: its first results may come at once
            try:
                self._start(replacement)
                return
            except Exception as exc:
                log.error("could not start another store writer: %s", exc)
                why = f"{died}; another could not start: {exc}"
                self._refuse(why)
                replacement = None
        self._fail_pending("the store is closed")

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

    async def submit(self, name: str, *args: Any, urgent: bool = False) -> Any:
        """Run Writer.<name>(*args) in the writer process; resolves after its commit."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._pending_lock:
            if self._closed or self._writer is None:
                raise StoreError("the store is not open")
            if self.damaged is not None:
                raise StoreError(self.damaged)
            if self._refusing is not None:
                raise StoreError(self._refusing)  # a new one each time: see _fail_pending
            self._next_op += 1
            op_id = self._next_op
            self._pending[op_id] = (loop, fut)
            self._writer.queue.put((op_id, name, args, urgent))
        return await fut
