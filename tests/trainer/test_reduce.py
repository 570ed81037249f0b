"""reduce_calls: a stack of same-shaped calls gives exactly what each call gives alone,
and the per-unit vectors and counts match hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch
from layerscope.trainer import reduce, stats
from torch import nn


def _calls(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 2, generator=gen) * 2  # 3 calls of a (4, 5, 2) output
    x[0, 1, 2, 0] = float("nan")
    x[1, 3, 0, 1] = float("inf")
    x[2, 0, 4, 1] = 0.0
    return x


@pytest.mark.parametrize(
    "rule",
    [stats.NO_RULE, stats.module_rule(nn.ReLU()), stats.FUNCTION_RULES["relu"],
     stats.module_rule(nn.Softplus()), stats.module_rule(nn.Tanh()),
     stats.module_rule(nn.Sigmoid()), stats.FUNCTION_RULES["tanh"]],
)  # fmt: skip
def test_a_stack_of_calls_reduces_like_each_call_alone(rule: stats.Rule) -> None:
    x = _calls(1)
    if rule.nonnegative:
        x = torch.relu(x)
    layout = reduce.unit_layout(x.shape[1:], 1)  # units on the second axis: 5 of them
    stacked = reduce.reduce_calls(x.reshape(3, -1), layout, rule)
    for i in range(3):
        alone = reduce.reduce_calls(x[i].reshape(1, -1), layout, rule)
        for field in ("rows", "minus_nonfinite", "sums", "live", "minus_inside"):
            a, b = getattr(alone, field), getattr(stacked, field)
            assert (a is None) == (b is None), field
            if a is not None:
                torch.testing.assert_close(b[i], a[0], equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rules",
    [
        [stats.FUNCTION_RULES["relu"], stats.module_rule(nn.ReLU())],  # a Linear and its ReLU
        [stats.FUNCTION_RULES["relu"], stats.module_rule(nn.Tanh()), stats.NO_RULE],
        [stats.module_rule(nn.ReLU()), stats.module_rule(nn.ReLU6())],  # every row nonnegative
        [stats.module_rule(nn.Sigmoid()), stats.module_rule(nn.Softplus())],
        # two ReLU-family inputs, relu6's bounded rule, a rule-less group first
        [stats.NO_RULE, stats.FUNCTION_RULES["relu"], stats.FUNCTION_RULES["relu6"]],
        [stats.FUNCTION_RULES["gelu"], stats.NO_RULE, stats.FUNCTION_RULES["relu"]],
    ],
)
def test_one_stack_of_several_rules_reduces_like_each_rule_alone(rules: list[stats.Rule]) -> None:
    """Rows of different rules share a stack: each group gets exactly the statistics of
    a stack of its own rows (the shared passes must not leak one rule's work into another's)."""
    per_rule = 2
    x = torch.cat([_calls(10 + k)[:per_rule] for k in range(len(rules))])
    for k, rule in enumerate(rules):
        if rule.nonnegative:
            x[k * per_rule : (k + 1) * per_rule].relu_()
    layout = reduce.unit_layout(x.shape[1:], 1)
    flat = x.reshape(len(x), -1)
    before = flat.clone()
    groups = [(rule, k * per_rule, (k + 1) * per_rule) for k, rule in enumerate(rules)]
    together = reduce.reduce_groups(flat, layout, groups)
    assert torch.equal(flat.isnan(), before.isnan())
    assert torch.equal(flat.nan_to_num(), before.nan_to_num())  # the input is left alone
    for (rule, start, end), got in zip(groups, together, strict=True):
        alone = reduce.reduce_calls(flat[start:end].clone(), layout, rule)
        for field in ("rows", "minus_nonfinite", "sums", "live", "minus_inside"):
            a, b = getattr(alone, field), getattr(got, field)
            assert (a is None) == (b is None), (rule, field)
            if a is not None:
                torch.testing.assert_close(b, a, equal_nan=True, rtol=1e-5, atol=1e-5)
        for column in (stats.NONZERO, stats.LO, stats.HI):  # counts and extremes: exact
            assert got.rows[:, column].tolist() == alone.rows[:, column].tolist()
        assert got.minus_nonfinite.tolist() == alone.minus_nonfinite.tolist()
        for field in ("live", "minus_inside"):
            a, b = getattr(alone, field), getattr(got, field)
            assert a is None or torch.equal(a, b)
    unitless = reduce.reduce_groups(flat, None, groups)  # no unit axis: no unit vectors
    for (rule, start, end), got in zip(groups, unitless, strict=True):
        alone = reduce.reduce_calls(flat[start:end].clone(), None, rule)
        assert got.live is None and got.minus_inside is None and got.sums is None
        assert got.rows[:, stats.NONZERO].tolist() == alone.rows[:, stats.NONZERO].tolist()


def test_counts_and_unit_vectors_match_a_hand_computation() -> None:
    x = _calls(2)
    layout = reduce.unit_layout(x.shape[1:], 1)
    got = reduce.reduce_calls(x.reshape(3, -1), layout, stats.FUNCTION_RULES["relu"])
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, torch.zeros(()))
    assert (-got.minus_nonfinite).tolist() == (~finite).sum((1, 2, 3)).float().tolist()
    assert got.live is not None and got.sums is not None
    assert got.live.tolist() == (clean > 0).sum((1, 3)).float().tolist()
    torch.testing.assert_close(got.sums, clean.sum((1, 3)))
    lo = torch.where(finite, x, torch.full((), math.inf)).amin((1, 2, 3))
    hi = torch.where(finite, x, torch.full((), -math.inf)).amax((1, 2, 3))
    assert got.rows[:, stats.LO].tolist() == lo.tolist()
    assert got.rows[:, stats.HI].tolist() == hi.tolist()
    assert got.rows[:, stats.NONZERO].tolist() == (clean != 0).sum((1, 2, 3)).float().tolist()


def test_a_call_without_units_and_a_call_with_no_finite_value() -> None:
    x = torch.tensor([[float("nan"), float("inf"), -float("inf")]])
    got = reduce.reduce_calls(x, None, stats.NO_RULE)
    assert got.sums is None and got.live is None and got.minus_inside is None
    assert got.minus_nonfinite.tolist() == [-3.0]
    assert got.rows[0, stats.LO].item() == math.inf and got.rows[0, stats.HI].item() == -math.inf


def _one(y: torch.Tensor, axis: int, rule: stats.Rule) -> reduce.CallStats:
    return reduce.reduce_calls(y.reshape(1, -1), reduce.unit_layout(y.shape, axis), rule)


def test_live_and_inside_counts_per_unit() -> None:
    y = torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.5, float("nan")]])
    relu_input = stats.FUNCTION_RULES["relu"]
    live = _one(y, 1, relu_input).live
    assert live is not None and live[0].tolist() == [2.0, 1.0, 0.0]
    relu = _one(torch.relu(y), 1, stats.module_rule(nn.ReLU())).live
    assert relu is not None and relu[0].tolist() == [2.0, 1.0, 0.0]
    above = _one(y, 1, stats.Rule(live_above=0.75)).live
    assert above is not None and above[0].tolist() == [2.0, 0.0, 0.0]
    other_axis = _one(y, 0, relu_input).live
    assert other_axis is not None and other_axis[0].tolist() == [1.0, 2.0]
    t = torch.tensor([[0.99, -0.995, 0.5], [0.98, 1.0, float("nan")]])
    tanh = _one(t, 1, stats.module_rule(nn.Tanh())).minus_inside
    assert tanh is not None and (-tanh[0]).tolist() == [1.0, 0.0, 2.0]
    s = torch.tensor([[0.0, 0.01, 0.011], [0.99, 0.989, float("nan")]])
    sigmoid = _one(s, 1, stats.module_rule(nn.Sigmoid())).minus_inside
    # 0 and 0.01 and 0.99 are pinned; NaN is not
    assert sigmoid is not None and (-sigmoid[0]).tolist() == [0.0, 1.0, 2.0]


def test_unit_sums_reduce_every_axis_but_the_unit_axis() -> None:
    ind = torch.zeros(4, 3, 5)
    ind[:, 1, :2] = 1.0
    flat = ind.reshape(1, -1)
    assert reduce.unit_sums(flat, reduce.unit_layout(ind.shape, 1))[0].tolist() == [0.0, 8.0, 0.0]
    by_last = reduce.unit_sums(flat, reduce.unit_layout(ind.shape, 2))[0].tolist()
    assert by_last == [4.0, 4.0, 0.0, 0.0, 0.0]
    one_d = torch.tensor([[1.0, 0.0]])
    assert reduce.unit_sums(one_d, reduce.unit_layout((2,), 0))[0].tolist() == [1.0, 0.0]


def test_function_rule_applies_the_function_before_testing_saturation() -> None:
    pre = torch.tensor([[-5.0, -1.0, 0.0, 2.0, 3.0]])  # five units of one value
    inside = _one(pre, 1, stats.FUNCTION_RULES["tanh"]).minus_inside
    assert inside is not None
    assert (-inside[0]).tolist() == (torch.tanh(pre).abs() < 0.99).float()[0].tolist()


def test_nonzero_counts_of_several_long_rows_are_exact() -> None:
    """Several rows' nonzero counts are a rounded squared norm up to 2**22 entries and a
    dot product above (where the rounded square would miss: 4,196,353 -> 4,196,354)."""
    for n in (1 << 22, 4_196_353):
        signs = torch.ones(2, n)
        signs[1, :5] = 0.0
        signs[1, 5:9] = -1.0
        assert reduce._nonzero_signs(signs).tolist() == [float(n), float(n - 5)]


@pytest.mark.parametrize("width", [64, 40_000])  # float64 squares / scaled float32 squares
def test_each_rows_spread_is_measured_whatever_the_others_magnitude(width: int) -> None:
    """One stack holding a N(0,1) row, a row of exploded activations (~1e25: a float32
    sum of squares overflowed past ~1e19 and the std was None), one past 2**48, one with
    no finite value and one of vanishing activations (~1e-24: float32 squares underflowed
    to 0, and the std read 0): every row's root of squares is its own, to float32
    precision. Both ways the reduction takes (a small stack in float64, a large one scaled
    by a power of two only where its spread is that large or small) give the same."""
    assert (5 * width <= reduce.FLOAT64_SQUARES_MAX) == (width == 64)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, width, generator=gen)
    x[1] = torch.relu(x[1]) * 3e25
    x[2] = x[2] * 1e15 + 5e14
    x[3] = float("nan")
    x[4] = x[4] * 1e-24
    got = reduce.reduce_calls(x, None, stats.NO_RULE).rows
    for i in (0, 1, 2, 4):
        row = x[i].double()
        want = (row - got[i, stats.SHIFT].double()).norm().item()
        assert got[i, stats.ROOT_S2].item() == pytest.approx(want, rel=1e-4, abs=0), i
        summary = stats.Summary()
        summary.add(got[i].tolist(), 0.0, width)
        assert summary.values()["std"] == pytest.approx(
            row.std(correction=0).item(), rel=1e-4, abs=0
        )
    assert got[3, stats.ROOT_S2].item() == 0.0  # nothing finite: no spread (std None)
    # the unscaled row is bit-identical to its reduction alone
    alone = reduce.reduce_calls(x[:1].clone(), None, stats.NO_RULE).rows
    assert torch.equal(alone[0], got[0])
