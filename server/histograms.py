"""histograms — compact storage of probe histograms and their resampling onto one grid.

Owns: the blob format of a histogram's counts (a one-byte array type tag, then the
little-endian unsigned counts in the narrowest cell that holds the largest: 16, 32
or 64 bits; not compressed, since zlib cost more writer time than ingest can
spare and a 64-bin histogram of 16-bit cells is already 129 bytes) and the mass-conserving resampling
of many histograms, each over its own [lo, hi], onto common edges for a
"histogram over time" heatmap.

Never: touches SQLite or HTTP; pure functions over plain lists.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate

_U16 = b"H"
_U32 = b"I"
_U64 = b"Q"
_TAGS = (_U16, _U32, _U64)


def pack_counts(counts: Sequence[int]) -> bytes:
    """Counts -> blob: 16-bit cells when every count fits (the usual case), else 32 or 64.

    struct packs and range-checks in one C walk; max() then array() took five times
    as long, in the writer process, 50 times per probe frame. Raises OverflowError for a
    negative count or one of 2**64 or more."""
    n = len(counts)
    for tag in _TAGS:
        try:
            return tag + struct.pack(f"<{n}{tag.decode()}", *counts)
        except struct.error:
            continue
    raise OverflowError("histogram counts must be integers in [0, 2**64)")


def unpack_counts(blob: bytes) -> list[int]:
    tag, body = blob[:1], blob[1:]
    if tag not in _TAGS:
        raise ValueError(f"unknown histogram blob tag {tag!r}")
    cells = array(tag.decode())
    cells.frombytes(body)
    if sys.byteorder == "big":
        cells.byteswap()
    return cells.tolist()


Hist = tuple[float, float, list[int]]


def common_edges(hists: Sequence[Hist | None], bins: int) -> list[float]:
    """bins+1 evenly spaced edges from the lowest lo to the highest hi.

    A zero-width range (every value equal) is widened by 0.5 on each side (by a
    billionth of the value past 5e8, where adding 0.5 would be lost to rounding) so the
    mass still lands in a visible bin; no histogram at all gives [0, 1]. Ranges near
    the ends of float64 (a diverging run's) keep finite edges: where hi - lo overflows,
    the width is taken as hi/bins - lo/bins.
    """
    present = [h for h in hists if h is not None]
    lo = min((h[0] for h in present), default=0.0)
    hi = max((h[1] for h in present), default=1.0)
    if hi <= lo:
        pad = max(0.5, abs(lo) * 1e-9)
        lo, hi = max(lo - pad, -sys.float_info.max), min(hi + pad, sys.float_info.max)
    span = hi - lo
    width = span / bins if span != math.inf else hi / bins - lo / bins
    return [lo + i * width for i in range(bins)] + [hi]


def resample(hist: Hist, edges: Sequence[float]) -> list[float]:
    """Spread each source bin's count over the target bins it overlaps, in proportion
    to the overlap (values are taken as uniform inside a source bin).

    Done through the source's cumulative count, linear inside each bin, read at
    every target edge: O(bins + len(counts)) and mass-conserving by construction.
    The edges must cover [lo, hi] (common_edges does).
    """
    lo, hi, counts = hist
    bins = len(edges) - 1
    n = len(counts)
    if n == 0:
        return [0.0] * bins
    total = float(sum(counts))
    # Differences of values near +-1.8e308 overflow: those ranges are taken halved (exact
    # in binary, so only they differ), and a range too small to have a width is a point.
    halve = edges[-1] - edges[0] == math.inf or hi - lo == math.inf
    f = 0.5 if halve else 1.0
    if hi * f - lo * f <= 0 or not math.isfinite(n / (hi * f - lo * f)):
        row = [0.0] * bins
        span = edges[-1] * f - edges[0] * f
        at = (lo * f - edges[0] * f) / span * bins if span > 0 else 0.0
        row[min(bins - 1, max(0, int(at)))] = total
        return row
    cumulative = [0, *accumulate(counts)]
    scale = n / (hi * f - lo * f)
    lo_f = lo * f
    at_edge = []
    for x in edges:
        p = (x * f - lo_f) * scale
        if p <= 0:
            at_edge.append(0.0)
        elif p >= n:
            at_edge.append(total)
        else:
            i = int(p)
            at_edge.append(cumulative[i] + (p - i) * counts[i])
    at_edge[0], at_edge[-1] = 0.0, total
    return [max(0.0, at_edge[t + 1] - at_edge[t]) for t in range(bins)]
