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

Never: blocks the event loop on a write (the SQL runs in the writer process), never
loses a committed row to one bad operation (each runs in a savepoint), never keeps
a NaN/Inf (stored as NULL).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from layerscope.server import queries
from layerscope.server.checks import RunNotFound, StoreError, dumps
from layerscope.server.data_lock import DataDirLock
from layerscope.server.schema import DB_NAME, connect
from layerscope.server.writer_link import WriterLink
from layerscope.server.writes import Acked

__all__ = ["RunNotFound", "Store", "StoreError"]

T = TypeVar("T")
log = logging.getLogger(__name__)
EXPORT_PAGE_FRAMES = 500
SNAPSHOT_EVENTS = 200


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

    # ---- lifecycle ----

    async def open(self) -> None:
        """Create data_dir, take its lock (DataDirBusy while another server holds it; held
        until close) and start the writer process (which creates the schema, upgrades an
        older one after copying it, or refuses a newer one: SchemaError)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            await self._writes.open()
        except BaseException:
            self._lock.release()
            raise

    async def close(self) -> None:
        """Commit what is queued, stop the writer process, close every connection."""
        if self._closed:
            return
        self._closed = True
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
        """Why the store cannot take writes now (its writer process died and another has
        not started yet, or it is not open), or None while it can."""
        return self._writes.refusing

    @property
    def writer_restarts(self) -> int:
        """How many times a writer process that died was replaced."""
        return self._writes.writer_restarts

    async def _submit(self, name: str, *args: Any, urgent: bool = False) -> Any:
        return await self._writes.submit(name, *args, urgent=urgent)

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
        await self._submit("create_run", run_id, name, config, status, launched)

    async def hello(self, hello: dict[str, Any]) -> int:
        """Create or resume the run of a validated hello; returns its acked seq."""
        acked, events = await self._submit("hello", hello)
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
            acked: int = await self._submit("append_validated", run_id, frames)
        else:
            acked = await self._submit("append", run_id, frames)
        if isinstance(acked, Acked):
            self._recorded(run_id, acked.events)
            return int(acked)
        return acked

    async def set_status(self, run_id: str, status: str, *, reason: str | None = None) -> None:
        self._recorded(run_id, await self._submit("set_status", run_id, status, reason))

    async def add_command(
        self, run_id: str, cmd: dict[str, Any], *, origin: str
    ) -> tuple[dict[str, Any], bool]:
        """(row, duplicate): the same id again returns the stored row and True."""
        row, duplicate, events = await self._submit("add_command", run_id, cmd, origin, urgent=True)
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
        """fn inside one read transaction: every query sees the same committed state."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

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
