"""downsample — which points of a long series a chart gets.

Owns: the min/max-per-bucket rule every series read uses, the per-block summaries
(Extremes) the store keeps so a long series is read without touching its raw rows,
and the even choice of steps for heatmaps.

The rule: split the steps into at most B buckets, B = (max_points - 2) // (2 * columns);
each bucket keeps, per column, the point holding its smallest and its largest finite
value (the earliest on a tie); a bucket with no finite value keeps its first point,
so a run that went NaN shows the gap; the first and the last point are always kept.
So at most max_points points come back and no spike is ever averaged away.

Buckets over raw rows split [lo, hi] evenly (bucket_of). Over block summaries
(aligned blocks of one of BLOCK_LEVELS steps, at least B of them in the range),
block j of the range goes to bucket j * B // blocks: the same rule with bucket
edges rounded to block edges.

Never: touches SQLite; pure functions over plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
# (n, first_step, last_step, min_step, min_value, max_step, max_value, null_step,
#  finite, total): finite/total count and sum the finite values, for means.
SummaryRow = tuple[
    int,
    int | None,
    int | None,
    int | None,
    float | None,
    int | None,
    float | None,
    int | None,
    int,
    float,
]


# Steps per block summary, one table row per (series, level, block). Each level is
# 4x the last, so a read touches at most ~4 * B block rows whatever the range; the
# cost is five summaries per stored point on the writer thread.
BLOCK_LEVELS = (16, 64, 256, 1024, 4096)


class Extremes:
    """Summary of a run of (step, value) points: count, step span, the min and max
    finite points, the first null point. Points are added in any order."""

    __slots__ = (
        "n",
        "first_step",
        "last_step",
        "min_step",
        "min_value",
        "max_step",
        "max_value",
        "null_step",
        "finite",
        "total",
    )

    def __init__(self) -> None:
        self.n = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.min_step: int | None = None
        self.min_value: float | None = None
        self.max_step: int | None = None
        self.max_value: float | None = None
        self.null_step: int | None = None
        self.finite = 0
        self.total = 0.0

    def add(self, step: int, value: float | None) -> None:
        finite = value is not None
        self.merge(
            (
                1,
                step,
                step,
                step,
                value,
                step,
                value,
                None if finite else step,
                int(finite),
                value or 0.0,
            )
        )

    def merge(self, row: SummaryRow) -> None:
        """Fold in another summary (a stored block row, or one point via add)."""
        n, first, last, min_step, min_value, max_step, max_value, null_step, finite, total = row
        self.n += n
        self.finite += finite
        self.total += total
        if self.first_step is None or (first is not None and first < self.first_step):
            self.first_step = first
        if self.last_step is None or (last is not None and last > self.last_step):
            self.last_step = last
        if null_step is not None and (self.null_step is None or null_step < self.null_step):
            self.null_step = null_step
        if min_value is not None and (
            self.min_value is None
            or min_value < self.min_value
            or (min_value == self.min_value and min_step < self.min_step)  # type: ignore[operator]
        ):
            self.min_step, self.min_value = min_step, min_value
        if max_value is not None and (
            self.max_value is None
            or max_value > self.max_value
            or (max_value == self.max_value and max_step < self.max_step)  # type: ignore[operator]
        ):
            self.max_step, self.max_value = max_step, max_value

    def row(self) -> SummaryRow:
        return (
            self.n,
            self.first_step,
            self.last_step,
            self.min_step,
            self.min_value,
            self.max_step,
            self.max_value,
            self.null_step,
            self.finite,
            self.total,
        )

    def points(self) -> list[tuple[int, float | None]]:
        """What a bucket with this summary contributes to a chart."""
        if self.min_step is not None and self.max_step is not None:
            return [(self.min_step, self.min_value), (self.max_step, self.max_value)]
        if self.first_step is not None:
            return [(self.first_step, None)]
        return []


def block_summaries(
    points: Sequence[tuple[int, float | None]], size: int
) -> list[tuple[int, SummaryRow]]:
    """(block, summary) for points sorted by step, blocks of `size` steps.

    The writer runs this on every stored metrics row (three levels), so it is one
    flat loop with no per-point objects.
    """
    out: list[tuple[int, SummaryRow]] = []
    current = -1
    n = first = last = 0
    min_step: int | None = None
    min_value: float | None = None
    max_step: int | None = None
    max_value: float | None = None
    null_step: int | None = None
    finite = 0
    total = 0.0
    for step, value in points:
        block = step // size
        if block != current:
            if n:
                row = (
                    n,
                    first,
                    last,
                    min_step,
                    min_value,
                    max_step,
                    max_value,
                    null_step,
                    finite,
                    total,
                )
                out.append((current, row))
            current, n, first, finite, total = block, 0, step, 0, 0.0
            min_step = min_value = max_step = max_value = null_step = None
        n += 1
        last = step
        if value is None:
            if null_step is None:
                null_step = step
            continue
        finite += 1
        total += value
        if min_value is None or value < min_value:
            min_step, min_value = step, value
        if max_value is None or value > max_value:
            max_step, max_value = step, value
    if n:
        row = (n, first, last, min_step, min_value, max_step, max_value, null_step, finite, total)
        out.append((current, row))
    return out


def choose_level(lo: int, hi: int, buckets: int) -> int | None:
    """The coarsest block size that still gives every bucket at least one block;
    None when [lo, hi] is short enough to read raw rows (under ~16 * buckets steps)."""
    for size in reversed(BLOCK_LEVELS):
        if hi // size - lo // size + 1 >= buckets:
            return size
    return None


def bucket_count(max_points: int, columns: int = 1) -> int:
    """0 when max_points leaves room for only the first and last points."""
    return max(0, (max_points - 2) // (2 * max(1, columns)))


def bucket_of(step: int, lo: int, hi: int, buckets: int) -> int:
    return (step - lo) * buckets // (hi - lo + 1)


def minmax_rows(
    steps: Sequence[int], columns: Sequence[Sequence[float | None]], max_points: int
) -> list[int]:
    """Indices (ascending) of the rows to keep; every row when they already fit."""
    n = len(steps)
    if n <= max_points:
        return list(range(n))
    lo, hi = steps[0], steps[-1]
    buckets = bucket_count(max_points, len(columns))
    keep = {0, n - 1}
    if buckets == 0:
        return sorted(keep)
    bucket_rows: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        bucket_rows.setdefault(bucket_of(step, lo, hi, buckets), []).append(i)
    for rows in bucket_rows.values():
        any_finite = False
        for column in columns:
            best_min: int | None = None
            best_max: int | None = None
            for i in rows:
                v = column[i]
                if v is None:
                    continue
                if best_min is None or v < column[best_min]:  # type: ignore[operator]
                    best_min = i
                if best_max is None or v > column[best_max]:  # type: ignore[operator]
                    best_max = i
            if best_min is not None and best_max is not None:
                any_finite = True
                keep.add(best_min)
                keep.add(best_max)
        if not any_finite:
            keep.add(rows[0])
    return sorted(keep)


def pick_even(items: Sequence[T], k: int) -> list[T]:
    """At most k items spread evenly over the sequence, first and last included
    (k == 1 keeps only the last: the newest step is the one a viewer is watching)."""
    n = len(items)
    if n <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    chosen = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in chosen]
