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
one flag check). The definitions live in ``stats``, the per-call reductions in
``reduce``, the assembly across layers and ranks in ``sections``; this module wires
them to modules and optimizers; the staged copies of small outputs and the stacks kept
between probe steps are ``staging``'s, update_ratio's parameter samples ``updates``'.

Cost (benchmarks/overhead.py): on a probe step a small output (up to
``staging.STAGE_CALL_VALUES``) costs its hook one copy; collect() reduces the copies in one
stack per (shape, unit axis), ~17 kernels each whatever the rules in it (a Linear's
outputs and its activation's share one), then ~40 for every layer together; a larger
output is reduced in its hook (~17 kernels). The parameter hooks run a handful of
``_foreach`` calls (norms; the update sample copied into reused buffers and
subtracted). So the kernel count grows with the number of distinct layer shapes, not
layers. Each reduction's results stay one block until collect(), which gathers them
block by block when every layer made one call (the usual step), call by call otherwise.
The tensor work runs under ``torch.inference_mode`` (no autograd or version-counter
bookkeeping per call). On other steps the model carries no forward hook at all. On these
small CPU models most of a probe step is per-call overhead, not arithmetic: with a batch
of one the tanh MLP's probe step costs ~60% of what it costs with 64.

Choices worth knowing:
* A Linear/Conv feeding a norm has no dead_ratio (the norm re-centres it); where the
  model applies its activation functionally after a BatchNorm/InstanceNorm/GroupNorm
  (``F.relu(self.bn1(self.conv1(x)))``), that norm is probed with the ReLU reading instead
  (``_norms_read_as_relu``); LayerNorm never is.
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
  they are about three float32 copies of the output, freed before the next layer.
  The staged copies of small outputs total at most ``staging.STAGE_VALUES`` (4 MiB) per step;
  past that, outputs are reduced in their hooks. Each step's stacks of them are kept
  until the next probe step, whose hooks copy into their rows when the layout repeats
  (no fresh copy, no stack at collect()), so up to ``STAGE_VALUES`` stays allocated
  between probe steps; a stack the next step does not fill is dropped.
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
  one strided view per parameter, all copied by one ``_foreach_copy_``: ``updates``);
  smaller parameters are copied whole and the ratio is exact. ``weight_norm`` is the
  exact norm of the weights that produced this step's activations and gradients.
"""

from __future__ import annotations

import math
import re
import sys
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from layerscope.trainer import reduce, stats
from layerscope.trainer.sections import Accumulated, Block, Reducer, Sections
from layerscope.trainer.staging import Staging
from layerscope.trainer.stats import (
    DEAD_ACTIVITY_MAX,
    DEFAULT_BINS,
    SATURATED_UNIT_MAJORITY,
    SATURATION_LEVEL,
    UPDATE_SAMPLE,
    PendingStats,
    Rule,
)
from layerscope.trainer.updates import UpdateSample
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

# Between a Linear/Conv and the activation it feeds: these do not decide what it feeds.
_PASS_THROUGH = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
# A conv net's norms (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm): per channel, the
# output's sign is the bias's doing, not the conv's. See ``_norms_read_as_relu``.
_CHANNEL_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
# Every norm re-centres what it is given: a Linear/Conv feeding one gets no ReLU reading.
_NORMS: tuple[type[nn.Module], ...] = _CHANNEL_NORMS + (
    nn.LayerNorm, nn.LocalResponseNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)  # fmt: skip


@dataclass
class LayerSpec:
    name: str
    kind: str  # module class name, e.g. "ReLU", "Linear"
    units: int | None


@dataclass(eq=False, kw_only=True)
class _Layer(Accumulated):
    spec: LayerSpec
    index: int
    rule: Rule
    channel_first: bool
    params: list[nn.Parameter]
    # a Linear: its units are the last dim whatever the rank (a channels-last (N, H, W, C)
    # input, as in ConvNeXt blocks), not dim 1 as for a 4-D conv output
    features_last: bool = False
    # a ConvNd: the rank of its output for an unbatched input ((C, L) for Conv1d, (C, H, W)
    # for Conv2d, which PyTorch accepts), whose units are dim 0; -1 for other modules
    unbatched_ndim: int = -1
    sample_index: dict[int, Tensor] = field(default_factory=dict)  # numel -> indices


def _matcher(
    pattern: str | Sequence[str] | None, what: str, root: str = "model"
) -> Callable[[str], bool] | None:
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
    # a name is a module and everything inside it, as set_frozen reads it; the root's
    # label ("model", unless a submodule has that name) is all of it
    wanted = set(pattern)
    if root in wanted:
        return lambda name: True
    prefixes = tuple(f"{name}." for name in wanted)
    return lambda name: name in wanted or name.startswith(prefixes)


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
        outer: nn.Module | None = None,
    ) -> None:
        """``outer``: the model as the training loop calls it, when ``model`` is the one
        inside its ``torch.compile`` / DistributedDataParallel wrappers (as ``watch`` gives
        it): a compiled wrapper is run eagerly on probe steps (see ``arm``)."""
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
        self._sections = Sections()
        # Small outputs of this step, copied aside until collect() (see ``staging``)
        self._staging = Staging(self._sample_rows)
        self._blocks: list[Block] = []  # this step's reductions, gathered at collect()
        self._channel_first_out: list[weakref.ref[Tensor]] = []
        self._features_last_out: list[weakref.ref[Tensor]] = []  # likewise, for features_last
        self._unbatched_out: list[weakref.ref[Tensor]] = []  # likewise, channels at dim 0
        self._param_result: tuple[list[bool], Tensor, Tensor] | None = None
        self._stepped = False  # this probe step's post-step hook measured an update
        self._all_params = list(model.parameters())  # unique: parameters() de-duplicates ties
        first = self._all_params[0] if self._all_params else None
        self._device = first.device if first is not None else torch.device("cpu")

        self.layers: list[LayerSpec] = []
        chosen = self._select(
            model, types or DEFAULT_TYPES, names, exclude, activations or {}, types is None
        )
        if not chosen and (types is not None or exclude is not None):
            given = "types" if types is not None else "exclude"
            raise ValueError(
                f"{given}: {types if types is not None else exclude!r} leaves no layer of this "
                "model to probe; widen the filter, or leave it out"
            )
        self._layers = [layer for layer, _ in chosen]
        self.layers = [layer.spec for layer in self._layers]
        self._param_layers = [layer for layer in self._layers if layer.params]
        self._probed_params = [p for layer in self._param_layers for p in layer.params]
        self._updates = UpdateSample(self._probed_params)  # update_ratio's (see ``updates``)
        position = {id(p): i for i, p in enumerate(self._all_params)}
        self._param_layout: list[tuple[str, list[int], list[tuple[int, float]]]] = []
        slot = 0
        for layer in self._param_layers:
            slots = []
            for _ in layer.params:
                slots.append((slot, self._updates.scales[slot]))
                slot += 1
            indices = [position[id(p)] for p in layer.params]
            self._param_layout.append((layer.spec.name, indices, slots))
        self._hooks = [(module, self._hook_for(layer)) for layer, module in chosen]
        self._hooks += self._channel_relays(model, {id(module) for _, module in chosen})
        # An evaluation pass (a call of the model under no_grad or inference_mode: the
        # validation idiom, model.eval() or not) made while armed is not the probe step's
        # when a training pass comes in the same step: one before it (a validation pass
        # before the first step, or between steps) is dropped when the training forward
        # starts, one after it is skipped. The model's own pre/post hooks (made once,
        # registered while armed) tell them apart; a step of evaluation passes alone
        # (probing a model for inspection) keeps them. A no_grad block inside a training
        # forward (a frozen backbone) is recorded: the model's own call has grads on.
        self._model = model
        # Where torch.compile's wrappers are (torch.compile(model), a compiled block, one
        # inside or around DistributedDataParallel): a probe step runs them eagerly (``arm``).
        # (found once: a wrapper exists only where dynamo is imported, and a loop over a large
        # model's modules at every probe step would cost ~0.1 ms)
        wrapper = _optimized_module()
        self._compiled = (
            [m for m in (outer if outer is not None else model).modules() if isinstance(m, wrapper)]
            if wrapper is not None
            else []
        )
        self._swapped: list[tuple[nn.Module, str, Any]] = []
        self._model_hooks = (_eager(self._model_pre_hook), _eager(self._model_post_hook))
        self._closure_step = False  # this step's optimizer.step() was given a closure
        self._skipping = False  # in an evaluation pass after this step's training pass
        self._trained = False  # a training pass was recorded this probe step
        self._eval_only = False  # what is recorded so far came from evaluation passes
        # Inside a call of the model itself (whose pre-hook tells training from evaluation;
        # a frozen part run under no_grad inside a training forward is training). A module
        # called under no_grad outside one (a kNN monitor's `model.backbone(x_val)`, a
        # piece of an encoder-decoder driven by hand) is no training pass: its outputs were
        # recorded as this step's training activations (a max of 118 where training's was 2.3).
        self._in_root = False
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
        default_types: bool = True,
    ) -> list[tuple[_Layer, nn.Module]]:
        all_names = {name or "model" for name, _ in model.named_modules()}
        # the root is labelled "model"; a submodule of that name keeps it (the root is then
        # not nameable in a list)
        root = "" if any(name == "model" for name, _ in model.named_modules()) else "model"
        include, skip = _matcher(names, "names", root), _matcher(exclude, "exclude", root)
        for label, given in (("names", names), ("exclude", exclude)):
            if given is not None and not isinstance(given, str):
                unknown = sorted(set(given) - all_names)
                if unknown:
                    raise ValueError(f"{label}: no module named {unknown} in the model")
        channel_first = self._sequential_channel_first(model)
        no_relu_after = self._feeds_no_relu(model)
        # with the default types, also the norms whose output the model visibly feeds to a
        # functional activation (their Linear/Conv has no reading then: see _feeds_no_relu)
        read_norms = self._norms_read_as_relu(model)
        chosen: list[tuple[_Layer, nn.Module]] = []
        interned: dict[Rule, Rule] = {}
        # MultiheadAttention holds out_proj for its weights but never calls it (its forward
        # uses the weights directly): a default pick would be a layer with no output, ever
        never_called = {
            id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
        }
        for name, module in model.named_modules():
            name = name or "model"
            norm_read = id(module) in read_norms
            if not isinstance(module, types) and not (norm_read and default_types):
                continue
            if id(module) in never_called and names is None:
                continue
            if (include and not include(name)) or (skip and skip(name)):
                continue
            is_activation = isinstance(module, ACTIVATION_TYPES)
            rule = stats.module_rule(module, default=stats.NO_RULE)
            if not is_activation and isinstance(module, WEIGHT_TYPES):
                # DESIGN §3: the units a following (functional) ReLU would leave dead; none
                # where the model shows the output feeds no ReLU (a Tanh module, the loss)
                rule = (
                    stats.NO_RULE if id(module) in no_relu_after else stats.FUNCTION_RULES["relu"]
                )
            elif norm_read:
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
            # equal rules become one object: staged calls are grouped by the rule's identity
            rule = interned.setdefault(rule, rule)
            conv1d_like = isinstance(module, _CONV1D_LIKE)
            spec = LayerSpec(name=name, kind=type(module).__name__, units=_static_units(module))
            layer = _Layer(
                spec=spec,
                index=len(chosen),
                rule=rule,
                # a norm's input is (N, C, *): its 3-D output is channel-first too
                channel_first=conv1d_like
                or id(module) in channel_first
                or isinstance(module, _CHANNEL_NORMS),
                features_last=isinstance(module, nn.Linear),
                unbatched_ndim=len(module.kernel_size) + 1
                if isinstance(module, nn.modules.conv._ConvNd)
                else -1,
                params=list(module.parameters()),
            )
            chosen.append((layer, module))
        unknown = sorted(set(activations) - {layer.spec.name for layer, _ in chosen})
        if unknown:
            raise ValueError(f"activations: {unknown} are not probed layers of this model")
        if names is not None and not chosen:
            kinds = ", ".join(sorted(t.__name__ for t in types)[:8])
            raise ValueError(
                f"names: {names!r} selects no layer to probe (probed types: {kinds}, ...); "
                "name the modules, or the containers holding them"
            )
        return chosen

    @staticmethod
    def _feeds_no_relu(model: nn.Module) -> set[int]:
        """ids of Linear/Conv modules whose output the model visibly feeds to something
        other than a ReLU, so a ReLU-based dead_ratio on it would say nothing: the next
        module in the model's order (past dropout and identity) is a norm (it re-centres
        every unit, so the sign of the raw output is not what the activation after it sees;
        ``_norms_read_as_relu`` probes the norm instead where nothing else measures it), an
        activation module without a dead region (Tanh, Sigmoid, ...; that module's own
        entry measures it), or there is no next module (the output layer: it feeds the
        loss). A Linear followed by another Linear, as in a forward that applies
        ``F.relu`` between them, keeps the ReLU reading (DESIGN §3)."""
        leaves = _leaves(model)
        found: set[int] = set()
        for at, module in enumerate(leaves):
            if not isinstance(module, WEIGHT_TYPES):
                continue
            after = _next_leaf(leaves, at)
            if (
                after is None
                or isinstance(after, _NORMS)
                or (
                    isinstance(after, ACTIVATION_TYPES)
                    and stats.module_rule(after).live_above is None
                )
            ):
                found.add(id(module))
        return found

    @staticmethod
    def _norms_read_as_relu(model: nn.Module) -> set[int]:
        """ids of the conv-net norms (BatchNorm, InstanceNorm, GroupNorm) whose output gets
        the ReLU reading a Linear/Conv gets (DESIGN §3's default for a functional
        activation): ``F.relu(self.bn1(self.conv1(x)))`` (pytorch-cifar's ResNet) has no
        activation module, and the conv before the norm has no reading (the norm re-centres
        it), so without this the model would have no dead-unit reading at all. Those are
        the norms with a next module in the model's order (past dropout and identity; none:
        it feeds the loss, as a projection head's last BatchNorm1d) that is not an activation
        module (which measures what the norm gives it), and whose block, the module two levels
        up (the model itself for shallower ones), holds no activation module: where it does,
        the model applies its activations as modules, and a norm not followed by one feeds
        something else (torchvision's bn2 and downsample.1 feed the residual add,
        MobileNet's projection norm nothing). Nor is a block's last norm (the next module
        lies outside its parent): pytorch-cifar's bn2 and shortcut norm feed the residual
        add, and F.relu comes only after it. LayerNorm and RMSNorm are never read so: in a
        transformer they feed attention and Linears, and a feature that is negative on every
        token would read as a dead unit."""
        leaves = _leaves(model)
        at_leaf = {id(m): at for at, m in enumerate(leaves)}
        with_activation: set[str] = set()
        named = list(model.named_modules())
        for name, module in named:
            if isinstance(module, ACTIVATION_TYPES):
                parts = name.split(".") if name else []
                with_activation.update(".".join(parts[:k]) for k in range(len(parts)))
        names = {id(m): n for n, m in named}
        found: set[int] = set()
        for name, module in named:
            if not isinstance(module, _CHANNEL_NORMS) or id(module) not in at_leaf:
                continue
            after = _next_leaf(leaves, at_leaf[id(module)])
            if after is None or isinstance(after, ACTIVATION_TYPES):
                continue
            parts = name.split(".") if name else []
            parent = ".".join(parts[:-1])
            if parent and not names.get(id(after), "").startswith(parent + "."):
                # the last norm of its block (pytorch-cifar's bn2, its shortcut's norm):
                # its output leaves the block, into the residual add, before F.relu
                continue
            if ".".join(parts[:-2]) not in with_activation:
                found.add(id(module))
        return found

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

    def _channel_relays(
        self, model: nn.Module, probed: set[int]
    ) -> list[tuple[nn.Module, Callable[[nn.Module, Any, Any], None]]]:
        """With a Conv1d-like module in the model: a light hook (while armed, like the
        others) on each channel-preserving module that is not probed (BatchNorm1d,
        Dropout, pooling...), passing the channel axis from its input to its output, so an
        activation after Conv1d -> BatchNorm1d in a custom forward still takes channels as
        its units (an activation straight after the Conv1d already does)."""
        if not any(isinstance(m, _CONV1D_LIKE) for m in model.modules()):
            return []

        def relay(module: nn.Module, args: Any, output: Any) -> None:
            if (
                self._armed
                and not self._skipping
                and args
                and isinstance(output, Tensor)
                and output.dim() == 3
                and any(ref() is args[0] for ref in self._channel_first_out)
            ):
                self._channel_first_out.append(weakref.ref(output))

        eager_relay = _eager(relay)
        return [
            (m, eager_relay)
            for m in model.modules()
            if isinstance(m, _KEEPS_CHANNELS) and id(m) not in probed
        ]

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
        per module per step).

        A model compiled by ``torch.compile`` runs its probe step eagerly, as the module
        inside, and its compiled graph on every other step, untouched: the hooks are never
        seen by dynamo. Traced into the graph, they split it at each hooked layer for the
        whole run (every step twice as slow) when it was compiled while armed (watch()
        arms before the first forward), and were never called at all when it was compiled
        before (dynamo's default ``skip_nnmodule_hook_guards``: every activation statistic
        None)."""
        if self._armed or self._closed:
            return
        self._armed = True
        self._run_eager()
        self._skipping = self._trained = self._eval_only = self._stepped = self._in_root = False
        self._staging.new_step()
        pre, post = self._model_hooks
        self._forward_handles = [
            self._model.register_forward_pre_hook(pre),
            self._model.register_forward_hook(post, always_call=True),
        ]
        self._forward_handles += [
            module.register_forward_hook(hook) for module, hook in self._hooks
        ]

    def stop_recording(self) -> None:
        """Take the forward hooks off for the rest of this probe step (what they recorded
        stays for ``collect()``); the optimizer hooks stay on, so the step still reads its
        gradients, weights and update at ``optimizer.step()``. ``watch`` calls it past
        its limit of training passes a probe step."""
        for handle in self._forward_handles:
            handle.remove()
        self._forward_handles = []
        self._run_compiled()

    def disarm(self) -> None:
        self._armed = False
        for handle in self._forward_handles:
            handle.remove()
        self._forward_handles = []
        self._run_compiled()
        self._updates.drop_views()  # a step() that raised left them

    def _run_eager(self) -> None:
        """Until ``_run_compiled``: each ``torch.compile`` wrapper in the model (an
        ``OptimizedModule``) calls its module eagerly; the autograd graph of that forward
        is an eager one, so its backward needs nothing restored."""
        if self._swapped:
            return
        for module in self._compiled:
            state = module.__dict__
            if "forward" in state:
                self._swapped.append((module, "forward", state["forward"]))
                inner: Any = state["_modules"]["_orig_mod"]
                state["forward"] = inner.__call__

    def _run_compiled(self) -> None:
        for module, name, value in reversed(self._swapped):
            module.__dict__[name] = value
        self._swapped = []

    def close(self) -> None:
        self.disarm()
        self._closed = True
        self._staging.clear()
        self._blocks = []
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers:
            layer.reset()
        self._param_result = None
        self._updates.reset()

    # ---- forward hooks ----

    def _hook_for(self, layer: _Layer) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if (
                self._armed
                and not self._skipping
                and (self._in_root or (torch.is_grad_enabled() and not _in_backward()))
            ):
                self._record(layer, args, output)

        return _eager(hook)

    def _model_pre_hook(self, module: nn.Module, args: Any) -> None:
        if _in_backward():
            # Activation checkpointing recomputes a checkpointed forward inside backward
            # (torch.utils.checkpoint, reentrant or not): the same values again, no new
            # training pass. Recorded, a checkpointed segment counted every value twice.
            self._skipping = self._in_root = True
            return
        if not torch.is_grad_enabled():  # an evaluation pass: no step trains without grads
            if self._eval_only:
                # Only the last evaluation pass before a training one is kept (a step of
                # evaluation passes alone probes that one): a validation loop run while armed
                # (before the first step, or at an epoch's end before a probe step) kept
                # every batch's outputs until training resumed, growing with the val set.
                self._forget_recorded()
            self._skipping = self._trained
            self._eval_only = not self._trained
            self._in_root = True
            return
        if self._eval_only:  # recorded so far: evaluation passes, not this step's
            self._forget_recorded()
            self._eval_only = False
        self._trained = True
        self._skipping = False
        self._in_root = True

    def _forget_recorded(self) -> None:
        self._staging.discard()
        self._blocks = []
        self._channel_first_out.clear()
        self._features_last_out.clear()
        self._unbatched_out.clear()

    def _model_post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._skipping = False
        self._in_root = False

    def _record(self, layer: _Layer, args: Any, output: Any) -> None:
        y = output[0] if isinstance(output, tuple | list) else output
        if isinstance(y, PackedSequence):
            y = y.data
        if not isinstance(y, Tensor) or not y.is_floating_point():
            return
        if y.is_nested or _functorch_wrapped(y):
            # A nested tensor (nn.TransformerEncoder's fast path in eval mode with a padding
            # mask) has no sizes to stack; a vmap/grad-transformed one (per-sample gradients
            # through torch.func) cannot leave its transform. Both raised from the hook and
            # stopped a loop that runs without layerscope; such an output is not probed.
            return
        n, ndim = y.numel(), y.dim()
        if n == 0:
            return
        if ndim == layer.unbatched_ndim or (
            self._unbatched_out and args and any(ref() is args[0] for ref in self._unbatched_out)
        ):
            # A ConvNd given one unbatched sample, (C, *spatial): the channels are dim 0. An
            # activation applied straight to it inherits that (identity, as below).
            self._unbatched_out.append(weakref.ref(y))
            axis: int | None = 0
        elif ndim == 3:
            channel_first = layer.channel_first
            if not channel_first and self._channel_first_out and args:
                x = args[0]
                channel_first = any(ref() is x for ref in self._channel_first_out)
            if channel_first:
                # Identity, not shape: an activation applied straight to this output (even
                # in place, which returns the same tensor) inherits the channel axis.
                self._channel_first_out.append(weakref.ref(y))
            axis = 1 if channel_first else 2
        else:
            axis = stats.unit_axis(ndim, False)
            if ndim > 3:
                last = layer.features_last
                if not last and self._features_last_out and args:
                    x = args[0]
                    last = any(ref() is x for ref in self._features_last_out)
                if last:  # an activation applied straight to it inherits the axis, as above
                    self._features_last_out.append(weakref.ref(y))
                    axis = ndim - 1
        if axis is not None and layer.spec.units is None:
            layer.spec.units = y.shape[axis]
        # detached: nothing below is recorded by autograd (cheaper than a no_grad block)
        y = y.detach()
        if n > CHUNK_VALUES and ndim >= 2:
            # Bounded temporaries: a large output is reduced in slices along dim 0, or the
            # last dim where dim 0 holds the units (never the unit axis); the slices merge
            # exactly like a module's repeated calls.
            dim = 0 if axis != 0 else ndim - 1
            for part in y.split(max(1, CHUNK_VALUES // (n // y.shape[dim])), dim=dim):
                self._reduce(layer, part, axis)
        else:
            self._reduce(layer, y, axis)

    def _reduce(self, layer: _Layer, y: Tensor, axis: int | None) -> None:
        """One call's (or slice's) statistics: a small output is copied aside and reduced
        at collect() together with every other call of its shape and rule (a stack of
        them costs the kernels of one); a large one is reduced here, so that what a
        probe step keeps alive stays bounded (``STAGE_VALUES``). ``y`` is detached."""
        if self._staging.take(layer, y, axis):
            return
        n = y.numel()
        yf = y if y.dtype == torch.float32 else y.float()
        layout = reduce.unit_layout(yf.shape, axis) if axis is not None else None
        with torch.inference_mode():
            rule = layer.rule.for_dtype(y.dtype)  # a declared tanh etc. in the output's dtype
            call = reduce.reduce_calls(yf.contiguous().view(1, n), layout, rule)
            sample = self._sample(layer, yf).view(1, -1)
        self._blocks.append(Block([layer], (layer.index,), call, n, sample))

    def _accumulate(self) -> None:
        """Move this step's blocks into the layers' accumulators, call by call (the
        general path: ``Sections.build`` merges a layer's calls and reduces across ranks)."""
        blocks, self._blocks = self._blocks, []
        for block in blocks:
            self._store(block.owners, block.stats, block.n, block.samples)

    @staticmethod
    def _store(
        layers: list[_Layer], call: reduce.CallStats, n: int, samples: Tensor, first: int = 0
    ) -> None:
        """Append call i of ``call`` (n values each) to ``layers[i]``'s accumulators; its
        histogram sample is row ``first + i`` of ``samples``."""
        units = call.sums.shape[1] if call.sums is not None else 0
        per_unit = n // units if units else 0
        sums = call.sums.unbind(0) if call.sums is not None else None
        live = call.live.unbind(0) if call.live is not None else None
        inside = call.minus_inside.unbind(0) if call.minus_inside is not None else None
        for i, layer in enumerate(layers):
            layer.rows.append((call.rows, i))
            layer.totals.append(n)
            layer.samples.append((samples, first + i))
            if sums is not None:
                layer.sums.append((sums[i], per_unit))
            if live is not None:
                layer.live.append((live[i], per_unit))
            if inside is not None:
                layer.inside.append((inside[i], per_unit))

    def _sample_rows(self, x: Tensor) -> Tensor:
        """Each row's histogram values, as the rows of one tensor: the row itself up to
        ``sample_values``, else a fixed random subset (the same positions in every
        row). ``x`` is ours: no copy."""
        n, cap = x.shape[1], self.sample_values
        if cap is None or n <= cap:
            return x
        key = ("sample", n, x.device)
        index = self._shape_cache.get(key)
        if index is None:
            if len(self._shape_cache) > 64:
                self._shape_cache.clear()
            index = torch.randint(n, (cap,), generator=self._generator(x.device), device=x.device)
            self._shape_cache[key] = index
        return x.index_select(1, index)

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
        # optimizer.step(closure) (LBFGS): the closure computes this step's gradients inside
        # step(), so they are read after it; before it they are the last step's, or None.
        # (the hook's args hold the optimizer itself first, then step()'s own)
        self._closure_step = len(args) > 1 or kwargs.get("closure") is not None
        self._param_result = self._read_params(getattr(optimizer, "grad_scale", None))
        self._updates.before_step()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._armed or self._param_result is None:
            return
        if self._closure_step:  # the gradients as the closure left them, the weights before
            before_present, before, nan = self._param_result
            present, after, _ = self._read_params(getattr(optimizer, "grad_scale", None))
            with torch.inference_mode():
                norms = torch.cat([after[: sum(present)], before[sum(before_present) :]])
            self._param_result = (present, norms, nan)
        # a GradScaler's step of a fused optimizer: found_inf set (its kernel skips an
        # overflow step on the device): no update then, and whether the step was taken is
        # known on the device only, so the flush tells it from the updates (all NaN: none)
        found_inf = getattr(optimizer, "found_inf", None)
        updates = self._updates.after_step(self._device, found_inf)
        if updates is not None:
            present, norms, _ = self._param_result
            self._param_result = (present, norms, updates)
            self._stepped = not isinstance(found_inf, Tensor)

    def _read_params(self, grad_scale: Any = None) -> tuple[list[bool], Tensor, Tensor]:
        """(which params have grads, norms of those grads then of every probed layer's
        parameters, update norms = NaN until the post-step hook fills them).

        ``grad_scale``: the optimizer's ``grad_scale`` attribute, which a GradScaler sets
        around the step of a fused optimizer (``fused=True`` unscales inside its kernel,
        so the gradients read here are still multiplied by the loss scale): the gradient
        norms are divided by it on the device (a plain optimizer's were unscaled before
        its step, and the attribute is absent)."""
        with torch.inference_mode():
            every = [p.grad for p in self._all_params]
            present = [g is not None for g in every]
            # a sparse gradient (nn.Embedding(sparse=True)): the norm of its stored values
            grads = [g.coalesce().values() if g.is_sparse else g for g in every if g is not None]
            weights = self._probed_params
            norms = stats.norms(grads + weights, self._device)
            if isinstance(grad_scale, Tensor) and grads:
                norms[: len(grads)].div_(grad_scale.to(norms.device, torch.float32))
            return present, norms, self._nan(len(weights))

    def _nan(self, n: int) -> Tensor:
        key = ("nan", n, self._device)
        if key not in self._cache:
            self._cache[key] = torch.full((n,), math.nan, device=self._device)
        nan: Tensor = self._cache[key]
        return nan

    # ---- collect ----

    def collect(self) -> PendingStats | None:
        """Build the flat statistics tensor of this probe step (no host reads), reset the
        accumulators and disarm. None when no armed forward pass was recorded.

        When every layer made one call and there is no process group, the blocks are
        gathered as they are (``Sections.build_blocks``, by a plan made once per layout);
        otherwise they go call by call into the layers' accumulators (``Sections.build``)."""
        self._staging.reduce(self._blocks)
        self.disarm()
        self._channel_first_out.clear()
        self._features_last_out.clear()
        self._unbatched_out.clear()
        blocks = self._blocks
        plan = self._sections.block_plan(blocks) if blocks and self.reducer is None else None
        if plan is None:
            self._accumulate()
            act = [layer for layer in self._layers if layer.rows]
        else:
            self._blocks = []
            act = [self._layers[i] for i in plan.layers]
        params = self._param_result
        self._param_result = None
        stepped, self._stepped = self._stepped, False
        self._updates.forget()
        if not act and (params is None or not self._param_layers):
            return None  # nothing probed this step (a model with no probed layer at all)
        try:  # a raise below must not leave this step's calls for the next to merge
            if params is None and self._param_layers:
                params = self._read_params()  # no optimizer hook fired: grads as they are now
            with torch.inference_mode():
                sections: list[Tensor] = []
                reduced = False
                if plan is not None:
                    sections += self._sections.build_blocks(blocks, plan, self.bins)
                elif act:
                    activation, reduced = self._sections.build(act, self.bins, self.reducer)
                    sections += activation
                if params is not None and self._param_layers:
                    sections += [params[1], params[2]]
                flat = torch.cat(sections) if len(sections) > 1 else sections[0]
            pending = PendingStats(
                tensor=flat,
                order=[layer.spec.name for layer in self._layers],
                act_layers=[layer.spec.name for layer in act],
                calls=[len(layer.rows) for layer in act] if plan is None else [1] * len(act),
                totals=[n for layer in act for n in layer.totals]
                if plan is None
                else list(plan.totals),
                bins=self.bins,
                grad_present=params[0] if params is not None and self._param_layers else [],
                param_layers=self._param_layout if params is not None else [],
                weight_slots=len(self._updates),
                reduced=reduced,
                units=[layer.spec.units for layer in act],
                stepped=stepped and params is not None,
            )
        finally:
            if plan is None:
                for layer in act:
                    layer.reset()
        return pending

    def layout_key(self) -> int:
        """A fingerprint of what this step recorded (layers, calls, unit widths, bins): the
        shape of the reduced sections. Ranks reduce only when their keys agree, since a
        collective over differently shaped tensors would fail or hang. 0: nothing recorded."""
        self._staging.reduce(self._blocks)
        self._accumulate()  # a process group takes the general path: see collect()
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


_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (where
    activation checkpointing recomputes its segments' forwards)."""
    return _graph_task_id() != -1


_functorch_wrapped: Callable[[Tensor], bool] = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False
)


def _eager(hook: Callable[..., None]) -> Callable[..., None]:
    """A hook that always runs as Python, also inside ``torch.compile(model)``: traced, its
    writes to the probes' state (a staged row filled, the step's value budget) would be
    replayed as the constants of the first trace, and later probe steps would find nothing
    recorded. ``torch.compiler.disable`` (a graph break under tracing; 0.5 us a call
    outside it). A wrapper that called it only while compiling (0.2 us) was itself traced
    after the break, once per hooked layer and mode: a model compiled after ``watch()``
    with validation passes printed dynamo's "hit config.recompile_limit (8)" warning."""
    return torch.compiler.disable(hook)


def _optimized_module() -> type | None:
    """torch.compile's wrapper class, None while dynamo is not imported (then nothing in
    the process is compiled; importing it costs a second)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    cls = getattr(frame, "OptimizedModule", None)
    return cls if isinstance(cls, type) else None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The model's modules without children, in the model's order; an empty container (an
    identity shortcut written ``nn.Sequential()``) is none."""
    return [
        m
        for m in model.modules()
        if next(m.children(), None) is None and not isinstance(m, _CONTAINERS)
    ]


def _next_leaf(leaves: list[nn.Module], at: int) -> nn.Module | None:
    """The leaf after ``leaves[at]``, past dropout and identity; None: it is the last."""
    return next((m for m in leaves[at + 1 :] if not isinstance(m, _PASS_THROUGH)), None)


def _static_units(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.RNNBase):
        width = module.proj_size or module.hidden_size
        return width * (2 if module.bidirectional else 1)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features or None  # 0: a lazy norm before its first call
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None
