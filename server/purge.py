"""purge — a deleted run's rows, removed a slice at a time by the writer process.

Owns: what ``Writer.delete_run`` leaves behind once a run is hidden (its rk noted in the
``deleting`` table): the order its tables are emptied in (a series' or layer's rows
before the series and layers rows, so a freed id never meets old rows), the size of a
slice, and resuming after a restart (the table is the truth).

Never: commits (the writer commits after each slice, between its batches), or touches a
run that still has its runs row.
"""

from __future__ import annotations

import os
import sqlite3
import time

# A deleted run's rows go in slices: each statement deletes at most its limit of rows
# (frames and histograms hold blobs: fewer of them), and a slice runs statements until
# PURGE_SLICE_S has passed; the writer commits after each slice, between its batches.
PURGE_SLICE_S = 0.02


def _slice_s() -> float:
    """PURGE_SLICE_S, or LAYERSCOPE_PURGE_SLICE_S from the writer's environment (a
    number >= 0; 0: one statement a slice, as the tests use to make a purge take many
    slices on any machine). Anything else is ignored."""
    try:
        value = float(os.environ.get("LAYERSCOPE_PURGE_SLICE_S", PURGE_SLICE_S))
    except ValueError:
        return PURGE_SLICE_S
    return value if 0.0 <= value < 60.0 else PURGE_SLICE_S


_MAX_KEY = 2**63 - 1
# (what the statement runs over: the run's "series", its "layers" or the "run" itself,
# the DELETE taking that id as ?1 and the limit as ?2, the limit). The children of a
# series or layer go before the series and layers rows: a sid or lid freed early could be
# given to a new run's series while its old rows were still there.
_PURGE_STEPS: tuple[tuple[str, str, int], ...] = (
    (
        "series",
        "DELETE FROM scalars WHERE sid = ?1 AND step <= COALESCE((SELECT step FROM scalars"
        f" WHERE sid = ?1 ORDER BY step LIMIT 1 OFFSET ?2 - 1), {_MAX_KEY})",
        5000,
    ),
    (
        "series",
        "DELETE FROM scalar_blocks WHERE (sid, level, block) IN"
        " (SELECT sid, level, block FROM scalar_blocks WHERE sid = ?1 LIMIT ?2)",
        5000,
    ),
    (
        "layers",
        "DELETE FROM probes WHERE lid = ?1 AND step <= COALESCE((SELECT step FROM probes"
        f" WHERE lid = ?1 ORDER BY step LIMIT 1 OFFSET ?2 - 1), {_MAX_KEY})",
        5000,
    ),
    (
        "layers",
        "DELETE FROM probe_hists WHERE rowid IN"
        " (SELECT rowid FROM probe_hists WHERE lid = ?1 LIMIT ?2)",
        1000,
    ),
    (
        "run",
        "DELETE FROM probe_steps WHERE rk = ?1 AND step <= COALESCE((SELECT step FROM"
        f" probe_steps WHERE rk = ?1 ORDER BY step LIMIT 1 OFFSET ?2 - 1), {_MAX_KEY})",
        5000,
    ),
    ("run", "DELETE FROM frames WHERE rowid IN (SELECT rowid FROM frames WHERE rk = ?1 LIMIT ?2)", 200),
    ("run", "DELETE FROM events WHERE eid IN (SELECT eid FROM events WHERE rk = ?1 LIMIT ?2)", 5000),
    ("run", "DELETE FROM commands WHERE rowid IN (SELECT rowid FROM commands WHERE rk = ?1 LIMIT ?2)", 5000),
    ("run", "DELETE FROM series WHERE rowid IN (SELECT rowid FROM series WHERE rk = ?1 LIMIT ?2)", 5000),
    ("run", "DELETE FROM layers WHERE rowid IN (SELECT rowid FROM layers WHERE rk = ?1 LIMIT ?2)", 5000),
)  # fmt: skip


class Purge:
    """The rows of deleted runs (``deleting``), removed a slice at a time. ``pending`` is
    a hint (a run was deleted, or a restart found some left); the table is the truth, so
    a delete whose commit failed, or a server stopped midway, purges nothing it should not
    and leaves nothing behind: the next writer goes on where this one stopped."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pending = conn.execute("SELECT 1 FROM deleting LIMIT 1").fetchone() is not None

    def slice(self, budget_s: float | None = None) -> int:
        """Delete some of the oldest deletion's rows, for about ``budget_s``; returns how
        many. The caller commits. A run whose rows are all gone leaves ``deleting``."""
        row = self.conn.execute("SELECT rk FROM deleting ORDER BY rk LIMIT 1").fetchone()
        if row is None:
            self.pending = False
            return 0
        rk = row[0]
        if self.conn.execute("SELECT 1 FROM runs WHERE rk = ?", (rk,)).fetchone() is not None:
            # Never purge a run that is there (a deleting row that outlived a rollback).
            self.conn.execute("DELETE FROM deleting WHERE rk = ?", (rk,))
            return 0
        deadline = time.monotonic() + (_slice_s() if budget_s is None else budget_s)
        ids = {
            "series": [r[0] for r in self.conn.execute("SELECT sid FROM series WHERE rk = ?", (rk,))],
            "layers": [r[0] for r in self.conn.execute("SELECT lid FROM layers WHERE rk = ?", (rk,))],
            "run": [rk],
        }  # fmt: skip
        deleted = 0
        for over, sql, limit in _PURGE_STEPS:
            for key in ids[over]:
                while True:
                    n = self.conn.execute(sql, (key, limit)).rowcount
                    deleted += n
                    if deleted and time.monotonic() >= deadline:
                        # the next slice goes on from here; a slice that has deleted
                        # nothing yet goes on past its deadline, or a slow statement that
                        # finds no rows would be run again by every slice, for ever
                        return deleted
                    if n < limit:
                        break  # none of these left
        self.conn.execute("DELETE FROM deleting WHERE rk = ?", (rk,))
        return deleted
