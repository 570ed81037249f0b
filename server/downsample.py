"""downsample — which points of a long series a chart gets.

Owns: the min/max-per-bucket rule every series read uses, and the even choice of
steps for heatmaps. The rule, shared with the SQL version in queries.py:

* buckets split the step range [lo, hi] evenly: bucket(step) = (step - lo) * B // (hi - lo + 1);
* B = (max_points - 2) // (2 * columns), so first + last + a min and a max per
  column per bucket never exceed max_points;
* each bucket keeps, per column, the row holding its smallest and its largest
  finite value (the earliest on a tie); a bucket with no finite value keeps its
  first row, so a run that went NaN shows the gap;
* the first and the last row are always kept.

Never: touches SQLite; pure functions over plain lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def bucket_count(max_points: int, columns: int = 1) -> int:
    return max(1, (max_points - 2) // (2 * max(1, columns)))


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
