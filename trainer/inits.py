"""inits — the weight-initialisation schemes the init lab compares.

Owns: applying ``default | zero | normal(std) | xavier | he`` to every Linear and
Conv weight of a model; biases are zeroed for every scheme except ``default``.
Xavier is Glorot's: variance 2 / (fan_in + fan_out), the scale for tanh-like layers;
He is Kaiming's for ReLU: variance 2 / fan_in (2 / (1 + slope^2) / fan_in for a
leaky ReLU), √2 larger in std where fan-in and fan-out are equal, which makes up for
the half of a ReLU's input it zeroes (PRACTICES.md). Neither depends on the
activation otherwise, so the lab's five schemes are five different networks.

Never: touches normalisation layers (BatchNorm keeps weight 1, bias 0) or
anything other than parameter values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEMES = ("default", "zero", "normal", "xavier", "he")
LEAKY_RELU_SLOPE = 0.01  # nn.LeakyReLU's default negative slope
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACTIVATIONS = ("relu", "gelu", "leaky_relu", "tanh", "sigmoid")


def he_gain(activation: str) -> float:
    """He's gain: √2 (ReLU's), or √(2 / (1 + slope²)) for a leaky ReLU."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"no init known for activation {activation!r}")
    if activation == "leaky_relu":
        return float(nn.init.calculate_gain("leaky_relu", LEAKY_RELU_SLOPE))
    return math.sqrt(2.0)


@torch.no_grad()
def init_weights(
    model: nn.Module, scheme: str, *, activation: str = "relu", std: float = 0.01
) -> int:
    """Re-initialise every Linear/Conv weight of ``model``; returns how many layers changed.

    ``default`` keeps (re-applies) the framework's own init via ``reset_parameters``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; expected one of {', '.join(SCHEMES)}")
    count = 0
    for module in model.modules():
        if not isinstance(module, _WEIGHTED):
            continue
        count += 1
        weight = module.weight
        if scheme == "default":
            module.reset_parameters()
            continue
        if scheme == "zero":
            nn.init.zeros_(weight)
        elif scheme == "normal":
            nn.init.normal_(weight, mean=0.0, std=std)
        elif scheme == "xavier":
            nn.init.xavier_normal_(weight, gain=1.0)
        else:
            he_gain(activation)  # an unknown activation is an error, not ReLU's gain
            leaky = activation == "leaky_relu"
            nn.init.kaiming_normal_(
                weight,
                a=LEAKY_RELU_SLOPE if leaky else 0.0,
                mode="fan_in",
                nonlinearity="leaky_relu" if leaky else "relu",
            )
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return count


def expected_std(
    scheme: str, fan_in: int, fan_out: int, activation: str, std: float = 0.01
) -> float:
    """The weight std a scheme aims for (what the tests and the init lab compare against)."""
    if scheme == "zero":
        return 0.0
    if scheme == "normal":
        return std
    if scheme == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "he":
        return he_gain(activation) / math.sqrt(fan_in)
    raise ValueError(f"scheme {scheme!r} has no single target std")
