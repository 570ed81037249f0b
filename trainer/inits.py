"""inits — the weight-initialisation schemes the init lab compares.

Owns: applying ``default | zero | normal(std) | xavier | he`` to every Linear and
Conv weight of a model; biases are zeroed for every scheme except ``default``.
Xavier takes the gain of the layer's activation (``nn.init.calculate_gain``), He
uses Kaiming with the matching nonlinearity (fan-in mode), so each layer's output
variance matches its input's.

Never: touches normalisation layers (BatchNorm keeps weight 1, bias 0) or
anything other than parameter values.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

SCHEMES = ("default", "zero", "normal", "xavier", "he")
LEAKY_RELU_SLOPE = 0.01  # nn.LeakyReLU's default negative slope
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Kaiming has no entry for gelu; it is initialised like ReLU, which it approximates
# (both keep roughly half of a zero-mean input's second moment).
_Nonlinearity = Literal["relu", "leaky_relu", "tanh", "sigmoid"]
_KAIMING_NONLINEARITY: dict[str, _Nonlinearity] = {
    "relu": "relu",
    "gelu": "relu",
    "leaky_relu": "leaky_relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
}


def activation_gain(activation: str) -> float:
    """The recommended gain for ``activation`` (gelu counted as relu)."""
    name = _KAIMING_NONLINEARITY.get(activation)
    if name is None:
        raise ValueError(f"no init gain known for activation {activation!r}")
    param = LEAKY_RELU_SLOPE if name == "leaky_relu" else None
    return float(nn.init.calculate_gain(name, param))


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
            nn.init.xavier_normal_(weight, gain=activation_gain(activation))
        else:
            nonlinearity = _KAIMING_NONLINEARITY[activation]
            slope = LEAKY_RELU_SLOPE if nonlinearity == "leaky_relu" else 0.0
            nn.init.kaiming_normal_(weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
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
        return activation_gain(activation) * math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "he":
        return activation_gain(activation) / math.sqrt(fan_in)
    raise ValueError(f"scheme {scheme!r} has no single target std")
