"""store — layerscope's record of every run: one SQLite database (WAL) under data_dir.

Owns: the database's lifecycle (with the data directory's lock, data_lock.py: one
server per data directory) and the public Store API the rest of the server calls
(shapes: http_api.md). Writes go through writer_link.py to the single writer process
(store_writer.py, which group-commits); they are coroutines that resolve only after the
commit that holds them, so an ack sent on their result is never ahead of the disk.
Reads run on per-thread read connections, each in its own read transaction (a
consistent WAL snapshot), and never wait for the writer. An event the server records of
its own (a command stored, a status it set) is handed, once committed, to each
listener (``listen``: the hub, which shows it to the run's viewers at once).

Faults: ``write_problem`` says why the store cannot store now (for /healthz): a writer
that died, commits failing (a full disk, an I/O error: until one commits again), or a
damaged database. The database is checked in the background after it opens (``PRAGMA
quick_check``, in its own thread: it reads the whole file, seconds per GB), and any read
or write SQLite answers with SQLITE_CORRUPT marks it damaged too; from then on every write
is refused (nothing more goes into the damaged file), and a read that meets the damage
raises DatabaseDamaged (the app answers 503). A run whose write failed for one of these
reasons gets a ``store`` event (not stored: the store cannot) naming it, and another with
``problem`` null once the store stores again; a snapshot carries ``store_problem``.

Never: blocks the event loop on a write (the SQL runs in the writer process), never
loses a committed row to one bad operation (each runs in a savepoint), never keeps
a NaN/Inf (stored as NULL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from layerscope.server import queries
from layerscope.server.checks import RunNotFound, StoreError, dumps
from layerscope.server.data_lock import DataDirLock
from layerscope.server.schema import DB_NAME, connect
from layerscope.server.store_writer import DAMAGE_CODES
from layerscope.server.writer_link import WriterLink, damage_message
from layerscope.server.writes import Acked

__all__ = ["DatabaseDamaged", "ExportCutShort", "RunNotFound", "Store", "StoreError"]

T = TypeVar("T")
log = logging.getLogger(__name__)
EXPORT_PAGE_FRAMES = 500
SNAPSHOT_EVENTS = 200
# How long after the database opens its background quick_check starts: a server's first
# seconds (trainers reconnecting after a restart) are not slowed by a read of every page.
CHECK_DELAY_S = 1.0


class DatabaseDamaged(StoreError):
    """A read met a damaged database (SQLITE_CORRUPT): the message says where and what to do."""


class ExportCutShort(Exception):
    """An export could not read all of its run: its last line says why. Not a StoreError:
    it comes after the response started, so no handler can answer it."""


def damage_of(exc: BaseException) -> bool:
    """Whether exc is SQLite saying the database file is damaged (or not a database)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.DatabaseError)
        and isinstance(code, int)
        and (code & 0xFF in DAMAGE_CODES)
    )


def store_event(problem: str | None) -> dict[str, Any]:
    """The server event a run's viewers get when the store cannot store its writes
    (``problem``: why, as /healthz says it), or can again (null). Not stored."""
    return {
        "seq": None,
        "step": None,
        "kind": "store",
        "origin": "server",
        "data": {"problem": problem},
        "created_at": time.time(),
    }


class Store:
    """One SQLite database (WAL) under data_dir: layerscope.db. Writes go to one writer
    process (store_writer.py) that group-commits about every commit_interval_s; each
    write coroutine resolves only after the commit that contains it. Reads use
    connections in this process and never block the writer."""

    def __init__(self, data_dir: Path, *, commit_interval_s: float = 0.1) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self.commit_interval_s = commit_interval_s
        self._writes = WriterLink(self.path, commit_interval_s)
        self._lock = DataDirLock(self.data_dir)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._sparklines: dict[int, tuple[float, list[float | None]]] = {}
        # Per run: its stored config text and the part of it the run list shows.
        self._list_configs: dict[int, tuple[str, dict[str, Any]]] = {}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        # The write problem the runs in _told were last told of (store_event), and them.
        self._told_problem: str | None = None
        self._told: set[str] = set()
        self._recheck_due = False  # a look at whether the told problem is over is scheduled
        self._check: threading.Thread | None = None
        self._closing = threading.Event()  # wakes the check's wait to start
        self._check_conn: sqlite3.Connection | None = None
        self.check_delay_s = CHECK_DELAY_S
        self.checked: str | None = None  # the background check's outcome ("ok" or why not)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----

    async def open(self) -> None:
        """Create data_dir, take its lock (DataDirBusy while another server holds it; held
        until close) and start the writer process (which creates the schema, upgrades an
        older one after copying it, or refuses a newer one: SchemaError)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._lock.acquire()
        try:
            await self._writes.open()
        except BaseException:
            self._lock.release()
            raise
        self._check = threading.Thread(
            target=self._check_database, name="layerscope-store-check", daemon=True
        )
        self._check.start()

    def _check_database(self) -> None:
        """PRAGMA quick_check on a read-only connection of its own (a consistent snapshot; it
        never holds the writer back); damage found marks the store damaged (mark_damaged).
        Interrupted by close."""
        if self._closing_wait(self.check_delay_s):
            return
        try:
            conn = connect(self.path, readonly=True)
        except sqlite3.Error as exc:
            self.checked = f"could not check: {exc}"
            return
        with self._readers_lock:
            if self._closed:
                conn.close()
                return
            self._check_conn = conn
        started = time.monotonic()
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as exc:
            if self._closed:  # interrupted by close
                return
            if damage_of(exc):
                self.mark_damaged(f"PRAGMA quick_check: {exc}")
            else:
                log.warning("layerscope: checking %s failed: %s", self.path, exc)
            self.checked = str(exc)
            return
        finally:
            with self._readers_lock:
                self._check_conn = None
            conn.close()
        found = [str(row[0]) for row in rows]
        if found == ["ok"]:
            self.checked = "ok"
            log.info("layerscope: %s checked in %.1f s", self.path, time.monotonic() - started)
            return
        # one row may hold many lines ("*** in database main ***", then a line a damaged
        # page): the first problem said, the rest counted (a 5 KB, 101-line reason was
        # /healthz's answer, the log line and the run page's banner)
        lines = [
            line.strip()
            for row in found
            for line in row.splitlines()
            if line.strip() and not line.strip().startswith("***")
        ] or found
        more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
        self.checked = lines[0][:200]
        self.mark_damaged(f"PRAGMA quick_check: {lines[0][:200]}{more}")

    def _closing_wait(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when the store closed meanwhile."""
        return self._closing.wait(seconds)

    def mark_damaged(self, what: str) -> None:
        """The database is damaged (``what`` says what found it): every write is refused from
        now on, /healthz answers 503 with why, and the runs told of write problems are
        told. The first reason stays."""
        self._writes.mark_damaged(damage_message(self.path, what))
        self._tell_soon()

    def _tell_soon(self) -> None:
        """_note_problem on the event loop (listeners run there), from any thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(self._note_problem, None)

    async def close(self) -> None:
        """Commit what is queued, stop the writer process, close every connection."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        with self._readers_lock:
            if self._check_conn is not None:
                self._check_conn.interrupt()
        if self._check is not None:
            await asyncio.to_thread(self._check.join)
        await self._writes.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._lock.release()  # last: its writer has stopped and committed

    @property
    def commits(self) -> int:
        """How many group commits so far (tests and benchmarks read it)."""
        return self._writes.commits

    @property
    def write_problem(self) -> str | None:
        """Why the store cannot store writes now, or None while it can: the database is
        damaged (for good), its writer process died and another has not started yet, it is
        not open, or its commits fail (``cannot store: database or disk is full at
        <data dir>``: until one commits again)."""
        return self._writes.refusing or self._writes.failing

    @property
    def writer_restarts(self) -> int:
        """How many times a writer process that died was replaced."""
        return self._writes.writer_restarts

    async def _submit(
        self, name: str, *args: Any, urgent: bool = False, run_id: str | None = None
    ) -> Any:
        """Writer.<name>(*args) once committed; the run's viewers are told (store_event)
        when it fails for the store's sake, and when the store stores again."""
        try:
            result = await self._writes.submit(name, *args, urgent=urgent)
        except StoreError:
            self._note_problem(run_id)
            raise
        if self._told_problem is not None:
            self._note_problem(run_id)
        return result

    def _note_problem(self, run_id: str | None) -> None:
        """Tell the run (and every run told before) the store's write problem when it is new
        to them: a ``store`` event with it, or with null once it is gone. On the event loop."""
        problem = None if self._closed else self.write_problem
        if problem == self._told_problem:
            if problem is None or run_id is None or run_id in self._told:
                return
            tell = {run_id}
        else:
            tell = set(self._told) | ({run_id} if run_id is not None and problem else set())
            self._told_problem = problem
        self._told = (self._told | tell) if problem is not None else set()
        for each in sorted(tell):
            self._recorded(each, [store_event(problem)])
        if problem is not None and self._loop is not None and not self._recheck_due:
            # the problem may end with no write after it (a server gone idle once a trainer
            # resent and finished): look again, so its runs' pages are told it is over
            self._recheck_due = True
            self._loop.call_later(self._writes.clear_after_s + 0.5, self._recheck_problem)

    def _recheck_problem(self) -> None:
        self._recheck_due = False
        if self._told_problem is not None and self.write_problem != self._told_problem:
            self._note_problem(None)
        elif self._told_problem is not None and not self._closed and self._loop is not None:
            self._recheck_due = True
            self._loop.call_later(self._writes.clear_after_s + 0.5, self._recheck_problem)

    def listen(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """``listener(run_id, event)`` for every server event once it is committed (the
        event as GET /events lists it), called on the event loop, once per event and in
        the order stored (one write may record several: a run that ends settles each of
        its pending commands); a listener that raises is logged and the write still
        succeeds, and the events after it are still handed on."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def _recorded(self, run_id: str, events: Sequence[dict[str, Any]]) -> None:
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(run_id, event)
                except Exception:
                    log.exception("a listener failed on run %s's %s event", run_id, event["kind"])

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
        await self._submit("create_run", run_id, name, config, status, launched, run_id=run_id)

    async def hello(self, hello: dict[str, Any]) -> int:
        """Create or resume the run of a validated hello; returns its acked seq."""
        acked, events = await self._submit("hello", hello, run_id=hello["run_id"])
        self._recorded(hello["run_id"], events)
        return int(acked)

    async def append(
        self, run_id: str, frames: list[dict[str, Any]], *, validated: bool = False
    ) -> int:
        """Store metrics/probe/event frames; returns the highest contiguous committed seq.
        A stored (run_id, seq) is a no-op. validated: every frame is
        wire.parse_trainer_frame's output (ingest's case), so the writer stores its JSON
        without checking it again; otherwise each frame is checked as it is stored. The
        server events the frames caused (a status that ends the run settles its pending
        commands) go to the listeners."""
        if validated:
            acked: int = await self._submit("append_validated", run_id, frames, run_id=run_id)
        else:
            acked = await self._submit("append", run_id, frames, run_id=run_id)
        if isinstance(acked, Acked):
            self._recorded(run_id, acked.events)
            return int(acked)
        return acked

    async def set_status(self, run_id: str, status: str, *, reason: str | None = None) -> None:
        self._recorded(
            run_id, await self._submit("set_status", run_id, status, reason, run_id=run_id)
        )

    async def add_command(
        self, run_id: str, cmd: dict[str, Any], *, origin: str
    ) -> tuple[dict[str, Any], bool]:
        """(row, duplicate): the same id again returns the stored row and True."""
        row, duplicate, events = await self._submit(
            "add_command", run_id, cmd, origin, urgent=True, run_id=run_id
        )
        self._recorded(run_id, events)
        return row, duplicate

    async def delete_run(self, run_id: str) -> bool:
        """False when there is no such run. Once it resolves the run is gone for every
        read and write (and its id free); its rows are purged in the writer's spare
        time, a slice per commit (``deletions_pending`` counts the runs not purged yet)."""
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
        """fn inside one read transaction: every query sees the same committed state. A read
        that meets a damaged database marks the store damaged and raises DatabaseDamaged."""
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if not damage_of(exc):
                raise
            self._damaged_read(exc)
            raise DatabaseDamaged(self.write_problem or str(exc)) from None
        except zlib.error as exc:
            # a stored frame whose bytes SQLite reads back but that no longer decompress:
            # damage inside a page (its b-tree intact) that only the data itself shows
            self._damaged_read(RuntimeError(f"a stored frame does not decompress ({exc})"))
            raise DatabaseDamaged(self.write_problem or str(exc)) from None

    def _damaged_read(self, exc: BaseException) -> None:
        """A read met damage: the store refuses writes from now on (mark_damaged). Called
        from a thread of the threadpool too: the runs' store events go through the loop."""
        if self._writes.damaged is None:
            self.mark_damaged(f"a read: {exc}")

    def run_names_starting(self, prefix: str) -> list[str]:
        """Every stored run's name that starts with ``prefix`` (the launcher numbers a
        launch whose name a run already has)."""
        return self._read(lambda c: queries.names_starting(c, prefix))

    def acked_seq(self, run_id: str) -> int:
        """Highest contiguous committed seq; 0 for a run not stored yet."""
        return self._read(lambda c: queries.acked_seq(c, run_id))

    def run(self, run_id: str) -> dict[str, Any] | None:
        return self._read(lambda c: queries.run_detail(c, run_id))

    def has_run(self, run_id: str) -> bool:
        """Whether a run with this id is stored (a deleted one is not: its row is gone)."""
        return self._read(lambda c: queries.has_run(c, run_id))

    def clock(self, run_id: str) -> dict[str, Any] | None:
        """The trainer's clock at the run's first and last step (queries.clock), or None."""
        return self._read(lambda c: queries.clock(c, run_id))

    def runs(
        self, limit: int | None = None, offset: int = 0, *, full_config: bool = True
    ) -> list[dict[str, Any]]:
        """Runs, newest first (``limit`` of them after the first ``offset``; all when limit
        is None), each with a loss sparkline (cached per run until it changes). Without
        full_config each config is what the runs page shows of it (queries.list_config)."""
        return self.run_page(limit, offset, full_config=full_config)[0]

    def run_page(
        self,
        limit: int | None = None,
        offset: int = 0,
        *,
        full_config: bool = True,
        words: Sequence[str] = (),
    ) -> tuple[list[dict[str, Any]], int]:
        """(``runs()``'s page of the runs matching every search word (queries.search_words';
        none: every run), how many runs match), read in one transaction."""

        def read(c: sqlite3.Connection) -> tuple[list[dict[str, Any]], int]:
            out = []
            for row in queries.run_rows(c, limit, offset, words):
                rk, updated_at = row[0], row[11]
                cached = self._sparklines.get(rk)
                if cached is None or cached[0] != updated_at:
                    cached = (updated_at, queries.sparkline(c, rk))
                    self._sparklines[rk] = cached
                config = None
                if not full_config:
                    text = row[3]
                    shown = self._list_configs.get(rk)
                    if shown is None or shown[0] != text:
                        shown = (text, queries.list_config(json.loads(text)))
                        self._list_configs[rk] = shown
                    config = shown[1]
                out.append(queries.run_summary(row, cached[1], config))
            return out, queries.run_count(c, words)

        return self._read(read)

    def deletions_pending(self) -> int:
        """Deleted runs whose rows are not all purged yet."""
        return self._read(lambda c: int(c.execute("SELECT COUNT(*) FROM deleting").fetchone()[0]))

    def run_count(self) -> int:
        return self._read(queries.run_count)

    def runs_with_status(self, statuses: set[str]) -> list[str]:
        return self._read(lambda c: queries.runs_with_status(c, statuses))

    def commands(self, run_id: str, *, after_cmd_seq: int = 0) -> list[dict[str, Any]]:
        return self._read(lambda c: queries.commands(c, run_id, after_cmd_seq))

    def command(self, run_id: str, cmd_id: str) -> dict[str, Any] | None:
        return self._read(lambda c: queries.command(c, run_id, cmd_id))

    def catchup_text(
        self, run_id: str, seq: int, *, max_frames: int, max_bytes: int
    ) -> tuple[str, list[int]] | None:
        """The viewer's catch-up message after ``seq`` as JSON text and the seqs it holds;
        None when it would carry more than max_frames frames or max_bytes bytes (the
        viewer gets a snapshot instead). Builds the text from the stored frames' text."""
        return self._read(lambda c: queries.catchup_text(c, run_id, seq, max_frames, max_bytes))

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
        first line; reads in pages, so a long run streams without loading it whole. A page
        that cannot be read (a damaged database) ends it with an error line (``{"type":
        "error", "message"}``, logged as one line too) and then ExportCutShort, which the
        app turns into a transfer cut off without its end (app.CutShort), never a clean
        one that looks complete."""
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
            try:
                page = self.frames_after(detail["id"], seq, EXPORT_PAGE_FRAMES)
            except (StoreError, sqlite3.Error) as exc:
                why = f"export of run {detail['id']} cut short after seq {seq}: {exc}"
                log.error("layerscope: %s", why)
                yield dumps({"type": "error", "v": 1, "message": why}) + "\n"
                raise ExportCutShort(why) from None
            for frame in page:
                yield dumps({"v": 1, **frame}) + "\n"
                seq = frame["seq"]
            if len(page) < EXPORT_PAGE_FRAMES:
                return

    def snapshot(self, run_id: str, *, max_points: int = 500) -> dict[str, Any]:
        """The viewer's snapshot body (http_api.md) minus trainer_connected: the run, every
        series downsampled to max_points, the last probe frame, the newest events, all
        commands, the acknowledged control state, last_seq = the acked seq (a viewer
        that reconnects with after_seq=last_seq misses nothing), and store_problem (why the
        store cannot store now, as /healthz says it, or null: write_problem)."""

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
                "store_problem": self.write_problem,
            }

        return self._read(read)
