"""downsample: the min/max-per-bucket rule, block summaries and even step choice, checked
against brute-force oracles written out here independently."""

from __future__ import annotations

import random
from typing import Any

import pytest
from layerscope.server.downsample import (
    BLOCK_LEVELS,
    block_summaries,
    bucket_count,
    choose_level,
    minmax_rows,
    pick_even,
)


def oracle_minmax(steps: list[int], values: list[float | None], max_points: int) -> list[int]:
    """The rule as written in downsample's docstring, computed the slow, obvious way."""
    if len(steps) <= max_points:
        return list(range(len(steps)))
    buckets = (max_points - 2) // 2
    lo, hi = steps[0], steps[-1]
    keep = {0, len(steps) - 1}
    for b in range(buckets):
        rows = [i for i, s in enumerate(steps) if (s - lo) * buckets // (hi - lo + 1) == b]
        finite = [i for i in rows if values[i] is not None]
        if finite:
            keep.add(min(finite, key=lambda i: (values[i], i)))
            keep.add(min(finite, key=lambda i: (-values[i], i)))  # type: ignore[operator]
        elif rows:
            keep.add(rows[0])
    return sorted(keep)


def test_minmax_rows_matches_the_oracle_on_random_series() -> None:
    rng = random.Random(7)
    for _ in range(25):
        n = rng.randint(1, 1200)
        steps = sorted(rng.sample(range(n * 3), n))
        values: list[float | None] = [
            None if rng.random() < 0.05 else round(rng.gauss(0, 1), 1) for _ in range(n)
        ]
        max_points = rng.randint(2, 150)
        assert minmax_rows(steps, [values], max_points) == oracle_minmax(steps, values, max_points)


def test_spike_first_and_last_survive_and_max_points_holds() -> None:
    n = 100_000
    steps = list(range(n))
    values: list[float | None] = [0.5] * n
    values[61_234] = 1e9
    for max_points in (2, 3, 4, 50, 1500):
        keep = minmax_rows(steps, [values], max_points)
        assert len(keep) <= max_points
        assert keep[0] == 0 and keep[-1] == n - 1
        if max_points >= 4:
            assert 61_234 in keep


def test_several_columns_share_rows_and_keep_each_columns_extremes() -> None:
    steps = list(range(1000))
    a: list[float | None] = [0.0] * 1000
    b: list[float | None] = [0.0] * 1000
    a[100], b[900] = 5.0, -5.0
    keep = minmax_rows(steps, [a, b], 42)
    assert len(keep) <= 42 and {0, 100, 900, 999} <= set(keep)
    assert bucket_count(42, 2) == 10


def summary_oracle(points: list[tuple[int, float | None]]) -> tuple[Any, ...]:
    steps = [s for s, _v in points]
    finite = [(v, s) for s, v in points if v is not None]
    nulls = [s for s, v in points if v is None]
    low = min(finite) if finite else (None, None)
    high = min(((-v, s) for v, s in finite), default=(None, None))
    return (
        len(points),
        min(steps),
        max(steps),
        low[1],
        low[0],
        high[1],
        None if high[0] is None else -high[0],
        min(nulls, default=None),
        len(finite),
    )


def test_block_summaries_match_an_oracle() -> None:
    rng = random.Random(3)
    points = [
        (s, None if rng.random() < 0.1 else round(rng.random(), 1)) for s in range(0, 5000, 3)
    ]
    for size in BLOCK_LEVELS:
        blocks = block_summaries(points, size)
        assert [b for b, _row in blocks] == sorted({s // size for s, _v in points})
        for block, row in blocks:
            inside = [(s, v) for s, v in points if s // size == block]
            assert row[:9] == summary_oracle(inside)
            assert row[9] == pytest.approx(sum(v for _s, v in inside if v is not None))


def test_choose_level_picks_the_coarsest_level_with_a_block_per_bucket() -> None:
    assert choose_level(0, 99_999, 749) == 64  # 1563 blocks of 64; 256 would give 391
    assert choose_level(0, 999, 749) is None  # short: read the raw rows
    assert choose_level(0, 10_000_000, 749) == 4096


def test_pick_even_keeps_first_and_last_and_at_most_k() -> None:
    items = list(range(10_000))
    chosen = pick_even(items, 300)
    assert len(chosen) == 300 and chosen[0] == 0 and chosen[-1] == 9_999
    assert chosen == sorted(set(chosen))
    gaps = {b - a for a, b in zip(chosen, chosen[1:], strict=False)}
    assert max(gaps) - min(gaps) <= 1
    assert pick_even(items, 1) == [9_999]
    assert pick_even([1, 2, 3], 10) == [1, 2, 3]
