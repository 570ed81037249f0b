"""stats — the tensor arithmetic behind the per-layer probes (DESIGN §3).

Owns: the exact definitions of every activation statistic (which values count as
live or saturated for each activation, the unit axis, finite-only moments,
histograms bucketed with tensor ops) and the vectorised reductions that turn
per-call partial results into per-layer numbers.

Never: reads a tensor's value on the host (no ``.item()``, ``.cpu()``,
``.tolist()``, ``float(t)``, ``bool(t)``, no ``torch.histc``), touches hooks,
modules or optimizers, or builds a device tensor from a Python list (that is a
host-to-device copy, a sync on CUDA). Every function here is a plain function of
tensors and Python numbers taken from shapes, so the same code runs on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# DESIGN §3 thresholds (SageMaker Debugger's DeadRelu defaults; 0.99 = pinned at +-1).
DEAD_ACTIVITY_MAX = 0.01  # a unit live on <= 1% of its values is dead
SATURATION_LEVEL = 0.99  # tanh/softsign |y| >= 0.99, sigmoid y <= 0.01 or >= 0.99
SATURATED_UNIT_MAJORITY = 0.5  # a unit saturated on > 50% of its values is saturated
_SIGMOID_LOW = round(1.0 - SATURATION_LEVEL, 12)

# Per-call row layout (float64): counts stay exact, moments are finite-only after `canonical`.
N_FINITE, NONFINITE, ZEROS, MEAN, M2, LO, HI, SATURATED = range(8)
ROW_WIDTH = 8


@dataclass(frozen=True)
class Rule:
    """What the live region and the saturated region of one activation are.

    ``live_above``: a value is live when ``source > live_above`` (None: no dead_ratio).
    ``transform``: applied to the layer output before the saturation test (for a
    Linear/Conv output feeding a named function); None: the output itself.
    ``sat_lo``/``sat_hi``: saturated when ``y <= sat_lo or y >= sat_hi`` (None: no saturation).
    """

    live_above: float | None = None
    transform: Callable[[Tensor], Tensor] | None = None
    sat_lo: float | None = None
    sat_hi: float | None = None

    @property
    def saturates(self) -> bool:
        return self.sat_lo is not None


NO_RULE = Rule()
_RELU_FAMILY = Rule(live_above=0.0)
_LIVE_KINDS = frozenset(
    {"ReLU", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish"}
)

# Functions a Linear/Conv output may feed (Probes(activations={name: fn})). For every
# ReLU-like f, f(x) > 0 exactly when x > 0, so dead_ratio is measured on the input itself.
FUNCTION_RULES: dict[str, Rule] = {
    **dict.fromkeys(
        (
            "relu",
            "leaky_relu",
            "prelu",
            "elu",
            "selu",
            "celu",
            "gelu",
            "silu",
            "swish",
            "mish",
            "hardswish",
            "softplus",
        ),
        _RELU_FAMILY,
    ),
    "relu6": Rule(live_above=0.0, sat_lo=0.0, sat_hi=6.0),
    "tanh": Rule(transform=torch.tanh, sat_lo=-SATURATION_LEVEL, sat_hi=SATURATION_LEVEL),
    "sigmoid": Rule(transform=torch.sigmoid, sat_lo=_SIGMOID_LOW, sat_hi=SATURATION_LEVEL),
    "softsign": Rule(transform=F.softsign, sat_lo=-SATURATION_LEVEL, sat_hi=SATURATION_LEVEL),
    "hardtanh": Rule(sat_lo=-1.0, sat_hi=1.0),
    "hardsigmoid": Rule(transform=F.hardsigmoid, sat_lo=0.0, sat_hi=1.0),
    "identity": NO_RULE,
    "linear": NO_RULE,
    "none": NO_RULE,
}


def module_rule(module: torch.nn.Module, default: Rule = NO_RULE) -> Rule:
    """The rule for an activation module's own output (``default`` for anything else)."""
    kind = type(module).__name__
    if isinstance(module, torch.nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6): dead and pinned at 6
        lo, hi = float(module.min_val), float(module.max_val)
        return Rule(live_above=0.0 if lo == 0.0 else None, sat_lo=lo, sat_hi=hi)
    if isinstance(module, torch.nn.Softplus):  # softplus(x) > ln2/beta exactly when x > 0
        return Rule(live_above=math.log(2.0) / float(module.beta))
    if isinstance(module, torch.nn.Tanh | torch.nn.Softsign):
        return Rule(sat_lo=-SATURATION_LEVEL, sat_hi=SATURATION_LEVEL)
    if isinstance(module, torch.nn.Sigmoid):
        return Rule(sat_lo=_SIGMOID_LOW, sat_hi=SATURATION_LEVEL)
    if isinstance(module, torch.nn.Hardsigmoid):  # exactly 0 or 1 outside [-3, 3]
        return Rule(sat_lo=0.0, sat_hi=1.0)
    if kind in _LIVE_KINDS or isinstance(module, torch.nn.ReLU):
        return _RELU_FAMILY
    return default


def unit_axis(ndim: int, channel_first: bool) -> int | None:
    """The unit axis of an output: features (2-D dim 1), channels (4-D/5-D dim 1,
    3-D dim 1 for Conv1d-like layers), else the last dim of 3-D; 1-D is one sample."""
    if ndim == 0:
        return None
    if ndim == 1:
        return 0
    if ndim == 3 and not channel_first:
        return 2
    return 1


def unit_fraction(mask: Tensor, axis: int) -> Tensor:
    """Per unit, the fraction of its values (all samples and positions) where mask holds."""
    if mask.dim() == 1:
        return mask.to(torch.float32)
    dims = tuple(d for d in range(mask.dim()) if d != axis)
    per_unit = mask.shape[axis]
    return mask.sum(dim=dims, dtype=torch.float32).div_(mask.numel() // per_unit)


def saturated_mask(y: Tensor, rule: Rule) -> Tensor:
    assert rule.sat_lo is not None and rule.sat_hi is not None
    source = rule.transform(y) if rule.transform is not None else y
    return (source <= rule.sat_lo) | (source >= rule.sat_hi)


def value_row(y: Tensor, saturated: Tensor) -> Tensor:
    """One call's partial statistics of a float tensor, as a float64 row (see ROW layout).

    ``MEAN``/``M2`` here are over all values with non-finite ones replaced by 0;
    ``canonical`` turns them into finite-only moments. ``saturated`` is a 0-d count.
    Cost: ~12 elementwise/reduction kernels, no host reads.
    """
    finite = torch.isfinite(y)
    n_finite = finite.sum(dtype=torch.float64)
    nonfinite = y.numel() - n_finite
    clean = torch.where(finite, y, 0.0)
    var0, mean0 = torch.var_mean(clean, correction=0)
    zeros = (y == 0).sum(dtype=torch.float64)
    lo = torch.where(finite, y, math.inf).amin()
    hi = torch.where(finite, y, -math.inf).amax()
    return torch.stack([n_finite, nonfinite, zeros, mean0, var0 * y.numel(), lo, hi, saturated])


def canonical(rows: Tensor) -> Tensor:
    """Rows from ``value_row`` -> rows whose MEAN/M2 are over finite values only.

    The zero-filled set is the finite values (n, mean, M2) plus k zeros, so by the
    parallel-variance identity M2_all = M2 + mean^2 * n * k / (n + k).
    """
    n = rows[:, N_FINITE]
    k = rows[:, NONFINITE]
    total = n + k
    mean = rows[:, MEAN] * total / n  # n == 0 gives NaN: no finite values, no mean
    m2 = (rows[:, M2] - mean.square() * n * k / total).clamp_min(0.0)
    out = rows.clone()
    out[:, MEAN] = mean
    out[:, M2] = m2
    return out


def combine(a: Tensor, b: Tensor) -> Tensor:
    """Merge two canonical rows of the same layer (Chan et al. parallel moments)."""
    na, nb = a[N_FINITE], b[N_FINITE]
    n = na + nb
    safe_n = n.clamp_min(1.0)
    ma = torch.nan_to_num(a[MEAN])
    mb = torch.nan_to_num(b[MEAN])
    delta = mb - ma
    mean = torch.where(n > 0, ma + delta * nb / safe_n, math.nan)
    m2 = a[M2] + b[M2] + delta.square() * na * nb / safe_n
    summed = a + b
    return torch.stack(
        [
            n,
            summed[NONFINITE],
            summed[ZEROS],
            mean,
            m2,
            torch.minimum(a[LO], b[LO]),
            torch.maximum(a[HI], b[HI]),
            summed[SATURATED],
        ]
    )


def finish_values(rows: Tensor, saturates: Tensor) -> Tensor:
    """Canonical rows [n, 8] -> [n, 7]: mean, std, min, max, zero_frac, nonfinite,
    saturated_frac. ``saturates`` is 1 where the layer has a saturation rule, NaN elsewhere.
    std is the population std (numpy's default) of the finite values."""
    n = rows[:, N_FINITE]
    total = n + rows[:, NONFINITE]
    std = (rows[:, M2] / n).sqrt()
    return torch.stack(
        [
            rows[:, MEAN],
            std,
            rows[:, LO],
            rows[:, HI],
            rows[:, ZEROS] / total,
            rows[:, NONFINITE],
            rows[:, SATURATED] / total * saturates,
        ],
        dim=1,
    )


def segment_ids(lengths: Sequence[int], device: torch.device) -> Tensor:
    """[0]*lengths[0] + [1]*lengths[1] + ... built on the device without a host copy."""
    parts = [torch.full((m,), i, dtype=torch.long, device=device) for i, m in enumerate(lengths)]
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(parts)


def device_vector(
    values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float64
) -> Tensor:
    """A vector of Python numbers, filled on the device (no host-to-device copy).
    One small kernel per value: callers cache the result."""
    if not values:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([torch.full((1,), v, dtype=dtype, device=device) for v in values])


def unit_ratio(fractions: Tensor, segments: Tensor, units: Tensor, *, dead: bool) -> Tensor:
    """Per layer, the fraction of units that are dead (activity <= DEAD_ACTIVITY_MAX) or
    saturated (saturated on more than SATURATED_UNIT_MAJORITY of their values).
    ``units`` holds each layer's unit count, 0 where the statistic does not apply (-> NaN)."""
    flags = fractions <= DEAD_ACTIVITY_MAX if dead else fractions > SATURATED_UNIT_MAJORITY
    counts = torch.zeros_like(units).index_add_(0, segments, flags.to(units.dtype))
    return counts / units


def histograms(samples: Tensor, segments: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Counts [n_layers, bins] of each layer's samples over its own [lo, hi].

    Bucketed with tensor ops (``floor((x - lo) / w)``, clamp, ``index_add_``) because
    ``torch.histc`` wants Python-scalar bounds, a sync. Bins are numpy's: half-open
    except the last, which includes ``hi``. lo == hi puts every value in bin 0.
    Non-finite samples are left out. Counts are exact up to 2**24 per bin (float32).
    """
    n_layers = lo.shape[0]
    lo32, hi32 = lo.to(torch.float32), hi.to(torch.float32)
    width = (hi32 - lo32) / bins
    width = torch.where(width > 0, width, 1.0)  # lo == hi, or no finite values at all
    bucket = ((samples - lo32[segments]) / width[segments]).floor_().clamp_(0, bins - 1)
    flat = segments * bins + bucket.to(torch.long)
    flat = torch.where(torch.isfinite(samples), flat, n_layers * bins)  # spill slot for NaN/Inf
    counts = torch.zeros(n_layers * bins + 1, dtype=torch.float32, device=samples.device)
    counts.index_add_(0, flat, torch.ones_like(samples))
    return counts[:-1].view(n_layers, bins)


def norms(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """L2 norm of each tensor as one float32 vector on ``device``, via fused
    ``_foreach_norm`` per (device, dtype) group (one kernel per group on CUDA)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[Tensor] = [tensors[0]] * len(tensors)
    for (_, _), idx in groups.items():
        for i, value in zip(idx, torch._foreach_norm([tensors[i] for i in idx]), strict=True):
            out[i] = value.to(device=device, dtype=torch.float32, non_blocking=True)
    return torch.stack(out)
