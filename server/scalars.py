"""scalars — scalar series (loss, lr, ...): their rows, the block summaries kept beside
them, and their downsampled reads.

Owns: storing a metrics frame's values (the hottest loop of ingest), keeping the
min/max block summaries of every series current (extended as steps arrive, rebuilt
from raw rows when a step is logged again), and reading a series over [start, end]
as at most max_points points (downsample.py's rule), plus the runs list's sparkline.

Never: commits (the writer process does), never reads raw rows of a long range when
block summaries cover it, never stores NaN/Inf (None).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from math import inf, isfinite
from typing import Any

from layerscope.server.checks import StoreError, finite
from layerscope.server.checks import step as check_step
from layerscope.server.downsample import (
    BLOCK_LEVELS,
    SummaryRow,
    block_summaries,
    bucket_count,
    choose_level,
    minmax_rows,
)
from layerscope.server.inserts import insert_many

LAST_KEYS = ("loss", "val_loss", "acc", "val_acc")
SPARKLINE_POINTS = 50
NO_START = -1
NO_END = 2**62
_SCALARS_INSERT = "INSERT OR REPLACE INTO scalars (sid, step, value, time_s)"

# Merge a new block summary into a stored one; every right-hand side reads the old row.
# Written as head + VALUES + tail so that a batch's blocks go in as multi-row
# statements (inserts.insert_many: one SQLite step, one GIL round trip, per statement).
_BLOCK_HEAD = """
INSERT INTO scalar_blocks (sid, level, block, n, first_step, last_step, min_step, min_value,
                           max_step, max_value, null_step, finite, total)"""
_BLOCK_WIDTH = 13
_UPSERT_TAIL = """
ON CONFLICT (sid, level, block) DO UPDATE SET
    n = n + excluded.n,
    first_step = MIN(first_step, excluded.first_step),
    last_step = MAX(last_step, excluded.last_step),
    min_step = CASE WHEN excluded.min_value < min_value OR min_value IS NULL
                    THEN excluded.min_step ELSE min_step END,
    min_value = CASE WHEN excluded.min_value < min_value OR min_value IS NULL
                     THEN excluded.min_value ELSE min_value END,
    max_step = CASE WHEN excluded.max_value > max_value OR max_value IS NULL
                    THEN excluded.max_step ELSE max_step END,
    max_value = CASE WHEN excluded.max_value > max_value OR max_value IS NULL
                     THEN excluded.max_value ELSE max_value END,
    null_step = COALESCE(MIN(null_step, excluded.null_step), null_step, excluded.null_step),
    finite = finite + excluded.finite,
    total = COALESCE(total + excluded.total, 9e999)
"""


def _levels(
    points: list[tuple[int, float | None]],
) -> list[tuple[int, list[tuple[int, SummaryRow]]]]:
    """(size, block summaries) for every BLOCK_LEVELS size. Only the finest level walks
    the points; each coarser one merges the level below (each size is a multiple of
    the one before), which cut the writer's time per metrics frame by a fifth."""
    size = BLOCK_LEVELS[0]
    level = block_summaries(points, size)
    out = [(size, level)]
    for bigger in BLOCK_LEVELS[1:]:
        factor, size = bigger // size, bigger
        coarse: list[tuple[int, SummaryRow]] = []
        for block, row in level:
            block //= factor
            if coarse and coarse[-1][0] == block:
                coarse[-1] = (block, _merge(coarse[-1][1], row))
            else:
                coarse.append((block, row))
        level = coarse
        out.append((size, level))
    return out


def _add(a: float, b: float) -> float:
    """Two blocks' totals added; +inf where they overflowed with opposite signs (the sum
    would be NaN, which SQLite stores as NULL in a NOT NULL column, failing the whole
    batch). The total only makes the sparkline's mean, which shows a non-finite one as a gap.
    The upsert above does the same in SQL (SQLite turns a NaN result into NULL)."""
    total = a + b
    return total if total == total else inf


def _merge(a: SummaryRow, b: SummaryRow) -> SummaryRow:
    """The summary of two adjacent runs of points, a before b: what block_summaries gives
    for them together (the earliest extreme on a tie, the first null)."""
    n, first, _last, min_step, min_value, max_step, max_value, null_step, count, total = a
    n2, _first, last, min_step2, min_value2, max_step2, max_value2, null_step2, count2, total2 = b
    if min_value2 is not None and (min_value is None or min_value2 < min_value):
        min_step, min_value = min_step2, min_value2
    if max_value2 is not None and (max_value is None or max_value2 > max_value):
        max_step, max_value = max_step2, max_value2
    return (
        n + n2,
        first,
        last,
        min_step,
        min_value,
        max_step,
        max_value,
        null_step if null_step is not None else null_step2,
        count + count2,
        _add(total, total2),
    )


class ScalarWriter:
    """The writer process's side: keeps each series' newest step to tell new points
    from re-logged ones."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._max_step: dict[int, int] = {}

    def forget(self) -> None:
        self._max_step.clear()

    def store(
        self,
        rk: int,
        frame: dict[str, Any],
        steps: list[int],
        last: dict[str, list[Any]],
        sid_of: Callable[[int, str], int],
    ) -> None:
        """Store a metrics frame's rows: append its lowest and highest step to steps and
        update last (name -> [step, value]) for LAST_KEYS."""
        rows = frame.get("rows")
        if not isinstance(rows, list):
            raise StoreError(f"metrics frame seq {frame['seq']}: 'rows' must be a list")
        params = []
        # Points past a series' newest step extend its block summaries; a step at or
        # before it (a re-logged step after a resume) rewrites a point, so its
        # blocks are rebuilt from the raw rows instead.
        fresh: dict[int, list[tuple[int, float | None]]] = {}
        rewritten: set[tuple[int, int]] = set()
        sids: dict[str, int] = {}
        newest: dict[int, int] = {}
        step_lo, step_hi = -1, -1
        # The hot loop of ingest (every scalar of every step): type checks are
        # inlined, the common case (a finite float) costs one isfinite call.
        for i, row in enumerate(rows):
            values = row.get("values") if type(row) is dict else None
            if type(values) is not dict:
                raise StoreError(
                    f"metrics frame seq {frame['seq']}: rows[{i}] needs a 'values' object"
                )
            step = row.get("step")
            if type(step) is not int or step < 0:
                check_step(step, f"metrics frame seq {frame['seq']} rows[{i}].step")
            time_s = row.get("time_s")
            if type(time_s) is float:
                if not isfinite(time_s):
                    time_s = None
            elif time_s is not None:
                time_s = finite(time_s, f"rows[{i}].time_s")
            if step_lo < 0 or step < step_lo:
                step_lo = step
            step_hi = max(step_hi, step)
            for name, value in values.items():
                if type(value) is float:
                    if not isfinite(value):
                        value = None
                elif value is not None:
                    value = finite(value, f"rows[{i}].values[{name!r}]")
                sid = sids.get(name)
                if sid is None:
                    sid = sids[name] = sid_of(rk, name)
                    newest[sid] = self._newest(sid)
                params.append((sid, step, value, time_s))
                if step > newest[sid]:
                    newest[sid] = step
                    fresh.setdefault(sid, []).append((step, value))
                else:
                    rewritten.add((sid, step))
        for name, sid in sids.items():
            self._max_step[sid] = newest[sid]
            if name not in LAST_KEYS:
                continue
            if sid in fresh:  # ascending, so its last point is the series' newest
                last[name] = list(fresh[sid][-1])
            elif name in last:  # only re-logged steps: the newest may have been rewritten
                for p_sid, p_step, p_value, _t in params:
                    if p_sid == sid and p_step == last[name][0]:
                        last[name] = [p_step, p_value]
        if step_lo >= 0:
            steps.extend((step_lo, step_hi))
        # One statement per up to 256 rows, not one SQLite step (and GIL round trip) per
        # point: the event loop decoding frames holds the GIL between steps.
        insert_many(self.conn, _SCALARS_INSERT, 4, params)
        blocks = [
            (sid, size, block, *summary)
            for sid, points in fresh.items()
            for size, level in _levels(points)
            for block, summary in level
        ]
        insert_many(self.conn, _BLOCK_HEAD, _BLOCK_WIDTH, blocks, _UPSERT_TAIL)
        for sid, size, block in {(s, z, st // z) for s, st in rewritten for z in BLOCK_LEVELS}:
            self._rebuild_block(sid, size, block)

    def _newest(self, sid: int) -> int:
        newest = self._max_step.get(sid)
        if newest is None:
            row = self.conn.execute(
                "SELECT MAX(step) FROM scalars WHERE sid = ?", (sid,)
            ).fetchone()
            newest = self._max_step[sid] = -1 if row[0] is None else row[0]
        return newest

    def _rebuild_block(self, sid: int, size: int, block: int) -> None:
        points = self.conn.execute(
            "SELECT step, value FROM scalars WHERE sid = ? AND step BETWEEN ? AND ? ORDER BY step",
            (sid, block * size, block * size + size - 1),
        ).fetchall()
        self.conn.execute(
            "DELETE FROM scalar_blocks WHERE sid = ? AND level = ? AND block = ?",
            (sid, size, block),
        )
        insert_many(
            self.conn,
            _BLOCK_HEAD,
            _BLOCK_WIDTH,
            [(sid, size, b, *summary) for b, summary in block_summaries(points, size)],
            _UPSERT_TAIL,
        )


# ---- reads ----


def bounds(start: int | None, end: int | None) -> tuple[int, int]:
    """[start, end] with open ends made concrete, for BETWEEN."""
    return (NO_START if start is None else start, NO_END if end is None else end)


def scalar_points(
    conn: sqlite3.Connection, sid: int, start: int | None, end: int | None, max_points: int
) -> tuple[list[int], list[float | None]]:
    """One series over [start, end], at most max_points points (downsample.py's rule).

    Cost: a long range reads the block summaries of the coarsest level that still
    gives each bucket a block (at most ~4 rows per bucket), plus raw rows only for
    the two edge blocks a start/end cuts through; a short range reads raw rows.
    """
    lo_b, hi_b = bounds(start, end)
    where = "sid = ? AND step BETWEEN ? AND ?"
    params = (sid, lo_b, hi_b)
    first = conn.execute(
        f"SELECT step, value FROM scalars WHERE {where} ORDER BY step LIMIT 1", params
    ).fetchone()
    if first is None:
        return [], []
    last = conn.execute(
        f"SELECT step, value FROM scalars WHERE {where} ORDER BY step DESC LIMIT 1", params
    ).fetchone()
    buckets = bucket_count(max_points)
    if buckets == 0:
        return sorted({first[0], last[0]}), [first[1]] if first[0] == last[0] else [
            first[1],
            last[1],
        ]
    size = choose_level(first[0], last[0], buckets)
    if size is not None:
        blocks = conn.execute(
            "SELECT block, n, first_step, last_step, min_step, min_value, max_step, max_value,"
            " null_step, finite, total FROM scalar_blocks"
            " WHERE sid = ? AND level = ? AND block BETWEEN ? AND ? ORDER BY block",
            (sid, size, first[0] // size, last[0] // size),
        ).fetchall()
        if sum(r[1] for r in blocks) > max_points:
            kept = _from_blocks(conn, sid, blocks, size, first[0], last[0], buckets)
            kept[first[0]] = first[1]
            kept[last[0]] = last[1]
            steps = sorted(kept)
            return steps, [kept[s] for s in steps]
    rows = conn.execute(f"SELECT step, value FROM scalars WHERE {where} ORDER BY step", params)
    steps, values = [], []
    for step, value in rows:
        steps.append(step)
        values.append(value)
    keep = minmax_rows(steps, [values], max_points)
    if len(keep) == len(steps):
        return steps, values
    return [steps[i] for i in keep], [values[i] for i in keep]


def _from_blocks(
    conn: sqlite3.Connection,
    sid: int,
    blocks: list[tuple[Any, ...]],
    size: int,
    lo: int,
    hi: int,
    buckets: int,
) -> dict[int, float | None]:
    """Blocks spread over the buckets as evenly as whole blocks allow (choose_level
    guarantees at least one block per bucket); an edge block that reaches outside
    [lo, hi] is summarised from its raw rows inside the range. One flat pass: this
    is the loop behind every long chart."""
    b0 = lo // size
    nblocks = hi // size - b0 + 1
    kept: dict[int, float | None] = {}
    current = -1
    low_s = high_s = null_s = -1
    low_v = high_v = 0.0

    def flush() -> None:
        if low_s >= 0:
            kept[low_s] = low_v
            kept[high_s] = high_v
        elif null_s >= 0:
            kept[null_s] = None

    for row in blocks:
        block, _n, first, last, min_step, min_value, max_step, max_value, null_step = row[:9]
        if first < lo or last > hi:
            points = conn.execute(
                "SELECT step, value FROM scalars WHERE sid = ? AND step BETWEEN ? AND ?"
                " ORDER BY step",
                (sid, max(lo, block * size), min(hi, block * size + size - 1)),
            ).fetchall()
            ((_b, part),) = block_summaries(points, size)
            _n, first, last, min_step, min_value, max_step, max_value, null_step = part[:8]
        b = (block - b0) * buckets // nblocks
        if b != current:
            flush()
            current, low_s, high_s, null_s = b, -1, -1, -1
        if null_step is not None and (null_s < 0 or null_step < null_s):
            null_s = null_step
        if min_value is None:
            continue
        if low_s < 0 or min_value < low_v or (min_value == low_v and min_step < low_s):
            low_s, low_v = min_step, min_value
        if high_s < 0 or max_value > high_v or (max_value == high_v and max_step < high_s):
            high_s, high_v = max_step, max_value
    flush()
    return kept


def sparkline(conn: sqlite3.Connection, rk: int) -> list[float | None]:
    """Mean loss per bucket, at most SPARKLINE_POINTS of them, from block summaries
    (a mean, not min/max: a 50-pixel line shows the trend; per-step noise would hide it)."""
    sid = conn.execute("SELECT sid FROM series WHERE rk = ? AND name = 'loss'", (rk,)).fetchone()
    if sid is None:
        return []
    size = 0
    for level in BLOCK_LEVELS:
        count = conn.execute(
            "SELECT COUNT(*) FROM scalar_blocks WHERE sid = ? AND level = ?", (sid[0], level)
        ).fetchone()[0]
        if count >= SPARKLINE_POINTS:
            size = level
    if size == 0:  # a short series (< ~800 steps): its raw rows, one bucket per step
        rows = conn.execute(
            "SELECT step, (value IS NOT NULL), COALESCE(value, 0.0) FROM scalars WHERE sid = ?"
            " ORDER BY step",
            sid,
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT block, finite, total FROM scalar_blocks WHERE sid = ? AND level = ?"
            " ORDER BY block",
            (sid[0], size),
        ).fetchall()
    if not rows:
        return []
    b0 = rows[0][0]
    per_bucket = -(-(rows[-1][0] - b0 + 1) // SPARKLINE_POINTS)
    sums: dict[int, list[float]] = {}
    for block, count, total in rows:
        acc = sums.setdefault((block - b0) // per_bucket, [0.0, 0.0])
        acc[0] += count
        acc[1] += total
    out: list[float | None] = []
    for bucket in sorted(sums):
        count, total = sums[bucket]
        mean = total / count if count else None
        out.append(mean if mean is not None and isfinite(mean) else None)
    return out
