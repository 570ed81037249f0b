"""staging: a probe step's small outputs copied aside and reduced together at collect(),
and the stacks kept for the next probe step, through Probes as watch() drives it: each
step's statistics equal those of calls reduced in their hooks or of a fresh Probes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from layerscope.trainer import staging, stats
from layerscope.trainer.probes import Probes
from layerscope.trainer.sections import Block
from probing import Layers, probe_step, uniform
from torch import nn


class _Staged(nn.Module):
    """In-place ReLU, tanh, a shared Linear called twice, a conv feeding a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(6, 10), nn.ReLU(inplace=True)
        self.b, self.t = nn.Linear(10, 10), nn.Tanh()
        self.shared = nn.Linear(10, 10)
        self.conv, self.sig = nn.Conv2d(1, 3, 3, padding=1), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.t(self.b(self.act(self.a(x))) * 3)
        h = self.shared(self.shared(h))
        img = self.sig(self.conv(h[:, :9].reshape(-1, 1, 3, 3)))
        return h.sum() + img.sum()


@pytest.mark.parametrize("budget", [0, 200, None])  # every call in its hook, some, none
def test_staged_calls_give_the_statistics_of_calls_reduced_in_their_hook(
    monkeypatch: pytest.MonkeyPatch, budget: int | None, device: str
) -> None:
    torch.manual_seed(12)
    model = _Staged().to(device)
    x = uniform(16, 6, seed=3) * 2
    x[0, 0], x[1, 1] = float("nan"), float("inf")  # two rows of every output are non-finite
    x = x.to(device)
    monkeypatch.setattr(staging, "STAGE_CALL_VALUES", 0)
    in_hook, _ = probe_step(model, Probes(model, sample_values=None), x)
    monkeypatch.undo()
    if budget is not None:
        monkeypatch.setattr(staging, "STAGE_VALUES", budget)
    staged, _ = probe_step(model, Probes(model, sample_values=None), x)
    assert set(staged) == set(in_hook) == {"a", "act", "b", "t", "shared", "conv", "sig"}
    for name, expected in in_hook.items():
        got = staged[name]
        assert got["hist"] == expected["hist"], name
        for key in ("mean", "std", "min", "max", "zero_frac", "nonfinite", "dead_ratio",
                    "saturated_frac", "saturated_ratio", "unit_spread"):  # fmt: skip
            if expected[key] is None:
                assert got[key] is None, (name, key)
            else:
                assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), (name, key)
    assert in_hook["a"]["nonfinite"] == 2 * 10 and in_hook["shared"]["nonfinite"] == 2 * 2 * 10


class _Branchy(nn.Module):
    """Linear/tanh pairs of one shape, one taken only when asked, and an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ta = nn.Linear(6, 8), nn.Tanh()
        self.b, self.tb = nn.Linear(8, 8), nn.Tanh()
        self.c, self.relu = nn.Linear(8, 8), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, take_b: bool = True) -> torch.Tensor:
        h = self.ta(self.a(x) * 3)
        if take_b:
            h = self.tb(self.b(h))
        h = self.relu(self.c(h))
        return h.add_(1.0)  # in place after the ReLU's hook


def test_a_stack_kept_for_the_next_probe_step_gives_that_steps_own_statistics(
    device: str,
) -> None:
    """Each stack of a probe step is kept and the next step's hooks write into it in place;
    every step's statistics are still its own, as a fresh Probes measures them, when the
    next step is the same, skips a layer, takes it again, changes batch size or runs in
    bf16 (widened by the copy into the float32 stack)."""
    torch.manual_seed(5)
    model = _Branchy().to(device)
    probes = Probes(model, sample_values=None)

    def measure(p: Probes, x: torch.Tensor, take_b: bool) -> Layers:
        p.arm()
        model(x, take_b)
        pending = p.collect()
        assert pending is not None
        layers, _ = pending.decode(pending.tensor.cpu())
        return {layer["name"]: layer for layer in layers}

    steps = [(16, True, torch.float32), (16, True, torch.float32), (16, False, torch.float32),
             (16, True, torch.float32), (9, True, torch.float32), (9, True, torch.bfloat16)]  # fmt: skip
    for i, (batch, take_b, dtype) in enumerate(steps):
        model.to(dtype)
        x = uniform(batch, 6, seed=i).to(device, dtype)
        kept = {key: slots.buffer for key, slots in probes._staging.slots.items()}
        got = measure(probes, x, take_b)
        assert got == measure(Probes(model, sample_values=None), x, take_b), i
        assert (got["b"]["mean"] is not None) is take_b
        now = {key: slots.buffer for key, slots in probes._staging.slots.items()}
        reused = bool(kept) and all(now.get(k) is b for k, b in kept.items())
        assert reused is (i in (1, 5)), i  # the previous step's layout: written in place
    assert [key[0] for key in probes._staging.slots] == [torch.Size([9, 8])]  # the (16, 8) dropped


def test_kept_stacks_survive_an_inference_mode_forward_a_repeated_collect_and_layout_key(
    device: str,
) -> None:
    """A probe step recorded under torch.inference_mode keeps no stack the next step's
    hooks could not write into; collect() without a new arm() reports nothing (the last
    step is not reported twice); layout_key() then collect() (a process group's order)
    reduce once and keep the stacks."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)).to(device)
    probes = Probes(model)
    for batch, collect_too in ((5, False), (6, True)):  # a forward (and collect) so recorded
        probes.arm()
        with torch.inference_mode():
            model(torch.randn(batch, 4, device=device))
            pending = probes.collect() if collect_too else None
        assert pending is not None or probes.collect() is not None
        for _ in range(2):  # normal forwards of that batch now write into what was kept
            x = torch.randn(batch, 4, device=device)
            got, _ = probe_step(model, probes, x)
            assert got == probe_step(model, Probes(model), x)[0]
    assert probes.collect() is None  # no arm(), no forward: nothing new to report
    probes.arm()
    model(torch.randn(6, 4, device=device))  # the layout of the last step
    kept = {key: slots.buffer for key, slots in probes._staging.slots.items()}
    assert probes.layout_key() != 0
    assert probes.collect() is not None
    now = {key: slots.buffer for key, slots in probes._staging.slots.items()}
    assert len(kept) == 2 and now.keys() == kept.keys()
    assert all(now[key] is buffer for key, buffer in kept.items())


class _Repeated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, times: int) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(times):
            h = torch.tanh(self.shared(h))
        return self.out(h)


def test_a_shared_module_called_more_often_than_in_the_last_step_counts_every_call() -> None:
    """A kept stack has one row per layer: a module's extra calls this step are copied
    aside, not written over its row, and every call counts."""
    torch.manual_seed(6)
    model = _Repeated()
    probes = Probes(model, sample_values=None)
    for i, times in enumerate((1, 3, 3, 1, 2)):
        x = uniform(7, 3, seed=i)
        got, expected = [], []
        for p, out in ((probes, got), (Probes(model, sample_values=None), expected)):
            p.arm()
            model(x, times)
            pending = p.collect()
            assert pending is not None
            out += [pending.calls, pending.decode(pending.tensor)[0]]
        assert got == expected, (i, times)
        assert got[0][pending.act_layers.index("shared")] == times


class _TwoSame(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, rows_for_b: int) -> torch.Tensor:
        return self.a(x).sum() + self.b(x[:rows_for_b]).sum()


def test_a_kept_stack_rebuilt_from_one_row_of_an_older_one_does_not_hold_the_older() -> None:
    """When one layer of a kept two-row stack changes shape, the other's row is copied
    into a stack of its own: no view keeps the older stack's storage (STAGE_VALUES is
    the bound on what is kept between probe steps)."""
    model = _TwoSame()
    probes = Probes(model, sample_values=None)
    for step, rows_for_b in enumerate((5, 3, 3)):
        x = uniform(5, 8, seed=step)
        probes.arm()
        model(x, rows_for_b)
        pending = probes.collect()
        assert pending is not None and pending.totals == [40, 8 * rows_for_b]
        assert all(slots.buffer._base is None for slots in probes._staging.slots.values())
        kept = sum(slots.buffer.numel() for slots in probes._staging.slots.values())
        assert kept == 40 + 8 * rows_for_b


@dataclass(eq=False)
class _Layer:
    index: int
    rule: stats.Rule


def test_staging_takes_small_calls_within_the_budget_as_copies_and_refuses_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Staging on its own: a call above STAGE_CALL_VALUES or past the step's STAGE_VALUES
    is left to its hook; a staged one is a copy (an in-place change after its hook does not
    reach it), and one reduce() gives a block per rule of each (shape, axis) stack."""
    monkeypatch.setattr(staging, "STAGE_CALL_VALUES", 12)
    monkeypatch.setattr(staging, "STAGE_VALUES", 30)
    relu, tanh = stats.module_rule(nn.ReLU()), stats.module_rule(nn.Tanh())
    stage = staging.Staging(lambda x: x)
    stage.new_step()
    a, b, c = torch.full((3, 4), -1.0), torch.ones(3, 4), torch.ones(4, 4)
    assert not stage.take(_Layer(0, relu), c, 1)  # 16 values > 12 per call
    assert stage.take(_Layer(1, relu), a, 1) and stage.take(_Layer(2, tanh), b, 1)
    a.fill_(5.0)  # in place after the hook: not what was seen
    assert not stage.take(_Layer(3, relu), b.clone(), 1)  # 24 staged + 12 > 30
    blocks: list[Block] = []
    stage.reduce(blocks)
    assert [block.indices for block in blocks] == [(1,), (2,)]
    assert blocks[0].samples.tolist() == [[-1.0] * 12] and blocks[1].samples.tolist() == [
        [1.0] * 12
    ]
    hi = stats.RAW_WIDTH - 1  # lo, hi: the last two raw values
    assert blocks[0].stats.rows[0, hi].item() == -1.0 and blocks[1].stats.rows[0, hi].item() == 1.0
