"""models — the built-in networks of ``layerscope train``: an MLP and a small CNN.

Owns: building them with readable qualified names (``net.0`` Linear, ``net.1``
its activation, ...), the names every chart and probe record shows.

Never: initialises weights beyond the framework's default (``inits`` does) or
knows about data loading, devices or the server.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

# Pool only while the feature map stays at least this big, so a deep CNN on
# 8x8 digits keeps a 2x2 map instead of pooling itself down to nothing.
MIN_POOLED_SIZE = 2


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}"
        ) from None


class MLP(nn.Module):
    """``depth`` hidden blocks of Linear [BatchNorm1d] activation [Dropout], then a Linear head.

    Inputs of any shape ``(N, ...)`` are flattened, so an image data set works too.
    """

    def __init__(
        self,
        in_dim: int,
        depth: int,
        width: int,
        out_dim: int,
        activation: str = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_dim < 1 or out_dim < 1:
            raise ValueError("MLP needs in_dim, depth, width and out_dim of at least 1")
        layers: list[nn.Module] = []
        fan_in = in_dim
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = width
        layers.append(nn.Linear(fan_in, out_dim))
        self.activation = activation
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """``depth`` blocks of Conv3x3 [BatchNorm2d] activation [MaxPool2d], then a linear head.

    For ``C x H x W`` images (digits are 1x8x8). Names: ``features.N`` for the
    blocks, ``head.N`` for the classifier (``head.0`` Flatten, then [Dropout,] Linear).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        depth: int,
        width: int,
        out_dim: int,
        activation: str = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"CNN needs C x H x W images, got input shape {tuple(in_shape)}")
        channels, height, width_px = in_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(make_activation(activation))
            if min(height, width_px) // 2 >= MIN_POOLED_SIZE:
                layers.append(nn.MaxPool2d(2))
                height, width_px = height // 2, width_px // 2
            channels = width
        head: list[nn.Module] = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(channels * height * width_px, out_dim))
        self.activation = activation
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(model_cfg: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network a validated ``model`` config section describes, for this data."""
    common = {
        "depth": model_cfg["depth"],
        "width": model_cfg["width"],
        "out_dim": num_classes,
        "activation": model_cfg["activation"],
        "batch_norm": model_cfg["batch_norm"],
        "dropout": model_cfg["dropout"],
    }
    if model_cfg["arch"] == "cnn":
        if len(in_shape) == 2:
            in_shape = (1, *in_shape)
        if len(in_shape) != 3:
            raise ValueError(
                f"cnn needs image data (C x H x W or H x W); this data has shape {in_shape}"
            )
        return CNN((in_shape[0], in_shape[1], in_shape[2]), **common)
    in_dim = 1
    for size in in_shape:
        in_dim *= size
    return MLP(in_dim, **common)
