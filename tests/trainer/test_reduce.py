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
