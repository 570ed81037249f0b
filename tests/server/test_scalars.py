"""scalars: the block summaries the writer keeps for every series level."""

from __future__ import annotations

import math
import random

from layerscope.server.downsample import BLOCK_LEVELS, block_summaries
from layerscope.server.scalars import _levels


def test_coarse_levels_merged_from_fine_ones_equal_a_walk_of_the_points() -> None:
    """The writer builds each coarser level by merging the finer one; a chart read off
    any level must see what a direct walk over the points gives: the same blocks,
    counts, extremes (earliest on a tie) and first null, and the same sums up to rounding."""
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(0, 300)
        start = rng.randint(0, 20_000)
        steps = sorted(rng.sample(range(start, start + 3 * n + 5), n))
        points = [
            (s, None if rng.random() < 0.1 else rng.choice([1.0, 2.0, -3.5, rng.random()]))
            for s in steps
        ]
        levels = _levels(points)
        assert [size for size, _ in levels] == list(BLOCK_LEVELS)
        for size, level in levels:
            want = block_summaries(points, size)
            assert [block for block, _ in level] == [block for block, _ in want]
            for (_, got_row), (_, want_row) in zip(level, want, strict=True):
                assert got_row[:9] == want_row[:9]
                assert math.isclose(got_row[9], want_row[9], rel_tol=1e-12, abs_tol=1e-12)
