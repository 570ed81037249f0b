"""flush — one batch of buffered step values on its way from the device to the link.

Owns: the buffered metric ``Row``, ``to_host`` (one concatenation and one
non-blocking host copy per flush, with an event on CUDA), and ``Flush``, which
the link thread materialises into metrics, probe and alert frames once the copy
is done.

Never: runs ``materialize`` on the training thread (it waits on the device
event and reads host values), or changes a value's meaning: NaN reaches the
rules as NaN; ``wire.encode`` turns it into null afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from layerscope.trainer.alerts import Alerts
from layerscope.trainer.probes import PendingStats


@dataclass
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
            layers, run_values = stats.decode(self.host[offset : offset + length])
            probe_frame = {"type": "probe", "step": probe_step, "layers": layers}
            decoded = (probe_step, layers, dict(run_values))
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
