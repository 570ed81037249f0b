"""writes — the SQL of every change to layerscope.db, run in the store's writer process (store_writer.py).

Owns: turning validated frames, hellos, commands and status changes into rows (a
metrics frame's values go through scalars.py, a probe frame's through probe_rows.py,
and a batch's frame rows in a few multi-row INSERTs), the
side effects of events (a ``status`` event sets the run status, a
``command_result`` event settles the command row and the run's acknowledged
control state; a status that ends the run settles its pending commands as failed,
never applied), the server's own events (a command stored, a status the server set, a
command settled as not applied),
returned to the caller as stored so viewers can be shown them, the
highest-contiguous-seq bookkeeping behind acks, and deleting a run: hidden at once
(its runs row goes, its id is free), its rows purged afterwards in bounded slices
(``purge.Purge``) that a restart resumes.

Never: commits (the writer process groups many operations into one commit and wraps
each in a savepoint), never runs on the event loop, never trusts a frame's shape
without checking it (a bad one raises StoreError and its whole operation rolls back).
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from typing import Any

from layerscope.server.checks import RunIdTaken, RunNotFound, StoreError, dumps
from layerscope.server.checks import step as check_step
from layerscope.server.inserts import insert_many
from layerscope.server.probe_rows import ProbeRows
from layerscope.server.purge import Purge
from layerscope.server.scalars import ScalarWriter
from layerscope.trainer import wire

FRAME_TYPES = frozenset({"metrics", "probe", "event"})
# A hello does not revive a run that ended for good: a second `layerscope sync` of its
# spool sends the same hello again. Nor does it resume a paused one: the trainer reports
# its resume (a status event, and the status its heartbeats carry). A "lost" run's
# trainer may reconnect: it is as it was before it was lost (a paused trainer stays
# paused while its link is down), running or paused. A launched one's first connects: running.
_KEEP_STATUS_ON_HELLO = frozenset({"finished", "stopped", "failed", "paused"})
_ENDED = frozenset({"finished", "stopped", "failed"})
_TRAINER_STATUSES = ("running", "paused")  # what a reconnected trainer may be
# How many of a lost run's latest status events are read for the status it had before.
_STATUS_LOOKBACK = 50
# A command still pending when its run ends (finished, stopped, failed, lost) will never be
# applied: it is settled as failed with this error (and a server ``command_result`` event),
# where it stayed "pending" forever. A lost run's trainer that comes back is not sent it again.
NOT_APPLIED = "the run ended before its trainer applied it"


class Acked(int):
    """``append``'s result when the append recorded server events of its own (a status
    frame that ended the run settles its pending commands): the acked seq, an int like
    any other append result, that also carries those events, in the order they were
    stored, for the store to show the run's viewers. A plain int otherwise."""

    events: tuple[dict[str, Any], ...]

    def __new__(cls, acked: int, events: tuple[dict[str, Any], ...] = ()) -> Acked:
        self = super().__new__(cls, acked)
        self.events = events
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # it crosses the writer's pipe (pickle)
        return (Acked, (int(self), self.events))


def _another_process(instance: Any, stored_instance: Any, status: str) -> bool:
    """Whether a hello comes from another trainer process than the one that recorded the
    stored run (so it must not be spliced into it). Every trainer since the instance
    (schema 3) sends one: a hello without one, for a run that has one, is an older
    trainer or spool reusing the id; a hello with one, for an older trainer's run that
    has ended, is a newer process reusing the id (a lost run's trainer coming back, or a
    launched run's first hello, is taken: its run has no instance and has not ended).
    A run and a hello both without one (an older trainer reconnecting) are taken."""
    if stored_instance is not None:
        return instance != stored_instance
    return instance is not None and status in _ENDED


def _seq(frame: Any) -> int:
    if not isinstance(frame, dict):
        raise StoreError(f"a frame must be a dict, got {type(frame).__name__}")
    seq = frame.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise StoreError(f"frame has no integer seq >= 1 (got {seq!r})")
    if frame.get("type") not in FRAME_TYPES:
        raise StoreError(
            f"frame seq {seq}: type {frame.get('type')!r} is not stored;"
            f" expected one of {sorted(FRAME_TYPES)}"
        )
    return seq


class Writer:
    """Holds the writer connection and id caches (run key, series id, layer id)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._rk: dict[str, int] = {}
        self._sid: dict[tuple[int, str], int] = {}
        self._lid: dict[tuple[int, str], int] = {}
        self.scalars = ScalarWriter(conn)
        self.purge = Purge(conn)

    def forget(self) -> None:
        """Drop the caches: called after a rollback, which may have undone new ids."""
        self._rk.clear()
        self._sid.clear()
        self._lid.clear()
        self.scalars.forget()

    # ---- ids ----

    def rk(self, run_id: str) -> int:
        rk = self._rk.get(run_id)
        if rk is None:
            row = self.conn.execute("SELECT rk FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(run_id)
            rk = self._rk[run_id] = row[0]
        return rk

    def sid(self, rk: int, name: str) -> int:
        sid = self._sid.get((rk, name))
        if sid is None:
            if not isinstance(name, str) or not name or len(name) > wire.MAX_NAME_LEN:
                raise StoreError(
                    f"series name {name!r} must be a string of 1-{wire.MAX_NAME_LEN} characters"
                )
            self.conn.execute("INSERT OR IGNORE INTO series (rk, name) VALUES (?, ?)", (rk, name))
            sid = self.conn.execute(
                "SELECT sid FROM series WHERE rk = ? AND name = ?", (rk, name)
            ).fetchone()[0]
            self._sid[(rk, name)] = sid
        return sid

    def lid(
        self,
        rk: int,
        name: str,
        kind: str | None = None,
        units: int | None = None,
        ord_: int | None = None,
    ) -> int:
        lid = self._lid.get((rk, name))
        if lid is None or kind is not None:
            if not isinstance(name, str) or not name or len(name) > wire.MAX_NAME_LEN:
                raise StoreError(
                    f"layer name {name!r} must be a string of 1-{wire.MAX_NAME_LEN} characters"
                )
            row = self.conn.execute(
                "SELECT lid FROM layers WHERE rk = ? AND name = ?", (rk, name)
            ).fetchone()
            if row is None:
                if ord_ is None:
                    ord_ = self.conn.execute(
                        "SELECT COALESCE(MAX(ord) + 1, 0) FROM layers WHERE rk = ?", (rk,)
                    ).fetchone()[0]
                cur = self.conn.execute(
                    "INSERT INTO layers (rk, name, kind, units, ord) VALUES (?, ?, ?, ?, ?)",
                    (rk, name, kind or "module", units, ord_),
                )
                lid = int(cur.lastrowid or 0)
            else:
                lid = row[0]
                if kind is not None:
                    self.conn.execute(
                        "UPDATE layers SET kind = ?, units = ?, ord = COALESCE(?, ord) WHERE lid = ?",
                        (kind, units, ord_, lid),
                    )
            self._lid[(rk, name)] = lid
        return lid

    # ---- runs ----

    def create_run(
        self, run_id: str, name: str, config: dict[str, Any], status: str, launched: bool
    ) -> None:
        if status not in wire.RUN_STATUSES:
            raise StoreError(
                f"unknown status {status!r}; expected one of {list(wire.RUN_STATUSES)}"
            )
        if not isinstance(run_id, str) or not run_id or len(run_id) > wire.MAX_NAME_LEN:
            raise StoreError(
                f"run id {run_id!r} must be a string of 1-{wire.MAX_NAME_LEN} characters"
            )
        if not isinstance(config, dict):
            raise StoreError("config must be a dict")
        if self.conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
            raise StoreError(f"run '{run_id}' already exists")
        now = time.time()
        self.conn.execute(
            "INSERT INTO runs (id, name, config, status, launched, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, name, dumps(config), status, int(launched), now, now),
        )

    def hello(self, hello: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        """Create or resume the run; returns its acked seq and the server events it
        recorded (a lost run's trainer back: its status as before it was lost), if any.
        A run keeps the first instance its hellos carry (the
        trainer process's id): a hello carrying another is another process reusing the
        run id, refused (RunIdTaken) rather than spliced into this run; see
        ``_another_process`` for runs and hellos without one (older trainers and spools)."""
        run_id = hello["run_id"]
        instance = hello.get("instance")
        now = time.time()
        row = self.conn.execute(
            "SELECT rk, status, acked_seq, instance FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        name = hello.get("name") or run_id
        config = dumps(hello.get("config") or {})
        device = str(hello.get("device") or "")
        world_size = int(hello.get("world_size") or 1)
        events: list[dict[str, Any]] = []
        if row is None:
            cur = self.conn.execute(
                "INSERT INTO runs (id, name, config, status, device, world_size, created_at,"
                " updated_at, instance) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (run_id, name, config, device, world_size, now, now, instance),
            )
            rk, acked = int(cur.lastrowid or 0), 0
            self._rk[run_id] = rk
        else:
            rk, status, acked, stored_instance = row
            if _another_process(instance, stored_instance, status):
                raise RunIdTaken(run_id)
            if status in _KEEP_STATUS_ON_HELLO:
                new_status = status
            elif status == "lost":
                new_status = self._status_before_lost(rk)
            else:
                new_status = "running"
            reason_sql = "status_reason" if new_status == status else "NULL"
            self.conn.execute(
                f"UPDATE runs SET name = ?, config = ?, status = ?, status_reason = {reason_sql},"
                " device = ?, world_size = ?, updated_at = ?, instance = COALESCE(instance, ?)"
                " WHERE rk = ?",
                (name, config, new_status, device, world_size, now, instance, rk),
            )
            if status == "lost":  # the log says the run is back, and how
                events.append(
                    self._server_event(
                        rk, "status", {"status": new_status, "reason": "trainer reconnected"}, now
                    )
                )
        for i, layer in enumerate(hello.get("layers") or []):
            self.lid(rk, layer["name"], str(layer.get("kind") or "module"), layer.get("units"), i)
        return int(acked), events

    def _status_before_lost(self, rk: int) -> str:
        """The status a lost run's trainer last had (its status events and the heartbeat
        changes the server recorded, newest first): paused stays paused when it comes back."""
        rows = self.conn.execute(
            "SELECT data FROM events WHERE rk = ? AND kind = 'status' ORDER BY eid DESC LIMIT ?",
            (rk, _STATUS_LOOKBACK),
        )
        for (data,) in rows:
            status = json.loads(data).get("status")
            if status in _TRAINER_STATUSES:
                return str(status)
        return "running"

    def set_status(self, run_id: str, status: str, reason: str | None) -> list[dict[str, Any]]:
        """Returns the server events it recorded, in the order stored: the status, then
        (a status that ends the run) each pending command settled as never applied."""
        if status not in wire.RUN_STATUSES:
            raise StoreError(
                f"unknown status {status!r}; expected one of {list(wire.RUN_STATUSES)}"
            )
        rk = self.rk(run_id)
        now = time.time()
        self.conn.execute(
            "UPDATE runs SET status = ?, status_reason = ?, updated_at = ? WHERE rk = ?",
            (status, reason, now, rk),
        )
        data: dict[str, Any] = {"status": status}
        if reason is not None:
            data["reason"] = reason
        events = [self._server_event(rk, "status", data, now)]
        if status in wire.ENDED_STATUSES:
            events += self._settle_pending(rk, now)
        return events

    def _settle_pending(self, rk: int, now: float) -> list[dict[str, Any]]:
        """The run ended: each command still pending will never be applied (nothing is
        left to apply it). Each is stored as failed with NOT_APPLIED, and logged as a
        server ``command_result`` event, so GET /commands and the page's log say so.
        Returns those events in cmd_seq order (the order stored)."""
        rows = self.conn.execute(
            "UPDATE commands SET status = 'failed', error = ? WHERE rk = ? AND status = 'pending'"
            " RETURNING id, cmd_seq, name, args, source",
            (NOT_APPLIED, rk),
        ).fetchall()
        events = []
        for cmd_id, cmd_seq, name, args, source in sorted(rows, key=lambda r: r[1]):
            data = {
                "id": cmd_id,
                "cmd_seq": cmd_seq,
                "name": name,
                "args": json.loads(args),
                "source": source,
                "ok": False,
                "applied_at_step": None,
                "error": NOT_APPLIED,
            }
            events.append(self._server_event(rk, "command_result", data, now))
        return events

    def _server_event(self, rk: int, kind: str, data: dict[str, Any], now: float) -> dict[str, Any]:
        """Record an event of the server's own (no seq; the run's last step); returns it
        as GET /events lists it, for the viewers to be shown it (the same step, data and
        created_at, so a page that has it from both knows it is one event)."""
        text = dumps(data)
        step = self.conn.execute(
            "INSERT INTO events (rk, seq, step, kind, origin, data, created_at)"
            " SELECT ?, NULL, last_step, ?, 'server', ?, ? FROM runs WHERE rk = ?"
            " RETURNING step",
            (rk, kind, text, now, rk),
        ).fetchone()[0]
        return {
            "seq": None,
            "step": step,
            "kind": kind,
            "origin": "server",
            "data": json.loads(text),
            "created_at": now,
        }

    def delete_run(self, run_id: str) -> bool:
        """Hide the run at once: its runs row goes (nothing reads or writes a run without
        one, and its id is free for a new run, which gets a new rk) and its rk is noted in
        ``deleting``; its other rows are purged afterwards, slice by slice (``Purge``), so
        a big run's delete does not hold up every other run's commits."""
        try:
            rk = self.rk(run_id)
        except RunNotFound:
            return False
        self.conn.execute(
            "INSERT OR REPLACE INTO deleting (rk, id, since) VALUES (?, ?, ?)",
            (rk, run_id, time.time()),
        )
        self.conn.execute("DELETE FROM runs WHERE rk = ?", (rk,))
        self.forget()
        self.purge.pending = True
        return True

    # ---- commands ----

    def add_command(
        self, run_id: str, cmd: dict[str, Any], origin: str
    ) -> tuple[dict[str, Any], bool, list[dict[str, Any]]]:
        """(row, duplicate, the server events it recorded in the order stored: the command,
        then, for a run that ended meanwhile, its result as never applied; none for a
        duplicate)."""
        rk = self.rk(run_id)
        cmd_id = cmd.get("id")
        if not isinstance(cmd_id, str) or not cmd_id:
            raise StoreError("a command needs a string id")
        if cmd.get("name") not in wire.COMMANDS:
            raise StoreError(f"unknown command {cmd.get('name')!r}")
        existing = self.conn.execute(
            "SELECT * FROM commands WHERE rk = ? AND id = ?", (rk, cmd_id)
        ).fetchone()
        if existing is not None:
            return command_row(existing), True, []
        cmd_seq = self.conn.execute(
            "UPDATE runs SET cmd_seq = cmd_seq + 1 WHERE rk = ? RETURNING cmd_seq", (rk,)
        ).fetchone()[0]
        now = time.time()
        args = cmd.get("args") or {}
        source = str(cmd.get("source") or "user")
        reason = cmd.get("reason")
        self.conn.execute(
            "INSERT INTO commands (rk, id, cmd_seq, name, args, source, origin, reason, created_at, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
            (rk, cmd_id, cmd_seq, cmd["name"], dumps(args), source, origin, reason, now),
        )
        data = {
            "id": cmd_id,
            "cmd_seq": cmd_seq,
            "name": cmd["name"],
            "args": args,
            "source": source,
            "origin": origin,
        }
        if reason is not None:
            data["reason"] = reason
        events = [self._server_event(rk, "command", data, now)]
        status = self.conn.execute("SELECT status FROM runs WHERE rk = ?", (rk,)).fetchone()[0]
        if status in wire.ENDED_STATUSES:  # stored for a run that ended meanwhile
            events += self._settle_pending(rk, now)
        row = self.conn.execute(
            "SELECT * FROM commands WHERE rk = ? AND id = ?", (rk, cmd_id)
        ).fetchone()
        return command_row(row), False, events

    # ---- frames ----

    def append(
        self, run_id: str, frames: list[dict[str, Any]], encoded: list[bytes] | None = None
    ) -> int:
        """encoded, when given, holds each frame's JSON as validated (wire.parse_trainer_frame's
        output, encoded in the server process): it is stored as the frame's body as is, and
        the frame's rows are built without checking again what validation checked.
        Returns the acked seq; an ``Acked`` carrying the server events the frames caused
        (a status frame that ended the run settles its pending commands), if any."""
        if encoded is not None and len(encoded) != len(frames):
            raise StoreError(f"{len(frames)} frames but {len(encoded)} encoded bodies")
        rk = self.rk(run_id)
        c = self.conn
        first_step, last_step, acked, max_seq, last_json = c.execute(
            "SELECT first_step, last_step, acked_seq, max_seq, last_values FROM runs WHERE rk = ?",
            (rk,),
        ).fetchone()
        last: dict[str, list[Any]] = json.loads(last_json)
        steps: list[int] = []
        new: set[int] = set()
        # Frame and probe rows are written together after the loop (inserts.py says
        # why); a seq above max_seq cannot be stored yet, so only a resend costs a lookup.
        bodies: list[tuple[int, int, str, bytes]] = []
        probes = ProbeRows()
        recorded: list[dict[str, Any]] = []
        for n, frame in enumerate(frames):
            seq = _seq(frame)
            if seq in new or (seq <= max_seq and self._stored(rk, seq)):
                continue  # a resend of a stored frame: acked again, stored once
            new.add(seq)
            text = dumps(frame).encode() if encoded is None else encoded[n]
            body = zlib.compress(text, 1)
            kind = frame["type"]
            bodies.append((rk, seq, kind, body))
            if kind == "metrics":
                self.scalars.store(rk, frame, steps, last, self.sid)
            elif kind == "probe":
                probes.add(rk, seq, frame, self.lid, steps, validated=encoded is not None)
            else:
                recorded += self._event(rk, seq, frame, steps)
        if not new:
            return int(acked)
        insert_many(c, "INSERT INTO frames (rk, seq, type, body)", 4, bodies)
        probes.flush(c)
        if max_seq <= acked:
            # Nothing was stored past the acked seq: the new seqs alone can extend it.
            for seq in sorted(new):
                if seq != acked + 1:
                    break
                acked = seq
        elif min(new) <= acked + 1:
            for (seq,) in c.execute(
                "SELECT seq FROM frames WHERE rk = ? AND seq > ? ORDER BY seq", (rk, acked)
            ):
                if seq != acked + 1:
                    break
                acked = seq
        if steps:
            lo, hi = min(steps), max(steps)
            first_step = lo if first_step is None else min(first_step, lo)
            last_step = hi if last_step is None else max(last_step, hi)
        c.execute(
            "UPDATE runs SET first_step = ?, last_step = ?, acked_seq = ?, max_seq = ?,"
            " last_values = ?, updated_at = ? WHERE rk = ?",
            (
                first_step,
                last_step,
                acked,
                max(max_seq, max(new)),
                dumps(last),
                time.time(),
                rk,
            ),
        )
        return Acked(acked, tuple(recorded)) if recorded else int(acked)

    def _stored(self, rk: int, seq: int) -> bool:
        row = self.conn.execute("SELECT 1 FROM frames WHERE rk = ? AND seq = ?", (rk, seq))
        return row.fetchone() is not None

    def _event(
        self, rk: int, seq: int, frame: dict[str, Any], steps: list[int]
    ) -> list[dict[str, Any]]:
        """Store a trainer's event frame; returns the server events it caused."""
        step = check_step(frame.get("step"), f"event frame seq {seq}: step")
        kind = frame.get("kind")
        data = frame.get("data") or {}
        if not isinstance(kind, str) or not isinstance(data, dict):
            raise StoreError(f"event frame seq {seq}: needs a string 'kind' and an object 'data'")
        steps.append(step)
        now = time.time()
        recorded: list[dict[str, Any]] = []
        self.conn.execute(
            "INSERT INTO events (rk, seq, step, kind, origin, data, created_at)"
            " VALUES (?, ?, ?, ?, 'trainer', ?, ?)",
            (rk, seq, step, kind, dumps(data), now),
        )
        if kind == "status" and data.get("status") in wire.RUN_STATUSES:
            self.conn.execute(
                "UPDATE runs SET status = ?, status_reason = ? WHERE rk = ?",
                (data["status"], _text(data.get("reason")), rk),
            )
            if data["status"] in wire.ENDED_STATUSES:
                recorded = self._settle_pending(rk, now)
            if isinstance(data.get("control"), dict):
                # A trainer's first status carries its initial control state (the rules'
                # switches), acknowledged before any command: the UI shows it from the start.
                self.conn.execute(
                    "UPDATE runs SET control = ? WHERE rk = ?", (dumps(data["control"]), rk)
                )
        elif kind == "command_result":
            self._command_result(rk, data)
        return recorded

    def _command_result(self, rk: int, data: dict[str, Any]) -> None:
        state = data.get("state")
        applied = data.get("applied_at_step")
        error = data.get("error")
        status = "applied" if data.get("ok") else "failed"
        applied = _counter(applied)
        state_json = dumps(state) if isinstance(state, dict) else None
        error_text = None if error is None else str(error)
        cmd_id, cmd_seq = _text(data.get("id")), _counter(data.get("cmd_seq"))
        updated = self.conn.execute(
            "UPDATE commands SET status = ?, applied_at_step = ?, state = ?, error = ?"
            " WHERE rk = ? AND (id = ? OR (? IS NULL AND cmd_seq = ?))",
            (
                status,
                applied,
                state_json,
                error_text,
                rk,
                cmd_id,
                cmd_id,
                cmd_seq,
            ),
        ).rowcount
        name = data.get("name")
        if not updated and isinstance(cmd_id, str) and cmd_id and name in wire.COMMANDS:
            self._trainer_command(rk, data, (status, applied, state_json, error_text))
        if isinstance(state, dict):
            self.conn.execute("UPDATE runs SET control = ? WHERE rk = ?", (dumps(state), rk))

    def _trainer_command(
        self, rk: int, data: dict[str, Any], result: tuple[str, int | None, str | None, str | None]
    ) -> None:
        """A command the trainer made itself (a rule's action, ``w.command``) gets a commands
        row (origin 'trainer') so GET /commands lists it. Its cmd_seq comes from the run's
        counter like any other; were it resent after a reconnect, the trainer skips the id."""
        args = data.get("args")
        source = data.get("source") if data.get("source") in wire.COMMAND_SOURCES else "api"
        reason = data.get("reason")
        cmd_seq = self.conn.execute(
            "UPDATE runs SET cmd_seq = cmd_seq + 1 WHERE rk = ? RETURNING cmd_seq", (rk,)
        ).fetchone()[0]
        self.conn.execute(
            "INSERT OR IGNORE INTO commands (rk, id, cmd_seq, name, args, source, origin, reason,"
            " created_at, status, applied_at_step, state, error)"
            " VALUES (?, ?, ?, ?, ?, ?, 'trainer', ?, ?, ?, ?, ?, ?)",
            (
                rk,
                data["id"],
                cmd_seq,
                data["name"],
                dumps(args if isinstance(args, dict) else {}),
                source,
                None if reason is None else str(reason)[:1000],
                time.time(),
                *result,
            ),
        )


def command_row(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    """A commands row (SELECT *) as the API's command object."""
    (
        _rk,
        cmd_id,
        cmd_seq,
        name,
        args,
        source,
        origin,
        reason,
        created_at,
        status,
        applied_at_step,
        state,
        error,
    ) = tuple(row)
    return {
        "id": cmd_id,
        "cmd_seq": cmd_seq,
        "name": name,
        "args": json.loads(args),
        "source": source,
        "origin": origin,
        "reason": reason,
        "created_at": created_at,
        "status": status,
        "applied_at_step": applied_at_step,
        "state": None if state is None else json.loads(state),
        "error": error,
    }


def _text(value: Any) -> str | None:
    """A string field of a trainer's event as its column takes it (wire.validate_event
    checks the types; a frame stored before that check, or a foreign one, is not made a
    batch-wide failure by one field)."""
    return value if isinstance(value, str) else None


def _counter(value: Any) -> int | None:
    """An integer field (a step, a cmd_seq) as SQLite's 64-bit column takes it, else None."""
    return value if type(value) is int and 0 <= value <= wire.MAX_INT else None
