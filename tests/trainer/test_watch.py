"""watch() records a real training loop: every step's loss, probes on cadence, control in w.step()."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from layerscope.trainer import watch as exported_watch
from layerscope.trainer import wire
from layerscope.trainer.checkpoint import CheckpointError, load_model_weights
from layerscope.trainer.rules import Rules
from layerscope.trainer.spool import read_spool
from layerscope.trainer.watch import MAX_PROBE_PASSES, ProgressLine, Watch, watch
from torch import nn
from torch.overrides import TorchFunctionMode
from waiting import wait_until


def make_model() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "weight_decay": 1e-3},
            {"params": model[2].parameters(), "lr": 0.05},
        ],
        lr=0.1,
    )
    return model, opt, torch.randn(32, 8), torch.randint(0, 3, (32,))


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def frames(run_dir: Path) -> list[dict[str, Any]]:
    records = list(read_spool(run_dir / "spool.bin"))
    hello = wire.validate_hello(json.loads(records[0]))
    out = [hello] + [wire.parse_trainer_frame(r) for r in records[1:]]
    assert [f["seq"] for f in out[1:]] == list(range(1, len(out)))
    return out


def rows(fs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for f in fs if f["type"] == "metrics" for row in f["rows"]]


def statuses(fs: list[dict[str, Any]]) -> list[str]:
    return [f["data"]["status"] for f in fs if f["type"] == "event" and f["kind"] == "status"]


def cmd(name: str, cmd_seq: int, **args: Any) -> dict[str, Any]:
    return wire.validate_command_frame({"name": name, "args": args, "cmd_seq": cmd_seq})


def test_exported_watch_is_the_function() -> None:
    assert exported_watch is watch


def test_metrics_every_step_and_probes_every_n(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    model, opt, x, y = make_model()
    model.to(device)  # in place: the optimizer keeps the same parameters
    x, y = x.to(device), y.to(device)
    losses = []
    with watch(model, opt, run="mlp", every=5, run_dir=tmp_path, batch_size=32, progress=True) as w:
        for _ in range(23):
            loss = train_step(model, opt, x, y)
            losses.append(loss.item())
            w.step(loss=loss, acc=torch.tensor(0.25, device=device), note=3)
        w.eval(val_loss=torch.tensor(0.75, device=device), val_acc=0.5)
        assert w.step_count == 23
    fs = frames(tmp_path)
    hello = fs[0]
    assert hello["name"] == "mlp" and hello["run_id"] == w.run_id
    assert [layer["name"] for layer in hello["layers"]] == ["0", "1", "2"]
    assert hello["config"]["optimizer"] == "SGD" and hello["config"]["batch_size"] == 32
    # each group's starting weight decay (the page's switch is off where all are 0)
    assert hello["config"]["param_groups"] == [{"weight_decay": 1e-3}, {"weight_decay": 0.0}]
    train_rows = [r for r in rows(fs) if "loss" in r["values"]]
    assert [r["step"] for r in train_rows] == list(range(1, 24))
    assert [r["values"]["loss"] for r in train_rows] == pytest.approx(losses)
    first = train_rows[0]["values"]
    assert first["lr"] == 0.1 and first["lr/1"] == 0.05
    assert first["weight_decay"] == 1e-3 and first["weight_decay/1"] == 0.0
    assert first["acc"] == 0.25 and first["note"] == 3.0
    assert first["step_time_s"] > 0 and first["samples_per_s"] > 0
    probes = [f for f in fs if f["type"] == "probe"]
    assert [p["step"] for p in probes] == [1, 5, 10, 15, 20]
    assert [layer["name"] for layer in probes[0]["layers"]] == ["0", "1", "2"]
    assert all(p["layers"][1]["dead_ratio"] is not None for p in probes)
    grad_rows = {r["step"] for r in train_rows if r["values"].get("grad_norm") is not None}
    assert grad_rows == {1, 5, 10, 15, 20}
    memory = {r["step"] for r in train_rows if "cuda_mem_alloc_bytes" in r["values"]}
    # on a GPU: read once per flush (every probe step flushes), never on a CPU run
    assert memory >= ({1, 5, 10, 15, 20} if device == "cuda" else set()) and (
        device == "cuda" or not memory
    )
    (val,) = [r for r in rows(fs) if "val_loss" in r["values"]]
    assert val["step"] == 23 and val["values"] == {"val_loss": 0.75, "val_acc": 0.5}
    assert statuses(fs) == ["running", "finished"]
    assert "[layerscope] step" in capsys.readouterr().err


def test_the_progress_line_follows_steps_without_a_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """progress=True drew only rows with a loss: a loop calling w.step() without one
    showed 'step 0' for the whole run. The latest step's row is drawn, loss or not; a
    validation row from w.eval() is not a step, so the line keeps the step's lr."""
    model, opt, x, y = make_model()
    with watch(model, opt, every=2, run_dir=tmp_path, progress=True) as w:
        for _ in range(5):
            train_step(model, opt, x, y)
            w.step()
        w.eval(val_loss=0.5)
    draws = [d.strip() for d in capsys.readouterr().err.split("\r") if d.strip()]
    assert draws[-1] == "[layerscope] step 5  lr 0.1  running"


def test_progress_with_a_server_prints_the_runs_dashboard_url_once_before_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """watch(server=URL, progress=True) in a user's own loop never said where to watch
    the run (only `layerscope train --server` printed it). Now its dashboard URL comes
    first, once; not without a server (server="": spool only) or without progress."""
    from trainer_server import TrainerServer

    model, opt, x, y = make_model()
    server = TrainerServer().start()
    try:
        for name, url, progress in (("seen", server.url, True), ("spool", "", True),
                                    ("quiet", server.url, False)):  # fmt: skip
            with watch(model, opt, server=url, progress=progress, run_id=name,
                       run_dir=tmp_path / name) as w:  # fmt: skip
                w.step(loss=train_step(model, opt, x, y))
            err = capsys.readouterr().err
            if name == "seen":
                page = f"http://127.0.0.1:{server.port}/runs/seen"
                assert err.startswith(f"[layerscope] run seen: dashboard at {page}\n"), err
                assert err.count("dashboard at") == 1 and "[layerscope] step 1" in err
            else:
                assert "dashboard" not in err, (name, err)
    finally:
        server.close()


def test_close_leaves_no_hooks(tmp_path: Path) -> None:
    model, opt, x, y = make_model()
    with watch(model, opt, every=1, run_dir=tmp_path) as w:
        w.step(loss=train_step(model, opt, x, y))
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="closed"):
        w.step(loss=1.0)


def test_pause_blocks_step_until_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, opt, x, y = make_model()
    with watch(model, opt, every=0, run_dir=tmp_path, progress=True) as w:
        w.step(loss=train_step(model, opt, x, y))
        w.control.submit(cmd("pause", 1))
        t = threading.Thread(target=w.step, kwargs={"loss": 1.0}, daemon=True)
        t.start()
        # The step applies the pause when its thread gets to run, which a loaded machine delays.
        wait_until(lambda: w.control_state["paused"])
        t.join(0.5)
        assert t.is_alive()
        w.control.submit(cmd("resume", 2))
        t.join(30)
        assert not t.is_alive() and not w.control_state["paused"]
    assert "paused" in capsys.readouterr().err  # the progress line shows the pause
    fs = frames(tmp_path)
    assert statuses(fs) == ["running", "paused", "running", "finished"]
    results = [f["data"] for f in fs if f["type"] == "event" and f["kind"] == "command_result"]
    assert [(r["name"], r["applied_at_step"], r["ok"]) for r in results] == [
        ("pause", 2, True),
        ("resume", 2, True),
    ]


def test_step_once_advances_exactly_one_step(tmp_path: Path) -> None:
    model, opt, x, y = make_model()
    w = watch(model, opt, every=0, run_dir=tmp_path)
    w.control.submit(cmd("pause", 1))
    done = threading.Event()

    def loop() -> None:
        while not w.should_stop:
            w.step(loss=1.0)
        done.set()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    wait_until(lambda: w.control_state["paused"])
    assert w.step_count == 1
    w.control.submit(cmd("step_once", 2))
    wait_until(lambda: w.step_count == 2)
    time.sleep(0.3)  # a second step would have run by now if step_once let more through
    assert w.step_count == 2
    w.control.submit(cmd("stop", 3))
    assert done.wait(30)
    w.close()
    assert statuses(frames(tmp_path))[-1] == "stopped"


def test_stop_ends_the_loop_with_status_stopped(tmp_path: Path) -> None:
    model, opt, x, y = make_model()
    with watch(model, opt, every=0, run_dir=tmp_path) as w:
        for i in range(100):
            if i == 3:
                w.control.submit(cmd("stop", 1))
            w.step(loss=train_step(model, opt, x, y))
            if w.should_stop:
                break
        assert w.control_state["stopping"]
    assert w.step_count == 4
    assert statuses(frames(tmp_path)) == ["running", "stopped"]


def test_exception_marks_the_run_failed(tmp_path: Path) -> None:
    model, opt, x, y = make_model()
    with pytest.raises(ZeroDivisionError), watch(model, opt, every=0, run_dir=tmp_path) as w:
        w.step(loss=train_step(model, opt, x, y))
        _ = 1 / 0
    assert statuses(frames(tmp_path)) == ["running", "failed"]
    (ended,) = [
        f for f in frames(tmp_path) if f.get("kind") == "status" and f["data"]["status"] == "failed"
    ]
    assert ended["data"]["reason"] == "ZeroDivisionError: division by zero"  # said why


def test_checkpoint_and_lr_scale_through_watch(tmp_path: Path) -> None:
    model, opt, x, y = make_model()
    with watch(model, opt, every=0, run_dir=tmp_path) as w:
        w.step(loss=train_step(model, opt, x, y))
        w.control.submit(cmd("set_lr_scale", 1, value=0.5))
        w.control.submit(cmd("checkpoint", 2))
        w.step(loss=train_step(model, opt, x, y))
        w.step(loss=train_step(model, opt, x, y))
    fs = frames(tmp_path)
    lrs = [(r["step"], r["values"]["lr"], r["values"]["lr/1"]) for r in rows(fs)]
    assert lrs == [(1, 0.1, 0.05), (2, 0.1, 0.05), (3, 0.05, 0.025)]
    (event,) = [f for f in fs if f["type"] == "event" and f["kind"] == "checkpoint"]
    path = tmp_path / "checkpoint-2.pt"
    assert event["data"] == {"path": str(path), "step": 2}
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 2 and saved["control"]["lr_scale"] == 0.5


def test_a_run_dir_that_is_not_utf8_loses_no_event_to_its_paths(tmp_path: Path) -> None:
    """A run_dir from a file name that is not UTF-8 (os.fsdecode's lone surrogate): the
    checkpoint event's data.path and ExplodingTensor's data.last_good_checkpoint held it,
    the server refused those frames (keeping only a record of the refusal: the event log
    never showed the checkpoint or the alert). Now they are sent escaped (\\xNN, as the
    config is) and the files are written by their real names."""
    run_dir = os.path.join(os.fsdecode(tmp_path), os.fsdecode(b"caf\xe9"))
    model, opt, x, y = make_model()
    with watch(model, opt, every=1, run_dir=run_dir, progress=False) as w:
        w.step(loss=train_step(model, opt, x, y))
        w.step(loss=train_step(model, opt, x, y))
        w.settle()  # the rules have seen step 1 finite: last-good.pt written
        assert w.command("checkpoint")["ok"]
        w.step(loss=torch.tensor(math.nan))
        w.settle()
    assert sorted(os.listdir(run_dir)) == ["checkpoint-2.pt", "last-good.pt", "spool.bin"]
    texts = list(read_spool(Path(run_dir) / "spool.bin"))
    # as the server reads them: a frame holding a lone surrogate raises WireError here
    events = [wire.parse_trainer_frame(t, run_id=w.run_id) for t in texts[1:]]
    shown = os.fsencode(run_dir).decode("utf-8", "backslashreplace")
    assert "\\xe9" in shown
    (checkpoint,) = [e for e in events if e.get("kind") == "checkpoint"]
    assert checkpoint["data"] == {"path": f"{shown}/checkpoint-2.pt", "step": 2}
    (alert,) = [e for e in events if e.get("kind") == "alert"]
    assert alert["data"]["rule"] == "ExplodingTensor"
    assert alert["data"]["last_good_checkpoint"] == f"{shown}/last-good.pt"


def _steered_run() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _scheduled_steps(w: Watch, model: nn.Module, opt: Any, sched: Any, n: int) -> None:
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    for _ in range(n):
        w.step(loss=train_step(model, opt, x, y))
        sched.step()


def test_resume_trains_on_as_the_steered_run_would_have(tmp_path: Path) -> None:
    """A run steered from the dashboard (lr halved, weight decay off, a layer frozen) and
    checkpointed, resumed in a new process by loading the checkpoint's model and optimizer
    state: it trained at twice the lr (the optimizer holds the user's unscaled lr), with
    weight decay on and the layer training, its StepLR started over. watch(resume=...)
    loads every piece and re-applies the steering, so the resumed steps are the
    original's, bit for bit, numbered on from the checkpoint's step."""
    model, opt, sched = _steered_run()
    first = tmp_path / "first"
    with watch(model, opt, every=100, run_dir=first, server="", run_id="first",
               checkpoint_extras={"scheduler": sched}) as w:  # fmt: skip
        _scheduled_steps(w, model, opt, sched, 2)
        w.command("set_lr_scale", {"value": 0.5})
        w.command("set_weight_decay", {"enabled": False})
        w.command("set_frozen", {"layers": ["0"], "frozen": True})
        _scheduled_steps(w, model, opt, sched, 1)
        assert w.command("checkpoint", {})["ok"]
        _scheduled_steps(w, model, opt, sched, 4)
    after_checkpoint = [r for r in rows(frames(first)) if r["step"] > 3]

    model2, opt2, sched2 = _steered_run()  # what a new process builds
    again = tmp_path / "again"
    with watch(model2, opt2, every=100, run_dir=again, server="",
               checkpoint_extras={"scheduler": sched2}, resume=first / "checkpoint-3.pt") as w:  # fmt: skip
        assert w.step_count == 3 and w.control_state["lr_scale"] == 0.5
        _scheduled_steps(w, model2, opt2, sched2, 4)
    fs = frames(again)
    used = [(r["step"], r["values"]["lr"], r["values"]["weight_decay"]) for r in rows(fs)]
    assert used == [(4, 0.025, 0.0), (5, 0.025, 0.0), (6, 0.025, 0.0), (7, 0.0125, 0.0)]
    assert used == [
        (r["step"], r["values"]["lr"], r["values"]["weight_decay"]) for r in after_checkpoint
    ]
    for name, tensor in model.state_dict().items():
        assert torch.equal(model2.state_dict()[name], tensor), name
    restored = [f for f in fs if f["type"] == "event" and f["kind"] == "command_result"]
    assert [(f["step"], f["data"]["name"], f["data"]["source"], f["data"]["reason"],
             f["data"]["applied_at_step"], f["data"]["ok"]) for f in restored] == [
        (3, name, "api", "restored from checkpoint-3.pt", 3, True)
        for name in ("set_lr_scale", "set_weight_decay", "set_frozen")
    ]  # fmt: skip
    assert restored[-1]["data"]["state"]["frozen"] == ["0"]
    assert fs[0]["run_id"] != "first" and fs[0]["config"]["resumed_from"] == {
        "checkpoint": str(first / "checkpoint-3.pt"), "step": 3, "run_id": "first",
    }  # fmt: skip
    # the first step of the resumed run is probed, as step 1 of a fresh one is
    assert [f["step"] for f in fs if f["type"] == "probe"] == [4]


def test_a_resume_that_cannot_be_whole_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    model, opt, sched = _steered_run()
    with watch(model, opt, every=0, run_dir=tmp_path / "a", server="",
               checkpoint_extras={"scheduler": sched}) as w:  # fmt: skip
        w.step(loss=train_step(model, opt, torch.randn(4, 8), torch.zeros(4, dtype=torch.long)))
        w.command("set_frozen", {"layers": ["0"], "frozen": True})
        saved = w.control.snapshot(1)
    model2, opt2, _ = _steered_run()
    with pytest.raises(CheckpointError, match=r"holds state for \['scheduler'\]"):
        watch(model2, opt2, every=0, run_dir=tmp_path / "b", server="", resume=saved)
    assert not any(tmp_path.glob("b/*"))  # no spool: nothing was started
    # a piece the model refuses (here a layer it does not have) fails the run, named
    saved["control"]["frozen"] = ["9"]
    with pytest.raises(ValueError, match=r"resume from a checkpoint at step 1: set_frozen.*'9'"):
        watch(model2, opt2, every=0, run_dir=tmp_path / "c", server="", resume=saved,
              checkpoint_extras={"scheduler": torch.optim.lr_scheduler.StepLR(opt2, 3)})  # fmt: skip
    assert statuses(frames(tmp_path / "c")) == ["running", "failed"]
    with watch(model2, opt2, every=0, server="", run_dir=tmp_path / "d"):
        pass  # the refused watches left the optimizer unsteered


VAL_LOSSES = [1.0, 0.8, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]  # at steps 2, 4, ... 20


def _plateau_run(w: Watch, steps: range) -> int | None:
    """Steps with a falling training loss and an evaluation every 2nd step, each waited
    for until the link thread has evaluated it (every evaluation moves the plateau's
    best, count or halvings); returns the step whose boundary first halved the lr scale."""

    def plateau() -> tuple[Any, ...]:
        state = w.rules.state_dict()
        return state["best_val"], state["evals_since_best"], state["halvings"]

    halved = None
    for step in steps:
        w.step(loss=1.0 / step)
        if halved is None and w.control.lr_scale != 1.0:
            halved = step
        if step % 2 == 0:
            before = plateau()
            w.eval(val_loss=VAL_LOSSES[step // 2 - 1])
            wait_until(lambda: plateau() != before)  # noqa: B023 (waited for here)
    return halved


def test_a_resumed_run_goes_on_counting_a_plateau_where_the_checkpoint_stood(
    tmp_path: Path,
) -> None:
    """The rules started afresh on resume: a plateau 2 evaluations of 3 into its count at
    the checkpoint was counted again from zero, so auto-halve came 3 evaluations (6 steps)
    later than in the run never stopped. The checkpoint now holds the rules' history
    (a top-level ``rules``, plain values a weights_only load reads) and a resumed watch
    goes on from it: the halving lands on the same step, the rules' state is the same at
    the end. A checkpoint without it (an older layerscope's) still resumes, afresh."""

    def model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    args: dict[str, Any] = {"every": 0, "server": "", "auto_halve_lr": True, "patience": 3}
    model, opt = model_and_opt()
    with watch(model, opt, run_dir=tmp_path / "whole", **args) as w:
        assert _plateau_run(w, range(1, 21)) == 13  # the evaluation at step 12 halves
        at_the_end = w.rules.state_dict()
    model, opt = model_and_opt()
    with watch(model, opt, run_dir=tmp_path / "first", **args) as w:
        _plateau_run(w, range(1, 11))
        assert w.command("checkpoint")["ok"]
    path = tmp_path / "first" / "checkpoint-10.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["rules"]["evals_since_best"] == 2 and saved["rules"]["best_val"] == 0.6

    model, opt = model_and_opt()
    with watch(model, opt, run_dir=tmp_path / "resumed", resume=path, **args) as w:
        assert _plateau_run(w, range(11, 21)) == 13
        assert w.rules.state_dict() == at_the_end

    del saved["rules"]  # as an older layerscope wrote it
    model, opt = model_and_opt()
    with watch(model, opt, run_dir=tmp_path / "older", resume=saved, **args) as w:
        fresh = Rules(auto_halve_lr=True, patience=3).state_dict()
        assert w.step_count == 10 and w.rules.state_dict() == fresh
        assert _plateau_run(w, range(11, 21)) == 19  # counted from step 12 again
    saved["rules"] = {"halvings": "many"}
    with pytest.raises(CheckpointError, match="at step 10: the rules' state has no active"):
        watch(model, opt, run_dir=tmp_path / "bad", resume=saved, **args)
    assert not (tmp_path / "bad").exists() and not opt._optimizer_step_pre_hooks


def test_a_second_watch_on_a_steered_optimizer_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    """Two open watches on one optimizer (nested: a helper that watches inside the user's
    watch) each put back the lr the other had scaled: with both at 0.5 the user's lr
    halved step after step and stayed wrong after both closed. The second is refused;
    once the first closes, the next watch steers it as usual."""
    model, opt, x, y = make_model()
    with watch(model, opt, every=0, run_dir=tmp_path / "a") as w:
        with pytest.raises(ValueError, match="already steered by an open watch.*run_dir"):
            watch(model, opt, every=0, run_dir=tmp_path / "b")
        assert len(opt._optimizer_step_pre_hooks) == 1  # the refused one left no hooks
        assert w.command("set_lr_scale", {"value": 0.5})["ok"]
        for _ in range(3):
            w.step(loss=train_step(model, opt, x, y))
            assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    with watch(model, opt, every=0, run_dir=tmp_path / "c") as w:
        assert w.command("set_lr_scale", {"value": 0.5})["ok"]
        w.step(loss=train_step(model, opt, x, y))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    got = [(r["values"]["lr"], r["values"]["lr/1"]) for r in rows(frames(tmp_path / "a"))]
    assert got == [(0.05, 0.025)] * 3
    assert [r["values"]["lr"] for r in rows(frames(tmp_path / "c"))] == [0.05]


def test_lazy_modules_are_refused_until_a_forward_pass_made_their_parameters(
    tmp_path: Path,
) -> None:
    """nn.LazyLinear has no parameter shapes before its first forward: watch() crashed in
    the probes with torch's 'Attempted to use an uninitialized parameter in numel'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # made before the forward, as usual
    with pytest.raises(ValueError, match=r"lazy modules not initialized yet \(0, 2\): run one"):
        watch(model, opt, every=0, run_dir=tmp_path / "lazy")
    assert not opt._optimizer_step_pre_hooks
    model(torch.zeros(1, 4))  # the dummy batch the message asks for
    with watch(model, opt, every=2, run_dir=tmp_path / "ok") as w:
        for _ in range(2):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss)
    probes = [f for f in frames(tmp_path / "ok") if f["type"] == "probe"]
    assert [p["step"] for p in probes] == [1, 2]
    assert all(e["update_ratio"] > 0 for p in probes for e in p["layers"] if e["name"] != "1")


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    model, opt, _, _ = make_model()
    with pytest.raises(ValueError, match="config"):
        watch(model, opt, config={"blob": "x" * (wire.MAX_CONFIG_BYTES + 1)}, run_dir=tmp_path)
    with pytest.raises(ValueError, match="ws://"):
        watch(model, opt, server="ftp://127.0.0.1:1", run_dir=tmp_path)
    with pytest.raises(TypeError, match="config must be a dict"):
        watch(model, opt, config=[1, 2], run_dir=tmp_path)
    # the server refuses it at the hello; the user hears it here, before training starts
    with pytest.raises(ValueError, match="control character"):
        watch(model, opt, run_id="run\nINFO: forged", run_dir=tmp_path)
    # several optimizers (a GAN's): one is watched, the one the dashboard steers
    with pytest.raises(TypeError, match="takes one optimizer, got a list of 2; .* watch the one"):
        both: Any = [opt, torch.optim.SGD(model.parameters(), lr=0.1)]
        watch(model, both, run_dir=tmp_path)
    # A refused watch leaves nothing behind.
    assert not opt._optimizer_step_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())
    w: Watch
    with watch(model, opt, every=0, run_dir=tmp_path / "ok") as w:
        with pytest.raises(ValueError, match="scalar tensor"):
            w.step(loss=torch.ones(3))
        with pytest.raises(TypeError, match="number"):
            w.step(loss="high")
        assert w.step_count == 0  # a refused step is not counted
        w.step(loss=torch.tensor(2.0))
        # An event the server would refuse is refused here: never stored there, it would
        # hold back the server's confirmation of every later frame.
        with pytest.raises(ValueError, match="exceeds"):
            w.event("log", {"text": "x" * (wire.MAX_CONFIG_BYTES + 1)})
        with pytest.raises(ValueError, match="kind"):
            w.event("gossip", {})
        # measured as sent: each NaN goes out as null, one character longer
        nans: dict[str, Any] = {"v": [math.nan] * 1000, "pad": ""}
        nans["pad"] = "x" * (wire.MAX_CONFIG_BYTES - 100 - len(json.dumps(nans)))
        assert len(json.dumps(nans)) <= wire.MAX_CONFIG_BYTES < len(json.dumps(nans)) + 1000
        with pytest.raises(ValueError, match="exceeds"):
            w.event("log", nans)
        w.event("log", {"text": "kept"})
    fs = frames(tmp_path / "ok")
    assert [r["values"]["loss"] for r in rows(fs)] == [2.0]
    logs = [f["data"] for f in fs if f["type"] == "event" and f["kind"] == "log"]
    assert logs == [{"text": "kept"}]


def test_a_refused_watch_with_progress_leaves_no_filter_on_the_loggers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """watch(progress=True) put its progress line's filter on the trainer's loggers before
    the checks that can refuse the call: a refused one (a bad config, a layer filter that
    selects nothing, an optimizer already steered) left it there for the process's life,
    one more per refusal, each breaking the line before every later log record."""
    model, opt, _, _ = make_model()
    loggers = [logging.getLogger(f"layerscope.trainer.{n}") for n in ProgressLine.LOGGERS]
    before = [list(logger.filters) for logger in loggers]
    with pytest.raises(TypeError, match="config must be a dict"):
        watch(model, opt, config=[1], run_dir=tmp_path / "a", progress=True)
    with pytest.raises(ValueError, match="selects no layer"):
        watch(model, opt, layers="nothing_here", run_dir=tmp_path / "b", progress=True)
    with (
        watch(model, opt, every=0, run_dir=tmp_path / "c"),
        pytest.raises(ValueError, match="already steered"),
    ):
        watch(model, opt, every=0, run_dir=tmp_path / "d", progress=True)
    assert [list(logger.filters) for logger in loggers] == before
    assert capsys.readouterr().err == ""  # nor a stray newline from a line never drawn
    with watch(model, opt, every=0, run_dir=tmp_path / "e", progress=True) as w:
        w.step(loss=1.0)
        assert all(any(isinstance(f, ProgressLine) for f in lg.filters) for lg in loggers)
    assert [list(logger.filters) for logger in loggers] == before


def test_scalar_tensors_of_any_single_value_shape_and_dtype_arrive_as_floats(
    tmp_path: Path, device: str
) -> None:
    """Values kept on the device are stacked at the flush: a 0-d loss, a (1,) or (1, 1)
    tensor, an integer count and a bf16 value all arrive as their float, in their rows;
    on CUDA a value left on the CPU among them (two devices in one flush) as well."""
    model, opt, _, _ = make_model()
    given = [
        {"loss": torch.tensor(0.5, device=device), "correct": torch.tensor(7)},
        {"loss": torch.tensor([0.25]), "half": torch.tensor(1.5, dtype=torch.bfloat16)},
        {"loss": torch.full((1, 1), 0.125, device=device), "correct": torch.tensor(9)},
    ]
    if device == "cuda":  # a CPU value first, then one the GPU is still computing
        big = torch.ones(2048, 2048, device=device)
        given.append({"correct": torch.tensor(3), "loss": (big @ big).mean() / 2048})
    with watch(model, opt, every=0, run_dir=tmp_path / "a") as w:
        for scalars in given:
            w.step(**scalars)
    got = [{k: v for k, v in r["values"].items() if k in ("loss", "correct", "half")}
           for r in rows(frames(tmp_path / "a"))]  # fmt: skip
    assert got == [{k: float(v) for k, v in s.items()} for s in given]
    # No float32 value in the flush: the count is widened on its own, not to bf16/fp16
    # (which cannot hold 257 or 70001); a running count updated in place after each
    # step keeps each step's value.
    count = torch.zeros((), dtype=torch.int64, device=device)
    with watch(model, opt, every=0, run_dir=tmp_path / "b") as w:
        for i, half in enumerate((torch.bfloat16, torch.float16)):
            count += 257 if i == 0 else 70001 - 257
            w.step(loss=torch.tensor(0.5, dtype=half, device=device), tokens=count)
        count += 1
    got = [(r["values"]["loss"], r["values"]["tokens"]) for r in rows(frames(tmp_path / "b"))]
    assert got == [(0.5, 257.0), (0.5, 70001.0)]


def test_int64_counts_and_float64_values_arrive_exactly(tmp_path: Path, device: str) -> None:
    """Every on-device value went through float32: a running count kept as an int64
    tensor was recorded 40000000 for 40000001, a float64 loss 1 + 1e-9 as 1.0 (a Python
    int was exact). A flush holding such a value carries them in float64; the probe
    statistics after them, in the same one host copy, stay float32 and decode as before."""
    model, opt, x, y = make_model()
    model.to(device)
    x, y = x.to(device), y.to(device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    losses, grad_norms = [], []
    with watch(model, opt, every=2, run_dir=tmp_path) as w:
        for step in range(1, 5):
            loss = train_step(model, opt, x, y)
            losses.append(loss.item())
            grad_norms.append(
                float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
            )
            tokens += 40_000_001
            w.step(
                loss=loss,
                tokens_seen=tokens,
                precise=torch.tensor(1 + 1e-9 * step, dtype=torch.float64, device=device),
                count32=torch.tensor(2**24 + step, dtype=torch.int32),
            )
    got = rows(frames(tmp_path))
    assert [r["values"]["tokens_seen"] for r in got] == [40_000_001 * s for s in range(1, 5)]
    assert [r["values"]["precise"] for r in got] == [1 + 1e-9 * s for s in range(1, 5)]
    assert [r["values"]["count32"] for r in got] == [2**24 + s for s in range(1, 5)]
    assert [r["values"]["loss"] for r in got] == losses  # a float32 loss: as it was
    assert [r["values"].get("grad_norm") for r in got] == [
        pytest.approx(g, rel=1e-5) if s in (1, 2, 4) else None
        for s, g in zip(range(1, 5), grad_norms, strict=True)
    ]
    probes = [f for f in frames(tmp_path) if f["type"] == "probe"]
    assert [p["step"] for p in probes] == [1, 2, 4]
    weight = float(model[2].weight.detach().norm())  # after the last step; probe: before it
    layer2 = next(e for e in probes[-1]["layers"] if e["name"] == "2")
    assert layer2["weight_norm"] == pytest.approx(weight, rel=0.05)
    assert 0 < layer2["update_ratio"] < 1


class NoHostReads(TorchFunctionMode):
    """Fails on any read of a tensor's value on the host (a device sync on CUDA)."""

    BANNED = frozenset(
        {
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.cpu,
            torch.Tensor.numpy,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
            torch.Tensor.__bool__,
        }
    )

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.BANNED:
            raise AssertionError(f"host read {func} on the training thread")
        return func(*args, **(kwargs or {}))


def test_training_thread_never_reads_values_on_the_host(tmp_path: Path) -> None:
    model, opt, x, y = make_model()
    with watch(model, opt, every=2, run_dir=tmp_path) as w:
        for _ in range(6):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            with NoHostReads():
                opt.step()  # runs the control and probe step hooks
                w.step(loss=loss, acc=torch.tensor(0.5))
        with NoHostReads():
            w.eval(val_loss=torch.tensor(1.0))
    # The values were read, once per flush, on the link thread.
    assert len([r for r in rows(frames(tmp_path)) if "loss" in r["values"]]) == 6


# Dynamo itself reads .grad of the tensors it takes in where the eager hooks break the
# graph (torch warns once; a user sees it once, the suite turns warnings into errors).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_model_compiled_after_watch_is_not_recompiled_per_hooked_layer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hooks' wrapper called torch.compiler.disable only while compiling; dynamo traced
    the wrapper itself after that graph break, once per hooked layer and mode, and a model
    compiled after watch() with validation passes logged 'hit config.recompile_limit (8)'
    (a reviewer's loop). The statistics were right; the warning said otherwise."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(5):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, run_dir=tmp_path, every=2, server="") as w:
        compiled = torch.compile(model, backend="eager")
        for _ in range(6):
            loss = compiled(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            compiled.eval()
            with torch.no_grad():
                compiled(torch.randn(16, 8))
            compiled.train()
            w.step(loss=loss)
    assert "recompile_limit" not in caplog.text
    probes = [f for f in frames(tmp_path) if f["type"] == "probe"]
    assert [p["step"] for p in probes] == [1, 2, 4, 6]
    assert all(len(p["layers"]) == 10 for p in probes)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_compiled_model_gets_full_statistics_on_every_probe_step(tmp_path: Path) -> None:
    """Under torch.compile the forward hooks were traced into the graph, and their writes
    to the probes' state replayed as the first trace's constants: from the third probe
    step on, every layer's activation statistics were null, with no error."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model = torch.compile(base, backend="eager")  # dynamo's tracing, no compiler needed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with watch(model, opt, run_dir=tmp_path, every=2, server="") as w:
        for _ in range(12):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss)
        assert w.command("checkpoint")["ok"]
    probes = [f for f in frames(tmp_path) if f["type"] == "probe"]
    assert [p["step"] for p in probes] == [1, 2, 4, 6, 8, 10, 12]
    for p in probes:
        assert [e["name"] for e in p["layers"]] == ["0", "1", "2"], p["step"]
        for e in p["layers"]:
            assert e["mean"] is not None and sum(e["hist"]["counts"]) > 0, (p["step"], e["name"])
    # the checkpoint holds the user's model's keys, and loads into the compiled model too
    (saved,) = tmp_path.glob("checkpoint-*.pt")
    assert sorted(torch.load(saved)["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert load_model_weights(model, saved)["tensors"] == 4
    # the layers keep the user's names inside a DataParallel wrapper too (not "module.0"),
    # and names written for the wrapper still work
    dp = nn.DataParallel(base)
    with watch(dp, opt, run_dir=tmp_path / "dp", server="", layers=["module.0", "module.1"],
               activations={"module.0": "tanh"}) as w:  # fmt: skip
        assert w.probes is not None
        assert [row["name"] for row in w.probes.layer_table()] == ["0", "1"]
        assert w.command("set_frozen", {"layers": ["module.2"], "frozen": True})["ok"]
        assert w.control_state["frozen"] == ["2"]


def test_a_compiled_model_runs_its_graph_untouched_and_its_probe_steps_eagerly(
    tmp_path: Path,
) -> None:
    """A model compiled and run once before watch() got no activation statistic at all
    (dynamo's graph ignores hooks added after it was built: every mean None, no warning);
    one first run under watch() (armed from the start) traced the hooks and was split at
    each hooked layer for the whole run (every step about twice as slow). Now a probe step
    runs the module inside eagerly and every other step runs the one compiled graph."""
    from torch._dynamo.utils import counters

    graph_runs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        def run(*args: Any) -> Any:
            graph_runs.append(1)
            return gm.forward(*args)

        return run

    for warm in (True, False):
        torch._dynamo.reset()
        counters.clear()
        graph_runs.clear()
        torch.manual_seed(0)
        base = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)
        )
        model = torch.compile(base, backend=backend)
        compiled_forward = model.forward
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 4)
        if warm:  # compiled before watch(), by a grad-enabled forward
            model(x).sum().backward()
            opt.zero_grad()
        with watch(model, opt, run_dir=tmp_path / str(warm), every=3, server="") as w:
            for _ in range(12):
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.step(loss=loss)
        assert model.forward is compiled_forward
        probes = [f for f in frames(tmp_path / str(warm)) if f["type"] == "probe"]
        assert [p["step"] for p in probes] == [1, 3, 6, 9, 12]
        for p in probes:
            assert all(e["mean"] is not None for e in p["layers"]), (warm, p["step"])
            assert [e["name"] for e in p["layers"] if e["grad_norm"]] == ["0", "2", "4"]
        assert not counters["graph_break"], (warm, dict(counters["graph_break"]))
        assert counters["stats"]["unique_graphs"] == 1
        assert len(graph_runs) == warm + 12 - len(probes)  # the 7 other steps, compiled


def test_an_evaluation_pass_is_not_mixed_into_the_next_probe_step(tmp_path: Path) -> None:
    """Probes are armed from watch() on (step 1 is the network as initialised), so a
    validation pass before the first step (model.eval() under no_grad, on data of another
    scale) was merged into step 1's statistics, as was one after the training pass; a
    frozen part run under no_grad inside a training forward is still recorded (and
    evaluation passes alone still make a probe step: test_probes' eval-mode test)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x = self.frozen(x)
            return self.head(x)

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.0)
    x_val, x = torch.randn(1000, 4) * 10 + 50, torch.randn(16, 4)
    with watch(model, opt, run_dir=tmp_path, every=100, server="") as w:
        model.eval()
        with torch.no_grad():
            w.eval(val_loss=model(x_val).pow(2).mean())
        model.train()
        with torch.inference_mode():  # one without model.eval(): no grads says enough
            w.eval(val_loss=model(x_val[:100]).pow(2).mean())
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()  # and one after the training pass, before w.step(): skipped
        with torch.no_grad():
            w.eval(val_loss=model(x_val).pow(2).mean())
        model.train()
        w.step(loss=loss)
    (probe,) = [f for f in frames(tmp_path) if f["type"] == "probe"]
    got = {e["name"]: e for e in probe["layers"]}
    with torch.no_grad():
        frozen_out = model.frozen(x)
        head_out = model.head(frozen_out)
    for name, want in (("frozen", frozen_out), ("head", head_out)):
        assert got[name]["max"] == pytest.approx(float(want.max()), rel=1e-5), name
        assert got[name]["mean"] == pytest.approx(float(want.mean()), rel=1e-4, abs=1e-6), name
        assert sum(got[name]["hist"]["counts"]) == want.numel(), name


def test_lbfgs_gets_this_steps_gradient_norms_and_freezing_it_is_refused(tmp_path: Path) -> None:
    """optimizer.step(closure): the closure computes the gradients inside step(), so the
    pre-step hook read the last step's (or none: step 1 had no grad_norm). And LBFGS keeps
    its own parameter list: a freeze was acknowledged while the layer kept training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    expected = []
    with watch(model, opt, run_dir=tmp_path, every=1, server="") as w:
        for _ in range(3):
            # with max_iter=1 the closure runs once, at the weights before the update
            before = [p.detach().clone() for p in model.parameters()]
            clone = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
            with torch.no_grad():
                for p, b in zip(clone.parameters(), before, strict=True):
                    p.copy_(b)
            (clone(x) - y).pow(2).mean().backward()
            expected.append(torch.cat([p.grad.reshape(-1) for p in clone.parameters()]).norm())
            if not expected[1:]:
                first_weights = before
            loss = opt.step(closure)
            w.step(loss=loss)
        result = w.command("set_frozen", {"layers": ["0"], "frozen": True})
    assert not result["ok"] and "own parameter list" in result["error"]
    got = [row["values"].get("grad_norm") for row in rows(frames(tmp_path))]
    assert got == pytest.approx([float(e) for e in expected], rel=1e-5)
    # the weight norm is the weights' before the update, as for any other optimizer
    (first,) = [f for f in frames(tmp_path) if f["type"] == "probe" and f["step"] == 1]
    layer0 = next(e for e in first["layers"] if e["name"] == "0")
    w0 = torch.cat([b.reshape(-1) for b in first_weights[:2]]).norm()
    assert layer0["weight_norm"] == pytest.approx(float(w0), rel=1e-5)


def test_forward_passes_without_a_step_keep_what_the_watch_holds_bounded(tmp_path: Path) -> None:
    """An armed watch whose loop only runs forward passes (predictions without no_grad, a
    loop that never calls w.step()) kept every pass's statistics until a w.step() that
    never came: ~3 KiB of Python objects per pass (and their tensors), for as long as it
    ran. Past MAX_PROBE_PASSES training passes the probes' hooks come off (the model takes
    its plain call path again): 2,000 more passes retain nothing, and the step that comes
    at last still gets its probe, from its first MAX_PROBE_PASSES passes."""
    model, opt, x, y = make_model()
    with watch(model, opt, every=10, run_dir=tmp_path, server="") as w:
        for _ in range(MAX_PROBE_PASSES):
            model(x)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(2000):
                model(x)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 64 * 1024, f"{grown} bytes retained by 2000 forward passes"
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        w.step(loss=train_step(model, opt, x, y))
        for _ in range(8):  # steps 2..9; the next probe step (10) records its passes as usual
            w.step(loss=train_step(model, opt, x, y))
        model(x)  # a second training pass in step 10 (as gradient accumulation makes)
        w.step(loss=train_step(model, opt, x, y))
    probes = [f for f in frames(tmp_path) if f["type"] == "probe"]
    assert [p["step"] for p in probes] == [1, 10]
    first, tenth = ({e["name"]: e for e in p["layers"]} for p in probes)
    assert sum(first["0"]["hist"]["counts"]) == MAX_PROBE_PASSES * 32 * 16
    assert sum(tenth["0"]["hist"]["counts"]) == 2 * 32 * 16


def _accumulate(model: nn.Module, opt: torch.optim.Optimizer, passes: int) -> torch.Tensor:
    """One optimizer step over ``passes`` micro-batches (gradient accumulation)."""
    opt.zero_grad()
    for i in range(passes):
        loss = nn.functional.mse_loss(model(torch.full((4, 8), 0.1 * i)), torch.zeros(4, 3))
        (loss / passes).backward()
    opt.step()
    return loss.detach()


def test_gradient_accumulation_past_max_probe_passes_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A step of exactly MAX_PROBE_PASSES micro-batches is probed whole, update ratios
    included (the probes came off at the 64th pass, so it had none and nothing said why);
    one of more has its activations described by its first MAX_PROBE_PASSES (its gradient
    norms and update ratios are the step's own), and the run says so once (a log line and
    a ``log`` event), however many probe steps it has."""
    model, opt, _, _ = make_model()
    with watch(model, opt, every=2, run_dir=tmp_path, server="") as w:
        w.step(loss=_accumulate(model, opt, MAX_PROBE_PASSES))  # step 1, a probe step
        w.step(loss=_accumulate(model, opt, MAX_PROBE_PASSES + 1))  # 2, probed
        w.step(loss=_accumulate(model, opt, 1))
        w.step(loss=_accumulate(model, opt, MAX_PROBE_PASSES + 3))  # 4, probed
    fs = frames(tmp_path)
    probes = {f["step"]: {e["name"]: e for e in f["layers"]} for f in fs if f["type"] == "probe"}
    assert sorted(probes) == [1, 2, 4]
    assert probes[1]["0"]["update_ratio"] is not None
    assert sum(probes[1]["0"]["hist"]["counts"]) == MAX_PROBE_PASSES * 4 * 16
    assert sum(probes[2]["0"]["hist"]["counts"]) == MAX_PROBE_PASSES * 4 * 16
    # past the limit only the forward hooks come off: the step's gradients and update
    # are still read at optimizer.step() (they were lost with the optimizer hooks)
    for step in (2, 4):
        assert probes[step]["0"]["update_ratio"] is not None
        assert probes[step]["0"]["grad_norm"] is not None
    logs = [f for f in fs if f["type"] == "event" and f["kind"] == "log"]
    assert len(logs) == 1 and logs[0]["step"] == 1
    assert logs[0]["data"]["message"].startswith(f"probe step 2: more than {MAX_PROBE_PASSES}")
    said = [r for r in caplog.records if "training forward passes" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"


def test_close_on_another_thread_while_paused_leaves_no_hooks(tmp_path: Path) -> None:
    """A w.step() blocked while paused returns when another thread closes the watch; the
    next step being a probe step, it armed the probes' pass counter then, and the model
    kept that forward pre-hook (and, through it, the closed watch) for good."""
    model, opt, x, y = make_model()
    w = watch(model, opt, every=2, run_dir=tmp_path, server="")
    w.control.submit(cmd("pause", 1))
    t = threading.Thread(target=w.step, kwargs={"loss": train_step(model, opt, x, y)})
    t.start()
    wait_until(lambda: w.control_state["paused"])
    w.close()
    t.join(30)
    assert not t.is_alive()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert statuses(frames(tmp_path)) == ["running", "paused", "finished"]


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_the_grad_scaler_skipped_has_no_update_ratio_fused_or_not(
    tmp_path: Path, fused: bool
) -> None:
    """An overflow step a GradScaler skipped read update_ratio None with AdamW but 0.0 with
    a fused AdamW (whose kernel reads found_inf and leaves the weights): no update either
    way, and no alert for it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu")
    with watch(model, opt, every=1, run_dir=tmp_path) as w:
        for overflow in (False, True, False):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            scaler.scale(loss * (math.inf if overflow else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
            w.step(loss=loss.detach())
    probes = [f for f in frames(tmp_path) if f["type"] == "probe"]
    ratios = [next(x["update_ratio"] for x in f["layers"] if x["name"] == "0") for f in probes]
    assert ratios[0] > 0 and ratios[1] is None and ratios[2] > 0  # step 2: skipped
    alerts = [f for f in frames(tmp_path) if f["type"] == "event" and f.get("kind") == "alert"]
    assert not alerts, alerts


@pytest.mark.parametrize(
    "first",
    [
        "from layerscope.trainer.watch import Watch",  # a type hint's import
        "from layerscope.trainer.watch import watch as w",  # the benchmarks' import
        "import importlib; importlib.import_module('layerscope.trainer.watch')",
    ],
)
def test_the_package_gives_the_watch_function_whatever_was_imported_first(first: str) -> None:
    """Python binds a loaded submodule to its package's attribute of the same name: after
    any import of layerscope.trainer.watch, `from layerscope.trainer import watch` gave the
    module, and watch(model, optimizer) failed with "'module' object is not callable"."""
    import subprocess
    import sys

    code = (
        f"{first}\n"
        "import sys, types\n"
        "from layerscope.trainer import watch\n"
        "assert isinstance(watch, types.FunctionType), type(watch)\n"
        "assert isinstance(sys.modules['layerscope.trainer.watch'], types.ModuleType)\n"
        "from layerscope.trainer.watch import Watch, DEFAULT_EVERY\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_logged_view_of_a_parameter_keeps_each_steps_value(tmp_path: Path) -> None:
    """w.step(w00=model.weight[0, 0]): a view autograd made of a parameter the optimizer
    updates in place. It was kept by reference until the flush, so every row read the
    weight as it was at the flush ([-2.0, -2.0, -2.0] for 0, -1, -2)."""
    model, opt, _, _ = make_model()
    first = next(model.parameters())
    with torch.no_grad():
        first[0, 0] = 0.0
    with watch(model, opt, every=0, run_dir=tmp_path) as w:
        for _ in range(3):
            w.step(loss=torch.tensor(0.5), w00=first[0, 0])
            with torch.no_grad():
                first[0, 0] -= 1.0  # the optimizer's in-place update, as it were
    got = [r["values"]["w00"] for r in rows(frames(tmp_path))]
    assert got == [0.0, -1.0, -2.0]


def test_settle_applies_the_stop_a_rule_sent_after_the_last_step(tmp_path: Path) -> None:
    """The rules judge a flush on the link thread and their commands apply at the next
    w.step(): a loop whose loss went NaN at its last step ended before the NaN rule's stop
    arrived (layerscope train reported its overfit verdict, exit 1, not the stop, exit 3;
    a CI run under load did). w.settle() lets the rules see every step and applies what
    they sent."""
    model, opt, _, _ = make_model()
    with watch(model, opt, every=0, run_dir=tmp_path) as w:
        w.step(loss=torch.tensor(0.5))
        w.step(loss=torch.tensor(math.nan))
        assert not w.should_stop  # not flushed yet: no rule has seen the NaN
        w.settle()
        assert w.should_stop
        assert w.control.stopped_by is not None and w.control.stopped_by["source"] == "rule"


def test_names_that_are_not_utf8_are_escaped_in_the_config_and_refused_as_series(
    tmp_path: Path,
) -> None:
    """watch() with names that are not UTF-8 (os.fsdecode's lone surrogates). The config's
    and the run name's were sent as they were and the server refused the hello (or, before
    the server refused them, stored what broke every read); a series name's frame was
    refused and the run lost from there. Now the name, config and w.event() data are sent
    escaped, and a series name or run id holding one raises ValueError naming it."""
    bad = os.fsdecode(b"/data/caf\xe9.npz")
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = {"data": bad, os.fsdecode(b"k\xff"): [bad]}
    name = "run " + os.fsdecode(b"caf\xe9")
    with watch(model, opt, server="", run=name, run_id="w1", config=config, run_dir=tmp_path) as w:
        w.step(loss=torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"series name 'val_caf\\udce9' holds U\+DCE9"):
            w.step(loss=torch.tensor(1.0), **{"val_" + os.fsdecode(b"caf\xe9"): 1.0})
        w.event("log", {"file": bad})
        with pytest.raises(ValueError, match=r"unknown event kind 'caf\\udce9'"):
            w.event(os.fsdecode(b"caf\xe9"), {"file": bad})  # the kind is no data: named
        w.step(loss=torch.tensor(0.5))
    assert w.step_count == 2
    texts = list(read_spool(tmp_path / "spool.bin"))
    logged = [wire.parse_trainer_frame(t, run_id="w1") for t in texts[1:]]  # as the server
    assert [f["data"] for f in logged if f.get("kind") == "log"] == [{"file": "/data/caf\\xe9.npz"}]
    hello = json.loads(texts[0])
    assert hello["name"] == "run caf\\xe9"
    assert hello["config"]["data"] == os.fsencode(bad).decode("utf-8", "backslashreplace")
    assert hello["config"]["k\\xff"] == ["/data/caf\\xe9.npz"]
    with pytest.raises(ValueError, match=r"run_id 'w\\udce9' holds U\+DCE9"):
        watch(model, opt, server="", run_id="w" + os.fsdecode(b"\xe9"), run_dir=tmp_path)
