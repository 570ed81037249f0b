"""histograms: the counts blob round-trips exactly; resampling onto common edges conserves
mass and puts it where the values were."""

from __future__ import annotations

import math
import random

import pytest
from layerscope.server.histograms import common_edges, pack_counts, resample, unpack_counts


@pytest.mark.parametrize(
    "counts", [[], [0] * 64, [1, 2, 3, 4], [2**32 + 5, 0, 7], list(range(1024))]
)
def test_counts_round_trip_through_the_blob(counts: list[int]) -> None:
    assert unpack_counts(pack_counts(counts)) == counts


def test_blob_uses_two_bytes_a_bin_when_counts_fit() -> None:
    # 64 bins of a typical batch (counts < 65536): 1 tag byte + 128 bytes
    assert len(pack_counts([0] * 60 + [5, 9, 1, 65535])) == 1 + 2 * 64
    assert len(pack_counts([0] * 63 + [65536])) == 1 + 4 * 64


def test_unknown_blob_tag_is_refused() -> None:
    with pytest.raises(ValueError, match="tag"):
        unpack_counts(b"Zxxx")


def test_exact_resampling_onto_a_wider_grid() -> None:
    a = (0.0, 4.0, [1, 2, 3, 4])
    b = (2.0, 6.0, [4, 0, 0, 4])
    edges = common_edges([a, b], 3)
    assert edges == [0.0, 2.0, 4.0, 6.0]
    assert resample(a, edges) == [3.0, 7.0, 0.0]
    assert resample(b, edges) == [0.0, 4.0, 4.0]


def test_a_source_bin_split_across_targets_in_proportion() -> None:
    # one bin over [0, 3) holding 6 values onto [0,1),[1,2),[2,3): 2 each
    assert resample((0.0, 3.0, [6]), [0.0, 1.0, 2.0, 3.0]) == pytest.approx([2.0, 2.0, 2.0])
    # [0, 2) holding 4 onto edges 0, 0.5, 3: a quarter of the bin in the first target
    assert resample((0.0, 2.0, [4]), [0.0, 0.5, 3.0]) == pytest.approx([1.0, 3.0])


def test_mass_is_conserved_for_random_histograms() -> None:
    rng = random.Random(11)
    hists = []
    for _ in range(40):
        lo = rng.uniform(-5, 5)
        hi = lo + rng.choice([0.0, rng.uniform(0.01, 10)])
        hists.append((lo, hi, [rng.randint(0, 1000) for _ in range(rng.randint(1, 128))]))
    for bins in (1, 7, 64, 1024):
        edges = common_edges(hists, bins)
        assert len(edges) == bins + 1
        for h in hists:
            row = resample(h, edges)
            assert len(row) == bins and min(row) >= 0
            assert sum(row) == pytest.approx(sum(h[2]), rel=1e-9)


def test_degenerate_ranges() -> None:
    # every value equal: lo == hi, all mass in the bin holding it
    edges = common_edges([(1.0, 1.0, [0, 5, 0])], 4)
    assert edges[0] == 0.5 and edges[-1] == 1.5
    assert resample((1.0, 1.0, [0, 5, 0]), edges) == [0.0, 0.0, 5.0, 0.0]
    assert common_edges([None], 2) == [0.0, 0.5, 1.0]


def test_huge_and_float_edge_ranges_keep_finite_edges_and_their_mass() -> None:
    """A diverging run's histograms: every value 1e17 (adding 0.5 is lost to rounding, so
    the width was 0 and resample divided by it), or values spanning -1e308..1e308 (hi - lo
    overflows to inf, the edges became NaN): GET /histograms answered 500 for both."""
    for hist in ((1e17, 1e17, [0, 5, 0]), (-1e308, 1e308, [3, 0, 4]), (1.7e308, 1.7e308, [2])):
        edges = common_edges([hist], 8)
        assert all(math.isfinite(e) for e in edges), hist
        assert all(a < b for a, b in zip(edges, edges[1:], strict=False)), hist
        row = resample(hist, edges)
        assert sum(row) == pytest.approx(sum(hist[2])), hist
    wide = resample((-1e308, 1e308, [3, 0, 4]), common_edges([(-1e308, 1e308, [3, 0, 4])], 3))
    assert wide == pytest.approx([3.0, 0.0, 4.0])


def test_ordinary_ranges_resample_exactly_as_before_and_a_subnormal_range_is_a_point() -> None:
    rng = random.Random(3)
    for _ in range(300):
        lo = rng.uniform(-100, 100)
        hist = (lo, lo + rng.uniform(0.001, 50), [rng.randint(0, 9) for _ in range(7)])
        edges = common_edges([hist], 13)
        width = (hist[1] - lo) / 13
        assert edges == [lo + i * width for i in range(13)] + [hist[1]]
        assert sum(resample(hist, edges)) == pytest.approx(sum(hist[2]))
    tiny = (0.0, 5e-324, [1, 2])
    assert sum(resample(tiny, common_edges([tiny], 4))) == 3
