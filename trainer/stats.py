"""stats — the arithmetic behind the per-layer probes (DESIGN §3).

Owns: the exact definitions of every activation statistic (which values count as
live or saturated for each activation, the unit axis, finite-only moments, the
spread across units of their mean outputs (``unit_spread``), histograms bucketed
with tensor ops), the device-side reductions a probe step runs across layers (one
call's are in ``reduce``), and ``PendingStats``: the layout of the one flat tensor a probe step
produces and its host-side decoding (moments, merging a module's calls, per-layer
norms) into wire probe-frame entries. ``probes`` re-exports ``PendingStats``.

Never: reads a tensor's value on the host in a device function (no ``.item()``,
``.cpu()``, ``.tolist()``, ``float(t)``, ``bool(t)``, no ``torch.histc``), touches
hooks, modules or optimizers, or builds a device tensor from a Python list (that
is a host-to-device copy, a sync on CUDA). Only ``PendingStats.decode`` and
``Summary`` work on host numbers, after the caller's single copy.

Non-finite values: moments, min/max and histograms are of the finite values; a
NaN/Inf counts in ``nonfinite`` and as neither zero, live nor saturated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# DESIGN §3 thresholds (SageMaker Debugger's DeadRelu defaults; 0.99 = pinned at +-1).
DEAD_ACTIVITY_MAX = 0.01  # a unit live on <= 1% of its values is dead
# Ours: a unit seen on fewer values has no activity to speak of (with a batch of 1, a
# healthy ReLU unit is "dead" whenever its one value is negative: half the layer). From 8
# values a unit live half the time reads dead with probability 2**-8, so a healthy layer
# stays far below the 50% alert line; below it dead_ratio is None (unknown).
MIN_ACTIVITY_VALUES = 8
SATURATION_LEVEL = 0.99  # tanh/softsign |y| >= 0.99, sigmoid y <= 0.01 or >= 0.99
SATURATED_UNIT_MAJORITY = 0.5  # a unit saturated on > 50% of its values is saturated
_SIGMOID_LOW = round(1.0 - SATURATION_LEVEL, 12)
DEFAULT_BINS = 64
UPDATE_SAMPLE = 4096  # pre-step entries kept per parameter for update_ratio

# One call's raw row (see reduce.reduce_calls); the non-finite count travels separately.
# ROOT_S2 is the root of the sum of squares about the shift (a norm): float32 holds it for
# values whose squares' sum it could not (a spread past ~1e19: exploding activations).
SHIFT, S1, ROOT_S2, NONZERO, LO, HI = range(6)
RAW_WIDTH = 6
UNIT_WIDTH = 4  # per layer: dead_ratio, saturated_ratio, saturated values, unit variance


@dataclass(frozen=True)
class Rule:
    """What the live region and the saturated region of one activation are.

    ``live_above``: a value is live when ``source > live_above`` (None: no dead_ratio).
    ``transform``: applied to the layer output before the saturation test (for a
    Linear/Conv output feeding a named function); None: the output itself.
    ``sat_lo``/``sat_hi``: saturated when ``y <= sat_lo or y >= sat_hi`` (None: no saturation;
    ``sat_lo`` -inf: pinned only at the top, as ReLU6, whose 0 is "off", dead_ratio's case).
    ``nonnegative``: the module's output is never negative, which saves a kernel.
    ``transform_dtype``: the dtype the model's function ran in (a bf16/fp16 layer output
    under autocast): the transform runs in it too, so its result is the model's, rounded
    as the model's was, before the threshold test (tanh of a bf16 value is 0.9883 in
    bf16 where float32 gives 0.9902: a different side of 0.99). ``for_dtype`` sets it.
    """

    live_above: float | None = None
    transform: Callable[[Tensor], Tensor] | None = None
    sat_lo: float | None = None
    sat_hi: float | None = None
    nonnegative: bool = False  # the output is never negative (ReLU): its sign is the live test
    transform_dtype: torch.dtype | None = None

    @property
    def saturates(self) -> bool:
        return self.sat_lo is not None

    def for_dtype(self, dtype: torch.dtype | None) -> Rule:
        """This rule for a call whose output (the transform's input) has ``dtype``: itself
        unless a transform applies and ``dtype`` is narrower than float32 (None: itself);
        else one shared rule object per (rule, dtype), so calls grouped by rule identity
        stay grouped. A host-side look-up, no tensor work."""
        if self.transform is None or dtype not in _NARROW_DTYPES:
            return self
        return _rule_in_dtype(self, dtype)

    def apply_transform(self, clean: Tensor) -> Tensor:
        """The transform of the (float32) cleaned output, computed in ``transform_dtype``
        when set (two casts more) and returned in ``clean``'s dtype."""
        assert self.transform is not None
        if self.transform_dtype is None:
            return self.transform(clean)
        return self.transform(clean.to(self.transform_dtype)).to(clean.dtype)


_NARROW_DTYPES = frozenset({torch.bfloat16, torch.float16})


@functools.cache
def _rule_in_dtype(rule: Rule, dtype: torch.dtype) -> Rule:
    return replace(rule, transform_dtype=dtype)


NO_RULE = Rule()
_RELU_FAMILY = Rule(live_above=0.0)
_RELU = Rule(live_above=0.0, nonnegative=True)
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
    "relu6": Rule(live_above=0.0, sat_lo=-math.inf, sat_hi=6.0),
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
        # A lower edge at 0 is a ReLU's "off" (dead_ratio's case; DESIGN §3: a ReLU off 60%
        # of the time is normal), not saturation: only the top edge pins.
        return Rule(
            live_above=0.0 if lo == 0.0 else None,
            sat_lo=-math.inf if lo == 0.0 else lo,
            sat_hi=hi,
            nonnegative=lo >= 0,
        )
    if isinstance(module, torch.nn.Softplus):  # softplus(x) > ln2/beta exactly when x > 0
        return Rule(live_above=math.log(2.0) / float(module.beta))
    if isinstance(module, torch.nn.Tanh | torch.nn.Softsign):
        return Rule(sat_lo=-SATURATION_LEVEL, sat_hi=SATURATION_LEVEL)
    if isinstance(module, torch.nn.Sigmoid):
        return Rule(sat_lo=_SIGMOID_LOW, sat_hi=SATURATION_LEVEL)
    if isinstance(module, torch.nn.Hardsigmoid):  # exactly 0 or 1 outside [-3, 3]
        return Rule(sat_lo=0.0, sat_hi=1.0)
    if isinstance(module, torch.nn.ReLU):
        return _RELU
    if kind in _LIVE_KINDS:
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


def inside_indicator(y: Tensor, clean: Tensor, rule: Rule) -> Tensor:
    """A new tensor shaped like y: -1 where a value is strictly inside (sat_lo, sat_hi),
    i.e. not saturated, else 0 (negative: one kernel fewer in the common symmetric
    case). Non-finite values count as inside."""
    assert rule.sat_lo is not None and rule.sat_hi is not None
    lo, hi = rule.sat_lo, rule.sat_hi
    if lo == -math.inf:  # pinned only at the top (ReLU6): inside is below sat_hi
        # a non-finite value counts as inside: clean holds 0 there, below every such sat_hi
        assert hi > 0.0
        source = rule.apply_transform(clean) if rule.transform is not None else clean
        return torch.sub(source, hi).clamp_(max=0.0).sign_()
    if rule.transform is not None:
        source = rule.apply_transform(clean)  # every function here maps 0 strictly inside
    elif lo == -hi:
        source = clean
    else:
        mid = (lo + hi) / 2
        source = torch.nan_to_num(y, nan=mid, posinf=mid, neginf=mid)
    if lo == -hi:
        # |x| - hi < 0 exactly when inside: clamp to <= 0 and take the sign (-1 or 0)
        return source.abs().sub_(hi).clamp_(max=0.0).sign_()
    return torch.relu(source - lo).sign_().mul_(torch.relu(hi - source).sign_().neg_())


@dataclass
class Summary:
    """Finite-value moments of one layer over every call of a step (host-side floats)."""

    finite: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    zeros: float = 0.0
    nonfinite: float = 0.0
    total: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, raw: Sequence[float], nonfinite: float, total: int) -> None:
        """Fold in one call's raw row. The device sums ran over ``clean`` (non-finite
        -> 0), so each of the k non-finite values added -shift to s1 and shift^2 to
        s2; that is taken back out, then the call is merged (Chan et al.)."""
        k = nonfinite
        n = total - k
        shift = raw[SHIFT]
        s1 = raw[S1] + k * shift
        s2 = raw[ROOT_S2] ** 2 - k * shift * shift
        if n > 0:
            mean = shift + s1 / n
            m2 = max(s2 - s1 * s1 / n, 0.0)
            merged = self.finite + n
            delta = mean - self.mean
            self.mean += delta * n / merged
            self.m2 += m2 + delta * delta * self.finite * n / merged
            self.finite = merged
        self.zeros += total - k - raw[NONZERO]
        self.nonfinite += k
        self.total += total
        self.lo = min(self.lo, raw[LO])
        self.hi = max(self.hi, raw[HI])

    def values(self) -> dict[str, float | None]:
        """mean, std (population, numpy's default), min, max of the finite values;
        zero_frac of all values; the non-finite count. None where there is no value
        (or where the arithmetic overflowed)."""
        some = self.finite > 0
        mean, m2 = self.mean, self.m2
        if self.lo == self.hi:  # every finite value the same: exactly that, no spread
            mean, m2 = self.lo, 0.0
        return {
            "mean": _finite(mean) if some else None,
            "std": _finite(math.sqrt(m2 / self.finite)) if some else None,
            "min": _finite(self.lo) if some else None,
            "max": _finite(self.hi) if some else None,
            "zero_frac": _finite(self.zeros / self.total) if self.total else None,
            "nonfinite": _finite(self.nonfinite),
        }


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


def unit_ratio(
    counts: Tensor, values_per_unit: Tensor, segments: Tensor, units: Tensor, *, dead: bool
) -> tuple[Tensor, Tensor | None]:
    """Per layer: (ratio of flagged units, count of flagged values).

    dead=True: ``counts`` are live values; a unit is dead when live/values <=
    DEAD_ACTIVITY_MAX; no value count is needed (None).
    dead=False: ``counts`` are values inside the bounds; a unit is saturated when more
    than SATURATED_UNIT_MAJORITY of its values are outside; the value count is the
    number of saturated values. ``units`` is each layer's unit count, 0 where the
    statistic does not apply (ratio NaN).
    """
    if dead:
        flags = counts / values_per_unit <= DEAD_ACTIVITY_MAX
        return torch.zeros_like(units).index_add_(0, segments, flags.to(units.dtype)) / units, None
    flagged_values = values_per_unit - counts
    flags = flagged_values / values_per_unit > SATURATED_UNIT_MAJORITY
    ratio = torch.zeros_like(units).index_add_(0, segments, flags.to(units.dtype)) / units
    values = torch.zeros_like(units).index_add_(0, segments, flagged_values.to(units.dtype))
    return ratio, values


def unit_spread_var(
    sums: Tensor, values_per_unit: Tensor, segments: Tensor, units: Tensor, firsts: Tensor
) -> Tensor:
    """Per layer: the population variance over its units of each unit's mean output
    (``sums / values_per_unit``, non-finite values counted as 0), float64. ``firsts``
    holds each layer's first unit; ``units`` is 0 for a layer without units (NaN).

    Each unit's mean is taken relative to its layer's first unit, then two passes
    (mean, squared deviations): when every unit has the same mean every difference is
    exactly 0, so the variance is exactly 0, never a rounding residue.
    Cost: ~8 small kernels for all layers together, no host reads.
    """
    means = sums.to(torch.float64) / values_per_unit.to(torch.float64)
    d = means - means.index_select(0, firsts).index_select(0, segments)
    zeros = torch.zeros_like(units)
    centre = zeros.index_add(0, segments, d) / units
    e = d - centre.index_select(0, segments)
    return zeros.index_add(0, segments, e * e) / units


def histograms(samples: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Counts [n_layers, bins] of each row of ``samples`` [n_layers, L] over its own
    [lo, hi]; NaN/Inf entries (including padding) are left out.

    Exactly ``np.histogram(row, bins, range=(lo, hi))`` of the float32 values when
    lo < hi: numpy's edges (its float64 linspace rounded to float32), half-open bins
    except the last, which includes ``hi``. lo == hi puts every value in bin 0 (numpy
    would widen the range by 0.5 each side). Counts are exact up to 2**24 per bin.

    Bucketed with tensor ops: ``torch.histc`` wants Python-scalar bounds (a sync) and
    ``searchsorted`` runs ~10x slower on CPU. Numpy's method: ``p = (x - lo) / w`` in
    float32 is within far less than half a bin of the value's true position, so the
    nearest edge ``j = round(p)`` is the value's bin or the one above, and the value is
    in bin ``j - (x < edge[j])``, subtracted in float32 (small integers, exact) before
    the one conversion to indices and the one scatter. (``floor(p)`` alone put -1e-8
    over [-1, 1] in the bin above 0: its ``x - lo`` rounds to 1 in float32.)
    Every finite sample lies in its row's [lo, hi] (lo/hi are the min/max of the values
    it was drawn from): ``j == bins`` (x at or past the last edge as computed) is added
    to the last bin, NaN/Inf go to the dump column ``bins + 2`` (-inf, below every
    edge, moves to ``bins + 1``, also dropped); the clamp keeps a bad caller's index in
    range. Cost over a floor: a round, a gather, a compare, a subtraction and a scatter
    over the samples, and ~10 kernels on [n_layers, bins].
    """
    n_layers = samples.shape[0]
    lo32, hi32 = lo.to(torch.float32)[:, None], hi.to(torch.float32)[:, None]
    width = (hi32 - lo32) / bins
    width = width + (width <= 0)  # lo == hi (or no finite values): width 1, all in bin 0
    dump = bins + 2
    position = torch.sub(samples, lo32).div_(width)
    # numpy's edges: k * step + lo in float64 (its linspace), rounded to the values' dtype
    lo64 = lo.to(torch.float64)[:, None]
    step = (hi.to(torch.float64)[:, None] - lo64) / bins
    edges = torch.mul(_edge_numbers(dump + 1, samples.device), step).add_(lo64)
    edges = edges.to(position.dtype)
    position.nan_to_num_(nan=dump, posinf=dump, neginf=dump).clamp_(0, dump).round_()
    below = torch.gather(edges, 1, position.to(torch.long))
    torch.lt(samples, below, out=below)  # 1.0 where x is below its nearest edge (NaN: 0)
    # the nearest edge's bin, or the one below (0 at least: a bad caller's value below lo)
    index = position.sub_(below).clamp_(min=0).to(torch.long)
    counts = torch.zeros(n_layers, bins + 3, dtype=torch.float32, device=samples.device)
    one = torch.ones((), device=samples.device).expand(samples.shape)  # no n-sized allocation
    counts.scatter_add_(1, index, one)
    counts[:, bins - 1] += counts[:, bins]
    return counts[:, :bins].contiguous()


@functools.cache
def _edge_numbers(n: int, device: torch.device) -> Tensor:
    """0., 1., ..., n - 1 in float64 on ``device`` (made once per bin count and device)."""
    return torch.arange(n, dtype=torch.float64, device=device)


def reshift(rows: Tensor, totals: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """s1 and s2 of raw rows ``rows`` [C, RAW_WIDTH] re-centred on ``center`` [C], so rows
    from several processes (each about its own mean) can simply be added.

    Exact algebra: with d = shift - center, sum(x - center) = s1 + n d and
    sum((x - center)^2) = s2 + 2 d s1 + n d^2, n being the call's value count ``totals``
    (every value, as the device sums ran over the cleaned values); s2 is the square of
    the row's ``ROOT_S2``. Run it in float64.
    """
    d = rows[:, SHIFT] - center
    s1 = rows[:, S1]
    return s1 + totals * d, rows[:, ROOT_S2].square() + 2.0 * d * s1 + totals * d * d


def norms(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """L2 norm of each tensor as one float32 vector on ``device``, via one
    ``_foreach_norm`` (fused on CUDA when every tensor shares a device and dtype, as a
    model's parameters and gradients usually do; else a kernel per tensor)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=device)
    norms = torch._foreach_norm(list(tensors))
    try:  # one device, the common case: no per-tensor device look-up
        return torch.stack(norms).to(device, torch.float32)
    except RuntimeError:  # several devices (model parallel): each moved first
        moved = [n.to(device=device, dtype=torch.float32, non_blocking=True) for n in norms]
        return torch.stack(moved)


# Keys of a probe-frame layer entry (wire.PROBE_STATS plus the histogram).
ENTRY_KEYS = (
    "mean", "std", "min", "max", "zero_frac", "nonfinite", "dead_ratio", "saturated_frac",
    "saturated_ratio", "grad_norm", "weight_norm", "update_ratio", "unit_spread", "hist",
)  # fmt: skip


@dataclass
class PendingStats:
    """One probe step's statistics: a single flat float32 tensor on the model's device,
    plus the host-side layout ``decode`` needs. NaN marks a value that does not apply.

    Layout of ``tensor`` (C calls recorded over L activation layers):
      C x 6   raw value rows (reduce.reduce_calls), C non-finite counts,
      C       value counts, only when ``reduced`` (summed over every rank of a process
              group, so the host cannot know them; else ``totals`` holds them),
      L x 4   dead_ratio, saturated_ratio, saturated value count, unit variance
              (``unit_spread_var``; decode takes its square root),
      L x bins histogram counts,
      G       norms of the gradients present (``grad_present`` marks which params),
      W       pre-step norms of each probed layer's parameters (``weight_slots``),
      W       norms of their (sampled) updates; the update section is NaN without an
              optimizer step.
    The arithmetic that turns these into statistics (moments, merging a module's calls,
    per-layer norms) runs in ``decode`` on the host, off the training thread's device.
    ``reduced``: the activation sections describe every rank's batch (see
    ``probes.Reducer``): rows centred on a shared shift with global lo/hi, counts and
    histogram bins summed; value counts above 2**24 are rounded by the float32 tensor.
    """

    tensor: Tensor
    order: list[str] = field(default_factory=list)
    act_layers: list[str] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)  # per act layer: calls this step
    totals: list[int] = field(default_factory=list)  # per call: values
    bins: int = DEFAULT_BINS
    grad_present: list[bool] = field(default_factory=list)  # per model parameter
    # per parameterised layer: (name, indices into model params, [(slot, scale)])
    param_layers: list[tuple[str, list[int], list[tuple[int, float]]]] = field(default_factory=list)
    weight_slots: int = 0
    reduced: bool = False
    units: list[int | None] = field(default_factory=list)  # per act layer (empty: unknown)
    # the optimizer's post-step hook measured this step's update: the update section is
    # the step's (NaN where an update was NaN), not the NaN of no step at all
    stepped: bool = False

    @property
    def size(self) -> int:
        calls, layers = len(self.totals), len(self.act_layers)
        params = sum(self.grad_present) + 2 * self.weight_slots if self.param_layers else 0
        per_call = RAW_WIDTH + (2 if self.reduced else 1)
        return calls * per_call + layers * (UNIT_WIDTH + self.bins) + params

    def decode(self, host: Any) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
        """``host``: the values of ``tensor`` after the one device-to-host copy (a CPU
        tensor, numpy array or sequence of floats). Returns (probe-frame layer entries,
        run-level scalars). Non-finite and not-applicable values become None.

        Runs on the link thread, where its Python competes with the training thread for
        the GIL: a CPU tensor's histogram counts become ints in one conversion."""
        values = host.tolist() if hasattr(host, "tolist") else list(host)
        if len(values) != self.size:
            raise ValueError(f"expected {self.size} values for this probe step, got {len(values)}")
        entries: dict[str, dict[str, Any]] = {}
        width, n_calls = RAW_WIDTH, len(self.totals)
        nonfinite_at = n_calls * width
        totals = self.totals
        if self.reduced:
            counted = values[nonfinite_at + n_calls : nonfinite_at + 2 * n_calls]
            totals = [int(round(v)) for v in counted]
        units_at = nonfinite_at + n_calls * (2 if self.reduced else 1)
        hist_at = units_at + UNIT_WIDTH * len(self.act_layers)
        bins = self.bins
        n_act = len(self.act_layers)
        hist_rows: list[list[int]] | None = None
        if isinstance(host, Tensor) and n_act:
            # exact integers in float32: one conversion instead of a round() per bin
            block = host[hist_at : hist_at + n_act * bins].round().to(torch.int64)
            hist_rows = block.view(n_act, bins).tolist()
        call = 0
        for i, name in enumerate(self.act_layers):
            summary = Summary()
            for _ in range(self.calls[i]):
                summary.add(
                    values[call * width : (call + 1) * width],
                    values[nonfinite_at + call],
                    totals[call],
                )
                call += 1
            entry: dict[str, Any] = {"name": name, **summary.values()}
            at = units_at + UNIT_WIDTH * i
            dead, saturated_ratio, saturated, spread_var = values[at : at + UNIT_WIDTH]
            entry["dead_ratio"] = _finite(dead)
            units = self.units[i] if self.units else None
            if units and summary.total < MIN_ACTIVITY_VALUES * units:
                entry["dead_ratio"] = None  # too few values per unit to tell (see the constant)
            ratio = _finite(saturated_ratio)
            entry["saturated_frac"] = (
                _finite(saturated / summary.total) if ratio is not None else None
            )
            entry["saturated_ratio"] = ratio
            entry["grad_norm"] = entry["weight_norm"] = entry["update_ratio"] = None
            variance = _finite(spread_var)
            entry["unit_spread"] = math.sqrt(max(variance, 0.0)) if variance is not None else None
            if entry["min"] is None:
                entry["hist"] = None
            else:
                if hist_rows is not None:
                    counts = hist_rows[i]
                else:  # exact integers in float32; round() of a float is an int
                    counts = list(map(round, values[hist_at + i * bins : hist_at + (i + 1) * bins]))
                entry["hist"] = {"lo": entry["min"], "hi": entry["max"], "counts": counts}
            entries[name] = entry  # every key, in ENTRY_KEYS order
        scalars: dict[str, float | None] = {"grad_norm": None}
        if self.param_layers:
            at = hist_at + len(self.act_layers) * self.bins
            present = sum(self.grad_present)
            grads, at = values[at : at + present], at + present
            weights, at = values[at : at + self.weight_slots], at + self.weight_slots
            updates = values[at : at + self.weight_slots]
            position, k = {}, 0
            for index, has in enumerate(self.grad_present):
                if has:
                    position[index] = k
                    k += 1
            if grads:
                scalars["grad_norm"] = _finite(math.sqrt(sum(g * g for g in grads)))
            for name, indices, slots in self.param_layers:
                mine = [grads[position[i]] for i in indices if i in position]
                weight = math.sqrt(sum(weights[slot] ** 2 for slot, _ in slots))
                update = math.sqrt(sum(scale * updates[slot] ** 2 for slot, scale in slots))
                entry = entries.get(name) or entries.setdefault(name, _no_activations(name))
                entry["grad_norm"] = _finite(math.sqrt(sum(g * g for g in mine))) if mine else None
                entry["weight_norm"] = _finite(weight)
                entry["update_ratio"] = _finite(update / weight) if weight > 0 else None
        layers = [entries[name] for name in self.order if name in entries]
        return layers, scalars


def _no_activations(name: str) -> dict[str, Any]:
    """The entry of a layer with parameters but no recorded output this step."""
    return {"name": name, **dict.fromkeys(ENTRY_KEYS)}


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if -math.inf < value < math.inf else None  # NaN fails both comparisons
