"""flush — one batch of buffered step values on its way from the device to the link.

Owns: the buffered metric ``Row``, ``to_host`` (one concatenation and one
non-blocking host copy per flush, with an event on CUDA), and ``Flush``, which
the link thread materialises into metrics, probe and alert frames once the copy
is done.

Never: runs ``materialize`` on the training thread (it waits on the device
event and reads host values), or changes a value's meaning: NaN reaches the
rules as NaN; ``wire.encode`` turns it into null afterwards. Probe values the
decoder turned into None because they were NaN/Inf (gradient, weight and update
norms) reach the rules as the non-finite floats they were (``rule_view``); the
probe frame keeps its nulls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from layerscope.trainer.alerts import Alerts
from layerscope.trainer.probes import PendingStats


@dataclass(slots=True)
class Row:
    step: int
    time_s: float
    values: dict[str, float | None]
    on_device: list[tuple[str, int]] = field(default_factory=list)  # (series, index in flat)
    evaluation: bool = False  # written by w.eval(), not w.step(): not the progress line's


class Flush:
    """One flush: the host copy of every buffered device value, decoded on the link thread."""

    def __init__(
        self,
        rows: list[Row],
        host: torch.Tensor | None,
        event: Any,
        probe: tuple[int, PendingStats, int, int] | None,
        progress: Any,
        alerts: Alerts | None = None,
        snapshot: dict[str, Any] | None = None,
        *,
        wide: bool = False,
    ) -> None:
        self.rows = rows
        self.host = host
        # the step values are float64, each as two float32 words of host (probe: float32)
        self.wide = wide
        self.event = event
        self.probe = probe  # (step, stats, offset, length) into host
        self.progress = progress
        self.alerts = alerts
        self.snapshot = snapshot  # checkpoint contents copied at the probe step

    def materialize(self) -> list[dict[str, Any]]:
        if self.event is not None:
            self.event.synchronize()
        # the step values only: the probe section (after them) is decoded on its own
        scalars = self.host
        if scalars is not None and self.probe is not None:
            scalars = scalars[: self.probe[2]]
        if scalars is not None and self.wide:
            scalars = scalars.view(torch.float64)
        flat = scalars.tolist() if scalars is not None else []
        probe_frame: dict[str, Any] | None = None
        run_values: dict[str, float | None] = {}
        probe_step = -1
        decoded = None
        if self.probe is not None:
            probe_step, stats, offset, length = self.probe
            assert self.host is not None
            probe_host = self.host[offset : offset + length]
            layers, run_values = stats.decode(probe_host)
            probe_frame = {"type": "probe", "step": probe_step, "layers": layers}
            decoded = (probe_step, *rule_view(stats, probe_host, layers, run_values))
        rows: list[dict[str, Any]] = []
        latest: dict[str, Any] | None = None  # the last w.step() row, loss or not
        for row in self.rows:
            values = dict(row.values)
            for name, index in row.on_device:
                values[name] = flat[index]
            if row.step == probe_step and run_values:
                for name, value in run_values.items():
                    values.setdefault(name, value)
                run_values = {}
            rows.append({"step": row.step, "time_s": row.time_s, "values": values})
            if not row.evaluation:
                latest = rows[-1]
        frames: list[dict[str, Any]] = []
        if rows:
            frames.append({"type": "metrics", "rows": rows})
        if probe_frame is not None:
            frames.append(probe_frame)
        if self.alerts is not None:
            # Raw floats: wire.encode turns NaN into null later, after the rules saw it.
            frames += self.alerts.evaluate(rows, decoded, self.snapshot)
        self.snapshot = None
        if self.progress is not None and latest is not None:
            self.progress(latest)
        return frames


def rule_view(
    stats: PendingStats,
    host: torch.Tensor,
    layers: list[dict[str, Any]],
    scalars: dict[str, float | None],
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """The decoded probe values as the rules must see them: a gradient, weight or update
    norm that ``decode`` made None because it was NaN/Inf is that non-finite float again
    (in a copy of the entry; the frame's entries keep None for the wire). Without it a
    gradient that went inf read as "no gradient", and the explosion was only reported a
    step later, from the NaN loss it caused. Activations need nothing: their entries
    carry the count of non-finite values.

    Non-finite gradients count only when the optimizer step applied them: some update
    norm is non-finite in a step the probes saw taken (``PendingStats.stepped``: the
    post-step hook measured it). A GradScaler's overflow step (mixed precision) has inf
    gradients by design and skips the update (no optimizer step at all, so nothing
    measured; a fused optimizer's step: all zero), and is no explosion. A step that
    applied a non-finite gradient only outside the sampled update entries shows as
    weights at the next probe step.

    The parameter norms are the tail of ``host`` (``PendingStats``' layout: G gradient
    norms, W pre-step weight norms, W update norms, NaN throughout without a step)."""
    out_scalars: dict[str, float | None] = dict(scalars)
    if not stats.param_layers:
        return layers, out_scalars
    present = sum(stats.grad_present)
    # a few dozen floats: plain Python reads them faster than a tensor op each (this
    # runs on the link thread once a probe step, under the GIL the training loop needs)
    tail = host[len(host) - present - 2 * stats.weight_slots :].tolist()
    grads, weights = tail[:present], tail[present : present + stats.weight_slots]
    updates = tail[present + stats.weight_slots :]
    nan_updates = [math.isnan(u) for u in updates]
    # a step whose every sampled update is NaN (loss x 1e39: NaN everywhere) was taken if
    # the post-step hook measured it; without the flag (a PendingStats built elsewhere)
    # all NaN reads as no step
    stepped = stats.stepped or not all(nan_updates)
    bad_updates = any(math.isinf(u) for u in updates) or (stepped and any(nan_updates))
    if all(math.isfinite(w) for w in weights) and not bad_updates:
        return layers, out_scalars  # the common case: nothing was hidden that matters
    if bad_updates and grads and (norm := _norm(grads)) is not None:
        out_scalars["grad_norm"] = norm
    position = {i: k for k, i in enumerate(i for i, has in enumerate(stats.grad_present) if has)}
    raw: dict[str, dict[str, float]] = {}
    for name, indices, slots in stats.param_layers:
        mine: dict[str, float] = {}
        grad = _norm([grads[position[i]] for i in indices if i in position])
        if bad_updates and grad is not None:
            mine["grad_norm"] = grad
        weight = _norm([weights[slot] for slot, _ in slots])
        if weight is not None:
            mine["weight_norm"] = weight
        update = [updates[slot] for slot, _ in slots]
        if any(math.isinf(u) for u in update) or (stepped and any(math.isnan(u) for u in update)):
            # inf over a finite weight norm is inf; NaN, or over a non-finite one, NaN
            inf = weight is None and not any(math.isnan(u) for u in update)
            mine["update_ratio"] = math.inf if inf else math.nan
        if mine:
            raw[name] = mine
    if not raw:
        return layers, out_scalars
    view = []
    for entry in layers:
        found = raw.get(entry["name"])
        view.append(entry if found is None else {**entry, **found})
    return view, out_scalars


def _norm(values: Sequence[float]) -> float | None:
    """The norm of ``values`` when it is NaN/Inf (as the rules must see it), else None."""
    if not values or all(math.isfinite(v) for v in values):
        return None
    return math.sqrt(sum(v * v for v in values))


def to_host(parts: list[torch.Tensor]) -> tuple[torch.Tensor | None, Any]:
    """One concatenation per device and one host copy; on CUDA a pinned non-blocking copy + event."""
    if not parts:
        return None, None
    flat = torch.cat(on_one_device(parts))
    if flat.device.type != "cuda":
        return flat, None
    host = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flat.device))
    return host, event


def on_one_device(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as they are when they share a device; else (rare: model parallel, or
    a value on the CPU beside CUDA ones) each moved to the first accelerator's, where
    the copies are ordered before the flush's host copy and its event. (A non-blocking
    copy to the CPU could be read before it lands.)"""
    first = tensors[0].device
    if all(t.device == first for t in tensors):
        return tensors
    target = next((t.device for t in tensors if t.device.type != "cpu"), first)
    return [t.to(target, non_blocking=True) for t in tensors]
