"""reduce — one or many calls' outputs reduced on the device to the raw probe statistics.

Owns: ``reduce_calls``, which turns a stack of C same-shaped layer outputs (one call
in a forward hook, or every staged small call of one shape and rule at ``collect``)
into per-call value rows (``stats.RAW_WIDTH``), non-finite counts and per-unit vectors
(sums, live counts, inside counts) in a fixed number of kernels whatever C is; and
``CallStats``, its result. The statistic definitions are ``stats``'; this module is
their cost-conscious implementation.

Never: reads a value on the host (no ``.item()``/``.cpu()``/``.tolist()``, no Python
branch on a tensor), modifies its input (the caller's sample is taken from it
afterwards), or uses comparison kernels, ``where`` or ``count_nonzero``: on CPU a bool
output runs several times slower than float arithmetic, and ``sign(relu(a - b))`` is
exact in IEEE arithmetic. No matrix products either: under the user's autocast they
would run in 16 bits and lose exact counts.

Cost: about 15-19 kernels per stack (3-5 of them write a tensor the size of the
stack, reused in place; the rest are reductions), so a probe step's kernel count
grows with the number of distinct (shape, rule) groups, not with the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from layerscope.trainer.stats import RAW_WIDTH, Rule, inside_indicator
from torch import Tensor


@dataclass
class CallStats:
    """C calls' statistics. Two counts are kept negated (flipping each call's sign would
    cost a kernel per stack; the caller negates every call's at once)."""

    # (C, RAW_WIDTH + 1) float32: shift, s1, root of s2, nonzero, lo, hi, then minus the count of
    # NaN/Inf values (one tensor, so a probe step gathers every call's with one index)
    rows: Tensor
    sums: Tensor | None  # (C, units): each unit's sum of (cleaned) values, for unit_spread
    live: Tensor | None  # (C, units): each unit's live values (rule.live_above)
    minus_inside: Tensor | None  # (C, units): minus each unit's values inside the bounds

    @property
    def minus_nonfinite(self) -> Tensor:
        """(C,): minus each call's count of NaN/Inf values."""
        return self.rows[:, RAW_WIDTH]


def unit_layout(shape: Sequence[int], axis: int) -> tuple[int, int, int]:
    """(values before the unit axis, units, values after it) of one output's shape."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def unit_sums(x: Tensor, layout: tuple[int, int, int]) -> Tensor:
    """(C, units): per call, the sum of each unit's values, where each row of ``x``
    (C, n) is a contiguous output of shape (lead, units, rest). Summing the middle axis
    of (C, lead, units * rest) runs along contiguous rows (vectorised), then the short
    trailing axis. Always a new tensor, never a view of ``x``."""
    calls = x.shape[0]
    lead, units, rest = layout
    out = x.view(calls, lead, units * rest).sum(1)
    return out.view(calls, units, rest).sum(2) if rest > 1 else out


def _nonzero_signs(signs: Tensor) -> Tensor:
    """(C,): how many entries of each row of a sign tensor (-1, 0, 1) are nonzero: the
    row's dot product with itself; for several rows of up to 2**22 entries their squared
    2-norm rounded (one fused pass; ``vecdot`` is a product and a sum, and the 1-norm
    runs ~5x slower on CPU). float32 rounds sqrt(k) by at most 2**-24 relative, so its
    square is within 0.5 of k while k < 2**22 (4,196,353 is the first count it misses);
    longer rows take ``vecdot``, exact below 2**24."""
    if signs.shape[0] == 1:
        return torch.dot(signs.view(-1), signs.view(-1)).view(1)
    if signs.shape[1] > 1 << 22:
        return torch.linalg.vecdot(signs, signs)
    return torch.linalg.vector_norm(signs, dim=1).square_().round_()


# A stack this size or smaller accumulates its squares in float64; a larger one in float32
# after scaling each row whose spread is past SPREAD_SCALED_ABOVE by 2**-64, or below
# SPREAD_SCALED_BELOW by 2**64 (each way cheaper there)
FLOAT64_SQUARES_MAX = 32_768
SPREAD_SCALED_ABOVE = 2.0**48  # below it n * spread^2 fits float32 for n up to 2**32
SPREAD_SCALED_BELOW = 2.0**-48  # above it the squares that matter are normal float32 numbers


def _root_squares(d: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """(C,): each row's 2-norm, the root of its sum of squares, in ``d``'s dtype; ``d``
    may be scaled in place (the caller has read it already). ``lo``/``hi``: each row's
    min/max, which bound its spread.

    A float32 sum of squares overflows once the values' spread passes ~1e19 (a ReLU net
    at normal(1.0) init reaches 1e25 by its 8th layer: what the init lab and
    PoorInitialization look at), where the norm itself still fits, and its squares
    underflow to 0 below ~1e-19 (a deep net at normal(0.01) init: the shrinking case). A
    small stack accumulates in float64 (a few us); a large one multiplies each row by
    2**-64 where its spread passes 2**48, by 2**64 where it is under 2**-48, else by 1
    (exact: powers of two; the squares this flushes to zero are below 2**-128 of the
    row's), takes the float32 norm and scales it back: one in-place pass instead of
    float64's 2-3 passes' time."""
    if d.numel() <= FLOAT64_SQUARES_MAX:
        return torch.linalg.vector_norm(d, dim=1, dtype=torch.float64).to(d.dtype)
    # a row with no finite value has hi - lo = -inf: scaled up, its cleaned zeros stay 0;
    # one whose spread overflows float32: +inf, scaled down
    spread = hi - lo
    scale = torch.where(
        spread > SPREAD_SCALED_ABOVE,
        2.0**-64,
        torch.where(spread < SPREAD_SCALED_BELOW, 2.0**64, 1.0),
    ).to(d.dtype)
    return torch.linalg.vector_norm(d.mul_(scale[:, None]), dim=1).div_(scale)


def reduce_calls(x: Tensor, layout: tuple[int, int, int] | None, rule: Rule) -> CallStats:
    """Every statistic of C same-shaped float32 outputs of one rule, ``x`` being (C, n)
    contiguous: ``reduce_groups`` with a single group."""
    return reduce_groups(x, layout, [(rule, 0, x.shape[0])])[0]


def reduce_groups(
    x: Tensor, layout: tuple[int, int, int] | None, groups: Sequence[tuple[Rule, int, int]]
) -> list[CallStats]:
    """Every statistic of C same-shaped float32 outputs, ``x`` being (C, n) contiguous,
    whose rows ``start:end`` of each ``(rule, start, end)`` group follow that rule (a
    Linear's outputs and its ReLU's share a stack: the passes every rule needs run once
    over all rows, the rule's own passes over its rows). One ``CallStats`` per group.

    Per call: s1 is the sum of ``clean - shift`` and root_s2 the root of its sum of
    squares, its 2-norm (clean: NaN/Inf -> 0; shift: the mean of the cleaned values, so
    the variance survives |mean| >> std and an outlier among the values); nonzero counts the nonzero finite values; lo/hi are
    the min/max of the finite values (+inf/-inf when there is none). ``layout``: (lead,
    units, rest) of one output, or None for an output without units. The host arithmetic
    is ``stats.Summary.add``.
    """
    calls = x.shape[0]
    inf = math.inf
    lo_src = torch.nan_to_num(x, nan=inf, posinf=inf, neginf=inf)
    hi_src = torch.nan_to_num(x, nan=-inf, posinf=-inf, neginf=-inf)
    lo, hi = lo_src.amin(1), hi_src.amax(1)
    # hi_src - lo_src is x - x = 0 for a finite value and -inf exactly where x is not finite
    minus_nonfinite = hi_src.sub_(lo_src).sign_().sum(1)
    clean = lo_src.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # +inf where x was not finite
    signs = torch.sign(clean, out=hi_src)
    sums = unit_sums(clean, layout) if layout is not None else None

    # The count of nonzero finite values (exact below 2**24), per group: a ReLU's is its
    # live count; a ReLU-family input's is 2 x positives - the sum of its signs (the live
    # count is its positives); any other's is its signs' dot product with themselves (one
    # pass over its rows, so only where needed). A group's sign sums are taken before its
    # signs are clipped (each group clips only its own rows).
    per_group: list[tuple[Tensor | None, Tensor | None]] = []
    nonzero_parts: list[Tensor] = []
    for rule, start, end in groups:
        live = minus_inside = None
        nonzero: Tensor | None = None
        if layout is not None:
            threshold = rule.live_above
            if threshold is not None:
                if threshold != 0.0:
                    live = unit_sums((clean[start:end] - threshold).relu_().sign_(), layout)
                elif rule.nonnegative:
                    # the sign of a value that is never negative is 1 exactly when it is live
                    live = unit_sums(signs[start:end], layout)
                    nonzero = live.sum(1)
                else:  # in place: these rows' signs are not read again
                    signsum = signs[start:end].sum(1)
                    live = unit_sums(signs[start:end].relu_(), layout)
                    nonzero = live.sum(1).mul_(2.0).sub_(signsum)
            if rule.saturates:
                minus_inside = unit_sums(
                    inside_indicator(x[start:end], clean[start:end], rule), layout
                )
        if nonzero is None:  # no other group clips these rows' signs
            nonzero = _nonzero_signs(signs[start:end])
        nonzero_parts.append(nonzero)
        per_group.append((live, minus_inside))
    nonzero = torch.cat(nonzero_parts) if len(nonzero_parts) > 1 else nonzero_parts[0]
    # The shift is the row's mean of its cleaned values (from the unit sums when there
    # are units, so no pass over the row; totalled in float64, which does not overflow
    # where |mean| x n passes 3.4e38): about a shift far from the mean, such as a first
    # value that is an outlier, s2 - s1^2/n cancels away the variance in float32.
    source = sums if sums is not None else clean
    shift = source.sum(1, keepdim=True, dtype=torch.float64).div_(x.shape[1]).to(x.dtype)
    d = clean.sub_(shift)
    s1 = d.sum(1)  # before _root_squares, which may scale d in place
    rows = torch.stack(
        [shift.view(calls), s1, _root_squares(d, lo, hi), nonzero, lo, hi, minus_nonfinite], dim=1
    )
    assert rows.shape[1] == RAW_WIDTH + 1
    return [
        CallStats(
            rows[start:end],
            sums[start:end] if sums is not None else None,
            live,
            minus_inside,
        )
        for (_, start, end), (live, minus_inside) in zip(groups, per_group, strict=True)
    ]
