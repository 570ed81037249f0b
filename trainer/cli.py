"""cli — the trainer's command line: ``layerscope train``, ``sync`` and ``lab init``.

Owns: the ``train`` flags, generated from ``wire.EXPERIMENT_SCHEMA`` so they cannot
drift from what the server and the New-run form accept; merging preset < config
file < flags; printing every invalid field as ``solver.lr: must be >= 0`` (exit
2); ``train --resume`` (the checkpoint's experiment, refusing flags that contradict
it); ``sync``, which uploads a spool recorded while no server was reachable; and
``lab init``, which asks a running server (plain HTTP, stdlib) to launch the init lab.

Never: imports ``layerscope.server``, or torch before a command needs it (so
``--help`` is quick). ``main(argv)`` takes the sub-command name first; the
``layerscope`` console script hands ``train``/``sync`` here whole.

Exit codes: 0 done (or stopped from the dashboard), 1 an ``--overfit`` check failed,
2 bad input, 3 a rule stopped the run (NaN/Inf: ExplodingTensor, with no server to
resume its pause), 130 interrupted (Ctrl-C, SIGTERM). Under ``--nproc`` the same: torchrun
ends with 1 for any rank's non-zero exit, so each rank also writes its code to a file
the launcher reads (rank 0's, the rank that prints the summary, decides).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from layerscope.trainer import wire
from layerscope.trainer.experiment_config import (
    RESUME_MAY_CHANGE,
    generated_name,
    local_paths,
    resume_config,
)
from layerscope.trainer.link import dashboard_url, http_base

COMMANDS = {
    "train": "run a built-in experiment (MLP or small CNN on digits, spirals, blobs, npz, folder)",
    "sync": "upload a spool file recorded while no server was reachable",
    "lab": "launch a training lab on a running server (`layerscope lab init`)",
}
PRESETS: dict[str, dict[str, Any]] = {"demo": wire.DEMO_EXPERIMENT}
# Field names that would be ambiguous or unclear as bare flags.
FLAG_NAMES = {
    ("data", "path"): "data-path",
    ("rules", "enabled"): "rules",
    ("rules", "silence"): "silence",
    ("finetune", "from_checkpoint"): "from",
    ("finetune", "freeze"): "freeze",
}
_FLAG_METAVARS = {
    ("data", "path"): "PATH",
    ("rules", "enabled"): "NAMES",
    ("rules", "silence"): "NAMES",
    ("finetune", "from_checkpoint"): "CHECKPOINT",
    ("finetune", "freeze"): "LAYERS",
}
_METAVARS = {"int": "N", "float": "X", "str": "TEXT"}
_DEST_PREFIX = "cfg:"
RUN_DIR_SPOOL = "spool.bin"  # the file watch() writes inside a run directory
EXIT_OVERFIT_FAILED = 1
EXIT_RULE_STOPPED = 3  # a rule stopped the run: NaN/Inf (ExplodingTensor)
# Set by ``train --nproc``'s launcher for the ranks: a folder where each writes its exit
# code (``rank<N>``), since torchrun ends with 1 for any non-zero one.
RANK_EXITS_ENV = "LAYERSCOPE_RANK_EXITS"
# Outcomes every rank reaches together (the rule's stop is applied on every rank at the
# same step; the overfit verdict is the same model's on the same data): a rank reports
# them through the file and exits 0 to torchrun, which would otherwise print a failure
# report and SIGTERM the ranks still closing their run.
_SHARED_EXITS = frozenset({EXIT_OVERFIT_FAILED, EXIT_RULE_STOPPED})


def _version() -> str:
    try:
        return metadata.version("layerscope")
    except metadata.PackageNotFoundError:
        return "unknown"


def schema_fields() -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """(section or None for top level, field name, spec) for every field of the schema."""
    for key, spec in wire.EXPERIMENT_SCHEMA.items():
        if spec["type"] == "section":
            for sub_key, sub_spec in spec["fields"].items():
                yield key, sub_key, sub_spec
        else:
            yield None, key, spec


def flag_for(section: str | None, key: str) -> str:
    return "--" + FLAG_NAMES.get((section or "", key), key.replace("_", "-"))


def _value_parser(spec: dict[str, Any]) -> Any:
    """Parse a flag's text as the field's type; range checks are left to validate_experiment."""
    kind = spec["type"]
    aliases = spec.get("aliases", {})

    def parse(text: str) -> Any:
        if spec.get("nullable") and text.lower() in ("none", "null"):
            return None
        if text in aliases:
            return text
        try:
            return {"int": int, "float": float}.get(kind, str)(text)
        except ValueError:
            words = [*aliases, *(["none"] if spec.get("nullable") else [])]
            extra = f" or {' or '.join(words)}" if words else ""
            raise argparse.ArgumentTypeError(f"expected {kind}{extra}, got {text!r}") from None

    return parse


def _help_text(spec: dict[str, Any]) -> str:
    default = spec.get("default")
    shown = (
        "none" if default is None else str(default).lower() if spec["type"] == "bool" else default
    )
    # A help that names its default already (steps: "(default 1000)") is not told it twice.
    text = spec["help"] if "(default" in spec["help"] else f"{spec['help']} (default: {shown})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _add_schema_flags(parser: argparse.ArgumentParser) -> None:
    groups: dict[str | None, Any] = {None: parser.add_argument_group("experiment")}
    for section, key, spec in schema_fields():
        if section not in groups:
            label = wire.EXPERIMENT_SCHEMA[section]["label"].lower()
            groups[section] = parser.add_argument_group(label)
        dest = f"{_DEST_PREFIX}{section or ''}.{key}"
        common: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        flag = flag_for(section, key)
        if spec["type"] == "bool":
            groups[section].add_argument(
                flag, action=argparse.BooleanOptionalAction, help=_help_text(spec), **common
            )
        elif spec["type"] == "choice":
            groups[section].add_argument(
                flag, choices=spec["choices"], help=_help_text(spec), **common
            )
        else:
            metavar = _FLAG_METAVARS.get((section or "", key), _METAVARS[spec["type"]])
            groups[section].add_argument(
                flag, type=_value_parser(spec), metavar=metavar, help=_help_text(spec), **common
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerscope",
        description="layerscope trainer commands: built-in experiments and spool upload.",
    )
    parser.add_argument("--version", action="version", version=f"layerscope {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{train,sync,lab}")

    train = sub.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train a built-in experiment under watch(). Values come from --preset, "
        "then --config, then flags (later wins); the result is validated against the same "
        "schema the dashboard's New-run form uses. Without --server the run is recorded to "
        "the local spool only (upload it later with `layerscope sync`). The trainer token is "
        "read from LAYERSCOPE_TRAINER_TOKEN.",
    )
    train.add_argument("--version", action="version", version=f"layerscope {_version()}")
    train.add_argument("--config", metavar="FILE.json", help="experiment config (JSON object)")
    train.add_argument("--preset", choices=sorted(PRESETS), help="start from a named config")
    train.add_argument(
        "--server",
        metavar="URL",
        help="server to stream to: ws://HOST:PORT or the full .../ws/trainer URL "
        "(env LAYERSCOPE_SERVER; default: none, spool only)",
    )
    train.add_argument("--run-id", metavar="ID", help="run id (default: a new one)")
    train.add_argument(
        "--run-dir", metavar="DIR", help="where the spool goes (default ./layerscope-runs/<id>)"
    )
    train.add_argument(
        "--no-progress", action="store_true", help="no terminal progress line (for launchers)"
    )
    train.add_argument(
        "--nproc",
        type=_rank_count,
        metavar="N",
        help="train on N local processes (torch.distributed, gloo on CPU, nccl on CUDA) "
        "through torchrun; each takes its share of every batch, rank 0 streams the run. "
        "Ignored inside torchrun (for several machines, run torchrun yourself)",
    )
    train.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="go on with a stopped built-in run from its checkpoint (a checkpoint-N.pt the "
        "dashboard's Checkpoint wrote, or the run's folder: its newest): its experiment "
        "(config, model, optimizer, RNG, lr scale, weight decay switch, frozen layers), steps "
        "going on from N, the batches in the order the run would have had; a new run. "
        "Flags may change only --name, --steps and --epochs (the whole length, from step 1) "
        "and --device",
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the validated config as JSON and exit without training (name is null "
        "unless given by --name or the config file: a name built from the settings, or a "
        "preset's, is rebuilt when the file is run with other model or data settings)",
    )
    _add_schema_flags(train)
    train.add_argument(
        "--no-rules",
        dest=f"{_DEST_PREFIX}rules.enabled",
        action="store_const",
        const="none",
        default=argparse.SUPPRESS,
        help="evaluate no diagnostic rules (same as --rules none)",
    )

    sync = sub.add_parser(
        "sync",
        help=COMMANDS["sync"],
        description="Upload a spool (recorded with no server reachable) to a server. Frames the "
        "server already has are skipped. The trainer token is read from LAYERSCOPE_TRAINER_TOKEN.",
    )
    sync.add_argument("--version", action="version", version=f"layerscope {_version()}")
    sync.add_argument("spool", metavar="SPOOL", help="spool file (or the run's directory)")
    sync.add_argument(
        "--server",
        metavar="URL",
        help="ws://HOST:PORT or full .../ws/trainer URL (env LAYERSCOPE_SERVER)",
    )
    sync.add_argument(
        "--run-id",
        metavar="ID",
        help="upload as this run instead of the one the spool names (a spool set aside when "
        "its run id was used again: the newer run has that id)",
    )
    sync.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=60.0,
        help="give up when the server acknowledges nothing new for S seconds (default 60)",
    )
    _add_lab_parser(sub)
    return parser


def _add_lab_parser(sub: Any) -> None:
    lab = sub.add_parser("lab", help=COMMANDS["lab"], description=COMMANDS["lab"])
    lab.add_argument("--version", action="version", version=f"layerscope {_version()}")
    kinds = lab.add_subparsers(dest="lab_kind", metavar="{init}", required=True)
    init = kinds.add_parser(
        "init",
        help="the same network, data and seed under zero, normal 0.01, normal 1.0, Xavier and "
        "He init; prints the comparison view's URL",
    )
    init.add_argument("--version", action="version", version=f"layerscope {_version()}")
    init.add_argument(
        "--activation",
        choices=wire.ACTIVATIONS,
        default="tanh",
        help="every run's hidden activation (default: tanh)",
    )
    init.add_argument("--batch-norm", action="store_true", help="batch norm after each layer")
    for flag, what in (
        ("steps", "training steps of each run"),
        ("depth", "hidden layers"),
        ("width", "units per hidden layer"),
        ("seed", "the seed all five runs share"),
        ("every", "probe every N steps"),
    ):
        init.add_argument(
            f"--{flag}", type=int, metavar="N", help=f"{what} (default: the server's)"
        )
    init.add_argument(
        "--dataset",
        choices=wire.DATASETS[:3],
        help="the data every run trains on (default: digits)",
    )
    init.add_argument(
        "--server",
        metavar="URL",
        help="the server, as for train: http://, ws:// or host:port (env LAYERSCOPE_SERVER; "
        "default http://127.0.0.1:8765)",
    )
    init.add_argument("--token", metavar="T", help="viewer token (env LAYERSCOPE_TOKEN)")


def _lab(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    body = {"activation": args.activation, "batch_norm": args.batch_norm}
    for key in ("steps", "depth", "width", "seed", "every", "dataset"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    base = http_base(args.server or os.environ.get("LAYERSCOPE_SERVER") or DEFAULT_HTTP)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    token = args.token or os.environ.get("LAYERSCOPE_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"{base}/api/labs/init", json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("detail", exc.reason)
        if isinstance(detail, list):
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in detail)
        return _error("lab", f"the server refused ({exc.code}): {detail}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return _error(
            "lab",
            f"no layerscope server reachable at {base} ({reason}); "
            "start one with `layerscope serve` or pass --server URL",
        )
    for run in answer["runs"]:
        print(f"  {run['label']:<12} {base}/runs/{run['id']}")
    print(f"init lab {answer['lab_id']}: {base}{answer['url']}", flush=True)
    return 0


DEFAULT_HTTP = "http://127.0.0.1:8765"


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


_CONFIG_FILE_FIELDS = (("data", "path"), ("finetune", "from_checkpoint"))


def _load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"config {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must hold a JSON object, got {type(cfg).__name__}")
    for key, spec in wire.EXPERIMENT_SCHEMA.items():  # a flag would replace it silently
        if spec["type"] == "section" and key in cfg and not isinstance(cfg[key], dict):
            raise ValueError(
                f"config {path}: {key}: must be an object, got {type(cfg[key]).__name__}"
            )
    # A relative file named in the config is beside the config, wherever it is run from
    # (a config read from a pipe, `--config <(...)`, has no beside: the working directory).
    here = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.getcwd()
    for section, key in _CONFIG_FILE_FIELDS:
        part = cfg.get(section)
        if not isinstance(part, dict):
            continue
        value = part.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            part[key] = os.path.join(here, os.path.expanduser(value))
    return cfg


def merged_config(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """preset < config file < flags, before validation; and whether the name is the
    user's (``--name``, or a config file's own name) rather than a preset's or one built
    from the settings. Such a name describes the model and data of the layer that set it
    (``demo: digits mlp tanh xavier``, a printed ``mlp-relu-he-digits``): once a later
    layer changes them it is left out, and the run's name is built from the final ones.

    A file name that is not UTF-8 (``sys.argv`` and ``os.fsdecode`` carry its bytes as lone
    surrogates, ``caf\\udce9``) is this machine's: in ``data.path`` and
    ``finetune.from_checkpoint`` it is kept as it is, to open the file by (``local_paths``:
    accepted there, where a REST body's is refused); in the run's name it is written as a
    backslash escape (``caf\\xe9``), as watch() sends it. Anywhere else it is refused."""
    cfg: dict[str, Any] = copy.deepcopy(PRESETS[args.preset]) if args.preset else {}
    # The settings of the layer the name came from, for a name that is not the user's.
    named_by = copy.deepcopy(cfg) if cfg.get("name") is not None else None
    user_named = False
    if args.config:
        loaded = _load_config(args.config)
        if "name" in loaded and loaded["name"] is None:
            del loaded["name"]  # null (as --print-config writes it): no name of its own
        if loaded.get("name") is not None:
            user_named = not _derived_name(loaded)
            named_by = None if user_named else copy.deepcopy(loaded)
        _epochs_decide(cfg, loaded)
        _decay_decide(cfg, loaded)
        _deep_merge(cfg, loaded)
    flags: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(_DEST_PREFIX):
            continue
        section, key = dest[len(_DEST_PREFIX) :].split(".")
        (flags.setdefault(section, {}) if section else flags)[key] = value
    if "name" in flags:  # --name none: no name, one is built
        user_named, named_by = flags["name"] is not None, None
    _epochs_decide(cfg, flags)
    _decay_decide(cfg, flags)
    merged = _deep_merge(cfg, flags)
    _drop_stale(merged, flags)
    if named_by is not None and _model_and_data(merged) != _model_and_data(named_by):
        merged.pop("name", None)
    if isinstance(merged.get("name"), str):
        merged["name"] = wire.escape_surrogates(merged["name"])
    return local_paths(merged), user_named


def _flag_locs(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The config locs (``("model", "init_std")``, ``("name",)``) given as flags."""
    locs: list[tuple[str, ...]] = []
    for dest in vars(args):
        if dest.startswith(_DEST_PREFIX):
            section, key = dest[len(_DEST_PREFIX) :].split(".")
            locs.append((section, key) if section else (key,))
    return locs


def _epochs_decide(below: dict[str, Any], layer: dict[str, Any]) -> None:
    """A layer (config file, flags) that gives epochs without steps drops the steps of
    the layers below it (preset, file): it decides the length, as a later layer wins,
    where validation would let their steps win over its epochs (a preset's 20000 steps
    over a file's ``{"solver": {"epochs": 2}}``). Steps and epochs in one layer: steps."""
    solver, under = layer.get("solver"), below.get("solver")
    if not isinstance(solver, dict) or not isinstance(under, dict):
        return
    if solver.get("epochs") is not None and solver.get("steps") is None:
        under.pop("steps", None)


def _decay_decide(below: dict[str, Any], layer: dict[str, Any]) -> None:
    """A layer (config file, flags) that sets ``solver.weight_decay`` 0 without saying
    anything of auto weight decay drops the auto weight decay of the layers below it (the
    demo preset's): with no decay to switch on it has nothing to do, and validation would
    refuse ``--preset demo --weight-decay 0`` for it."""
    solver, rules = layer.get("solver"), layer.get("rules")
    if not isinstance(solver, dict) or solver.get("weight_decay") != 0:
        return
    if isinstance(rules, dict) and "auto_weight_decay" in rules:
        return
    under = below.get("rules")
    if isinstance(under, dict):
        under.pop("auto_weight_decay", None)


def _model_and_data(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A (partial, unvalidated) config's model and data sections, defaults filled in."""
    out: dict[str, dict[str, Any]] = {}
    for section in ("model", "data"):
        given = cfg.get(section)
        given = given if isinstance(given, dict) else {}
        fields = wire.EXPERIMENT_SCHEMA[section]["fields"]
        out[section] = {key: given.get(key, spec["default"]) for key, spec in fields.items()}
    return out


def _derived_name(cfg: dict[str, Any]) -> bool:
    """A config file's name that is not the user's own: the one built from the file's
    settings (a --print-config file of an unnamed run, before null was printed) or a
    preset's."""
    name = cfg.get("name")
    model_and_data = _model_and_data(cfg)
    # without the normal init's std: a file printed before names carried it
    return name in {
        generated_name(model_and_data),
        generated_name(model_and_data, with_std=False),
    } or any(name == preset.get("name") for preset in PRESETS.values())


def _drop_stale(cfg: dict[str, Any], flags: dict[str, Any]) -> None:
    """A preset's or config file's field that a flag made irrelevant goes (a full
    ``--print-config`` file's init_std, once ``--init xavier`` is given): validation
    refuses a field whose ``when`` does not hold, which is right for one the user set
    with a flag, not for one a flag overrode the reason for."""
    for section, spec in wire.EXPERIMENT_SCHEMA.items():
        part = cfg.get(section)
        if spec["type"] != "section" or not isinstance(part, dict):
            continue
        given = flags.get(section) or {}
        for key, field_spec in spec["fields"].items():
            when = field_spec.get("when")
            if not when or key not in part or key in given:  # a flag's own: checked
                continue
            if any(
                given.get(sibling) is not None and given[sibling] not in values
                for sibling, values in when.items()
            ):
                del part[key]


def _error(command: str, message: str) -> int:
    # A file name that is not UTF-8 in it (a data file's, --run-dir's): \xNN, as the run shows it
    print(f"layerscope {command}: {wire.escape_surrogates(message)}", file=sys.stderr)
    return 2


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_stops_run() -> Iterator[None]:
    """SIGTERM (a launcher stopping its child, ``docker stop``) ends the run like Ctrl-C, so
    watch() closes it as "stopped" with its spool flushed instead of leaving it "lost"."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resumed(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """``train --resume``: the checkpoint's experiment with the flags over it (refusing
    any that contradict it, in one line), and the ``experiment.Resume`` to train from."""
    if ("finetune", "from_checkpoint") in _flag_locs(args):
        raise ValueError(
            "--resume and --from do not go together: --resume goes on with a run (its "
            "weights, optimizer, steps), --from starts a new one from a checkpoint's weights"
        )
    from layerscope.trainer.experiment import ExperimentSetupError, read_resume

    try:
        resume = read_resume(args.resume)
    except ExperimentSetupError as exc:
        raise ValueError(str(exc)) from None
    given, _ = merged_config(args)
    cfg, conflicts = resume_config(resume.config, given, explicit=_flag_locs(args))
    if conflicts:
        flags = set(_flag_locs(args))
        said = ", ".join(
            f"{_given_as(loc, flags)} {_shown(new)} (it holds {_shown(old)})"
            for loc, old, new in conflicts
        )
        may = ", ".join(
            flag_for(*(loc if len(loc) == 2 else (None, *loc))) for loc in sorted(RESUME_MAY_CHANGE)
        )
        raise ValueError(
            f"--resume {resume.path}: a resumed run keeps the experiment the checkpoint holds, "
            f"not {said}; only {may} may change (steer the lr live, or start a new run from "
            "its weights with --from)"
        )
    return cfg, resume


def _given_as(loc: tuple[str, ...], flags: set[tuple[str, ...]]) -> str:
    """A config field as the user gave it: its flag, or its loc (from --config/--preset)."""
    section, key = loc if len(loc) == 2 else (None, loc[0])
    return flag_for(section, key) if loc in flags else ".".join(loc)


def _shown(value: Any) -> str:
    return (
        "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _train(args: argparse.Namespace) -> int:
    resume = None
    try:
        if args.resume is not None:
            cfg, resume = _resumed(args)
            user_named = True  # the name the run had (or --name): printed as it is
        else:
            merged, user_named = merged_config(args)
            # A flag names its field: one that would be ignored is refused, default or not.
            cfg = wire.validate_experiment(merged, explicit=_flag_locs(args))
    except wire.ExperimentError as exc:
        for err in exc.errors:
            print(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}", file=sys.stderr
            )
        return 2
    except ValueError as exc:
        return _error("train", str(exc))
    if args.print_config:
        # Only a name of the user's own: one built from these settings or a preset's would
        # outlive them in a file reused with other flags.
        text = json.dumps({**cfg, "name": cfg["name"] if user_named else None}, indent=2)
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `--print-config | head`: the reader had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        return _launch_ranks(args.nproc, args.argv)

    from layerscope.trainer.data import DataError
    from layerscope.trainer.experiment import (
        ExperimentSetupError,
        describe,
        run_experiment,
        trainer_socket_url,
    )

    server = args.server or os.environ.get("LAYERSCOPE_SERVER") or None
    try:
        url = trainer_socket_url(server) if server else None
        # Which run this is, where to watch it: once, before the progress line (not under
        # --no-progress, the launchers' quiet mode: the server that launched it knows).
        announce = None
        if url is not None and not args.no_progress:

            def announce(run_id: str) -> None:
                page = dashboard_url(url, run_id)
                if page is not None:
                    print(
                        f"layerscope train: run {run_id}: dashboard at {page}",
                        file=sys.stderr,
                        flush=True,
                    )

        with _sigterm_stops_run():
            summary = run_experiment(
                cfg,
                server=url,
                run_id=args.run_id,
                token=os.environ.get("LAYERSCOPE_TRAINER_TOKEN") or None,
                run_dir=args.run_dir,
                progress=not args.no_progress,
                resume=resume,
                announce=announce,
            )
    except (DataError, ExperimentSetupError, ValueError) as exc:
        return _error("train", str(exc))
    except OSError as exc:  # an unwritable --run-dir (a file, no permission), a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        return _error("train", f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        # watch() has already closed the run as "stopped" and flushed its spool. Said once
        # under --nproc: by rank 0, the rank that records the run.
        if os.environ.get("RANK", "0") == "0":
            print("layerscope train: interrupted; the run was recorded as stopped", file=sys.stderr)
        return 130
    if summary.get("rank", 0) == 0:
        print(describe(summary), flush=True)
    if summary.get("stopped_by") == "rule":  # before the overfit verdict: it explains it
        return EXIT_RULE_STOPPED
    check = summary.get("overfit")
    return EXIT_OVERFIT_FAILED if check is not None and not check["passed"] else 0


def _rank_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a process count >= 1, got {text!r}")
    return value


def _without_nproc(argv: list[str]) -> list[str]:
    """argv less ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse accepted):
    torchrun would read it as its own ambiguous option."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if len(flag) > 3 and "--nproc".startswith(flag):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def _launch_ranks(nproc: int, argv: list[str]) -> int:
    """``train --nproc N``: the same command line on N local ranks via torchrun
    (``torch.distributed.run --standalone``, in ``_torchrun``; the ranks see LOCAL_RANK and
    train). SIGINT and SIGTERM sent to this process alone (a process manager's or an IDE's
    stop, ``kill -INT PID``) are passed on to torchrun, which stops every rank; a terminal's
    Ctrl-C reaches torchrun and the ranks as well, and the repeat is ignored there. The
    exit code is the ranks' (``_launch_exit``), not torchrun's 1 for any failure."""
    command = [
        sys.executable, "-c", _TORCHRUN_MAIN, "--standalone",
        f"--nproc-per-node={nproc}", "-m", "layerscope.trainer", *_without_nproc(argv),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="layerscope-ranks-") as exits:
        proc = subprocess.Popen(command, env={**os.environ, RANK_EXITS_ENV: exits})
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate()) if in_main else None
        try:
            while True:
                try:
                    code = proc.wait()
                    break
                except KeyboardInterrupt:
                    # torchrun has not seen one sent to this pid alone; a repeat is
                    # ignored there (_torchrun)
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
                    continue
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        return _launch_exit(code if code >= 0 else 128 - code, Path(exits))  # signal: 128 + N


# ``python -c`` program of ``train --nproc``'s torchrun (argv: torchrun's own).
_TORCHRUN_MAIN = "import sys; from layerscope.trainer.cli import _torchrun; sys.exit(_torchrun())"
# torchrun's warnings while it stops its ranks on SIGINT/SIGTERM (the ranks say it once)
_TORCHRUN_STOP_LOGS = (
    "Received %s death signal, shutting down workers",
    "Sending process %s closing signal %s",
    "Got termination signal: %s",
)


def _torchrun(argv: list[str] | None = None) -> int:
    """torchrun (``torch.distributed.run.main``) for ``_launch_ranks``. Stopped by SIGINT
    or SIGTERM it exits 128 + N quietly: the ranks it stops report the interruption (rank
    0, once), where torchrun itself printed three warnings and a 25-line SignalException
    traceback. A second signal while it stops the ranks (a terminal's Ctrl-C reaches it
    and the launcher, which passes it on) is ignored instead of cutting that short.
    Anything else, a rank's failure included, is reported as torchrun reports it."""
    import logging
    import runpy

    import torch.distributed.elastic.multiprocessing.api as mp_api

    received: list[int] = []

    def first_only(signum: int, frame: object) -> None:
        if received:
            return
        received.append(signum)
        raise mp_api.SignalException(
            f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum)
        )

    def quiet_stop(record: logging.LogRecord) -> bool:
        return not (received and record.msg in _TORCHRUN_STOP_LOGS)

    if hasattr(mp_api, "_terminate_process_handler"):
        mp_api._terminate_process_handler = first_only
    for name in ("agent.server.api", "multiprocessing.api"):  # the loggers that say them
        logging.getLogger(f"torch.distributed.elastic.{name}").addFilter(quiet_stop)
    if argv is not None:
        sys.argv[1:] = argv
    try:
        # as ``python -m torch.distributed.run`` would: its messages read the same
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    except mp_api.SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def _launch_exit(torchrun: int, exits: Path) -> int:
    """The launcher's exit code: rank 0's own when it reported a non-zero one (it printed
    the summary: 3 stopped by the NaN rule, 1 a failed overfit check, 2 bad input, 130
    interrupted), else torchrun's (a rank that crashed or was killed reports nothing), else
    any rank's shared outcome."""
    reported: dict[int, int] = {}
    for path in exits.glob("rank*"):
        try:
            reported[int(path.name[4:])] = int(path.read_text())
        except (OSError, ValueError):
            continue
    if reported.get(0, 0) != 0:
        return reported[0]
    if torchrun != 0:
        return torchrun
    return next((reported[r] for r in sorted(reported) if reported[r] != 0), 0)


def _rank_exit(code: int) -> int:
    """A rank launched by ``train --nproc``: its code written for the launcher (see
    ``_launch_exit``), and the code for torchrun (0 for an outcome every rank shares).
    Elsewhere (one process, or a torchrun the user started): ``code`` as it is."""
    exits, rank = os.environ.get(RANK_EXITS_ENV), os.environ.get("RANK")
    if not exits or rank is None or "LOCAL_RANK" not in os.environ:
        return code
    path = Path(exits) / f"rank{rank}"
    try:
        path.with_suffix(".tmp").write_text(str(code))
        path.with_suffix(".tmp").replace(path)
    except OSError:
        return code  # the launcher then goes by torchrun's code
    return 0 if code in _SHARED_EXITS else code


def _sync(args: argparse.Namespace) -> int:
    # link and sync are torch-free: importing experiment for its URL helper cost ~11 s of a
    # 12 s sync on a cold cache (torch).
    from layerscope.trainer.link import trainer_url
    from layerscope.trainer.sync import upload_spool

    server = args.server or os.environ.get("LAYERSCOPE_SERVER")
    if not server:
        return _error("sync", "--server URL is required (or set LAYERSCOPE_SERVER)")
    spool = args.spool
    if os.path.isdir(spool):
        spool = os.path.join(spool, RUN_DIR_SPOOL)
    if not os.path.isfile(spool):
        return _error("sync", f"{spool}: no such spool file")
    try:
        url = trainer_url(server)
        synced = upload_spool(
            spool,
            url,
            os.environ.get("LAYERSCOPE_TRAINER_TOKEN") or None,
            timeout_s=args.timeout,
            run_id=args.run_id,
        )
    except (OSError, ValueError) as exc:
        return _error("sync", str(exc))
    if synced.sent == 0 and synced.acked:  # a re-sync: nothing was new to the server
        said = f"the server already had all {synced.acked} frames; nothing sent"
    else:
        # acked counts the whole run (a re-sync sends only what the server lacked)
        said = f"sent {synced.sent} frames; the server now holds all {synced.acked}"
    if synced.refused:  # acked past, but each is only a record of its refusal there
        said += (
            f", {len(synced.refused)} of them as a record of its refusal"
            f" (seq {', '.join(map(str, synced.refused[:10]))}"
            + (f" and {len(synced.refused) - 10} more" if len(synced.refused) > 10 else "")
            + "; the spool keeps the frames)"
        )
    if synced.missing:  # damaged records: the run lacks them, and acks stop before them
        count = len(synced.missing)
        seqs = ", ".join(map(str, synced.missing[:10])) + (
            f" and {count - 10} more" if count > 10 else ""
        )
        said = (
            f"sent {synced.sent} frames; the server confirmed {synced.acked}, up to the"
            f" spool's first damaged record: {count} frame{'s' * (count > 1)} (seq {seqs})"
            f" could not be read from the spool and {'are' if count > 1 else 'is'} missing"
            " from the run; the frames after it were sent, unconfirmed"
        )
        print(f"synced {spool} in part: {said}", flush=True)
        return 1
    print(f"synced {spool}: {said}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.print_usage(sys.stderr)
        return _error(argv[0], f"unknown command; the trainer commands are: {', '.join(COMMANDS)}")
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "lab":
        return _lab(args)
    return _rank_exit(_train(args)) if args.command == "train" else _sync(args)
