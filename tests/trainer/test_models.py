"""The built-in networks: output shapes and the qualified names every chart shows."""

from __future__ import annotations

import pytest
import torch
from layerscope.trainer.models import CNN, MLP, build_model
from torch import nn


def test_mlp_names_shapes_and_blocks() -> None:
    model = MLP(64, depth=3, width=32, out_dim=10, activation="tanh")
    names = {name: type(m).__name__ for name, m in model.named_modules() if name}
    assert names["net.0"] == "Linear" and names["net.1"] == "Tanh"
    assert names["net.2"] == "Linear" and names["net.6"] == "Linear"
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 4  # 3 hidden + head
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # images are flattened


def test_mlp_batch_norm_and_dropout_sit_between_linear_and_next_block() -> None:
    model = MLP(2, depth=2, width=8, out_dim=3, activation="relu", batch_norm=True, dropout=0.5)
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == [
        "Linear", "BatchNorm1d", "ReLU", "Dropout",
        "Linear", "BatchNorm1d", "ReLU", "Dropout",
        "Linear",
    ]  # fmt: skip
    model.eval()
    x = torch.randn(4, 2)
    assert torch.equal(model(x), model(x)), "eval mode must switch dropout off"


def test_cnn_on_digits_shape_names_and_pooling_stops_at_2x2() -> None:
    model = CNN((1, 8, 8), depth=4, width=6, out_dim=10, activation="relu", batch_norm=True)
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2  # 8 -> 4 -> 2, then no more pooling
    names = {name: type(m).__name__ for name, m in model.named_modules() if name}
    assert names["features.0"] == "Conv2d" and names["features.1"] == "BatchNorm2d"
    assert names["head.1"] == "Linear"
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_build_model_picks_arch_and_rejects_cnn_on_point_data() -> None:
    cfg = {"arch": "cnn", "depth": 2, "width": 4, "activation": "gelu",
           "batch_norm": False, "dropout": 0.1}  # fmt: skip
    assert isinstance(build_model(cfg, (8, 8), 10), CNN)  # H x W gains a channel
    with pytest.raises(ValueError, match="cnn needs image data"):
        build_model(cfg, (2,), 3)
    mlp = build_model({**cfg, "arch": "mlp"}, (1, 8, 8), 10)
    assert isinstance(mlp, MLP) and mlp.net[0].in_features == 64


def test_unknown_activation_is_named() -> None:
    with pytest.raises(ValueError, match="swish"):
        MLP(2, 1, 4, 2, activation="swish")
