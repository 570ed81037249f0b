"""probe_rows — a batch of probe frames' rows, written many rows per INSERT (inserts.py).

Owns: turning probe frames into rows (per-layer stats in ``probes``, histogram blobs in
``probe_hists``, the step's frame in ``probe_steps``) and the checks an unvalidated probe
frame gets.

Never: commits (the writer process does), never runs on the event loop, never trusts
an unvalidated frame's shape (a bad one raises StoreError and its operation rolls back).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from itertools import repeat
from math import isfinite
from operator import itemgetter
from typing import Any

from layerscope.server.checks import StoreError, finite
from layerscope.server.checks import step as check_step
from layerscope.server.histograms import pack_counts
from layerscope.server.inserts import insert_many
from layerscope.server.schema import PROBE_COLUMNS

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
