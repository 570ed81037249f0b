"""probes — per-layer hooks and on-device accumulation of the DESIGN §3 statistics.

Owns: which modules are layers (types, name filters), the forward hooks on them,
the optimizer step hooks that read gradients, weights and updates, the per-step
accumulators, and the layout of the one flat tensor a probe step produces
(``PendingStats``) together with its decoding into wire probe-frame entries.

Never: reads a tensor value on the host while hooks run or in ``collect()`` (no
``.item()``/``.cpu()``/``.tolist()``/``float(t)``/``bool(t)``; the only host read is
the caller's single copy of ``PendingStats.tensor``), tags user modules with
attributes, uses global hooks, touches the user's RNG, or does work on a step
that is not armed (a disarmed hook is one flag check). The arithmetic lives in
``stats``; this module wires it to modules and optimizers.

Choices worth knowing:
* A module called several times in one step (shared module, RNN cell) is one
  layer: moments, counts and min/max are merged exactly across calls; calls with
  the same unit count are the same units (merged by index), calls of another
  width add their units (a shared nn.ReLU used at two widths).
  The histogram re-bins the union of every call's sampled values over the merged
  [min, max], so nothing is clipped to the first call's range.
* ``sample_values`` caps the values histogrammed per layer per call (a fixed
  random subset drawn with the probes' own generator); min/max/moments/zero and
  non-finite counts and the dead/saturated unit counts always use every value.
* ``update_ratio`` needs the pre-step weights. Copying every weight would add a
  full model's worth of memory, so parameters above ``UPDATE_SAMPLE`` entries
  keep a fixed random subset of that many entries and ||Δw|| is estimated from it
  (unbiased for ||Δw||², relative error about 1/sqrt(UPDATE_SAMPLE)); smaller
  parameters are copied whole and the ratio is exact. ``weight_norm`` is the
  exact norm of the weights that produced this step's activations and gradients.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from layerscope.trainer import stats
from layerscope.trainer.stats import (
    DEAD_ACTIVITY_MAX,
    SATURATED_UNIT_MAJORITY,
    SATURATION_LEVEL,
    Rule,
)
from layerscope.trainer.wire import MAX_BINS
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

__all__ = [
    "DEAD_ACTIVITY_MAX",
    "DEFAULT_BINS",
    "DEFAULT_SAMPLE_VALUES",
    "DEFAULT_TYPES",
    "SATURATED_UNIT_MAJORITY",
    "SATURATION_LEVEL",
    "UPDATE_SAMPLE",
    "LayerSpec",
    "PendingStats",
    "Probes",
]

DEFAULT_BINS = 64
DEFAULT_SAMPLE_VALUES = 8192  # histogram values per layer per call; 128 per bin on average
UPDATE_SAMPLE = 16384  # pre-step entries kept per parameter for update_ratio

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softsign,
)  # fmt: skip
WEIGHT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip
DEFAULT_TYPES = ACTIVATION_TYPES + WEIGHT_TYPES
_CONV1D_LIKE = (nn.Conv1d, nn.ConvTranspose1d)
# Modules that keep a Conv1d's (N, C, L) layout, so what follows them in a Sequential is channel-first.
_KEEPS_CHANNELS = ACTIVATION_TYPES + (
    nn.BatchNorm1d, nn.InstanceNorm1d, nn.Dropout, nn.Dropout1d, nn.AlphaDropout,
    nn.MaxPool1d, nn.AvgPool1d, nn.Identity,
)  # fmt: skip

# Columns of one layer's block in the activation section of PendingStats.tensor.
ACT_COLUMNS = (
    "mean", "std", "min", "max", "zero_frac", "nonfinite", "saturated_frac",
    "dead_ratio", "saturated_ratio",
)  # fmt: skip
PARAM_COLUMNS = ("grad_norm", "weight_norm", "update_ratio")


@dataclass
class LayerSpec:
    name: str
    kind: str  # module class name, e.g. "ReLU", "Linear"
    units: int | None


@dataclass
class PendingStats:
    """One probe step's statistics: a single flat float32 tensor on the model's device.

    Layout: activation section (``len(act_layers)`` blocks of ``len(ACT_COLUMNS) + bins``),
    parameter section (``len(param_layers)`` blocks of ``len(PARAM_COLUMNS)``), then the
    global gradient norm. NaN marks a statistic that does not apply.
    """

    tensor: Tensor
    act_layers: list[str] = field(default_factory=list)
    param_layers: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    bins: int = DEFAULT_BINS

    @property
    def size(self) -> int:
        act = len(self.act_layers) * (len(ACT_COLUMNS) + self.bins)
        return act + len(self.param_layers) * len(PARAM_COLUMNS) + 1

    def decode(self, host: Any) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
        """``host``: the values of ``tensor`` after the one device-to-host copy (a CPU
        tensor, numpy array or sequence of floats). Returns (probe-frame layer entries,
        run-level scalars). Non-finite and not-applicable values become None."""
        values = host.tolist() if hasattr(host, "tolist") else list(host)
        if len(values) != self.size:
            raise ValueError(f"expected {self.size} values for this probe step, got {len(values)}")
        entries: dict[str, dict[str, Any]] = {}
        width = len(ACT_COLUMNS) + self.bins
        for i, name in enumerate(self.act_layers):
            block = values[i * width : (i + 1) * width]
            entry: dict[str, Any] = {
                k: _finite(v) for k, v in zip(ACT_COLUMNS, block, strict=False)
            }
            lo, hi = entry["min"], entry["max"]
            counts = [int(round(c)) for c in block[len(ACT_COLUMNS) :]]
            entry["hist"] = (
                None if lo is None or hi is None else {"lo": lo, "hi": hi, "counts": counts}
            )
            entries[name] = entry
        base = len(self.act_layers) * width
        for i, name in enumerate(self.param_layers):
            block = values[base + i * 3 : base + i * 3 + 3]
            entry = entries.setdefault(name, {})
            entry.update({k: _finite(v) for k, v in zip(PARAM_COLUMNS, block, strict=True)})
        layers = []
        for name in self.order:
            if name in entries:
                row: dict[str, Any] = {"name": name}
                row.update({k: entries[name].get(k) for k in ACT_COLUMNS[:6]})
                for k in ("dead_ratio", "saturated_frac", "saturated_ratio", *PARAM_COLUMNS):
                    row[k] = entries[name].get(k)
                row["hist"] = entries[name].get("hist")
                layers.append(row)
        return layers, {"grad_norm": _finite(values[-1])}


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(eq=False)
class _Layer:
    spec: LayerSpec
    index: int
    rule: Rule
    channel_first: bool
    params: list[nn.Parameter]
    rows: list[Tensor] = field(default_factory=list)
    # (per-unit fraction, values per unit) for each call this step
    live: list[tuple[Tensor, int]] = field(default_factory=list)
    saturated: list[tuple[Tensor, int]] = field(default_factory=list)
    samples: list[Tensor] = field(default_factory=list)
    sample_index: tuple[int, Tensor] | None = None  # (numel it was drawn for, indices)

    def reset(self) -> None:
        self.rows, self.live, self.saturated, self.samples = [], [], [], []


def _matcher(pattern: str | Sequence[str] | None, what: str) -> Callable[[str], bool] | None:
    if pattern is None:
        return None
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"{what}: {pattern!r} is not a valid regular expression: {exc}"
            ) from None
        return lambda name: regex.search(name) is not None
    wanted = set(pattern)
    return wanted.__contains__


class Probes:
    """Forward hooks on the chosen layers plus optimizer step hooks; see module docstring."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        bins: int = DEFAULT_BINS,
        types: tuple[type, ...] | None = None,
        names: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        activations: dict[str, str] | None = None,
        sample_values: int | None = DEFAULT_SAMPLE_VALUES,
    ) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
            raise ValueError(f"bins must be an integer in [1, {MAX_BINS}], got {bins!r}")
        if sample_values is not None and (
            isinstance(sample_values, bool)
            or not isinstance(sample_values, int)
            or sample_values < 1
        ):
            raise ValueError(
                f"sample_values must be a positive integer or None, got {sample_values!r}"
            )
        self.bins = bins
        self.sample_values = sample_values
        self.armed = False
        self._handles: list[RemovableHandle] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._cache: dict[Any, Any] = {}  # fixed by the model's structure
        self._shape_cache: dict[Any, Tensor] = {}  # keyed by this step's shapes
        self._channel_first_out: list[weakref.ref[Tensor]] = []
        self._param_result: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._old_weights: Tensor | None = None
        self._all_params = list(model.parameters())  # unique: parameters() de-duplicates ties
        first = self._all_params[0] if self._all_params else None
        self._device = first.device if first is not None else torch.device("cpu")

        self.layers: list[LayerSpec] = []
        chosen = self._select(model, types or DEFAULT_TYPES, names, exclude, activations or {})
        self._layers = [layer for layer, _ in chosen]
        self.layers = [layer.spec for layer in self._layers]
        self._param_layers = [layer for layer in self._layers if layer.params]
        for layer, module in chosen:
            self._handles.append(module.register_forward_hook(self._hook_for(layer)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._has_optimizer = optimizer is not None

    # ---- construction ----

    def _select(
        self,
        model: nn.Module,
        types: tuple[type, ...],
        names: str | Sequence[str] | None,
        exclude: str | Sequence[str] | None,
        activations: dict[str, str],
    ) -> list[tuple[_Layer, nn.Module]]:
        include, skip = _matcher(names, "names"), _matcher(exclude, "exclude")
        all_names = {name or "model" for name, _ in model.named_modules()}
        for label, given in (("names", names), ("exclude", exclude)):
            if given is not None and not isinstance(given, str):
                unknown = sorted(set(given) - all_names)
                if unknown:
                    raise ValueError(f"{label}: no module named {unknown} in the model")
        channel_first = self._sequential_channel_first(model)
        chosen: list[tuple[_Layer, nn.Module]] = []
        for name, module in model.named_modules():
            name = name or "model"
            if not isinstance(module, types):
                continue
            if (include and not include(name)) or (skip and skip(name)):
                continue
            is_activation = isinstance(module, ACTIVATION_TYPES)
            rule = stats.module_rule(module, default=stats.NO_RULE)
            if not is_activation and isinstance(module, WEIGHT_TYPES):
                # DESIGN §3: the units a following (functional) ReLU would leave dead
                rule = stats.FUNCTION_RULES["relu"]
            if name in activations:
                fn = activations[name]
                if is_activation:
                    raise ValueError(
                        f"activations: {name!r} is itself an activation module; name the "
                        "Linear/Conv layer whose output feeds a functional activation"
                    )
                if fn not in stats.FUNCTION_RULES:
                    raise ValueError(
                        f"activations: unknown function {fn!r} for {name!r}; "
                        f"expected one of {sorted(stats.FUNCTION_RULES)}"
                    )
                rule = stats.FUNCTION_RULES[fn]
            conv1d_like = isinstance(module, _CONV1D_LIKE)
            spec = LayerSpec(name=name, kind=type(module).__name__, units=_static_units(module))
            layer = _Layer(
                spec=spec,
                index=len(chosen),
                rule=rule,
                channel_first=conv1d_like or id(module) in channel_first,
                params=list(module.parameters()),
            )
            chosen.append((layer, module))
        unknown = sorted(set(activations) - {layer.spec.name for layer, _ in chosen})
        if unknown:
            raise ValueError(f"activations: {unknown} are not probed layers of this model")
        return chosen

    @staticmethod
    def _sequential_channel_first(model: nn.Module) -> set[int]:
        """ids of modules that follow a Conv1d-like module in an nn.Sequential with only
        channel-preserving modules in between (their 3-D output is (N, C, L))."""
        found: set[int] = set()
        for container in model.modules():
            if not isinstance(container, nn.Sequential):
                continue
            after_conv1d = False
            for child in container:
                if isinstance(child, _CONV1D_LIKE):
                    after_conv1d = True
                elif after_conv1d and isinstance(child, _KEEPS_CHANNELS):
                    found.add(id(child))
                else:
                    after_conv1d = False
        return found

    # ---- public API ----

    def layer_table(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "kind": s.kind, "units": s.units} for s in self.layers]

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def close(self) -> None:
        self.armed = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers:
            layer.reset()
        self._old_weights = None
        self._param_result = None

    # ---- forward hooks ----

    def _hook_for(self, layer: _Layer) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.armed:
                self._record(layer, args, output)

        return hook

    def _record(self, layer: _Layer, args: Any, output: Any) -> None:
        y = output[0] if isinstance(output, tuple | list) else output
        if isinstance(y, PackedSequence):
            y = y.data
        if not isinstance(y, Tensor) or not y.is_floating_point() or y.numel() == 0:
            return
        channel_first = layer.channel_first
        if y.dim() == 3 and not channel_first and self._channel_first_out and args:
            x = args[0]
            channel_first = any(ref() is x for ref in self._channel_first_out)
        if y.dim() == 3 and channel_first:
            # Identity, not shape: an activation applied straight to this output (even
            # in place, which returns the same tensor) inherits the channel axis.
            self._channel_first_out.append(weakref.ref(y))
        rule = layer.rule
        with torch.no_grad():
            yf = y.float()  # no copy for float32; bf16/fp16 are widened before any arithmetic
            axis = stats.unit_axis(yf.dim(), channel_first)
            if axis is not None and layer.spec.units is None:
                layer.spec.units = yf.shape[axis]
            per_unit = yf.numel() // yf.shape[axis] if axis is not None else 1
            if axis is not None and rule.live_above is not None:
                layer.live.append((stats.unit_fraction(yf > rule.live_above, axis), per_unit))
            if rule.saturates:
                mask = stats.saturated_mask(yf, rule)
                saturated = mask.sum(dtype=torch.float64)
                if axis is not None:
                    layer.saturated.append((stats.unit_fraction(mask, axis), per_unit))
            else:
                saturated = self._zero(yf.device)
            layer.rows.append(stats.value_row(yf, saturated))
            layer.samples.append(self._sample(layer, yf))

    def _zero(self, device: torch.device) -> Tensor:
        key = ("zero", device)
        if key not in self._cache:
            self._cache[key] = torch.zeros((), dtype=torch.float64, device=device)
        zero: Tensor = self._cache[key]
        return zero

    def _generator(self, device: torch.device) -> torch.Generator:
        # Our own generator: sampling must not advance the user's RNG streams.
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(0x1A7E5)
        return self._generators[device]

    def _sample(self, layer: _Layer, yf: Tensor) -> Tensor:
        flat = yf.reshape(-1)
        cap = self.sample_values
        if cap is None or flat.numel() <= cap:
            return flat.clone()  # a copy: a later in-place op must not change what we saw
        drawn = layer.sample_index
        if drawn is None or drawn[0] != flat.numel() or drawn[1].device != flat.device:
            index = torch.randint(
                flat.numel(), (cap,), generator=self._generator(flat.device), device=flat.device
            )
            drawn = layer.sample_index = (flat.numel(), index)
        return flat[drawn[1]]

    # ---- gradients, weights, updates ----

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.armed:
            return
        self._param_result = self._read_params()
        self._old_weights = self._gather_weights()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.armed or self._old_weights is None or self._param_result is None:
            return
        with torch.no_grad():
            delta = self._gather_weights() - self._old_weights
            lengths, scales, owners = self._weight_plan()
            parts = torch._foreach_norm(list(delta.split(lengths)))
            part_sq = torch.stack(parts).square() * scales
            n = len(self._param_layers)
            update_sq = torch.zeros(n, dtype=torch.float32, device=self._device).index_add_(
                0, owners, part_sq
            )
            grad, weight, _, total = self._param_result
            self._param_result = (grad, weight, update_sq.sqrt() / weight, total)
        self._old_weights = None

    def _read_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(grad_norm, weight_norm, update_ratio=NaN) per parameterised layer, global grad norm."""
        with torch.no_grad():
            present = tuple(p.grad is not None for p in self._all_params)
            grads = [p.grad for p in self._all_params if p.grad is not None]
            grad_norms = stats.norms(grads, self._device)
            grad_sq = grad_norms.square()
            total = grad_sq.sum().sqrt().reshape(1)
            if not grads:
                total = torch.full((1,), math.nan, dtype=torch.float32, device=self._device)
            pair_param, pair_layer, has_grad = self._grad_plan(present)
            n = len(self._param_layers)
            layer_grad = torch.zeros(n, dtype=torch.float32, device=self._device)
            if grads and pair_param.numel():
                layer_grad.index_add_(0, pair_layer, grad_sq[pair_param])
            layer_grad = layer_grad.sqrt() * has_grad
            weights = [p for layer in self._param_layers for p in layer.params]
            weight_sq = stats.norms([p.detach() for p in weights], self._device).square()
            _, _, owners = self._weight_plan()
            layer_weight = torch.zeros(n, dtype=torch.float32, device=self._device)
            layer_weight = layer_weight.index_add_(0, owners, weight_sq).sqrt()
            nan = torch.full((n,), math.nan, dtype=torch.float32, device=self._device)
            return layer_grad, layer_weight, nan, total

    def _grad_plan(self, present: tuple[bool, ...]) -> tuple[Tensor, Tensor, Tensor]:
        key = ("grads", present)
        if key not in self._cache:
            position: dict[int, int] = {}
            for p, has in zip(self._all_params, present, strict=True):
                if has:
                    position[id(p)] = len(position)
            pairs = [
                (position[id(p)], li)
                for li, layer in enumerate(self._param_layers)
                for p in layer.params
                if id(p) in position
            ]
            layers_with = {li for _, li in pairs}
            dev = self._device
            self._cache[key] = (
                stats.device_vector([a for a, _ in pairs], dev, torch.long),
                stats.device_vector([b for _, b in pairs], dev, torch.long),
                stats.device_vector(
                    [
                        1.0 if li in layers_with else math.nan
                        for li in range(len(self._param_layers))
                    ],
                    dev,
                    torch.float32,
                ),
            )
        plan: tuple[Tensor, Tensor, Tensor] = self._cache[key]
        return plan

    def _weight_plan(self) -> tuple[list[int], Tensor, Tensor]:
        """Per parameter (in layer order): entries kept, the factor that scales a sampled
        squared norm to the whole parameter, and the owning layer's index."""
        key = "weights"
        if key not in self._cache:
            lengths, scales, owners = [], [], []
            for li, layer in enumerate(self._param_layers):
                for p in layer.params:
                    kept = min(p.numel(), UPDATE_SAMPLE)
                    lengths.append(kept)
                    scales.append(p.numel() / kept)
                    owners.append(li)
            self._cache[key] = (
                lengths,
                stats.device_vector(scales, self._device, torch.float32),
                stats.device_vector(owners, self._device, torch.long),
            )
        plan: tuple[list[int], Tensor, Tensor] = self._cache[key]
        return plan

    def _gather_weights(self) -> Tensor:
        """The kept entries of every probed layer's parameters, as one float32 copy."""
        parts = []
        with torch.no_grad():
            for layer in self._param_layers:
                for p in layer.params:
                    flat = p.detach().reshape(-1)
                    if flat.numel() > UPDATE_SAMPLE:
                        key = ("update_index", id(p))
                        if key not in self._cache:
                            self._cache[key] = torch.randint(
                                flat.numel(), (UPDATE_SAMPLE,),
                                generator=self._generator(flat.device), device=flat.device,
                            )  # fmt: skip
                        flat = flat[self._cache[key]]
                    parts.append(flat.to(self._device, non_blocking=True))
            if not parts:
                return torch.zeros(0, dtype=torch.float32, device=self._device)
            return torch.cat(parts).to(torch.float32)

    # ---- collect ----

    def collect(self) -> PendingStats | None:
        """Build the flat statistics tensor of this probe step (no host reads), reset the
        accumulators and disarm. None when no armed forward pass was recorded."""
        self.armed = False
        self._channel_first_out.clear()
        act = [layer for layer in self._layers if layer.rows]
        params = self._param_result
        self._param_result, self._old_weights = None, None
        if not act and params is None:
            return None
        if params is None and self._param_layers:
            params = self._read_params()  # no optimizer hook fired: grads as they are now
        with torch.no_grad():
            sections: list[Tensor] = []
            if act:
                sections.append(self._activation_block(act).reshape(-1))
            if params is not None:
                grad, weight, update, total = params
                sections.append(torch.stack([grad, weight, update], dim=1).reshape(-1))
            else:
                total = torch.full((1,), math.nan, device=sections[0].device)
            sections.append(total)
            flat = torch.cat([s.to(torch.float32) for s in sections])
        pending = PendingStats(
            tensor=flat,
            act_layers=[layer.spec.name for layer in act],
            param_layers=[layer.spec.name for layer in self._param_layers]
            if params is not None
            else [],
            order=[layer.spec.name for layer in self._layers],
            bins=self.bins,
        )
        for layer in act:
            layer.reset()
        return pending

    def _activation_block(self, act: list[_Layer]) -> Tensor:
        device = act[0].rows[0].device
        rows = stats.canonical(torch.stack([row for layer in act for row in layer.rows]))
        if len(rows) != len(act):  # a module ran more than once: merge its calls exactly
            merged, start = [], 0
            for layer in act:
                row = rows[start]
                for j in range(start + 1, start + len(layer.rows)):
                    row = stats.combine(row, rows[j])
                merged.append(row)
                start += len(layer.rows)
            rows = torch.stack(merged)
        saturates = self._vector(
            ("saturates", tuple(layer.rule.saturates for layer in act)),
            [1.0 if layer.rule.saturates else math.nan for layer in act],
            device,
        )
        values = stats.finish_values(rows, saturates)
        dead = self._unit_ratio([layer.live for layer in act], device, dead=True)
        saturated = self._unit_ratio([layer.saturated for layer in act], device, dead=False)
        samples = [
            torch.cat(layer.samples) if len(layer.samples) > 1 else layer.samples[0]
            for layer in act
        ]
        lengths = tuple(int(s.shape[0]) for s in samples)
        segments = self._segments(("hist", lengths), lengths, device)
        hist = stats.histograms(
            torch.cat(samples), segments, rows[:, stats.LO], rows[:, stats.HI], self.bins
        )
        return torch.cat([values.to(torch.float32), dead[:, None], saturated[:, None], hist], dim=1)

    def _unit_ratio(
        self, records: list[list[tuple[Tensor, int]]], device: torch.device, *, dead: bool
    ) -> Tensor:
        fractions = [_merge_units(calls) for calls in records]
        lengths = tuple(0 if f is None else int(f.shape[0]) for f in fractions)
        if not any(lengths):
            return torch.full((len(records),), math.nan, dtype=torch.float32, device=device)
        segments = self._segments(("units", lengths), lengths, device)
        units = self._vector(("unit_counts", lengths), [float(n) for n in lengths], device)
        flat = torch.cat([f for f in fractions if f is not None])
        return stats.unit_ratio(flat, segments, units, dead=dead).to(torch.float32)

    def _segments(self, key: Any, lengths: Sequence[int], device: torch.device) -> Tensor:
        key = (key, device)
        if key not in self._shape_cache:
            if len(self._shape_cache) > 64:  # shapes keep changing: don't grow without bound
                self._shape_cache.clear()
            self._shape_cache[key] = stats.segment_ids(lengths, device)
        segments: Tensor = self._shape_cache[key]
        return segments

    def _vector(self, key: Any, values: list[float], device: torch.device) -> Tensor:
        key = (key, device)
        if key not in self._shape_cache:
            if len(self._shape_cache) > 64:
                self._shape_cache.clear()
            self._shape_cache[key] = stats.device_vector(values, device)
        vector: Tensor = self._shape_cache[key]
        return vector


def _merge_units(calls: list[tuple[Tensor, int]]) -> Tensor | None:
    """One layer's per-unit fractions over all its calls this step. Calls with the same
    unit count are the same units (a shared Linear, an RNN cell): averaged by index,
    weighted by values per unit. Calls of another width are other units: concatenated."""
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0][0]
    groups: dict[int, list[tuple[Tensor, int]]] = {}
    for fraction, per_unit in calls:
        groups.setdefault(int(fraction.shape[0]), []).append((fraction, per_unit))
    merged = []
    for same in groups.values():
        total = sum(n for _, n in same)
        acc = same[0][0] * (same[0][1] / total)
        for fraction, per_unit in same[1:]:
            acc = acc + fraction * (per_unit / total)
        merged.append(acc)
    return merged[0] if len(merged) == 1 else torch.cat(merged)


def _static_units(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.RNNBase):
        width = module.proj_size or module.hidden_size
        return width * (2 if module.bidirectional else 1)
    return None
