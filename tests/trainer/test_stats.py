"""The statistic definitions of DESIGN §3 as pure tensor functions, checked against
numpy and hand-built tensors whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from layerscope.trainer import stats
from torch import nn


def _row_stats(*chunks: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float64)
    rows = stats.canonical(torch.stack([stats.value_row(c, zero) for c in chunks]))
    merged = rows[0]
    for i in range(1, len(chunks)):
        merged = stats.combine(merged, rows[i])
    return stats.finish_values(merged[None], torch.full((1,), math.nan, dtype=torch.float64))[0]


def test_moments_min_max_zero_frac_are_those_of_the_finite_values() -> None:
    x = torch.tensor([1.0, 0.0, -3.0, float("nan"), 5.0, float("inf"), 0.0, float("-inf")])
    finite = np.array([1.0, 0.0, -3.0, 5.0, 0.0])
    mean, std, lo, hi, zero_frac, nonfinite, saturated = _row_stats(x).tolist()
    assert mean == pytest.approx(finite.mean())
    assert std == pytest.approx(finite.std())  # population std, numpy's default
    assert (lo, hi) == (-3.0, 5.0)
    assert zero_frac == 2 / 8  # a fraction of all values; NaN is not zero
    assert nonfinite == 3
    assert math.isnan(saturated)  # this layer has no saturation rule


def test_moments_survive_a_large_offset() -> None:
    gen = torch.Generator().manual_seed(1)
    x = 1000.0 + torch.randn(4096, generator=gen)
    x[7] = float("nan")
    ref = x.double()[torch.isfinite(x)].numpy()
    mean, std = _row_stats(x).tolist()[:2]
    assert mean == pytest.approx(ref.mean(), rel=1e-6)
    assert std == pytest.approx(ref.std(), rel=1e-3)


def test_all_nonfinite_gives_no_moments() -> None:
    x = torch.tensor([float("nan"), float("inf")])
    mean, std, lo, hi, zero_frac, nonfinite, _ = _row_stats(x).tolist()
    assert math.isnan(mean) and math.isnan(std)
    assert math.isinf(lo) and math.isinf(hi)  # decode turns these into None
    assert (zero_frac, nonfinite) == (0.0, 2.0)


def test_merging_calls_equals_the_statistics_of_all_values_together() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(300, generator=gen) * 2 + 1
    b = torch.randn(50, generator=gen) - 4
    b[3] = float("inf")
    c = torch.zeros(10)
    merged = _row_stats(a, b, c)
    together = _row_stats(torch.cat([a, b, c]))
    assert torch.allclose(merged, together, rtol=1e-6, equal_nan=True)


def test_histogram_counts_match_numpy_on_the_same_edges() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=gen)
    lo, hi = x.min().double(), x.max().double()
    counts = stats.histograms(x, torch.zeros(5000, dtype=torch.long), lo[None], hi[None], 64)[0]
    ref, _ = np.histogram(x.numpy(), bins=64, range=(lo.item(), hi.item()))
    assert counts.sum().item() == 5000
    assert counts.shape == (64,)
    # Edges are computed in float32 here and float64 in numpy: a value within an ulp
    # of an edge may land one bin over, nothing else may differ.
    assert np.abs(counts.numpy() - ref).sum() <= 4


def test_histogram_of_bin_centres_is_exact_and_includes_hi() -> None:
    gen = torch.Generator().manual_seed(4)
    lo, hi, bins = -2.0, 6.0, 8
    which = torch.randint(0, bins, (1000,), generator=gen)
    x = torch.cat([lo + (which.float() + 0.5), torch.tensor([lo, hi, hi])])
    expected = torch.bincount(which, minlength=bins).float()
    expected[0] += 1  # lo itself
    expected[-1] += 2  # hi lands in the last, closed bin
    got = stats.histograms(
        x, torch.zeros(len(x), dtype=torch.long), torch.tensor([lo]), torch.tensor([hi]), bins
    )[0]
    assert torch.equal(got, expected)
    ref, _ = np.histogram(x.numpy(), bins=bins, range=(lo, hi))
    assert got.tolist() == ref.tolist()


def test_histograms_of_several_layers_and_degenerate_ranges() -> None:
    values = torch.tensor([3.0, 3.0, 3.0, 0.0, 1.0, float("nan"), 2.0])
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    counts = stats.histograms(
        values, segments, torch.tensor([3.0, 0.0]), torch.tensor([3.0, 2.0]), 4
    )
    assert counts[0].tolist() == [3.0, 0.0, 0.0, 0.0]  # lo == hi: everything in bin 0
    assert counts[1].tolist() == [1.0, 0.0, 1.0, 1.0]  # the NaN is left out


def test_unit_fraction_reduces_every_axis_but_the_unit_axis() -> None:
    mask = torch.zeros(4, 3, 5, dtype=torch.bool)
    mask[:, 1, :2] = True
    assert torch.allclose(stats.unit_fraction(mask, 1), torch.tensor([0.0, 0.4, 0.0]))
    last = stats.unit_fraction(mask, 2)
    assert torch.allclose(last, torch.tensor([1 / 3, 1 / 3, 0, 0, 0]))
    assert stats.unit_fraction(torch.tensor([True, False]), 0).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("ndim", "channel_first", "axis"),
    [(0, False, None), (1, False, 0), (2, False, 1), (3, False, 2), (3, True, 1), (4, False, 1),
     (5, False, 1)],
)  # fmt: skip
def test_unit_axis(ndim: int, channel_first: bool, axis: int | None) -> None:
    assert stats.unit_axis(ndim, channel_first) == axis


def test_unit_ratio_thresholds_are_the_named_constants() -> None:
    activity = torch.tensor([0.0, stats.DEAD_ACTIVITY_MAX, 0.02, 1.0, 0.5, 0.51])
    segments = torch.tensor([0, 0, 0, 0, 1, 1])
    units = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    dead = stats.unit_ratio(activity, segments, units, dead=True)
    assert dead[:2].tolist() == [0.5, 0.0] and math.isnan(dead[2].item())
    saturated = stats.unit_ratio(activity, segments, units, dead=False)
    assert saturated[:2].tolist() == [0.25, 0.5]  # a majority (> 0.5) is needed


@pytest.mark.parametrize(
    ("module", "live", "lo", "hi"),
    [
        (nn.ReLU(), 0.0, None, None),
        (nn.GELU(), 0.0, None, None),
        (nn.LeakyReLU(0.1), 0.0, None, None),
        (nn.Softplus(beta=2.0), math.log(2) / 2, None, None),
        (nn.Tanh(), None, -0.99, 0.99),
        (nn.Softsign(), None, -0.99, 0.99),
        (nn.Sigmoid(), None, 0.01, 0.99),
        (nn.Hardtanh(-2.0, 3.0), None, -2.0, 3.0),
        (nn.ReLU6(), 0.0, 0.0, 6.0),
        (nn.Hardsigmoid(), None, 0.0, 1.0),
        (nn.Linear(2, 2), None, None, None),
    ],
)
def test_module_rules(
    module: nn.Module, live: float | None, lo: float | None, hi: float | None
) -> None:
    rule = stats.module_rule(module)
    assert (rule.live_above, rule.sat_lo, rule.sat_hi) == (live, lo, hi)


def test_sigmoid_saturation_counts_both_tails() -> None:
    y = torch.tensor([0.0, 0.01, 0.011, 0.5, 0.989, 0.99, 1.0])
    mask = stats.saturated_mask(y, stats.module_rule(nn.Sigmoid()))
    assert mask.tolist() == [True, True, False, False, False, True, True]


def test_function_rule_applies_the_function_before_testing_saturation() -> None:
    pre = torch.tensor([-5.0, -1.0, 0.0, 2.0, 3.0])
    mask = stats.saturated_mask(pre, stats.FUNCTION_RULES["tanh"])
    assert mask.tolist() == (torch.tanh(pre).abs() >= 0.99).tolist()


def test_norms_handles_mixed_dtypes_in_order() -> None:
    tensors = [torch.ones(4), torch.full((9,), 2.0, dtype=torch.bfloat16), torch.tensor([3.0, 4.0])]
    assert stats.norms(tensors, torch.device("cpu")).tolist() == [2.0, 6.0, 5.0]


def test_device_side_index_vectors() -> None:
    cpu = torch.device("cpu")
    assert stats.segment_ids([2, 0, 3], cpu).tolist() == [0, 0, 2, 2, 2]
    assert stats.device_vector([1.5, 2], cpu).tolist() == [1.5, 2.0]
    assert stats.device_vector([], cpu).numel() == 0
