"""Multi-rank runs (trainer/distributed.py): real processes, gloo, 2 ranks.

Each test starts ``distributed_worker.py`` once per rank with the env:// rendezvous
variables torchrun would set; the workers write what they saw to json and log files.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from layerscope.trainer import watch, wire
from layerscope.trainer.distributed import Distributed
from layerscope.trainer.probes import Probes
from layerscope.trainer.spool import read_spool

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "server"))

from distributed_worker import exact_batch, exact_model  # noqa: E402

WORLD = 2


def launch(
    scenario: str, out: Path, *, timeout_s: float, server: str = "", run_id: str = ""
) -> list[subprocess.Popen[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LS_STORE_FILE=str(out / "store"),  # a port found free could be taken by then
            LS_PG_TIMEOUT_S=str(timeout_s),
            LS_RUN_ID=run_id,
        )
        args = [sys.executable, str(WORKER), scenario, str(out)] + ([server] if server else [])
        with open(out / f"rank{rank}.err", "wb") as log:  # the child keeps its own copy
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=log))
    return procs


def finish(procs: list[subprocess.Popen[bytes]], out: Path, timeout_s: float = 240) -> list[int]:
    """Exit codes; the bound is generous because two ranks importing torch on a loaded
    2-core machine took more than a minute to start."""
    deadline = time.monotonic() + timeout_s
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def errors(out: Path) -> str:
    return "\n".join(
        f"--- rank {r}\n" + (out / f"rank{r}.err").read_text()[-3000:] for r in range(WORLD)
    )


def applied(out: Path, rank: int) -> list[tuple[str, str, int]]:
    """(command, cmd_seq, step) from the rank's log lines."""
    text = (out / f"rank{rank}.log").read_text()
    found = re.findall(r"rank \d+: (?:applied )?(\w+) \(cmd_seq (\d+)\) at step (\d+)", text)
    return [(name, seq, int(step)) for name, seq, step in found]


@pytest.mark.slow
def test_every_rank_applies_every_command_at_the_same_step_and_a_long_pause_holds(
    tmp_path: Path,
) -> None:
    """set_lr_scale, set_weight_decay, checkpoint, pause (3x the process group's 4 s
    timeout, with a step_once inside), resume, stop: same step on both ranks, the same
    lr and weight decay afterwards, identical weights, one checkpoint, no timeout.
    (Start-up skew no longer counts against it: the worker's ranks meet in store barriers
    with a long timeout before the group, DDP and the first step. 4 s leaves a loaded
    machine room between two training steps.)"""
    out = tmp_path / "out"
    procs = launch("commands", out, timeout_s=4.0)
    assert finish(procs, out) == [0, 0], errors(out)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    zero, one = applied(out, 0), applied(out, 1)
    names = [name for name, _, _ in zero]
    assert names == [
        "set_lr_scale", "set_weight_decay", "checkpoint", "pause", "step_once", "resume", "stop",
    ]  # fmt: skip
    assert one == zero
    assert records[0]["paused_s"] >= 12.0  # 3x the timeout, and nobody timed out
    assert records[0]["steps"] == records[1]["steps"]  # (step, lr used, weight decay used)
    last_step, lr, weight_decay = records[0]["steps"][-1]
    assert (lr, weight_decay) == (pytest.approx(0.05), 0.0)
    assert last_step == dict((n, s) for n, _, s in zero)["stop"]
    assert records[0]["params"] == records[1]["params"]
    assert records[0]["state"] == records[1]["state"]
    run0 = Path(records[0]["run_dir"])
    assert [p.name for p in run0.glob("checkpoint-*.pt")] == [
        f"checkpoint-{dict((n, s) for n, _, s in zero)['checkpoint']}.pt"
    ]
    assert not list(Path(records[1]["run_dir"]).glob("checkpoint-*.pt"))
    assert not (Path(records[1]["run_dir"]) / "spool.bin").exists()  # rank 0 alone records

    frames = [json.loads(r) for r in read_spool(run0 / "spool.bin")][1:]
    results = [f["data"] for f in frames if f["type"] == "event" and f["kind"] == "command_result"]
    assert [(r["name"], r["applied_at_step"]) for r in results] == [(n, s) for n, _, s in zero]
    rows = [row for f in frames if f["type"] == "metrics" for row in f["rows"]]
    trained = [row["values"] for row in rows if "loss" in row["values"]]
    assert all(
        v["step_time_s/rank0"] >= 0 and v["step_time_s/rank1"] >= 0 and v["samples_per_s/rank1"]
        for v in trained
    )
    statuses = [
        f["data"]["status"] for f in frames if f["type"] == "event" and f["kind"] == "status"
    ]
    assert statuses == ["running", "paused", "running", "stopped"]


@pytest.mark.slow
def test_histogram_reduced_over_two_ranks_equals_the_single_process_histogram(
    tmp_path: Path,
) -> None:
    """Shards of 8 and 7 rows, an Inf in rank 0's. fc unit 1 fires only in rank 1's
    shard, so rank 0 alone would call it dead: the reduced dead_ratio is the global batch's."""
    out = tmp_path / "out"
    assert finish(launch("hist", out, timeout_s=10.0), out) == [0, 0], errors(out)
    run0 = Path(json.loads((out / "rank0.json").read_text())["run_dir"])
    probe = next(f for f in map(json.loads, read_spool(run0 / "spool.bin")) if f["type"] == "probe")

    model = exact_model()
    probes = Probes(model)
    probes.arm()
    with torch.no_grad():
        model(exact_batch())
    pending = probes.collect()
    assert pending is not None
    single, _ = pending.decode(pending.tensor)
    probes.close()

    assert [layer["name"] for layer in probe["layers"]] == [layer["name"] for layer in single]
    for got, want in zip(probe["layers"], single, strict=True):
        assert got["hist"] == want["hist"], got["name"]
        for key in ("min", "max", "zero_frac", "nonfinite", "dead_ratio", "saturated_ratio"):
            assert got[key] == want[key], (got["name"], key)
        for key in ("mean", "std", "saturated_frac", "unit_spread"):
            if want[key] is None:
                assert got[key] is None, (got["name"], key)
            else:
                # float32 sums over other partitions of the batch: rounding, no more
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (got["name"], key)
    assert single[0]["dead_ratio"] == pytest.approx(1 / 6)  # unit 0 only; unit 1 lives on rank 1
    assert single[0]["nonfinite"] == 6  # the Inf row, counted once over both ranks


@pytest.mark.slow
def test_killing_one_rank_turns_the_run_failed_on_the_dashboard(tmp_path: Path) -> None:
    from server_harness import exported, make_settings, running_server, wait_status

    run_id = "dist-kill"
    with running_server(make_settings(tmp_path / "data")) as server:
        out = tmp_path / "out"
        procs = launch(
            "forever", out, timeout_s=6.0, server=server.ws("/ws/trainer"), run_id=run_id
        )
        try:
            deadline = time.monotonic() + 240  # both ranks start (import torch) first
            while not any(f["type"] == "probe" for f in _exported_or_empty(server, run_id)):
                assert time.monotonic() < deadline, errors(out)
                assert procs[0].poll() is None and procs[1].poll() is None, errors(out)
                time.sleep(0.1)
            procs[1].send_signal(signal.SIGKILL)
            assert procs[0].wait(30) != 0  # rank 0 ends instead of hanging
        finally:
            codes = finish(procs, out, timeout_s=5)
        assert codes[1] == -signal.SIGKILL
        asyncio.run(wait_status(server, run_id, "failed", timeout=15))
        frames = exported(server, run_id)
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        events = [f for f in frames if f["type"] == "event" and f["kind"] == "status"]
        assert [f["data"]["status"] for f in events] == ["running", "failed"]


@pytest.mark.slow
def test_one_extra_w_step_on_one_rank_stops_every_rank_naming_it_and_the_step(
    tmp_path: Path,
) -> None:
    """Rank 1 calls w.step() twice at step 5 (a loop bug). Its w.step() calls then paired
    with rank 0's of the next training step: the run went on out of step and failed later
    in a collective (or hung at its end) without naming the cause. The per-step exchange
    carries each rank's optimizer.step() count, so both ranks stop at step 6 with one
    message naming rank 1."""
    from distributed_worker import EXTRA_STEP_AT

    out = tmp_path / "out"
    codes = finish(launch("extra_step", out, timeout_s=10.0), out, timeout_s=120)
    assert codes == [1, 1], errors(out)
    want = (
        f"StepMismatch: layerscope: at step {EXTRA_STEP_AT + 1}, rank 1 called w.step() "
        "without an optimizer.step() since its previous w.step(), while rank 0 made 1"
    )
    for rank in range(WORLD):
        assert want in (out / f"rank{rank}.err").read_text(), errors(out)


@pytest.mark.slow
def test_a_slow_rank_stands_out_and_samples_per_s_is_the_global_rate(tmp_path: Path) -> None:
    """Rank 1 takes STRAGGLER_S longer each step. Rank 0 waits for it in w.step()'s
    exchange, and that wait counted in rank 0's step time: both ranks read as slow and
    slowest_rank flipped at random. Each rank's time now leaves out that wait, while
    step_time_s stays the wall step time. samples_per_s was rank 0's batch alone: now
    every rank's, summed."""
    from distributed_worker import STRAGGLER_S

    out = tmp_path / "out"
    assert finish(launch("straggler", out, timeout_s=20.0), out) == [0, 0], errors(out)
    frames = [json.loads(r) for r in read_spool(out / "run" / "spool.bin")]
    rows = [row["values"] for f in frames if f["type"] == "metrics" for row in f["rows"]]
    trained = [v for v in rows if "loss" in v][1:]  # step 1's time includes the start-up
    assert len(trained) >= 8
    fast = sorted(v["step_time_s/rank0"] for v in trained)[len(trained) // 2]
    slow = sorted(v["step_time_s/rank1"] for v in trained)[len(trained) // 2]
    wall = sorted(v["step_time_s"] for v in trained)[len(trained) // 2]
    assert slow - fast > STRAGGLER_S / 2, (fast, slow)
    assert wall > fast + STRAGGLER_S / 2 and wall >= slow * 0.9, (wall, fast, slow)
    assert sum(v["slowest_rank"] == 1 for v in trained) >= len(trained) - 1
    for v in trained:
        assert v["step_time_s/max"] == max(v["step_time_s/rank0"], v["step_time_s/rank1"])
        assert v["samples_per_s"] == pytest.approx(
            v["samples_per_s/rank0"] + v["samples_per_s/rank1"]
        )


def _exported_or_empty(server: str, run_id: str) -> list[dict[str, Any]]:
    from server_harness import exported

    try:
        return exported(server, run_id)
    except Exception:  # the run is not there yet (404) while rank 0 starts
        return []


def test_without_a_process_group_watch_issues_no_collective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    called: list[str] = []
    for name in ("all_reduce", "broadcast", "all_gather", "new_group", "barrier"):
        monkeypatch.setattr(dist, name, lambda *a, _n=name, **k: called.append(_n))
    assert not dist.is_initialized()
    assert type(Distributed.detect()) is Distributed and Distributed.detect().is_primary
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=1, server="", run_dir=tmp_path, batch_size=2) as w:
        for _ in range(3):
            loss = model(torch.randn(2, 4)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss.detach())
        assert w.probes is not None and w.probes.reducer is None
    assert called == []
    frames = [wire.parse_trainer_frame(r) for r in list(read_spool(tmp_path / "spool.bin"))[1:]]
    values = [row["values"] for f in frames if f["type"] == "metrics" for row in f["rows"]]
    assert values and not any(
        k.endswith("/rank0") or k == "slowest_rank" for v in values for k in v
    )


@pytest.mark.slow
def test_train_nproc_runs_a_built_in_experiment_on_two_ranks(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """`layerscope train --nproc 2` goes through torch.distributed.run: rank 0 records the
    run with both ranks' step times, each rank trains on half of every batch, and the
    summary is printed once."""
    from layerscope.trainer import cli

    args = ["train", "--nproc", "2", "--steps", "6", "--every", "3", "--dataset", "blobs",
            "--batch-size", "16", "--device", "cpu", "--run-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    assert capfd.readouterr().out.count(": 6 steps") == 1
    frames = [json.loads(r) for r in read_spool(tmp_path / "spool.bin")]
    assert frames[0]["config"]["world_size"] == 2 and frames[0]["config"]["batch_size"] == 8
    assert frames[0]["world_size"] == 2  # the hello's own field: the run's page shows it
    rows = [row["values"] for f in frames if f["type"] == "metrics" for row in f["rows"]]
    trained = [v for v in rows if "loss" in v]
    assert len(trained) == 6 and all("step_time_s/rank1" in v for v in trained)
    assert [f["step"] for f in frames if f["type"] == "probe"] == [1, 3, 6]


def test_rank_shards_cover_each_batch_once_and_bad_counts_are_clear_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from layerscope.trainer import cli
    from layerscope.trainer.distributed import shard, shard_size

    batch = torch.arange(15)
    parts = [shard(batch, rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat(parts), batch)
    assert [len(p) for p in parts] == [shard_size(15, rank, 4) for rank in range(4)] == [4, 4, 4, 3]
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        shard_size(3, 0, 4)
    assert cli.main(["train", "--nproc", "0", "--print-config"]) == 2
    assert "expected a process count >= 1" in capsys.readouterr().err
