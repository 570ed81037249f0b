"""The diagnostic rules fire on the condition they name, once per onset, and never on a
healthy run; automatic actions become ordinary, attributed commands."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from typing import Any

import pytest
from layerscope.trainer import wire
from layerscope.trainer.rule_config import PLATEAU_MAX_HALVINGS
from layerscope.trainer.rules import PLATEAU, RULE_NAMES, Finding, Rules, threshold_names

# A small ReLU MLP as the probes see it, in depth order: Linear outputs carry the
# pre-activation dead_ratio, the ReLU modules their own.
KINDS = {
    "fc0": "Linear",
    "act0": "ReLU",
    "fc1": "Linear",
    "act1": "ReLU",
    "fc2": "Linear",
    "act2": "Tanh",
    "out": "Linear",
}
PARAMS = {"fc0": 64 * 65, "fc1": 64 * 65, "fc2": 64 * 65, "out": 10 * 65}


def healthy_layers(**overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Realistic values for a network that trains: ~10% dead, ~5% saturated, std ~1."""
    layers = []
    for name, kind in KINDS.items():
        pre = kind == "Linear"
        entry: dict[str, Any] = {
            "name": name,
            "mean": 0.0 if pre else 0.4,
            "std": 1.0 if pre else 0.6,
            "min": -3.0,
            "max": 3.0,
            "zero_frac": 0.0 if pre or kind == "Tanh" else 0.5,
            "nonfinite": 0,
            "dead_ratio": 0.1 if kind in ("Linear", "ReLU") and name != "out" else None,
            "saturated_frac": 0.05 if kind == "Tanh" else None,
            "saturated_ratio": 0.05 if kind == "Tanh" else None,
            "grad_norm": 0.05 if pre else None,
            "weight_norm": 8.0 if pre else None,
            "update_ratio": 1e-3 if pre else None,
            "hist": None,
        }
        entry.update(overrides.get(name, {}))
        layers.append(entry)
    return layers


def rules(**kwargs: Any) -> Rules:
    return Rules(kinds=KINDS, params=PARAMS, **kwargs)


def healthy_loss(step: int, rng: random.Random) -> float:
    return 2.0 * math.exp(-step / 2000) + 0.1 + rng.uniform(-0.02, 0.02)


def test_a_healthy_run_raises_nothing_with_every_rule_and_both_autos_on() -> None:
    r = rules(auto_halve_lr=True, auto_weight_decay=True)
    rng = random.Random(0)
    findings: list[Finding] = []
    for step in range(2001):
        loss = healthy_loss(step, rng)
        findings += r.on_loss(step, loss)
        if step % 10 == 0:
            findings += r.on_probe(step, healthy_layers(), {"grad_norm": 0.4, "loss": loss})
        if step % 100 == 0 and step:
            train = 2.0 * math.exp(-step / 2000) + 0.1
            findings += r.on_eval(step, train * 1.05, train)
    assert findings == []


@pytest.mark.parametrize(
    ("rule", "layer", "stat", "value"),
    [("DeadUnits", "act1", "dead_ratio", 0.62), ("Saturation", "act2", "saturated_ratio", 0.8)],
)
def test_a_layer_past_half_its_units_is_named_with_value_threshold_and_a_hint(
    rule: str, layer: str, stat: str, value: float
) -> None:
    r = rules()
    found = r.on_probe(40, healthy_layers(**{layer: {stat: value}}), {})
    assert [(f.rule, f.layer, f.step, f.value, f.threshold) for f in found] == [
        (rule, layer, 40, value, 0.5)
    ]
    message = found[0].message
    assert layer in message and f"{round(value * 100)}%" in message and "50%" in message
    assert "step 40" in message and ("He init" in message or "Xavier" in message)


def test_a_linear_feeding_a_relu_module_reports_dead_units_once_through_the_relu() -> None:
    dead = {"fc1": {"dead_ratio": 0.7}, "act1": {"dead_ratio": 0.7}}
    assert [f.layer for f in rules().on_probe(1, healthy_layers(**dead), {})] == ["act1"]
    # F.relu(self.fc(x)): nothing follows the Linear that measures the same units.
    functional = [e for e in healthy_layers(**dead) if not e["name"].startswith("act")]
    (found,) = rules().on_probe(1, functional, {})
    assert found.layer == "fc1"
    # it says what it assumed, and how to say no ReLU follows (a VAE's fc_logvar read as dead)
    assert "counted as a ReLU after it would see them" in found.message
    assert "watch(activations={'fc1': 'none'})" in found.message


def test_a_probe_step_that_could_not_measure_a_ratio_neither_ends_nor_starts_an_episode() -> None:
    """A small last batch of an epoch leaves too few values per unit for a dead_ratio
    (None). That unmeasured step ended the layer's DeadUnits episode: DeadUnits fired again
    at the next measured step, every epoch, and an Overfit held back for an under-fitting
    model took the gap for "no DeadUnits alert holds now" and switched weight decay on
    (review /tmp/h17n, r3_hold3.sh: net.1 59% dead either side of the gap)."""
    r = rules()
    dead = {"act1": {"dead_ratio": 0.6}}
    unknown = {"act1": {"dead_ratio": None}}
    fired = [f.rule for f in r.on_probe(10, healthy_layers(**dead), {})]
    assert fired == ["DeadUnits"]
    assert r.on_probe(20, healthy_layers(**unknown), {}) == []
    assert r.on_probe(30, healthy_layers(**dead), {}) == []  # the same episode: no new alert
    assert ("DeadUnits", "act1") in r._active
    # a measured recovery still ends it, and a later onset is a new alert
    assert r.on_probe(40, healthy_layers(), {}) == []
    assert ("DeadUnits", "act1") not in r._active
    assert [f.rule for f in r.on_probe(50, healthy_layers(**dead), {})] == ["DeadUnits"]


def test_a_linear_feeding_a_tanh_module_or_the_loss_is_not_called_dead() -> None:
    # The Linear's dead_ratio assumes a ReLU follows; the probed Tanh says what really does,
    # and the last Linear's output is the model's output.
    layers = healthy_layers(fc2={"dead_ratio": 0.7}, out={"dead_ratio": 0.6})
    assert rules().on_probe(1, layers, {}) == []


def test_one_cause_in_many_layers_is_one_alert_per_rule_naming_where_it_starts() -> None:
    # A zero-initialised ReLU net: every unit dead, every layer's input zero, no gradients.
    zero = {
        name: {"zero_frac": 1.0, "std": 0.0, "dead_ratio": 1.0 if kind == "ReLU" else 0.0}
        | ({"grad_norm": 0.0} if kind == "Linear" else {})
        for name, kind in KINDS.items()
    }
    r = rules()
    found = {f.rule: f for f in r.on_probe(0, healthy_layers(**zero), {})}
    assert sorted(found) == ["AllZero", "DeadUnits", "VanishingGradient"]
    assert found["DeadUnits"].layers == ["act0", "act1"]
    assert found["AllZero"].layers == ["act0", "fc1", "act1", "fc2", "act2", "out"]
    assert found["AllZero"].message.startswith("layer act0: its input (the output of layer fc0)")
    assert "Also in 5 later layers: fc1, act1, fc2, act2, out." in found["AllZero"].message
    assert found["VanishingGradient"].layers == ["fc0", "fc1", "fc2", "out"]
    assert found["VanishingGradient"].to_event_data()["layers"] == ["fc0", "fc1", "fc2", "out"]
    # A layer that goes bad later is a new onset of its own.
    r = rules()
    first = r.on_probe(0, healthy_layers(act0={"dead_ratio": 0.9}), {})
    assert [(f.rule, f.layers) for f in first] == [("DeadUnits", ["act0"])]
    both = healthy_layers(act0={"dead_ratio": 0.9}, act1={"dead_ratio": 0.8})
    assert [(f.rule, f.layers) for f in r.on_probe(10, both, {})] == [("DeadUnits", ["act1"])]


def test_a_persisting_condition_fires_on_onset_only_and_again_after_it_clears() -> None:
    r = rules()
    sick = healthy_layers(act0={"dead_ratio": 0.6})
    fired = [len(r.on_probe(s, sick, {})) for s in range(0, 50, 10)]
    assert fired == [1, 0, 0, 0, 0]
    assert r.on_probe(50, healthy_layers(), {}) == []
    again = r.on_probe(60, sick, {})
    assert [(f.rule, f.layer, f.step) for f in again] == [("DeadUnits", "act0", 60)]


def test_vanishing_gradient_uses_the_rms_when_the_parameter_count_is_known() -> None:
    tiny = {"fc0": {"grad_norm": 1e-6}}  # rms = 1e-6 / sqrt(4160) ~ 1.6e-8 < 1e-7
    found = rules().on_probe(5, healthy_layers(**tiny), {})
    assert [(f.rule, f.layer) for f in found] == [("VanishingGradient", "fc0")]
    assert found[0].value == pytest.approx(1e-6 / math.sqrt(64 * 65))
    # Without the count only the norm itself is compared: 1e-6 is not below 1e-7.
    assert Rules(kinds=KINDS).on_probe(5, healthy_layers(**tiny), {}) == []
    gone = Rules(kinds=KINDS).on_probe(5, healthy_layers(fc0={"grad_norm": 0.0}), {})
    assert [(f.rule, f.layer, f.value) for f in gone] == [("VanishingGradient", "fc0", 0.0)]


def test_a_frozen_layer_is_not_reported_as_vanishing() -> None:
    r = rules()
    r.set_frozen(["fc0"], True)
    assert r.on_probe(5, healthy_layers(fc0={"grad_norm": 0.0}), {}) == []
    r.set_frozen(["fc0"], False)
    assert [f.layer for f in r.on_probe(6, healthy_layers(fc0={"grad_norm": 0.0}), {})] == ["fc0"]


def test_a_nan_loss_pauses_the_run_through_an_attributed_command() -> None:
    r = rules()
    assert r.on_loss(9, 2.3) == []
    (found,) = r.on_loss(10, float("nan"))
    assert (found.rule, found.step, found.threshold) == ("ExplodingTensor", 10, 0.0)
    assert found.action is not None and found.action["name"] == "pause"
    assert "checkpoint" in found.action["reason"]
    cmd = found.to_command()
    assert cmd is not None
    assert (cmd["name"], cmd["args"], cmd["source"]) == ("pause", {}, "rule")
    assert "NaN/Inf" in cmd["reason"] and cmd["id"]
    assert wire.validate_command(cmd) == cmd
    # The same explosion seen by the probes is the same episode: no second pause.
    nan_acts = healthy_layers(fc1={"nonfinite": 12}, act1={"nonfinite": 12})
    assert r.on_probe(10, nan_acts, {"grad_norm": float("nan")}) == []
    assert r.on_loss(11, float("inf")) == []


def test_nonfinite_activations_name_the_first_layer_in_depth_order() -> None:
    r = rules()
    nan_acts = healthy_layers(fc2={"nonfinite": 3}, act2={"nonfinite": 640}, out={"nonfinite": 1})
    (found,) = r.on_probe(20, nan_acts, {})
    assert (found.rule, found.layer) == ("ExplodingTensor", "fc2")
    assert "3 layers" in found.message
    assert found.action is not None and found.action["name"] == "pause"
    # Once everything is finite again, the next explosion is a new episode.
    assert r.on_probe(30, healthy_layers(), {}) == []
    (grad,) = r.on_probe(40, healthy_layers(), {"grad_norm": float("inf")})
    assert grad.rule == "ExplodingTensor" and "gradients" in grad.message


def test_loss_not_decreasing_fires_once_per_stall_despite_mini_batch_noise() -> None:
    r = rules()  # 100-step windows
    rng = random.Random(1)

    def feed(steps: range, level: Any, noise: float = 0.02) -> list[Finding]:
        return [f for s in steps for f in r.on_loss(s, level(s) + rng.uniform(-noise, noise))]

    assert feed(range(0, 600), lambda s: 2.0 - 0.0015 * s) == []  # falling to 1.1
    # Flat: the window 600-699 still beats 500-599; 700-799 does not, nor does 800-899 (two
    # windows in a row: reported at step 900), and the noisy windows after are the same stall.
    found = feed(range(600, 1200), lambda s: 1.1)
    assert [(f.rule, f.step, f.threshold) for f in found] == [("LossNotDecreasing", 900, 0.1)]
    assert found[0].value is not None and found[0].value < 0.1
    assert "1.1" in found[0].message
    found += feed(range(1200, 1400), lambda s: 1.1 - 0.001 * (s - 1200))  # moving again ...
    found += feed(range(1400, 1800), lambda s: 0.9, noise=0.0)  # ... so the next stall counts
    assert [f.step for f in found] == [900, 1700]


def test_loss_not_decreasing_is_quiet_at_the_floor_of_a_converged_run() -> None:
    # The digits demo: cross-entropy from ~2.3 down to ~0.03 (train accuracy ~1), where
    # mini-batch noise (a loss of 0.03 is a few misfit examples) swamps a 0.1% decrease;
    # it fired at step 6900: "a network that cannot fit ~100 examples ... is broken".
    rng = random.Random(3)

    def converging(s: int) -> float:
        return (0.03 + 2.3 * math.exp(-s / 400)) * rng.uniform(0.3, 1.7)

    r = rules()
    assert [f.step for s in range(20_000) for f in r.on_loss(s, converging(s))] == []
    # A stall far above the floor is still one: 2.3 down to 0.6, then flat.
    stuck = rules()
    found = [f for s in range(3000) for f in stuck.on_loss(s, max(0.6, 2.3 - s / 500))]
    assert [f.rule for f in found] == ["LossNotDecreasing"]
    # A converged loss that climbs back up is not at its floor any more.
    back = rules()
    for s in range(8000):
        back.on_loss(s, converging(s))
    up = [f.step for s in range(8000, 9000) for f in back.on_loss(s, 0.5 + rng.uniform(0, 0.01))]
    assert len(up) == 1
    # The fraction is a threshold like any other: 0 turns the floor off.
    strict = rules(loss_not_decreasing_converged_fraction=0.0)
    assert [f for s in range(20_000) for f in strict.on_loss(s, converging(s))] != []


def test_overfit_needs_patience_and_switches_weight_decay_on_once() -> None:
    r = rules(auto_weight_decay=True, patience=3)
    gaps = [0.05, 0.2, 0.2, 0.05, 0.2, 0.2, 0.2, 0.2, 0.2]  # (val - train) / train
    found = [f for i, gap in enumerate(gaps) for f in r.on_eval(100 * i, 0.5 * (1 + gap), 0.5)]
    # The streak broken at the 4th evaluation restarts; the 7th is the 3rd in a row.
    assert [(f.rule, f.step) for f in found] == [("Overfit", 600)]
    assert found[0].value == pytest.approx(0.2) and found[0].threshold == 0.1
    assert found[0].action is not None
    # it adds the weight decay itself: not also told to ("Add weight decay ... Switching ...")
    assert "Add weight decay" not in found[0].message
    assert "Switching weight decay on (auto weight decay)" in found[0].message
    cmd = found[0].to_command()
    assert cmd is not None
    assert (cmd["name"], cmd["args"], cmd["source"]) == (
        "set_weight_decay",
        {"enabled": True},
        "rule",
    )
    assert "Overfit" in cmd["reason"]
    # Cleared, then back: a second alert, but weight decay is not pushed on again.
    r.on_eval(1000, 0.5, 0.5)
    later = [f for s in (1100, 1200, 1300) for f in r.on_eval(s, 0.7, 0.5)]
    assert [(f.rule, f.step, f.action) for f in later] == [("Overfit", 1300, None)]
    # Switching the auto action off and on again from the UI re-arms it.
    r.set_auto(weight_decay=False)
    r.set_auto(weight_decay=True)
    r.on_eval(1400, 0.5, 0.5)
    again = [f for s in (1500, 1600, 1700) for f in r.on_eval(s, 0.7, 0.5)]
    assert [f.action is not None for f in again] == [True]


def test_overfit_compares_with_the_training_losses_since_the_last_evaluation() -> None:
    r = rules(patience=1)
    for step in range(50):
        r.on_loss(step, 0.2)
    assert r.on_eval(50, 0.21) == []
    for step in range(50, 100):
        r.on_loss(step, 0.5)
    assert r.on_eval(100, 0.52) == []  # against 0.5: the older, lower losses do not count ...
    for step in range(100, 200):
        r.on_loss(step, 0.5 if step % 2 else float("nan"))  # ... nor a NaN one
    (found,) = r.on_eval(200, 0.6)
    assert found.rule == "Overfit" and found.value == pytest.approx(0.2)
    assert r.on_eval(300, 0.9) == []  # no training loss since: nothing to compare with


def test_overfit_without_auto_weight_decay_only_alerts() -> None:
    r = rules(patience=1)
    (found,) = r.on_eval(100, 0.8, 0.5)
    assert found.rule == "Overfit" and found.action is None and found.to_command() is None


def test_all_zero_flags_the_layer_whose_input_is_all_zeros() -> None:
    r = rules()
    zeros = {"fc1": {"zero_frac": 1.0, "std": 0.0}, "act1": {"zero_frac": 1.0, "std": 0.0}}
    (found,) = [f for f in r.on_probe(7, healthy_layers(**zeros), {}) if f.rule == "AllZero"]
    assert (found.layer, found.layers, found.value, found.threshold) == (
        "act1",
        ["act1", "fc2"],
        1.0,
        1.0,
    )
    assert "output of layer fc1" in found.message and "Also in 1 later layer: fc2" in found.message
    # The first layer has no probed input; a zero model output is nobody's input.
    edge = healthy_layers(out={"zero_frac": 1.0})
    assert [f for f in rules().on_probe(7, edge, {}) if f.rule == "AllZero"] == []
    assert [f for f in rules().on_probe(7, healthy_layers(act1={"zero_frac": 0.99}), {})] == []


# The same MLP with ReLU in every hidden layer.
RELU_KINDS = {**KINDS, "act2": "ReLU"}
# What the probes saw at step 10 of the init lab's ReLU run under normal(std 1.0) init,
# on this smaller net: activations grown to std 1.5e24 (values down to -2.9e25) by fc1, so
# act1's ReLUs are all dead, its output all zeros, and nothing flows back to fc0 and fc1.
BLOWN_UP = {
    "fc0": {"std": 6.8e7, "min": -5.6e8, "max": 9.3e7, "zero_frac": 0.0, "grad_norm": 0.0},
    "act0": {"std": 4.3e6, "min": 0.0, "max": 9.3e7, "zero_frac": 0.92, "dead_ratio": 0.23},
    "fc1": {"std": 1.5e24, "min": -2.9e25, "max": -8.6e6, "dead_ratio": 1.0, "grad_norm": 0.0},
    "act1": {"std": 0.0, "min": 0.0, "max": 0.0, "zero_frac": 1.0, "dead_ratio": 1.0},
    "fc2": {"std": 5.9e3, "min": -3.5e4, "max": 0.03, "dead_ratio": 0.98, "grad_norm": 1.0},
    "act2": {"std": 0.003, "min": 0.0, "max": 0.03, "zero_frac": 0.98, "dead_ratio": 0.98},
}
# A zero-initialised net: every value of every layer 0 (no spread), no gradient but the head's.
ZERO_INIT = {
    name: {"zero_frac": 1.0, "std": 0.0, "min": 0.0, "max": 0.0}
    | ({"grad_norm": 0.0, "dead_ratio": 0.0} if kind == "Linear" and name != "out" else {})
    | ({"dead_ratio": 1.0} if kind == "ReLU" else {})
    for name, kind in KINDS.items()
}
# A too-small init, deep enough that fc1's output underflows: std falls 1e7x, then zeros.
SHRUNK = {
    "fc0": {"std": 0.02, "min": -0.07, "max": 0.07},
    "act0": {"std": 0.012, "min": 0.0, "max": 0.07},
    "fc1": {"std": 1e-9, "min": -4e-9, "max": 4e-9},
    "act1": {"std": 0.0, "min": 0.0, "max": 0.0, "zero_frac": 1.0},
}


def test_all_zero_says_what_the_layers_before_the_zeros_show() -> None:
    """AllZero said "Zero init never breaks symmetry, and a too-small init shrinks
    activations to zero layer by layer" on every run, the init lab's normal(1.0) ReLU run
    too, whose layers had blown up to 1e25 before its ReLUs died. The hint now follows the
    probe step: values grown huge, no spread from the first layer on, or shrinking."""
    relu = Rules(kinds=RELU_KINDS, params=PARAMS)
    (blown,) = [f for f in relu.on_probe(10, healthy_layers(**BLOWN_UP), {}) if f.rule == "AllZero"]
    assert blown.layer == "fc2" and "output of layer act1" in blown.message
    assert "Zero init" not in blown.message and "too-small" not in blown.message
    assert "grew to std 1.5e+24 (values as far as -2.9e+25) at layer fc1" in blown.message
    assert "from 6.8e+07 at layer fc0" in blown.message and "too-large init" in blown.message
    assert "He init" in blown.message and "Xavier" not in blown.message  # a ReLU net

    (zero,) = [
        f for f in rules().on_probe(1, healthy_layers(**ZERO_INIT), {}) if f.rule == "AllZero"
    ]
    assert "zero init" in zero.message and "symmetry" in zero.message
    assert "first probed layer, fc0" in zero.message
    assert "too-small" not in zero.message and "too-large" not in zero.message

    (small,) = [f for f in rules().on_probe(1, healthy_layers(**SHRUNK), {}) if f.rule == "AllZero"]
    assert small.layer == "fc2" and "too-small init" in small.message
    assert "shrank to std 1e-09 at layer fc1, from 0.02 at layer fc0" in small.message
    assert "Zero init" not in small.message and "too-large" not in small.message


def test_vanishing_gradient_advice_fits_the_networks_activations() -> None:
    """VanishingGradient told ReLU nets to use "ReLU instead of sigmoid/tanh" and read "mean
    |grad| is at most 0" for no gradient at all. An exact 0 now reads "is 0"; the advice
    follows the probed activations: a ReLU net with no gradient is pointed at its dead
    units or its zero init, a tanh net may be told to try ReLU."""
    relu = Rules(kinds=RELU_KINDS, params=PARAMS)
    found = relu.on_probe(10, healthy_layers(**BLOWN_UP), {})
    (gone,) = [f for f in found if f.rule == "VanishingGradient"]
    assert gone.layers == ["fc0", "fc1"] and gone.value == 0.0
    assert "layer fc0: mean |grad| is 0, below 1e-07" in gone.message
    assert "at most" not in gone.message and "sigmoid/tanh" not in gone.message
    assert "ReLU instead" not in gone.message
    assert "layer act1 after them is 100% zeros" in gone.message and "dead" in gone.message
    assert "grew to std 1.5e+24" in gone.message  # why they died, as AllZero says it
    # zero init: symmetry, whichever the activation
    for kinds, init in ((RELU_KINDS, "He"), ({**KINDS, "act0": "Tanh", "act1": "Tanh"}, "Xavier")):
        found = Rules(kinds=kinds, params=PARAMS).on_probe(1, healthy_layers(**ZERO_INIT), {})
        (zero,) = [f for f in found if f.rule == "VanishingGradient"]
        assert "mean |grad| is 0," in zero.message and "zero init" in zero.message
        assert f"{init} init" in zero.message and "ReLU instead" not in zero.message
    # a small gradient (not 0): a ReLU net gets He init and batch norm, not ReLU
    tiny = {"fc0": {"grad_norm": 1e-6}}
    (small,) = Rules(kinds=RELU_KINDS, params=PARAMS).on_probe(5, healthy_layers(**tiny), {})
    assert "mean |grad| is at most 1.6e-08" in small.message
    assert "He init" in small.message and "ReLU instead" not in small.message
    # ... a net with tanh layers may try ReLU, named after what it has
    only_tanh = {**KINDS, "act0": "Tanh", "act1": "Tanh"}
    (tanh,) = Rules(kinds=only_tanh, params=PARAMS).on_probe(5, healthy_layers(**tiny), {})
    assert "Xavier init" in tanh.message and "ReLU instead of Tanh" in tanh.message
    # ... and with no activation module probed (F.relu in forward) it cannot tell
    bare = {k: v for k, v in KINDS.items() if not k.startswith("act")}
    layers = [e for e in healthy_layers(**tiny) if e["name"] in bare]
    (unknown,) = Rules(kinds=bare, params=PARAMS).on_probe(5, layers, {})
    assert "if the hidden layers use sigmoid/tanh" in unknown.message
    # no parameter count: the norm itself, 0 read as 0
    (norm,) = Rules(kinds=RELU_KINDS).on_probe(5, healthy_layers(fc0={"grad_norm": 0.0}), {})
    assert "gradient norm is 0," in norm.message


def test_a_value_hovering_at_a_threshold_is_one_alert_until_it_clearly_recovers() -> None:
    r = rules()
    found: list[Finding] = []
    for step, g in enumerate([0.9e-7, 1.1e-7, 0.9e-7, 5e-7, 0.8e-7]):  # times sqrt(n): RMS
        layers = healthy_layers(fc1={"grad_norm": g * math.sqrt(PARAMS["fc1"])})
        found += [f for f in r.on_probe(step, layers, {}) if f.rule == "VanishingGradient"]
    assert [f.step for f in found] == [0]
    layers = healthy_layers(fc1={"grad_norm": 2e-6 * math.sqrt(PARAMS["fc1"])})
    assert r.on_probe(5, layers, {}) == []  # 20x the threshold: the episode is over
    layers = healthy_layers(fc1={"grad_norm": 0.5e-7 * math.sqrt(PARAMS["fc1"])})
    assert [f.step for f in r.on_probe(6, layers, {})] == [6]
    dead = rules()
    ratios = [0.55, 0.49, 0.56, 0.45, 0.52, 0.39, 0.51]
    fired = [
        s for s, ratio in enumerate(ratios)
        for f in dead.on_probe(s, healthy_layers(act0={"dead_ratio": ratio}), {})
        if f.rule == "DeadUnits"
    ]  # fmt: skip
    assert fired == [0, 6]  # clears below 0.4 (0.8 x 50%), at step 5


def test_dead_and_saturated_ratios_of_a_layer_with_nan_raise_no_alert() -> None:
    # NaN is neither live nor pinned: the ratios of a NaN layer read 100% dead, which is
    # ExplodingTensor's news, not a dead layer's
    sick = healthy_layers(act0={"dead_ratio": 1.0, "nonfinite": 64})
    assert [f.rule for f in rules().on_probe(3, sick, {})] == ["ExplodingTensor"]


def test_poor_initialization_fires_on_vanishing_std_only_in_the_first_probe_steps() -> None:
    shrinking = healthy_layers(fc1={"std": 0.1}, fc2={"std": 0.01}, out={"std": 0.001})
    (found,) = rules().on_probe(0, shrinking, {})
    # the last hidden pre-activation against the first: the output layer is left out
    assert (found.rule, found.layer, found.threshold) == ("PoorInitialization", "fc2", 10.0)
    assert found.value == pytest.approx(0.01)
    assert "shrinks 100x" in found.message and "from 1 at layer fc0" in found.message
    growing = healthy_layers(fc2={"std": 25.0})
    assert [f.rule for f in rules().on_probe(0, growing, {})] == ["PoorInitialization"]
    # logits alone larger or smaller (a He-initialised net's head, batch norm's unscaled
    # output layer) are not an init problem
    for head in (25.0, 0.01):
        assert rules().on_probe(0, healthy_layers(out={"std": head}), {}) == []
    late = rules()
    for step in (0, 10, 20):
        assert late.on_probe(step, healthy_layers(), {}) == []
    assert late.on_probe(30, shrinking, {}) == []
    # probing every 100: the first probe step counts, the next ones (training's scales) not
    sparse = rules()
    assert sparse.on_probe(1, healthy_layers(), {}) == []
    assert sparse.on_probe(100, shrinking, {}) == []
    assert [f.rule for f in rules().on_probe(1, shrinking, {})] == ["PoorInitialization"]
    # a run resumed from checkpoint-500 probes step 501 first: a trained net, not an init
    assert rules().on_probe(501, shrinking, {}) == []


def test_poor_initialization_compares_pre_activations_and_ignores_activation_std() -> None:
    # A tanh output squeezed to 0.05 is not a depth trend when the Linear outputs hold ~1.
    assert rules().on_probe(0, healthy_layers(act2={"std": 0.05}), {}) == []
    # With no kinds known every layer counts.
    no_kinds = healthy_layers(out={"std": 0.05})
    assert [f.rule for f in Rules().on_probe(0, no_kinds, {})] == ["PoorInitialization"]


def test_poor_initialization_does_not_compare_an_embedding_with_a_recurrent_layer() -> None:
    """An Embedding -> LSTM -> Linear model at PyTorch's defaults, its layers probed by
    type: "activation std shrinks 14.9x ... from 1 at layer emb to 0.0671 at layer rnn.
    Scale the init to the fan-in" (review /tmp/h17m, s4.py lstm types). A lookup table's
    scale and a gated layer's are no fan-in init's; with no Linear/Conv inside the network
    only activation modules are compared."""
    entries = [
        {"name": "emb", "kind": "Embedding", "std": 1.0},
        {"name": "rnn", "kind": "LSTM", "std": 0.0671},
        {"name": "fc", "kind": "Linear", "std": 0.3},
    ]
    assert Rules().on_probe(1, entries, {}) == []
    # activation modules between them still count
    tanh = [
        {"name": "emb", "kind": "Embedding", "std": 1.0},
        {"name": "act1", "kind": "Tanh", "std": 0.9},
        {"name": "act2", "kind": "Tanh", "std": 0.01},
        {"name": "fc", "kind": "Linear", "std": 0.3},
    ]
    (found,) = Rules().on_probe(1, tanh, {})
    assert found.rule == "PoorInitialization" and "from 0.9 at layer act1" in found.message


def test_silenced_rules_produce_nothing_and_unsilencing_reports_what_still_holds() -> None:
    r = rules(silenced=["DeadUnits", "ExplodingTensor"])
    sick = healthy_layers(act0={"dead_ratio": 0.9}, fc1={"nonfinite": 1})
    assert r.on_probe(10, sick, {}) == []
    assert r.on_loss(10, float("nan")) == []  # silenced: no pause either
    r.set_silenced("DeadUnits", False)
    assert [(f.rule, f.layer) for f in r.on_probe(20, sick, {})] == [("DeadUnits", "act0")]
    r.set_silenced("DeadUnits", True)
    assert r.on_probe(30, healthy_layers(act0={"dead_ratio": 0.9}), {}) == []
    assert r.state() == {
        "enabled": list(RULE_NAMES),
        "silenced": ["DeadUnits", "ExplodingTensor"],
        "auto_halve_lr": False,
        "auto_weight_decay": False,
    }


def test_disabled_rules_are_not_evaluated() -> None:
    r = rules(enabled=["Overfit"])
    sick = healthy_layers(act0={"dead_ratio": 0.9}, fc1={"nonfinite": 1}, out={"std": 1e-4})
    assert r.on_probe(0, sick, {}) == []
    assert r.on_loss(1, float("nan")) == []
    assert r.state()["enabled"] == ["Overfit"]


def test_unknown_names_and_bad_thresholds_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="DeadUnits"):
        Rules(silenced=["DeadRelu"])
    with pytest.raises(ValueError, match="unknown rule"):
        Rules(enabled=["Nope"])
    with pytest.raises(ValueError, match="overfit_ratio_threshold"):
        Rules(overfit_ratio=0.2)
    with pytest.raises(ValueError, match="finite number"):
        Rules(overfit_ratio_threshold=float("nan"))
    with pytest.raises(ValueError, match="integer >= 1"):
        Rules(patience=0)
    with pytest.raises(ValueError, match="true or false"):
        Rules(exploding_tensor_pause="yes")
    r = Rules()
    with pytest.raises(ValueError, match="Saturation"):
        r.set_silenced("saturation", True)
    assert threshold_names()["dead_units_threshold_layer"] == 0.5


def test_thresholds_are_configurable_per_run() -> None:
    sick = healthy_layers(act0={"dead_ratio": 0.6})
    assert rules(dead_units_threshold_layer=0.7).on_probe(0, sick, {}) == []
    late = rules(overfit_start_step=0, overfit_patience=1, overfit_ratio_threshold=0.5)
    assert late.on_eval(0, 0.7, 0.5) == []  # a 40% gap is under the 50% set for this run
    assert [f.rule for f in late.on_eval(1, 0.8, 0.5)] == ["Overfit"]
    (found,) = rules(exploding_tensor_pause=False).on_loss(3, float("nan"))
    assert found.action is None and "pausing" not in found.message


def plateau_vals() -> list[float]:
    """Validation losses: falling, a 4-evaluation plateau, falling again, a 5-evaluation one
    (shorter than two patience windows, so each plateau acts once)."""
    return [1.0, 0.8, 0.7, 0.71, 0.72, 0.70, 0.705, 0.6, 0.5, 0.45, 0.46, 0.455, 0.47, 0.46, 0.451]


def test_auto_halving_acts_once_per_plateau_not_every_evaluation() -> None:
    r = rules(auto_halve_lr=True, patience=3)
    found = [f for i, v in enumerate(plateau_vals()) for f in r.on_eval(100 * i, v, None)]
    assert [(f.rule, f.step) for f in found] == [(PLATEAU, 500), (PLATEAU, 1200)]
    for f in found:
        assert f.action is not None and f.action["args"] == {"relative": 0.5}
        assert f.action["source"] == "rule" and "not improved" in f.action["reason"]
    # Relative to the acknowledged scale, as the UI's own "Halve LR" does.
    first, second = (f.to_command(lr_scale) for f, lr_scale in zip(found, (1.0, 0.5), strict=True))
    assert first is not None and second is not None
    assert (first["name"], first["args"], first["source"]) == (
        "set_lr_scale",
        {"value": 0.5},
        "rule",
    )
    assert second["args"] == {"value": 0.25}


def test_a_long_plateau_halves_once_per_patience_window() -> None:
    r = rules(auto_halve_lr=True, patience=3)
    found = [f for i, v in enumerate([0.5] + [0.6] * 9) for f in r.on_eval(i, v, None)]
    assert [f.step for f in found] == [3, 6, 9]


def test_the_plateau_alert_can_be_named_and_silencing_it_is_auto_halve_off() -> None:
    # The alert's rule is ValidationPlateau: --silence ValidationPlateau was "unknown rule".
    r = rules(silenced=[PLATEAU], enabled=[*RULE_NAMES, PLATEAU])
    assert r.state()["silenced"] == []  # not one the dashboard's set_rules may name
    with pytest.raises(ValueError, match="auto-halve's alert"):
        rules(silenced=[PLATEAU], auto_halve_lr=True)
    r.set_auto(halve_lr=True)  # switched on live: its alerts are wanted again
    found = [f for i in range(5) for f in r.on_eval(100 * (i + 1), 1.0, 1.0 - 0.1 * i)]
    (halved,) = [f for f in found if f.rule == PLATEAU]
    assert halved.action is not None and halved.action["name"] == "set_lr_scale"


def test_auto_halving_waits_for_training_loss_to_fall_and_names_it() -> None:
    """PRACTICES: halve when validation stops falling *while training loss still falls*. A
    run whose training loss is flat too (lr 0, a stall) is never halved, however long."""
    flat = rules(auto_halve_lr=True, patience=3)
    found = [f for i in range(20) for f in flat.on_eval(i, 2.5351, 2.538 - 0.0001 * (i % 2))]
    assert found == []
    falling = rules(auto_halve_lr=True, patience=3)
    trains = [1.0, 0.95, 0.9, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7]
    found = [
        f for i, (v, t) in enumerate(zip([0.5] + [0.6] * 10, trains, strict=True))
        for f in falling.on_eval(i, v, t)
    ]  # fmt: skip
    # every 3rd evaluation without a best while training loss fell since the last count
    # began (1 -> 0.85, 0.85 -> 0.8); at step 9 it has stalled at 0.8, so not until step 10
    assert [f.step for f in found] == [3, 6, 10]
    assert "training loss fell from 1 to 0.85" in found[0].message


def test_auto_halving_stops_after_its_allowance_and_says_so_once() -> None:
    """A net stuck at chance: validation flat, training loss creeping down by 1e-3 relative
    at a time. Auto-halve acted every patience window for ever (scale 2**-21 seen); such a
    creep is no fall (PLATEAU_TRAIN_FALL_REL), and however it falls auto-halve halves at
    most plateau.max_halvings times, then says once that it stops there, and gets a fresh
    allowance when switched off and on again."""
    creeping = rules(auto_halve_lr=True, patience=2)
    trains = [2.3 * (1 - 1e-3) ** i for i in range(40)]
    assert [f for i, t in enumerate(trains) for f in creeping.on_eval(i, 2.3026, t)] == []
    r = rules(auto_halve_lr=True, patience=2)
    trains = [2.0 * 0.95**i for i in range(40)]  # validation flat below it: not over-fitting
    found = [f for i, t in enumerate(trains[:14]) for f in r.on_eval(i, 1.0, t)]
    acting = [f for f in found if f.action is not None]
    assert len(acting) == PLATEAU_MAX_HALVINGS == 5
    (last,) = [f for f in found if f.action is None]
    assert last.rule == PLATEAU and last.step > acting[-1].step
    assert (
        "halved the learning rate 5 times" in last.message and "halves no further" in last.message
    )
    assert "may be stuck" in last.message and "check the init" in last.message
    r.set_auto(halve_lr=False)
    r.set_auto(halve_lr=True)
    again = [f for i, t in enumerate(trains) for f in r.on_eval(40 + i, 1.0, t * 0.9)]
    assert again and again[0].action is not None


def test_auto_halving_leaves_a_converged_over_fitting_run_alone() -> None:
    """A review's run (subset 300, SGD lr 0.5, Overfit silenced): validation best at step 125
    then flat at ~0.17, training loss converged (100% training accuracy) and still creeping
    down, 0.0115 -> 0.0073 -> 0.006 -> 0.0056 -> 0.0054. Auto-halve halved at 200, 275,
    350, 425, 500 "while training loss fell from 0.006 to 0.005595", then said the run "may
    be stuck ... check the init, the data". A validation loss flat over a converged training
    loss is over-fitting: nothing is halved; and an over-fitting run that used up its
    halvings is told so, with weight decay's advice, not sent to its init and data."""
    vals = [1.2, 0.6, 0.35, 0.25, 0.1662] + [0.17, 0.168, 0.172] * 8
    trains = [1.5, 0.5, 0.2, 0.08, 0.05] + [0.0115 * 0.92**i for i in range(24)]
    r = rules(auto_halve_lr=True, silenced=["Overfit"])
    found = [
        f for i, (v, t) in enumerate(zip(vals, trains, strict=True))
        for f in r.on_eval(25 * (i + 1), v, t, weight_decay_on=False, weight_decay_settable=False)
    ]  # fmt: skip
    assert found == []
    # falls of under 5% while the count runs do not count as training still learning
    slow = rules(auto_halve_lr=True, silenced=["Overfit"])
    trains = [1.5, 1.2, 1.0, 0.9, 0.8] + [0.6 * 0.99**i for i in range(24)]
    found = [
        f for i, (v, t) in enumerate(zip(vals, trains, strict=True))
        for f in slow.on_eval(25 * (i + 1), v, t)
    ]  # fmt: skip
    # at least 5% of fall since the count began: 0.8 -> 0.588 at 200, then every 6 evaluations
    assert [f.step for f in found] == [200, 350, 500, 650]
    assert "training loss fell from 0.8 to 0.5881" in found[0].message

    # A plateau well above a falling (unconverged) training loss, halved 5 times: over-fitting.
    over = rules(auto_halve_lr=True, patience=2, silenced=["Overfit"])
    trains = [2.0 * 0.9**i for i in range(14)]
    found = [
        f for i, t in enumerate(trains)
        for f in over.on_eval(i, 1.9, t, weight_decay_on=False, weight_decay_settable=False)
    ]  # fmt: skip
    last = found[-1]
    assert last.action is None and "halves no further" in last.message
    assert "over-fitting" in last.message and "check the init" not in last.message
    assert "--weight-decay 1e-3 --auto-weight-decay" in last.message


def test_overfit_advice_knows_whether_weight_decay_is_on() -> None:
    off = rules(patience=1)
    (found,) = off.on_eval(100, 0.8, 0.5, weight_decay_on=False)
    assert "Add weight decay" in found.message
    on = rules(patience=1)
    (found,) = on.on_eval(100, 0.8, 0.5, weight_decay_on=True)
    assert (
        "Add weight decay" not in found.message and "Weight decay is on: raise it" in found.message
    )
    # Auto weight decay has nothing to switch on where it is on already (the user's switch):
    # it neither says it is switching it on nor sends the command, and may act later.
    auto = rules(patience=1, auto_weight_decay=True)
    (found,) = auto.on_eval(100, 0.8, 0.5, weight_decay_on=True, weight_decay_settable=True)
    assert "Weight decay is on: raise it" in found.message and found.action is None
    assert "Switching" not in found.message and auto.state_dict()["weight_decay_sent"] is False


def test_overfit_advice_is_true_to_whether_the_run_can_switch_weight_decay_on() -> None:
    """A run whose weight decay is 0 in every group (layerscope train's default) was told
    "Add weight decay, dropout or more data." while its Weight decay switch was disabled
    and set_weight_decay on changes nothing there: it is now told how to restart with one,
    and auto weight decay sends no command it cannot carry out. A run with weight decay
    switched off is told to switch it on."""
    zero = rules(patience=1, auto_weight_decay=True)
    (found,) = zero.on_eval(100, 0.8, 0.5, weight_decay_on=False, weight_decay_settable=False)
    assert "Add weight decay" not in found.message and found.action is None
    assert "0 in every param group, so it cannot be switched on live" in found.message
    assert "--weight-decay 1e-3 --auto-weight-decay" in found.message
    assert "give the optimizer a weight_decay" in found.message
    off = rules(patience=1, auto_weight_decay=True)
    (found,) = off.on_eval(100, 0.8, 0.5, weight_decay_on=False, weight_decay_settable=True)
    assert found.action is not None and found.action["args"] == {"enabled": True}
    off = rules(patience=1)
    (found,) = off.on_eval(100, 0.8, 0.5, weight_decay_on=False, weight_decay_settable=True)
    assert "Switch weight decay on (it is off now)" in found.message


def _lab_losses(i: int) -> tuple[float, float]:
    """(training, validation) loss at the i-th evaluation (step 50 * (i + 1)) of the init
    lab's tanh run under normal(std 1.0) init, as a review saw it: training loss falling
    from 10 to ~1.5 (accuracy ~40%), validation loss 16% above it from step 600."""
    train = 1.5 + 8.5 * math.exp(-i / 2)
    return train, train * (1.16 if i >= 11 else 1.05)


def _saturated_tanh_run(r: Rules, evals: int) -> list[Finding]:
    """That run, with every hidden activation saturated from its first probe step."""
    saturated = healthy_layers(act0={"saturated_ratio": 0.92}, act2={"saturated_ratio": 0.98})
    out: list[Finding] = []
    for i in range(evals):
        out += r.on_probe(50 * (i + 1), saturated, {})
        train, val = _lab_losses(i)
        out += r.on_eval(50 * (i + 1), val, train)
    return out


def test_overfit_on_a_net_still_under_fitting_says_to_fix_it_first() -> None:
    """Overfit fired on the init lab's saturated tanh net (accuracy ~40%) and advised "Add
    dropout ... or weight decay", which PRACTICES keeps from an under-fitting model. It
    fires as before, but with a layer rule's condition holding (Saturation here) and the
    training loss not yet fitted (above 5% of its first evaluation's, auto-halve's
    converged floor) it says to fix the network first and auto weight decay waits."""
    r = rules(auto_weight_decay=True, patience=3)
    found = _saturated_tanh_run(r, 14)
    (overfit,) = [f for f in found if f.rule == "Overfit"]
    assert overfit.step == 700 and overfit.value == pytest.approx(0.16)
    assert overfit.action is None  # no weight decay switched on
    message = overfit.message
    assert "16% above training loss 1.5" in message and "still under-fitting" in message
    assert "Saturation holds in act0, act2" in message
    assert "of its first evaluation's" in message and "fix those layers first" in message
    assert "Add dropout" not in message and "Switching weight decay on" not in message
    assert "raise it" not in message and "Add weight decay" not in message
    # the same detection without the saturated layers: over-fitting, with its advice
    plain = rules(auto_weight_decay=True, patience=3)
    (fitting,) = [f for i in range(14) for f in plain.on_eval(50 * (i + 1), *_lab_losses(i)[::-1])]
    assert fitting.step == overfit.step and fitting.action is not None
    assert "over-fitting" in fitting.message and "under-fitting" not in fitting.message
    # A converged net (training loss at 5% of its first) over-fits whatever a layer shows:
    # the default-init ReLU run had DeadUnits open in two layers at 100% training accuracy.
    fitted = rules(patience=1)
    fitted.on_probe(50, healthy_layers(act1={"dead_ratio": 0.9}), {})
    assert fitted.on_eval(50, 0.14, 1.7) == []
    (dead,) = fitted.on_eval(100, 0.15, 0.066)
    assert "over-fitting" in dead.message and "Add weight decay" in dead.message
    assert "under-fitting" not in dead.message
    # ... nor does a rule silenced (as a false alarm may be) or left out
    for quiet in (
        rules(auto_weight_decay=True, patience=3, silenced=["Saturation"]),
        Rules(kinds=KINDS, params=PARAMS, enabled=["Overfit"], auto_weight_decay=True),
    ):
        (overfit,) = [f for f in _saturated_tanh_run(quiet, 14) if f.rule == "Overfit"]
        assert "under-fitting" not in overfit.message and overfit.action is not None


# (step, mean training loss since the last evaluation, validation loss) of a ReLU MLP
# memorising 128 random-label examples with 70% of a hidden layer's units dead throughout
# (DeadUnits open all run), as a review saw it: training loss from 2.1 to 0.001, validation
# loss climbing from 2.4 to 8.4. Every 20 steps, to step 600.
_MEMORISING = [
    (20, 2.134, 2.383), (40, 1.639, 2.698), (60, 1.006, 3.364), (80, 0.4547, 4.161),
    (100, 0.1497, 5.044), (120, 0.0525, 5.664), (140, 0.026, 6.053), (160, 0.0164, 6.328),
    (180, 0.0116, 6.545), (200, 0.0088, 6.728), (220, 0.007, 6.886), (240, 0.0057, 7.025),
] + [(step, 0.001, 7.1 + (step - 240) / 360 * 1.3) for step in range(260, 601, 20)]  # fmt: skip


def _memorising_run(
    r: Rules, dead_until: int = 600, after: int = 0, until: int = 600
) -> list[Finding]:
    """That run from step ``after`` to ``until`` (a probe step every 10 steps: act1 70%
    dead up to ``dead_until``)."""
    out: list[Finding] = []
    for step, train, val in [row for row in _MEMORISING if after < row[0] <= until]:
        for probe in (step - 10, step):
            dead = 0.7 if probe <= dead_until else 0.1
            out += r.on_probe(probe, healthy_layers(act1={"dead_ratio": dead}), {})
        out += r.on_eval(step, val, train, weight_decay_on=False, weight_decay_settable=True)
    return out


def test_auto_weight_decay_held_back_for_under_fitting_acts_once_the_model_has_fitted() -> None:
    """Overfit's onset at step 60 held weight decay back (DeadUnits open, training loss 47%
    of its first evaluation's), and nothing looked again: training loss fell to 0.001 while
    validation loss climbed to 8.4 in the same episode, and weight decay stayed off all run.
    Each later evaluation of the episode now checks again: once training loss is down to
    its fitted floor (5% of the first evaluation's), auto weight decay switches weight
    decay on, once, in a finding that says why now."""
    r = rules(auto_weight_decay=True, patience=3)
    overfit = [f for f in _memorising_run(r) if f.rule == "Overfit"]
    assert [(f.step, f.action is not None) for f in overfit] == [(60, False), (120, True)]
    held, acted = overfit
    assert "still under-fitting" in held.message and "DeadUnits holds in act1" in held.message
    assert "Auto weight decay leaves weight decay off for now" in held.message
    assert acted.action is not None and acted.action["args"] == {"enabled": True}
    assert "Overfit at step 120" in acted.action["reason"]
    assert "since Overfit fired at step 60" in acted.message
    fitted = "has now fitted its training data (training loss 0.0525 is 2% of its first"
    assert fitted + " evaluation's 2.134, fitted is 5% or less)" in acted.message
    assert "Switching weight decay on (auto weight decay)" in acted.message
    assert "under-fitting model" in acted.message and "still under-fitting" not in acted.message
    assert r.state_dict()["weight_decay_sent"] is True
    # The layer alert closing while training loss is still high ends the under-fitting too.
    closed = rules(auto_weight_decay=True, patience=3)
    overfit = [f for f in _memorising_run(closed, dead_until=70) if f.rule == "Overfit"]
    assert [(f.step, f.action is not None) for f in overfit] == [(60, False), (80, True)]
    assert (
        "no DeadUnits, Saturation, VanishingGradient or AllZero alert holds" in overfit[1].message
    )
    # Resumed mid-episode (a checkpoint at step 100), the hold goes on with the run.
    before = rules(auto_weight_decay=True, patience=3)
    assert [f.step for f in _memorising_run(before, until=100) if f.rule == "Overfit"] == [60]
    resumed = rules(auto_weight_decay=True, patience=3)
    resumed.load_state_dict(_through_a_checkpoint(before.state_dict()))
    after = [f for f in _memorising_run(resumed, after=100) if f.rule == "Overfit"]
    assert [(f.step, f.message, f.action) for f in after] == [
        (acted.step, acted.message, acted.action)
    ]
    # Without auto weight decay, or with Overfit silenced, the episode stays one alert.
    assert [f.step for f in _memorising_run(rules(patience=3)) if f.rule == "Overfit"] == [60]
    silenced = rules(auto_weight_decay=True, patience=3, silenced=["Overfit"])
    assert [f for f in _memorising_run(silenced) if f.rule == "Overfit"] == []
    # An episode that ends before the model fits takes its hold with it: a new onset decides.
    ended = rules(auto_weight_decay=True, patience=3)
    ended.on_probe(10, healthy_layers(act1={"dead_ratio": 0.7}), {})
    for step, val in [(20, 2.1), (40, 1.5), (60, 1.5), (80, 1.5), (100, 1.5)]:
        ended.on_eval(step, val, 2.0 if step == 20 else 0.8)
    assert ended.state_dict()["weight_decay_held"] == 100
    assert ended.on_eval(120, 0.7, 0.7) == []  # the gap closed: the episode ended
    assert ended.state_dict()["weight_decay_held"] is None
    assert ended.on_eval(140, 0.5, 0.05) == []  # fitted, gap back: no onset yet, no action


def test_auto_halving_out_of_halvings_on_an_under_fitting_net_does_not_advise_decay() -> None:
    """Auto-halve's last word called a plateau far above training loss over-fitting and
    advised weight decay, the saturated net's too: it now says the net under-fits."""
    r = rules(auto_halve_lr=True, patience=2, silenced=["Overfit"])
    r.on_probe(1, healthy_layers(act2={"saturated_ratio": 0.98}), {})
    trains = [10.0 * 0.95**i for i in range(14)]
    found = [f for i, t in enumerate(trains) for f in r.on_eval(i, 9.5, t)]
    last = found[-1]
    assert last.action is None and "halves no further" in last.message
    assert "still under-fitting" in last.message and "Saturation holds in act2" in last.message
    assert "over-fitting" not in last.message and "Add weight decay" not in last.message
    assert "--auto-weight-decay" not in last.message and "dropout or more data" not in last.message


def test_percentages_next_to_their_threshold_tell_the_two_apart() -> None:
    """A saturated ratio of 0.5039 read "50% of units are saturated ..., above the 50%
    threshold"; a value rounding to its threshold now shows the decimals that differ."""
    r = rules()
    (found,) = r.on_probe(10, healthy_layers(act2={"saturated_ratio": 0.5039}), {})
    assert "layer act2: 50.4% of units are saturated" in found.message
    assert "above the 50% threshold" in found.message
    (found,) = rules().on_probe(10, healthy_layers(act2={"saturated_ratio": 0.73}), {})
    assert "73% of units are saturated" in found.message
    (found,) = rules(patience=1).on_eval(100, 0.5502, 0.5)
    assert "is 10.04% above training loss 0.5" in found.message
    assert "over the 10% threshold" in found.message
    custom = rules(saturation_threshold_layer=0.505)
    (found,) = custom.on_probe(10, healthy_layers(act2={"saturated_ratio": 0.5052}), {})
    assert "50.52% of units are saturated" in found.message
    assert "above the 50.5% threshold" in found.message


def test_auto_halving_is_off_by_default_and_can_be_switched_on_mid_plateau() -> None:
    r = rules(patience=3)
    assert [f for i, v in enumerate(plateau_vals()[:6]) for f in r.on_eval(i, v, None)] == []
    r.set_auto(halve_lr=True)
    assert r.state()["auto_halve_lr"] is True
    (found,) = r.on_eval(6, 0.705, None)
    assert found.rule == PLATEAU and found.action is not None


def test_an_alert_is_a_valid_event_frame_and_plain_json() -> None:
    r = rules(auto_weight_decay=True, patience=1)
    findings = r.on_eval(5, 0.9, 0.5) + r.on_loss(6, float("nan"))
    assert {f.rule for f in findings} == {"Overfit", "ExplodingTensor"}
    for i, f in enumerate(findings, start=1):
        frame = {
            "type": "event",
            "seq": i,
            "step": f.step,
            "kind": "alert",
            "data": f.to_event_data(),
        }
        parsed = wire.parse_trainer_frame(wire.encode(frame))
        assert parsed["data"]["rule"] == f.rule and parsed["data"]["message"] == f.message
        assert parsed["data"]["action"]["source"] == "rule"
        json.loads(wire.encode(frame))


def test_the_rules_run_on_host_numbers_without_importing_torch() -> None:
    code = "import sys, layerscope.trainer.rules; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_overfit_is_one_alert_while_the_gap_stays_open() -> None:
    r = rules(patience=3)
    vals = [0.30, 0.31, 0.31, 0.31, 0.29, 0.30, 0.30, 0.30, 0.28, 0.30, 0.30, 0.30]
    found = [f for i, v in enumerate(vals) for f in r.on_eval(i, v, 0.1)]  # gap 180-210%
    # new validation bests at 4 and 8 break the streak, not the episode: one alert
    assert [(f.rule, f.step) for f in found] == [("Overfit", 2)]
    r.on_eval(12, 0.105, 0.1)  # the gap closes (5%): the episode ends
    again = [f for i in range(13, 16) for f in r.on_eval(i, 0.3, 0.1)]
    assert [(f.rule, f.step) for f in again] == [("Overfit", 15)]


def test_overfit_waits_while_validation_loss_still_reaches_new_lows() -> None:
    # Near zero training loss the relative gap is large on every well-fitted run; it only
    # counts once validation loss stops improving.
    r = rules(patience=3)
    falling = [
        f for i, v in enumerate([0.2, 0.15, 0.12, 0.10, 0.09]) for f in r.on_eval(i, v, 0.02)
    ]
    assert falling == []
    stalled = [
        f for i, v in enumerate([0.095, 0.092, 0.093], start=5) for f in r.on_eval(i, v, 0.02)
    ]
    assert [(f.rule, f.step) for f in stalled] == [("Overfit", 7)]


def test_one_noisy_window_above_the_best_is_not_a_stall() -> None:
    # Window means of a healthy digits run late in training (batch 32): one window rises
    # 1.5% above the best and the next falls again.
    r = rules()
    found = []
    for block, mean in enumerate([0.0808, 0.0727, 0.0738, 0.0637, 0.0636, 0.0592, 0.0538]):
        found += [f for s in range(100 * block, 100 * block + 100) for f in r.on_loss(s, mean)]
    found += r.on_loss(700, 0.05)
    assert found == []


@pytest.mark.parametrize(
    ("overrides", "words", "layers"),
    [
        (
            {"fc1": {"grad_norm": math.inf}, "out": {"grad_norm": math.nan}},
            "gradients",
            ["fc1", "out"],
        ),
        ({"fc2": {"update_ratio": math.inf}}, "updates", ["fc2"]),
        ({"fc0": {"weight_norm": math.nan}}, "weights", ["fc0"]),
    ],
    ids=["grad", "update", "weight"],
)
def test_a_nonfinite_layer_norm_names_its_step_and_first_layer(
    overrides: dict[str, dict[str, float]], words: str, layers: list[str]
) -> None:
    """A layer's gradient, update or weight norm that went NaN/Inf (activations and loss
    still finite) is an explosion at that probe step, named after the first such layer:
    before, only the global norm counted, so a layer's inf gradient waited for the NaN loss
    it caused a step later."""
    r = rules()
    assert r.on_probe(10, healthy_layers(), {"grad_norm": 0.4}) == []
    (found,) = r.on_probe(20, healthy_layers(**overrides), {"grad_norm": 0.4})
    assert (found.rule, found.step, found.layer, found.layers) == (
        "ExplodingTensor", 20, layers[0], layers
    )  # fmt: skip
    assert f"NaN/Inf in the {words} of {layers[0]}" in found.message and "step 20" in found.message
    assert (len(layers) > 1) == ("first of 2 layers" in found.message)
    assert found.action is not None and found.action["name"] == "pause"
    # the same episode while it lasts; a new one once every value is finite again
    assert r.on_probe(30, healthy_layers(**overrides), {"grad_norm": math.nan}) == []
    assert r.on_probe(40, healthy_layers(), {"grad_norm": 0.4}) == []
    assert [f.step for f in r.on_probe(50, healthy_layers(**overrides), {})] == [50]


def test_no_gradient_is_not_an_explosion_and_a_step_with_several_names_the_earliest() -> None:
    r = rules()
    no_grads = {name: {"grad_norm": None, "update_ratio": None} for name in PARAMS}
    assert r.on_probe(10, healthy_layers(**no_grads), {}) == []  # frozen or unused: None
    # Forward before backward: NaN activations and gradients at one step name the activations.
    both = healthy_layers(act1={"nonfinite": 5}, fc0={"grad_norm": math.inf})
    (found,) = r.on_probe(20, both, {"grad_norm": math.inf})
    assert found.layer == "act1" and "the activations of act1" in found.message
    # Pre-step weights gone NaN made that forward's activations NaN: the weights are named.
    assert r.on_probe(30, healthy_layers(), {"grad_norm": 0.4}) == []
    both = healthy_layers(fc1={"weight_norm": math.nan}, act1={"nonfinite": 5})
    (found,) = r.on_probe(40, both, {})
    assert found.layer == "fc1" and "the weights of fc1 at step 40" in found.message


def _a_run(r: Rules, steps: range) -> list[tuple[Any, ...]]:
    """A run meeting most rules, fed step by step: training loss falling slowly to step 150
    then flat (LossNotDecreasing over 10-step windows), NaN at steps 200-201; validation
    every 10 steps, flat from step 30 well above training loss (Overfit, auto weight decay,
    auto-halve while training loss falls); act1 dead at steps 20-50 and 100-140."""
    out: list[tuple[Any, ...]] = []
    for step in steps:
        noise = 0.001 * ((step * 37) % 11 - 5)
        loss = (1.0 - 0.001 * step if step <= 150 else 0.85) + noise
        found = r.on_loss(step, math.nan if step in (200, 201) else loss)
        if step % 5 == 0:
            dead = 0.7 if 20 <= step <= 50 or 100 <= step <= 140 else 0.1
            layers = healthy_layers(act1={"dead_ratio": dead})
            found += r.on_probe(step, layers, {"grad_norm": 0.4})
        if step % 10 == 0:
            found += r.on_eval(step, 1.5 - 0.01 * step if step < 30 else 1.2)
        out += [(f.rule, f.step, f.layer, f.message, f.action) for f in found]
    return out


def _resumable_rules() -> Rules:
    return rules(auto_halve_lr=True, auto_weight_decay=True, loss_not_decreasing_num_steps=10)


def _through_a_checkpoint(state: dict[str, Any]) -> Any:
    """What a weights_only torch.load of a checkpoint holding ``state`` gives back."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"rules": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["rules"]


def test_rules_resumed_from_their_state_fire_as_in_the_run_never_stopped() -> None:
    """A resumed run's rules started afresh: a plateau partly counted was counted again
    from zero (auto-halve postponed by a whole patience window), Overfit's streak and
    whether auto weight decay acted were lost, an alert already raised came again. Split
    anywhere, through a weights_only torch.load, the rules now go on as the run never
    stopped: the same findings at the same steps, the same state at the end."""
    whole = _resumable_rules()
    everything = _a_run(whole, range(1, 251))
    fired = {(rule, step) for rule, step, *_ in everything}
    assert {
        ("DeadUnits", 20),
        ("DeadUnits", 100),
        ("Overfit", 60),
        ("ExplodingTensor", 200),
    } <= fired
    assert {rule for rule, _ in fired} == {
        "DeadUnits", "Overfit", PLATEAU, "LossNotDecreasing", "ExplodingTensor",
    }  # fmt: skip
    afresh_same = set()
    for split in range(3, 250, 7):
        first = _resumable_rules()
        _a_run(first, range(1, split + 1))
        resumed = _resumable_rules()
        resumed.load_state_dict(_through_a_checkpoint(first.state_dict()))
        after = [f for f in everything if f[1] > split]
        assert _a_run(resumed, range(split + 1, 251)) == after, f"split at step {split}"
        assert resumed.state_dict() == whole.state_dict(), f"split at step {split}"
        if _a_run(_resumable_rules(), range(split + 1, 251)) == after:
            afresh_same.add(split)
    # started afresh, only a split before anything was counted or after the last alert
    # (the NaN at 200) goes on as the whole run did
    assert afresh_same == {3, 10, 17, 234, 241, 248}


def test_resumed_rules_follow_the_switches_changed_since_and_refuse_a_bad_state() -> None:
    """The switches are the resumed watch()'s arguments; the history follows them as a
    live switch would: a rule silenced then and audible now reports what still holds (as
    un-silencing does); an auto action switched off then and on now has a fresh allowance
    (as switching it off and on again gives). A malformed state changes nothing."""
    old = rules(silenced=["DeadUnits"], patience=2, auto_halve_lr=True, auto_weight_decay=True)
    dead = healthy_layers(act1={"dead_ratio": 0.7})
    assert old.on_probe(5, dead, {}) == []  # silenced: evaluated, quiet
    found = [f for step in (10, 20, 30) for f in old.on_eval(step, 0.6, 0.5 - step / 100)]
    assert [(f.rule, f.step) for f in found] == [("Overfit", 20), (PLATEAU, 30)]  # both acted
    same = _through_a_checkpoint(old.state_dict())
    old.set_auto(halve_lr=False, weight_decay=False)  # switched off before the checkpoint
    switched_off = _through_a_checkpoint(old.state_dict())

    kept = rules(silenced=["DeadUnits"], patience=2, auto_halve_lr=True, auto_weight_decay=True)
    kept.load_state_dict(same)
    assert kept.state_dict() == same  # the same switches: all of it, as it was
    assert kept.on_probe(35, dead, {}) == []
    audible = rules(patience=2, auto_halve_lr=True, auto_weight_decay=True)
    audible.load_state_dict(switched_off)
    assert [f.rule for f in audible.on_probe(35, dead, {})] == ["DeadUnits"]  # still holds
    assert audible.on_eval(40, 0.6, 0.45) == []  # Overfit's onset stays: no second alert
    now = audible.state_dict()
    assert (now["halvings"], now["weight_decay_sent"]) == (0, False)  # a fresh allowance
    assert (same["halvings"], same["weight_decay_sent"]) == (1, True)

    # written before auto-halve kept the first training loss: taken up, without it
    older = rules(silenced=["DeadUnits"], patience=2, auto_halve_lr=True, auto_weight_decay=True)
    older.load_state_dict(
        {k: v for k, v in same.items() if k not in ("first_train", "weight_decay_held")}
    )
    assert older.state_dict() == {**same, "first_train": None, "weight_decay_held": None}

    before = audible.state_dict()
    for bad, words in (
        ([1, 2], "must be a dict"),
        ({k: v for k, v in same.items() if k != "best_val"}, "has no best_val"),
        ({**same, "evals_since_best": "2"}, "bad evals_since_best"),
        ({**same, "evals_since_best": -1}, "bad evals_since_best"),
        ({**same, "active": [["Overfit"]]}, "bad active"),
        ({**same, "halvings": True}, "bad halvings"),
    ):
        with pytest.raises(ValueError, match=words):
            audible.load_state_dict(bad)  # type: ignore[arg-type]
        assert audible.state_dict() == before  # all or nothing
