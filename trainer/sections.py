"""sections — the activation part of a probe step's flat tensor, built across layers.

Owns: ``Block`` (one reduction's results, as ``probes`` keeps them until collect),
``Accumulated`` (one layer's per-call results of a probe step), ``Sections.build``,
which turns every layer's accumulators into the activation sections of
``stats.PendingStats`` (value rows, non-finite counts, value counts when reduced,
per-layer unit ratios and unit spread, histograms), merging a module's calls, and under
a process group the two collectives that make them describe the global batch
(``Reducer``); ``Sections.build_blocks``, the same sections straight from the blocks
when every layer made one call (no per-call Python: a ``BlockPlan`` per layout); and
the index tensors those need, cached by layout.

Never: reads a tensor value on the host, calls a collective that not every rank calls
in the same order with the same shapes (``Reducer.agreed`` guards it), or keeps a
cache that grows without bound (it is cleared past 64 layouts).

Cost: about 40 small kernels for all layers together, whatever their number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from layerscope.trainer import stats
from layerscope.trainer.reduce import CallStats
from torch import Tensor


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


@dataclass(eq=False)
class Accumulated:
    """One layer's results this step, one entry per call: raw value row, minus the
    non-finite count (see ``reduce.CallStats``), value count, histogram sample, and
    per unit (count, values per unit) of live values, of values inside the saturation
    bounds (negated), and (sum of values, values per unit) for unit_spread."""

    rows: list[tuple[Tensor, int]] = field(default_factory=list)  # (CallStats.rows, index)
    totals: list[int] = field(default_factory=list)
    samples: list[tuple[Tensor, int]] = field(default_factory=list)  # (block, its row)
    live: list[tuple[Tensor, int]] = field(default_factory=list)
    inside: list[tuple[Tensor, int]] = field(default_factory=list)
    sums: list[tuple[Tensor, int]] = field(default_factory=list)

    def reset(self) -> None:
        self.rows, self.totals = [], []
        self.samples, self.live, self.inside, self.sums = [], [], [], []


@dataclass(eq=False)
class Block:
    """One reduction's results (``reduce.CallStats`` of C calls of one shape and rule:
    a group of a staged stack, or one output reduced in its hook), kept whole until
    ``collect``: when every layer made one call they are gathered block by block
    (``Sections.build_blocks``), otherwise appended call by call to each layer's
    ``Accumulated``."""

    owners: list[Any]  # each row's layer (its Accumulated)
    indices: tuple[int, ...]  # each row's layer index, in model order
    stats: CallStats
    n: int  # values per call
    samples: Tensor  # (C, width): each call's histogram values


@dataclass(eq=False)
class BlockPlan:
    """What gathering one layout of blocks needs, made once per layout: the layers in
    model order, each one's value count, and the device index tensors."""

    layers: tuple[int, ...]  # layer indices in model order (one call each)
    totals: list[int]  # per layer: its call's value count
    order: Tensor | None  # rows in block order -> model order (None: already)
    widest: int  # samples are NaN-padded to this width
    live: _UnitInputs | None  # counts unset: segments etc. in block order
    inside: _UnitInputs | None
    sums: _UnitInputs | None


def _even_samples(layer: Accumulated) -> list[Tensor]:
    """A layer's calls' histogram samples, thinned to one sampling rate: each call keeps
    the share of its values the most sparsely sampled call kept (every k-th of its sample),
    so a small call of a shared module weighs in the union as its values do, not as much
    as a large call cut down to ``sample_values`` (100 values beside 10,000 were 4.7% of
    the histogram, not 1%). Calls sampled alike (the usual case) are left whole."""
    samples = [block[row] for block, row in layer.samples]
    rates = [int(sample.shape[0]) / n for sample, n in zip(samples, layer.totals, strict=True)]
    lowest = min(rates)
    if max(rates) <= lowest * 1.01:
        return samples
    thinned = []
    for sample, n in zip(samples, layer.totals, strict=True):
        width = int(sample.shape[0])
        keep = max(1, round(n * lowest))
        thinned.append(sample if keep >= width else sample[:: width // keep][:keep])
    return thinned


def _unit_plan(
    blocks: Sequence[tuple[tuple[int, ...], int, int]],
    position: dict[int, int],
    n_layers: int,
    device: torch.device,
) -> _UnitInputs | None:
    """Segments, values per unit, unit counts and first units (counts left empty) of one
    per-unit section gathered in ``blocks``' order: each holds (layer index per row,
    units, values per unit); ``position`` maps a layer index to its place in the
    sections. A layer with several groups of units (calls of other widths) has them all."""
    if not blocks:
        return None
    units = [0.0] * n_layers
    firsts = [0] * n_layers
    segments: list[Tensor] = []
    per_unit: list[Tensor] = []
    start = 0
    for indices, width, n in blocks:
        for li in indices:
            at = position[li]
            if not units[at]:
                firsts[at] = start
            units[at] += width
            segments.append(torch.full((width,), at, dtype=torch.long, device=device))
            per_unit.append(torch.full((width,), float(n), device=device))
            start += width
    empty = torch.zeros(0, device=device)
    return _UnitInputs(
        empty,
        torch.cat(per_unit),
        torch.cat(segments),
        stats.device_vector(units, device),
        stats.device_vector(firsts, device, torch.long),
    )


class Sections:
    """Builds the activation sections; holds the index tensors cached by layout."""

    def __init__(self) -> None:
        self._cache: dict[Any, Any] = {}

    def build(
        self, act: Sequence[Accumulated], bins: int, reducer: Reducer | None
    ) -> tuple[list[Tensor], bool]:
        """The activation part of the flat tensor, and whether it was reduced over the
        reducer's process group (see ``Reducer``)."""
        device = act[0].rows[0][0].device
        raw = self._gather_rows(act, device)
        rows, nonfinite = raw[:, : stats.RAW_WIDTH], raw[:, stats.RAW_WIDTH].neg()
        reducer = reducer if reducer is not None and reducer.agreed() else None
        call_lo, call_hi = rows[:, stats.LO], rows[:, stats.HI]
        if reducer is not None:
            # Collective 1: one MAX over every call's [-lo, hi] gives the global range,
            # which the histograms need before any value is bucketed.
            extremes = reducer.all_max(torch.cat([-call_lo, call_hi]))
            call_lo, call_hi = -extremes[: len(rows)], extremes[len(rows) :]
        if len(rows) == len(act):
            lo, hi = call_lo, call_hi
        else:  # a module ran more than once: its histogram spans every call
            calls = tuple(len(layer.rows) for layer in act)
            seg = self._cached(("calls", calls, device), lambda: stats.segment_ids(calls, device))
            lo = call_lo.new_full((len(act),), math.inf).scatter_reduce_(0, seg, call_lo, "amin")
            hi = call_hi.new_full((len(act),), -math.inf).scatter_reduce_(0, seg, call_hi, "amax")
        live = self._unit_inputs([layer.live for layer in act], device)
        inside = self._unit_inputs([layer.inside for layer in act], device)
        if inside is not None:
            inside.counts = inside.counts.neg()  # reduce_call keeps them negated
        sums = self._unit_inputs([layer.sums for layer in act], device)
        padded = self._padded(act, device)
        hist = stats.histograms(padded, lo, hi, bins).view(-1)
        totals: Tensor | None = None
        if reducer is not None:
            rows, nonfinite, totals, hist, (live, inside, sums) = self._reduce_sections(
                reducer, act, rows, nonfinite, call_lo, call_hi, hist, (live, inside, sums), device
            )
        sections = self._assemble(rows, nonfinite, totals, (live, inside, sums), hist, len(act))
        return sections, reducer is not None

    def build_blocks(self, blocks: Sequence[Block], plan: BlockPlan, bins: int) -> list[Tensor]:
        """``build`` for one call per layer and no process group, from the blocks as
        they came out of the reductions: one cat per section in block order (the unit
        sections stay in it: their segments say which layer each unit is), one
        index_select each for the rows and the samples into model order, no per-call work."""
        first = blocks[0].stats
        raw = torch.cat([b.stats.rows for b in blocks]) if len(blocks) > 1 else first.rows
        samples = [
            b.samples
            if int(b.samples.shape[1]) == plan.widest
            else torch.nn.functional.pad(
                b.samples, (0, plan.widest - int(b.samples.shape[1])), value=math.nan
            )
            for b in blocks
        ]
        padded = torch.cat(samples) if len(samples) > 1 else samples[0]
        if plan.order is not None:
            raw, padded = raw.index_select(0, plan.order), padded.index_select(0, plan.order)
        rows, nonfinite = raw[:, : stats.RAW_WIDTH], raw[:, stats.RAW_WIDTH].neg()
        units: list[_UnitInputs | None] = []
        for unit, part in (
            (plan.live, [b.stats.live for b in blocks]),
            (plan.inside, [b.stats.minus_inside for b in blocks]),
            (plan.sums, [b.stats.sums for b in blocks]),
        ):
            if unit is None:
                units.append(None)
                continue
            flat = [c.reshape(-1) for c in part if c is not None]
            counts = torch.cat(flat) if len(flat) > 1 else flat[0]
            units.append(
                _UnitInputs(
                    counts, unit.values_per_unit, unit.segments, unit.unit_count, unit.firsts
                )
            )
        if units[1] is not None:
            units[1].counts = units[1].counts.neg()  # reduce_call keeps them negated
        hist = stats.histograms(padded, rows[:, stats.LO], rows[:, stats.HI], bins).view(-1)
        return self._assemble(rows, nonfinite, None, tuple(units), hist, len(plan.layers))

    def block_plan(self, blocks: Sequence[Block]) -> BlockPlan | None:
        """The plan for gathering this layout of blocks (made once, cached), or None when
        a layer made several calls (``build`` merges those)."""
        key = tuple(
            (
                b.indices,
                b.n,
                int(b.samples.shape[1]),
                None if b.stats.live is None else int(b.stats.live.shape[1]),
                None if b.stats.minus_inside is None else int(b.stats.minus_inside.shape[1]),
                None if b.stats.sums is None else int(b.stats.sums.shape[1]),
            )
            for b in blocks
        )
        device = blocks[0].stats.rows.device
        # False caches "no plan" (the cache takes None for "not made yet")
        plan = self._cached(("blocks", key, device), lambda: self._make_plan(key, device) or False)
        return plan if isinstance(plan, BlockPlan) else None

    @staticmethod
    def _make_plan(key: Any, device: torch.device) -> BlockPlan | None:
        indices = [li for entry in key for li in entry[0]]
        if len(set(indices)) != len(indices):
            return None
        layers = tuple(sorted(indices))
        position = {li: at for at, li in enumerate(layers)}
        totals_by = {li: entry[1] for entry in key for li in entry[0]}
        # out[position[li]] = in[r]: the source row of each model-order row
        source = [0] * len(indices)
        for r, li in enumerate(indices):
            source[position[li]] = r
        order = (
            None
            if source == list(range(len(source)))
            else stats.device_vector(source, device, torch.long)
        )

        def unit(at: int) -> _UnitInputs | None:
            parts = []
            for entry in key:
                width = entry[at]
                if width:
                    n = entry[1] // width
                    parts.append((entry[0], width, n))
            return _unit_plan(parts, position, len(layers), device)

        return BlockPlan(
            layers=layers,
            totals=[totals_by[li] for li in layers],
            order=order,
            widest=max(entry[2] for entry in key),
            live=unit(3),
            inside=unit(4),
            sums=unit(5),
        )

    def _assemble(
        self,
        rows: Tensor,
        nonfinite: Tensor,
        totals: Tensor | None,
        units: tuple[_UnitInputs | None, ...],
        hist: Tensor,
        n_layers: int,
    ) -> list[Tensor]:
        """The activation sections from the gathered rows, counts, per-unit inputs
        (live, inside, sums) and histogram: unit ratios and spread per layer."""
        live, inside, sums = units
        device = rows.device
        dead, _ = self._unit_ratio(live, n_layers, device, dead=True)
        saturated, saturated_values = self._unit_ratio(inside, n_layers, device, dead=False)
        assert saturated_values is not None  # dead=False always counts them
        if sums is None:
            spread = torch.full((n_layers,), math.nan, dtype=torch.float64, device=device)
        else:
            spread = stats.unit_spread_var(
                sums.counts, sums.values_per_unit, sums.segments, sums.unit_count, sums.firsts
            )
        per_layer = torch.stack([dead, saturated, saturated_values, spread]).t().to(torch.float32)
        sections = [rows.reshape(-1), nonfinite.to(torch.float32)]
        if totals is not None:
            sections.append(totals.to(torch.float32))
        return sections + [per_layer.reshape(-1), hist.to(torch.float32)]

    def _gather_rows(self, act: Sequence[Accumulated], device: torch.device) -> Tensor:
        """Every call's row (value row + minus its non-finite count), in layer order."""
        return self._pick_rows([ref for layer in act for ref in layer.rows], "rows", device)

    def _pick_rows(
        self,
        refs: Sequence[tuple[Tensor, int]],
        name: str,
        device: torch.device,
        width: int | None = None,
    ) -> Tensor:
        """The rows that ``refs`` name ((block, row) pairs), in that order, as one
        tensor: each distinct block once (NaN-padded to ``width`` when narrower), one cat
        and, unless already in order, one index_select by a cached index (stacking each
        row's own view costs ~10 us per row on CPU)."""
        blocks: list[Tensor] = []
        first: dict[int, int] = {}  # id of a block -> its first row in the cat
        positions = []
        start = 0
        for block, row in refs:
            at = first.get(id(block))
            if at is None:
                at = first[id(block)] = start
                start += int(block.shape[0])
                if width is not None and int(block.shape[1]) < width:
                    pad = (0, width - int(block.shape[1]))
                    block = torch.nn.functional.pad(block, pad, value=math.nan)
                blocks.append(block)
            positions.append(at + row)
        flat = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        if positions == list(range(flat.shape[0])):
            return flat
        index = self._cached(
            (name, tuple(positions), device),
            lambda: stats.device_vector(positions, device, torch.long),
        )
        return flat.index_select(0, index)

    def _padded(self, act: Sequence[Accumulated], device: torch.device) -> Tensor:
        """Every layer's sample values (the union of its calls') as the rows of one
        tensor, NaN-padded to the widest (the histograms leave NaN out).

        Samples arrive as rows of blocks (one block per stack or hooked call). When every
        layer has one call, ``_pick_rows`` gathers them (each narrower block padded
        once). Otherwise every layer's calls are concatenated and placed by one
        index_copy into cached positions (``pad_sequence`` costs ~10x more on CPU)."""
        if all(len(layer.samples) == 1 for layer in act):
            widest = max(int(layer.samples[0][0].shape[1]) for layer in act)
            return self._pick_rows([layer.samples[0] for layer in act], "samples", device, widest)
        evened = [_even_samples(layer) for layer in act]
        parts = [part for calls in evened for part in calls]
        lengths = tuple(sum(int(part.shape[0]) for part in calls) for calls in evened)
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        widest = max(lengths)
        if all(n == widest for n in lengths):
            return flat.view(len(lengths), widest)
        positions = self._cached(
            ("pad", lengths, device),
            lambda: torch.cat(
                [
                    torch.arange(i * widest, i * widest + n, device=device)
                    for i, n in enumerate(lengths)
                ]
            ),
        )
        padded = torch.full((len(lengths) * widest,), math.nan, device=device)
        return padded.index_copy_(0, positions, flat).view(len(lengths), widest)

    def _reduce_sections(
        self,
        reducer: Reducer,
        act: Sequence[Accumulated],
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
            [
                center,
                s1,
                s2.clamp(min=0.0).sqrt(),
                nonzero,
                call_lo.to(torch.float64),
                call_hi.to(torch.float64),
            ],
            dim=1,
        ).to(torch.float32)
        return rows, nonfinite, totals, hist, tuple(out_units)

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
        shape = tuple(((li,), int(c.shape[0]), n) for li, c, n in groups)
        n_layers = len(records)
        plan: _UnitInputs = self._cached(
            ("units", shape, n_layers, device),
            lambda: _unit_plan(shape, {li: li for li in range(n_layers)}, n_layers, device),
        )
        counts = torch.cat([c for _, c, _ in groups]) if len(groups) > 1 else groups[0][1]
        return _UnitInputs(
            counts, plan.values_per_unit, plan.segments, plan.unit_count, plan.firsts
        )

    @staticmethod
    def _unit_ratio(
        unit: _UnitInputs | None, n_layers: int, device: torch.device, *, dead: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Per layer (ratio of dead/saturated units, count of saturated values; None for
        dead units, which need no value count)."""
        if unit is None:
            nan = torch.full((n_layers,), math.nan, dtype=torch.float64, device=device)
            return nan, None if dead else torch.zeros_like(nan)
        return stats.unit_ratio(
            unit.counts, unit.values_per_unit, unit.segments, unit.unit_count, dead=dead
        )

    def _vector(self, key: Any, values: Sequence[float], device: torch.device) -> Tensor:
        vector: Tensor = self._cached((key, device), lambda: stats.device_vector(values, device))
        return vector

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """The device tensors cached under ``key`` (a layout), made once by ``make``. Past
        64 layouts the cache starts over: shapes that keep changing must not grow it."""
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) > 64:
                self._cache.clear()
            value = self._cache[key] = make()
        return value


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
