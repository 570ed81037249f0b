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
    a.samples += [
        (torch.tensor([[3.0, 4.0]]), 0),
        (torch.tensor([[5.0, 6.0]]), 0),
    ]  # the other stack
    b.rows += [(first.rows, 0)]
    b.samples += [(torch.tensor([[1.0, 2.0]]), 0)]
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
    layer.samples.append((x.reshape(1, -1), 0))
    assert call.live is not None and call.sums is not None
    layer.live.append((call.live[0], 2))
    layer.sums.append((call.sums[0], 2))
    sections, _ = Sections().build([layer], 4, None)
    dead, saturated, _, spread_var = sections[2].tolist()
    assert dead == pytest.approx(1 / 3) and math.isnan(saturated)  # unit 0 never fires
    assert spread_var == pytest.approx(torch.tensor([0.0, 1.5, 1.5]).var(unbiased=False).item())


def test_samples_of_one_call_per_layer_are_gathered_from_their_blocks_and_padded() -> None:
    """Each layer's histogram sample is a row of a block (a stack's, or one hooked
    call's); the rows come out in layer order, the narrower block NaN-padded."""
    wide = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    narrow = torch.tensor([[7.0, 8.0]])
    layers = [Accumulated(), Accumulated(), Accumulated()]
    layers[0].samples.append((narrow, 0))
    layers[1].samples.append((wide, 1))
    layers[2].samples.append((wide, 0))
    for layer, n in zip(layers, (2, 3, 3), strict=True):
        layer.totals.append(n)  # every value sampled: the calls' rates agree
    for _ in range(2):  # the second time through the cached index
        padded = Sections()._padded(layers, torch.device("cpu"))
        assert padded.tolist()[0][:2] == [7.0, 8.0] and math.isnan(padded[0, 2])
        assert padded.tolist()[1:] == [[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]]
    layers[2].samples.append((narrow, 0))  # a second call: the layer's calls are joined
    layers[2].totals.append(2)
    padded = Sections()._padded(layers, torch.device("cpu"))
    assert padded.shape == (3, 5)
    assert padded[2].tolist() == [1.0, 2.0, 3.0, 7.0, 8.0]
    assert padded[1, :3].tolist() == [4.0, 5.0, 6.0] and padded[1, 3:].isnan().all()


class _Mixed(torch.nn.Module):
    """Two stacks of two rules each (a Linear's outputs with its tanh's, of two widths),
    a ReLU, and a conv output large enough to be reduced in its hook."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ta = torch.nn.Linear(6, 8), torch.nn.Tanh()
        self.b, self.tb = torch.nn.Linear(8, 8), torch.nn.Tanh()
        self.c, self.relu = torch.nn.Linear(8, 5), torch.nn.ReLU()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.c(self.tb(self.b(self.ta(self.a(x) * 3)))))
        return h.sum() + self.conv(img).sum()


def test_one_call_per_layer_is_gathered_block_by_block_as_the_general_path_does(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """When every layer made one call, collect() gathers the reductions' blocks as they
    are (a plan per layout, reused); the flat tensor and its layout are what the general,
    call-by-call path gives, for each batch size (each a layout of its own)."""
    from layerscope.trainer import staging
    from layerscope.trainer.probes import Probes

    monkeypatch.setattr(staging, "STAGE_CALL_VALUES", 200)  # the conv: in its hook
    torch.manual_seed(3)
    model = _Mixed().to(device)
    fast, general = Probes(model, sample_values=16), Probes(model, sample_values=16)
    monkeypatch.setattr(general._sections, "block_plan", lambda blocks: None)
    gathered = []
    real = fast._sections.build_blocks

    def spy(*args: object) -> list[torch.Tensor]:
        gathered.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fast._sections, "build_blocks", spy)
    for batch in (16, 16, 7):
        x = torch.rand(batch, 6, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        x[0, 0] = float("nan")  # one row of the first stack is non-finite
        img = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        results = []
        for probes in (fast, general):
            probes.arm()
            model(x.to(device), img.to(device))
            pending = probes.collect()
            assert pending is not None
            results.append(pending)
        a, b = results
        assert (a.act_layers, a.calls, a.totals) == (b.act_layers, b.calls, b.totals)
        assert a.act_layers == ["a", "ta", "b", "tb", "c", "relu", "conv"]
        assert a.totals == [batch * 8] * 4 + [batch * 5] * 2 + [batch * 4 * 64]
        torch.testing.assert_close(a.tensor, b.tensor, rtol=1e-6, atol=0.0, equal_nan=True)
        assert a.decode(a.tensor.cpu()) == b.decode(b.tensor.cpu())
    assert len(gathered) == 3
    plans = [plan for key, plan in fast._sections._cache.items() if key[0] == "blocks"]
    assert len(plans) == 2  # batch 16's plan reused, then batch 7's
    for plan in plans:
        for unit in (plan.live, plan.inside, plan.sums):
            assert unit is not None
            has = unit.unit_count.cpu() > 0  # each layer's first unit is one of its own
            mine = unit.segments.cpu()[unit.firsts.cpu()]
            assert torch.equal(mine[has], torch.arange(len(plan.layers))[has])
