"""Commands steer the optimizer exactly as the user asked, once, whatever the user's loop does."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from layerscope.trainer import wire
from layerscope.trainer.checkpoint import (
    CheckpointError,
    load_training_state,
    read_checkpoint,
    restore_commands,
)
from layerscope.trainer.control import Control
from layerscope.trainer.rules import Rules
from torch import nn
from waiting import wait_until

_seq = iter(range(1, 10_000))


def cmd(
    name: str, cmd_seq: int | None = None, cmd_id: str | None = None, **args: Any
) -> dict[str, Any]:
    frame = {"name": name, "args": args, "cmd_seq": cmd_seq or next(_seq)}
    if cmd_id:
        frame["id"] = cmd_id
    return wire.validate_command_frame(frame)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def results(self) -> list[dict[str, Any]]:
        return [d for k, d in self.events if k == "command_result"]


def sgd_step(w: nn.Parameter, opt: torch.optim.Optimizer) -> float:
    """One plain-SGD step with gradient 1: the parameter moves by exactly the lr used."""
    before = w.detach().clone()
    opt.zero_grad()
    w.sum().backward()
    opt.step()
    return float((before - w.detach())[0])


def test_duplicate_delivery_applies_once_and_halving_twice_quarters_lr() -> None:
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1)
    rec = Recorder()
    control = Control(None, opt, emit=rec)
    half = cmd("set_lr_scale", cmd_id="a" * 32, value=0.5)
    control.submit(half)
    control.submit(half)  # the same command delivered twice (e.g. resent after a reconnect)
    control.submit(dict(half, cmd_seq=half["cmd_seq"] + 1000))  # same id, new seq: still a repeat
    control.at_step_boundary(step=1)
    assert len(rec.results()) == 1
    assert sgd_step(w, opt) == pytest.approx(0.05)
    control.submit(cmd("set_lr_scale", value=0.25))  # "halve" again sends the target 0.25
    control.at_step_boundary(step=2)
    assert sgd_step(w, opt) == pytest.approx(0.025)
    assert opt.param_groups[0]["lr"] == 0.1  # the user's value is untouched between steps
    assert control.used_lr == [pytest.approx(0.025)]
    results = rec.results()
    assert [r["ok"] for r in results] == [True, True]
    assert results[1]["state"]["lr_scale"] == 0.25
    assert results[1]["applied_at_step"] == 2


def _scheduled(kind: str, opt: torch.optim.Optimizer) -> Any:
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.5, total_steps=30, cycle_momentum=False
    )


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "assign"])
def test_lr_scale_survives_schedulers_and_per_iteration_assignment(kind: str) -> None:
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.2)
    ref_w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ref_opt = torch.optim.SGD([ref_w], lr=0.2)  # the same schedule, never steered
    sched = ref_sched = None
    if kind != "assign":
        sched, ref_sched = _scheduled(kind, opt), _scheduled(kind, ref_opt)
    control = Control(None, opt)
    control.submit(cmd("set_lr_scale", value=0.5))
    control.at_step_boundary(step=0)
    for t in range(20):
        if kind == "assign":
            for o in (opt, ref_opt):
                o.param_groups[0]["lr"] = 0.3 / (t + 1)
        user_lr = ref_opt.param_groups[0]["lr"]
        assert opt.param_groups[0]["lr"] == pytest.approx(user_lr)  # schedule not disturbed
        assert sgd_step(w, opt) == pytest.approx(0.5 * user_lr)
        assert sgd_step(ref_w, ref_opt) == pytest.approx(user_lr)
        if sched is not None and ref_sched is not None:
            sched.step()
            ref_sched.step()


def test_weight_decay_off_and_on_keeps_zero_groups_at_zero() -> None:
    a = nn.Parameter(torch.ones(1, dtype=torch.float64))
    b = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD(
        [{"params": [a], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}], lr=0.1
    )
    control = Control(None, opt)

    def step() -> tuple[float, float]:
        before = (float(a.detach()), float(b.detach()))
        opt.zero_grad()
        ((a + b).sum() * 0).backward()  # gradient 0: any movement is weight decay
        opt.step()
        return before[0] - float(a.detach()), before[1] - float(b.detach())

    da, db = step()
    assert da == pytest.approx(0.1 * 0.5 * 1.0) and db == 0.0
    control.submit(cmd("set_weight_decay", enabled=False))
    control.at_step_boundary(step=1)
    assert step() == (0.0, 0.0)
    assert control.used_weight_decay == [0.0, 0.0]
    assert opt.param_groups[0]["weight_decay"] == 0.5
    control.submit(cmd("set_weight_decay", enabled=True))
    control.at_step_boundary(step=2)
    da, db = step()
    assert da > 0.0 and db == 0.0
    assert control.used_weight_decay == [0.5, 0.0]


def test_switching_weight_decay_on_where_every_group_has_none_is_refused_with_why() -> None:
    """set_weight_decay on, on a run whose every group has weight decay 0 (SGD's default),
    was acknowledged ("set_weight_decay on applied at step 451") while the decay stayed 0:
    DESIGN §4 keeps a group whose weight decay is 0 at 0. It is refused, saying why and how
    to get weight decay; off stays harmless, and one group with decay is enough."""
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1)
    events = Recorder()
    control = Control(None, opt, emit=events)
    assert control.weight_decay_settable is False
    control.submit(cmd("set_weight_decay", enabled=True))
    control.at_step_boundary(step=451)
    (refused,) = events.results()
    assert refused["ok"] is False and refused["applied_at_step"] == 451
    assert refused["error"].startswith(
        "this run's weight decay is 0 in every param group: switching it on changes nothing"
    )
    assert "--weight-decay 1e-3 --auto-weight-decay" in refused["error"]
    control.submit(cmd("set_weight_decay", enabled=False))
    control.at_step_boundary(step=452)
    assert events.results()[-1]["ok"] is True
    assert events.results()[-1]["state"]["weight_decay_enabled"] is False
    sgd_step(w, opt)
    assert control.used_weight_decay == [0.0] and opt.param_groups[0]["weight_decay"] == 0.0
    control.submit(cmd("set_weight_decay", enabled=True))
    control.at_step_boundary(step=453)
    assert events.results()[-1]["ok"] is False
    assert events.results()[-1]["state"]["weight_decay_enabled"] is False  # refused: unchanged

    # a group given decay since (the user's code): switchable, at the next step
    opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "weight_decay": 0.01})
    sgd_step(w, opt)
    assert control.weight_decay_settable is True
    control.submit(cmd("set_weight_decay", enabled=True))
    control.at_step_boundary(step=454)
    assert events.results()[-1]["ok"] is True
    assert Control(None, torch.optim.Adam([w], weight_decay=0.1)).weight_decay_settable is True


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_frozen_layers_stay_bit_identical(make_opt: Any) -> None:
    torch.manual_seed(0)
    first, head = nn.Linear(4, 8), nn.Linear(8, 1)
    model = nn.Sequential(nn.Sequential(first, nn.ReLU()), head)
    # The frozen layer has a param group of its own, which is empty during frozen steps.
    opt = make_opt([{"params": first.parameters()}, {"params": head.parameters()}])
    rec = Recorder()
    control = Control(model, opt, emit=rec)
    x = torch.randn(16, 4)

    def train(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    train(3)  # momentum and Adam moments are non-zero before the freeze
    control.submit(cmd("set_frozen", layers=["0"], frozen=True))
    control.at_step_boundary(step=3)
    frozen_before = [p.detach().clone() for p in first.parameters()]
    head_before = head.weight.detach().clone()
    train(4)
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, first.parameters(), strict=True))
    assert not torch.equal(head_before, head.weight)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]  # whole again between steps
    control.submit(cmd("set_frozen", layers=["0"], frozen=False))
    control.at_step_boundary(step=7)
    train(1)
    assert not torch.equal(frozen_before[0], first.weight)
    assert [r["state"]["frozen"] for r in rec.results()] == [["0"], []]


def test_freezing_either_side_of_a_tied_weight_freezes_it() -> None:
    """named_parameters() lists a weight shared by two layers once, under its first name,
    so freezing the second layer (an output head tied to the embedding) was acknowledged
    while the weight kept training."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    control = Control(model, opt, emit=Recorder())
    control.submit(cmd("set_frozen", layers=["1"], frozen=True))
    control.at_step_boundary(step=0)
    before = embed.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.arange(10)).logsumexp(1).mean().backward()
        opt.step()
    assert torch.equal(before, embed.weight)


def test_a_tied_weight_frozen_through_one_layer_is_acknowledged_on_every_layer_it_freezes() -> None:
    """Freezing the embedding also froze the output head sharing its weight (one
    Parameter), while the acknowledged state named the embedding alone: the page showed
    the head training. Now every layer whose parameters are all frozen is named; one that
    shares only some (its bias trains) is not; unfreezing either side unfreezes both."""
    torch.manual_seed(0)
    embed, head, proj = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False), nn.Linear(4, 10)
    head.weight = proj.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head, "proj": proj})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rules = Rules()
    rec = Recorder()
    control = Control(model, opt, emit=rec, rules=rules)

    def train() -> None:
        opt.zero_grad()
        h = embed(torch.arange(10))
        (head(h) + proj(h)).logsumexp(1).mean().backward()
        opt.step()

    control.submit(cmd("set_frozen", layers=["embed"], frozen=True))
    control.at_step_boundary(step=0)
    weight, bias = embed.weight.detach().clone(), proj.bias.detach().clone()
    train()
    assert torch.equal(weight, embed.weight) and not torch.equal(bias, proj.bias)
    assert rec.results()[-1]["state"]["frozen"] == ["embed", "head"]
    assert rules.frozen == {"embed", "head"}
    control.submit(cmd("set_frozen", layers=["head"], frozen=False))
    control.at_step_boundary(step=1)
    train()
    assert not torch.equal(weight, embed.weight)
    assert rec.results()[-1]["state"]["frozen"] == [] and rules.frozen == set()


def test_unfreezing_part_of_a_frozen_layer_acknowledges_what_stays_frozen() -> None:
    """Unfreezing encoder.0 inside a frozen encoder was acknowledged as still frozen:
    ['encoder'] (and encoder.0 kept its weights). Now encoder.0 trains and the state names
    encoder.1, the part still frozen; a layer without parameters stays as named."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = Recorder()
    control = Control(model, opt, emit=rec)
    control.submit(cmd("set_frozen", layers=["encoder", "act"], frozen=True))
    control.submit(cmd("set_frozen", layers=["encoder.0"], frozen=False))
    control.at_step_boundary(step=0)
    assert [r["state"]["frozen"] for r in rec.results()] == [
        ["act", "encoder"],
        ["act", "encoder.1"],
    ]
    first, second = (layer.weight.detach().clone() for layer in model.encoder)
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(first, model.encoder[0].weight)
    assert torch.equal(second, model.encoder[1].weight)


def as_event(result: dict[str, Any]) -> dict[str, Any]:
    """The command_result as the server validates it (its data at most 64 KiB as JSON)."""
    frame = {"type": "event", "seq": 1, "step": 1, "kind": "command_result", "data": result}
    return wire.parse_trainer_frame(wire.encode(frame), run_id="r")


def test_a_huge_set_frozen_gets_a_result_the_server_accepts_and_a_one_line_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """set_frozen naming 2,048 bogus layers of 256 characters: the result echoed the 530 KB
    of args and an error quoting every name (1 MB), which the server refused (its seq then
    blocked every later ack), and the terminal got a 530 KB warning line."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    control = Control(model, torch.optim.SGD(model.parameters(), lr=0.1), emit=Recorder())
    names = [f"{k:04d}" + "x" * 252 for k in range(wire.MAX_LAYERS)]
    with caplog.at_level(logging.WARNING, logger="layerscope.trainer.control"):
        result = control.apply(cmd("set_frozen", layers=names, frozen=True), step=10)
    assert result is not None and result["ok"] is False
    assert result["error"] == (
        f"unknown layer(s) {names[:5]!r} and 2,043 more; this model's layers with parameters"
        " are 0, 2"
    )
    echoed = result["args"]
    assert echoed["frozen"] is True and echoed["layers"] == names[: len(echoed["layers"])]
    assert len(echoed["layers"]) >= 10 and echoed["layers_omitted"] == 2048 - len(echoed["layers"])
    assert len(json.dumps(echoed)) <= 4096
    assert as_event(result)["data"]["error"] == result["error"]  # the server stores it
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and len(line) < 400
    assert line.startswith("command set_frozen failed: unknown layer(s) ['0000xxx")
    # A command that fits is echoed whole.
    ok = control.apply(cmd("set_frozen", layers=["0"], frozen=True), step=11)
    assert ok is not None and ok["args"] == {"layers": ["0"], "frozen": True}
    assert ok["state"]["frozen"] == ["0"]


def test_a_frozen_list_too_long_for_one_event_is_cut_and_counted() -> None:
    """Freezing 400 layers of 200-character names: the state alone (their names) is 82 KB,
    over what one event holds. The layers are frozen; the acknowledged list is cut to fit,
    ``frozen_omitted`` saying how many it leaves out."""
    keys = [f"{k:03d}" + "l" * 197 for k in range(400)]
    model = nn.ModuleDict({key: nn.Linear(1, 1) for key in keys})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    control = Control(model, opt, emit=Recorder())
    result = control.apply(cmd("set_frozen", layers=keys, frozen=True), step=3)
    assert result is not None and result["ok"] is True
    state = result["state"]
    assert state["frozen"] == sorted(keys)[: len(state["frozen"])]
    assert state["frozen_omitted"] == 400 - len(state["frozen"]) and state["frozen_omitted"] > 0
    assert result["args"]["layers_omitted"] > 0
    as_event(result)
    assert control.state()["frozen"] == sorted(keys)  # all frozen, whatever the event shows


def test_freezing_a_layer_another_optimizer_trains_is_refused() -> None:
    """A GAN watched with its generator's optimizer: freezing the discriminator was
    acknowledged (frozen: ['D']) while the discriminator's own optimizer kept training it.
    A layer whose parameters the script froze and left out of the optimizer is accepted:
    nothing trains it."""
    torch.manual_seed(0)
    gan = nn.ModuleDict(
        {"G": nn.Linear(4, 2), "D": nn.Linear(2, 1), "E": nn.Linear(2, 2).requires_grad_(False)}
    )
    opt_g = torch.optim.Adam(gan["G"].parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(gan["D"].parameters(), lr=1e-2)
    rec = Recorder()
    control = Control(gan, opt_g, emit=rec)
    control.submit(cmd("set_frozen", layers=["D"], frozen=True))
    control.submit(cmd("set_frozen", layers=["E"], frozen=True))
    control.submit(cmd("set_frozen", layers=["G"], frozen=True))
    control.at_step_boundary(step=2)
    d_result, e_result, g_result = rec.results()
    assert d_result["ok"] is False
    assert "['D'] have parameters that are not in the watched optimizer" in d_result["error"]
    assert e_result["ok"] and g_result["ok"] and g_result["state"]["frozen"] == ["E", "G"]
    before = {name: p.detach().clone() for name, p in gan.named_parameters()}
    for opt in (opt_d, opt_g):
        opt.zero_grad()
        gan["D"](gan["G"](torch.randn(8, 4))).pow(2).mean().backward()
        opt.step()
    changed = {name for name, p in gan.named_parameters() if not torch.equal(before[name], p)}
    assert changed == {"D.weight", "D.bias"}  # trained by its own optimizer, as refused


def _raise() -> float:
    raise RuntimeError("CUDA out of memory (simulated inside optimizer.step)")


def test_a_step_that_raises_leaves_the_groups_as_the_user_set_them() -> None:
    """optimizer.step() raising (a caught out-of-memory error) skips the post-hook: the
    scaled lr, the switched-off decay and the frozen layer's absence are undone at the next
    step boundary, so the next step uses lr x scale once (not compounded), unfreezing and
    decay-on take effect, and close() leaves the user's values; a value the user's code
    assigned after the raise is theirs and stays."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    control = Control(model, opt)
    for command in (cmd("set_lr_scale", value=0.5), cmd("set_weight_decay", enabled=False),
                    cmd("set_frozen", layers=["0"], frozen=True)):  # fmt: skip
        control.submit(command)
    control.at_step_boundary(step=1)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(_raise)
    group = opt.param_groups[0]  # undone as the exception left optimizer.step()
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.01 and len(group["params"]) == 4
    control.at_step_boundary(step=2)
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.01 and len(group["params"]) == 4

    opt.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert control.used_lr == [pytest.approx(0.05)] and control.used_weight_decay == [0.0]
    control.submit(cmd("set_frozen", layers=["0"], frozen=False))
    control.submit(cmd("set_weight_decay", enabled=True))
    control.at_step_boundary(step=3)
    before = model[0].weight.detach().clone()
    opt.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight) and control.used_weight_decay == [0.01]

    with pytest.raises(RuntimeError):  # raises again; the user then assigns an lr
        opt.step(_raise)
    group["lr"] = 0.2
    control.close()
    assert group["lr"] == 0.2 and group["weight_decay"] == 0.01 and len(group["params"]) == 4


def _chainable(kind: str, opt: torch.optim.Optimizer) -> Any:
    """A scheduler that computes each lr from the group's current one."""
    if kind == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)


def _refuse_nonfinite(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A user's NaN check, registered after watch(): it raises inside optimizer.step()."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise FloatingPointError("non-finite gradient; step skipped")


@pytest.mark.parametrize("kind", ["exponential", "step"])
@pytest.mark.parametrize("first", ["scheduler", "control"])
def test_a_raising_step_does_not_bake_the_lr_scale_into_a_chainable_scheduler(
    kind: str, first: str
) -> None:
    """Halve the lr, let one optimizer.step() raise (a NaN check), catch it, step the
    scheduler and go on: the scheduler computes from the user's lr, not the halved one,
    so afterwards the lr used is the schedule's x 0.5, and after set_lr_scale(1) exactly
    the schedule's (an unsteered optimizer with the same scheduler is the reference).
    Either creation order; no scheduler warning (warnings are errors here)."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.2)
    ref_w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ref_opt = torch.optim.SGD([ref_w], lr=0.2)
    ref_sched = _chainable(kind, ref_opt)
    sched = _chainable(kind, opt) if first == "scheduler" else None
    control = Control(None, opt)
    sched = sched or _chainable(kind, opt)
    opt.register_step_pre_hook(_refuse_nonfinite)
    control.submit(cmd("set_lr_scale", value=0.5))
    for t in range(1, 9):
        control.at_step_boundary(step=t)
        opt.zero_grad()
        ref_opt.zero_grad()
        (w.sum() * (math.nan if t == 3 else 1.0)).backward()
        ref_w.sum().backward()
        try:
            opt.step()
        except FloatingPointError:
            assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        else:
            assert control.used_lr == [ref_opt.param_groups[0]["lr"] * 0.5]
        ref_opt.step()
        sched.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert sgd_step(w, opt) == pytest.approx(0.5 * ref_opt.param_groups[0]["lr"])
    control.submit(cmd("set_lr_scale", value=1.0))
    control.at_step_boundary(step=9)
    assert sgd_step(w, opt) == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert control.used_lr == [ref_opt.param_groups[0]["lr"]]
    control.close()
    sched.step()  # the scheduler goes on working with the watch closed
    opt.step()


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_scheduler_step_after_a_raise_past_the_wrapper_is_kept_for_a_tensor_lr(
    tensor_lr: bool,
) -> None:
    """A step called past the raise-undoing wrapper (a bound optimizer.step kept from
    before the watch, as a trainer object built first holds it) raises; the loop steps
    its scheduler, then the next step boundary undoes the hook. A float lr the scheduler
    assigned stays (not the hook's); a tensor lr (capturable/fused optimizers) the
    scheduler writes in place, and was put back as before the raise, the scheduler's
    step lost. Both now keep it, the tensor one in the user's own tensor."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    lr0 = torch.tensor(1.0, dtype=torch.float64) if tensor_lr else 1.0
    opt = torch.optim.SGD([w], lr=lr0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    step_past_wrapper = opt.step
    control = Control(None, opt)
    opt.register_step_pre_hook(_refuse_nonfinite)
    control.submit(cmd("set_lr_scale", value=0.1))
    control.at_step_boundary(step=1)
    opt.zero_grad()
    (w.sum() * math.nan).backward()
    with pytest.raises(FloatingPointError):
        step_past_wrapper()
    sched.step()  # from the scaled lr the hook left: 1.0 x 0.1 x 0.5
    control.at_step_boundary(step=2)
    group = opt.param_groups[0]
    assert float(group["lr"]) == pytest.approx(0.05)  # the scheduler's, not 1.0
    if tensor_lr:
        assert group["lr"] is lr0
    opt.zero_grad()
    w.sum().backward()
    opt.step()
    assert control.used_lr == [pytest.approx(0.005)] and float(group["lr"]) == pytest.approx(0.05)
    control.close()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# torch's own: dynamo tracing SGD.step touches torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_optimizer_step_is_steered_without_a_graph_break_warning() -> None:
    """PyTorch's compiled-optimizer recipe (an lr tensor, optimizer.step() inside a
    torch.compile'd function): traced, the hooks read the lr used as a float, and dynamo
    logged a 19-line 'Graph break from Tensor.item()' warning pointing into control.py.
    They run outside the trace now, and still on every call: a new scale, or an lr a
    scheduler wrote in place, takes effect at the next compiled step."""
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    lr = torch.tensor(0.2, dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=lr)
    control = Control(None, opt)
    control.submit(cmd("set_lr_scale", value=0.5))
    control.at_step_boundary(step=1)
    step = torch.compile(lambda: opt.step(), backend="eager")
    lines = _Lines()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(lines)
    moved = []
    try:
        for t, (scale, new_lr) in enumerate([(0.5, 0.2), (0.5, 0.2), (1.0, 0.2), (0.25, 0.4)]):
            control.submit(cmd("set_lr_scale", value=scale))
            lr.fill_(new_lr)  # a scheduler's write
            control.at_step_boundary(step=t + 2)
            before = w.detach().clone()
            w.grad = torch.ones(1, dtype=torch.float64)
            step()
            moved.append(float((before - w.detach())[0]))
    finally:
        dynamo_log.removeHandler(lines)
        control.close()
    assert moved == pytest.approx([0.1, 0.1, 0.2, 0.1])
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.4
    assert not [line for line in lines.lines if "Graph break" in line], lines.lines


class _Subclassed(torch.optim.SGD):
    def step(self, closure: Any = None) -> Any:  # torch wraps both steps: hooks run twice
        return super().step(closure)


def test_an_optimizer_subclass_whose_hooks_run_twice_is_scaled_once() -> None:
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = _Subclassed([w], lr=0.1)
    control = Control(None, opt)
    control.submit(cmd("set_lr_scale", value=0.5))
    control.at_step_boundary(step=1)
    assert [sgd_step(w, opt) for _ in range(3)] == [pytest.approx(0.05)] * 3
    assert opt.param_groups[0]["lr"] == 0.1


def test_unknown_layer_is_a_failed_result_not_a_crash() -> None:
    """The error names the layers this model has (not another model's 'fc1')."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    rec = Recorder()
    control = Control(model, torch.optim.SGD(model.parameters(), lr=0.1), emit=rec)
    control.submit(cmd("set_frozen", layers=["encoder"], frozen=True))
    control.at_step_boundary(step=5)
    (result,) = rec.results()
    assert result["ok"] is False and "encoder" in result["error"]
    assert result["error"].endswith("this model's layers with parameters are 0, 2")
    assert result["state"]["frozen"] == []


def _boundary_in_thread(control: Control, step: int) -> threading.Thread:
    t = threading.Thread(target=control.at_step_boundary, args=(step,), daemon=True)
    t.start()
    return t


def test_pause_blocks_until_resume_and_step_once_lets_one_step_through() -> None:
    rec = Recorder()
    control = Control(None, None, emit=rec)
    control.submit(cmd("pause"))
    t = _boundary_in_thread(control, 1)
    # The thread applies the pause when it gets to run, which a loaded machine may delay.
    wait_until(lambda: control.paused)
    t.join(0.5)
    assert t.is_alive()
    control.submit(cmd("step_once"))
    t.join(30)
    assert not t.is_alive()  # one step let through ...
    t = _boundary_in_thread(control, 2)
    t.join(0.5)
    assert t.is_alive()  # ... and the next boundary blocks again
    control.submit(cmd("resume"))
    t.join(30)
    assert not t.is_alive() and not control.paused
    statuses = [d["status"] for k, d in rec.events if k == "status"]
    assert statuses == ["paused", "running"]


def test_stop_unblocks_a_paused_loop() -> None:
    rec = Recorder()
    control = Control(None, None, emit=rec)
    control.submit(cmd("pause"))
    t = _boundary_in_thread(control, 1)
    wait_until(lambda: control.paused)  # stop must find the loop blocked, not queued with pause
    t.join(0.3)
    assert t.is_alive()
    control.submit(cmd("stop"))
    t.join(30)
    assert not t.is_alive() and control.stopping and control.state()["stopping"]
    # The loop runs on until it reads should_stop: it is not shown as paused meanwhile.
    assert not control.paused and control.status == "running"
    statuses = [d["status"] for kind, d in rec.events if kind == "status"]
    assert statuses == ["paused", "running"]
    assert rec.results()[-1]["state"]["paused"] is False
    assert control.stopped_by == {"source": "user", "reason": None}


def test_stopped_by_names_the_first_stop_applied() -> None:
    control = Control(None, None)
    assert control.stopped_by is None
    control.apply({**cmd("stop"), "source": "rule", "reason": "NaN/Inf in the loss at step 4"}, 4)
    control.apply({**cmd("stop"), "source": "user"}, 5)  # a later stop does not rewrite it
    assert control.stopped_by == {"source": "rule", "reason": "NaN/Inf in the loss at step 4"}


class _SelfTuning(torch.optim.Optimizer):
    """Plain SGD that adapts its own lr inside step() (as line-search or learning-rate-free
    optimizers do)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
            group["lr"] = group["lr"] * 0.9
        return None


def test_an_optimizer_that_sets_its_own_lr_keeps_it_when_nothing_is_scaled() -> None:
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = _SelfTuning([w], lr=0.1)
    Control(None, opt)
    for expected in (0.1, 0.09, 0.081):
        assert sgd_step(w, opt) == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0729)


def test_checkpoint_holds_model_optimizer_step_and_control(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    rec = Recorder()
    control = Control(model, opt, checkpoint_dir=tmp_path, emit=rec)
    control.submit(cmd("set_lr_scale", value=0.5))
    control.submit(cmd("checkpoint"))
    control.at_step_boundary(step=12)
    path = tmp_path / "checkpoint-12.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 12
    assert saved["control"]["lr_scale"] == 0.5
    assert torch.equal(saved["model"]["weight"], model.weight)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert 0 in saved["optimizer"]["state"]
    assert ("checkpoint", {"path": str(path), "step": 12}) in rec.events


def _scheduled_run(scale: float = 2.0) -> tuple[nn.Module, torch.optim.Optimizer, Any, Any]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched, torch.amp.GradScaler("cpu", init_scale=scale)


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_checkpoint_extras_hold_each_state_dict_and_load_back(tmp_path: Path) -> None:
    """A resumed OneCycleLR/StepLR/GradScaler restarted from its beginning: the checkpoint
    held no state but the model's and the optimizer's. Each checkpoint_extras object's
    state_dict() is now in it, and load_training_state puts every piece back."""
    model, opt, sched, scaler = _scheduled_run(scale=512.0)
    control = Control(
        model, opt, checkpoint_dir=tmp_path, extras={"scheduler": sched, "scaler": scaler},
        run_id="r1",
    )  # fmt: skip
    _train(model, opt, sched, 3)
    path = control.checkpoint(3)
    assert control.snapshot(3)["extras"] == control.snapshot(3, copy=False)["extras"]
    control.close()
    go_on = _train(model, opt, sched, 3)

    model2, opt2, sched2, scaler2 = _scheduled_run()
    content, label = read_checkpoint(path)
    assert (label, content["run_id"], sorted(content["extras"])) == (
        "checkpoint-3.pt", "r1", ["scaler", "scheduler"],
    )  # fmt: skip
    load_training_state(content, label, model2, opt2, {"scheduler": sched2, "scaler": scaler2})
    assert scaler2.get_scale() == 512.0 and sched2.last_epoch == 3
    assert _train(model2, opt2, sched2, 3) == go_on  # the schedule goes on where it was
    assert torch.equal(model2.weight, model.weight)  # momentum came back with the optimizer
    # a loaded dict is taken as it is, named by its step
    assert read_checkpoint(torch.load(path, weights_only=True))[1] == "a checkpoint at step 3"


def test_a_checkpoint_and_a_resume_naming_other_pieces_is_refused_before_loading(
    tmp_path: Path,
) -> None:
    model, opt, sched, _ = _scheduled_run()
    control = Control(model, opt, checkpoint_dir=tmp_path, extras={"scheduler": sched})
    content, label = read_checkpoint(control.checkpoint(0))
    control.close()
    fresh, opt2, sched2, scaler2 = _scheduled_run()
    with torch.no_grad():
        fresh.weight.add_(1.0)
    before = fresh.weight.detach().clone()
    for extras, match in (
        ({}, r"holds state for \['scheduler'\]; pass .*checkpoint_extras=\{'scheduler'"),
        ({"scheduler": sched2, "scaler": scaler2}, r"no state for checkpoint_extras \['scaler'\]"),
    ):
        with pytest.raises(CheckpointError, match=match):
            load_training_state(content, label, fresh, opt2, extras)
    with pytest.raises(CheckpointError, match="holds optimizer state but watch.. was given no"):
        load_training_state(content, label, fresh, None, {"scheduler": sched2})
    with pytest.raises(CheckpointError, match="tensor weight has shape"):
        load_training_state(content, label, nn.Linear(3, 5), opt2, {"scheduler": sched2})
    assert torch.equal(fresh.weight, before)  # nothing was loaded
    with pytest.raises(TypeError, match=r"checkpoint_extras\['sched'\]: a function has no"):
        Control(model, opt, extras={"sched": lambda: None})
    with pytest.raises(CheckpointError, match="not a layerscope checkpoint"):
        read_checkpoint({"step": 3})
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "checkpoint-9.pt")
    # an extra whose state torch.load(weights_only=True) refuses is named, with the way round
    odd = tmp_path / "odd.pt"
    torch.save({**content, "extras": {"loader": {"order": np.arange(3)}}}, odd)
    with pytest.raises(CheckpointError, match=r"holds a numpy.*resume=torch.load\(path, weights_"):
        read_checkpoint(odd)
    assert read_checkpoint(torch.load(odd, weights_only=False))[0]["step"] == 0


def test_restore_commands_bring_back_what_changes_the_training_only() -> None:
    state = {
        "paused": True, "stopping": True, "lr_scale": 0.25, "weight_decay_enabled": False,
        "frozen": ["fc1", "fc2"], "rules": {"silenced": ["Overfit"]},
    }  # fmt: skip
    assert restore_commands(state) == [
        ("set_lr_scale", {"value": 0.25}),
        ("set_weight_decay", {"enabled": False}),
        ("set_frozen", {"layers": ["fc1", "fc2"], "frozen": True}),
    ]
    default = {"paused": False, "lr_scale": 1.0, "weight_decay_enabled": True, "frozen": []}
    assert restore_commands(default) == [] and restore_commands(None) == []


def test_close_removes_the_hooks() -> None:
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1)
    control = Control(None, opt)
    control.submit(cmd("set_lr_scale", value=0.5))
    control.at_step_boundary(step=1)
    control.close()
    assert sgd_step(w, opt) == pytest.approx(0.1)
    assert "step" not in vars(opt)  # optimizer.step is the class's again

    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    wrapped = vars(opt)["step"]  # the scheduler's wrapper, as torch puts it there
    Control(None, opt).close()
    assert vars(opt)["step"] is wrapped
    sgd_step(w, opt)
    sched.step()


# ---- rule switches ----


def test_set_rules_is_a_partial_target_state_validated_on_the_wire() -> None:
    from layerscope.trainer.rules import Rules

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    control = Control(model, opt, emit=rec, rules=Rules(silenced=["AllZero"]))
    control.apply(cmd("set_rules", silenced=["DeadUnits", "Overfit"]), 1)
    control.apply(cmd("set_rules", auto_halve_lr=True), 2)  # silenced is left as it was
    state = rec.results()[-1]["state"]["rules"]
    assert state["silenced"] == ["DeadUnits", "Overfit"] and state["auto_halve_lr"] is True
    assert state["auto_weight_decay"] is False
    control.apply(cmd("set_frozen", layers=["0"], frozen=True), 3)
    assert control.rules is not None and control.rules.frozen == {"0"}
    for bad in ({}, {"silenced": ["DeadRelu"]}, {"auto_halve_lr": "yes"}, {"patience": 2}):
        with pytest.raises(wire.WireError, match="set_rules"):
            wire.validate_command({"name": "set_rules", "args": bad})


def test_command_results_carry_source_and_reason() -> None:
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    rec = Recorder()
    control = Control(None, opt, emit=rec)
    rule = wire.validate_command(
        {"name": "set_lr_scale", "args": {"value": 0.5}, "source": "rule", "reason": "plateau"}
    )
    control.apply(rule, 4)
    control.apply(cmd("pause"), 5)
    by_rule, by_user = rec.results()
    assert (by_rule["source"], by_rule["reason"], by_rule["args"]) == (
        "rule",
        "plateau",
        {"value": 0.5},
    )
    assert by_user["source"] == "user" and "reason" not in by_user
    assert "rules" not in by_user["state"]  # a Control without rules has no rule state
