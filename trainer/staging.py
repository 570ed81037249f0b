"""staging — a probe step's small layer outputs, copied aside in their hooks and reduced
at collect() one stack per (shape, unit axis, device), the stacks kept for the next
probe step.

Owns: whether a call's output is staged (``STAGE_CALL_VALUES`` per call, ``STAGE_VALUES``
per step), its copy (into a new tensor, or into its row of the stack the last probe step
kept: ``_Slots``), and at collect() the stacking and reduction of every staged call into
``sections.Block``s, a stack's calls of one rule adjacent (``reduce.reduce_groups``), so a
Linear's outputs and its activation's cost the kernels of one stack, not two.

Never: reads a value on the host, keeps more than ``STAGE_VALUES`` between probe steps,
keeps a stack a forward under ``torch.inference_mode`` made (the next step's hooks write
into a kept stack, and an inference tensor refuses that), or keeps a stack whose rows
share a layer (a module called twice) or a view into an older stack.

Cost: a staged call costs its hook one copy (into a row view made once when the layout
repeats); collect() costs ~17 kernels per stack whatever its rules, plus one
``torch.stack`` for a stack that is new or was only part filled. ``probes`` owns the
layers and hooks and passes each call here first; a call not staged is reduced in its
hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from layerscope.trainer import reduce
from layerscope.trainer.sections import Block
from layerscope.trainer.stats import Rule
from torch import Tensor

# Outputs up to STAGE_CALL_VALUES values are copied aside and reduced at collect(), stacked
# with the other calls of their shape, while the copies of one step total at most
# STAGE_VALUES (4 MiB of float32); larger ones, and any beyond that, are reduced in the hook.
# (1 << 17: the small CNN's two 131,072-value outputs share a stack; its probe step went
# 0.81 -> 0.78 training steps once a staged output cost one copy into a kept stack.)
STAGE_CALL_VALUES = 1 << 17
STAGE_VALUES = 1 << 20


class StagedLayer(Protocol):
    """What staging needs of a layer: its index in model order and its rule."""

    index: int
    rule: Rule


@dataclass(eq=False)
class _Slots:
    """One (shape, unit axis, device) stack of the last probe step, kept for the next: its
    layers in stacking order (rule groups adjacent), their rule groups, and the stack
    itself, which the next step's hooks fill row by row (a copy into a view made once,
    where a fresh copy and a stack at collect() would be two)."""

    layers: list[Any]  # StagedLayer
    groups: list[tuple[Rule, int, int]]
    row_of: dict[int, int]  # layer index -> its row
    buffer: Tensor  # (rows, values per call), float32
    views: list[Tensor]  # each row viewed as the output's shape
    written: list[int]  # per row: the probe step that last filled it


class Staging:
    """One probe step's staged calls and the last step's kept stacks; see module docstring.

    ``sample_rows`` takes a stack (C, n) to each row's histogram values (C, width)."""

    def __init__(self, sample_rows: Callable[[Tensor], Tensor]) -> None:
        self._sample_rows = sample_rows
        self._staged: dict[tuple[Any, ...], list[tuple[Any, Tensor]]] = {}
        self._values = 0  # values staged this step
        self.slots: dict[tuple[Any, ...], _Slots] = {}  # the last probe step's stacks
        self._probe_id = 0  # counts new_step()s: which probe step filled a slot
        self._reduced_id = 0  # the probe step whose stacks reduce() last reduced

    def new_step(self) -> None:
        """A probe step begins (``Probes.arm``)."""
        self._probe_id += 1

    def discard(self) -> None:
        """Forget what this probe step staged so far (evaluation passes before its training
        pass); kept stacks stay, their rows unfilled until written again."""
        self._probe_id += 1
        self._staged, self._values = {}, 0

    def clear(self) -> None:
        """Drop what is staged and every kept stack (``Probes.close``)."""
        self._staged, self._values, self.slots = {}, 0, {}

    def take(self, layer: StagedLayer, y: Tensor, axis: int | None) -> bool:
        """Stage one call's detached output, or False when it is too large or the step's
        budget is spent (the caller reduces it in its hook). A copy either way: a later
        in-place op (ReLU(inplace=True)) must not change what was seen."""
        n = y.numel()
        if n > STAGE_CALL_VALUES or self._values + n > STAGE_VALUES:
            return False
        # every rule together (see reduce()); a declared function of a bf16/fp16 output
        # runs in that dtype (stats.Rule.for_dtype), so such calls stack apart
        key = (y.shape, axis, y.device, layer.rule.for_dtype(y.dtype).transform_dtype)
        slots = self.slots.get(key)
        if slots is not None:
            row = slots.row_of.get(layer.index)
            if row is not None and slots.written[row] != self._probe_id:
                slots.views[row].copy_(y)  # bf16/fp16 widened by the copy
                slots.written[row] = self._probe_id
                self._values += n
                return True
        # bf16/fp16 are widened before any arithmetic; float32 skips even the no-op call
        yf = y if y.dtype == torch.float32 else y.float()
        copy = yf.clone(memory_format=torch.contiguous_format) if yf is y else yf.contiguous()
        group = self._staged.get(key)
        if group is None:
            self._staged[key] = [(layer, copy)]
        else:
            group.append((layer, copy))
        self._values += n
        return True

    def reduce(self, blocks: list[Block]) -> None:
        """Reduce every call staged this probe step into ``blocks``, one stack per (shape,
        unit axis, device). A stack whose rows this step's hooks filled in place is reduced
        as it is; every stack is kept for the next probe step when its layers are
        distinct, and a kept stack this step did not fill is dropped. Once per probe step:
        a second call (``layout_key()``, then ``collect()``) reduces only new copies."""
        fresh = self._reduced_id != self._probe_id
        if not fresh and not self._staged:
            return
        self._reduced_id = self._probe_id
        filled = [
            key
            for key, slots in self.slots.items()
            if fresh and any(w == self._probe_id for w in slots.written)
        ]
        if not self._staged and not filled:
            self.slots = {}
            return
        staged, self._staged, self._values = self._staged, {}, 0
        if fresh:
            slots_now, self.slots = self.slots, {}
        else:  # only new copies: the kept stacks stay as they are
            slots_now = {}
        for key in [*filled, *(k for k in staged if k not in filled)]:
            shape, axis, _, _ = key
            items = staged.get(key, [])
            slots = slots_now.get(key)
            if slots is not None and not items and all(w == self._probe_id for w in slots.written):
                layers, groups, x = slots.layers, slots.groups, slots.buffer
                self.slots[key] = slots  # the same layout again next step
            else:
                if slots is not None:  # part filled: those rows join this step's copies
                    items = [
                        (layer, slots.views[row])
                        for row, layer in enumerate(slots.layers)
                        if slots.written[row] == self._probe_id
                    ] + items
                # stacked outside inference mode: the next step's hooks write into it
                layers, groups, x = self._stack(key, items)
            with torch.inference_mode():
                self._reduce_stack(shape, axis, layers, groups, x, blocks)

    def _stack(
        self, key: tuple[Any, ...], items: list[tuple[Any, Tensor]]
    ) -> tuple[list[Any], list[tuple[Rule, int, int]], Tensor]:
        """One stack's layers in stacking order (rule groups adjacent), the groups, and the
        stacked copies; kept as the next step's slots when its layers are distinct."""
        by_rule: dict[int, list[tuple[Any, Tensor]]] = {}
        for item in items:
            by_rule.setdefault(id(item[0].rule), []).append(item)
        ordered = items if len(by_rule) == 1 else [i for g in by_rule.values() for i in g]
        groups, start = [], 0
        for group in by_rule.values():
            groups.append((group[0][0].rule.for_dtype(key[3]), start, start + len(group)))
            start += len(group)
        n = ordered[0][1].numel()
        x = (
            torch.stack([copy.reshape(n) for _, copy in ordered])
            if len(ordered) > 1
            else ordered[0][1].reshape(1, n).clone()  # never a view of an older stack
        )
        layers = [layer for layer, _ in ordered]
        row_of = {layer.index: row for row, layer in enumerate(layers)}
        # kept only as a normal tensor: the next step's hooks write into it, and an
        # inference tensor (a forward or collect() under inference_mode) refuses that
        if len(row_of) == len(layers) and x.is_contiguous() and not x.is_inference():
            shape = key[0]
            self.slots[key] = _Slots(
                layers, groups, row_of, x, [row.view(shape) for row in x], [0] * len(layers)
            )
        return layers, groups, x

    def _reduce_stack(
        self,
        shape: Any,
        axis: int | None,
        layers: list[Any],
        groups: list[tuple[Rule, int, int]],
        x: Tensor,
        blocks: list[Block],
    ) -> None:
        n = x.shape[1]
        layout = reduce.unit_layout(shape, axis) if axis is not None else None
        samples = self._sample_rows(x)  # (calls, width): one row per call
        results = reduce.reduce_groups(x, layout, groups)
        for (_, begin, stop), call in zip(groups, results, strict=True):
            mine = layers[begin:stop]
            rows = samples if stop - begin == len(layers) else samples[begin:stop]
            blocks.append(Block(mine, tuple(layer.index for layer in mine), call, n, rows))
