"""store_writer — the store's writer process: every write to layerscope.db, group-committed.

Owns: the one writer connection, the group commit (operations arriving within
``commit_interval_s`` of the last commit share the next one; an urgent one commits at
once), a savepoint per operation, and reporting each operation's result only after the
commit that holds it. Store (store.py) starts it with ``python -m`` and speaks to it
over two pipes: pickled ``("op", id, name, args, urgent)`` / ``("stop",)`` in, and
``("ready", note)`` (note: a schema upgrade for the log, or None) or ``("failed", kind,
message)`` once, then ``("done", commits, [(id, result, error)], fault)`` per commit and
``("stopped",)`` out. ``fault`` is None when the batch committed and nothing in it failed
for the database's sake, else ``(sqlite error name, message)`` (fault_of): the disk is
full, an I/O error, the file is damaged, or the commit failed; the server says so on
/healthz until a later batch commits.

Between batches, and while no operation is waiting, it purges deleted runs' rows a
slice at a time (purge.Purge), each slice its own commit: a big run's delete holds
another run's commit back by one slice at most.

Why a process: the server's event loop (socket, JSON decode, validation, fan-out) and
the writer (rows, SQL) shared one GIL, which capped ingest near 400 probe frames/s on
two cores; apart, each has a core.

Never: outlives the server (the end of its input pipe ends it, after committing what
it applied), takes signals meant for the server (it runs in its own session and ignores
SIGINT; the server stops it in order), or reports an operation before its commit.
"""

from __future__ import annotations

import contextlib
import gc
import pickle
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from layerscope.server.checks import RunIdTaken, RunNotFound, StoreError, json_value
from layerscope.server.schema import SchemaError, connect, open_schema
from layerscope.server.writes import Writer

# Container allocations between young collections (CPython's default is 700), here and
# in the server process (serving.tune_runtime).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """For a process holding many decoded frames until their commit (the server's and
    this one; serving.tune_runtime says why): the objects alive now (imports, framework)
    leave every later collection, and the young generation waits for GC_YOUNG_THRESHOLD
    allocations, so most frames are freed by reference counts before a collection."""
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


# After a purge slice fails (its rows stay, rolled back), the next is tried this much later.
PURGE_RETRY_S = 5.0

# What an operation reports: (id, result, error); error is None or (kind, message, run_id).
Result = tuple[int, Any, tuple[str, str, str] | None]


def _append_validated(w: Writer, run_id: str, encoded: list[bytes]) -> int:
    """Frames the server validated, as its checks.json_bytes encoded them."""
    return w.append(run_id, [json_value(b) for b in encoded], encoded)


OPS: dict[str, Callable[..., Any]] = {
    "create_run": Writer.create_run,
    "hello": Writer.hello,
    "set_status": Writer.set_status,
    "add_command": Writer.add_command,
    "delete_run": Writer.delete_run,
    "append": Writer.append,
    "append_validated": _append_validated,
}


# SQLite's primary result codes that say the database cannot be written (not that one
# operation was refused): the disk is full, an I/O error, a damaged or foreign file, a
# read-only one, one it cannot open.
FAULT_CODES = {
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
}
# Of those, the ones that say the file itself is damaged: no later write can mend it.
DAMAGE_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
Fault = tuple[str, str]  # (SQLite's error name, its message)


def fault_of(exc: BaseException) -> Fault | None:
    """(``SQLITE_FULL``..., "database or disk is full") when exc says the database cannot
    be written (FAULT_CODES), else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.Error) or not isinstance(code, int):
        return None
    if code & 0xFF not in FAULT_CODES:
        return None
    return (str(getattr(exc, "sqlite_errorname", "") or "SQLITE_ERROR"), str(exc))


def is_damage(fault: Fault) -> bool:
    """Whether a fault_of says the database file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB)."""
    return fault[0].startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def error_of(exc: BaseException, what: str = "write") -> tuple[str, str, str]:
    if isinstance(exc, RunNotFound):
        return ("not_found", str(exc), exc.run_id)
    if isinstance(exc, RunIdTaken):
        return ("run_id_taken", str(exc), exc.run_id)
    if isinstance(exc, StoreError):
        return ("store", str(exc), "")
    return ("store", f"{what} failed, nothing of it was stored: {type(exc).__name__}: {exc}", "")


def exception_of(error: tuple[str, str, str]) -> BaseException:
    """The exception an error tuple stands for, in the server process."""
    kind, message, run_id = error
    if kind == "not_found":
        return RunNotFound(run_id)
    if kind == "run_id_taken":
        return RunIdTaken(run_id)
    return StoreError(message)


class _Batcher:
    def __init__(self, writer: Writer, ops: Connection, out: Connection, interval: float) -> None:
        self.writer = writer
        self.ops = ops
        self.out = out
        self.interval = interval
        self.commits = 0
        self.last_commit = 0.0
        self.purge_after = 0.0  # no purge slice before this (monotonic), after one failed
        self.fault: Fault | None = None  # the batch's first fault_of, reported with it

    def receive(self, timeout: float | None) -> tuple[Any, ...] | None:
        """The next message; None when none came in time; ("eof",) when the server is gone."""
        try:
            if timeout is not None and not self.ops.poll(max(0.0, timeout)):
                return None
            message: tuple[Any, ...] = pickle.loads(self.ops.recv_bytes())
            return message
        except (EOFError, OSError):
            return ("eof",)

    def run(self) -> None:
        while True:
            message = self.receive(self.purge_wait())
            if message is None:  # nothing to do but purge
                self.purge()
                continue
            if message[0] != "op":
                break
            # A stop (or the end of input) that arrived during a batch ends the loop.
            ending = self.batch(message)
            if ending is not None:
                message = ending
                break
            if self.purge_wait() == 0.0:  # under load too, one slice between batches
                self.purge()
        if message[0] == "stop":
            self.out.send(("stopped",))

    def purge_wait(self) -> float | None:
        """How long to wait for an operation before the next purge slice (None: no purge)."""
        if not self.writer.purge.pending:
            return None
        return max(0.0, self.purge_after - time.monotonic())

    def purge(self) -> None:
        """One slice of a deleted run's rows, committed on its own. Not a group commit:
        the next batch's deadline does not move for it, and ``commits`` does not count it."""
        conn = self.writer.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self.writer.purge.slice()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.purge_after = time.monotonic() + PURGE_RETRY_S
            print(
                f"layerscope: purging a deleted run's rows failed ({exc});"
                f" trying again in {PURGE_RETRY_S:g} s",
                file=sys.stderr,
            )

    def batch(self, message: tuple[Any, ...]) -> tuple[str] | None:
        """Apply message and whatever else arrives before the deadline, commit once, then
        report. Returns ("stop",) or ("eof",) when that arrived meanwhile."""
        conn = self.writer.conn
        # Commits are rate-limited, not delayed: after a quiet spell the first write
        # commits at once; under load, writes within the interval share the next one.
        deadline = max(time.monotonic(), self.last_commit + self.interval)
        done: list[Result] = []
        ending: tuple[str] | None = None
        self.fault = None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", None) or "SQLITE_ERROR"
            fault = fault_of(exc) or (str(name), str(exc))
            error = error_of(exc, "start")
            self.out.send(("done", self.commits, [(message[1], None, error)], fault))
            return None
        while True:
            _kind, op_id, name, args, urgent = message
            done.append((op_id, *self.apply(name, args)))
            if urgent or not conn.in_transaction:
                # A command is relayed to the trainer only once stored: commit it now. An
                # error SQLite answered by rolling the whole batch back (a full disk, an
                # I/O error) ends it: an operation after it would be applied on its own.
                break
            got = self.receive(deadline - time.monotonic())
            if got is None:
                break
            if got[0] != "op":
                ending = got
                break
            message = got
        try:
            if not conn.in_transaction:
                why = self.fault[1] if self.fault is not None else "it was rolled back"
                raise sqlite3.OperationalError(why)
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.writer.forget()
            failure = ("store", f"commit failed, nothing of this batch was stored: {exc}", "")
            done = [(op_id, None, err or failure) for op_id, _r, err in done]
            # Any failed commit is the store's problem, not one operation's.
            name = getattr(exc, "sqlite_errorname", None) or "SQLITE_ERROR"
            self.fault = self.fault or fault_of(exc) or (str(name), str(exc))
        self.last_commit = time.monotonic()
        # After an EOF the server's feeder is gone, but the server may still be reading;
        # if it is gone too, the next receive says so.
        report = ("done", self.commits, done, self.fault)
        with contextlib.suppress(OSError):
            self.out.send_bytes(pickle.dumps(report, pickle.HIGHEST_PROTOCOL))
        return ending

    def apply(self, name: str, args: tuple[Any, ...]) -> tuple[Any, tuple[str, str, str] | None]:
        conn = self.writer.conn
        conn.execute("SAVEPOINT op")
        try:
            result = OPS[name](self.writer, *args)
        except Exception as exc:
            self.fault = self.fault or fault_of(exc)
            if conn.in_transaction:  # else SQLite rolled the whole batch back: batch() sees it
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            self.writer.forget()
            return None, error_of(exc)
        conn.execute("RELEASE op")
        return result, None


def serve(path: Path, interval: float, ops: Connection, out: Connection) -> None:
    try:
        conn = connect(path, readonly=False)
        try:
            note = open_schema(conn, path)
        except BaseException:
            conn.close()
            raise
    except SchemaError as exc:
        out.send(("failed", "schema", str(exc)))
        return
    except Exception as exc:
        out.send(("failed", "store", f"could not open {path}: {type(exc).__name__}: {exc}"))
        return
    out.send(("ready", note))
    try:
        _Batcher(Writer(conn), ops, out, interval).run()
    finally:
        conn.close()


def main(argv: list[str]) -> None:
    """argv: database path, commit interval (s), input fd, output fd."""
    # Started in its own session, so the terminal's Ctrl-C does not reach it; a SIGINT sent
    # to it alone is ignored too: the server stops this process in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A batch's frames (hundreds of dicts each) live until its commit.
    tune_gc()
    path, interval, fd_in, fd_out = argv
    ops = Connection(int(fd_in), writable=False)
    out = Connection(int(fd_out), readable=False)
    with contextlib.suppress(BrokenPipeError, EOFError):  # the server is gone
        serve(Path(path), float(interval), ops, out)


if __name__ == "__main__":
    main(sys.argv[1:])
