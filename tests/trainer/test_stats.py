"""The statistic definitions of DESIGN §3 as pure tensor functions, checked against
numpy and hand-built tensors whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from layerscope.trainer import reduce, stats
from torch import nn


def _summary(*chunks: torch.Tensor) -> dict[str, float | None]:
    """The device reduction of each chunk (one call each), folded on the host."""
    summary = stats.Summary()
    for chunk in chunks:
        call = reduce.reduce_calls(chunk.reshape(1, -1), None, stats.NO_RULE)
        summary.add(call.rows[0].tolist(), -call.minus_nonfinite.item(), chunk.numel())
    return summary.values()


def test_moments_min_max_zero_frac_are_those_of_the_finite_values() -> None:
    x = torch.tensor([1.0, 0.0, -3.0, float("nan"), 5.0, float("inf"), 0.0, float("-inf")])
    finite = np.array([1.0, 0.0, -3.0, 5.0, 0.0])
    got = _summary(x)
    assert got["mean"] == pytest.approx(finite.mean())
    assert got["std"] == pytest.approx(finite.std())  # population std, numpy's default
    assert (got["min"], got["max"]) == (-3.0, 5.0)
    assert got["zero_frac"] == 2 / 8  # a fraction of all values; NaN is not zero
    assert got["nonfinite"] == 3


def test_moments_survive_a_large_offset() -> None:
    gen = torch.Generator().manual_seed(1)
    x = 1000.0 + torch.randn(4096, generator=gen)
    x[7] = float("nan")
    ref = x.double()[torch.isfinite(x)].numpy()
    got = _summary(x)
    assert got["mean"] == pytest.approx(ref.mean(), rel=1e-6)
    assert got["std"] == pytest.approx(ref.std(), rel=1e-3)


def test_moments_survive_an_outlier_first_value_and_large_magnitudes() -> None:
    """The device sums run about each call's mean, not its first value: an outlier first
    (1e5 among N(0,1) values gave a std 56% off) costs no accuracy, nor do magnitudes
    up to ~1e30 (the sum of squares is accumulated in float64 and sent as its root: a
    float32 sum of squares overflowed past ~1e19, and the std was None)."""
    gen = torch.Generator().manual_seed(3)
    for first in (1e5, 1e6, -3e7):
        x = torch.randn(200_000, generator=gen)
        x[0] = first
        ref = x.double().numpy()
        got = _summary(x)
        assert got["mean"] == pytest.approx(ref.mean(), rel=1e-4), first
        assert got["std"] == pytest.approx(ref.std(), rel=1e-4), first
    for scale in (1e12, 1e17, 1e25, 1e30):
        x = torch.randn(4096, generator=gen) * scale
        ref = x.double().numpy()
        got = _summary(x)
        assert got["std"] == pytest.approx(ref.std(), rel=1e-4), scale
        assert got["mean"] == pytest.approx(ref.mean(), rel=1e-3, abs=scale * 1e-5), scale


def test_the_moments_of_huge_values_are_kept_where_float32_sums_overflow() -> None:
    """Values near 1e35: their float32 sum overflows, so the mean shift is summed in
    float64; their spread's sum of squares (~1e73) is accumulated in float64 and sent as
    its root (~4e36), so the std is reported too."""
    x = (torch.rand(4096, generator=torch.Generator().manual_seed(4)) + 1) * 1e35
    got = _summary(x)
    assert got["mean"] == pytest.approx(x.double().mean().item(), rel=1e-5)
    assert got["std"] == pytest.approx(x.double().std(correction=0).item(), rel=1e-4)


def test_the_std_of_an_exploding_relu_stack_is_reported_layer_by_layer() -> None:
    """The init lab's ReLU net at normal(std 1.0): activations grow ~8x a layer, to ~1e25
    by the 8th. Each layer's std is reported (a float32 sum of squares overflowed past
    ~1e19 and left exactly the deepest layers' std None: the lab's std-against-depth
    chart broke where it mattered, and PoorInitialization compared shallower layers)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 128, generator=gen)
    for depth in range(28):
        x = torch.relu(x @ torch.randn(128, 128, generator=gen))
        got = _summary(x)
        ref = x.double()
        assert got["std"] == pytest.approx(ref.std(correction=0).item(), rel=1e-4), depth
        assert got["mean"] == pytest.approx(ref.mean().item(), rel=1e-5), depth
    assert x.max().item() > 1e22  # the test reached the range that overflowed


def test_a_constant_output_has_exactly_its_value_as_mean_and_no_spread() -> None:
    for value in (0.1, -7.3, 3e30):
        got = _summary(torch.full((1000,), value), torch.full((37,), value))
        assert got["mean"] == torch.tensor(value).item() and got["std"] == 0.0, value


def test_all_nonfinite_gives_no_moments() -> None:
    x = torch.tensor([float("nan"), float("inf")])
    got = _summary(x)
    assert got["mean"] is None and got["std"] is None and got["min"] is None
    assert (got["zero_frac"], got["nonfinite"]) == (0.0, 2.0)


def test_merging_calls_equals_the_statistics_of_all_values_together() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(300, generator=gen) * 2 + 1
    b = torch.randn(50, generator=gen) - 4
    b[3] = float("inf")
    c = torch.zeros(10)
    merged, together = _summary(a, b, c), _summary(torch.cat([a, b, c]))
    assert merged.keys() == together.keys()
    for key, value in merged.items():
        assert value == pytest.approx(together[key], rel=1e-5), key


def test_histogram_counts_match_numpy_on_the_same_edges() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=gen)
    lo, hi = x.min().double(), x.max().double()
    counts = stats.histograms(x[None], lo[None], hi[None], 64)[0]
    ref, _ = np.histogram(x.numpy(), bins=64, range=(lo.item(), hi.item()))
    assert counts.sum().item() == 5000
    assert counts.shape == (64,)
    assert counts.tolist() == ref.tolist()


def _just_below(x: np.ndarray) -> np.ndarray:
    return np.nextafter(x.astype(np.float32), np.float32(-np.inf))


def test_histogram_values_at_and_just_below_edges_land_in_numpys_bins() -> None:
    """Values at an edge and one float32 ulp below it land in np.histogram's bins (its
    edges: a float64 linspace rounded to float32). The bin was (x - lo) / width floored
    in float32: over [-1, 1] -1e-8 landed in the bin from 0 (1 - 1e-8 is 1 in float32),
    and over [0, 0.7] the value at edge 7 (0.48999998, below 0.49) in bin 6."""
    nan, inf = float("nan"), float("inf")
    # [-1, 1] in 64 bins: every edge k/32 - 1 is exact in float32
    edges = np.arange(65, dtype=np.float32) / 32 - 1
    tiny = np.array([-1e-8, 1e-8, -1e-20, 1e-20, -1e-30], dtype=np.float32)
    sym = np.concatenate([edges, _just_below(edges[1:]), tiny])
    # [0, 0.7] in 10 bins: numpy's edges are float64 k * 0.07 rounded to float32
    lo2, hi2 = np.float32(0.0), np.float32(0.7)
    edges2 = np.histogram_bin_edges(np.empty(0, np.float32), 10, (float(lo2), float(hi2)))
    assert (edges2 < np.linspace(0.0, float(hi2), 11)).sum() == 3  # rounded down: 0.21, ...
    odd = np.concatenate([edges2, _just_below(edges2[1:])])
    width = max(len(sym), len(odd)) + 3
    rows = torch.full((2, width), nan)
    rows[0, : len(sym)] = torch.from_numpy(sym)
    rows[1, : len(odd)] = torch.from_numpy(odd)
    rows[1, -3:] = torch.tensor([inf, -inf, nan])
    counts = stats.histograms(rows, torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.7]), 64)
    ref, _ = np.histogram(sym, bins=64, range=(-1.0, 1.0))
    assert counts[0].tolist() == ref.tolist()
    # by hand: bin k (k < 63) holds edge k and the value just below edge k + 1; the last
    # bin also holds 1.0; the tiny values sit either side of the edge at 0 (bin 32)
    by_hand = [2] * 64
    by_hand[63] = 3
    by_hand[31] += 3  # -1e-8, -1e-20, -1e-30
    by_hand[32] += 2  # 1e-8, 1e-20
    assert counts[0].tolist() == by_hand
    ref1, _ = np.histogram(odd, bins=64, range=(float(lo2), float(hi2)))
    assert counts[1].tolist() == ref1.tolist()
    counts2 = stats.histograms(rows[1:], torch.tensor([0.0]), torch.tensor([0.7]), 10)[0]
    ref2, _ = np.histogram(odd, bins=10, range=(float(lo2), float(hi2)))
    assert counts2.tolist() == ref2.tolist() == [2] * 9 + [3]
    assert counts2.sum().item() == len(odd)  # the NaN/Inf (and the padding) are left out


def test_histogram_of_bin_centres_is_exact_and_includes_hi() -> None:
    gen = torch.Generator().manual_seed(4)
    lo, hi, bins = -2.0, 6.0, 8
    which = torch.randint(0, bins, (1000,), generator=gen)
    x = torch.cat([lo + (which.float() + 0.5), torch.tensor([lo, hi, hi])])
    expected = torch.bincount(which, minlength=bins).float()
    expected[0] += 1  # lo itself
    expected[-1] += 2  # hi lands in the last, closed bin
    got = stats.histograms(x[None], torch.tensor([lo]), torch.tensor([hi]), bins)[0]
    assert torch.equal(got, expected)
    ref, _ = np.histogram(x.numpy(), bins=bins, range=(lo, hi))
    assert got.tolist() == ref.tolist()


def test_histograms_of_several_layers_and_degenerate_ranges() -> None:
    nan, inf = float("nan"), float("inf")
    samples = torch.tensor([[3.0, 3.0, 3.0, nan], [0.0, 1.0, inf, 2.0]])  # NaN pads row 0
    counts = stats.histograms(samples, torch.tensor([3.0, 0.0]), torch.tensor([3.0, 2.0]), 4)
    assert counts[0].tolist() == [3.0, 0.0, 0.0, 0.0]  # lo == hi: everything in bin 0
    assert counts[1].tolist() == [1.0, 0.0, 1.0, 1.0]  # the Inf is left out


def _inside(values: list[float], rule: stats.Rule) -> list[float]:
    x = torch.tensor(values)
    return stats.inside_indicator(x, x.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0), rule).tolist()


def test_a_declared_function_of_a_16_bit_output_is_tested_in_that_dtype() -> None:
    """Under autocast a Linear's output is bf16 and the tanh the user declared after it
    runs in bf16: tanh(2.65625) is 0.98828125 there (inside 0.99), 0.99019 in float32
    (saturated). The probe widened the output and took the float32 tanh, so it counted
    values the model's tanh did not saturate (and, in fp16, missed some it did)."""
    tanh = stats.FUNCTION_RULES["tanh"]
    assert tanh.for_dtype(torch.float32) is tanh
    bf16 = tanh.for_dtype(torch.bfloat16)
    assert bf16 is stats.FUNCTION_RULES["tanh"].for_dtype(torch.bfloat16)  # one object
    nan = float("nan")
    values = [2.65625, -2.65625, 2.640625, 3.0, -3.0, 0.0, nan]  # all exact in bf16
    # by hand, bf16 tanh: 0.98828125 (inside), 0.98828125, 0.98828125, 0.99609375 (out)
    assert _inside(values, bf16) == [-1, -1, -1, 0, 0, -1, -1]
    assert _inside(values, tanh) == [0, 0, -1, 0, 0, -1, -1]  # float32 tanh: 0.99019
    # fp16: tanh(2.646484375) is 0.990234375 (saturated), float32 0.98999667 (inside)
    fp16 = tanh.for_dtype(torch.float16)
    assert _inside([2.646484375, -2.646484375], fp16) == [0, 0]
    assert _inside([2.646484375, -2.646484375], tanh) == [-1, -1]
    # softsign, a composite of 16-bit ops: softsign(-100) is -0.98828125 in bf16
    softsign = stats.FUNCTION_RULES["softsign"].for_dtype(torch.bfloat16)
    assert _inside([-100.0, 100.0, 128.0], softsign) == [-1, -1, 0]
    # a stack of bf16 outputs: the saturated count is that of the model's own bf16 tanh
    gen = torch.Generator().manual_seed(3)
    y = (torch.randn(64, 256, generator=gen) * 3).to(torch.bfloat16)
    call = reduce.reduce_calls(y.float().reshape(1, -1), (64, 256, 1), bf16)
    assert call.minus_inside is not None
    saturated = y.numel() + call.minus_inside.sum().item()
    assert saturated == (torch.tanh(y).float().abs() >= 0.99).sum().item()


@pytest.mark.parametrize(
    ("ndim", "channel_first", "axis"),
    [(0, False, None), (1, False, 0), (2, False, 1), (3, False, 2), (3, True, 1), (4, False, 1),
     (5, False, 1)],
)  # fmt: skip
def test_unit_axis(ndim: int, channel_first: bool, axis: int | None) -> None:
    assert stats.unit_axis(ndim, channel_first) == axis


def test_unit_ratio_thresholds_are_the_named_constants() -> None:
    per_unit = torch.full((6,), 100.0)
    segments = torch.tensor([0, 0, 0, 0, 1, 1])
    units = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    live = torch.tensor([0.0, 100 * stats.DEAD_ACTIVITY_MAX, 2.0, 100.0, 50.0, 49.0])
    dead, _ = stats.unit_ratio(live, per_unit, segments, units, dead=True)
    assert dead[:2].tolist() == [0.5, 0.0] and math.isnan(dead[2].item())
    # inside counts: 50 of 100 outside is not a majority, 51 is
    inside = torch.tensor([100.0, 100.0, 0.0, 49.0, 50.0, 49.0])
    saturated, values = stats.unit_ratio(inside, per_unit, segments, units, dead=False)
    assert saturated[:2].tolist() == [0.5, 0.5]
    assert values[:2].tolist() == [100.0 + 51.0, 50.0 + 51.0]


@pytest.mark.parametrize(
    ("module", "live", "lo", "hi"),
    [
        (nn.ReLU(), 0.0, None, None),
        (nn.GELU(), 0.0, None, None),
        (nn.LeakyReLU(0.1), 0.0, None, None),
        (nn.Softplus(beta=2.0), math.log(2) / 2, None, None),
        (nn.Tanh(), None, -0.99, 0.99),
        (nn.Softsign(), None, -0.99, 0.99),
        (nn.Sigmoid(), None, 0.01, 0.99),
        (nn.Hardtanh(-2.0, 3.0), None, -2.0, 3.0),
        (nn.ReLU6(), 0.0, -math.inf, 6.0),  # off at 0 is dead_ratio's, not saturation
        (nn.Hardtanh(0.0, 1.0), 0.0, -math.inf, 1.0),
        (nn.Hardsigmoid(), None, 0.0, 1.0),
        (nn.Linear(2, 2), None, None, None),
    ],
)
def test_module_rules(
    module: nn.Module, live: float | None, lo: float | None, hi: float | None
) -> None:
    rule = stats.module_rule(module)
    assert (rule.live_above, rule.sat_lo, rule.sat_hi) == (live, lo, hi)


def test_norms_handles_mixed_dtypes_in_order() -> None:
    tensors = [torch.ones(4), torch.full((9,), 2.0, dtype=torch.bfloat16), torch.tensor([3.0, 4.0])]
    assert stats.norms(tensors, torch.device("cpu")).tolist() == [2.0, 6.0, 5.0]


def test_device_side_index_vectors() -> None:
    cpu = torch.device("cpu")
    assert stats.segment_ids([2, 0, 3], cpu).tolist() == [0, 0, 2, 2, 2]
    assert stats.device_vector([1.5, 2], cpu).tolist() == [1.5, 2.0]
    assert stats.device_vector([], cpu).numel() == 0


def test_decode_reads_a_host_tensor_and_its_list_alike() -> None:
    """The link passes decode its slice of the host tensor (histogram counts become ints
    in one conversion); a list of the same floats must decode to the same entries."""
    from layerscope.trainer.probes import Probes

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt, bins=16)
    probes.arm()
    x = torch.randn(32, 6)
    x[0, 0] = float("nan")  # a non-finite value flows through every layer's first row
    model(x).nan_to_num().square().mean().backward()
    opt.step()
    pending = probes.collect()
    assert pending is not None
    from_tensor = pending.decode(pending.tensor)
    from_list = pending.decode(pending.tensor.tolist())
    assert from_tensor == from_list
    counts = from_tensor[0][0]["hist"]["counts"]
    assert all(type(c) is int for c in counts) and sum(counts) == 32 * 8 - 8


class _Skips(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.skipped, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.a(x)))


def test_every_decoded_entry_has_every_key_once_in_one_order() -> None:
    """Each layer entry of a probe frame carries its name and every statistic key, None
    where it does not apply, in ENTRY_KEYS order: also a layer whose output was not
    recorded this step (only its weight norm is known)."""
    from layerscope.trainer.probes import Probes

    torch.manual_seed(2)
    model = _Skips()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes(model, opt)
    probes.arm()
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    pending = probes.collect()
    assert pending is not None
    layers, _ = pending.decode(pending.tensor)
    assert [layer["name"] for layer in layers] == ["a", "skipped", "out"]
    for layer in layers:
        assert list(layer) == ["name", *stats.ENTRY_KEYS], layer["name"]
    skipped = layers[1]
    assert skipped["weight_norm"] == pytest.approx(
        torch.cat([p.detach().reshape(-1) for p in model.skipped.parameters()]).norm().item(),
        rel=1e-5,
    )
    assert skipped["grad_norm"] is None and skipped["mean"] is None and skipped["hist"] is None
    assert layers[0]["grad_norm"] is not None and layers[0]["mean"] is not None
