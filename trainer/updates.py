"""updates — update_ratio's sample of each probed parameter and the norms of its update.

Owns: which entries of a parameter are kept (the parameter itself up to
``stats.UPDATE_SAMPLE`` entries; above, every k-th entry from a fixed random start, k the
first stride >= ceil(numel / UPDATE_SAMPLE) prime to a row's length: ``sample_stride``),
their pre-step copy into float32 (or wider) buffers reused across probe steps, and after
the step the norms of old - new, one per parameter. ``probes`` calls it from its
optimizer step hooks; the scale k of each slot goes to ``stats.PendingStats`` so decode
estimates ||Δw|| (k times the sample's ||Δw||²: unbiased over the start; a Linear's
outer-product update, sampled in every column, within a few percent at 4,096 entries).

Never: reads a value on the host, copies a whole large parameter, or holds a parameter's
storage between probe steps (the pre-step views are dropped after the step, and by
``drop_views`` when a step raised).

Cost: one ``_foreach_copy_`` before the step, one ``_foreach_sub_`` and one
``_foreach_norm`` after; a strided sample's view is made once per step and reused after
the step while its parameter keeps the same storage and shape.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from layerscope.trainer import stats
from layerscope.trainer.stats import UPDATE_SAMPLE
from torch import Tensor, nn


def sample_stride(numel: int, shape: Any) -> int:
    """Every how many entries a parameter's sample keeps one: 1 up to UPDATE_SAMPLE
    entries, else the first k >= ceil(numel / UPDATE_SAMPLE) sharing no factor with the
    length of a row (the entries after the first dim). A Linear's update is an outer
    product (row r, column c moves by a_r * b_c): with k dividing the row length every
    kept entry sat in the same in/k columns, so a few inputs' activity decided the
    estimate (+-30% on a healthy 128x128 layer, a factor of 2-4 where most inputs were
    dead); a k prime to it visits every column in turn, row after row."""
    stride = max(1, -(-numel // UPDATE_SAMPLE))
    if stride == 1:
        return 1
    row = numel // shape[0] if len(shape) > 1 and shape[0] else numel
    while math.gcd(stride, row) != 1:
        stride += 1
    return stride


class UpdateSample:
    """The kept entries of ``params`` (one slot each, in order) around one optimizer step."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        starts = random.Random(0x1A7E5)
        self._samples: list[tuple[nn.Parameter, int, int]] = []
        for p in params:
            stride = sample_stride(p.numel(), p.shape)
            self._samples.append((p, starts.randrange(stride), stride))
        self.scales = [float(stride) for _, _, stride in self._samples]
        self._whole: list[Tensor] = list(params)
        self._strided = [i for i, (_, _, stride) in enumerate(self._samples) if stride > 1]
        # per strided sample: (data pointer, shape) of the parameter its view was made on
        # (pointer 0: the sample is a copy)
        self._strided_on: dict[int, tuple[int, Any]] = {}
        self._views: list[Tensor] = []  # this step's pre-step samples
        self._old: list[Tensor] | None = None  # set by before_step until after_step
        # the pre-step copy: buffers reused across probe steps while the samples keep shape
        self._buffers: list[Tensor] = []
        self._shapes: list[Any] = []  # (shape, dtype, device) the buffers were made for

    def __len__(self) -> int:
        return len(self._samples)

    def before_step(self) -> None:
        """Copy the samples as they are before the optimizer step."""
        with torch.inference_mode():
            views = self._sample_views()
            shapes = [(v.shape, v.dtype, v.device) for v in views]
            if shapes != self._shapes:
                self._shapes = shapes
                # float32, or wider for a float64 parameter: a small update stays exact
                self._buffers = [
                    torch.empty(
                        v.shape, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device
                    )
                    for v in views
                ]
            if views:
                torch._foreach_copy_(self._buffers, views)
            self._old = self._buffers
            self._views = views

    def after_step(self, device: torch.device, found_inf: Tensor | None = None) -> Tensor | None:
        """The norm of each sample's update (float32 on ``device``), or None without a
        ``before_step`` for this step or when a parameter changed shape inside it.

        ``found_inf``: the optimizer's ``found_inf`` attribute, which a GradScaler sets
        around the step of a fused optimizer (``fused=True``: its kernel reads it and
        leaves every parameter as it was when it is non-zero, the scaler's overflow step).
        A non-zero one makes every norm NaN, the update section of no step (update_ratio
        None), as for a plain optimizer, whose step the scaler does not call at all: a
        skipped step made no update, it is not an update of 0. Chosen on the device (no
        host read)."""
        old, self._old = self._old, None
        views, self._views = self._views, []
        if old is None:
            return None
        with torch.inference_mode():
            # step() may have given a parameter new storage (p.data = ...), and a
            # non-contiguous parameter's strided sample is a copy: those are read again
            views = self._sample_views(views)
            if not views or [v.shape for v in views] != [b.shape for b in old]:
                return None  # a parameter changed shape inside step(): no update to measure
            torch._foreach_sub_(old, views)  # old - new: the same norm as the update
            norms = stats.norms(old, device)
            if isinstance(found_inf, Tensor):
                norms.masked_fill_(found_inf.to(norms.device).reshape(-1)[0] != 0, math.nan)
            return norms

    def forget(self) -> None:
        """This step is over (collect): an after-step hook without a new before-step
        measures nothing."""
        self._old = None

    def drop_views(self) -> None:
        """Drop the pre-step views a raising step() left: they would keep a replaced
        parameter's storage alive until the next probe step."""
        self._views = []
        self._old = None

    def reset(self) -> None:
        self.drop_views()
        self._buffers, self._shapes = [], []

    def _sample_views(self, before: list[Tensor] | None = None) -> list[Tensor]:
        """The kept entries of every parameter: the parameter itself up to UPDATE_SAMPLE
        entries (whatever its layout; it reads the current storage even after
        ``p.data = ...``), every stride-th entry above: a strided view of a contiguous
        parameter, a copy of a non-contiguous one.

        ``before``: this step's pre-step samples; a strided view is reused while its
        parameter keeps the storage and shape it was made on (the view keeps that
        storage alive, so a new storage has another address), so the post-step read
        costs no call per parameter."""
        views = list(self._whole) if before is None else before
        for i in self._strided:
            p, start, stride = self._samples[i]
            if before is not None:
                ptr, shape = self._strided_on[i]
                if ptr and p.data_ptr() == ptr and p.shape == shape:
                    continue  # the live view of the same storage and shape
            if p.is_contiguous():
                count = (p.numel() - start + stride - 1) // stride
                views[i] = p.as_strided((count,), (stride,), p.storage_offset() + start)
                self._strided_on[i] = (p.data_ptr(), p.shape)
            else:
                views[i] = p.reshape(-1)[start::stride]
                self._strided_on[i] = (0, None)
        return views
