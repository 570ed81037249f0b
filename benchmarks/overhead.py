"""overhead — what probes cost a training loop (DESIGN §3 cost rules).

Owns: the reference workloads (MLP 64-256x4-10 ReLU and a 10-layer tanh MLP on
sklearn's load_digits, a small CNN on the digits as 1x8x8), and a side-by-side
measurement, in one process, of a plain loop against the same loop with probes
armed every DEFAULT_EVERY (100) / 10 / 1 steps, with ``watch()`` (spool only) every
100 and 10, and with peer tools every 10 when installed. Prints a table; asserts nothing (a noisy machine
must not fail a build; the targets are printed next to the numbers).

Never: downloads anything, talks to a server, or calls ``.item()`` in a timed loop.

How it measures: variants are run in interleaved blocks of BLOCK steps (variant A
block 1, B block 1, ..., A block 2, ...) so that machine noise hits every variant
alike. A block's time per step includes its probe steps; the table shows the
median over blocks of that mean, and the median over rounds of the ratio to the
baseline's block in the same round. A probe step's own cost is (every-step ratio
- 1) training steps. The same ratios are printed from the process's CPU time per block
(every thread, so watch's link thread counts), which other processes' load does not
inflate: on a shared machine read those; the targets are the wall-clock ones, on an
idle machine. Memory: on CUDA, the peak of
``torch.cuda.max_memory_allocated`` over a block, probes every step vs baseline;
on CPU torch has no allocator peak (tracemalloc does not see torch's allocations),
so each variant runs in a fresh subprocess whose resident set size is sampled after
every training step (coarse: it includes the interpreter and libraries, ~300 MB).

    .venv/bin/python benchmarks/overhead.py            # full
    .venv/bin/python benchmarks/overhead.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from layerscope.trainer.link import encode
from layerscope.trainer.probes import Probes
from layerscope.trainer.watch import DEFAULT_EVERY
from sklearn.datasets import load_digits
from torch import nn

BATCH = 64
BLOCK = DEFAULT_EVERY  # steps per block: one probe step per block at the default cadence


def workloads() -> dict[str, Callable[[], nn.Module]]:
    def mlp_relu() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(64, 256), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(256, 256), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(256, 10))

    def mlp_tanh10() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(64, 128), nn.Tanh()]
        for _ in range(8):
            layers += [nn.Linear(128, 128), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(128, 10))

    def cnn() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    return {"mlp-relu 64-256x4-10": mlp_relu, "mlp-tanh 10 layers": mlp_tanh10, "cnn 1x8x8": cnn}


def batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order].to(device), y[order].to(device)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x) - BATCH + 1, BATCH)]


class Variant:
    """One way of running the loop; ``run(n)`` does n more steps and keeps its step count."""

    def __init__(self, name: str, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]):
        self.name = name
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.data = data
        self.step = 0

    def before(self, step: int) -> None:
        pass

    def after(self, step: int, loss: torch.Tensor) -> None:
        pass

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step += 1
            x, y = self.data[self.step % len(self.data)]
            self.before(self.step)
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.after(self.step, loss)

    def close(self) -> None:
        pass


class ProbesVariant(Variant):
    """Probes driven the way watch() drives them: arm before a probe step, collect after
    optimizer.step(), one concatenation with the step's loss, one host copy, decode, encode."""

    def __init__(self, name: str, model: nn.Module, data: Any, every: int) -> None:
        super().__init__(name, model, data)
        self.every = every
        self.probes = Probes(model, self.opt)
        self.frames = 0

    def before(self, step: int) -> None:
        if step % self.every == 0:
            self.probes.arm()

    def after(self, step: int, loss: torch.Tensor) -> None:
        if step % self.every:
            return
        pending = self.probes.collect()
        assert pending is not None
        flat = torch.cat([pending.tensor, loss.detach().reshape(1).float()])
        host = flat.to("cpu", non_blocking=flat.is_cuda)
        if flat.is_cuda:
            torch.cuda.current_stream().synchronize()  # watch waits on an event in its link thread
        layers, scalars = pending.decode(host[:-1])
        encode({"type": "probe", "seq": step, "step": step, "layers": layers})
        self.frames += 1

    def close(self) -> None:
        self.probes.close()


class WatchVariant(Variant):
    def __init__(self, name: str, model: nn.Module, data: Any, every: int, run_dir: str) -> None:
        super().__init__(name, model, data)
        from layerscope.trainer.watch import watch

        self.w = watch(model, self.opt, server="", every=every, run_dir=run_dir, run=name)

    def after(self, step: int, loss: torch.Tensor) -> None:
        self.w.step(loss=loss)

    def close(self) -> None:
        self.w.close()


PEER_EVERY = 10  # the peers log at the cadence the target compares against


class PeerVariant(Variant):
    """A peer tool: keeps each layer's output on every PEER_EVERY-th step for logging."""

    def __init__(self, name: str, model: nn.Module, data: Any) -> None:
        super().__init__(name, model, data)
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [
            m.register_forward_hook(self._keep(n))
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d | nn.ReLU | nn.Tanh)
        ]

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if self.step % PEER_EVERY == 0:
                self.outputs[name] = out.detach()

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class TensorBoardVariant(PeerVariant):
    """Peer: SummaryWriter.add_histogram of every activation and gradient every 10 steps."""

    def __init__(self, name: str, model: nn.Module, data: Any, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(name, model, data)
        self.writer = SummaryWriter(log_dir)

    def after(self, step: int, loss: torch.Tensor) -> None:
        if step % PEER_EVERY:
            return
        for name, out in self.outputs.items():
            self.writer.add_histogram(f"act/{name}", out, step)
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                self.writer.add_histogram(f"grad/{name}", p.grad, step)
        self.outputs.clear()

    def close(self) -> None:
        super().close()
        self.writer.close()


class WandbVariant(PeerVariant):
    """Peer: wandb.watch(log="all", log_freq=10) plus activation histograms every 10 steps,
    offline (no login, nothing leaves the machine)."""

    def __init__(self, name: str, model: nn.Module, data: Any, log_dir: str) -> None:
        import wandb

        super().__init__(name, model, data)
        self.wandb = wandb
        self.wb_run = wandb.init(mode="offline", dir=log_dir, project="layerscope-bench")
        wandb.watch(model, log="all", log_freq=PEER_EVERY)

    def after(self, step: int, loss: torch.Tensor) -> None:
        if step % PEER_EVERY:
            return
        hists = {
            f"act/{n}": self.wandb.Histogram(np_histogram=np.histogram(o.cpu().numpy(), bins=64))
            for n, o in self.outputs.items()
        }
        self.wandb.log(hists)
        self.outputs.clear()

    def close(self) -> None:
        super().close()
        self.wandb.unwatch(self.model)
        self.wb_run.finish()


class AimVariant(PeerVariant):
    """Peer: Aim's ``Distribution`` of every activation and gradient every 10 steps, into a
    local repo (system-metric tracking and terminal capture off, nothing leaves the machine)."""

    def __init__(self, name: str, model: nn.Module, data: Any, repo: str) -> None:
        from aim import Distribution, Run

        super().__init__(name, model, data)
        self.distribution = Distribution
        self.aim_run: Any = Run(
            repo=repo,
            experiment="layerscope-bench",
            system_tracking_interval=None,
            log_system_params=False,
            capture_terminal_logs=False,
        )

    def after(self, step: int, loss: torch.Tensor) -> None:
        if step % PEER_EVERY:
            return
        for name, out in self.outputs.items():
            values = out.float().cpu().numpy().ravel()
            self.aim_run.track(
                self.distribution(values, bin_count=64), name=f"act/{name}", step=step
            )
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                values = p.grad.float().cpu().numpy().ravel()
                self.aim_run.track(
                    self.distribution(values, bin_count=64), name=f"grad/{name}", step=step
                )
        self.outputs.clear()

    def close(self) -> None:
        super().close()
        self.aim_run.close()
        # Aim's storage flushes in finalizers: let them run now, while the repo exists.
        self.aim_run = None
        gc.collect()


def make_variants(
    build: Callable[[], nn.Module], data: Any, device: torch.device, tmp: str, peers: bool
) -> list[Variant]:
    torch.manual_seed(0)
    base = build().to(device)
    fresh = lambda: copy.deepcopy(base)  # noqa: E731 - same initial weights everywhere
    out: list[Variant] = [Variant("baseline", fresh(), data)]
    out.append(ProbesVariant(f"probes every {DEFAULT_EVERY}", fresh(), data, DEFAULT_EVERY))
    out.append(ProbesVariant("probes every 10", fresh(), data, 10))
    out.append(ProbesVariant("probes every step", fresh(), data, 1))
    try:
        for every in (DEFAULT_EVERY, 10):
            out.append(
                WatchVariant(f"watch every {every}", fresh(), data, every, f"{tmp}/w{every}")
            )
    except ImportError as exc:
        print(f"watch: not importable ({exc})")
    if peers:
        with contextlib.suppress(ImportError):  # reported once by report_peers()
            out.append(TensorBoardVariant("tensorboard every 10", fresh(), data, f"{tmp}/tb"))
        with contextlib.suppress(ImportError):
            out.append(WandbVariant("wandb every 10", fresh(), data, f"{tmp}/wandb"))
        with contextlib.suppress(ImportError):
            out.append(AimVariant("aim every 10", fresh(), data, f"{tmp}/aim"))
    return out


def report_peers() -> None:
    for peer, module in (
        ("tensorboard", "torch.utils.tensorboard"),
        ("wandb", "wandb"),
        ("aim", "aim"),
    ):
        try:
            __import__(module)
            print(f"{peer}: installed")
        except ImportError:
            print(f"{peer}: not installed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


Row = tuple[str, str, float, float, float]  # workload, variant, ms/step, x baseline (wall, CPU)


def time_workload(
    name: str, build: Callable[[], nn.Module], steps: int, device: torch.device, peers: bool
) -> list[Row]:
    data = batches(device)
    with tempfile.TemporaryDirectory() as tmp:
        variants = make_variants(build, data, device, tmp, peers)
        for v in variants:  # warm-up: allocator, first-probe-step caches
            v.run(BLOCK)
        sync(device)
        per_block: dict[str, list[float]] = {v.name: [] for v in variants}
        cpu_block: dict[str, list[float]] = {v.name: [] for v in variants}
        for _ in range(max(1, steps // BLOCK)):
            for v in variants:
                t0, c0 = time.perf_counter(), time.process_time()
                v.run(BLOCK)
                sync(device)
                per_block[v.name].append((time.perf_counter() - t0) / BLOCK)
                cpu_block[v.name].append((time.process_time() - c0) / BLOCK)
        for v in variants:
            v.close()
    # Ratio: the median over rounds of (this variant's block / the baseline's block in
    # the same round), so load that drifts between rounds cancels.
    # The CPU ratio uses the process's CPU time (every thread, watch's link thread and the
    # peers' writer threads included): other processes' load does not inflate it, so on a
    # busy machine it is the steadier figure; on an idle one the wall ratio is the target.
    base, cpu_base = per_block["baseline"], cpu_block["baseline"]
    rows = []
    for v in variants:
        ratios = [t / b for t, b in zip(per_block[v.name], base, strict=True)]
        cpu = [t / b for t, b in zip(cpu_block[v.name], cpu_base, strict=True)]
        med = statistics.median(per_block[v.name])
        rows.append((name, v.name, med * 1e3, statistics.median(ratios), statistics.median(cpu)))
    return rows


def peak_memory(workload: str, variant: str, steps: int, device: str) -> float:
    """Peak bytes for one variant: CUDA allocator peak, or ru_maxrss of a fresh process."""
    if device == "cuda":
        dev = torch.device("cuda")
        build = workloads()[workload]
        data = batches(dev)
        torch.manual_seed(0)
        model = build().to(dev)
        v: Variant = (
            Variant(variant, model, data)
            if variant == "baseline"
            else ProbesVariant(variant, model, data, 1)
        )
        v.run(2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        v.run(steps)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        v.close()
        return float(peak)
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", workload, variant, str(steps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout)["peak"])


def memory_child(workload: str, variant: str, steps: int) -> None:
    """Peak RSS over the training steps only (sampled after every step): the import-time
    peak of torch and sklearn would otherwise hide everything."""
    import psutil

    torch.set_num_threads(1)
    dev = torch.device("cpu")
    data = batches(dev)
    torch.manual_seed(0)
    model = workloads()[workload]().to(dev)
    v: Variant = (
        Variant(variant, model, data)
        if variant == "baseline"
        else ProbesVariant(variant, model, data, 1)
    )
    process = psutil.Process()
    peak = 0
    for _ in range(steps):
        v.run(1)
        peak = max(peak, process.memory_info().rss)
    print(json.dumps({"peak": peak}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per variant")
    parser.add_argument("--quick", action="store_true", help="300 steps, for a quick look")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peers", action="store_true", help="skip peer tools")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        workload, variant, steps = args.memory_child
        memory_child(workload, variant, int(steps))
        return
    torch.set_num_threads(1)
    steps = 300 if args.quick else args.steps
    quick = args.quick
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads 1, batch {BATCH}, "
          f"{steps} timed steps per variant in blocks of {BLOCK}")  # fmt: skip
    if not args.no_peers:
        report_peers()
    rows: list[Row] = []
    print(f"load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for name, build in workloads().items():
        rows += time_workload(name, build, steps, device, peers=not args.no_peers)
    print()
    print(f"{'workload':<22} {'variant':<22} {'ms/step':>9} {'x baseline':>11} {'x (CPU)':>8}")
    for workload, variant, ms, ratio, cpu in rows:
        print(f"{workload:<22} {variant:<22} {ms:>9.3f} {ratio:>11.3f} {cpu:>8.3f}")
    print()
    print("probe step's own cost (every-step ratio - 1; target: well under one step):")
    for workload in workloads():
        by = {v: (ms, ratio, cpu) for w, v, ms, ratio, cpu in rows if w == workload}
        extra = by["probes every step"][1] - 1.0
        ms = extra * by["baseline"][0]
        cpu_extra = by["probes every step"][2] - 1.0
        cpu_note = f" (CPU time: {cpu_extra:.2f})" if device.type == "cpu" else ""
        print(f"  {workload:<22} {ms:7.3f} ms = {extra:.2f} of a training step{cpu_note}")
    print()
    report_targets(rows, "wall-clock ratio to baseline: the target", 3)
    if device.type == "cpu":
        report_targets(rows, "CPU-time ratio to baseline: steadier under other load", 4)
    else:  # the process's CPU time there counts CUDA's own threads and synchronize's spin
        print("(CPU-time ratios are not a measure on a GPU: the x (CPU) column is left as "
              "measured and no target is read from it)")  # fmt: skip
    print()
    mem_steps = 20 if quick else 50
    print(f"peak memory, probes every step vs baseline ({mem_steps} steps; "
          f"{'CUDA allocator peak' if device.type == 'cuda' else 'peak RSS of a fresh process'}; "
          "target: <= +5%):")  # fmt: skip
    for workload in workloads():
        base = peak_memory(workload, "baseline", mem_steps, device.type)
        probed = peak_memory(workload, "probes every step", mem_steps, device.type)
        print(f"  {workload:<22} baseline {base / 2**20:8.2f} MiB  probes {probed / 2**20:8.2f} MiB"
              f"  added {(probed - base) / 2**20:+7.2f} MiB ({(probed / base - 1) * 100:+.1f}%)")  # fmt: skip
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


TARGETS = ((f"probes every {DEFAULT_EVERY}", 1.03), (f"watch every {DEFAULT_EVERY}", 1.03),
           ("probes every 10", 1.08), ("watch every 10", 1.08))  # fmt: skip


def report_targets(rows: list[Row], title: str, column: int) -> None:
    """Each ratio target per workload, and layerscope's added time every 10 steps over
    the cheapest peer's (target <= 1/3), with met / NOT MET, from one ratio column."""
    print(f"targets, {title}:")
    for workload in workloads():
        by = {row[1]: float(row[column]) for row in rows if row[0] == workload}
        cells = []
        for variant, limit in TARGETS:
            if variant in by:
                verdict = "met" if by[variant] <= limit else "NOT MET"
                cells.append(f"{variant} {by[variant]:.3f} <= {limit} {verdict}")
        print(f"  {workload:<22} " + "; ".join(cells))
        peers = [by[v] - 1.0 for v in by if v.startswith(("tensorboard", "wandb", "aim"))]
        if peers and min(peers) > 0:
            cheapest = min(peers)
            for ours in ("probes every 10", "watch every 10"):
                share = (by[ours] - 1.0) / cheapest
                verdict = "met" if share <= 1 / 3 else "NOT MET"
                print(f"  {'':<22} {ours} added / cheapest peer added = {share:.2f} "
                      f"(<= 0.33: {verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
