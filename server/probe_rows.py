"""probe_rows — a batch of frames' rows and how they reach SQLite: many rows per INSERT.

Owns: turning probe frames into rows (per-layer stats in ``probes``, histogram blobs in
``probe_hists``, the step's frame in ``probe_steps``), the checks an unvalidated probe
frame gets, and ``insert_many``, the multi-row INSERT the writer uses for every batch.

Why many rows per statement: Python's sqlite3 releases the GIL around each step and
takes it back after. An ``executemany`` steps once per row, about 100 times per
50-layer probe frame, and while the event loop's thread decodes frames each retake
waits for it to yield (up to the switch interval, see serving.py): the writer fell behind the
socket. One statement of n rows is one step, in which SQLite does all n inserts
without the GIL, in parallel with the event loop.

Never: commits (the writer thread does), never runs on the event loop, never trusts
an unvalidated frame's shape (a bad one raises StoreError and its operation rolls back).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import chain, repeat
from math import isfinite
from operator import itemgetter
from typing import Any

from layerscope.server.checks import StoreError, finite
from layerscope.server.checks import step as check_step
from layerscope.server.histograms import pack_counts
from layerscope.server.schema import PROBE_COLUMNS

# Rows per statement, largest first: n rows take at most a few statements of each size,
# so each table needs only these few compiled statements (sqlite3 caches them by text).
# 256 rows x 15 columns stays far below SQLite's 32,766 bound parameters.
INSERT_SIZES = (256, 64, 16, 4, 1)

_NAME = itemgetter("name")
_HIST = itemgetter("hist")
_STAT_GETTERS = [itemgetter(s) for s in PROBE_COLUMNS]
_INT_ONLY = frozenset({int})
_FLOAT_OR_NONE = frozenset({float, type(None)})
_STATS_INSERT = "INSERT OR REPLACE INTO probes (lid, step, {})".format(
    ", ".join(f'"{s}"' for s in PROBE_COLUMNS)
)
_HISTS_INSERT = "INSERT OR REPLACE INTO probe_hists (lid, step, lo, hi, counts)"
_STEPS_INSERT = "INSERT OR REPLACE INTO probe_steps (rk, step, seq)"


@lru_cache(maxsize=64)
def _values_sql(head: str, width: int, rows: int, tail: str) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([row] * rows)} {tail}"


def insert_many(
    conn: sqlite3.Connection,
    head: str,
    width: int,
    rows: Sequence[tuple[Any, ...]],
    tail: str = "",
) -> None:
    """``head`` (``INSERT ... INTO t (cols)``) for every row, in order, a few statements
    in all; ``tail`` follows the VALUES (an ``ON CONFLICT ... DO UPDATE`` clause, which
    SQLite applies row by row, so a later row sees an earlier one's effect). Rows later
    in the list win a conflict, as they would one row at a time."""
    at, total = 0, len(rows)
    for size in INSERT_SIZES:
        while total - at >= size:
            conn.execute(
                _values_sql(head, width, size, tail),
                list(chain.from_iterable(rows[at : at + size])),
            )
            at += size


class ProbeRows:
    """The probe rows of one append, written together by ``flush``."""

    def __init__(self) -> None:
        self.stats: list[tuple[Any, ...]] = []
        self.hists: list[tuple[Any, ...]] = []
        self.steps: list[tuple[int, int, int]] = []

    def add(
        self,
        rk: int,
        seq: int,
        frame: dict[str, Any],
        lid_of: Callable[[int, str], int],
        steps: list[int],
        validated: bool = False,
    ) -> None:
        """validated: the frame is wire.validate_probe's output (it came with its wire text,
        Store.append's contract), so its stats are finite floats or None and its counts
        non-negative ints; checking them again cost a fifth of the writer's probe time."""
        step = check_step(frame.get("step"), f"probe frame seq {seq}: step")
        layers = frame.get("layers")
        if not isinstance(layers, list):
            raise StoreError(f"probe frame seq {seq}: 'layers' must be a list")
        steps.append(step)
        if validated:
            self._add_validated(rk, seq, step, layers, lid_of)
            return
        stats_rows, hist_rows = self.stats, self.hists
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise StoreError(f"probe frame seq {seq}: layers[{i}] must be an object")
            lid = lid_of(rk, str(layer.get("name") or ""))
            stats = list(map(layer.get, PROBE_COLUMNS))
            # One C-level type walk and a sum any inf/nan poisons stand in for a
            # finite() call per stat.
            if not (set(map(type, stats)) <= _FLOAT_OR_NONE and isfinite(sum(filter(None, stats)))):
                stats = [finite(layer.get(s), f"layers[{i}].{s}") for s in PROBE_COLUMNS]
            stats_rows.append((lid, step, *stats))
            hist = layer.get("hist")
            if hist is None:
                continue
            counts = hist.get("counts") if isinstance(hist, dict) else None
            # set(map(type, ...)) walks the list in C: a per-count Python check was
            # the writer's largest cost at 50 layers x 64 bins per frame.
            if not isinstance(counts, list) or (
                counts and (not set(map(type, counts)) <= _INT_ONLY or min(counts) < 0)
            ):
                raise StoreError(
                    f"probe frame seq {seq}: layers[{i}].hist.counts must be non-negative integers"
                )
            lo, hi = hist.get("lo"), hist.get("hi")
            if type(lo) is not float or not isfinite(lo):
                lo = finite(lo, f"layers[{i}].hist.lo")
            if type(hi) is not float or not isfinite(hi):
                hi = finite(hi, f"layers[{i}].hist.hi")
            hist_rows.append((lid, step, lo, hi, pack_counts(counts)))
        self.steps.append((rk, step, seq))

    def _add_validated(
        self,
        rk: int,
        seq: int,
        step: int,
        layers: list[dict[str, Any]],
        lid_of: Callable[[int, str], int],
    ) -> None:
        """Every layer of validate_probe's output holds every key: its rows are built a
        column at a time by C-level maps rather than a layer at a time."""
        lids = [lid_of(rk, name) for name in map(_NAME, layers)]
        columns = [map(getter, layers) for getter in _STAT_GETTERS]
        self.stats.extend(zip(lids, repeat(step, len(lids)), *columns, strict=True))
        self.hists.extend(
            (lid, step, hist["lo"], hist["hi"], pack_counts(hist["counts"]))
            for lid, hist in zip(lids, map(_HIST, layers), strict=True)
            if hist is not None
        )
        self.steps.append((rk, step, seq))

    def flush(self, conn: sqlite3.Connection) -> None:
        insert_many(conn, _STATS_INSERT, len(PROBE_COLUMNS) + 2, self.stats)
        insert_many(conn, _HISTS_INSERT, 5, self.hists)
        insert_many(conn, _STEPS_INSERT, 3, self.steps)
        self.stats, self.hists, self.steps = [], [], []
