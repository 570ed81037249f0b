"""Probes on real modules: every statistic against a hand-built answer, the unit axis
of each layer shape, the awkward cases (in-place ReLU, bf16, shared modules, RNN
tuples), gradient/weight/update norms, filters, cleanup, and the no-sync rule."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layerscope.trainer import probes as probes_module
from layerscope.trainer import wire
from layerscope.trainer.probes import UPDATE_SAMPLE, Probes
from probing import probe_step, uniform
from torch import nn


def forcing_linear(n_in: int, n_out: int, dead: int) -> nn.Linear:
    """A Linear whose first ``dead`` outputs are negative and the rest positive for
    every input in [-1, 1]: small weights, bias -/+ 10."""
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.uniform_(-0.1, 0.1)
        lin.bias.fill_(10.0)
        lin.bias[:dead] = -10.0
    return lin


def test_dead_ratio_is_exact_on_the_pre_activation_and_on_the_relu(device: str) -> None:
    model = nn.Sequential(forcing_linear(5, 8, dead=3), nn.ReLU()).to(device)
    layers, _ = probe_step(model, Probes(model), uniform(64, 5).to(device))
    assert layers["0"]["dead_ratio"] == 3 / 8
    assert layers["1"]["dead_ratio"] == 3 / 8
    assert layers["1"]["zero_frac"] == 3 / 8
    assert layers["0"]["saturated_frac"] is None and layers["0"]["saturated_ratio"] is None


def test_tanh_saturation_matches_a_hand_computation(device: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(20, 16)
    with torch.no_grad():
        lin.weight.normal_(0.0, 1.0)
    model = nn.Sequential(lin, nn.Tanh()).to(device)
    x = torch.randn(64, 20).to(device)
    layers, _ = probe_step(model, Probes(model), x)
    with torch.no_grad():
        pinned = torch.tanh(lin(x)).abs() >= 0.99
    frac = pinned.float().mean().item()
    ratio = (pinned.float().mean(dim=0) > 0.5).float().mean().item()
    assert 0.0 < ratio < 1.0 and 0.0 < frac < 1.0  # the case is not degenerate
    assert layers["1"]["saturated_frac"] == pytest.approx(frac, rel=1e-6)
    assert layers["1"]["saturated_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert layers["1"]["dead_ratio"] is None


def test_named_functional_activation_measures_that_function_on_the_linear() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(20, 16)
    with torch.no_grad():
        lin.weight.normal_(0.0, 1.0)
    model = nn.Sequential(lin)
    x = torch.randn(64, 20)
    layers, _ = probe_step(model, Probes(model, activations={"0": "tanh"}), x)
    with torch.no_grad():
        pinned = torch.tanh(lin(x)).abs() >= 0.99
    assert layers["0"]["saturated_frac"] == pytest.approx(pinned.float().mean().item(), rel=1e-6)
    ratio = (pinned.float().mean(dim=0) > 0.5).float().mean().item()
    assert layers["0"]["saturated_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert layers["0"]["dead_ratio"] is None  # tanh has no dead region


def test_a_named_function_of_a_bf16_output_is_measured_as_the_model_computes_it() -> None:
    """Under bf16 autocast the model's tanh runs in bf16; the probe took the float32 tanh of
    the widened output, so values either side of 0.99 were misread (tanh(2.65625) is
    0.98828 in bf16, 0.99019 in float32). Both the staged path (a small output) and the
    one reduced in its hook (a large one) measure the bf16 tanh."""
    for batch in (64, 4096):
        torch.manual_seed(2)
        lin = nn.Linear(20, 16)
        with torch.no_grad():
            lin.weight.normal_(0.0, 1.0)
        model = nn.Sequential(lin)
        x = torch.randn(batch, 20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layers, _ = probe_step(model, Probes(model, activations={"0": "tanh"}), x)
            with torch.no_grad():
                y = lin(x)
        assert y.dtype == torch.bfloat16
        # the model's own tanh, in bf16; the threshold in float32 (a bf16 0.99 is 0.98828)
        pinned = torch.tanh(y).float().abs() >= 0.99
        widened = torch.tanh(y.float()).abs() >= 0.99
        assert not torch.equal(pinned, widened)  # the case tells the two apart
        frac = layers["0"]["saturated_frac"]
        assert frac == pytest.approx(pinned.float().mean().item(), rel=1e-6), batch


def test_sigmoid_module_saturation() -> None:
    y_in = torch.tensor([[-10.0, 0.0], [10.0, 0.0], [-10.0, 4.7], [-10.0, 0.1]])
    model = nn.Sequential(nn.Sigmoid())
    layers, _ = probe_step(model, Probes(model), y_in)
    # sigmoid(+-10) is pinned, sigmoid(4.7) = 0.9910 is pinned, sigmoid(0) and (0.1) are not
    assert layers["0"]["saturated_frac"] == 5 / 8
    assert layers["0"]["saturated_ratio"] == 1 / 2


def test_relu6_is_saturated_only_where_pinned_at_6_and_dead_where_off() -> None:
    # units: always 0 (off), always 6 (pinned), 0 or 6 half the time each, always 3
    y_in = torch.tensor([[-1.0, 9.0, -1.0, 3.0], [-2.0, 7.0, 8.0, 3.0]] * 8)
    model = nn.Sequential(nn.ReLU6())
    layers, _ = probe_step(model, Probes(model), y_in)
    assert layers["0"]["dead_ratio"] == 1 / 4  # the unit that is always off
    assert layers["0"]["saturated_frac"] == 3 / 8  # values at 6 only: 16 + 8 of 64
    assert layers["0"]["saturated_ratio"] == 1 / 4  # only the always-pinned unit (> half)


def test_dead_ratio_needs_a_few_values_per_unit() -> None:
    """Batch size 1 (pure SGD, an advertised setting): a healthy ReLU unit has one value
    and read dead whenever it was negative, ~half the layer, raising DeadUnits alerts. A
    unit seen on fewer than MIN_ACTIVITY_VALUES values gives no dead_ratio; a conv unit
    (a channel) sees every position of even one image."""
    from layerscope.trainer.stats import MIN_ACTIVITY_VALUES

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU())
    for batch, known in ((1, False), (MIN_ACTIVITY_VALUES - 1, False), (MIN_ACTIVITY_VALUES, True)):
        layers, _ = probe_step(model, Probes(model), uniform(batch, 6))
        for name in ("0", "1"):
            assert (layers[name]["dead_ratio"] is not None) is known, (batch, name)
            assert layers[name]["mean"] is not None and layers[name]["zero_frac"] is not None
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    layers, _ = probe_step(conv, Probes(conv), uniform(1, 1, 4, 4))  # 16 values a channel
    assert layers["1"]["dead_ratio"] is not None


def test_a_linear_feeding_no_relu_carries_no_dead_ratio() -> None:
    """dead_ratio on a Linear/Conv reads what a following ReLU would leave dead: none where
    the model shows it feeds a Tanh/Sigmoid module (even past dropout or a norm) or the loss;
    kept where a ReLU-family module or another Linear (a functional F.relu) follows."""
    torch.manual_seed(3)
    model = nn.Sequential(
        forcing_linear(5, 8, dead=3), nn.ReLU(),  # 0: feeds a ReLU
        forcing_linear(8, 8, dead=2), nn.Dropout(0.0), nn.Tanh(),  # 2: feeds a Tanh
        forcing_linear(8, 8, dead=1), nn.LayerNorm(8), nn.Sigmoid(),  # 5
        forcing_linear(8, 8, dead=4),  # 8: feeds the next Linear (a functional activation)
        forcing_linear(8, 4, dead=1),  # 9: the output layer
    )  # fmt: skip
    layers, _ = probe_step(model, Probes(model), uniform(32, 5))
    assert layers["0"]["dead_ratio"] == 3 / 8
    assert layers["8"]["dead_ratio"] == 4 / 8
    for name in ("2", "5", "9"):
        assert layers[name]["dead_ratio"] is None, name
        assert layers[name]["mean"] is not None  # still probed


def _dead_by_hand(y: torch.Tensor, axis: int = 1) -> float:
    """DESIGN §3: the fraction of units (``axis``) live (> 0) on at most 1% of their values."""
    units = y.detach().movedim(axis, -1).reshape(-1, y.shape[axis])
    return ((units > 0).double().mean(0) <= 0.01).double().mean().item()


class _CifarBlock(nn.Module):
    """pytorch-cifar's ResNet block: F.relu after each BatchNorm, no activation module."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        self.seen = [out.detach().clone()]
        out = self.bn2(self.conv2(out)) + x
        return F.relu(out)


class _CifarNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(_CifarBlock(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(x).mean((2, 3)))


def test_a_conv_feeding_batch_norm_is_read_after_the_norm() -> None:
    """F.relu(bn1(conv1(x))): BatchNorm re-centres each channel, so the conv's raw output says
    nothing of what the ReLU leaves dead. Six channels negative before the norm and live after
    it read 75% dead on the conv (a DeadUnits alert); two live before it and pinned negative
    by the norm's bias read live. The norm's output carries the reading, the conv none."""
    torch.manual_seed(5)
    model = _CifarNet()
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.bias[:6] = -30.0  # negative before the norm, re-centred by it
        block.bn1.bias[6:] = -10.0  # the last two channels: dead after the norm
    probes = Probes(model)
    x = torch.randn(4, 8, 6, 6)
    layers, _ = probe_step(model, probes, x)
    with torch.no_grad():
        raw = block.conv1(x)
    assert _dead_by_hand(raw) == 6 / 8  # what the conv used to report
    assert _dead_by_hand(block.seen[0]) == 2 / 8
    assert layers["layer1.0.bn1"]["dead_ratio"] == 2 / 8
    assert layers["layer1.0.conv1"]["dead_ratio"] is None
    assert layers["layer1.0.conv2"]["dead_ratio"] is None
    assert layers["layer1.0.conv1"]["mean"] is not None  # still probed
    table = {row["name"]: row for row in probes.layer_table()}
    assert table["layer1.0.bn1"] == {"name": "layer1.0.bn1", "kind": "BatchNorm2d", "units": 8}
    assert "layer1.0.bn2" not in table  # feeds the residual add: see the test below


class _CifarStem(nn.Module):
    """pytorch-cifar's ResNet: a stem conv and norm at the model's top, F.relu after."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_CifarBlock(8), _CifarBlock(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layer1(out).mean((2, 3)))


def test_a_blocks_last_norm_feeding_the_residual_add_is_not_read_as_relu() -> None:
    """bn2 feeds ``out += shortcut(x)`` and F.relu comes only after the add: read as if a
    ReLU followed it, a bn2 whose bias went negative raised a false DeadUnits alert (75%
    dead where the block's ReLU saw none; review /tmp/h15k/norm_residual.py). A block's
    last norm is not read; the stem's norm (at the model's top) and each bn1 are."""
    torch.manual_seed(6)
    model = _CifarStem()
    with torch.no_grad():
        for block in model.layer1:
            block.bn2.bias[:6] = -5.0  # below 0 before the add, alive after it
        model.bn1.bias[6:] = -10.0  # two stem channels dead after F.relu
    probes = Probes(model)
    table = [row["name"] for row in probes.layer_table()]
    assert "bn1" in table and "layer1.0.bn1" in table and "layer1.1.bn1" in table
    assert "layer1.0.bn2" not in table and "layer1.1.bn2" not in table
    layers, _ = probe_step(model, probes, torch.randn(4, 3, 6, 6))
    assert layers["bn1"]["dead_ratio"] == 2 / 8


class _TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock order: conv1, bn1, relu (a module), conv2, bn2, downsample;
    bn2 and downsample.1 feed the residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return out + self.downsample(x)


def test_norms_followed_by_activation_modules_are_measured_by_those_modules() -> None:
    """With activation modules (torchvision), the ReLU after bn1 measures it and no norm is
    probed: not bn1 (its ReLU is probed), nor bn2/downsample.1 (they feed the residual add,
    not a ReLU; zero-initialised, as zero_init_residual leaves bn2, they read 100% dead)."""
    model = nn.Sequential(_TorchvisionBlock(4), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].bn1.bias[:1] = -10.0
        model[0].bn2.weight.zero_()
    probes = Probes(model)
    names = [row["name"] for row in probes.layer_table()]
    assert names == ["0.conv1", "0.relu", "0.conv2", "0.downsample.0", "1"]
    layers, _ = probe_step(model, probes, torch.randn(4, 4, 5, 5))
    assert layers["0.relu"]["dead_ratio"] == 1 / 4
    for name in ("0.conv1", "0.conv2", "0.downsample.0"):  # each feeds a norm
        assert layers[name]["dead_ratio"] is None, name


def test_layer_norm_is_never_read_as_relu_and_its_linear_has_no_reading() -> None:
    """A transformer's LayerNorm feeds attention and Linears, and a feature negative on every
    token is no dead unit: it is not probed. The Linear feeding it has no reading (the norm
    re-centres it); the Linear after it keeps DESIGN's functional-ReLU default."""

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = forcing_linear(6, 8, dead=6)
            self.norm = nn.LayerNorm(8)
            self.fc2 = forcing_linear(8, 8, dead=2)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.fc2(self.norm(self.fc1(x)))))

    model = Mlp()
    probes = Probes(model)
    assert [row["name"] for row in probes.layer_table()] == ["fc1", "fc2", "out"]
    layers, _ = probe_step(model, probes, uniform(16, 5, 6))
    assert layers["fc1"]["dead_ratio"] is None
    assert layers["fc2"]["dead_ratio"] == 2 / 8


class _Conv1dNormFunctional(nn.Module):
    """Conv1d -> BatchNorm1d -> F.relu (no activation module), then a head Linear -> BatchNorm1d
    that feeds the loss (a projection head's last norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv1d_forcing(4, dead=0)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)
        self.head_norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_norm(self.head(F.relu(self.norm(self.conv(x))).mean(2)))


def test_a_probed_norm_after_conv1d_uses_channels_and_filters_apply() -> None:
    """The norm read as ReLU takes its (N, C, L) channels as units (one of four pinned
    negative by its bias; the seven positions would read none dead); the norm that ends the
    model feeds the loss and is not probed. The user's filters pick norms like any layer:
    ``types`` without a norm type leaves them out, naming one reads it as ReLU, and
    ``activations`` overrides the reading."""
    model = _Conv1dNormFunctional()
    with torch.no_grad():
        model.norm.bias[:1] = -10.0
    probes = Probes(model)
    assert [(row["name"], row["units"]) for row in probes.layer_table()] == [
        ("conv", 4), ("norm", 4), ("head", 3),
    ]  # fmt: skip
    x = uniform(3, 2, 7)
    layers, _ = probe_step(model, probes, x)
    with torch.no_grad():
        normed = model.norm(model.conv(x))
    assert _dead_by_hand(normed) == 1 / 4 and _dead_by_hand(normed, axis=2) == 0.0
    assert layers["norm"]["dead_ratio"] == 1 / 4 and layers["conv"]["dead_ratio"] is None
    only_convs = Probes(model, types=(nn.Conv1d,))
    assert [row["name"] for row in only_convs.layer_table()] == ["conv"]
    only_convs.close()
    norms = Probes(model, types=(nn.BatchNorm1d,))
    assert [row["name"] for row in norms.layer_table()] == ["norm", "head_norm"]
    layers, _ = probe_step(model, norms, x)
    assert layers["norm"]["dead_ratio"] == 1 / 4 and layers["head_norm"]["dead_ratio"] is None
    named = Probes(model, names=["norm"], activations={"norm": "none"})
    layers, _ = probe_step(model, named, x)
    assert list(layers) == ["norm"] and layers["norm"]["dead_ratio"] is None
    skipped = Probes(model, exclude="norm")
    assert [row["name"] for row in skipped.layer_table()] == ["conv", "head"]
    skipped.close()


def test_histogram_counts_every_value_and_matches_numpy(device: str) -> None:
    model = nn.Sequential(nn.Linear(10, 32)).to(device)
    x = torch.randn(100, 10, generator=torch.Generator().manual_seed(2)).to(device)
    layers, _ = probe_step(model, Probes(model, sample_values=None), x)
    hist = layers["0"]["hist"]
    with torch.no_grad():
        y = model(x).cpu().numpy()
    assert sum(hist["counts"]) == y.size
    assert (hist["lo"], hist["hi"]) == (pytest.approx(y.min()), pytest.approx(y.max()))
    ref, _ = np.histogram(y, bins=64, range=(hist["lo"], hist["hi"]))
    assert np.abs(np.array(hist["counts"]) - ref).sum() <= 4  # ulp-edge ties only


def test_histogram_samples_large_outputs_but_every_other_stat_is_exact() -> None:
    model = nn.Sequential(nn.ReLU())
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(3))
    layers, _ = probe_step(model, Probes(model, sample_values=1000, bins=16), x)
    relu = layers["0"]
    y = x.clamp_min(0)
    assert sum(relu["hist"]["counts"]) == 1000 and len(relu["hist"]["counts"]) == 16
    assert relu["max"] == y.max().item() and relu["min"] == 0.0
    assert relu["zero_frac"] == pytest.approx((y == 0).float().mean().item(), rel=1e-6)
    assert relu["mean"] == pytest.approx(y.mean().item(), rel=1e-5)


def test_nonfinite_values_are_counted_and_the_rest_stays_correct(device: str) -> None:
    x = torch.tensor([[1.0, -2.0, 0.0, float("nan")], [3.0, float("inf"), float("-inf"), 0.5]])
    x = x.to(device)
    model = nn.Sequential(nn.ReLU())
    layers, scalars = probe_step(model, Probes(model), x)
    relu = layers["0"]
    finite = [1.0, 0.0, 0.0, 3.0, 0.0, 0.5]  # relu of the finite inputs and of -inf
    assert relu["nonfinite"] == 2  # NaN and +Inf survive a ReLU
    assert relu["zero_frac"] == 3 / 8
    assert relu["mean"] == pytest.approx(np.mean(finite))
    assert relu["std"] == pytest.approx(np.std(finite))
    assert (relu["min"], relu["max"]) == (0.0, 3.0)
    assert sum(relu["hist"]["counts"]) == 6
    assert scalars == {"grad_norm": None}  # no parameters, no gradients
    frame = {"type": "probe", "seq": 1, "step": 0, "layers": list(layers.values())}
    assert wire.validate_probe(json.loads(wire.encode(frame)))["layers"][0]["nonfinite"] == 2


def test_no_finite_values_decode_to_none() -> None:
    model = nn.Sequential(nn.Tanh())
    layers, _ = probe_step(model, Probes(model), torch.full((2, 3), float("nan")))
    tanh = layers["0"]
    assert tanh["mean"] is None and tanh["std"] is None and tanh["min"] is None
    assert tanh["hist"] is None and tanh["nonfinite"] == 6


def test_three_d_outputs_use_the_last_dim_as_units() -> None:
    model = nn.Sequential(forcing_linear(5, 8, dead=2), nn.ReLU())
    probes = Probes(model)
    layers, _ = probe_step(model, probes, uniform(4, 7, 5))  # (batch, seq, features)
    assert layers["0"]["dead_ratio"] == 2 / 8 and layers["1"]["dead_ratio"] == 2 / 8
    assert [row["units"] for row in probes.layer_table()] == [8, 8]


def test_four_d_conv_outputs_use_channels() -> None:
    conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.uniform_(-0.01, 0.01)
        conv.bias.copy_(torch.tensor([-5.0, 5.0, 5.0, 5.0]))
    model = nn.Sequential(conv, nn.ReLU())
    probes = Probes(model)
    layers, _ = probe_step(model, probes, uniform(3, 2, 6, 6))
    assert layers["0"]["dead_ratio"] == 1 / 4 and layers["1"]["dead_ratio"] == 1 / 4
    assert probes.layer_table()[1]["units"] == 4


def test_a_linear_on_channels_last_images_and_its_activation_use_the_last_dim() -> None:
    """A Linear over (N, H, W, C) (ConvNeXt's pointwise layers): a unit is an output feature,
    the last dim, and an activation applied straight to it inherits that; dim 1 (H) made
    half-dead channels read 0% dead."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pw = forcing_linear(3, 8, dead=4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.pw(x))

    model = Block()
    probes = Probes(model)
    layers, _ = probe_step(model, probes, uniform(2, 5, 6, 3))  # (N, H, W, C)
    assert layers["pw"]["dead_ratio"] == 4 / 8 and layers["act"]["dead_ratio"] == 4 / 8
    assert [row["units"] for row in probes.layer_table()] == [8, 8]
    with torch.no_grad():
        means = model(uniform(2, 5, 6, 3)).mean(dim=(0, 1, 2))
    assert layers["act"]["unit_spread"] == pytest.approx(means.std(unbiased=False).item(), rel=1e-4)


def _conv1d_forcing(channels: int, dead: int) -> nn.Conv1d:
    conv = nn.Conv1d(2, channels, kernel_size=1)
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.uniform_(-0.01, 0.01)
        conv.bias.fill_(5.0)
        conv.bias[:dead] = -5.0
    return conv


def test_conv1d_outputs_and_the_activation_after_them_use_the_channel_axis() -> None:
    model = nn.Sequential(_conv1d_forcing(4, dead=1), nn.BatchNorm1d(4).eval(), nn.ReLU())
    probes = Probes(model)
    layers, _ = probe_step(model, probes, uniform(3, 2, 7))  # (batch, channels, length)
    # With the length axis as units no position would be dead; with channels one of four is.
    # (the conv feeds a norm, which decides the signs the ReLU sees: no reading of its own)
    assert layers["0"]["dead_ratio"] is None and layers["2"]["dead_ratio"] == 1 / 4
    assert [row["units"] for row in probes.layer_table()] == [4, 4]
    bare = nn.Sequential(_conv1d_forcing(4, dead=1), nn.ReLU())
    layers, _ = probe_step(bare, Probes(bare), uniform(3, 2, 7))
    assert layers["0"]["dead_ratio"] == 1 / 4 and layers["1"]["dead_ratio"] == 1 / 4


class _FunctionalConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv1d_forcing(4, dead=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def test_activation_applied_straight_to_a_conv1d_output_inherits_channels() -> None:
    model = _FunctionalConv1d()
    layers, _ = probe_step(model, Probes(model), uniform(3, 2, 7))
    assert layers["act"]["dead_ratio"] == 1 / 4


class _Conv1dNormAct(nn.Module):
    """Conv1d -> BatchNorm1d -> Dropout -> ReLU in a custom forward (the usual audio or
    time-series block), the norm and dropout not probed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv1d_forcing(4, dead=1)
        self.norm, self.drop = nn.BatchNorm1d(4).eval(), nn.Dropout(0.0)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(self.conv(x))))


def test_an_activation_after_conv1d_and_a_norm_in_a_custom_forward_uses_channels() -> None:
    """The channel axis passes through the modules between (their own hooks, while armed):
    the ReLU's units are the four channels, one dead, not the seven positions."""
    model = _Conv1dNormAct()
    probes = Probes(model)
    layers, _ = probe_step(model, probes, uniform(3, 2, 7))
    assert layers["act"]["dead_ratio"] == 1 / 4
    assert [row["units"] for row in probes.layer_table()] == [4, 4]
    assert all(not m._forward_hooks for m in model.modules())  # none left between probe steps


def _unbatched_conv(conv: nn.Conv1d | nn.Conv2d) -> nn.Module:
    """``conv`` with channels 0-2 of 8 negative and the rest positive on any input in
    [-1, 1], then an in-place ReLU applied in the forward."""
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.uniform_(-0.01, 0.01)
        conv.bias.copy_(torch.linspace(1.0, 3.0, 8))
        conv.bias[:3] = -1.0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(x))

    return Net()


@pytest.mark.parametrize("dims", [1, 2])
def test_unbatched_conv_input_takes_channels_at_dim_0(
    dims: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch takes one unbatched sample, (C, L) for Conv1d or (C, H, W) for Conv2d; its
    units are then dim 0, for the conv and for the ReLU applied straight to it. With dim 1
    (L, or H) as units no unit was dead: 0% sent where 3 of 8 channels are. A large output
    is reduced in slices along its last dim, never along the channels."""
    torch.manual_seed(6)
    model = _unbatched_conv(nn.Conv1d(3, 8, 3) if dims == 1 else nn.Conv2d(3, 8, 3))
    x = uniform(3, 12) if dims == 1 else uniform(3, 12, 12)
    with torch.no_grad():
        y = F.relu(model.conv(x))
    assert _dead_by_hand(y, axis=0) == 3 / 8 and _dead_by_hand(y, axis=1) == 0.0
    probes = Probes(model, sample_values=None)
    layers, _ = probe_step(model, probes, x)
    assert layers["conv"]["dead_ratio"] == 3 / 8 and layers["act"]["dead_ratio"] == 3 / 8
    assert [row["units"] for row in probes.layer_table()] == [8, 8]
    assert layers["act"]["unit_spread"] == pytest.approx(np.std(unit_means(y, 0)), rel=1e-5)
    monkeypatch.setattr(probes_module, "CHUNK_VALUES", y.numel() // 3)
    sliced, _ = probe_step(model, Probes(model, sample_values=None), x)
    for key in ("mean", "std", "min", "max", "zero_frac", "dead_ratio", "unit_spread"):
        assert sliced["act"][key] == pytest.approx(layers["act"][key], rel=1e-5), key
    assert sum(sliced["act"]["hist"]["counts"]) == y.numel()


class _ZeroAfter(nn.Module):
    """Linear -> in-place ReLU -> an in-place op that wipes what the ReLU returned."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 10)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)).mul_(0.0)


def test_inplace_relu_is_measured_before_later_inplace_ops() -> None:
    torch.manual_seed(4)
    model = _ZeroAfter()
    x = torch.randn(32, 6)
    with torch.no_grad():
        layers, _ = probe_step(model, Probes(model, sample_values=None), x)
        y = F.relu(model.fc(x))
    assert layers["act"]["mean"] == pytest.approx(y.mean().item(), rel=1e-5)
    assert layers["act"]["zero_frac"] == pytest.approx((y == 0).float().mean().item())
    assert layers["act"]["max"] == pytest.approx(y.max().item())
    assert sum(layers["act"]["hist"]["counts"][1:]) > 0  # not all in the zero bin
    assert layers["fc"]["min"] < 0  # the Linear's own output, before the in-place ReLU


def test_bf16_activations_are_widened_first(device: str) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU()).to(device, torch.bfloat16)
    x = torch.randn(32, 8, dtype=torch.bfloat16).to(device)
    layers, _ = probe_step(model, Probes(model, sample_values=None), x)
    with torch.no_grad():
        y = model(x).float()
    assert layers["1"]["mean"] == pytest.approx(y.mean().item(), rel=1e-4)
    assert layers["1"]["max"] == y.max().item()
    assert sum(layers["1"]["hist"]["counts"]) == y.numel()


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = forcing_linear(4, 4, dead=1)
        self.act = nn.ReLU()
        self.wide = forcing_linear(4, 6, dead=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        h = self.fc(h)  # the same Linear again: one layer, both calls
        return self.act(self.wide(self.act(h)))  # the same ReLU at widths 4 and 6


def test_a_module_called_twice_is_one_layer_over_all_its_calls(device: str) -> None:
    model = _Shared().to(device)
    x = uniform(16, 4).to(device)
    probes = Probes(model, sample_values=None)
    layers, _ = probe_step(model, probes, x)
    assert [row["name"] for row in probes.layer_table()] == ["fc", "act", "wide"]
    with torch.no_grad():
        first = model.fc(x)
        second = model.fc(F.relu(first))
        fc_all = torch.cat([first, second])
    fc = layers["fc"]
    assert fc["mean"] == pytest.approx(fc_all.mean().item(), rel=1e-5)
    assert fc["std"] == pytest.approx(fc_all.std(correction=0).item(), rel=1e-5)
    assert (fc["min"], fc["max"]) == (fc_all.min().item(), fc_all.max().item())
    assert sum(fc["hist"]["counts"]) == fc_all.numel()
    assert fc["dead_ratio"] == 1 / 4  # same units both calls: merged by index
    # ReLU at widths 4, 4 (merged by index) and 6: units 4 + 6, dead 1 + 2
    assert layers["act"]["dead_ratio"] == pytest.approx(3 / 10)  # float32 on the wire
    assert sum(layers["act"]["hist"]["counts"]) == 16 * (4 + 4 + 6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_rnn_tuple_outputs_use_the_output_sequence(
    cell: type[nn.Module], batch_first: bool
) -> None:
    torch.manual_seed(7)
    rnn = cell(input_size=3, hidden_size=5, batch_first=batch_first)
    model = nn.Sequential(rnn)
    probes = Probes(model, types=(nn.LSTM, nn.GRU), sample_values=None)
    x = torch.randn(2, 9, 3) if batch_first else torch.randn(9, 2, 3)
    layers, _ = probe_step(model, probes, x)
    with torch.no_grad():
        out = rnn(x)[0]
    assert probes.layer_table() == [{"name": "0", "kind": cell.__name__, "units": 5}]
    assert layers["0"]["mean"] == pytest.approx(out.mean().item(), rel=1e-5)
    assert sum(layers["0"]["hist"]["counts"]) == out.numel()


def test_packed_sequence_output_is_measured_on_its_data() -> None:
    rnn = nn.GRU(3, 4, batch_first=True)
    model = nn.Sequential(rnn)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    layers, _ = probe_step(model, Probes(model, types=(nn.GRU,), sample_values=None), packed)
    assert sum(layers["0"]["hist"]["counts"]) == 8 * 4


def _two_layer() -> nn.Sequential:
    torch.manual_seed(8)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_grad_weight_and_update_norms_match_an_sgd_step(device: str) -> None:
    model = _two_layer().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    x = torch.randn(8, 3).to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}
    opt.register_step_pre_hook(
        lambda *_: grads.update(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        )
    )
    layers, scalars = probe_step(model, Probes(model, opt), x, opt)
    for name in ("0", "2"):
        keys = [f"{name}.weight", f"{name}.bias"]
        g = torch.cat([grads[k].flatten() for k in keys]).norm().item()
        w = torch.cat([before[k].flatten() for k in keys]).norm().item()
        now = dict(model.named_parameters())
        d = torch.cat([(now[k].detach() - before[k]).flatten() for k in keys]).norm().item()
        assert layers[name]["grad_norm"] == pytest.approx(g, rel=1e-5)
        assert layers[name]["weight_norm"] == pytest.approx(w, rel=1e-5)
        assert layers[name]["update_ratio"] == pytest.approx(d / w, rel=1e-4)
    assert layers["1"]["grad_norm"] is None and layers["1"]["weight_norm"] is None
    total = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    assert scalars["grad_norm"] == pytest.approx(total, rel=1e-5)


def test_a_fused_optimizer_under_a_grad_scaler_reports_unscaled_gradient_norms() -> None:
    """A GradScaler unscales a plain optimizer's gradients before its step but hands a
    fused one (fused=True) the scale to apply inside its kernel: the norms read at the
    step were the loss scale (65,536) times too large."""
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    norms = {}
    for fused in (False, True):
        model = _two_layer()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        probes = Probes(model, opt)
        probes.arm()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        pending = probes.collect()
        assert pending is not None
        layers, scalars = pending.decode(pending.tensor.cpu())
        norms[fused] = (scalars["grad_norm"], {e["name"]: e["grad_norm"] for e in layers})
    assert norms[True][0] == pytest.approx(norms[False][0], rel=1e-5)
    plain, fused_layers = norms[False][1], norms[True][1]
    assert [n for n, v in plain.items() if v is not None] == ["0", "2"]
    for name in ("0", "2"):
        assert fused_layers[name] == pytest.approx(plain[name], rel=1e-5)


def test_a_sparse_gradient_counts_by_its_values_and_the_step_runs() -> None:
    """nn.Embedding(sparse=True) (recommenders, word2vec): the norm of a sparse gradient
    used to raise inside optimizer.step() (no sparse vector_norm), ending training."""

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 4, sparse=True), nn.Linear(4, 2)

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(i).mean(1))

    torch.manual_seed(8)
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads: dict[str, torch.Tensor] = {}
    opt.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.to_dense() for n, p in model.named_parameters()})
    )
    probes = Probes(model, opt, types=(nn.Linear, nn.Embedding))
    layers, scalars = probe_step(model, probes, torch.randint(0, 50, (8, 3)), opt)
    assert grads["emb.weight"].count_nonzero() > 0
    assert layers["emb"]["grad_norm"] == pytest.approx(grads["emb.weight"].norm().item(), rel=1e-5)
    total = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    assert scalars["grad_norm"] == pytest.approx(total, rel=1e-5)


def test_without_an_optimizer_grads_are_read_at_collect() -> None:
    model = _two_layer()
    probes = Probes(model)
    probes.arm()
    model(torch.randn(8, 3)).square().mean().backward()
    pending = probes.collect()
    assert pending is not None
    layers = {row["name"]: row for row in pending.decode(pending.tensor)[0]}
    expected = torch.cat([p.grad.flatten() for p in model[0].parameters() if p.grad is not None])
    assert expected.numel() == 3 * 4 + 4
    expected = expected.norm()
    assert layers["0"]["grad_norm"] == pytest.approx(expected.item(), rel=1e-5)
    assert layers["0"]["update_ratio"] is None


def test_update_ratio_of_a_large_parameter_is_estimated_from_a_sample() -> None:
    torch.manual_seed(9)
    lin = nn.Linear(256, 128)
    assert lin.weight.numel() > UPDATE_SAMPLE  # so the weight is sampled, the bias copied
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    layers, _ = probe_step(model, Probes(model, opt), torch.randn(32, 256), opt)
    after = list(model.parameters())
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(after, before, strict=True)])
    exact = (delta.norm() / torch.cat([b.flatten() for b in before]).norm()).item()
    assert layers["0"]["update_ratio"] == pytest.approx(exact, rel=0.05)


def test_update_ratio_stays_exact_over_steps_and_after_a_parameter_is_replaced() -> None:
    """The pre-step copy reuses its buffers and views between probe steps; each step's
    ratio is still that step's own update, also once ``p.data`` gets new storage."""
    model = _two_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    probes = Probes(model, opt)
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                model[0].weight.data = model[0].weight.data * 2.0  # new storage, same shape
        before = [p.detach().clone() for p in model[0].parameters()]
        layers, _ = probe_step(model, probes, torch.randn(8, 3), opt)
        now = [p.detach() for p in model[0].parameters()]
        d = torch.cat([(a - b).flatten() for a, b in zip(now, before, strict=True)]).norm()
        w = torch.cat([b.flatten() for b in before]).norm()
        assert layers["0"]["update_ratio"] == pytest.approx((d / w).item(), rel=1e-4)
        assert layers["0"]["weight_norm"] == pytest.approx(w.item(), rel=1e-5)


def _update_ratio_of(params: list[nn.Parameter], before: list[torch.Tensor]) -> float:
    pairs = zip(params, before, strict=True)
    d = torch.cat([(p.detach() - b).flatten().double() for p, b in pairs]).norm()
    w = torch.cat([b.flatten().double() for b in before]).norm()
    return (d / w).item()


def test_update_ratio_of_a_channels_last_model_and_a_non_contiguous_weight() -> None:
    """A non-contiguous parameter's sample is a copy, not a view: it is read again after
    the step, and every layer keeps its ratio (channels_last convs, a transposed weight)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).to(memory_format=torch.channels_last)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        mlp[2].weight.data = mlp[2].weight.data.t().contiguous().t()
    assert not conv[0].weight.is_contiguous() and not mlp[2].weight.is_contiguous()
    x_conv = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    for model, x in ((conv, x_conv), (mlp, torch.randn(8, 4))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probes = Probes(model, opt)
        for _ in range(2):
            before = [p.detach().clone() for p in model[0].parameters()]
            layers, _ = probe_step(model, probes, x, opt)
            exact = _update_ratio_of(list(model[0].parameters()), before)
            assert layers["0"]["update_ratio"] == pytest.approx(exact, rel=1e-4)


class _RebindingSGD(torch.optim.Optimizer):
    """A hand-written optimizer of the tutorial kind: each step rebinds ``p.data``."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = p.data - group["lr"] * p.grad


def test_update_ratio_of_an_optimizer_that_rebinds_p_data_and_of_float64_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    opt: torch.optim.Optimizer = _RebindingSGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt)
    for _ in range(2):
        before = [p.detach().clone() for p in model[0].parameters()]
        layers, _ = probe_step(model, probes, torch.randn(8, 4), opt)
        exact = _update_ratio_of(list(model[0].parameters()), before)
        assert layers["0"]["update_ratio"] == pytest.approx(exact, rel=1e-4)
    # float64 weights and an update far below float32's resolution of them
    model = nn.Sequential(nn.Linear(4, 5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-12)
    before = [p.detach().clone() for p in model.parameters()]
    layers, _ = probe_step(model, Probes(model, opt), torch.randn(8, 4, dtype=torch.float64), opt)
    exact = _update_ratio_of(list(model.parameters()), before)
    assert 0 < exact < 1e-9
    assert layers["0"]["update_ratio"] == pytest.approx(exact, rel=1e-3)


def test_update_ratio_of_sampled_parameters_rebound_or_non_contiguous() -> None:
    """A parameter above UPDATE_SAMPLE entries is sampled through a strided view made
    before the step and reused after it only while the parameter keeps that storage:
    an optimizer that rebinds ``p.data`` gets the new values read (a stale view would
    show no update at all), and a non-contiguous one's sample is read again."""
    torch.manual_seed(3)
    for make_opt, transpose in ((_RebindingSGD, False), (torch.optim.SGD, True)):
        lin = nn.Linear(128, 64)
        if transpose:
            with torch.no_grad():
                lin.weight.data = lin.weight.data.t().contiguous().t()
            assert not lin.weight.is_contiguous()
        assert lin.weight.numel() > UPDATE_SAMPLE
        model = nn.Sequential(lin)
        opt = make_opt(model.parameters(), lr=0.1)
        probes = Probes(model, opt)
        for _ in range(3):
            before = [p.detach().clone() for p in model.parameters()]
            layers, _ = probe_step(model, probes, torch.randn(16, 128), opt)
            exact = _update_ratio_of(list(model.parameters()), before)
            assert exact > 0
            assert layers["0"]["update_ratio"] == pytest.approx(exact, rel=0.1)


class _ShrinkingSGD(torch.optim.Optimizer):
    """An SGD step in place, then every parameter keeps its first 32 rows: a view of
    the same storage at the same address, of another shape. (Its own step, not
    ``super().step()`` of a torch optimizer, whose step hooks would fire twice.)"""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.fail = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                p.data = p.data[:32]
        if self.fail:
            raise RuntimeError("step failed")


def test_update_ratio_is_none_when_a_sampled_parameter_changes_shape_in_place() -> None:
    """The strided view is reused only for the same storage *and* shape: a parameter cut
    to fewer rows inside step() has no update to measure (a stale view would report one
    over rows that are no longer the parameter's). A step() that raises leaves no
    pre-step view behind once the probe step is collected."""
    torch.manual_seed(4)
    lin = nn.Linear(128, 64, bias=False)  # the one parameter is the sampled weight
    assert lin.weight.numel() > UPDATE_SAMPLE
    model = nn.Sequential(lin)
    opt = _ShrinkingSGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt)
    layers, _ = probe_step(model, probes, torch.randn(8, 128), opt)
    assert layers["0"]["update_ratio"] is None
    assert layers["0"]["weight_norm"] is not None
    opt.fail = True
    opt.zero_grad()
    probes.arm()
    nn.functional.mse_loss(model(torch.randn(8, 128)), torch.zeros(8, 32)).backward()
    with pytest.raises(RuntimeError, match="step failed"):
        opt.step()
    probes.collect()
    assert probes._updates._views == []


def test_probing_does_not_advance_the_users_rng() -> None:
    model = nn.Sequential(nn.ReLU())
    state = torch.get_rng_state()
    probe_step(model, Probes(model, sample_values=10), torch.ones(8, 8))
    assert torch.equal(torch.get_rng_state(), state)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["enc.0", "enc.1", "enc.2", "enc.3", "head"]),
        ({"types": (nn.ReLU, nn.Tanh)}, ["enc.1", "enc.3"]),
        ({"names": r"^enc\.[02]$"}, ["enc.0", "enc.2"]),
        ({"names": ["head", "enc.1"]}, ["enc.1", "head"]),
        ({"exclude": "enc"}, ["head"]),
        ({"types": (nn.Linear,), "exclude": ["head"]}, ["enc.0", "enc.2"]),
        # a container's name is everything in it (it probed nothing, silently)
        ({"names": ["enc"]}, ["enc.0", "enc.1", "enc.2", "enc.3"]),
        ({"exclude": ["enc"]}, ["head"]),
        ({"names": ["model"]}, ["enc.0", "enc.1", "enc.2", "enc.3", "head"]),  # the root
    ],
)
def test_filters(kwargs: dict[str, Any], expected: list[str]) -> None:
    probes = Probes(_Net(), **kwargs)
    assert [spec.name for spec in probes.layers] == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["enc.9"]}, "no module named"),
        ({"names": "^nothing"}, "selects no layer to probe"),
        ({"names": ["enc.1"], "types": (nn.Linear,)}, "selects no layer to probe"),
        ({"exclude": "("}, "not a valid regular expression"),
        ({"activations": {"head": "swoosh"}}, "unknown function"),
        ({"activations": {"enc.1": "tanh"}}, "itself an activation"),
        ({"activations": {"nope": "tanh"}}, "not probed layers"),
        ({"bins": 0}, "bins"),
        ({"sample_values": 0}, "sample_values"),
        ({"types": (nn.Sigmoid,)}, "types: .* leaves no layer"),  # the model has no Sigmoid
        ({"exclude": ".*"}, "exclude: .* leaves no layer"),
        ({"exclude": ["model"]}, "exclude: .* leaves no layer"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Probes(_Net(), **kwargs)


def test_a_model_with_no_probed_layer_trains_with_an_optimizer_hooked() -> None:
    """An nn.Embedding-only model (matrix factorisation) has no layer of the default types:
    its probe steps record nothing per layer, and the step must not raise (IndexError)."""
    model = nn.Sequential(nn.Embedding(20, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt)
    assert probes.layers == []
    probes.arm()
    loss = model(torch.randint(0, 20, (6,))).square().mean()
    loss.backward()
    opt.step()
    assert probes.collect() is None


def test_multihead_attentions_uncalled_out_proj_is_not_a_default_layer() -> None:
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    probes = Probes(model)
    names = [row["name"] for row in probes.layer_table()]
    assert "self_attn.out_proj" not in names and "linear1" in names
    layers, _ = probe_step(model, probes, torch.randn(3, 5, 8))
    assert all(layers[name]["mean"] is not None for name in names if name in layers)
    named = Probes(model, names=["self_attn"])  # named on purpose: still the user's to pick
    assert [row["name"] for row in named.layer_table()] == ["self_attn.out_proj"]


def test_close_removes_every_hook() -> None:
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt)
    probes.arm()
    assert any(m._forward_hooks for m in model.modules())
    probes.close()
    assert not any(m._forward_hooks for m in model.modules())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not any(m.__dict__.keys() - nn.Linear(1, 1).__dict__.keys() for m in model.modules()
                   if isinstance(m, nn.Linear))  # fmt: skip
    probes.arm()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert probes.collect() is None


def test_a_disarmed_step_records_nothing() -> None:
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 4)).sum().backward()
        opt.step()
        assert probes.collect() is None
    probe_step(model, probes, torch.randn(4, 4), opt)
    assert not probes.armed  # collect disarms
    # and removes the forward hooks: a module with none takes PyTorch's fast call path
    assert not any(m._forward_hooks for m in model.modules())
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    assert probes.collect() is None


def test_eval_mode_under_no_grad() -> None:
    model = _Net().eval()
    probes = Probes(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.no_grad():
        layers, scalars = probe_step(model, probes, torch.randn(4, 4))
    assert set(layers) == {"enc.0", "enc.1", "enc.2", "enc.3", "head"}
    assert layers["head"]["grad_norm"] is None and layers["head"]["weight_norm"] is not None


def test_a_validation_loop_while_armed_keeps_only_its_last_pass() -> None:
    """A validation loop run while armed (before the first step, or at an epoch's end before
    a probe step) kept every batch's outputs until training resumed: memory grew with the
    validation set. Only the last evaluation pass is kept; a step of evaluation passes alone
    probes that one, and a training pass after them replaces it."""
    model = nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 2))
    probes = Probes(model, sample_values=None)
    probes.arm()
    with torch.no_grad():
        for i in range(200):
            model(torch.full((64, 4), float(i)))
            staged = sum(len(v) for v in probes._staging._staged.values())
            assert staged + len(probes._blocks) <= 3, i  # one pass's outputs, not i passes'
    layers, _ = probe_step(model, probes, torch.randn(8, 4))
    assert sum(layers["0"]["hist"]["counts"]) == 8 * 300  # the training pass only
    probes.arm()
    with torch.no_grad():
        last = torch.full((64, 4), 7.0)
        for x in (torch.zeros(64, 4), last):
            model(x)
    pending = probes.collect()  # a step of evaluation passes alone: the last one
    assert pending is not None
    eval_layers, _ = pending.decode(pending.tensor)
    with torch.no_grad():
        want = model[0](last)
    assert eval_layers[0]["mean"] == pytest.approx(want.mean().item(), rel=1e-5)


def test_decode_rejects_a_copy_of_the_wrong_length() -> None:
    model = nn.Sequential(nn.ReLU())
    probes = Probes(model)
    probes.arm()
    model(torch.ones(2, 2))
    pending = probes.collect()
    assert pending is not None
    with pytest.raises(ValueError, match="expected"):
        pending.decode(pending.tensor[:-1])


def _forbid(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"host read Tensor.{name} during a probe step")

    return refuse


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.tanh = nn.Tanh()
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x)).flatten(1)
        h = self.tanh(self.fc(h))
        return self.out(self.tanh(h))  # tanh twice: the merge path too


def test_a_probe_step_never_reads_a_tensor_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(10)
    model = _Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probes = Probes(model, opt, activations={"fc": "sigmoid"}, sample_values=50)
    x, target = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    pendings = []
    with monkeypatch.context() as patch:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, _forbid(name))
        for _ in range(2):  # the first step also builds the cached index tensors
            probes.arm()
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pendings.append(probes.collect())
    for pending in pendings:
        assert pending is not None and pending.tensor.dim() == 1
        assert pending.tensor.dtype == torch.float32
        layers, scalars = pending.decode(pending.tensor)
        assert [row["name"] for row in layers] == ["conv", "act", "fc", "tanh", "out"]
        assert scalars["grad_norm"] is not None and scalars["grad_norm"] > 0
        for row in layers:
            for key, value in row.items():
                assert value is None or not isinstance(value, float) or math.isfinite(value), key
            expected = {"tanh": 2 * 50, "out": 8 * 3}.get(row["name"], 50)  # capped per call
            assert sum(row["hist"]["counts"]) == expected
            has_params = row["name"] in ("conv", "fc", "out")
            assert (row["update_ratio"] is not None and row["update_ratio"] > 0) == has_params


def test_entries_carry_exactly_the_wire_probe_stats() -> None:
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layers, _ = probe_step(model, Probes(model, opt), torch.randn(4, 4), opt)
    for row in layers.values():
        assert set(row) == {"name", "hist", *wire.PROBE_STATS}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_probe_step_does_not_synchronize() -> None:
    model = _Mixed().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probes = Probes(model, opt, activations={"fc": "sigmoid"})
    x = torch.randn(8, 1, 8, 8, device="cuda")
    target = torch.randint(0, 3, (8,), device="cuda")
    pendings = []
    with warnings.catch_warnings():  # "a prototype feature": the suite turns warnings into errors
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            probes.arm()
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pendings.append(probes.collect())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for pending in pendings:
        assert pending is not None and pending.tensor.is_cuda
        layers, scalars = pending.decode(pending.tensor.cpu())
        assert len(layers) == 5 and scalars["grad_norm"] is not None


def test_a_large_output_reduced_in_slices_gives_the_same_statistics(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    torch.manual_seed(11)
    # ReLU6 of +-10: 3 units dead at 0, 5 pinned at 6 (dead_ratio and saturation both sliced)
    model = nn.Sequential(forcing_linear(5, 8, dead=3), nn.ReLU6()).to(device)
    x = (uniform(50, 5) * 0.1).to(device)
    whole, _ = probe_step(model, Probes(model, sample_values=None), x)
    monkeypatch.setattr(probes_module, "CHUNK_VALUES", 3 * 8)  # slices of 3 rows, last of 2
    sliced, _ = probe_step(model, Probes(model, sample_values=None), x)
    for name in ("0", "1"):
        for key in ("mean", "std", "min", "max", "zero_frac", "nonfinite", "dead_ratio",
                    "saturated_frac", "saturated_ratio"):  # fmt: skip
            expected = whole[name][key]
            if expected is None:
                assert sliced[name][key] is None, (name, key)
            else:
                assert sliced[name][key] == pytest.approx(expected, rel=1e-5), (name, key)
        assert sum(sliced[name]["hist"]["counts"]) == 50 * 8
    assert whole["0"]["dead_ratio"] == 3 / 8 and whole["1"]["dead_ratio"] == 3 / 8
    assert whole["1"]["saturated_ratio"] == 5 / 8 and whole["1"]["saturated_frac"] == 5 / 8


# ---- unit_spread: the spread across units of each unit's mean output ----


def unit_means(y: torch.Tensor, axis: int) -> np.ndarray:
    """Each unit's mean over every sample and position, in float64 (numpy's answer)."""
    values = np.moveaxis(y.detach().double().numpy(), axis, -1)
    means: np.ndarray = values.reshape(-1, values.shape[-1]).mean(axis=0)
    return means


def test_identical_units_have_a_unit_spread_of_exactly_zero() -> None:
    lin = nn.Linear(7, 12)
    with torch.no_grad():
        lin.weight.copy_(uniform(1, 7, seed=3).expand(12, 7))  # every row the same
        lin.bias.fill_(0.1)  # not exactly representable: rounding must not leak in
    model = nn.Sequential(lin, nn.Tanh())
    layers, _ = probe_step(model, Probes(model), uniform(64, 7))
    assert layers["0"]["unit_spread"] == 0.0 and layers["1"]["unit_spread"] == 0.0
    assert layers["0"]["std"] is not None and layers["0"]["std"] > 0  # the outputs do vary


def test_unit_spread_is_the_std_of_the_per_unit_means() -> None:
    lin = nn.Linear(6, 10)
    with torch.no_grad():
        lin.bias.copy_(torch.linspace(-2.0, 3.0, 10))  # distinct per-unit means
    model = nn.Sequential(lin, nn.ReLU())
    x = uniform(50, 6, seed=1)
    layers, _ = probe_step(model, Probes(model), x)
    with torch.no_grad():
        y = lin(x)
    assert layers["0"]["unit_spread"] == pytest.approx(np.std(unit_means(y, 1)), rel=1e-5)
    assert layers["1"]["unit_spread"] == pytest.approx(
        np.std(unit_means(torch.relu(y), 1)), rel=1e-5
    )


def test_unit_spread_uses_the_unit_axis_of_conv_and_sequence_outputs() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3)
    seq = nn.Linear(4, 6)
    x4, x3 = torch.randn(4, 3, 8, 8), torch.randn(3, 9, 4)
    conv_layers, _ = probe_step(conv, Probes(conv), x4)
    seq_layers, _ = probe_step(seq, Probes(seq), x3)
    with torch.no_grad():
        want_conv = np.std(unit_means(conv(x4), 1))
        want_seq = np.std(unit_means(seq(x3), 2))
    assert conv_layers["model"]["unit_spread"] == pytest.approx(want_conv, rel=1e-5)
    assert seq_layers["model"]["unit_spread"] == pytest.approx(want_seq, rel=1e-5)


def test_a_module_called_twice_spreads_the_means_over_all_its_units() -> None:
    model = _Shared()
    x = uniform(16, 4, seed=4)
    layers, _ = probe_step(model, Probes(model), x)
    with torch.no_grad():
        first = model.fc(x)
        second = model.fc(F.relu(first))
        wide = model.wide(F.relu(second))
    # fc: the same 4 units in both calls; act: those 4 units (both calls) plus 6 others
    fc_means = unit_means(torch.cat([first, second]), 1)
    act_means = np.concatenate(
        [unit_means(F.relu(torch.cat([first, second])), 1), unit_means(F.relu(wide), 1)]
    )
    assert layers["fc"]["unit_spread"] == pytest.approx(np.std(fc_means), rel=1e-5)
    assert layers["act"]["unit_spread"] == pytest.approx(np.std(act_means), rel=1e-5)
    assert layers["wide"]["unit_spread"] == pytest.approx(np.std(unit_means(wide, 1)), rel=1e-5)


def test_zero_init_mlp_reads_zero_spread_in_every_layer_and_default_init_does_not() -> None:
    def mlp() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
        )

    zero = mlp()
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    x = uniform(32, 10, seed=5)
    optimizer = torch.optim.SGD(zero.parameters(), lr=0.1)
    layers, _ = probe_step(zero, Probes(zero, optimizer), x, optimizer)
    assert [layers[str(i)]["unit_spread"] for i in range(5)] == [0.0] * 5
    default = mlp()
    layers, _ = probe_step(default, Probes(default), x)
    assert all(layers[str(i)]["unit_spread"] > 0 for i in range(5))


def test_a_single_unit_layer_has_zero_spread_and_a_unitless_output_has_none() -> None:
    lin = nn.Linear(5, 1)
    layers, _ = probe_step(lin, Probes(lin), uniform(16, 5))
    assert layers["model"]["unit_spread"] == 0.0

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x.sum())

    scalar = Scalar()
    layers, _ = probe_step(scalar, Probes(scalar), uniform(4, 3))
    assert layers["act"]["unit_spread"] is None


class _SharedAndOptional(nn.Module):
    """A ReLU called twice (the general, call-by-call path) and a head taken on some steps."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.head = (
            nn.Linear(8, 8),
            nn.ReLU(),
            nn.Linear(8, 8),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor, use_head: bool) -> torch.Tensor:
        h = self.act(self.fc2(self.act(self.fc1(x))))
        return self.head(h) if use_head else h


def test_a_layer_taken_on_some_steps_beside_a_shared_module_reports_each_step() -> None:
    """The set of layers that ran changes between probe steps while one of them made two
    calls: each step reports what a fresh Probes reports (the general path's per-unit
    layout was cached by shape alone and the step without the head raised)."""
    torch.manual_seed(8)
    model = _SharedAndOptional()
    probes = Probes(model, sample_values=None)
    for i, use_head in enumerate((True, False, True, False, False)):
        x = uniform(16, 8, seed=i)
        got = []
        for p in (probes, Probes(model, sample_values=None)):
            p.arm()
            model(x, use_head)
            pending = p.collect()
            assert pending is not None
            got.append(pending.decode(pending.tensor)[0])
        assert got[0] == got[1], i
        assert [layer["name"] for layer in got[0]] == ["fc1", "act", "fc2"] + ["head"] * use_head


def test_a_collect_that_raises_leaves_nothing_for_the_next_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails while collect() assembles a step, the next probe step reports its own
    calls only, not those of the failed step as well."""
    torch.manual_seed(9)
    model = _SharedAndOptional()
    probes = Probes(model, sample_values=None)
    x = uniform(16, 8, seed=1)
    real = probes._sections.build

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(probes._sections, "build", real)
        raise RuntimeError("a fault while assembling")

    monkeypatch.setattr(probes._sections, "build", fail_once)
    probes.arm()
    model(x, True)
    with pytest.raises(RuntimeError, match="a fault"):
        probes.collect()
    probes.arm()
    model(x, True)
    pending = probes.collect()
    assert pending is not None
    fresh = Probes(model, sample_values=None)
    fresh.arm()
    model(x, True)
    expected = fresh.collect()
    assert expected is not None
    assert pending.calls == expected.calls == [1, 2, 1, 1]
    assert pending.decode(pending.tensor) == expected.decode(expected.tensor)


class _SharedUnequal(nn.Module):
    """One Tanh called on a large input in [-1, 0) and on a small one in (0.5, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        return self.act(big).sum() + self.act(small).sum()


def test_a_shared_modules_small_call_weighs_in_its_histogram_as_its_values_do() -> None:
    """10,000 values sampled down to 2,048 beside a call of 100 kept whole: the histogram
    holds the small call at its 1% of the values, not at 100 / 2,148 (4.7%)."""
    model = _SharedUnequal()
    probes = Probes(model, bins=8)
    big = -torch.rand(100, 100) * 0.99 - 0.01  # tanh in (-0.77, 0)
    small = torch.rand(1, 100) * 0.5 + 1.5  # tanh in (0.90, 0.96)
    probes.arm()
    model(big, small)
    pending = probes.collect()
    assert pending is not None
    (layer,), _ = pending.decode(pending.tensor)
    counts = layer["hist"]["counts"]
    share = counts[-1] / sum(counts)  # the small call's values are all in the top bin
    assert share == pytest.approx(100 / 10_100, rel=0.1), counts
    assert layer["mean"] == pytest.approx(
        torch.cat([big.tanh().flatten(), small.tanh().flatten()]).mean().item(), rel=1e-4
    )


def test_a_part_of_the_model_called_under_no_grad_is_not_a_training_pass() -> None:
    """An evaluation through a submodule (a kNN monitor's `model.backbone(x_val)` under
    no_grad), before or after the step's training pass, was recorded as training: the
    layer's max read 118 where training's was 2.3 (reviewer's t10_submodule_eval.py)."""
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Linear(4, 16), nn.ReLU()))
    model.add_module("head", nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt, sample_values=None)
    x = uniform(8, 4)
    probes.arm()
    with torch.no_grad():
        model.backbone(torch.full((64, 4), 100.0))  # before the training pass
    out = model(x)
    with torch.no_grad():
        model.backbone(torch.full((64, 4), -100.0))  # and after it
    opt.zero_grad()
    out.square().mean().backward()
    opt.step()
    pending = probes.collect()
    assert pending is not None
    layers = {layer["name"]: layer for layer in pending.decode(pending.tensor)[0]}
    first = layers["backbone.0"]
    assert sum(first["hist"]["counts"]) == 8 * 16  # the training pass's values only
    with torch.no_grad():
        want = model.backbone[0](x)  # the weights moved: compare what does not depend on them
    assert first["max"] < 50 and first["min"] > -50 and want.numel() == 8 * 16


def test_nested_and_vmapped_outputs_are_not_probed_and_do_not_stop_the_loop() -> None:
    """nn.TransformerEncoder in eval mode with a padding mask hands its layers nested
    tensors ('NestedTensorImpl doesn't support sizes' from the hook), and per-sample
    gradients through torch.func run the model on vmapped tensors (which the staging copy
    let escape their transform): both stopped loops that run without layerscope."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
    probes = Probes(encoder, sample_values=None)
    tokens, mask = uniform(2, 5, 8), torch.tensor([[False] * 5, [False, False, True, True, True]])
    encoder.eval()
    probes.arm()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors")  # torch's own
        encoder(tokens, src_key_padding_mask=mask)  # validation before the first step
    encoder.train()
    encoder(tokens, src_key_padding_mask=mask).sum().backward()
    assert probes.collect() is not None
    probes.close()

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x.unsqueeze(0),)).square().sum()

    probes.arm()
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, uniform(6, 3))
    for name, p in model.named_parameters():
        p.grad = grads[name].mean(0)
    opt.step()
    pending = probes.collect()
    assert pending is not None  # the gradients and weights, without activations
    layers, _ = pending.decode(pending.tensor)
    assert [layer["name"] for layer in layers if layer.get("grad_norm") is not None] == ["0", "2"]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("whole_model", [False, True])
def test_activation_checkpointing_recomputes_are_not_recorded_again(
    reentrant: bool, whole_model: bool
) -> None:
    """torch.utils.checkpoint recomputes a checkpointed segment's forward inside backward:
    those calls were recorded as second calls of the same layers (every value counted
    twice, histograms doubled). A layer is recorded once, as without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, checkpointed: bool) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
            self.head = nn.Linear(16, 2)
            self.checkpointed = checkpointed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if whole_model or not self.checkpointed:
                return self.head(self.body(x))
            return self.head(checkpoint(self.body, x, use_reentrant=reentrant))

    torch.manual_seed(0)
    plain = Net(checkpointed=False)
    model = Net(checkpointed=True)
    model.load_state_dict(plain.state_dict())
    x = uniform(32, 4)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    want, _ = probe_step(plain, Probes(plain, plain_opt), x, plain_opt)
    probes = Probes(model, opt := torch.optim.SGD(model.parameters(), lr=0.1))
    probes.arm()
    xin = x.clone().requires_grad_(reentrant)
    out = checkpoint(model, xin, use_reentrant=reentrant) if whole_model else model(xin)
    opt.zero_grad()
    out.float().square().mean().backward()
    opt.step()
    pending = probes.collect()
    assert pending is not None
    assert pending.calls == [1] * len(pending.act_layers)
    got = {layer["name"]: layer for layer in pending.decode(pending.tensor)[0]}
    assert set(got) == set(want)
    for name, layer in want.items():
        assert got[name]["hist"]["counts"] == layer["hist"]["counts"], name
        for key in ("mean", "std", "dead_ratio", "grad_norm"):
            expected = layer[key] if layer[key] is None else pytest.approx(layer[key], rel=1e-5)
            assert got[name][key] == expected, (name, key)
