"""Init schemes produce the statistics the init lab explains (PRACTICES: initialisation)."""

from __future__ import annotations

import math

import pytest
import torch
from layerscope.trainer.inits import expected_std, he_gain, init_weights
from layerscope.trainer.models import CNN, MLP
from torch import nn

FAN_IN, FAN_OUT = 400, 300


def _layer(scheme: str, activation: str = "relu", std: float = 0.01) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(FAN_IN, FAN_OUT)
    init_weights(layer, scheme, activation=activation, std=std)
    return layer


def test_zero_init_zeros_every_weight_and_bias() -> None:
    model = MLP(10, depth=3, width=16, out_dim=4)
    assert init_weights(model, "zero") == 4
    for p in model.parameters():
        assert torch.count_nonzero(p) == 0


@pytest.mark.parametrize("std", [0.01, 1.0])
def test_normal_init_has_the_asked_std_and_zero_bias(std: float) -> None:
    layer = _layer("normal", std=std)
    assert layer.weight.std().item() == pytest.approx(std, rel=0.02)
    assert abs(layer.weight.mean().item()) < 0.01 * std
    assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_xavier_variance_is_2_over_fan_in_plus_fan_out_whatever_the_activation(
    activation: str,
) -> None:
    layer = _layer("xavier", activation)
    want = 2 / (FAN_IN + FAN_OUT)  # Glorot's, gain 1
    assert layer.weight.var().item() == pytest.approx(want, rel=0.03)
    assert expected_std("xavier", FAN_IN, FAN_OUT, activation) == pytest.approx(math.sqrt(want))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "gelu"])
def test_he_variance_is_2_over_fan_in_whatever_the_activation(activation: str) -> None:
    layer = _layer("he", activation)
    assert layer.weight.var().item() == pytest.approx(2 / FAN_IN, rel=0.03)
    assert expected_std("he", FAN_IN, FAN_OUT, activation) == pytest.approx(math.sqrt(2 / FAN_IN))
    leaky = _layer("he", "leaky_relu")
    assert leaky.weight.var().item() == pytest.approx(2 / (1 + 0.01**2) / FAN_IN, rel=0.03)
    assert he_gain("leaky_relu") == pytest.approx(math.sqrt(2 / (1 + 0.01**2)))


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_he_is_root2_larger_than_xavier_where_fan_in_equals_fan_out(activation: str) -> None:
    """The init lab's lesson (PRACTICES: He is √2 larger, for ReLU layers): with the lab's
    equal widths the two schemes must be different networks, for every activation."""
    torch.manual_seed(0)
    xavier, he = (MLP(64, depth=4, width=64, out_dim=10) for _ in range(2))
    init_weights(xavier, "xavier", activation=activation)
    init_weights(he, "he", activation=activation)
    for a, b in zip(xavier.net, he.net, strict=True):
        if isinstance(a, nn.Linear) and a.in_features == a.out_features:
            assert b.weight.std().item() / a.weight.std().item() == pytest.approx(
                math.sqrt(2), rel=0.05
            )


def test_an_unknown_activation_is_an_error() -> None:
    with pytest.raises(ValueError, match="softmax"):
        _layer("he", "softmax")


def test_he_on_conv_uses_fan_in_of_kernel_and_channels() -> None:
    torch.manual_seed(0)
    model = CNN((3, 8, 8), depth=1, width=64, out_dim=2)
    init_weights(model, "he", activation="relu")
    conv = model.features[0]
    fan_in = 3 * 3 * 3
    assert conv.weight.var().item() == pytest.approx(2 / fan_in, rel=0.1)


def test_default_keeps_framework_init_and_its_nonzero_bias() -> None:
    layer = _layer("default")
    bound = 1 / math.sqrt(FAN_IN)  # kaiming_uniform(a=sqrt 5) gives U(-1/sqrt(fan_in), ..)
    assert layer.weight.abs().max().item() <= bound
    assert torch.count_nonzero(layer.bias) > 0


def test_batch_norm_is_left_alone_and_unknown_scheme_is_named() -> None:
    model = MLP(4, depth=1, width=8, out_dim=2, batch_norm=True)
    init_weights(model, "zero")
    assert torch.all(model.net[1].weight == 1)
    with pytest.raises(ValueError, match="orthogonal"):
        init_weights(model, "orthogonal")
