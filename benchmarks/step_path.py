"""step_path — what ``watch()`` costs a training loop on the steps that are not probe steps.

Owns: a side-by-side measurement, in one process, of a plain loop against the same loop
with (a) only the optimizer step hooks that ``watch()`` registers (``Control``'s and
``Probes``'s, no forward hooks: none exist between probe steps), (b) ``watch(every=0)``
(no probe step at all: ``w.step()``, the flushes, the link thread and the spool), and
(c) the same with the alert rules off. overhead.py's default-cadence figure is this cost
plus one probe step per 100; this script isolates the first part and says where it goes:
per variant the median wall time per step (blocks of BLOCK steps, interleaved, the
ratio to the plain loop's block in the same round) and, per step, the training thread's
time in forward+backward, in ``optimizer.step()`` and in ``w.step()`` (on CUDA these are
launch times: the loop synchronizes once per block).

Never: asserts a target (a noisy machine must not fail a build), downloads anything,
talks to a server.

    .venv/bin/python benchmarks/step_path.py [--device cuda] [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from layerscope.trainer.control import Control
from layerscope.trainer.probes import Probes
from layerscope.trainer.watch import watch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import batches, workloads  # noqa: E402  (a sibling script, not a package)

BLOCK = 100


class Loop:
    def __init__(self, name: str, make: Any, data: Any, device: torch.device, run_dir: str):
        torch.manual_seed(0)
        self.model = make().to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.data = data
        self.step = 0
        self.phases: dict[str, list[float]] = {"fwd+bwd": [], "opt": [], "w.step": []}
        self.w = None
        self.extras: list[Any] = []
        if name == "hooks":
            self.extras = [Control(self.model, self.opt), Probes(self.model, self.opt)]
        elif name.startswith("watch"):
            self.w = watch(
                self.model, self.opt, server="", every=0, run_dir=run_dir, run=name,
                rules=name != "watch-no-rules",
            )  # fmt: skip

    def run(self, n: int) -> None:
        clock = time.perf_counter
        fb, op, ws = self.phases["fwd+bwd"], self.phases["opt"], self.phases["w.step"]
        for _ in range(n):
            self.step += 1
            x, y = self.data[self.step % len(self.data)]
            t0 = clock()
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = clock()
            self.opt.step()
            t2 = clock()
            if self.w is not None:
                self.w.step(loss=loss)
            t3 = clock()
            fb.append(t1 - t0)
            op.append(t2 - t1)
            ws.append(t3 - t2)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
        for extra in self.extras:
            extra.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", default="mlp-relu", help="a workloads() name prefix")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    data = batches(device)
    name, make = next((k, v) for k, v in workloads().items() if k.startswith(args.workload))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"# step_path: {name} on {device}, {args.steps} steps per variant, blocks of {BLOCK}")
    with tempfile.TemporaryDirectory() as run_dir:
        loops = {
            v: Loop(v, make, data, device, run_dir)
            for v in ("plain", "hooks", "watch", "watch-no-rules")
        }
        for loop in loops.values():  # warm-up
            loop.run(BLOCK)
        sync()
        for loop in loops.values():
            for phase in loop.phases.values():
                phase.clear()
        blocks: dict[str, list[float]] = {v: [] for v in loops}
        for _ in range(max(1, args.steps // BLOCK)):
            for v, loop in loops.items():
                sync()
                t = time.perf_counter()
                loop.run(BLOCK)
                sync()
                blocks[v].append((time.perf_counter() - t) / BLOCK)
        for loop in loops.values():
            loop.close()
    plain = blocks["plain"]
    print(
        f"{'variant':16s} {'ms/step':>8s} {'ratio':>6s}   median per step (us): fwd+bwd   opt  w.step"
    )
    for v, times in blocks.items():
        ratio = statistics.median(t / p for t, p in zip(times, plain, strict=True))
        ph = {k: statistics.median(x) * 1e6 for k, x in loops[v].phases.items()}
        print(
            f"{v:16s} {statistics.median(times) * 1e3:8.3f} {ratio:6.3f}"
            f"   {ph['fwd+bwd']:29.1f} {ph['opt']:5.1f} {ph['w.step']:7.1f}"
        )


if __name__ == "__main__":
    main()
