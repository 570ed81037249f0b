"""The diagnostic rules run through watch(): alert events in the spool, rule-made commands
applied like any other, the pause and last good checkpoint on NaN, live switches."""

from __future__ import annotations

import importlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from layerscope.trainer import watch, wire  # watch first, so the package binds the function
from layerscope.trainer.alerts import LAST_GOOD_NAME
from layerscope.trainer.checkpoint import load_model_weights
from layerscope.trainer.experiment import run_experiment
from layerscope.trainer.flush import rule_view
from layerscope.trainer.spool import read_spool
from layerscope.trainer.stats import PendingStats
from layerscope.trainer.watch import Watch
from torch import nn
from trainer_server import TrainerServer
from waiting import wait_until


def events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    out = []
    for text in list(read_spool(run_dir / "spool.bin"))[1:]:
        frame = wire.parse_trainer_frame(text)  # every frame as the server would accept it
        if frame["type"] == "event" and (kind is None or frame["kind"] == kind):
            out.append(frame)
    return out


def probe_steps(run_dir: Path) -> list[int]:
    """Steps of the probe frames in the spool so far; a flush's alerts are spooled with it."""
    frames = [json.loads(text) for text in list(read_spool(run_dir / "spool.bin"))[1:]]
    return [f["step"] for f in frames if f["type"] == "probe"]


def alerts(run_dir: Path) -> list[tuple[int, str, str | None]]:
    return [(e["step"], e["data"]["rule"], e["data"]["layer"]) for e in events(run_dir, "alert")]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(128, 16), torch.randint(0, 4, (128,))


def train(w: Watch, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = data()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.step(loss=loss.detach())
        if w.should_stop:
            return


def mlp(act: type[nn.Module], width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 4)
    )


def test_zero_init_relu_net_raises_dead_units_and_all_zero_naming_the_first_layer(
    tmp_path: Path,
) -> None:
    model = mlp(nn.ReLU)
    for p in model.parameters():
        nn.init.zeros_(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=5, run_dir=tmp_path) as w:
        train(w, model, opt, 10)
    found = alerts(tmp_path)
    assert (1, "DeadUnits", "1") in found  # the first ReLU, at the first probe step
    assert (1, "AllZero", "1") in found  # the ReLU sees the zero-init Linear's zeros
    # Onset only: the condition persists at steps 5 and 10 but is reported once.
    assert len([a for a in found if a[1] == "DeadUnits"]) == 1
    alert = next(e for e in events(tmp_path, "alert") if e["data"]["rule"] == "DeadUnits")
    assert alert["data"]["value"] == 1.0 and alert["data"]["threshold"] == 0.5
    assert "step 1" in alert["data"]["message"] and "He init" in alert["data"]["message"]
    # The advice fits the net the probes see (hello's kinds): a zero init, a ReLU net, no
    # gradient at all (AllZero told every run about a too-small init; VanishingGradient
    # read "at most 0" and told ReLU nets to use ReLU).
    said = {e["data"]["rule"]: e["data"]["message"] for e in events(tmp_path, "alert")}
    assert "a zero init, which never breaks symmetry" in said["AllZero"]
    assert "too-small" not in said["AllZero"] and "Use He init" in said["AllZero"]
    assert "layer 0: mean |grad| is 0, below" in said["VanishingGradient"]
    assert (
        "zero init" in said["VanishingGradient"] and "ReLU instead" not in said["VanishingGradient"]
    )


def test_overfit_on_a_saturated_tanh_net_says_to_fix_it_and_leaves_weight_decay_off(
    tmp_path: Path,
) -> None:
    """The init lab's tanh net under normal(std 1.0) init, saturated and under-fitting, was
    told at its Overfit "Add dropout ... or weight decay", and auto weight decay would have
    switched it on. With Saturation holding and training loss not fitted it is told to fix
    the layers first, and weight decay stays off."""
    model = mlp(nn.Tanh, width=256)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.01)
    with watch(model, opt, every=5, run_dir=tmp_path, auto_weight_decay=True, patience=2) as w:
        for _ in range(4):  # validation loss far above the training loss, and flat
            train(w, model, opt, 5)
            w.eval(val_loss=50.0)
        train(w, model, opt, 1)
    said = [e["data"] for e in events(tmp_path, "alert")]
    assert "Saturation" in {d["rule"] for d in said}
    (overfit,) = [d for d in said if d["rule"] == "Overfit"]
    assert (
        "still under-fitting" in overfit["message"] and "Saturation holds in" in overfit["message"]
    )
    assert "Add dropout" not in overfit["message"] and "action" not in overfit
    assert "Auto weight decay leaves weight decay off" in overfit["message"]
    decays = {r["values"].get("weight_decay") for r in rows_of(tmp_path)} - {None}
    assert decays == {0.0}  # held off from the first step, and never switched on


def test_large_normal_init_saturates_tanh(tmp_path: Path) -> None:
    model = mlp(nn.Tanh, width=256)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, every=5, run_dir=tmp_path) as w:
        train(w, model, opt, 5)
    rules = {rule: layer for _, rule, layer in alerts(tmp_path)}
    assert rules.get("Saturation") in ("1", "3")


def test_nan_pauses_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    # A server is connected: a person there can look, then resume or stop the pause.
    server = TrainerServer().start()
    try:
        w = watch(model, opt, every=2, run_dir=tmp_path, server=server.url)
        wait_until(lambda: w.link is not None and w.link.connected)
        _pause_then_stop(w, model, opt)
    finally:
        server.close()
    alert = next(e for e in events(tmp_path, "alert") if e["data"]["rule"] == "ExplodingTensor")
    good = tmp_path / LAST_GOOD_NAME
    assert alert["data"]["last_good_checkpoint"] == str(good)
    assert alert["data"]["action"]["name"] == "pause"
    # The kept checkpoint is the network before it blew up, loadable for fine-tuning.
    fresh = mlp(nn.ReLU)
    info = load_model_weights(fresh, good)
    assert info["step"] == alert["data"]["last_good_step"] < alert["step"]
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    pause = [e["data"] for e in events(tmp_path, "command_result") if e["data"]["name"] == "pause"]
    assert pause and pause[0]["source"] == "rule" and "NaN/Inf" in pause[0]["reason"]
    assert pause[0]["state"]["paused"] is True


def _pause_then_stop(w: Watch, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    t = threading.Thread(target=train, args=(w, model, opt, 10_000), daemon=True)
    t.start()
    wait_until(lambda: w.control.paused)
    paused_at = w.step_count
    time.sleep(0.3)
    assert t.is_alive() and w.step_count == paused_at, "a paused run blocks in w.step()"
    w.control.submit(wire.validate_command({"name": "stop"}))
    t.join(10)
    w.close()
    assert not t.is_alive() and paused_at < 10_000


@pytest.mark.parametrize("server", [None, "ws://127.0.0.1:9"], ids=["no server", "unreachable"])
def test_with_no_server_reachable_nan_stops_the_run_and_says_so(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    server: str | None,
) -> None:
    """No server, or one never reached (a wrong URL, a stale LAYERSCOPE_SERVER): nothing
    could resume a pause (the loop would wait in w.step() forever, silently), so the rule's
    pause becomes a stop the loop's should_stop sees, and the alert is logged for the
    terminal."""
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    with watch(model, opt, every=2, run_dir=tmp_path, progress=True, server=server) as w:
        if server is not None:  # the first try has failed before the NaN comes
            wait_until(lambda: w.link is not None and not w.link.steerable)
        t = threading.Thread(target=train, args=(w, model, opt, 10_000), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive() and w.should_stop and not w.control.paused
        assert w.step_count < 10_000
    assert "[ExplodingTensor] NaN/Inf" in caplog.text and "stopping the run" in caplog.text
    assert "(w.should_stop is now True)" in caplog.text  # watch()'s user reads it
    # the recorded alert says what happened: a stop, not the pause it would have been
    (alert,) = [
        e["data"] for e in events(tmp_path, "alert") if e["data"]["rule"] == "ExplodingTensor"
    ]
    assert "stopping the run (no server is reachable" in alert["message"]
    assert "pausing" not in alert["message"] and alert["action"]["name"] == "stop"
    assert "loss nan" in capsys.readouterr().err  # the progress line shows it too
    stop = [e["data"] for e in events(tmp_path, "command_result") if e["data"]["name"] == "stop"]
    assert stop and stop[0]["source"] == "rule" and "no server to resume it" in stop[0]["reason"]
    assert (tmp_path / LAST_GOOD_NAME).is_file()


def test_an_alert_logged_with_the_progress_line_on_starts_a_line_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The progress line is redrawn in place with no newline; a logged alert used to land
    on its end ("[layerscope] step 0  running   layerscope: [DeadUnits] ...") and the next
    redraw wrote over it."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)  # pytest's capture; as a terminal would show it
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("layerscope.trainer")
    logger.addHandler(handler)
    try:
        model = mlp(nn.ReLU)
        opt = torch.optim.SGD(model.parameters(), lr=1e6)
        with watch(model, opt, every=2, run_dir=tmp_path, progress=True, server=None) as w:
            train(w, model, opt, 200)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").split("\n")
    logged = [line for line in lines if "[ExplodingTensor]" in line]
    assert logged and all(line.startswith("layerscope: [") for line in logged), err
    assert "[layerscope] step" in err and err.endswith("\n")


def test_a_healthy_digits_run_raises_no_alert(tmp_path: Path) -> None:
    cfg = {"every": 10, "solver": {"steps": 300, "device": "cpu"}}
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path), progress=False)
    assert summary["val_acc"] > 0.9
    assert alerts(tmp_path) == []


def _lr_used(run_dir: Path) -> list[float]:
    out: list[float] = []
    for text in list(read_spool(run_dir / "spool.bin"))[1:]:
        frame = json.loads(text)
        for row in frame.get("rows", []) if frame["type"] == "metrics" else []:
            lr = row["values"].get("lr")
            if lr is not None and (not out or out[-1] != lr):
                out.append(lr)
    return out


def test_auto_halve_acts_once_per_plateau_and_the_used_lr_follows(tmp_path: Path) -> None:
    model = mlp(nn.ReLU)
    # lr 0.5, 8 steps an evaluation: training loss falls by more than PLATEAU_TRAIN_FALL_REL
    # (5%) over each plateau, as auto-halve requires (1.34 -> 1.19 over the first)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # best 0.9, then 3 evaluations without improvement (halve), 2 more (no second halving),
    # a new best, and a second plateau of 3 (halve again).
    plateau_1 = [1.0, 0.9, 0.95, 0.95, 0.95]
    more = [0.95, 0.95]
    plateau_2 = [0.5, 0.6, 0.6, 0.6]
    with watch(model, opt, every=0, run_dir=tmp_path, auto_halve_lr=True, patience=3) as w:
        for series, halvings in ((plateau_1, 1), (more, 1), (plateau_2, 2)):
            for val in series:
                train(w, model, opt, 8)
                w.eval(val_loss=val)
            expected = 0.5**halvings
            # The rule acts on the link thread; the command applies at a later w.step().
            deadline = time.monotonic() + 10.0
            while w.control.lr_scale != expected and time.monotonic() < deadline:
                train(w, model, opt, 1)
                time.sleep(0.01)
            assert w.control.lr_scale == expected
        train(w, model, opt, 2)
    assert _lr_used(tmp_path) == [0.5, 0.25, 0.125]
    plateaus = [e for e in events(tmp_path, "alert") if e["data"]["rule"] == "ValidationPlateau"]
    assert len(plateaus) == 2
    results = [
        e["data"] for e in events(tmp_path, "command_result") if e["data"]["name"] == "set_lr_scale"
    ]
    assert [h["args"]["value"] for h in results] == [0.5, 0.25]
    assert all(h["source"] == "rule" and "has not improved" in h["reason"] for h in results)


def test_set_rules_silences_and_unsilences_live(tmp_path: Path) -> None:
    model = mlp(nn.ReLU)
    for p in model.parameters():
        nn.init.zeros_(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=5, run_dir=tmp_path) as w:
        result = w.command("set_rules", {"silenced": ["DeadUnits", "AllZero"]})
        assert result["state"]["rules"]["silenced"] == ["DeadUnits", "AllZero"]
        train(w, model, opt, 10)
        # The rules judge each flush on the link thread, which may lag the training thread:
        # un-silencing before it has judged steps 1-10 would un-silence those steps too.
        wait_until(lambda: 10 in probe_steps(tmp_path))
        # Un-silenced while the units are still dead: reported at a later probe step.
        result = w.command("set_rules", {"silenced": [], "auto_halve_lr": True})
        assert result["state"]["rules"]["silenced"] == []
        assert result["state"]["rules"]["auto_halve_lr"] is True
        train(w, model, opt, 10)
    # The run's first status event carries the initial control state, rules included.
    first = events(tmp_path, "status")[0]["data"]
    assert first["status"] == "running" and first["control"]["rules"]["silenced"] == []
    assert first["control"]["rules"]["enabled"] == list(wire.RULE_NAMES)
    found = alerts(tmp_path)
    assert (1, "VanishingGradient", "0") in found  # not silenced: reported at once
    dead = [step for step, rule, _ in found if rule == "DeadUnits"]
    assert len(dead) == 1 and dead[0] > 1


def test_rules_off_and_bad_rule_names(tmp_path: Path) -> None:
    model = mlp(nn.ReLU)
    for p in model.parameters():
        nn.init.zeros_(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=5, run_dir=tmp_path / "off", rules=False) as w:
        train(w, model, opt, 5)
    assert alerts(tmp_path / "off") == []
    try:
        watch(model, opt, run_dir=tmp_path / "bad", silence=["DeadRelu"])
    except ValueError as exc:
        assert "DeadRelu" in str(exc)
    else:
        raise AssertionError("an unknown rule name must be refused")


def test_overfit_switches_weight_decay_on_once_when_auto_weight_decay_is_on(
    tmp_path: Path,
) -> None:
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.01)
    with watch(model, opt, every=0, run_dir=tmp_path, auto_weight_decay=True, patience=2) as w:
        # watch() itself holds weight decay off from the first step (the README once told
        # users to send this command themselves)
        assert w.control_state["weight_decay_enabled"] is False
        for _ in range(4):  # validation loss far above the training loss (~1.4), twice and more
            train(w, model, opt, 3)
            w.eval(val_loss=5.0)
        while not w.control.weight_decay_enabled:
            train(w, model, opt, 1)
            time.sleep(0.01)
        train(w, model, opt, 2)
    used: list[float | None] = []
    for text in list(read_spool(tmp_path / "spool.bin"))[1:]:
        frame = json.loads(text)
        for row in frame.get("rows", []) if frame["type"] == "metrics" else []:
            wd = row["values"].get("weight_decay")
            if wd is not None and (not used or used[-1] != wd):
                used.append(wd)
    assert used == [0.0, 0.01]  # off from the first step, on once Overfit fired
    overfit = [e for e in events(tmp_path, "alert") if e["data"]["rule"] == "Overfit"]
    assert len(overfit) == 1 and overfit[0]["data"]["action"]["name"] == "set_weight_decay"
    switched = [
        e["data"]
        for e in events(tmp_path, "command_result")
        if e["data"]["name"] == "set_weight_decay" and e["data"]["source"] == "rule"
    ]
    assert len(switched) == 1 and switched[0]["args"] == {"enabled": True}
    assert "Overfit" in switched[0]["reason"]
    held = [
        e["data"]
        for e in events(tmp_path, "command_result")
        if e["data"]["name"] == "set_weight_decay" and e["data"]["args"] == {"enabled": False}
    ]
    assert len(held) == 1 and held[0]["ok"] and "start without it" in held[0]["reason"]


def test_auto_weight_decay_holds_it_off_from_the_start_but_not_on_resume(tmp_path: Path) -> None:
    """watch(auto_weight_decay=True) holds weight decay off from the first step (PRACTICES:
    start without it); a run resumed after Overfit switched it on keeps it on."""
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.01)
    with watch(model, opt, every=0, run_dir=tmp_path / "a", auto_weight_decay=True) as w:
        train(w, model, opt, 2)
        assert opt.param_groups[0]["weight_decay"] == 0.01  # the user's value, restored after
        assert w.command("set_weight_decay", {"enabled": True})["ok"]  # as Overfit would
        train(w, model, opt, 1)
        assert w.command("checkpoint")["ok"]
    used = [r["values"]["weight_decay"] for r in rows_of(tmp_path / "a")]
    assert used == [0.0, 0.0, 0.01]
    model2 = mlp(nn.ReLU)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01, weight_decay=0.01)
    resume = tmp_path / "a" / "checkpoint-3.pt"
    with watch(model2, opt2, every=0, run_dir=tmp_path / "b", auto_weight_decay=True,
               resume=resume) as w:  # fmt: skip
        assert w.control_state["weight_decay_enabled"] is True
        train(w, model2, opt2, 1)
    assert [r["values"]["weight_decay"] for r in rows_of(tmp_path / "b")] == [0.01]
    assert events(tmp_path / "b", "command_result") == []


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for text in list(read_spool(run_dir / "spool.bin"))[1:]:
        frame = json.loads(text)
        out += frame.get("rows", []) if frame["type"] == "metrics" else []
    return out


def test_overfit_on_a_run_without_weight_decay_says_how_to_get_it_and_sends_nothing(
    tmp_path: Path,
) -> None:
    """An optimizer whose weight decay is 0 in every group (the run page's switch disabled,
    set_weight_decay on refused): Overfit said "Add weight decay, dropout or more data.";
    it now says how to restart with one, and auto weight decay sends no command."""
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, every=0, run_dir=tmp_path, auto_weight_decay=True, patience=2) as w:
        for _ in range(3):  # validation loss far above the training loss (~1.4)
            train(w, model, opt, 3)
            w.eval(val_loss=5.0)
        train(w, model, opt, 1)
    (overfit,) = [e["data"] for e in events(tmp_path, "alert") if e["data"]["rule"] == "Overfit"]
    assert "Add weight decay" not in overfit["message"] and "action" not in overfit
    assert "0 in every param group, so it cannot be switched on live" in overfit["message"]
    assert "--weight-decay 1e-3 --auto-weight-decay" in overfit["message"]
    assert events(tmp_path, "command_result") == []


def _overfit_said(run_dir: Path) -> list[dict[str, Any]]:
    return [e["data"] for e in events(run_dir, "alert") if e["data"]["rule"] == "Overfit"]


def _over_fit(w: Watch, model: nn.Module, opt: torch.optim.Optimizer, evals: int = 2) -> None:
    for _ in range(evals):  # validation loss far above the training loss (~1.4)
        train(w, model, opt, 3)
        w.eval(val_loss=5.0)
    train(w, model, opt, 1)


def test_overfit_advice_reads_the_weight_decay_the_steps_used(tmp_path: Path) -> None:
    """Overfit read weight decay from the validation row, which carries none (the steps'
    rows do): a run with weight decay 0.01 was told "Switch weight decay on (it is off
    now)", as was a run whose second Overfit came after auto weight decay had switched it
    on. The advice now follows the weight decay the steps before the evaluation used."""
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.01)
    with watch(model, opt, every=0, run_dir=tmp_path / "on", patience=2) as w:
        _over_fit(w, model, opt)
    (on,) = _overfit_said(tmp_path / "on")
    assert "Weight decay is on: raise it, or add dropout or more data." in on["message"]
    assert "Switch weight decay on" not in on["message"] and "action" not in on
    with watch(model, opt, every=0, run_dir=tmp_path / "off", patience=2) as w:
        assert w.command("set_weight_decay", {"enabled": False})["ok"]  # the user's switch
        _over_fit(w, model, opt)
    (off,) = _overfit_said(tmp_path / "off")
    assert "Switch weight decay on (it is off now)" in off["message"]
    run_dir = tmp_path / "auto"
    with watch(model, opt, every=0, run_dir=run_dir, auto_weight_decay=True, patience=2) as w:
        _over_fit(w, model, opt)
        while not w.control.weight_decay_enabled:  # the rule's command, applied
            train(w, model, opt, 1)
            time.sleep(0.01)
        train(w, model, opt, 2)
        w.eval(val_loss=0.0)  # the gap closes: the episode ends
        _over_fit(w, model, opt)
    acted, again = _overfit_said(run_dir)
    assert acted["action"]["name"] == "set_weight_decay"
    assert "Weight decay is on: raise it" in again["message"] and "action" not in again
    assert "Switch weight decay on" not in again["message"]


def test_the_last_good_snapshot_is_taken_at_most_once_per_min_interval(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Every good_checkpoint_every-th probe step is a candidate, but a fast loop copies
    the model and optimizer state for it at most once per GOOD_CHECKPOINT_MIN_S."""
    watch_module = importlib.import_module("layerscope.trainer.watch")  # the module, not watch()
    for min_s, expected in ((30.0, [1]), (0.0, [1, 3, 5])):
        monkeypatch.setattr(watch_module, "GOOD_CHECKPOINT_MIN_S", min_s)
        model = mlp(nn.ReLU)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        w = watch(model, opt, every=1, run_dir=tmp_path / str(min_s), good_checkpoint_every=2)
        taken: list[int] = []

        def spy(step: int, taken: list[int] = taken, real: Any = w.control.snapshot) -> Any:
            taken.append(step)
            return real(step)

        monkeypatch.setattr(w.control, "snapshot", spy)
        train(w, model, opt, 6)
        w.close()
        assert taken == expected
        assert (tmp_path / str(min_s) / LAST_GOOD_NAME).exists()


def test_an_inf_gradient_is_alerted_at_its_step_naming_its_layer(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A plain loop whose second step's gradient goes inf in one layer: the alert names
    that step and layer (it came a step later, from the NaN loss, naming no layer: the
    decoded norm was null, read as "no gradient"), and that step's snapshot, taken after
    the inf update, is not kept as the last good one. The probe frame keeps its null."""
    monkeypatch.setattr(
        importlib.import_module("layerscope.trainer.watch"), "GOOD_CHECKPOINT_MIN_S", 0.0
    )
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with watch(model, opt, every=1, run_dir=tmp_path, server=None, good_checkpoint_every=1) as w:
        for step in (1, 2, 3):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if step == 2:
                model[2].weight.grad[0, 0] = math.inf
            opt.step()
            w.step(loss=loss.detach())
    (alert,) = [e for e in events(tmp_path, "alert") if e["data"]["rule"] == "ExplodingTensor"]
    assert (alert["step"], alert["data"]["layer"]) == (2, "2")
    assert "NaN/Inf in the gradients of 2 at step 2" in alert["data"]["message"]
    assert alert["data"]["last_good_step"] == 1
    fresh = mlp(nn.ReLU)
    assert load_model_weights(fresh, tmp_path / LAST_GOOD_NAME)["step"] == 1
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    frames = [json.loads(text) for text in list(read_spool(tmp_path / "spool.bin"))[1:]]
    (probe,) = [f for f in frames if f["type"] == "probe" and f["step"] == 2]
    assert [(e["name"], e["grad_norm"] is None) for e in probe["layers"] if e["name"] in "024"] == [
        ("0", False), ("2", True), ("4", False)
    ]  # fmt: skip


def test_a_loss_scaled_past_float32_is_alerted_at_its_step_though_every_update_is_nan(
    tmp_path: Path,
) -> None:
    """loss x 1e39 makes every gradient inf and every sampled update NaN: on the host the
    NaN update section looked like a step never taken (a GradScaler's skipped step), so
    the alert came a step later, naming the weights. The probes now say the step was
    taken (the post-step hook measured it): the alert names step 2 and the first layer."""
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with watch(model, opt, every=1, run_dir=tmp_path, server=None) as w:
        for step in (1, 2, 3):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            (loss * (1e39 if step == 2 else 1.0)).backward()
            opt.step()
            w.step(loss=loss.detach())
            if w.should_stop:
                break
    (alert,) = [e for e in events(tmp_path, "alert") if e["data"]["rule"] == "ExplodingTensor"]
    assert (alert["step"], alert["data"]["layer"]) == (2, "0")
    assert "NaN/Inf in the gradients of 0" in alert["data"]["message"]


def test_the_rules_see_the_nonfinite_norms_the_decoder_made_null() -> None:
    """Known answers for a hand-built probe tail (PendingStats' layout): 2 gradient norms
    (the third parameter has none), 2 weight norms (a, b), 2 update norms (all NaN: no
    optimizer step). A non-finite gradient counts once the step applied it."""
    stats = PendingStats(
        tensor=torch.zeros(6),
        order=["a", "b"],
        grad_present=[True, True, False],
        param_layers=[("a", [0], [(0, 1.0)]), ("b", [1, 2], [(1, 1.0)])],
        weight_slots=2,
    )

    def view(values: list[float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        host = torch.tensor(values)
        layers, scalars = stats.decode(host)
        return rule_view(stats, host, layers, scalars)

    def norms(layers: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        keys = ("grad_norm", "weight_norm", "update_ratio")
        return [tuple(e[k] for k in keys) for e in layers]

    nan, inf = math.nan, math.inf
    layers, scalars = view([3.0, 4.0, 5.0, 12.0, nan, nan])
    assert scalars["grad_norm"] == 5.0 and norms(layers) == [(3.0, 5.0, None), (4.0, 12.0, None)]
    # b's gradient inf on a GradScaler's overflow step: skipped (no step: NaN updates; a
    # fused optimizer's step: zero updates), as decoded
    for skipped in ([nan, nan], [0.0, 0.0]):
        layers, scalars = view([3.0, inf, 5.0, 12.0, *skipped])
        assert scalars["grad_norm"] is None and layers[1]["grad_norm"] is None
    # ... and applied: the update went inf
    layers, scalars = view([3.0, inf, 5.0, 12.0, 0.5, inf])
    assert scalars["grad_norm"] == inf
    assert norms(layers) == [(3.0, 5.0, 0.1), (inf, 12.0, inf)]
    # a NaN gradient applied: its update is NaN where another layer's is a number
    layers, scalars = view([3.0, nan, 5.0, 12.0, 0.5, nan])
    assert math.isnan(scalars["grad_norm"]) and math.isnan(layers[1]["grad_norm"])
    assert math.isnan(layers[1]["update_ratio"]) and layers[0]["update_ratio"] == 0.1
    # a's weights NaN (from an earlier step), b's update inf
    layers, scalars = view([3.0, 4.0, nan, 12.0, 1.0, -inf])
    assert scalars["grad_norm"] == 5.0 and layers[1]["update_ratio"] == inf
    assert math.isnan(layers[0]["weight_norm"]) and layers[0]["update_ratio"] is None
    # the decoder's own entries, which go on the wire, keep their nulls
    assert stats.decode(torch.tensor([3.0, inf, 5.0, 12.0, 0.5, inf]))[0][1]["grad_norm"] is None


def test_a_grad_scaler_overflow_step_is_no_explosion(tmp_path: Path) -> None:
    """Mixed precision's GradScaler: a step whose scaled gradients overflow to inf is
    skipped by design (the scale is lowered and training goes on): no alert, no stop."""
    model = mlp(nn.ReLU)
    x, y = data()
    for fused in (False, True):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # overflows the first steps
        run_dir = tmp_path / str(fused)
        with watch(model, opt, every=1, run_dir=run_dir, server=None) as w:
            for _ in range(3):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                scaler.scale(loss * 1e3).backward()
                scaler.step(opt)
                scaler.update()
                w.step(loss=loss.detach())
        assert scaler.get_scale() < 3e38  # the steps overflowed
        assert events(run_dir, "alert") == [] and not w.should_stop


def test_an_inf_activation_is_named_by_its_layer_not_by_the_loss_it_reached(
    tmp_path: Path,
) -> None:
    """The step whose layer output went inf also has an inf loss: the alert names that
    layer (it named the training loss and no layer: the losses were fed first)."""
    model = mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    at = {"step": 0}

    def blow_up(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        return out.index_fill(1, torch.tensor([0]), math.inf) if at["step"] == 2 else None

    model[2].register_forward_hook(blow_up)  # before watch(): its probe sees the inf
    x, y = data()
    with watch(model, opt, every=1, run_dir=tmp_path, server=None) as w:
        for step in (1, 2):
            at["step"] = step
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss.detach())
    (alert,) = [e for e in events(tmp_path, "alert") if e["data"]["rule"] == "ExplodingTensor"]
    assert (alert["step"], alert["data"]["layer"]) == (2, "2")
    assert "NaN/Inf in the activations of 2 (first of " in alert["data"]["message"]
