"""rule_config — the diagnostic rules' names, default thresholds and their parsing.

Owns: every rule threshold as a named constant (defaults taken from SageMaker
Debugger's built-in rules), the per-rule config dataclasses, and turning flat
``<section>_<field>`` threshold keyword arguments into a checked ``RuleConfig``.

Never: evaluates a rule, imports torch, or holds run state (``rules`` does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from layerscope.trainer import wire
from layerscope.trainer.experiment_config import PLATEAU_ALERT

# The names live in wire (stdlib only) so the server can validate set_rules commands.
RULE_NAMES = wire.RULE_NAMES
# The alert auto-halve raises. Not one of RULE_NAMES (auto_halve_lr switches it), but
# ``Rules`` takes it in its enabled and silenced lists, as an alert's rule may be named:
# silencing it is auto-halve off (its alert and its action are all it does).
PLATEAU = PLATEAU_ALERT

# ---- defaults (SageMaker Debugger built-in rules, "List of Debugger built-in rules") ----

# DeadRelu: threshold_inactivity 1.0 % (applied by the probes' dead_ratio, DESIGN §3) and
# threshold_layer 50.0 %: a layer is flagged when more than half of its units are dead.
DEAD_UNITS_THRESHOLD_LAYER = 0.5
# SaturatedActivation: threshold_layer 50.0 %. The per-unit bar is DESIGN §3's
# saturated_ratio (saturated on a majority of values), computed by the probes.
SATURATION_THRESHOLD_LAYER = 0.5
# VanishingGradient: threshold 0.0000001 on the mean absolute gradient.
VANISHING_GRADIENT_THRESHOLD = 1e-7
# Ours (hysteresis): an alert's episode lasts until the value is clearly back, so a value
# hovering at a threshold raises one alert, not one every other probe step (a small-init
# run's layer near 1e-7 fired nine times): a vanishing gradient until it is 10x above the
# threshold, a dead/saturated layer until its ratio falls below 0.8x the threshold.
VANISHING_CLEAR_FACTOR = 10.0
RATIO_CLEAR_FACTOR = 0.8
# ExplodingTensor: only_nan False (NaN and Inf both count); any non-finite value fires.
# SageMaker only reports; the issue asks for an automatic pause.
EXPLODING_TENSOR_PAUSE = True
# LossNotDecreasing: num_steps 10, diff_percent 0.1 %. SageMaker compares single saved
# losses, and saves them every 500 steps by default; one mini-batch loss is far too noisy
# for a 10-step comparison, so we compare means over 100-step windows.
LOSS_WINDOW_STEPS = 100
LOSS_DIFF_PERCENT = 0.1
# Ours: once stalled, the loss counts as moving again only after a drop of 2 standard errors.
LOSS_NOISE_Z = 2.0
# Ours: a stall must last 2 windows in a row. Late in a healthy run one window is often a
# little above the best (digits demo, batch 32: window 1500-1599 at 0.0738 after 0.0727,
# then 0.0637), and the best earlier window is itself the luckiest of many.
LOSS_STALL_WINDOWS = 2
# Ours: a window whose mean is at most this fraction of the run's first window's (a loss
# that has fallen 20x: cross-entropy from 2.3 to 0.1 or less) is at its floor, not stalled:
# there mini-batch noise swamps a 0.1% decrease, and the converged digits demo (loss 0.034,
# train accuracy ~1) was told at step 6900 that it could not fit ~100 examples. It counts
# again once the loss climbs back above it. 0 turns this off; not for losses that go <= 0.
LOSS_CONVERGED_FRACTION = 0.05
# Overfit: ratio_threshold 0.1 on (val - train) / train, start_step 0, patience 1. Our
# default patience is the run's (3 evaluations): one noisy validation pass is not a trend.
# Ours: an evaluation that sets a new validation best (PLATEAU_MIN_DELTA_REL) does not
# count, since validation loss that still falls is not over-fitting (PRACTICES.md).
OVERFIT_RATIO_THRESHOLD = 0.1
OVERFIT_START_STEP = 0
PATIENCE = 3
# AllZero: threshold 100 (%) of the values are zero.
ALL_ZERO_THRESHOLD = 1.0
# PoorWeightInitialization: threshold 10.0 on the ratio of per-layer variances, over the
# first `steps` (10) steps. We compare activation std of the last and the first layer
# over the first 3 probe steps (with probes every ~10 steps, the first ~30 steps).
POOR_INIT_THRESHOLD = 10.0
POOR_INIT_PROBE_STEPS = 3
# Ours: and only within the first 30 training steps (a run's first probe step is step 1):
# with probes every 100 steps the 2nd and 3rd were steps 100 and 200, when training, not
# the init, sets the scales (a healthy CNN's std grew 11x after 100 Adam steps); a run
# resumed from a checkpoint starts past them, trained.
POOR_INIT_MAX_STEP = 30
# Plateau (no SageMaker counterpart; PyTorch's ReduceLROnPlateau defaults): an evaluation
# improves on the best only if it is lower by more than 1e-4 relative.
PLATEAU_MIN_DELTA_REL = 1e-4
LR_HALVE_FACTOR = 0.5
# Ours: auto-halve acts at most this many times in a run (the lr scale goes no lower than
# 1/32 by itself, ReduceLROnPlateau's min_lr in spirit): a net stuck at chance, whose
# training loss creeps down by 1e-4 at a time, was halved 21 times (scale 2**-21).
PLATEAU_MAX_HALVINGS = 5

# Modules whose output is a pre-activation (DESIGN §3 probes them besides activations), and
# the activation modules DESIGN §3 probes by default.
PRE_ACTIVATION_KINDS = frozenset({"Linear", "Bilinear"})
ACTIVATION_KINDS = frozenset(
    {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
     "Softplus", "Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Hardswish", "Softsign"}
)  # fmt: skip
# One alert names at most this many further layers (a zero-init net flags every layer).
MAX_LAYERS_NAMED = 6


@dataclass(frozen=True)
class DeadUnitsConfig:
    threshold_layer: float = DEAD_UNITS_THRESHOLD_LAYER


@dataclass(frozen=True)
class SaturationConfig:
    threshold_layer: float = SATURATION_THRESHOLD_LAYER


@dataclass(frozen=True)
class VanishingGradientConfig:
    threshold: float = VANISHING_GRADIENT_THRESHOLD


@dataclass(frozen=True)
class ExplodingTensorConfig:
    pause: bool = EXPLODING_TENSOR_PAUSE


@dataclass(frozen=True)
class LossNotDecreasingConfig:
    num_steps: int = LOSS_WINDOW_STEPS
    diff_percent: float = LOSS_DIFF_PERCENT
    windows: int = LOSS_STALL_WINDOWS
    converged_fraction: float = LOSS_CONVERGED_FRACTION


@dataclass(frozen=True)
class OverfitConfig:
    ratio_threshold: float = OVERFIT_RATIO_THRESHOLD
    patience: int = PATIENCE
    start_step: int = OVERFIT_START_STEP


@dataclass(frozen=True)
class AllZeroConfig:
    threshold: float = ALL_ZERO_THRESHOLD


@dataclass(frozen=True)
class PoorInitializationConfig:
    threshold: float = POOR_INIT_THRESHOLD
    probe_steps: int = POOR_INIT_PROBE_STEPS


@dataclass(frozen=True)
class PlateauConfig:
    patience: int = PATIENCE
    min_delta_rel: float = PLATEAU_MIN_DELTA_REL
    factor: float = LR_HALVE_FACTOR
    max_halvings: int = PLATEAU_MAX_HALVINGS


@dataclass(frozen=True)
class RuleConfig:
    """Every rule's thresholds. ``Rules(**thresholds)`` takes them flat: ``<section>_<field>``
    (``dead_units_threshold_layer=0.6``, ``overfit_patience=5``); see ``threshold_names()``."""

    dead_units: DeadUnitsConfig = field(default_factory=DeadUnitsConfig)
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    vanishing_gradient: VanishingGradientConfig = field(default_factory=VanishingGradientConfig)
    exploding_tensor: ExplodingTensorConfig = field(default_factory=ExplodingTensorConfig)
    loss_not_decreasing: LossNotDecreasingConfig = field(default_factory=LossNotDecreasingConfig)
    overfit: OverfitConfig = field(default_factory=OverfitConfig)
    all_zero: AllZeroConfig = field(default_factory=AllZeroConfig)
    poor_initialization: PoorInitializationConfig = field(default_factory=PoorInitializationConfig)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)


def _flat_fields() -> dict[str, tuple[str, str, Any]]:
    """``<section>_<field>`` -> (section, field, default) for every threshold."""
    out: dict[str, tuple[str, str, Any]] = {}
    defaults = RuleConfig()
    for section in dataclasses.fields(RuleConfig):
        sub = getattr(defaults, section.name)
        for f in dataclasses.fields(sub):
            out[f"{section.name}_{f.name}"] = (section.name, f.name, getattr(sub, f.name))
    return out


def threshold_names() -> dict[str, Any]:
    """Every flat threshold name ``Rules`` accepts, with its default (for CLI help)."""
    return {key: default for key, (_, _, default) in _flat_fields().items()}


def _check_threshold(key: str, default: Any, value: Any) -> None:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"rule threshold {key} must be true or false, got {value!r}")
    elif isinstance(default, int):
        least = 0 if key.endswith("start_step") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"rule threshold {key} must be an integer >= {least}, got {value!r}")
    elif (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"rule threshold {key} must be a finite number >= 0, got {value!r}")


def build_config(patience: int, thresholds: Mapping[str, Any]) -> RuleConfig:
    flat = _flat_fields()
    unknown = sorted(set(thresholds) - set(flat))
    if unknown:
        raise ValueError(f"unknown rule threshold(s) {unknown}; expected one of {sorted(flat)}")
    values: dict[str, Any] = {"overfit_patience": patience, "plateau_patience": patience}
    values.update(thresholds)
    changes: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name, default = flat[key]
        _check_threshold(key, default, value)
        changes.setdefault(section, {})[name] = value
    defaults = RuleConfig()
    return RuleConfig(
        **{s: dataclasses.replace(getattr(defaults, s), **fields) for s, fields in changes.items()}
    )
