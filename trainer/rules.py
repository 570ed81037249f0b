"""rules — the diagnostic rules, evaluated on the trainer from decoded probe values.

Owns: the eight named rules (DeadUnits, Saturation, VanishingGradient,
ExplodingTensor, LossNotDecreasing, Overfit, AllZero, PoorInitialization), their
thresholds (defaults taken from SageMaker Debugger's built-in rules, each a named
constant below), onset-only firing, per-run enabling and silencing, and the opt-in
trigger-based adjustments: halve the learning rate on a validation plateau, switch
weight decay on when Overfit fires. Each finding says what is wrong, where, when,
against which threshold, and what to try (the hints follow PRACTICES.md), fitted to what
the probe step shows (the layers' std/min/max before an all-zero layer, the probed
activation kinds). Overfit (and auto-halve's last word) advises regularisation only while
the model is not still under-fitting: with a layer rule's alert open and training loss not
yet fitted it says to fix the network first, and auto weight decay waits: it switches
weight decay on at a later evaluation of the same episode once the model has fitted.

Never: imports torch, touches hooks, modules or the optimizer, or talks to the
network. It sees host numbers (probe-frame layer entries, losses) and returns
``Finding`` objects; an automatic action is only a proposal (``Finding.action``)
that the caller turns into an ordinary command (``Finding.to_command``) with
``source: rule`` and the finding's reason.

The names, thresholds and their parsing live in ``rule_config``.

Firing: a rule fires on the *onset* of a condition (per rule and per layer) and
stays quiet while the condition persists; it fires again only after the condition
cleared and came back. The layers whose onset falls on the same probe step make one
finding per rule, named after the first in depth order (where the trouble starts)
and listing the rest: a zero-initialised net is three alerts, not one per layer.
Layer order matters: ``on_probe`` takes entries in forward (depth) order, and a
layer's input is taken to be the previous probed layer's output.

Silenced rules are still evaluated (so their history, such as a loss window or an
overfit streak, stays current) but produce nothing, their actions included;
un-silencing forgets the onsets, so a condition that still holds is reported at the
next evaluation. Disabled rules are not evaluated at all.

Resuming: ``state_dict()`` is the rules' history (onsets, counts, windows) as plain
values, which every checkpoint holds; ``load_state_dict()`` takes it up in a resumed
run, so a plateau's count, Overfit's streak and the alerts already raised go on.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerscope.trainer import wire
from layerscope.trainer.rule_config import (
    ACTIVATION_KINDS,
    LOSS_CONVERGED_FRACTION,
    LOSS_NOISE_Z,
    MAX_LAYERS_NAMED,
    PATIENCE,
    PLATEAU,
    POOR_INIT_MAX_STEP,
    PRE_ACTIVATION_KINDS,
    RATIO_CLEAR_FACTOR,
    RULE_NAMES,
    VANISHING_CLEAR_FACTOR,
    RuleConfig,
    build_config,
    threshold_names,
)

__all__ = [
    "PAUSING", "PLATEAU", "PLATEAU_CONVERGED_FRACTION", "PLATEAU_TRAIN_FALL_REL", "RULE_NAMES",
    "STOPPING", "WEIGHT_DECAY_RESTART", "Finding", "RuleConfig", "Rules", "threshold_names",
]  # fmt: skip
# Auto-halve acts on a validation plateau only while training loss still falls (PRACTICES:
# "when validation loss stops falling while training loss still falls, halve the learning
# rate"), and a fall means at least this fraction of the training loss where the plateau's
# count began (ReduceLROnPlateau's 1e-4 let a converged run, at 100% training accuracy,
# be halved five times for falls of 7% and 4%: 0.006 -> 0.0056 -> 0.0054). Below it the
# count goes on, so a slow but real fall still adds up to one halving.
PLATEAU_TRAIN_FALL_REL = 0.05  # (auto_halve_lr's help in experiment_config says 5%)
# ... and not once training loss has converged: at or below this fraction of the run's
# first evaluated training loss (fallen 20x: cross-entropy from 2.3 to 0.1 or less, as
# LOSS_CONVERGED_FRACTION has it for LossNotDecreasing). A validation loss flat over a
# converged training loss is over-fitting, weight decay's case (Overfit), which a lower
# learning rate does not cure.
PLATEAU_CONVERGED_FRACTION = LOSS_CONVERGED_FRACTION  # (that help says 5% too)
# A run whose weight decay is 0 in every group cannot switch it on live (DESIGN §4: a
# group whose weight decay is 0 stays 0); how to get one held off until Overfit fires.
WEIGHT_DECAY_RESTART = (
    "restart with one held off until Overfit fires (layerscope train: --weight-decay 1e-3 "
    "--auto-weight-decay; watch(): give the optimizer a weight_decay and pass "
    "auto_weight_decay=True)"
)
# The reason of the command with which auto weight decay holds weight decay off from a
# run's first step (watch(auto_weight_decay=True) on an optimizer with one to switch on).
AUTO_WEIGHT_DECAY_START = "auto weight decay: start without it, switch it on when Overfit fires"

# the norms probes read as the ReLU the model applies after them (a DeadUnits note says so)
_READ_NORM_KINDS = ("BatchNorm", "SyncBatchNorm", "InstanceNorm", "GroupNorm")
# Activation modules that saturate at bounds (PRACTICES: tanh/sigmoid units saturate, their
# gradients vanish; prefer ReLU in hidden layers): only a net with one of these is told to
# try ReLU. The others of ACTIVATION_KINDS are ReLU-like (He init's case), and these two can
# die: output exact zeros for every input, and pass no gradient back.
_SATURATING_KINDS = frozenset({"Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Softsign"})
_DYING_KINDS = frozenset({"ReLU", "ReLU6"})
# The rules whose open onsets say a layer is broken (dead, saturated, fed zeros, not
# learning): while one holds and training loss has not come down to its floor, the model
# under-fits, and Overfit's and auto-halve's advice is to fix the network, not regularise.
_BROKEN_LAYER_RULES = ("DeadUnits", "Saturation", "VanishingGradient", "AllZero")
# PRACTICES: start without weight decay while the model under-fits, add it once it over-fits.
_FIX_FIRST = (
    "fix those layers first (their alerts say how): weight decay or dropout now would only "
    "add to the under-fitting (start without weight decay while a model under-fits, add it "
    "once it over-fits)."
)

# What an ExplodingTensor alert says it does; with no server to resume a pause, ``alerts``
# records the stop it becomes instead.
PAUSING = "; pausing the run"
STOPPING = "; stopping the run (no server is reachable to resume a pause)"


@dataclass
class Finding:
    """One alert: what fired, where, when, against which threshold, and what to try."""

    rule: str
    step: int
    layer: str | None
    message: str
    value: float | None = None
    threshold: float | None = None
    # A proposed command: {"name", "args", "source": "rule", "reason"}. set_lr_scale carries
    # args {"relative": f}: the rule does not know the acknowledged scale; to_command does.
    action: dict[str, Any] | None = None
    # Every layer where the rule's onset happened at this step, ``layer`` first.
    layers: list[str] = field(default_factory=list)

    def to_event_data(self) -> dict[str, Any]:
        """The ``data`` of an event frame of kind ``alert``."""
        data: dict[str, Any] = {
            "rule": self.rule,
            "layer": self.layer,
            "message": self.message,
            "value": self.value,
            "threshold": self.threshold,
        }
        if self.layers:
            data["layers"] = self.layers
        if self.action is not None:
            data["action"] = self.action
        return data

    def to_command(self, lr_scale: float = 1.0) -> dict[str, Any] | None:
        """The action as an ordinary command (validated by ``wire.validate_command``, with a
        fresh id), or None. ``lr_scale``: the acknowledged scale a relative change applies to."""
        if self.action is None:
            return None
        args = dict(self.action.get("args", {}))
        if self.action["name"] == "set_lr_scale" and "relative" in args:
            args = {"value": lr_scale * float(args.pop("relative"))}
        return wire.validate_command(
            {
                "name": self.action["name"],
                "args": args,
                "source": "rule",
                "reason": self.action.get("reason", self.message),
            }
        )


def _num(entry: Mapping[str, Any], key: str) -> float | None:
    """A numeric stat as a float (NaN/Inf kept), None when absent or not a number."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _nonfinite(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


def _positive(value: float | None) -> bool:
    return value is not None and value > 0


def _bad_layers(
    entries: Sequence[Mapping[str, Any]], what: str, key: str, bad: Callable[[float | None], bool]
) -> tuple[bool, str, list[str]]:
    """(any bad, the words an alert names them with, their names in depth order) for the
    layers whose ``key`` passes ``bad``."""
    names = [e["name"] for e in entries if bad(_num(e, key))]
    if len(names) > 1:
        detail = f"the {what} of {names[0]} (first of {len(names)} layers)"
    else:
        detail = f"the {what} of {names[0]}" if names else f"the {what}"
    return bool(names), detail, names


# What each key of Rules.state_dict() holds: "int", "float", "bool", "int?" / "float?"
# (or None), "names" (a list of str), "pairs" (a list of [str, str]).
_STATE_KINDS = {
    "silenced": "names", "auto_halve_lr": "bool", "auto_weight_decay": "bool",
    "active": "pairs", "nonfinite": "names", "probe_steps": "int", "loss_block": "int?",
    "stalled_windows": "int", "loss_sum": "float", "loss_sq": "float", "loss_n": "int",
    "best_window_mean": "float?", "best_window_se2": "float", "first_window_mean": "float?",
    "train_sum": "float", "train_n": "int", "overfit_streak": "int",
    "weight_decay_sent": "bool", "weight_decay_on": "bool", "best_val": "float?",
    "evals_since_best": "int", "train_at_count": "float?", "halvings": "int",
    "first_train": "float?", "weight_decay_held": "int?",
}  # fmt: skip
# Keys a checkpoint written before they existed lacks, with what such a resume takes.
_STATE_SINCE = {"first_train": None, "weight_decay_held": None}


def _is_kind(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _is_kind(value, kind[:-1])
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "names":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    assert kind == "pairs"
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, str) for x in v)
        for v in value
    )


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _pct(x: float, threshold: float | None = None) -> str:
    """``x`` (a fraction) as a percentage: whole percent, or, next to the ``threshold`` it
    was compared with, at least the threshold's decimals and as many more (up to 3 in all)
    as tell the two apart: a saturated ratio of 0.5039 read "50% ..., above the 50%
    threshold"; now "50.4%"."""
    if threshold is None or x == threshold:
        return f"{100 * x:.0f}%"
    shown = _pct_threshold(threshold)
    least = next((d for d in range(3) if f"{100 * threshold:.{d}f}%" == shown), 3)
    for digits in range(least, 4):
        text = f"{100 * x:.{digits}f}%"
        if text != f"{100 * threshold:.{digits}f}%":
            break
    return text


def _pct_threshold(threshold: float) -> str:
    """A threshold as a percentage, as precise as it was given (0.5: "50%", 0.505: "50.5%")."""
    return f"{100 * threshold:.6g}%"


class Rules:
    """The rule state of one run. Thread-safe: live switches may come from the link thread."""

    def __init__(
        self,
        enabled: Iterable[str] | None = None,
        silenced: Iterable[str] = (),
        auto_halve_lr: bool = False,
        auto_weight_decay: bool = False,
        patience: int = PATIENCE,
        *,
        kinds: Mapping[str, str] | None = None,
        params: Mapping[str, int] | None = None,
        **thresholds: Any,
    ) -> None:
        self.enabled = self._names(RULE_NAMES if enabled is None else enabled, "enabled")
        self.silenced = self._names(silenced, "silenced")
        if PLATEAU in self.silenced and auto_halve_lr:
            raise ValueError(
                f"{PLATEAU} is auto-halve's alert: silenced (no alert, no action) it halves "
                "nothing; switch auto_halve_lr off or leave it unsilenced, not both"
            )
        self.auto_halve_lr = bool(auto_halve_lr)
        self.auto_weight_decay = bool(auto_weight_decay)
        self.config = build_config(patience, thresholds)
        # From the hello layer table: module kind per layer name, parameter count per layer.
        self.kinds: dict[str, str] = dict(kinds or {})
        self.params: dict[str, int] = dict(params or {})
        self.frozen: set[str] = set()
        self._lock = threading.Lock()
        self._active: set[tuple[str, str]] = set()  # (rule, layer or subject) with a live onset
        self._nonfinite: set[str] = set()  # where NaN/Inf is present right now
        self._probe_steps = 0
        self._loss_block: int | None = None
        self._stalled_windows = 0  # windows in a row without a decrease
        self._loss_sum = 0.0
        self._loss_sq = 0.0
        self._loss_n = 0
        self._best_window_mean: float | None = None
        self._best_window_se2 = 0.0
        self._first_window_mean: float | None = None  # LossNotDecreasing's converged floor
        self._train_sum = 0.0  # finite training losses since the last evaluation
        self._train_n = 0
        self._overfit_streak = 0
        self._weight_decay_sent = False
        self._best_val: float | None = None
        self._evals_since_best = 0
        self._train_at_count: float | None = None  # training loss where that count began
        self._halvings = 0  # auto-halve actions sent (at most plateau.max_halvings)
        self._weight_decay_on = False  # as the last evaluation's rows said (Overfit's advice)
        # whether some param group has a weight decay to switch on (None: unknown)
        self._weight_decay_settable: bool | None = None
        self._first_train: float | None = None  # the first evaluation's training loss
        # The step of the open Overfit episode's onset where weight decay was held back for
        # an under-fitting model (None: none open, or it was not): each later evaluation
        # of the episode checks again, and auto weight decay acts once the model has fitted.
        self._weight_decay_held: int | None = None

    @staticmethod
    def _names(names: Iterable[str], what: str) -> set[str]:
        out = set(names) if not isinstance(names, str) else {names}
        unknown = out - {*RULE_NAMES, PLATEAU}  # PLATEAU: auto_halve_lr decides (rule_config)
        if unknown:
            raise ValueError(f"unknown rule(s) {sorted(unknown)} in {what}; expected {RULE_NAMES}")
        return out

    # ---- live switches ----

    def set_silenced(self, name: str, silenced: bool) -> None:
        self._names([name], "set_silenced")
        with self._lock:
            if silenced:
                self.silenced.add(name)
            else:
                self.silenced.discard(name)
                self._active = {key for key in self._active if key[0] != name}

    def set_auto(self, *, halve_lr: bool | None = None, weight_decay: bool | None = None) -> None:
        with self._lock:
            if halve_lr is not None:
                if halve_lr and not self.auto_halve_lr:
                    self._halvings = 0  # switched on again: a fresh allowance
                if halve_lr:
                    self.silenced.discard(PLATEAU)  # switched on: its alerts are wanted
                self.auto_halve_lr = bool(halve_lr)
            if weight_decay is not None:
                if weight_decay and not self.auto_weight_decay:
                    self._weight_decay_sent = False  # switched on again: it may act once more
                self.auto_weight_decay = bool(weight_decay)

    def set_frozen(self, layers: Iterable[str], frozen: bool) -> None:
        """Frozen layers get no gradient on purpose; VanishingGradient skips them."""
        with self._lock:
            if frozen:
                self.frozen.update(layers)
            else:
                self.frozen.difference_update(layers)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "enabled": [n for n in RULE_NAMES if n in self.enabled],
                "silenced": [n for n in RULE_NAMES if n in self.silenced],
                "auto_halve_lr": self.auto_halve_lr,
                "auto_weight_decay": self.auto_weight_decay,
            }

    # ---- resuming ----

    def state_dict(self) -> dict[str, Any]:
        """The rules' history, for a checkpoint (``watch(resume=...)`` loads it back, so a
        resumed run goes on counting where this one stood): the onsets open now (an alert
        already raised is not raised again while its condition holds), NaN/Inf sources,
        the probe-step count, LossNotDecreasing's loss windows, the training losses since
        the last evaluation, Overfit's streak and whether auto weight decay acted, and
        auto-halve's plateau count and halvings. Plain lists, numbers and strings (a
        ``weights_only`` ``torch.load`` reads it back), taken under the lock. Not the
        switches and thresholds (those are the resumed ``watch()``'s arguments) nor the
        frozen layers (the checkpoint's control state brings those back).

        The rules are fed on the link thread, after the training thread handed over a
        flush: taken on the training thread (a checkpoint at a step boundary), this is the
        state as of the flushes evaluated so far, which may miss the last one or more
        (rows and an evaluation of the last moments before the checkpoint). A resumed run
        never sees those."""
        with self._lock:
            return {
                "silenced": sorted(self.silenced),
                "auto_halve_lr": self.auto_halve_lr,
                "auto_weight_decay": self.auto_weight_decay,
                "active": sorted([rule, subject] for rule, subject in self._active),
                "nonfinite": sorted(self._nonfinite),
                "probe_steps": self._probe_steps,
                "loss_block": self._loss_block,
                "stalled_windows": self._stalled_windows,
                "loss_sum": self._loss_sum,
                "loss_sq": self._loss_sq,
                "loss_n": self._loss_n,
                "best_window_mean": self._best_window_mean,
                "best_window_se2": self._best_window_se2,
                "first_window_mean": self._first_window_mean,
                "train_sum": self._train_sum,
                "train_n": self._train_n,
                "overfit_streak": self._overfit_streak,
                "weight_decay_sent": self._weight_decay_sent,
                "weight_decay_on": self._weight_decay_on,
                "best_val": self._best_val,
                "evals_since_best": self._evals_since_best,
                "train_at_count": self._train_at_count,
                "halvings": self._halvings,
                "first_train": self._first_train,
                "weight_decay_held": self._weight_decay_held,
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take up a ``state_dict()``'s history (all of it, or nothing: a malformed one
        raises ValueError and changes nothing). The switches stay this object's; where
        they differ from those the state was taken under, the history follows them as a
        live switch would: a rule silenced then and audible now forgets its onsets (a
        condition that still holds is reported, as on un-silencing), and an auto action
        off then and on now has its fresh allowance (``set_auto``)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"the rules' state must be a dict, got {type(state).__name__}")
        state = {**_STATE_SINCE, **state}
        missing = sorted(set(_STATE_KINDS) - set(state))
        if missing:
            raise ValueError(f"the rules' state has no {', '.join(missing)}")
        for key, kind in _STATE_KINDS.items():
            if not _is_kind(state[key], kind):
                raise ValueError(f"the rules' state has a bad {key}: {state[key]!r}"[:300])
        active = {(str(rule), str(subject)) for rule, subject in state["active"]}
        was_silenced = set(state["silenced"])
        with self._lock:
            # un-silenced since: forget its onsets, as set_silenced does
            self._active = {k for k in active if k[0] not in was_silenced - self.silenced}
            self._nonfinite = set(state["nonfinite"])
            self._probe_steps = state["probe_steps"]
            self._loss_block = state["loss_block"]
            self._stalled_windows = state["stalled_windows"]
            self._loss_sum = float(state["loss_sum"])
            self._loss_sq = float(state["loss_sq"])
            self._loss_n = state["loss_n"]
            self._best_window_mean = _opt_float(state["best_window_mean"])
            self._best_window_se2 = float(state["best_window_se2"])
            self._first_window_mean = _opt_float(state["first_window_mean"])
            self._train_sum = float(state["train_sum"])
            self._train_n = state["train_n"]
            self._overfit_streak = state["overfit_streak"]
            self._weight_decay_on = state["weight_decay_on"]
            self._best_val = _opt_float(state["best_val"])
            self._evals_since_best = state["evals_since_best"]
            self._train_at_count = _opt_float(state["train_at_count"])
            self._first_train = _opt_float(state["first_train"])
            self._weight_decay_held = state["weight_decay_held"]
            # switched on since: a fresh allowance, as set_auto gives
            fresh_halve = self.auto_halve_lr and not state["auto_halve_lr"]
            self._halvings = 0 if fresh_halve else state["halvings"]
            fresh_decay = self.auto_weight_decay and not state["auto_weight_decay"]
            self._weight_decay_sent = False if fresh_decay else state["weight_decay_sent"]

    # ---- shared mechanics ----

    def _onset(self, rule: str, subject: str, condition: bool, holds: bool | None = None) -> bool:
        """True when ``condition`` starts to hold for (rule, subject). ``holds``: the looser
        condition that keeps an active onset alive (hysteresis: a value hovering at the
        threshold is one episode, not an alert every other probe step)."""
        key = (rule, subject)
        if holds is not None and key in self._active:
            condition = holds
        if not condition:
            self._active.discard(key)
            return False
        if key in self._active:
            return False
        self._active.add(key)
        return True

    def _audible(self, rule: str) -> bool:
        return rule not in self.silenced

    def _kind(self, entry: Mapping[str, Any]) -> str | None:
        kind = entry.get("kind")
        return kind if isinstance(kind, str) else self.kinds.get(entry["name"])

    @staticmethod
    def _is_pre_activation(kind: str) -> bool:
        kind = kind.removeprefix("Lazy")
        return kind in PRE_ACTIVATION_KINDS or kind.startswith("Conv")

    def _feeds_probed_activation(self, entries: Sequence[Mapping[str, Any]], i: int) -> bool:
        """A Linear/Conv output followed by a probed activation module: the activation's own
        entry says what that nonlinearity does (a Linear's dead_ratio assumes a ReLU)."""
        if i + 1 >= len(entries):
            return False
        kind, next_kind = self._kind(entries[i]), self._kind(entries[i + 1])
        return (
            kind is not None
            and self._is_pre_activation(kind)
            and next_kind is not None
            and next_kind.removeprefix("Lazy") in ACTIVATION_KINDS
        )

    def _per_layer(
        self, rule: str, step: int, fired: list[tuple[str, float, str]], threshold: float, hint: str
    ) -> list[Finding]:
        """One finding per rule and probe step, named after the first layer in depth order
        (where the trouble starts); ``fired``: (layer, value, what) whose onset is now."""
        if not fired or not self._audible(rule):
            return []
        layer, value, what = fired[0]
        message = f"layer {layer}: {what} at step {step}."
        rest = [name for name, _, _ in fired[1:]]
        if rest:
            named = ", ".join(rest[:MAX_LAYERS_NAMED]) + (
                ", ..." if len(rest) > MAX_LAYERS_NAMED else ""
            )
            message += f" Also in {len(rest)} later layer{'s' * (len(rest) > 1)}: {named}."
        layers = [layer, *rest]
        return [Finding(rule, step, layer, f"{message} {hint}", value, threshold, None, layers)]

    def _explosion(
        self, step: int, where: str, bad: bool, detail: str, layers: Sequence[str] = ()
    ) -> list[Finding]:
        """One ExplodingTensor alert per episode, whichever source saw NaN/Inf first; the
        episode ends when every source (activations, losses, grad norm) is finite again."""
        if bad:
            self._nonfinite.add(where)
        else:
            self._nonfinite.discard(where)
        if not self._nonfinite:
            self._active.discard(("ExplodingTensor", "run"))
        if not bad or not self._onset("ExplodingTensor", "run", True):
            return []
        if not self._audible("ExplodingTensor"):
            return []
        reason = (
            f"NaN/Inf in {detail} at step {step}: paused so the last checkpoint taken before "
            "it stays the last good one"
        )
        action = (
            {"name": "pause", "args": {}, "source": "rule", "reason": reason}
            if self.config.exploding_tensor.pause
            else None
        )
        message = (
            f"NaN/Inf in {detail} at step {step}"
            + (
                PAUSING + ", so a last-good checkpoint taken before it stays the last good one"
                if action
                else ""
            )
            + ". Lower the learning rate, clip gradients, or check the data for NaNs."
        )
        layer = layers[0] if layers else None
        return [Finding("ExplodingTensor", step, layer, message, None, 0.0, action, list(layers))]

    # ---- probe steps ----

    def on_probe(
        self, step: int, layers: Sequence[Mapping[str, Any]], scalars: Mapping[str, Any]
    ) -> list[Finding]:
        """Evaluate the per-layer rules on one decoded probe flush. ``layers``: probe-frame
        layer entries in model (depth) order; ``scalars``: e.g. ``{"grad_norm": g}``, raw
        floats (NaN stays NaN). In both, None is "does not apply" (no gradient, no update)
        and NaN/Inf is an explosion: an entry's grad_norm, update_ratio and weight_norm
        must come raw, as the flush hands them over, not as the wire's null.
        Returns the findings that fired now, one per rule at most."""
        entries = [e for e in layers if isinstance(e, Mapping) and isinstance(e.get("name"), str)]
        with self._lock:
            self._probe_steps += 1
            out: list[Finding] = []
            if "DeadUnits" in self.enabled:
                out += self._ratio_rule(
                    step, entries, "DeadUnits", "dead_ratio",
                    self.config.dead_units.threshold_layer,
                    "of units are dead (active on at most 1% of their values)",
                    "Dead ReLUs pass no gradient and do not recover: try He init, a lower "
                    "learning rate, batch norm or LeakyReLU.",
                )  # fmt: skip
            if "Saturation" in self.enabled:
                out += self._ratio_rule(
                    step, entries, "Saturation", "saturated_ratio",
                    self.config.saturation.threshold_layer,
                    "of units are saturated (pinned at their bounds on most values)",
                    "Saturated tanh/sigmoid units pass almost no gradient: try Xavier init, "
                    "batch norm, or ReLU in hidden layers.",
                )  # fmt: skip
            if "VanishingGradient" in self.enabled:
                out += self._vanishing(step, entries)
            if "AllZero" in self.enabled:
                out += self._all_zero(step, entries)
            if "PoorInitialization" in self.enabled:
                out += self._poor_init(step, entries)
            if "ExplodingTensor" in self.enabled:
                out += self._probe_explosion(step, entries, scalars)
            return out

    def _ratio_rule(
        self,
        step: int,
        entries: Sequence[Mapping[str, Any]],
        rule: str,
        stat: str,
        threshold: float,
        what: str,
        hint: str,
    ) -> list[Finding]:
        fired = []
        last_kind = self._kind(entries[-1]) if entries else None
        # The last probed layer is the model's output: a Linear there feeds the loss, not the
        # ReLU its dead_ratio assumes.
        output = len(entries) - 1 if last_kind and self._is_pre_activation(last_kind) else -1
        for i, entry in enumerate(entries):
            ratio = _finite(_num(entry, stat))
            structural = i == output or self._feeds_probed_activation(entries, i)
            if ratio is None and not structural and (_num(entry, "nonfinite") or 0.0) <= 0:
                # not measured this probe step (too few values per unit: a small last batch
                # of an epoch): an episode neither starts nor ends on what was not seen (it
                # ended, and DeadUnits fired again every epoch; auto weight decay took the
                # gap for a model no longer under-fitting)
                continue
            if structural:
                ratio = None
            if (_num(entry, "nonfinite") or 0.0) > 0:
                ratio = None  # NaN counts as neither live nor pinned: ExplodingTensor's case
            if self._onset(
                rule,
                entry["name"],
                ratio is not None and ratio > threshold,
                ratio is not None and ratio > threshold * RATIO_CLEAR_FACTOR,
            ):
                assert ratio is not None
                text = (
                    f"{_pct(ratio, threshold)} {what}, above the "
                    f"{_pct_threshold(threshold)} threshold"
                )
                kind = self._kind(entry)
                if rule == "DeadUnits" and kind and self._is_pre_activation(kind):
                    # a VAE's fc_logvar (mostly negative, no ReLU after it) read as dead
                    text += (
                        f" (a {kind}'s units counted as a ReLU after it would see them; if"
                        f" none follows, watch(activations={{{entry['name']!r}: 'none'}}))"
                    )
                elif (
                    rule == "DeadUnits"
                    and kind
                    and kind.removeprefix("Lazy").startswith(_READ_NORM_KINDS)
                ):
                    # a norm the model follows with F.relu (probes read it as the ReLU would):
                    # its bias (beta) and scale decide which channels stay below 0
                    text += (
                        f" (a {kind}'s channels counted as a ReLU after it would see them: its"
                        " bias and scale keep them below 0; if no ReLU follows,"
                        f" watch(activations={{{entry['name']!r}: 'none'}}))"
                    )
                fired.append((entry["name"], ratio, text))
        return self._per_layer(rule, step, fired, threshold, hint)

    def _vanishing(self, step: int, entries: Sequence[Mapping[str, Any]]) -> list[Finding]:
        # mean |g| <= rms(g) = ||g|| / sqrt(n): with the parameter count n we compare the RMS,
        # without it the norm itself; both can only under-report, never raise a false alarm.
        threshold = self.config.vanishing_gradient.threshold
        fired = []
        for entry in entries:
            name = entry["name"]
            grad_norm = _finite(_num(entry, "grad_norm"))
            n = _num(entry, "params") or self.params.get(name)
            value = grad_norm / math.sqrt(n) if grad_norm is not None and n else grad_norm
            condition = value is not None and value < threshold and name not in self.frozen
            holds = (
                value is not None
                and value < threshold * VANISHING_CLEAR_FACTOR
                and name not in self.frozen
            )
            if self._onset("VanishingGradient", name, condition, holds):
                assert value is not None
                # the RMS bounds the mean |grad| from above; 0 bounds it exactly
                what = (
                    ("mean |grad| is" + (" at most" if value else "")) if n else "gradient norm is"
                )
                fired.append((name, value, f"{what} {value:.2g}, below {threshold:.0e}"))
        if not fired:
            return []
        hint = "These layers have stopped learning" + self._vanishing_hint(entries, fired)
        return self._per_layer("VanishingGradient", step, fired, threshold, hint)

    def _vanishing_hint(
        self, entries: Sequence[Mapping[str, Any]], fired: Sequence[tuple[str, float, str]]
    ) -> str:
        """Why and what to try (after "These layers have stopped learning"), for the network
        the probes see: no gradient at all in a zero-init net is its symmetry, in a ReLU net
        its dead units (the all-zero layer after the first named one, and why it died); only
        a net with tanh/sigmoid units is told to try ReLU, named after the kinds it has."""
        kinds = self._activation_kinds(entries)
        init = self._scaled_init(kinds)
        if fired[0][1] == 0.0:
            zero = self._zero_init(entries)
            if zero:
                return f". {zero} Use {init} init."
            names = [e["name"] for e in entries]
            start = names.index(fired[0][0]) if fired[0][0] in names else len(names)
            zero_at = self.config.all_zero.threshold
            for i in range(start + 1, len(entries)):
                frac = _finite(_num(entries[i], "zero_frac"))
                if frac is not None and frac >= zero_at:
                    dead = entries[i]
                    kind = self._kind(dead)
                    died = " (its ReLUs are dead)" if kind in _DYING_KINDS else ""
                    return (
                        f": the output of layer {dead['name']} after them is "
                        f"{_pct(frac, zero_at)} zeros{died}, so no gradient flows back "
                        f"through it. {self._zero_cause(entries, i)}"
                    )
            if _DYING_KINDS & set(kinds):
                return (
                    ": dead ReLUs pass no gradient back. Try He init, a lower learning rate, "
                    "batch norm or LeakyReLU."
                )
        saturating = [k for k in kinds if k in _SATURATING_KINDS]
        if saturating:
            return f": try {init} init, batch norm, or ReLU instead of {'/'.join(saturating)}."
        if kinds:
            return f": try {init} init or batch norm."
        return ": try Xavier/He init, batch norm, or ReLU if the hidden layers use sigmoid/tanh."

    def _activation_kinds(self, entries: Sequence[Mapping[str, Any]]) -> list[str]:
        """The activation modules among the probed layers, each kind once, in depth order."""
        out: list[str] = []
        for entry in entries:
            kind = (self._kind(entry) or "").removeprefix("Lazy")
            if kind in ACTIVATION_KINDS and kind not in out:
                out.append(kind)
        return out

    @staticmethod
    def _scaled_init(kinds: Sequence[str]) -> str:
        """PRACTICES' scaled init for these activations: Xavier for tanh-like, He for ReLU."""
        tanh_like = [k in _SATURATING_KINDS for k in kinds]
        if not kinds or (any(tanh_like) and not all(tanh_like)):
            return "Xavier/He"  # unknown, or both kinds in one net
        return "Xavier" if all(tanh_like) else "He"

    def _zero_init(self, entries: Sequence[Mapping[str, Any]]) -> str | None:
        """A zero init's symptom, said, or None: the first probed layer (not an activation,
        whose zeros may be dead units) already has no spread at all (std 0: every unit
        computes the same)."""
        if not entries:
            return None
        first = entries[0]
        kind = (self._kind(first) or "").removeprefix("Lazy")
        if kind in ACTIVATION_KINDS or _finite(_num(first, "std")) != 0.0:
            return None
        return (
            f"The first probed layer, {first['name']}, already outputs one value everywhere "
            "(std 0): a zero init, which never breaks symmetry (every unit computes the same "
            "thing, gets the same gradient and stays identical)."
        )

    def _zero_cause(self, entries: Sequence[Mapping[str, Any]], end: int) -> str:
        """Why layer ``entries[end]`` outputs only zeros, as the layers up to it show, with
        what to try: a zero init (no spread from the first layer on), activations grown huge
        before it (a too-large init or learning rate: the ReLUs behind see only negatives),
        or shrunk to nothing (a too-small init), each by more than PoorInitialization's
        factor against the first probed layer; else dead units."""
        kinds = self._activation_kinds(entries)
        init = self._scaled_init(kinds)
        zero = self._zero_init(entries[: end + 1])
        if zero:
            return f"{zero} Use {init} init."
        stds = [(e, s) for e in entries[:end] if (s := _finite(_num(e, "std"))) is not None]
        factor = self.config.poor_initialization.threshold
        if stds and stds[0][1] > 0.0:
            (first, s0) = stds[0]
            big, s_big = max(stds, key=lambda pair: pair[1])
            if s_big > factor * s0:
                lo, hi = _finite(_num(big, "min")), _finite(_num(big, "max"))
                far = max((v for v in (lo, hi) if v is not None), key=abs, default=None)
                values = f" (values as far as {far:.2g})" if far is not None else ""
                return (
                    f"Activations grew to std {s_big:.2g}{values} at layer {big['name']}, from "
                    f"{s0:.2g} at layer {first['name']}, and the units behind died: a too-large "
                    f"init (or learning rate) blew them up. Use {init} init (scaled to the "
                    "fan-in), a lower learning rate, or batch norm."
                )
            live = [(e, s) for e, s in stds if s > 0.0]
            small, s_small = min(live, key=lambda pair: pair[1])
            if s_small * factor < s0:
                return (
                    f"Activations shrank to std {s_small:.2g} at layer {small['name']}, from "
                    f"{s0:.2g} at layer {first['name']}, down to all zeros: a too-small init "
                    f"starves the deep layers. Use {init} init (scaled to the fan-in) or batch "
                    "norm."
                )
        if (self._kind(entries[end]) or "").removeprefix("Lazy") in _DYING_KINDS:
            return (
                f"Layer {entries[end]['name']}'s ReLUs are dead (every input negative): try He "
                "init, a lower learning rate, batch norm or LeakyReLU."
            )
        return f"Check that layer's weights and the init ({init}), or add batch norm."

    def _all_zero(self, step: int, entries: Sequence[Mapping[str, Any]]) -> list[Finding]:
        # The probes see outputs; a layer's input is the previous probed layer's output.
        threshold = self.config.all_zero.threshold
        fired = []
        for prev, entry in zip(entries, entries[1:], strict=False):
            zero_frac = _finite(_num(prev, "zero_frac"))
            condition = zero_frac is not None and zero_frac >= threshold
            if self._onset("AllZero", entry["name"], condition):
                assert zero_frac is not None
                text = (
                    f"its input (the output of layer {prev['name']}) is "
                    f"{_pct(zero_frac, threshold)} zeros"
                )
                fired.append((entry["name"], zero_frac, text))
        if not fired:
            return []
        names = [e["name"] for e in entries]
        hint = self._zero_cause(entries, names.index(fired[0][0]) - 1)
        return self._per_layer("AllZero", step, fired, threshold, hint)

    def _poor_init(self, step: int, entries: Sequence[Mapping[str, Any]]) -> list[Finding]:
        cfg = self.config.poor_initialization
        # the first probe steps of a run's first POOR_INIT_MAX_STEP steps: a run resumed from
        # a checkpoint (watch(resume=...)) starts at its step, trained, and is never read
        if self._probe_steps > cfg.probe_steps or step > POOR_INIT_MAX_STEP:
            return []
        kinds = [self._kind(e) for e in entries]
        if entries and kinds[-1] is not None and self._is_pre_activation(kinds[-1]):
            # the output layer: its logits' scale is the loss's business, not the init's (a
            # He-initialised ReLU net's head, or the only layer batch norm leaves unscaled)
            entries, kinds = entries[:-1], kinds[:-1]
        if any(k is not None and self._is_pre_activation(k) for k in kinds):
            chosen = [
                e for e, k in zip(entries, kinds, strict=True) if k and self._is_pre_activation(k)
            ]
        else:
            # activation modules only: an Embedding's output is its table (N(0, 1) by
            # default) and a recurrent layer's is bounded by its gates, neither scaled to a
            # fan-in, so "from 1 at layer emb to 0.067 at layer rnn" was no init's fault
            # (an Embedding -> LSTM model at PyTorch's defaults, its layers probed by type);
            # a kind not known (None) is compared as before
            chosen = [
                e
                for e, k in zip(entries, kinds, strict=True)
                if k is None or k.removeprefix("Lazy") in ACTIVATION_KINDS
            ]
        stds = [(e["name"], s) for e in chosen if (s := _finite(_num(e, "std"))) is not None]
        # A first layer with no spread at all is AllZero's and DeadUnits' case, not a ratio.
        if len(stds) < 2 or stds[0][1] <= 0.0:
            return []
        (first, s0), (last, s1) = stds[0], stds[-1]
        ratio = s1 / s0
        condition = ratio > cfg.threshold or ratio < 1.0 / cfg.threshold
        if not self._onset("PoorInitialization", "run", condition):
            return []
        if not self._audible("PoorInitialization"):
            return []
        factor = ratio if ratio >= 1.0 else (1.0 / ratio if ratio > 0 else math.inf)
        message = (
            f"layer {last}: activation std {'grows' if ratio >= 1.0 else 'shrinks'} "
            f"{factor:.3g}x across the network at step {step}, from {s0:.3g} at layer {first} "
            f"to {s1:.3g} at layer {last}, beyond the {cfg.threshold:g}x threshold. Scale the "
            "init to the fan-in (Xavier for tanh, He for ReLU) or add batch norm."
        )
        return [Finding("PoorInitialization", step, last, message, ratio, cfg.threshold)]

    def _probe_explosion(
        self, step: int, entries: Sequence[Mapping[str, Any]], scalars: Mapping[str, Any]
    ) -> list[Finding]:
        # In the order a step meets them: the pre-step weights (bad since an earlier step,
        # they made this forward bad too), the forward pass's activations, the backward
        # pass's gradients, the optimizer's updates. The first source that is bad at the
        # episode's onset names it.
        out = self._explosion(
            step, "weights", *_bad_layers(entries, "weights", "weight_norm", _nonfinite)
        )
        out += self._explosion(
            step, "activations", *_bad_layers(entries, "activations", "nonfinite", _positive)
        )
        for where, key in (("gradients", "grad_norm"), ("updates", "update_ratio")):
            out += self._explosion(step, where, *_bad_layers(entries, where, key, _nonfinite))
        # Raw floats only: a decoder that turned NaN into None has hidden the explosion.
        for key, words in (("grad_norm", "the gradients (global norm)"), ("loss", "the loss")):
            value = _num(scalars, key)
            if value is not None:
                out += self._explosion(step, key, not math.isfinite(value), words)
        return out

    # ---- flushed losses ----

    def on_loss(self, step: int, loss: float | None) -> list[Finding]:
        """Feed every flushed training loss (raw float; None when unknown)."""
        with self._lock:
            out: list[Finding] = []
            if loss is None:
                return out
            finite = math.isfinite(loss)
            if "ExplodingTensor" in self.enabled:
                out += self._explosion(step, "loss", not finite, "the training loss")
            if "LossNotDecreasing" in self.enabled:
                out += self._loss_window(step, loss if finite else None)
            if finite:
                self._train_sum += loss
                self._train_n += 1
            return out

    def _loss_window(self, step: int, loss: float | None) -> list[Finding]:
        # Each completed window's mean is compared with the best earlier window, not just the
        # previous one: on a noisy plateau consecutive means wobble both ways. Leaving a stall
        # also takes a drop beyond the noise (LOSS_NOISE_Z standard errors of the two means),
        # so a plateau's wobble does not clear and re-fire the alert.
        cfg = self.config.loss_not_decreasing
        block = step // cfg.num_steps
        out: list[Finding] = []
        if self._loss_block is not None and block != self._loss_block and self._loss_n:
            n = self._loss_n
            mean = self._loss_sum / n
            se2 = max(self._loss_sq / n - mean * mean, 0.0) / n  # squared standard error
            best = self._best_window_mean
            first = self._first_window_mean
            if first is None:
                self._first_window_mean = first = mean
            # At its floor (fallen to a small fraction of where it started) a loss is
            # converged, not stalled: see LOSS_CONVERGED_FRACTION.
            converged = first > 0.0 and 0.0 <= mean <= cfg.converged_fraction * first
            if best is not None and best != 0.0:
                decrease = 100.0 * (best - mean) / abs(best)
                stalled = decrease < cfg.diff_percent
                if not stalled and ("LossNotDecreasing", "run") in self._active:
                    stalled = best - mean < LOSS_NOISE_Z * math.sqrt(se2 + self._best_window_se2)
                stalled = stalled and not converged
                self._stalled_windows = self._stalled_windows + 1 if stalled else 0
                fired = self._onset(
                    "LossNotDecreasing", "run", self._stalled_windows >= cfg.windows
                )
                if fired and self._audible("LossNotDecreasing"):
                    message = (
                        f"training loss has not decreased by {cfg.diff_percent:g}% at step "
                        f"{step}: the mean over the last {cfg.num_steps} steps is {mean:.4g}, "
                        f"the best earlier window {best:.4g} ({decrease:+.2f}%). Check the "
                        "learning rate (too high oscillates, too low stalls); a network that "
                        "cannot fit ~100 examples (--overfit 100) is broken."
                    )
                    finding = Finding(
                        "LossNotDecreasing", step, None, message, decrease, cfg.diff_percent
                    )
                    out.append(finding)
            if best is None or mean < best:
                self._best_window_mean, self._best_window_se2 = mean, se2
            self._loss_sum, self._loss_sq, self._loss_n = 0.0, 0.0, 0
        self._loss_block = block
        if loss is not None:
            self._loss_sum += loss
            self._loss_sq += loss * loss
            self._loss_n += 1
        return out

    # ---- evaluations ----

    def on_eval(
        self,
        step: int,
        val_loss: float | None,
        train_loss: float | None = None,
        *,
        weight_decay_on: bool | None = None,
        weight_decay_settable: bool | None = None,
    ) -> list[Finding]:
        """Feed each validation pass: its loss and the training loss to compare it with
        (None: the mean of the training losses fed to ``on_loss`` since the last evaluation).
        ``weight_decay_on``: whether the optimizer used weight decay then (None: unknown, as
        before); Overfit's advice says "raise it" rather than "add" when it is on.
        ``weight_decay_settable``: whether some param group has a non-zero weight decay to
        switch on (None: unknown, as before); where none has, Overfit says how to restart
        with one rather than "add weight decay", and auto weight decay sends nothing."""
        with self._lock:
            if weight_decay_on is not None:
                self._weight_decay_on = weight_decay_on
            if weight_decay_settable is not None:
                self._weight_decay_settable = weight_decay_settable
            if train_loss is None and self._train_n:
                train_loss = self._train_sum / self._train_n
            self._train_sum, self._train_n = 0.0, 0
            out: list[Finding] = []
            if val_loss is None:
                return out
            if "ExplodingTensor" in self.enabled:
                out += self._explosion(
                    step, "val_loss", not math.isfinite(val_loss), "the validation loss"
                )
            if not math.isfinite(val_loss):
                return out
            if "Overfit" in self.enabled:
                out += self._overfit(step, val_loss, train_loss)
            out += self._plateau(step, val_loss, _finite(train_loss))
            return out

    def _overfit(self, step: int, val: float, train: float | None) -> list[Finding]:
        cfg = self.config.overfit
        train = _finite(train)
        if train is None or train <= 0 or step < cfg.start_step:
            return []
        ratio = (val - train) / train
        # A validation loss still reaching new lows is generalising, however large the relative
        # gap: near zero training loss the ratio grows on every well-fitted run (digits: val
        # 0.10 vs train 0.075 at step 450 while val keeps falling to 0.06).
        best = self._best_val
        improving = best is not None and val < best * (1.0 - self.config.plateau.min_delta_rel)
        over = ratio > cfg.ratio_threshold and not improving
        self._overfit_streak = self._overfit_streak + 1 if over else 0
        # One episode while the gap stays above the threshold: a validation loss that sets a
        # new best now and then breaks the streak but not the over-fitting (a long live run
        # on digits raised Overfit every ~160 steps).
        if not self._onset(
            "Overfit", "run", self._overfit_streak >= cfg.patience, ratio > cfg.ratio_threshold
        ):
            if ("Overfit", "run") not in self._active:
                self._weight_decay_held = None  # no episode open: nothing held back
            elif self._weight_decay_held is not None and over and self._audible("Overfit"):
                return self._overfit_fitted(step, val, train, ratio)
            return []
        self._weight_decay_held = None
        if not self._audible("Overfit"):
            return []
        message = (
            f"validation loss {val:.4g} is {_pct(ratio, cfg.ratio_threshold)} above training "
            f"loss {train:.4g} at step {step}, over the {_pct_threshold(cfg.ratio_threshold)} "
            f"threshold for {cfg.patience} evaluations"
        )
        action = None
        acting = self._weight_decay_may_act()
        under = self._under_fitting(train)
        if under is not None:
            # PRACTICES: no weight decay while the model under-fits. The gap is there, but a
            # broken network is the thing to fix; while this episode lasts, each evaluation
            # checks again (``_overfit_fitted``), and auto weight decay acts once it fits.
            self._weight_decay_held = step
            message += f", but the model is still under-fitting: {under}; {_FIX_FIRST}"
            if acting:
                message += (
                    " Auto weight decay leaves weight decay off for now: it switches it on if "
                    "this gap still holds once training loss is down to "
                    f"{_pct(PLATEAU_CONVERGED_FRACTION)} of its first evaluation's or those "
                    "alerts have closed."
                )
            acting = False
        elif acting:
            # Acting, it does the "add weight decay" itself: the advice is what is left.
            message += (
                ": the model is over-fitting. Switching weight decay on (auto weight decay); "
                "if the gap stays, add dropout or more data."
            )
        else:
            message += ": the model is over-fitting. " + self._weight_decay_advice()
        if acting:
            action = self._weight_decay_on_action(step, ratio)
        return [Finding("Overfit", step, None, message, ratio, cfg.ratio_threshold, action)]

    def _weight_decay_may_act(self) -> bool:
        """Whether auto weight decay switches weight decay on at an Overfit: it is on, has
        not acted yet (since switched on), some param group has a weight decay to switch on
        (or that is unknown), and weight decay is not on already (nothing to switch on)."""
        return (
            self.auto_weight_decay
            and not self._weight_decay_sent
            and self._weight_decay_settable is not False
            and not self._weight_decay_on
        )

    def _weight_decay_on_action(self, step: int, ratio: float) -> dict[str, Any]:
        """Auto weight decay's one command (marked sent): weight decay on, with its reason."""
        threshold = self.config.overfit.ratio_threshold
        self._weight_decay_sent = True
        reason = (
            f"Overfit at step {step}: val/train loss gap {_pct(ratio, threshold)}"
            f" > {_pct_threshold(threshold)}"
        )
        return {
            "name": "set_weight_decay",
            "args": {"enabled": True},
            "source": "rule",
            "reason": reason,
        }

    def _overfit_fitted(self, step: int, val: float, train: float, ratio: float) -> list[Finding]:
        """An evaluation of an open Overfit episode whose onset held weight decay back for
        an under-fitting model (``_weight_decay_held``): once the model no longer
        under-fits (training loss down to its fitted floor, or no layer rule's alert open)
        and auto weight decay may act, it switches weight decay on, in a finding of its own
        that says why now. The episode itself goes on (no new onset); nothing otherwise. A
        ReLU net memorising random labels with 70% of a layer dead fitted its training
        data (loss 2.1 -> 0.001) while validation loss climbed to 8.4, and weight decay,
        held back at the onset, stayed off for the whole run."""
        if not self._weight_decay_may_act() or self._under_fitting(train) is not None:
            return []
        held, self._weight_decay_held = self._weight_decay_held, None
        cfg = self.config.overfit
        first = self._first_train
        if first is not None and first > 0.0 and 0.0 <= train <= PLATEAU_CONVERGED_FRACTION * first:
            now = (
                f"the model has now fitted its training data (training loss {train:.4g} is "
                f"{_pct(train / first, PLATEAU_CONVERGED_FRACTION)} of its first evaluation's "
                f"{first:.4g}, fitted is {_pct(PLATEAU_CONVERGED_FRACTION)} or less)"
            )
        else:
            rules = ", ".join(_BROKEN_LAYER_RULES[:-1]) + " or " + _BROKEN_LAYER_RULES[-1]
            now = f"the model is no longer under-fitting (no {rules} alert holds now)"
        message = (
            f"validation loss {val:.4g} is {_pct(ratio, cfg.ratio_threshold)} above training "
            f"loss {train:.4g} at step {step}, still over the "
            f"{_pct_threshold(cfg.ratio_threshold)} threshold since Overfit fired at step "
            f"{held}, when weight decay was held back for an under-fitting model; {now}, so "
            "it is over-fitting. Switching weight decay on (auto weight decay); if the gap "
            "stays, add dropout or more data."
        )
        action = self._weight_decay_on_action(step, ratio)
        return [Finding("Overfit", step, None, message, ratio, cfg.ratio_threshold, action)]

    def _under_fitting(self, train: float) -> str | None:
        """Why the model still under-fits, said, or None: some layer rule's alert holds now
        (an open DeadUnits, Saturation, VanishingGradient or AllZero onset of a rule not
        silenced: one silenced, as a false alarm may be, keeps quiet here too) while training
        loss ``train`` has not come down to its floor, at most
        PLATEAU_CONVERGED_FRACTION of the run's first evaluated training loss (where
        auto-halve counts a model as fitted, validation flat above it being over-fitting).
        A model that has fitted its training data over-fits whatever a layer shows (the
        default-init ReLU net on digits kept two DeadUnits layers at 100% accuracy)."""
        first = self._first_train if self._first_train is not None else train
        if first > 0.0 and 0.0 <= train <= PLATEAU_CONVERGED_FRACTION * first:
            return None
        order = {name: i for i, name in enumerate(self.kinds)}
        broken = []
        for rule in _BROKEN_LAYER_RULES:
            if rule not in self.enabled or not self._audible(rule):
                continue
            layers = sorted(
                (layer for r, layer in self._active if r == rule),
                key=lambda name: (order.get(name, len(order)), name),
            )
            if layers:
                named = ", ".join(layers[:MAX_LAYERS_NAMED])
                more = len(layers) - MAX_LAYERS_NAMED
                broken.append(
                    f"{rule} holds in {named}" + (f" and {more} more" if more > 0 else "")
                )
        if not broken:
            return None
        loss = (
            f"training loss {train:.4g} is still {100 * train / first:.0f}% of its first "
            f"evaluation's {first:.4g} (fitted is {_pct(PLATEAU_CONVERGED_FRACTION)} or less)"
            if first > 0.0
            else f"training loss {train:.4g} has not come down to a floor"
        )
        return f"{loss}, and " + "; ".join(broken)

    def _weight_decay_advice(self) -> str:
        """What Overfit (and auto-halve, giving up on an over-fitting run) tells the user to
        try, true to the run: weight decay on, off but switchable, or 0 in every group (the
        run page's switch is disabled there and set_weight_decay on is refused)."""
        if self._weight_decay_on:
            return "Weight decay is on: raise it, or add dropout or more data."
        if self._weight_decay_settable is False:
            return (
                "Add dropout or more data, or weight decay: this run's is 0 in every param "
                f"group, so it cannot be switched on live; {WEIGHT_DECAY_RESTART}."
            )
        if self._weight_decay_settable:
            return "Switch weight decay on (it is off now), or add dropout or more data."
        return "Add weight decay, dropout or more data."

    def _plateau(self, step: int, val: float, train: float | None) -> list[Finding]:
        # ReduceLROnPlateau's bookkeeping: count evaluations since the best; after acting,
        # count from zero again, so a plateau acts once and a new one must develop. PRACTICES:
        # only while training loss still falls (by PLATEAU_TRAIN_FALL_REL of its value where
        # the count began); with training loss flat too the run is stalled, not on a
        # plateau, and halving again and again would only starve it. Nor once training loss
        # has converged (PLATEAU_CONVERGED_FRACTION of the first evaluation's): validation
        # flat above it is over-fitting. Unknown training loss: validation alone.
        cfg = self.config.plateau
        if self._first_train is None and train is not None:
            self._first_train = train
        if self._best_val is None or val < self._best_val * (1.0 - cfg.min_delta_rel):
            self._best_val = val
            self._evals_since_best = 0
            self._train_at_count = train
            return []
        self._evals_since_best += 1
        if not self.auto_halve_lr or self._evals_since_best < cfg.patience:
            return []
        before = self._train_at_count
        if (
            train is not None
            and before is not None
            and not train <= before * (1.0 - PLATEAU_TRAIN_FALL_REL)
        ):
            return []  # training loss is not falling either: keep watching, do not act
        first = self._first_train
        if (
            train is not None
            and first is not None
            and first > 0.0
            and 0.0 <= train <= PLATEAU_CONVERGED_FRACTION * first
        ):
            return []  # converged: over-fitting (Overfit's case), keep watching, do not act
        self._evals_since_best = 0
        self._train_at_count = train
        best = self._best_val
        falling = (
            f" while training loss fell from {before:.4g} to {train:.4g}"
            if train is not None and before is not None
            else ""
        )
        reason = (
            f"validation loss has not improved on {best:.4g} for {cfg.patience} evaluations"
            f"{falling} (step {step})"
        )
        if self._halvings >= cfg.max_halvings:
            if self._halvings > cfg.max_halvings:
                return []  # said once below; quiet until auto-halve is switched on again
            self._halvings += 1
            message = (
                f"{reason}; auto-halve has halved the learning rate {cfg.max_halvings} times "
                f"in this run and halves no further: {self._not_a_plateau(val, train)}"
            )
            return [Finding(PLATEAU, step, None, message, val, best, None)]
        self._halvings += 1
        message = f"{reason}; halving the learning rate (auto-halve on plateau)."
        action = {
            "name": "set_lr_scale",
            "args": {"relative": cfg.factor},
            "source": "rule",
            "reason": reason,
        }
        return [Finding(PLATEAU, step, None, message, val, best, action)]

    def _not_a_plateau(self, val: float, train: float | None) -> str:
        """Why halving no further, as the run looks: under-fitting where a layer rule's alert
        holds and training loss is not fitted (``_under_fitting``: fix the layers, no
        regularisation), over-fitting where validation loss is above training loss by more
        than Overfit's threshold (a lower learning rate does not cure that; regularisation
        does), else stuck."""
        gap = self.config.overfit.ratio_threshold
        under = self._under_fitting(train) if train is not None else None
        if under is not None:
            return (
                f"the model is still under-fitting, which a lower learning rate does not cure "
                f"either: {under}; {_FIX_FIRST}"
            )
        if train is not None and train > 0 and (val - train) / train > gap:
            return (
                f"validation loss {val:.4g} stays far above training loss {train:.4g}, so the "
                "model is over-fitting, which a lower learning rate does not cure. "
                + self._weight_decay_advice()
            )
        return (
            "the run may be stuck rather than on a plateau (check the init, the data and the "
            "loss curve)."
        )
