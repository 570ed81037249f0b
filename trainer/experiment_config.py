"""experiment_config — the schema of a built-in experiment and its validation.

Owns: EXPERIMENT_SCHEMA (one dict-of-dicts the server validates ``POST /api/runs``
with and the dashboard walks to build its New-run form; the trainer's CLI builds
its flags from it), ``validate_experiment``, ``DEMO_EXPERIMENT``, the config of a
resumed run (``resume_config``: the checkpoint's, what a resume may change), and
``FileName``/``local_paths`` (a path from this machine's OS, which may hold what is not
UTF-8: the CLI's, never a REST body's).

Never: imports torch or anything outside the standard library and ``wire``; the
server reaches these names through ``layerscope.trainer.wire`` (which loads this
module on first use), so wire stays the one module trainer and server share.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

from layerscope.trainer.wire import (
    MAX_NAME_LEN,
    RULE_NAMES,
    WireError,
    escape_surrogates,
    surrogate_errors,
)

# ---- experiment config (built-in runs; POST /api/runs; the New-run form) ----
#
# One dict-of-dicts the server validates with and the dashboard walks to build its
# form: top-level fields plus sections, each field with type, default, bounds or
# choices and help text. Types: "int", "float", "bool", "str", "choice".
# "nullable" fields accept null; "aliases" maps accepted words to stored values;
# "when" says which other field's values make this one matter (a form may hide it).


class ExperimentError(WireError):
    """An experiment config with bad fields; ``errors`` lists every one as {loc, msg}."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        text = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        super().__init__(f"invalid experiment config: {text}")


ARCHS = ("mlp", "cnn")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh", "sigmoid")
INITS = ("default", "zero", "normal", "xavier", "he")
DATASETS = ("digits", "spirals", "blobs", "npz", "folder")
IMAGE_DATASETS = frozenset({"digits", "npz", "folder"})
PREPROCESS = ("none", "per_pixel", "per_channel")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_STEPS = 1000  # used when neither steps nor epochs is given
# The alert auto-halve raises (``rules.PLATEAU``). Not one of RULE_NAMES (it has its own
# switch, auto_halve_lr), but named in rules.enabled/silence as an alert's rule can be:
# silencing it (no alert, no action) is auto-halve off, so it is refused beside it.
PLATEAU_ALERT = "ValidationPlateau"

EXPERIMENT_SCHEMA: dict[str, Any] = {
    "name": {
        "type": "str",
        "default": None,
        "nullable": True,
        "max_length": MAX_NAME_LEN,
        "label": "Run name",
        "help": "Shown in the runs list; default is built from arch, activation, init and dataset.",
    },
    "every": {
        "type": "int",
        "default": 10,
        "min": 1,
        "max": 100_000,
        "label": "Probe every N steps",
        "help": "Per-layer statistics (histograms, dead and saturated ratios) are taken every "
        "N steps; other steps only record loss. Watch hidden layers while training: the loss "
        "curve alone does not say which layer died.",
    },
    "overfit": {
        "type": "int",
        "default": None,
        "nullable": True,
        "min": 1,
        "max": 100_000,
        "label": "Overfit sanity check (N examples)",
        "help": "Before a long run, a network must reach 100% on ~100 examples with "
        "regularisation off; if it cannot, the network or the code is broken. Sets subset=N, "
        "turns dropout, weight decay and input noise off and silences the Overfit rule (the "
        "check over-fits on purpose); the run reports pass/fail.",
    },
    "model": {
        "type": "section",
        "label": "Model",
        "help": "A built-in network: an MLP or a small CNN for 1xHxW images.",
        "fields": {
            "arch": {
                "type": "choice",
                "choices": list(ARCHS),
                "default": "mlp",
                "label": "Architecture",
                "help": "mlp: fully connected hidden layers; cnn: conv/activation/pool blocks "
                "plus a linear head (image data only: digits, npz images, folder).",
            },
            "depth": {
                "type": "int",
                "default": 2,
                "min": 1,
                "max": 64,
                "label": "Hidden layers",
                "help": "Number of hidden layers (conv blocks for cnn). In deep nets a poor "
                "init shrinks or saturates activations layer by layer.",
            },
            "width": {
                "type": "int",
                "default": 64,
                "min": 1,
                "max": 4096,
                "label": "Width",
                "help": "Units per hidden layer (channels per conv block for cnn).",
            },
            "activation": {
                "type": "choice",
                "choices": list(ACTIVATIONS),
                "default": "relu",
                "label": "Activation",
                "help": "Prefer ReLU over sigmoid in hidden layers: sigmoid saturates and is "
                "not zero-centred.",
            },
            "init": {
                "type": "choice",
                "choices": list(INITS),
                "default": "he",
                "label": "Weight init",
                "help": "Xavier (variance 2/(fan-in + fan-out)) for tanh-like layers, He "
                "(2/fan-in, √2 larger) for ReLU, so each layer's output variance matches its "
                "input's. zero: every unit stays identical (no symmetry breaking); small "
                "normal: deep layers' activations shrink towards zero; large normal: "
                "tanh/sigmoid units pin at their bounds. default: the framework's own init.",
            },
            "init_std": {
                "type": "float",
                "default": 0.01,
                "min": 0.0,
                "max": 100.0,
                "when": {"init": ["normal"]},
                "label": "Normal init std",
                "help": "Standard deviation for the normal init: 0.01 is fine for shallow nets, "
                "but deep ones' activations shrink towards zero; 1 saturates tanh/sigmoid.",
            },
            "batch_norm": {
                "type": "bool",
                "default": False,
                "label": "Batch norm",
                "help": "Batch normalisation lowers the dependence on initialisation: inputs "
                "to a layer no longer drift to all-zero or to saturation.",
            },
            "dropout": {
                "type": "float",
                "default": 0.0,
                "min": 0.0,
                "max": 0.95,
                "label": "Dropout",
                "help": "Probability of dropping a hidden unit while training (inverted "
                "dropout, scaled by 1/(1-p), so prediction needs no change; off in validation).",
            },
        },
    },
    "data": {
        "type": "section",
        "label": "Data",
        "help": "Built-in data sets need no download; npz and folder read local files.",
        "fields": {
            "dataset": {
                "type": "choice",
                "choices": list(DATASETS),
                "default": "digits",
                "label": "Dataset",
                "help": "digits: 1797 8x8 handwritten digits (ships with scikit-learn); "
                "spirals: 2-D interleaved spiral arms; blobs: 2-D Gaussian clusters; npz: a "
                "local .npz with arrays x (or X) and y; folder: one subfolder per class of "
                ".npy or .pgm images (PNG/JPEG when Pillow is installed).",
            },
            "path": {
                "type": "str",
                "default": None,
                "nullable": True,
                "max_length": 4096,
                "when": {"dataset": ["npz", "folder"]},
                "label": "Path",
                "help": "Local file (npz) or directory (folder) on the machine that trains.",
            },
            "preprocess": {
                "type": "choice",
                "choices": list(PREPROCESS),
                "default": "none",
                "label": "Mean subtraction",
                "help": "Subtract the training split's mean per pixel (every input position "
                "its own mean) or per channel (one mean per image channel).",
            },
            "input_noise": {
                "type": "float",
                "default": 0.0,
                "min": 0.0,
                "max": 100.0,
                "label": "Input noise std",
                "help": "Gaussian noise added to training inputs (never to validation); "
                "adding input noise makes a model more robust.",
            },
            "val_fraction": {
                "type": "float",
                "default": 0.2,
                "min": 0.0,
                "max": 0.9,
                "label": "Validation fraction",
                "help": "Share of examples held out for validation (split by the seed). When "
                "validation loss stops falling while training loss still falls, halve the LR.",
            },
            "subset": {
                "type": "int",
                "default": None,
                "nullable": True,
                "min": 1,
                "max": 100_000_000,
                "label": "Training subset",
                "help": "Use only the first N training examples (empty: all).",
            },
        },
    },
    "solver": {
        "type": "section",
        "label": "Solver",
        "help": "Cross-entropy loss, optimiser and schedule.",
        "fields": {
            "optimizer": {
                "type": "choice",
                "choices": list(OPTIMIZERS),
                "default": "adam",
                "label": "Optimizer",
                "help": "sgd: plain SGD; momentum: SGD with momentum 0.9; adam; adamw "
                "(decoupled weight decay).",
            },
            "lr": {
                "type": "float",
                "default": 0.001,
                "min": 0.0,
                "max": 100.0,
                "label": "Learning rate",
                "help": "Step size. Halve it when validation loss plateaus (the dashboard "
                "has a Halve LR button). 0 trains nothing: a control run.",
            },
            "weight_decay": {
                "type": "float",
                "default": 0.0,
                "min": 0.0,
                "max": 10.0,
                "label": "Weight decay",
                "help": "The optimizer's weight decay (0: none). Start without weight decay "
                "(the model under-fits), add it once it starts to over-fit: give a value with "
                "auto weight decay, which holds it off until the Overfit rule switches it on. "
                "A non-zero value can be toggled live; 0 cannot be switched on.",
            },
            "batch_size": {
                "type": "int",
                "default": 64,
                "min": 0,
                "max": 1_000_000,
                "aliases": {"full": 0},
                "label": "Batch size",
                "help": '1 = single-sample SGD (noisy, escapes), the full set (0 or "full") '
                "= full-batch GD (smooth, can stall; so is any size above the training set); "
                "mini-batches balance the two.",
            },
            "steps": {
                "type": "int",
                "default": DEFAULT_STEPS,
                "nullable": True,
                "min": 1,
                "max": 100_000_000,
                "label": "Steps",
                "help": "Optimizer steps to train. Wins over epochs when both are set; "
                f"left out with epochs given, epochs decide (default {DEFAULT_STEPS}).",
            },
            "epochs": {
                "type": "int",
                "default": None,
                "nullable": True,
                "min": 1,
                "max": 1_000_000,
                "label": "Epochs",
                "help": "Passes over the training set; used when steps is not set.",
            },
            "seed": {
                "type": "int",
                "default": 0,
                "min": 0,
                "max": 2**31 - 1,
                "label": "Seed",
                "help": "Seeds the split, the init, the batch order and the noise: the same "
                "seed gives the same run on the same machine (cuDNN is held to "
                "deterministic algorithms for it).",
            },
            "eval_every": {
                "type": "int",
                "default": 50,
                "min": 1,
                "max": 100_000_000,
                "label": "Validate every N steps",
                "help": "Validation loss and accuracy (eval mode, no dropout) every N steps.",
            },
            "device": {
                "type": "choice",
                "choices": list(DEVICES),
                "default": "auto",
                "label": "Device",
                "help": "auto: CUDA when available, else CPU.",
            },
        },
    },
    "rules": {
        "type": "section",
        "label": "Diagnostic rules",
        "help": "Rules evaluated on probe steps (dead units, saturation, vanishing gradients, "
        "NaN/Inf, a stalled loss, over-fitting, all-zero inputs, poor init); each alert names "
        "the layer and step. Rules can be silenced live from the dashboard.",
        "fields": {
            "enabled": {
                "type": "str",
                "default": "all",
                "max_length": 1024,
                "label": "Rules to evaluate",
                "help": "Comma-separated rule names, all, or none: "
                + ", ".join(RULE_NAMES)
                + ". An ExplodingTensor (NaN/Inf) alert pauses the run and keeps the last "
                "good checkpoint.",
            },
            "silence": {
                "type": "str",
                "default": None,
                "nullable": True,
                "max_length": 1024,
                "label": "Silenced rules",
                "help": "Comma-separated rule names that are evaluated but raise no alert and "
                f"take no action (empty: none). {PLATEAU_ALERT}, auto-halve's alert, may be "
                "named too: silenced, auto-halve does nothing, so not with auto_halve_lr.",
            },
            "auto_halve_lr": {
                "type": "bool",
                "default": False,
                "label": "Auto-halve LR on plateau",
                "help": "When validation loss stops falling while training loss still falls, "
                "halve the learning rate: once per `patience` evaluations without a new "
                "validation best, only if training loss fell meanwhile (by 5% or more) and "
                "not once it has converged (to 5% of its first value: validation flat over "
                "it is over-fitting, weight decay's case); sent as a command attributed to "
                "the rule.",
            },
            "auto_weight_decay": {
                "type": "bool",
                "default": False,
                "label": "Auto weight decay on over-fit",
                "help": "Start without weight decay (the model under-fits), add it once it "
                "starts to over-fit: the run starts with weight decay off and the Overfit "
                "rule switches solver.weight_decay on. Needs solver.weight_decay > 0.",
            },
            "patience": {
                "type": "int",
                "default": 3,
                "min": 1,
                "max": 10_000,
                "label": "Patience (evaluations)",
                "help": "Evaluations without validation improvement before the LR is halved, "
                "and evaluations over the gap before Overfit fires.",
            },
        },
    },
    "finetune": {
        "type": "section",
        "label": "Fine-tuning",
        "help": "Fine-tune from a pretrained model by freezing early layers (learning rate 0) "
        "and training the rest; layers can be frozen and unfrozen live.",
        "fields": {
            "from_checkpoint": {
                "type": "str",
                "default": None,
                "nullable": True,
                "max_length": 4096,
                "label": "From checkpoint",
                "help": "A .pt file written by the dashboard's Checkpoint command; the model's "
                "weights are loaded (the optimizer starts fresh). The model settings must "
                "match the checkpoint's.",
            },
            "freeze": {
                "type": "str",
                "default": None,
                "nullable": True,
                "max_length": 4096,
                "label": "Frozen layers",
                "help": "Comma-separated module names (e.g. net.0,net.1) whose parameters get "
                "no update; a layer freezes its children too.",
            },
        },
    },
}

# The demo follows PRACTICES.md's weight decay advice: it starts without decay (auto weight
# decay switches it off before the first step) and the Overfit rule switches 1e-3 on once
# the model over-fits (about step 7600); the run page's weight decay switch can do it first.
DEMO_EXPERIMENT: dict[str, Any] = {
    "name": "demo: digits mlp tanh xavier",
    "every": 10,
    "model": {"arch": "mlp", "depth": 4, "width": 64, "activation": "tanh", "init": "xavier"},
    "data": {"dataset": "digits", "preprocess": "per_pixel", "val_fraction": 0.2},
    "solver": {
        "optimizer": "sgd",
        "lr": 0.01,
        "weight_decay": 1e-3,
        "batch_size": 32,
        "steps": 20_000,
        "eval_every": 100,
        "seed": 0,
    },
    "rules": {"auto_weight_decay": True},
}


NUL_IN_PATH = "holds a NUL character (U+0000), which no file name can"

# The fields that name a file on the machine that trains.
PATH_FIELDS: tuple[tuple[str, str], ...] = (("data", "path"), ("finetune", "from_checkpoint"))


class FileName(str):
    """A file name as this machine's OS gave it (``sys.argv``, ``os.fsdecode``, a config
    file or checkpoint read here), for ``data.path`` and ``finetune.from_checkpoint``:
    a byte that is not UTF-8 is a lone surrogate (``caf\\udce9``, surrogateescape), kept
    so the file is opened by its real name. ``validate_experiment`` accepts one there
    (``layerscope train``: ``local_paths``); a plain str holding one is refused, as from
    a REST body, JSON text a browser cannot mean one in. What leaves the machine is
    escaped (watch()'s config and events: ``wire.escape_surrogates``). A copy (deepcopy,
    pickle: a checkpoint's config, which ``torch.load(weights_only=True)`` reads back)
    is a plain str; ``validate_resumed`` marks a checkpoint's paths again."""

    __slots__ = ()

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return (str, (str(self),))


def local_paths(cfg: Any) -> Any:
    """``cfg`` (an experiment config before validation) with its path fields that are
    strings marked as file names from this machine's OS (FileName): for a config
    ``layerscope train`` read from its flags, a file or a checkpoint, never for a REST
    body. Changed in place; returned."""
    if isinstance(cfg, dict):
        for section, key in PATH_FIELDS:
            fields = cfg.get(section)
            if isinstance(fields, dict) and isinstance(fields.get(key), str):
                fields[key] = FileName(fields[key])
    return cfg


def _shown_path(path: str) -> str:
    """A path as a message quotes it: a FileName's lone surrogates escaped (\\xNN)."""
    text: str = escape_surrogates(str(path))
    return text


def _file_names_allowed(cfg: Any, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """surrogate_errors' ``errors`` less those of a path field holding a FileName."""
    if not isinstance(cfg, dict):
        return errors
    allowed = [
        [section, key]
        for section, key in PATH_FIELDS
        if isinstance(cfg.get(section), dict) and isinstance(cfg[section].get(key), FileName)
    ]
    return [error for error in errors if error["loc"] not in allowed]


def _check_field(spec: dict[str, Any], value: Any) -> tuple[Any, str | None]:
    """Return (normalised value, None) or (None, message) for one field."""
    if value is None:
        return (None, None) if spec.get("nullable") else (None, "must not be null")
    aliases = spec.get("aliases", {})
    if isinstance(value, str) and value in aliases:
        return aliases[value], None
    kind = spec["type"]
    if kind == "choice":
        if value not in spec["choices"]:
            return None, f"must be one of {', '.join(spec['choices'])}; got {value!r}"
        return value, None
    if kind == "bool":
        if not isinstance(value, bool):
            return None, f"must be true or false, got {type(value).__name__}"
        return value, None
    if kind == "str":
        if not isinstance(value, str) or not value:
            return None, "must be a non-empty string"
        if len(value) > spec.get("max_length", MAX_NAME_LEN):
            return None, f"is {len(value)} characters; the limit is {spec['max_length']}"
        return value, None
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            extra = f" or {' or '.join(repr(a) for a in aliases)}" if aliases else ""
            return None, f"must be an integer{extra}, got {type(value).__name__} {value!r}"
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"must be a number, got {type(value).__name__} {value!r}"
        try:
            value = float(value)
        except OverflowError:  # an integer literal past a double (10**400): it raised, a 500
            return None, "must be a finite number"
        if not math.isfinite(value):
            return None, "must be a finite number"
    if "min" in spec and value < spec["min"]:
        return None, f"must be >= {spec['min']}, got {value}"
    if "max" in spec and value > spec["max"]:
        return None, f"must be <= {spec['max']}, got {value}"
    return value, None


def _check_section(
    fields: dict[str, Any], given: Any, loc: list[str], errors: list[dict[str, Any]]
) -> dict[str, Any]:
    if not isinstance(given, dict):
        errors.append({"loc": loc, "msg": f"must be an object, got {type(given).__name__}"})
        given = {}
    out: dict[str, Any] = {}
    for key in given:
        if key not in fields:
            expected = ", ".join(fields)
            errors.append({"loc": [*loc, str(key)], "msg": f"unknown field; expected {expected}"})
    for key, spec in fields.items():
        if spec["type"] == "section":
            out[key] = _check_section(spec["fields"], given.get(key, {}), [*loc, key], errors)
            continue
        if key not in given:
            out[key] = spec["default"]
            continue
        value, msg = _check_field(spec, given[key])
        if msg is not None:
            errors.append({"loc": [*loc, key], "msg": msg})
        out[key] = value
    return out


def _check_when(
    fields: dict[str, Any],
    given: Any,
    out: dict[str, Any],
    loc: list[str],
    errors: list[Any],
    explicit: frozenset[tuple[str, ...]],
) -> None:
    """A field given a value other than its default where its ``when`` condition does not
    hold would be silently ignored (``--data-path`` with the digits set, ``--init-std``
    with xavier): an error naming the field it depends on. The New-run form sends no
    hidden field, so it never trips this. A field in ``explicit`` (one the user named, a
    CLI flag) is refused whatever its value: the default given by hand is ignored too."""
    if not isinstance(given, dict):
        return
    for key, spec in fields.items():
        if spec["type"] == "section":
            _check_when(spec["fields"], given.get(key), out[key], [*loc, key], errors, explicit)
            continue
        when = spec.get("when")
        if not when or key not in given:
            continue
        if out[key] == spec["default"] and (*loc, key) not in explicit:
            continue
        for sibling, values in when.items():
            if out[sibling] not in values:
                need = " or ".join(str(v) for v in values)
                errors.append(
                    {
                        "loc": [*loc, key],
                        "msg": f"only used when {sibling} is {need} ({sibling} is {out[sibling]})",
                    }
                )


def _name_list(text: str | None) -> list[str]:
    """A comma-separated field as its names (spaces and empty items dropped)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def experiment_rule_names(text: str | None) -> list[str]:
    """``rules.enabled``/``rules.silence`` as rule names: all, none, or a comma list."""
    words = _name_list(text)
    if [w.lower() for w in words] == ["all"]:
        return list(RULE_NAMES)
    if [w.lower() for w in words] == ["none"]:
        return []
    return words


def _check_rules_and_finetune(out: dict[str, Any], errors: list[dict[str, Any]]) -> None:
    import os.path

    rules, finetune = out["rules"], out["finetune"]
    for key in ("enabled", "silence"):
        if not isinstance(rules[key], str):
            continue
        names = experiment_rule_names(rules[key])
        unknown = [n for n in names if n not in (*RULE_NAMES, PLATEAU_ALERT)]
        if unknown:
            msg = f"unknown rule(s) {', '.join(unknown)}; expected all, none or {', '.join(RULE_NAMES)}"
            errors.append({"loc": ["rules", key], "msg": msg})
        elif key == "silence":
            rules[key] = ",".join(names) or None
            if PLATEAU_ALERT in names and rules["auto_halve_lr"] is True:
                msg = (
                    f"{PLATEAU_ALERT} is auto-halve's alert: silenced (no alert, no action) it "
                    "halves nothing; leave out rules.auto_halve_lr or silence it, not both"
                )
                errors.append({"loc": ["rules", key], "msg": msg})
    solver = out["solver"]
    wd = solver["weight_decay"]
    if rules["auto_weight_decay"] is True and out["overfit"] is None and wd == 0.0:
        errors.append(
            {
                "loc": ["rules", "auto_weight_decay"],
                "msg": "needs solver.weight_decay > 0: the value switched on when Overfit fires",
            }
        )
    path = finetune["from_checkpoint"]
    if isinstance(path, str):
        if "\0" in path:
            errors.append({"loc": ["finetune", "from_checkpoint"], "msg": NUL_IN_PATH})
        elif not os.path.isfile(path):
            msg = f"no such file: {_shown_path(path)}"
            errors.append({"loc": ["finetune", "from_checkpoint"], "msg": msg})
        else:
            finetune["from_checkpoint"] = _absolute(path)
    if isinstance(finetune["freeze"], str):
        finetune["freeze"] = ",".join(_name_list(finetune["freeze"])) or None


def validate_experiment(cfg: Any, *, explicit: Iterable[Sequence[str]] = ()) -> dict[str, Any]:
    """The full config with defaults filled; raises ExperimentError listing every bad field.

    ``explicit``: the locs (``("model", "init_std")``) the user set by name, as the CLI's
    flags: one whose ``when`` does not hold is refused even at its default value. (The
    New-run form sends only the fields changed from their defaults, and none hidden.)

    Beyond per-field checks: npz/folder need an existing ``data.path`` (made
    absolute); a cnn needs image data; batch norm needs batches of at least 2;
    ``overfit=N`` sets ``data.subset=N``, turns dropout, weight decay and input
    noise off and silences Overfit; with ``epochs`` given and ``steps`` left out, epochs
    decide; a run given no name gets ``generated_name`` of its final settings.

    A lone surrogate anywhere is refused by name, except in a path field holding a
    FileName (``local_paths``: ``layerscope train``'s, a file name from this machine's OS,
    kept as it is to open the file by): a REST body's strings are plain.
    """
    import os.path  # local: the path check is the only filesystem use in this module

    # A string holding a lone surrogate ("\\udce9", as JSON or Python's os.fsdecode carry a
    # file name that is not UTF-8) is no text: the store failed on it, or stored a config
    # every later read of the run failed on. Named alone: the other checks would quote it.
    # A FileName path (layerscope train's: local_paths) is the OS's own bytes: it opens.
    surrogates = _file_names_allowed(cfg, surrogate_errors(cfg, limit=len(PATH_FIELDS) + 10))[:10]
    if surrogates:
        raise ExperimentError(surrogates)
    errors: list[dict[str, Any]] = []
    given = cfg if isinstance(cfg, dict) else {}
    if not isinstance(cfg, dict):
        errors.append({"loc": [], "msg": f"config must be an object, got {type(cfg).__name__}"})
    out = _check_section(EXPERIMENT_SCHEMA, given, [], errors)
    model, data, solver = out["model"], out["data"], out["solver"]
    solver_given: dict[str, Any] = given["solver"] if isinstance(given.get("solver"), dict) else {}
    if solver_given.get("epochs") is not None and "steps" not in solver_given:
        solver["steps"] = None
    bad_schedule = any(e["loc"][:2] in (["solver", "steps"], ["solver", "epochs"]) for e in errors)
    if solver["steps"] is None and solver["epochs"] is None and not bad_schedule:
        errors.append({"loc": ["solver", "steps"], "msg": "set steps or epochs"})
    if data["dataset"] in ("npz", "folder"):
        path = data["path"]
        want_dir = data["dataset"] == "folder"
        if path is None:
            if not any(e["loc"] == ["data", "path"] for e in errors):  # "" is refused above
                msg = f"required when dataset is {data['dataset']}"
                errors.append({"loc": ["data", "path"], "msg": msg})
        elif "\0" in path:
            errors.append({"loc": ["data", "path"], "msg": NUL_IN_PATH})
        elif want_dir and not os.path.isdir(path):
            msg = f"no such directory: {_shown_path(path)}"
            errors.append({"loc": ["data", "path"], "msg": msg})
        elif not want_dir and not os.path.isfile(path):
            errors.append({"loc": ["data", "path"], "msg": f"no such file: {_shown_path(path)}"})
        else:
            # Absolute, so a launched child with another working directory finds it too.
            data["path"] = _absolute(path)
    if model["arch"] == "cnn" and data["dataset"] not in IMAGE_DATASETS:
        errors.append(
            {
                "loc": ["model", "arch"],
                "msg": f"cnn needs image data (digits, npz, folder); {data['dataset']} are 2-D points",
            }
        )
    if model["batch_norm"] and solver["batch_size"] == 1:
        errors.append(
            {"loc": ["solver", "batch_size"], "msg": "batch norm needs batches of at least 2"}
        )
    elif model["batch_norm"] and 1 in (data["subset"], out["overfit"]):
        where = ["overfit"] if out["overfit"] == 1 else ["data", "subset"]
        errors.append({"loc": where, "msg": "batch norm needs at least 2 training examples"})
    named = frozenset(map(tuple, explicit))
    _check_when(EXPERIMENT_SCHEMA, given, out, [], errors, named)
    _check_rules_and_finetune(out, errors)
    if out["overfit"] is not None:
        # Set below whatever was given: a flag naming one would be silently dropped (a file's
        # value is, as a file's irrelevant init_std is)
        for loc, how in _OVERFIT_SETS:
            if loc in named:
                errors.append(
                    {"loc": list(loc), "msg": f"ignored with overfit, which trains {how}"}
                )
        out["rules"]["auto_weight_decay"] = False
        data["subset"] = out["overfit"]
        data["input_noise"] = 0.0
        model["dropout"] = 0.0
        solver["weight_decay"] = 0.0
        # The check over-fits on purpose: "add weight decay, dropout" beside its PASS would
        # contradict it. Silenced, not disabled: the Rules panel can switch it back on.
        silence = out["rules"]["silence"]
        if silence is None or isinstance(silence, str):  # else refused above
            silenced = experiment_rule_names(silence)
            if "Overfit" not in silenced:
                out["rules"]["silence"] = ",".join([*silenced, "Overfit"])
    if errors:
        raise ExperimentError(errors)
    if out["name"] is None:
        out["name"] = generated_name(out)
    return out


def _absolute(path: str) -> str:
    """``os.path.abspath(path)``, still a FileName if ``path`` is one."""
    import os.path

    out = os.path.abspath(path)
    return FileName(out) if isinstance(path, FileName) else out


# What overfit sets (validate_experiment), as the CLI's flags name them.
_OVERFIT_SETS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("data", "subset"), "on its own N examples"),
    (("data", "input_noise"), "with no input noise"),
    (("model", "dropout"), "with no dropout"),
    (("solver", "weight_decay"), "with no weight decay"),
    (("rules", "auto_weight_decay"), "with no weight decay"),
)


def generated_name(cfg: dict[str, Any], *, with_std: bool = True) -> str:
    """The name of a run given none, built from its settings: ``mlp-relu-he-digits``
    (arch, activation, init, dataset of a config whose model and data are filled in). A
    normal init carries its std (``mlp-tanh-normal0.01-digits``): runs that differ only by
    it were named alike. ``with_std=False``: the name as it was before that."""
    model, data = cfg["model"], cfg["data"]
    init = str(model["init"])
    std = model.get("init_std")
    if with_std and init == "normal" and isinstance(std, (int, float)):
        init += f"{std:g}"
    return f"{model['arch']}-{model['activation']}-{init}-{data['dataset']}"


# ---- resuming (``layerscope train --resume``) ----

# What a resumed run may set apart from the experiment its checkpoint holds: its name, its
# length (steps or epochs, counted from step 1 as ever, so the run trains on to there) and
# the device (a run goes on elsewhere; the same numbers only on the same device). Anything
# else would train another experiment from this one's state: --from does that.
RESUME_MAY_CHANGE: frozenset[tuple[str, ...]] = frozenset(
    {("name",), ("solver", "steps"), ("solver", "epochs"), ("solver", "device")}
)
Conflict = tuple[tuple[str, ...], Any, Any]  # (loc, the checkpoint's value, the given one)


def validate_resumed(cfg: Any, *, explicit: Iterable[Sequence[str]] = ()) -> dict[str, Any]:
    """``validate_experiment`` for the config a checkpoint holds: its
    ``finetune.from_checkpoint`` (the file the run was first fine-tuned from) is kept as it
    was and not looked for, since a resumed run does not read it again. Its paths are
    this machine's file names (local_paths): the run that wrote the checkpoint opened them."""
    if not isinstance(cfg, dict):
        return validate_experiment(cfg, explicit=explicit)
    base = local_paths(copy.deepcopy(cfg))
    if not isinstance(base.get("finetune"), dict):
        return validate_experiment(base, explicit=explicit)
    origin = base["finetune"].pop("from_checkpoint", None)
    out = validate_experiment(base, explicit=explicit)
    out["finetune"]["from_checkpoint"] = origin if isinstance(origin, str) else None
    return out


def resume_config(
    stored: Any, given: dict[str, Any], *, explicit: Iterable[Sequence[str]] = ()
) -> tuple[dict[str, Any], list[Conflict]]:
    """The config a resumed run trains with: ``stored`` (the checkpoint's experiment) with
    ``given`` (what the user gave: preset, config file, flags, merged) over it, validated;
    and every field ``given`` sets to another value than the checkpoint's, outside
    RESUME_MAY_CHANGE, for the caller to refuse. A field given the value it already has
    is no conflict. Raises ExperimentError for a config invalid either way."""
    before = validate_resumed(stored)
    merged = copy.deepcopy(before)
    solver = given.get("solver")
    if isinstance(solver, dict) and solver.get("epochs") is not None and "steps" not in solver:
        merged["solver"].pop("steps", None)  # given epochs decide, as over a config file
    _merge(merged, copy.deepcopy(given))
    after = validate_resumed(merged, explicit=explicit)
    conflicts = [
        (loc, _at(before, loc), _at(after, loc))
        for loc in _leaves(before)
        if loc not in RESUME_MAY_CHANGE and _at(before, loc) != _at(after, loc)
    ]
    return after, conflicts


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _leaves(cfg: dict[str, Any], loc: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in cfg.items():
        out.extend(_leaves(value, (*loc, key)) if isinstance(value, dict) else [(*loc, key)])
    return out


def _at(cfg: dict[str, Any], loc: tuple[str, ...]) -> Any:
    for key in loc:
        cfg = cfg[key]
    return cfg
