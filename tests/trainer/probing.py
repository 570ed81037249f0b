"""probing — the probe tests' one way to run a probe step and the inputs they share."""

from __future__ import annotations

from typing import Any

import torch
from layerscope.trainer.probes import Probes
from torch import nn

Layers = dict[str, dict[str, Any]]


def probe_step(
    model: nn.Module,
    probes: Probes,
    x: torch.Tensor | nn.utils.rnn.PackedSequence,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[Layers, dict[str, float | None]]:
    """One probe step the way watch() runs it: arm, forward/backward/step, collect, one copy."""
    probes.arm()
    out = model(x)
    if optimizer is not None:
        out = out[0] if isinstance(out, tuple) else out
        loss = out.float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pending = probes.collect()
    assert pending is not None
    layers, scalars = pending.decode(pending.tensor.cpu())
    return {layer["name"]: layer for layer in layers}, scalars


def uniform(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
