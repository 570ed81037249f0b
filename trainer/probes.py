"""probes — per-layer hooks and on-device accumulation of the DESIGN §3 statistics.

Owns: which modules are layers (types, name filters), the forward hooks on them,
the optimizer step hooks that read gradients, weights and updates, the per-step
accumulators, and ``collect()``, which turns them into the one flat tensor of a
probe step (``PendingStats``, defined in ``stats`` with its decoding).

Never: reads a tensor value on the host while hooks run or in ``collect()`` (no
``.item()``/``.cpu()``/``.tolist()``/``float(t)``/``bool(t)``; the only host read is
the caller's single copy of ``PendingStats.tensor``), tags user modules with
attributes, uses global hooks, touches the user's RNG, or does work on a step
that is not armed (forward hooks exist only while armed; the optimizer hooks are
one flag check). The arithmetic lives in
``stats``; this module wires it to modules and optimizers.

Cost: each probed call runs ~16 small kernels (reductions of its output); collect
adds ~30 for all layers together; the parameter hooks ~10 fused ones. On a GPU
these are launch-bound microseconds; see benchmarks/overhead.py for CPU numbers.

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
* An output above ``CHUNK_VALUES`` values is reduced in slices along dim 0 (merged
  exactly, like repeated calls), so the hook's temporaries stay bounded; otherwise
  they are about four float32 copies of the output, freed before the next layer.
* Under a process group (``reducer`` set by ``distributed``) the activation statistics
  describe the global batch: collect() runs one MAX all_reduce for every call's global
  min/max (the shared histogram range, before bucketing), then one float64 SUM of the
  moments re-centred on a shared shift, the value/zero/non-finite counts, the bins
  and the per-unit counts and sums. Gradient, weight and update norms are rank 0's: under DDP
  they are the same on every rank.
* ``update_ratio`` needs the pre-step weights. Copying every weight would add a
  full model's worth of memory, so a parameter above ``UPDATE_SAMPLE`` entries
  keeps every k-th entry (k = ceil(numel / UPDATE_SAMPLE)) from a fixed random start,
  and ||Δw|| is estimated from them (k times their ||Δw||²: unbiased over the start,
  relative error about 1/sqrt(UPDATE_SAMPLE) unless the update repeats with period k;
  strided views gathered by one ``cat``, where an index per parameter costs a
  kernel each); smaller
  parameters are copied whole and the ratio is exact. ``weight_norm`` is the
  exact norm of the weights that produced this step's activations and gradients.
"""

from __future__ import annotations

import math
import random
import re
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from layerscope.trainer import reduce, stats
from layerscope.trainer.stats import (
    DEAD_ACTIVITY_MAX,
    DEFAULT_BINS,
    SATURATED_UNIT_MAJORITY,
    SATURATION_LEVEL,
    UPDATE_SAMPLE,
    PendingStats,
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
    "Reducer",
]

DEFAULT_SAMPLE_VALUES = 2048  # histogram values per layer per call; 32 per bin on average
# Outputs above this many values are reduced in slices, so the hook's float32
# temporaries (about four slice-sized tensors) stay under 64 MiB whatever the layer.
CHUNK_VALUES = 1 << 22
# Outputs up to STAGE_CALL_VALUES values are copied aside and reduced at collect(), stacked
# with the other calls of their shape, while the copies of one step total at most
# STAGE_VALUES (4 MiB of float32); larger ones, and any beyond that, are reduced in the hook.
STAGE_CALL_VALUES = 1 << 16
STAGE_VALUES = 1 << 20

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


class Reducer(Protocol):
    """A process group the probe statistics are reduced over (``distributed``), so they
    describe the global batch. Both methods are collectives: every rank calls them in the
    same order with tensors of the same shape, and they return without a host read."""

    def agreed(self) -> bool:
        """True when every rank recorded the same layout this step (``Probes.layout_key``)."""
        ...

    def all_max(self, tensor: Tensor) -> Tensor: ...

    def all_sum(self, tensor: Tensor) -> Tensor: ...


@dataclass
class _UnitInputs:
    counts: Tensor  # per unit: live (or inside-the-bounds) values, or the sum of its values
    values_per_unit: Tensor
    segments: Tensor  # per unit: its layer
    unit_count: Tensor  # per layer: units
    firsts: Tensor  # per layer: index of its first unit (0 for a layer without units)


@dataclass
class LayerSpec:
    name: str
    kind: str  # module class name, e.g. "ReLU", "Linear"
    units: int | None


@dataclass(eq=False)
class _Layer:
    spec: LayerSpec
    index: int
    rule: Rule
    channel_first: bool
    params: list[nn.Parameter]
    # One entry per call this step: raw value row, minus the non-finite count (see
    # stats.CallStats), value count, sample, and per-unit
    # (count, values per unit) of live values / values inside the saturation bounds,
    # and (sum of values, values per unit) for unit_spread.
    rows: list[Tensor] = field(default_factory=list)
    nonfinite: list[Tensor] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    samples: list[Tensor] = field(default_factory=list)
    live: list[tuple[Tensor, int]] = field(default_factory=list)
    inside: list[tuple[Tensor, int]] = field(default_factory=list)  # negated, see CallStats
    sums: list[tuple[Tensor, int]] = field(default_factory=list)
    sample_index: dict[int, Tensor] = field(default_factory=dict)  # numel -> indices

    def reset(self) -> None:
        self.rows, self.nonfinite, self.totals = [], [], []
        self.samples, self.live, self.inside, self.sums = [], [], [], []


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
        self._armed = False
        self._closed = False
        # Set by ``distributed`` under a process group: collect() reduces across ranks.
        self.reducer: Reducer | None = None
        self._handles: list[RemovableHandle] = []
        self._forward_handles: list[RemovableHandle] = []
        self._generators: dict[torch.device, torch.Generator] = {}
        self._cache: dict[Any, Any] = {}  # fixed by the model's structure
        self._shape_cache: dict[Any, Any] = {}  # keyed by this step's shapes
        # Small outputs of this step, copied aside until collect() (see _reduce)
        self._staged: dict[tuple[Any, ...], list[tuple[_Layer, Tensor]]] = {}
        self._staged_values = 0
        self._channel_first_out: list[weakref.ref[Tensor]] = []
        self._param_result: tuple[list[bool], Tensor, Tensor] | None = None
        self._old_weights: Tensor | None = None
        self._all_params = list(model.parameters())  # unique: parameters() de-duplicates ties
        first = self._all_params[0] if self._all_params else None
        self._device = first.device if first is not None else torch.device("cpu")

        self.layers: list[LayerSpec] = []
        chosen = self._select(model, types or DEFAULT_TYPES, names, exclude, activations or {})
        self._layers = [layer for layer, _ in chosen]
        self.layers = [layer.spec for layer in self._layers]
        self._param_layers = [layer for layer in self._layers if layer.params]
        # update_ratio's sample of each parameter: every stride-th entry from a fixed
        # random start (strided views, gathered by one cat; see the module docstring)
        starts = random.Random(0x1A7E5)
        self._weight_samples: list[tuple[nn.Parameter, int, int]] = []
        for layer in self._param_layers:
            for p in layer.params:
                stride = max(1, -(-p.numel() // UPDATE_SAMPLE))
                self._weight_samples.append((p, starts.randrange(stride), stride))
        self._weight_lengths = [len(range(s, p.numel(), k)) for p, s, k in self._weight_samples]
        position = {id(p): i for i, p in enumerate(self._all_params)}
        self._param_layout: list[tuple[str, list[int], list[tuple[int, float]]]] = []
        slot = 0
        for layer in self._param_layers:
            slots = []
            for _ in layer.params:
                slots.append((slot, float(self._weight_samples[slot][2])))
                slot += 1
            indices = [position[id(p)] for p in layer.params]
            self._param_layout.append((layer.spec.name, indices, slots))
        self._hooks = [(module, self._hook_for(layer)) for layer, module in chosen]
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

    @property
    def armed(self) -> bool:
        """True from ``arm()`` until ``collect()``/``disarm()``: the next forward is recorded."""
        return self._armed

    def arm(self) -> None:
        """Record the next forward pass. The forward hooks exist only while armed: a
        module with no hooks takes PyTorch's fast call path, so a step that is not a
        probe step costs nothing at all (a hook, even an idle one, costs microseconds
        per module per step)."""
        if self._armed or self._closed:
            return
        self._armed = True
        self._forward_handles = [module.register_forward_hook(hook) for module, hook in self._hooks]

    def disarm(self) -> None:
        self._armed = False
        for handle in self._forward_handles:
            handle.remove()
        self._forward_handles = []

    def close(self) -> None:
        self.disarm()
        self._closed = True
        self._staged, self._staged_values = {}, 0
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
            if self._armed:
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
        axis = stats.unit_axis(y.dim(), channel_first)
        if axis is not None and layer.spec.units is None:
            layer.spec.units = y.shape[axis]
        parts = [y]
        if y.numel() > CHUNK_VALUES and y.dim() >= 2 and axis != 0:
            # Bounded temporaries: a large output is reduced in slices along dim 0 (never
            # the unit axis); the slices merge exactly like a module's repeated calls.
            parts = list(y.split(max(1, CHUNK_VALUES // (y.numel() // y.shape[0])), dim=0))
        with torch.no_grad():
            for part in parts:
                self._reduce(layer, part, axis)

    def _reduce(self, layer: _Layer, y: Tensor, axis: int | None) -> None:
        """One call's (or slice's) statistics: a small output is copied aside and reduced
        at collect() together with every other call of its shape and rule (a stack of
        them costs the kernels of one); a large one is reduced here, so that what a
        probe step keeps alive stays bounded (``STAGE_VALUES``)."""
        # bf16/fp16 are widened before any arithmetic; float32 skips even the no-op call
        yf = y if y.dtype == torch.float32 else y.float()
        n = yf.numel()
        if n <= STAGE_CALL_VALUES and self._staged_values + n <= STAGE_VALUES:
            # A copy now: a later in-place op (ReLU(inplace=True)) must not change what we saw.
            copy = yf.clone(memory_format=torch.contiguous_format) if yf is y else yf.contiguous()
            key = (tuple(yf.shape), axis, layer.rule, yf.device)
            self._staged.setdefault(key, []).append((layer, copy))
            self._staged_values += n
            return
        x = yf.contiguous().view(1, n)
        layout = reduce.unit_layout(yf.shape, axis) if axis is not None else None
        call = reduce.reduce_calls(x, layout, layer.rule)
        self._store([layer], call, n, [self._sample(layer, yf)])

    @staticmethod
    def _store(
        layers: list[_Layer], call: reduce.CallStats, n: int, samples: Sequence[Tensor]
    ) -> None:
        """Append call i of ``call`` (n values each) to ``layers[i]``'s accumulators."""
        rows, nonfinite = call.rows.unbind(0), call.minus_nonfinite.unbind(0)
        units = call.sums.shape[1] if call.sums is not None else 0
        per_unit = n // units if units else 0
        sums = call.sums.unbind(0) if call.sums is not None else None
        live = call.live.unbind(0) if call.live is not None else None
        inside = call.minus_inside.unbind(0) if call.minus_inside is not None else None
        for i, layer in enumerate(layers):
            layer.rows.append(rows[i])
            layer.nonfinite.append(nonfinite[i])
            layer.totals.append(n)
            layer.samples.append(samples[i])
            if sums is not None:
                layer.sums.append((sums[i], per_unit))
            if live is not None:
                layer.live.append((live[i], per_unit))
            if inside is not None:
                layer.inside.append((inside[i], per_unit))

    def _reduce_staged(self) -> None:
        """Reduce every staged call, one stack per (shape, unit axis, rule, device)."""
        if not self._staged:
            return
        staged, self._staged, self._staged_values = self._staged, {}, 0
        with torch.no_grad():
            for (shape, axis, rule, _), items in staged.items():
                calls = [copy for _, copy in items]
                n = calls[0].numel()
                x = (
                    torch.stack([c.view(n) for c in calls])
                    if len(calls) > 1
                    else calls[0].view(1, n)
                )
                layout = reduce.unit_layout(shape, axis) if axis is not None else None
                call = reduce.reduce_calls(x, layout, rule)
                self._store([layer for layer, _ in items], call, n, self._sample_rows(x))

    def _sample_rows(self, x: Tensor) -> Sequence[Tensor]:
        """Each row's histogram values: the row itself up to ``sample_values``, else a
        fixed random subset (the same positions in every row). ``x`` is ours: no copy."""
        n, cap = x.shape[1], self.sample_values
        if cap is None or n <= cap:
            return x.unbind(0)
        key = ("sample", n, x.device)
        index = self._shape_cache.get(key)
        if index is None:
            if len(self._shape_cache) > 64:
                self._shape_cache.clear()
            index = torch.randint(n, (cap,), generator=self._generator(x.device), device=x.device)
            self._shape_cache[key] = index
        return x.index_select(1, index).unbind(0)

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
        index = layer.sample_index.get(flat.numel())
        if index is None or index.device != flat.device:
            if len(layer.sample_index) > 8:  # batch sizes keep changing
                layer.sample_index.clear()
            index = torch.randint(
                flat.numel(), (cap,), generator=self._generator(flat.device), device=flat.device
            )
            layer.sample_index[flat.numel()] = index
        return flat.index_select(0, index)

    # ---- gradients, weights, updates ----

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._armed:
            return
        self._param_result = self._read_params()
        self._old_weights = self._gather_weights()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._armed or self._old_weights is None or self._param_result is None:
            return
        with torch.no_grad():
            delta = self._gather_weights() - self._old_weights
            parts = torch._foreach_norm(list(delta.split(self._weight_lengths)))
            present, norms, _ = self._param_result
            self._param_result = (present, norms, torch.stack(parts))
        self._old_weights = None

    def _read_params(self) -> tuple[list[bool], Tensor, Tensor]:
        """(which params have grads, norms of those grads then of every probed layer's
        parameters, update norms = NaN until the post-step hook fills them)."""
        with torch.no_grad():
            present = [p.grad is not None for p in self._all_params]
            grads = [p.grad for p in self._all_params if p.grad is not None]
            weights = [p for layer in self._param_layers for p in layer.params]  # under no_grad
            norms = stats.norms(grads + weights, self._device)
            return present, norms, self._nan(len(weights))

    def _nan(self, n: int) -> Tensor:
        key = ("nan", n, self._device)
        if key not in self._cache:
            self._cache[key] = torch.full((n,), math.nan, device=self._device)
        nan: Tensor = self._cache[key]
        return nan

    def _gather_weights(self) -> Tensor:
        """The kept entries of every probed layer's parameters, as one float32 copy:
        whole parameters up to UPDATE_SAMPLE entries, every stride-th entry above."""
        with torch.no_grad():
            parts = [p.reshape(-1)[start::stride] for p, start, stride in self._weight_samples]
            if not parts:
                return torch.zeros(0, dtype=torch.float32, device=self._device)
            parts = [t if t.device == self._device else t.to(self._device) for t in parts]
            flat = torch.cat(parts)
            return flat if flat.dtype == torch.float32 else flat.to(torch.float32)

    # ---- collect ----

    def collect(self) -> PendingStats | None:
        """Build the flat statistics tensor of this probe step (no host reads), reset the
        accumulators and disarm. None when no armed forward pass was recorded."""
        self._reduce_staged()
        self.disarm()
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
            reduced = False
            if act:
                activation, reduced = self._activation_sections(act)
                sections += activation
            if params is not None and self._param_layers:
                sections += [params[1], params[2]]
            flat = torch.cat(sections) if len(sections) > 1 else sections[0]
        pending = PendingStats(
            tensor=flat,
            order=[layer.spec.name for layer in self._layers],
            act_layers=[layer.spec.name for layer in act],
            calls=[len(layer.rows) for layer in act],
            totals=[n for layer in act for n in layer.totals],
            bins=self.bins,
            grad_present=params[0] if params is not None and self._param_layers else [],
            param_layers=self._param_layout if params is not None else [],
            weight_slots=len(self._weight_samples),
            reduced=reduced,
        )
        for layer in act:
            layer.reset()
        return pending

    def _activation_sections(self, act: list[_Layer]) -> tuple[list[Tensor], bool]:
        """The activation part of the flat tensor, and whether it was reduced over the
        reducer's process group (see ``Reducer``)."""
        device = act[0].rows[0][0].device
        raw = torch.stack([row for layer in act for row in layer.rows])
        nonfinite = torch.stack([k for layer in act for k in layer.nonfinite]).neg_()
        rows = raw.view(-1, stats.RAW_WIDTH)
        reducer = self.reducer if self.reducer is not None and self.reducer.agreed() else None
        call_lo, call_hi = rows[:, stats.LO], rows[:, stats.HI]
        if reducer is not None:
            # Collective 1: one MAX over every call's [-lo, hi] gives the global range,
            # which the histograms need before any value is bucketed.
            extremes = reducer.all_max(torch.cat([-call_lo, call_hi]))
            call_lo, call_hi = -extremes[: len(rows)], extremes[len(rows) :]
        if len(rows) == len(act):
            lo, hi = call_lo, call_hi
        else:  # a module ran more than once: its histogram spans every call
            bounds, start = [], 0
            for layer in act:
                end = start + len(layer.rows)
                bounds.append(torch.stack([call_lo[start:end].amin(), call_hi[start:end].amax()]))
                start = end
            lo, hi = torch.stack(bounds).unbind(1)
        live = self._unit_inputs([layer.live for layer in act], device)
        inside = self._unit_inputs([layer.inside for layer in act], device)
        if inside is not None:
            inside.counts = inside.counts.neg()  # reduce_call keeps them negated
        sums = self._unit_inputs([layer.sums for layer in act], device)
        lengths = tuple(sum(int(s.shape[0]) for s in layer.samples) for layer in act)
        padded = self._padded([s for layer in act for s in layer.samples], lengths, device)
        hist = stats.histograms(padded, lo, hi, self.bins).view(-1)
        totals: Tensor | None = None
        if reducer is not None:
            rows, nonfinite, totals, hist, (live, inside, sums) = self._reduce_sections(
                reducer, act, rows, nonfinite, call_lo, call_hi, hist, (live, inside, sums), device
            )
        dead, _ = self._unit_ratio(live, len(act), device, dead=True)
        saturated, saturated_values = self._unit_ratio(inside, len(act), device, dead=False)
        if sums is None:
            spread = torch.full((len(act),), math.nan, dtype=torch.float64, device=device)
        else:
            spread = stats.unit_spread_var(
                sums.counts, sums.values_per_unit, sums.segments, sums.unit_count, sums.firsts
            )
        units = torch.stack([dead, saturated, saturated_values, spread]).t().to(torch.float32)
        sections = [rows.reshape(-1), nonfinite.to(torch.float32)]
        if totals is not None:
            sections.append(totals.to(torch.float32))
        return sections + [units.reshape(-1), hist.to(torch.float32)], reducer is not None

    def _padded(
        self, parts: list[Tensor], lengths: tuple[int, ...], device: torch.device
    ) -> Tensor:
        """Every layer's sample values as the rows of one tensor, NaN-padded to the widest
        (the histograms leave NaN out): one cat and, unless every row is as wide, one
        index_copy into cached positions (``pad_sequence`` costs ~10x more on CPU)."""
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        widest = max(lengths)
        if all(n == widest for n in lengths):
            return flat.view(len(lengths), widest)
        key = ("pad", lengths, device)
        positions = self._shape_cache.get(key)
        if positions is None:
            if len(self._shape_cache) > 64:
                self._shape_cache.clear()
            positions = torch.cat(
                [
                    torch.arange(i * widest, i * widest + n, device=device)
                    for i, n in enumerate(lengths)
                ]
            )
            self._shape_cache[key] = positions
        padded = torch.full((len(lengths) * widest,), math.nan, device=device)
        return padded.index_copy_(0, positions, flat).view(len(lengths), widest)

    def _reduce_sections(
        self,
        reducer: Reducer,
        act: list[_Layer],
        rows: Tensor,
        nonfinite: Tensor,
        call_lo: Tensor,
        call_hi: Tensor,
        hist: Tensor,
        units: tuple[_UnitInputs | None, ...],
        device: torch.device,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[_UnitInputs | None, ...]]:
        """Collective 2: one SUM (float64) over every additive part of every rank's
        sections: moments re-centred on a shared shift, nonzero, non-finite and value
        counts, histogram bins (already on the global range), per-unit counts, per-unit
        sums of values (so unit_spread is of the global per-unit means) and values per
        unit. Returns the global rows, counts, totals, histogram and unit inputs."""
        totals_host = [float(n) for layer in act for n in layer.totals]
        totals = self._vector(("totals", tuple(totals_host)), totals_host, device)
        wide = rows.to(torch.float64)
        center = torch.nan_to_num(
            (call_lo.to(torch.float64) + call_hi.to(torch.float64)) / 2,
            nan=0.0, posinf=0.0, neginf=0.0,
        )  # fmt: skip
        s1, s2 = stats.reshift(wide, totals, center)
        parts = [s1, s2, wide[:, stats.NONZERO], nonfinite.to(torch.float64), totals, hist]
        for unit in units:
            if unit is not None:
                parts += [unit.counts, unit.values_per_unit]
        sizes = [part.numel() for part in parts]
        summed = reducer.all_sum(torch.cat([part.to(torch.float64) for part in parts]))
        pieces = list(summed.split(sizes))
        s1, s2, nonzero, nonfinite, totals, hist = pieces[:6]
        rest = pieces[6:]
        out_units: list[_UnitInputs | None] = []
        for unit in units:
            if unit is None:
                out_units.append(None)
            else:
                counts, per_unit = rest[0], rest[1]
                rest = rest[2:]
                out_units.append(
                    _UnitInputs(counts, per_unit, unit.segments, unit.unit_count, unit.firsts)
                )
        rows = torch.stack(
            [center, s1, s2, nonzero, call_lo.to(torch.float64), call_hi.to(torch.float64)], dim=1
        ).to(torch.float32)
        return rows, nonfinite, totals, hist, tuple(out_units)

    def layout_key(self) -> int:
        """A fingerprint of what this step recorded (layers, calls, unit widths, bins): the
        shape of the reduced sections. Ranks reduce only when their keys agree, since a
        collective over differently shaped tensors would fail or hang. 0: nothing recorded."""
        self._reduce_staged()
        shape = tuple(
            (
                layer.index,
                len(layer.rows),
                tuple(int(c.shape[0]) for c, _ in layer.live),
                tuple(int(c.shape[0]) for c, _ in layer.inside),
                tuple(int(c.shape[0]) for c, _ in layer.sums),
            )
            for layer in self._layers
            if layer.rows
        )
        return zlib.crc32(repr((self.bins, shape)).encode()) + 1 if shape else 0

    def _unit_inputs(
        self, records: list[list[tuple[Tensor, int]]], device: torch.device
    ) -> _UnitInputs | None:
        """Every layer's per-unit counts over all its calls (see ``_unit_groups``), values
        per unit, each unit's layer and each layer's unit count; None if no layer has any."""
        groups = [
            (li, counts, n) for li, calls in enumerate(records) for counts, n in _unit_groups(calls)
        ]
        if not groups:
            return None
        shape = tuple((li, int(c.shape[0]), n) for li, c, n in groups)
        key = ("units", shape, device)
        if key not in self._shape_cache:
            if len(self._shape_cache) > 64:  # shapes keep changing: don't grow without bound
                self._shape_cache.clear()
            units = [0.0] * len(records)
            firsts = [0] * len(records)
            start = 0
            for li, width, _ in shape:
                if not units[li]:
                    firsts[li] = start
                units[li] += width
                start += width
            self._shape_cache[key] = (
                torch.cat([torch.full((w,), float(n), device=device) for _, w, n in shape]),
                torch.cat(
                    [torch.full((w,), li, dtype=torch.long, device=device) for li, w, _ in shape]
                ),
                stats.device_vector(units, device),
                stats.device_vector(firsts, device, torch.long),
            )
        values_per_unit, segments, unit_count, firsts_t = self._shape_cache[key]
        counts = torch.cat([c for _, c, _ in groups]) if len(groups) > 1 else groups[0][1]
        return _UnitInputs(counts, values_per_unit, segments, unit_count, firsts_t)

    @staticmethod
    def _unit_ratio(
        unit: _UnitInputs | None, n_layers: int, device: torch.device, *, dead: bool
    ) -> tuple[Tensor, Tensor]:
        """Per layer (ratio of dead/saturated units, count of saturated values)."""
        if unit is None:
            nan = torch.full((n_layers,), math.nan, dtype=torch.float64, device=device)
            return nan, torch.zeros_like(nan)
        return stats.unit_ratio(
            unit.counts, unit.values_per_unit, unit.segments, unit.unit_count, dead=dead
        )

    def _vector(self, key: Any, values: Sequence[float], device: torch.device) -> Tensor:
        key = (key, device)
        if key not in self._shape_cache:
            if len(self._shape_cache) > 64:
                self._shape_cache.clear()
            self._shape_cache[key] = stats.device_vector(values, device)
        vector: Tensor = self._shape_cache[key]
        return vector


def _unit_groups(calls: list[tuple[Tensor, int]]) -> list[tuple[Tensor, int]]:
    """One layer's per-unit counts over all its calls this step, as (counts, values per
    unit) groups. Calls with the same unit count are the same units (a shared Linear,
    an RNN cell): their counts add. Calls of another width are other units."""
    if len(calls) <= 1:
        return calls
    groups: dict[int, tuple[Tensor, int]] = {}
    for counts, n in calls:
        width = int(counts.shape[0])
        if width in groups:
            previous, m = groups[width]
            groups[width] = (previous + counts, m + n)
        else:
            groups[width] = (counts, n)
    return list(groups.values())


def _static_units(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.RNNBase):
        width = module.proj_size or module.hidden_size
        return width * (2 if module.bidirectional else 1)
    return None
