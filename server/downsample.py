"""downsample — which points of a long series a chart gets.

Owns: the min/max-per-bucket rule every series read uses, the per-block summaries
the store keeps so a long series is read without touching its raw rows, and the
even choice of steps for heatmaps.

The rule: split the steps into at most B buckets, B = (max_points - 2) // (2 * columns);
each bucket keeps, per column, the point holding its smallest and its largest finite
value (the earliest on a tie); a bucket with no finite value keeps its first point,
so a run that went NaN shows the gap; the first and the last point are always kept.
So at most max_points points come back and no spike is ever averaged away.

Buckets over raw rows split [lo, hi] evenly: step s goes to bucket
(s - lo) * B // (hi - lo + 1) (minmax_rows). Over block summaries
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
# cost is five summaries per stored point in the writer process.
BLOCK_LEVELS = (16, 64, 256, 1024, 4096)


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


def minmax_rows(
    steps: Sequence[int], columns: Sequence[Sequence[float | None]], max_points: int
) -> list[int]:
    """Indices (ascending) of the rows to keep; every row when they already fit.
    steps must be ascending. One flat pass per column (this runs on every probe read)."""
    n = len(steps)
    if n <= max_points:
        return list(range(n))
    lo, span = steps[0], steps[-1] - steps[0] + 1
    buckets = bucket_count(max_points, len(columns))
    keep = {0, n - 1}
    if buckets == 0:
        return sorted(keep)
    bucket = [(s - lo) * buckets // span for s in steps]
    with_finite: set[int] = set()
    for column in columns:
        current, low, high = -1, -1, -1
        low_v = high_v = 0.0
        for i, v in enumerate(column):
            b = bucket[i]
            if b != current:
                if low >= 0:
                    keep.update((low, high))
                    with_finite.add(current)
                current, low, high = b, -1, -1
            if v is None:
                continue
            if low < 0:
                low = high = i
                low_v = high_v = v
                continue
            if v < low_v:
                low, low_v = i, v
            if v > high_v:
                high, high_v = i, v
        if low >= 0:
            keep.update((low, high))
            with_finite.add(current)
    first_row: dict[int, int] = {}
    for i, b in enumerate(bucket):
        first_row.setdefault(b, i)
    keep.update(i for b, i in first_row.items() if b not in with_finite)
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
