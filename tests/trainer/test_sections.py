"""Sections.build: every layer's calls gathered in layer order whatever stack they were
reduced in, a layer's histogram over all its calls, unit ratios per layer."""

from __future__ import annotations

import math

import pytest
import torch
from layerscope.trainer import reduce, stats
from layerscope.trainer.sections import Accumulated, Sections


def test_calls_from_several_stacks_are_gathered_in_layer_order() -> None:
    first = reduce.reduce_calls(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None, stats.NO_RULE)
    second = reduce.reduce_calls(torch.tensor([[5.0, 6.0]]), None, stats.NO_RULE)
    a, b = Accumulated(), Accumulated()
    a.rows += [(first.rows, 1), (second.rows, 0)]  # a ran twice: 2nd row of one stack, then
    a.samples += [torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]  # the other stack
    b.rows += [(first.rows, 0)]
    b.samples += [torch.tensor([1.0, 2.0])]
    for layer in (a, b):
        layer.totals += [2] * len(layer.rows)
    for _ in range(2):  # the second build uses the cached index
        sections, reduced = Sections().build([a, b], 4, None)
        assert not reduced
        rows = sections[0].view(-1, stats.RAW_WIDTH)
        assert rows[:, stats.LO].tolist() == [3.0, 5.0, 1.0]
        assert rows[:, stats.HI].tolist() == [4.0, 6.0, 2.0]
        assert sections[1].tolist() == [0.0, 0.0, 0.0]  # no non-finite value
        hist = sections[-1].view(2, 4)
        assert hist[0].tolist() == [1.0, 1.0, 1.0, 1.0]  # a: 3..6 over its merged [3, 6]
        assert hist[1].tolist() == [1.0, 0.0, 0.0, 1.0]  # b: 1 and 2 over [1, 2]
        units = sections[2].view(2, stats.UNIT_WIDTH)
        assert all(math.isnan(v) for v in units[:, 0].tolist())  # no units: no dead_ratio


def test_dead_ratio_per_layer_from_staged_unit_counts() -> None:
    relu = stats.module_rule(torch.nn.ReLU())
    x = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]])  # one call, 2 samples x 3 units
    call = reduce.reduce_calls(x.reshape(1, -1), reduce.unit_layout((2, 3), 1), relu)
    layer = Accumulated()
    layer.rows.append((call.rows, 0))
    layer.totals.append(6)
    layer.samples.append(x.reshape(-1))
    assert call.live is not None and call.sums is not None
    layer.live.append((call.live[0], 2))
    layer.sums.append((call.sums[0], 2))
    sections, _ = Sections().build([layer], 4, None)
    dead, saturated, _, spread_var = sections[2].tolist()
    assert dead == pytest.approx(1 / 3) and math.isnan(saturated)  # unit 0 never fires
    assert spread_var == pytest.approx(torch.tensor([0.0, 1.5, 1.5]).var(unbiased=False).item())
