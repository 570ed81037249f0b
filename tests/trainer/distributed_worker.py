"""One rank of a real multi-process run for tests/trainer/test_distributed.py.

``python distributed_worker.py SCENARIO OUT_DIR [SERVER]`` with RANK, WORLD_SIZE,
LS_STORE_FILE (the ranks' rendezvous: a FileStore, so no port is picked ahead of time that
another process could take before rank 0 binds it) and LS_PG_TIMEOUT_S (the process group's
timeout) in the environment. Initialises gloo, trains a small DDP model under watch() (rank 0 alone
gets the server and the run directory) and writes OUT_DIR/rank{R}.json with what
this rank saw; the distributed module's log goes to OUT_DIR/rank{R}.log.

The ranks meet in store barriers (a long timeout, like torchrun's rendezvous) before the
process group starts and again just before the first step: on a loaded machine one rank
can start seconds after the other (importing torch), and a collective would time out on
that skew alone instead of on what a test is about, the group's short timeout during training.

Scenarios:
* ``commands`` — rank 0 gets set_lr_scale, set_weight_decay, checkpoint, pause (held
  for 3x the timeout, with a step_once inside) and stop from a thread, through the
  same queue the link fills.
* ``hist`` — one probe step on a fixed exact-arithmetic batch, sharded by rank.
* ``forever`` — trains until killed (the test kills the other rank).
* ``extra_step`` — rank 1 calls w.step() twice at step ``EXTRA_STEP_AT`` (no DDP).
* ``straggler`` — ``STRAGGLER_STEPS`` steps, rank 1 ``STRAGGLER_S`` slower in each (no DDP:
  DDP's own all-reduce would hold the fast rank inside its step).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from layerscope.trainer import watch, wire  # watch first, so the package binds the function
from torch import nn
from torch.nn.parallel import DistributedDataParallel

HIST_BATCH = 15
EXTRA_STEP_AT = 5  # "extra_step": rank 1 calls w.step() twice at this step
STRAGGLER_STEPS = 10
STRAGGLER_S = 0.1  # "straggler": rank 1's extra time per step
STARTUP_TIMEOUT = datetime.timedelta(seconds=120)  # how far apart the ranks may start


def exact_model() -> nn.Sequential:
    """Weights on a 1/8 grid and inputs on a 1/4 grid: every product and sum is exact
    in float32, so a shard's activations equal the full batch's bit for bit."""
    gen = torch.Generator().manual_seed(3)
    first = nn.Linear(4, 6)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(6, 3), nn.Tanh())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-8, 9, p.shape, generator=gen).float() / 8)
        first.bias[0] = -100.0
        first.weight[1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        first.bias[1] = -2.875
    return model


def exact_batch() -> torch.Tensor:
    """HIST_BATCH rows (odd, so two shards differ in size). fc unit 0 never fires; unit 1
    fires only on the last row (x0 == 3), which is in the last shard: dead on rank 0's
    batch alone, alive on the global batch. Row 2 holds an Inf."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-12, 12, (HIST_BATCH, 4), generator=gen).float() / 4
    x[-1, 0] = 3.0
    x[2, 3] = math.inf  # non-finite values on rank 0 only: left out of moments and bins
    return x


def command(name: str, cmd_seq: int, **args: Any) -> dict[str, Any]:
    return wire.validate_command_frame({"name": name, "args": args, "cmd_seq": cmd_seq})


def wait_for(cond: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("worker: condition not met")
        time.sleep(0.01)


def steer(w: Any, pause_s: float, record: dict[str, Any]) -> None:
    """Rank 0's 'dashboard': commands at known steps through the link's queue."""
    wait_for(lambda: w.step_count >= 2)
    w.control.submit(command("set_lr_scale", 1, value=0.5))
    wait_for(lambda: w.step_count >= 4)
    w.control.submit(command("set_weight_decay", 2, enabled=False))
    w.control.submit(command("checkpoint", 3))
    wait_for(lambda: w.step_count >= 6)
    w.control.submit(command("pause", 4))
    wait_for(lambda: w.control.paused)
    paused_at = time.monotonic()
    steps = w.step_count
    w.control.submit(command("step_once", 5))
    wait_for(lambda: w.step_count == steps + 1 and w.control.paused)
    left = pause_s - (time.monotonic() - paused_at)
    time.sleep(max(0.0, left))
    record["paused_s"] = time.monotonic() - paused_at
    w.control.submit(command("resume", 6))
    wait_for(lambda: w.step_count >= steps + 4)
    w.control.submit(command("stop", 7))


def meet(store: dist.Store, name: str) -> None:
    """Every rank gets here before any leaves: a store barrier with the startup timeout."""
    world = int(os.environ["WORLD_SIZE"])
    store.set(f"{name}/{os.environ['RANK']}", "1")
    store.wait([f"{name}/{r}" for r in range(world)], STARTUP_TIMEOUT)


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    server = sys.argv[3] if len(sys.argv) > 3 else ""
    timeout = datetime.timedelta(seconds=float(os.environ["LS_PG_TIMEOUT_S"]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.FileStore(os.environ["LS_STORE_FILE"], world)
    store.set_timeout(STARTUP_TIMEOUT)
    meet(store, "init")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    logging.basicConfig(
        filename=out / f"rank{rank}.log", level=logging.INFO, format="%(name)s %(message)s"
    )
    record: dict[str, Any] = {"rank": rank, "steps": []}
    try:
        if scenario == "hist":
            run_hist(rank, out, record, store)
        else:
            run_training(scenario, rank, out, server, timeout.total_seconds(), record, store)
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


def run_hist(rank: int, out: Path, record: dict[str, Any], store: dist.Store) -> None:
    model = exact_model()
    x = exact_batch().tensor_split(dist.get_world_size())[rank]
    with watch(model, every=1, server="", run_dir=out / f"run{rank}", rules=False) as w:
        meet(store, "steps")
        with torch.no_grad():
            model(x)
        w.step()
    record["run_dir"] = str(w.run_dir)


def run_training(
    scenario: str,
    rank: int,
    out: Path,
    server: str,
    timeout_s: float,
    record: dict[str, Any],
    store: dist.Store,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    meet(store, "ddp")  # DDP's constructor is a collective
    # "extra_step" trains each rank's replica alone: DDP's collectives then never meet the
    # per-step exchange, as under NCCL, where the exchange has a gloo group of its own
    alone = scenario in ("extra_step", "straggler")
    ddp = model if alone else DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    run_dir = out / "run" if rank == 0 else out / f"run{rank}"
    w = watch(
        model, opt, run="dist-test", run_id=os.environ.get("LS_RUN_ID"), server=server,
        every=3, batch_size=8, run_dir=run_dir, rules=False,
    )  # fmt: skip
    with w:
        meet(store, "steps")  # rank 0's watch() also opened its link and spool
        steering = None
        if scenario == "commands" and rank == 0:
            steering = threading.Thread(target=steer, args=(w, 3 * timeout_s, record), daemon=True)
            steering.start()
        steps = {"forever": 10_000, "extra_step": 10, "straggler": STRAGGLER_STEPS}.get(
            scenario, 2_000
        )
        for _ in range(steps):  # "stop" ends the "commands" run
            x, y = torch.randn(8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if scenario == "straggler" and rank == 1:
                time.sleep(STRAGGLER_S)  # rank 0 waits for it in w.step()'s exchange
            w.step(loss=loss.detach())
            if scenario == "extra_step" and rank == 1 and w.step_count == EXTRA_STEP_AT:
                w.step(loss=loss.detach())  # a loop bug: one more w.step() on this rank only
            record["steps"].append(
                [w.step_count, w.control.used_lr[0], w.control.used_weight_decay[0]]
            )
            time.sleep(0.02)  # commands and kills land mid-run, not after it
            if w.should_stop:
                break
    record["state"] = w.control_state
    record["params"] = [p.detach().tolist() for p in model.parameters()]
    record["run_dir"] = str(w.run_dir)


if __name__ == "__main__":
    sys.exit(main())
