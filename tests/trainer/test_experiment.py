"""Experiment configs (wire.EXPERIMENT_SCHEMA / validate_experiment, which the server uses
for POST /api/runs) and real built-in runs with server=None (spool only)."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from layerscope.trainer import wire
from layerscope.trainer.control import Control
from layerscope.trainer.experiment import (
    MAX_LABELS_CONFIG_CHARS,
    ExperimentSetupError,
    _run_config,
    build,
    run_experiment,
    trainer_socket_url,
)
from layerscope.trainer.experiment_config import (
    FileName,
    local_paths,
    resume_config,
    validate_resumed,
)
from layerscope.trainer.spool import read_spool


def _errors(cfg: Any) -> dict[str, str]:
    with pytest.raises(wire.ExperimentError) as info:
        wire.validate_experiment(cfg)
    assert isinstance(info.value, wire.WireError)
    return {".".join(e["loc"]): e["msg"] for e in info.value.errors}


def _fields() -> list[tuple[list[str], dict[str, Any]]]:
    out = []
    for key, spec in wire.EXPERIMENT_SCHEMA.items():
        if spec["type"] == "section":
            out += [([key, k], s) for k, s in spec["fields"].items()]
        else:
            out.append(([key], spec))
    return out


def _nest(loc: list[str], value: Any) -> dict[str, Any]:
    return {loc[0]: value} if len(loc) == 1 else {loc[0]: {loc[1]: value}}


# ---- schema ----


def test_schema_is_json_and_every_field_has_type_default_and_help() -> None:
    json.dumps(wire.EXPERIMENT_SCHEMA)
    assert {"model", "data", "solver", "name", "every"} <= set(wire.EXPERIMENT_SCHEMA)
    for loc, spec in _fields():
        assert spec["type"] in ("int", "float", "bool", "str", "choice"), loc
        assert "default" in spec and spec["help"], loc
        if spec["type"] == "choice":
            assert spec["default"] in spec["choices"], loc
    init_help = wire.EXPERIMENT_SCHEMA["model"]["fields"]["init"]["help"]
    assert "for tanh-like layers, He (2/fan-in, √2 larger) for ReLU" in init_help


def test_every_float_field_refuses_an_integer_past_a_double() -> None:
    """float(10**400) raised OverflowError (a 500 from POST /api/runs and the init lab)."""
    floats = [loc for loc, spec in _fields() if spec["type"] == "float"]
    assert ["solver", "lr"] in floats and ["model", "init_std"] in floats
    for loc in floats:
        with pytest.raises(wire.ExperimentError) as info:
            wire.validate_experiment(_nest(loc, 10**400))
        assert {"loc": loc, "msg": "must be a finite number"} in info.value.errors, loc


def test_text_that_is_no_text_and_paths_no_file_can_have_are_named() -> None:
    """A lone surrogate (a name that is not UTF-8) anywhere, keys too, is refused alone,
    naming where; a NUL in a path names the NUL; an empty data.path is the schema's "must
    be a non-empty string" and nothing else."""
    holds = "holds U+DCE9, which is not valid UTF-8 text"
    assert _errors({"name": "caf\udce9"}) == {"name": holds + _TAIL}
    assert _errors({"data": {"dataset": "npz", "path": "caf\udce9"}, "every": 0}) == {
        "data.path": holds + _TAIL  # only it: the other checks would quote it
    }
    assert list(_errors({"solver": {"caf\udce9": 1}})) == ["solver.caf\\xe9"]
    nul = "holds a NUL character (U+0000), which no file name can"
    assert _errors({"data": {"dataset": "npz", "path": "a\0b"}}) == {"data.path": nul}
    assert _errors({"finetune": {"from_checkpoint": "a\0b"}}) == {"finetune.from_checkpoint": nul}
    empty = {"data": {"dataset": "npz", "path": ""}}
    assert _errors(empty) == {"data.path": "must be a non-empty string"}


_TAIL = " (a lone surrogate, as Python decodes a file name that is not UTF-8)"


def test_a_file_name_from_this_machines_os_may_be_not_utf8_a_rest_bodys_may_not(
    tmp_path: Path,
) -> None:
    """``layerscope train --data-path`` of a file whose name is not UTF-8 (sys.argv carries
    b"caf\\xe9" as "caf\\udce9") was refused since lone surrogates were (8043dbe), though
    the file opens by it. The CLI marks its paths (local_paths: FileName) and they are
    kept as they are, to open the file by, through validate_experiment and run_experiment's
    second one; a plain str, as JSON gives a REST body, is still refused, as is a
    FileName anywhere but a path field. A copy (a checkpoint's config) is a plain str:
    validate_resumed marks it again."""
    base = os.fsdecode(tmp_path)
    path = os.path.join(base, os.fsdecode(b"caf\xe9.npz"))
    np.savez(path, x=np.zeros((20, 2), np.float32), y=np.arange(20) % 2)
    given = {"data": {"dataset": "npz", "path": path}, "solver": {"steps": 2}}
    assert _errors(given) == {"data.path": "holds U+DCE9, which is not valid UTF-8 text" + _TAIL}
    cfg = wire.validate_experiment(local_paths(given))
    assert cfg["data"]["path"] == path and type(cfg["data"]["path"]) is FileName
    assert wire.validate_experiment(cfg)["data"]["path"] == path  # run_experiment's check
    assert _errors({"name": FileName(path)}) == {
        "name": "holds U+DCE9, which is not valid UTF-8 text" + _TAIL
    }
    missing = FileName(os.path.join(base, os.fsdecode(b"nope\xe9.npz")))
    assert _errors({"data": {"dataset": "npz", "path": missing}}) == {
        "data.path": f"no such file: {os.fsencode(missing).decode('utf-8', 'backslashreplace')}"
    }
    stored = json.loads(json.dumps(cfg))  # as a checkpoint holds it: a plain str
    assert type(stored["data"]["path"]) is str and type(copy.deepcopy(cfg)["data"]["path"]) is str
    assert type(pickle.loads(pickle.dumps(cfg))["data"]["path"]) is str
    assert validate_resumed(stored)["data"]["path"] == path
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 2


def test_empty_config_gets_every_default() -> None:
    cfg = wire.validate_experiment({})
    for loc, spec in _fields():
        value = cfg[loc[0]] if len(loc) == 1 else cfg[loc[0]][loc[1]]
        if loc != ["name"]:
            assert value == spec["default"], loc
    assert cfg["name"] == "mlp-relu-he-digits"
    assert wire.validate_experiment(cfg) == cfg  # a filled config validates to itself


def test_runs_differing_only_by_normal_init_std_get_different_names() -> None:
    """Both were mlp-tanh-normal-digits (std 0.01 and 1.0): a normal init now names its std;
    the other inits, which ignore it, do not."""

    def named(**model: Any) -> str:
        return str(wire.validate_experiment({"model": {"activation": "tanh", **model}})["name"])

    assert named(init="normal", init_std=0.01) == "mlp-tanh-normal0.01-digits"
    assert named(init="normal", init_std=1.0) == "mlp-tanh-normal1-digits"
    assert named(init="normal") == "mlp-tanh-normal0.01-digits"  # the default std
    assert named(init="xavier") == "mlp-tanh-xavier-digits"


def test_every_field_reports_a_wrong_type_with_its_loc() -> None:
    bad = {"int": "3", "float": "x", "bool": "yes", "str": 5, "choice": "nope"}
    for loc, spec in _fields():
        errors = _errors(_nest(loc, bad[spec["type"]]))
        assert ".".join(loc) in errors, loc


def test_ranges_and_choices_are_enforced_with_messages() -> None:
    errors = _errors(
        {
            "every": 0,
            "model": {"depth": 65, "width": 0, "dropout": 0.96, "activation": "swish"},
            "data": {"val_fraction": 0.95, "input_noise": -1.0, "subset": 0},
            "solver": {"lr": -0.1, "batch_size": -1, "steps": 0, "device": "tpu"},
        }
    )
    assert errors["model.depth"] == "must be <= 64, got 65"
    assert errors["model.width"] == "must be >= 1, got 0"
    assert errors["solver.lr"] == "must be >= 0.0, got -0.1"
    assert "relu" in errors["model.activation"] and "swish" in errors["model.activation"]
    assert {"every", "model.dropout", "data.val_fraction", "data.input_noise", "data.subset",
            "solver.batch_size", "solver.steps", "solver.device"} <= set(errors)  # fmt: skip


def test_unknown_keys_and_non_objects_are_rejected() -> None:
    errors = _errors({"modle": {}, "model": {"layers": 3}, "solver": 5})
    assert "modle" in errors and "unknown field" in errors["modle"]
    assert "model.layers" in errors and "depth" in errors["model.layers"]
    assert errors["solver"].startswith("must be an object")
    assert _errors([1, 2]) == {"": "config must be an object, got list"}


def test_data_path_must_exist_and_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d.npz").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = wire.validate_experiment({"data": {"dataset": "npz", "path": "d.npz"}})
    assert cfg["data"]["path"] == str(tmp_path / "d.npz")
    assert (
        "no such directory"
        in _errors({"data": {"dataset": "folder", "path": "d.npz"}})["data.path"]
    )
    assert "no such file" in _errors({"data": {"dataset": "npz", "path": "imgs"}})["data.path"]


def test_cross_field_rules() -> None:
    assert "data.path" in _errors({"data": {"dataset": "npz"}})
    assert "no such file" in _errors({"data": {"dataset": "npz", "path": "/nope.npz"}})["data.path"]
    assert "model.arch" in _errors({"model": {"arch": "cnn"}, "data": {"dataset": "spirals"}})
    assert "solver.batch_size" in _errors(
        {"model": {"batch_norm": True}, "solver": {"batch_size": 1}}
    )
    assert "solver.steps" in _errors({"solver": {"steps": None}})


def test_a_field_whose_when_does_not_hold_is_refused_off_its_default_or_when_named() -> None:
    """The New-run form sends changed fields only: a hidden field at its default passes.
    The CLI names its flags as explicit: one that would be ignored is refused at any value."""
    xavier = {"model": {"init": "xavier", "init_std": 0.01}, "data": {"path": None}}
    assert wire.validate_experiment(xavier)["model"]["init_std"] == 0.01
    assert "model.init_std" in _errors({"model": {"init": "xavier", "init_std": 0.5}})
    with pytest.raises(wire.ExperimentError) as info:
        wire.validate_experiment(xavier, explicit=[("model", "init_std"), ("data", "path")])
    assert [e["loc"] for e in info.value.errors] == [["model", "init_std"], ["data", "path"]]
    normal = {"model": {"init": "normal", "init_std": 0.01}}
    assert (
        wire.validate_experiment(normal, explicit=[("model", "init_std")])["model"]["init"]
        == "normal"
    )


def test_batch_size_full_steps_vs_epochs_and_overfit_switches_regularisation_off() -> None:
    cfg = wire.validate_experiment({"solver": {"batch_size": "full", "epochs": 3}})
    assert cfg["solver"]["batch_size"] == 0
    assert cfg["solver"]["steps"] is None and cfg["solver"]["epochs"] == 3
    both = wire.validate_experiment({"solver": {"steps": 7, "epochs": 3}})
    assert both["solver"]["steps"] == 7  # steps wins; run_experiment uses it
    fit = wire.validate_experiment(
        {
            "overfit": 50,
            "model": {"dropout": 0.5},
            "solver": {"weight_decay": 0.1},
            "data": {"input_noise": 0.3},
        }  # fmt: skip
    )
    assert fit["data"]["subset"] == 50 and fit["model"]["dropout"] == 0.0
    assert fit["solver"]["weight_decay"] == 0.0 and fit["data"]["input_noise"] == 0.0
    # it over-fits on purpose: no "add weight decay, dropout" alert beside its PASS
    assert fit["rules"]["silence"] == "Overfit"
    quiet = {"overfit": 50, "rules": {"silence": "DeadUnits, Overfit"}}
    assert wire.validate_experiment(quiet)["rules"]["silence"] == "DeadUnits,Overfit"
    quiet["rules"]["silence"] = "AllZero"
    assert wire.validate_experiment(quiet)["rules"]["silence"] == "AllZero,Overfit"
    assert wire.validate_experiment({})["rules"]["silence"] is None  # only for the check


def test_demo_experiment_is_valid_and_long() -> None:
    demo = wire.validate_experiment(wire.DEMO_EXPERIMENT)
    assert demo["model"]["activation"] == "tanh" and demo["model"]["init"] == "xavier"
    assert demo["model"]["depth"] == 4 and demo["solver"]["steps"] >= 10_000


def test_the_demo_starts_without_weight_decay_and_can_switch_it_on(tmp_path: Path) -> None:
    # PRACTICES: start without decay, add it once the model over-fits. With decay 0 the run
    # page's switch, auto weight decay and the Overfit alert's button had nothing to switch.
    demo = wire.validate_experiment(wire.DEMO_EXPERIMENT)
    assert demo["solver"]["weight_decay"] > 0 and demo["rules"]["auto_weight_decay"] is True
    cfg = {**wire.DEMO_EXPERIMENT, "solver": {**wire.DEMO_EXPERIMENT["solver"], "steps": 2}}
    run_experiment({**cfg, "every": 50}, server=None, run_dir=str(tmp_path), progress=False)
    (result,) = _events(tmp_path, "command_result")
    assert result["data"]["name"] == "set_weight_decay" and result["data"]["ok"] is True
    assert result["data"]["args"] == {"enabled": False}  # off before the first step
    assert result["data"]["state"]["rules"]["auto_weight_decay"] is True


def test_server_urls_normalise_to_the_trainer_socket() -> None:
    assert trainer_socket_url("ws://127.0.0.1:8765") == "ws://127.0.0.1:8765/ws/trainer"
    assert trainer_socket_url("ws://h:1/ws/trainer") == "ws://h:1/ws/trainer"
    assert trainer_socket_url("http://h:1/") == "ws://h:1/ws/trainer"
    assert trainer_socket_url("https://h/proxy") == "wss://h/proxy/ws/trainer"
    assert trainer_socket_url("127.0.0.1:8765") == "ws://127.0.0.1:8765/ws/trainer"
    with pytest.raises(ValueError, match="must look like"):
        trainer_socket_url("ftp://h:1")


# ---- real runs (spool only) ----


def _spool_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]


def test_short_run_without_server_finishes_with_finite_loss_and_a_spool(
    tmp_path: Path, device: str
) -> None:
    cfg = {"name": "short", "every": 5, "model": {"depth": 2, "width": 16, "batch_norm": True,
           "dropout": 0.1}, "data": {"input_noise": 0.05, "preprocess": "per_pixel"},
           "solver": {"steps": 30, "eval_every": 10, "batch_size": 32, "device": device}}  # fmt: skip
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path), progress=False)
    assert summary["steps"] == 30 and not summary["stopped"] and summary["device"] == device
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert summary[key] is not None and math.isfinite(summary[key]), key
    assert summary["val_loss"] < math.log(10) + 0.5  # learning, not diverging
    assert summary["overfit"] is None
    assert _spool_files(tmp_path), "the spool must hold the run"


def test_epochs_decide_length_when_steps_are_left_out(tmp_path: Path) -> None:
    cfg = {"data": {"dataset": "blobs", "val_fraction": 0.0},
           "solver": {"epochs": 2, "batch_size": 200, "device": "cpu"}}  # fmt: skip
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path), progress=False)
    assert summary["steps"] == 2 * 5  # 1000 training points / 200
    assert summary["val_loss"] is None


def test_runs_are_deterministic_by_seed(tmp_path: Path) -> None:
    cfg = {"model": {"width": 8}, "data": {"dataset": "spirals"},
           "solver": {"steps": 15, "device": "cpu", "seed": 3}}  # fmt: skip
    a = run_experiment(cfg, server=None, run_dir=str(tmp_path / "a"), progress=False)
    b = run_experiment(cfg, server=None, run_dir=str(tmp_path / "b"), progress=False)
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


def test_build_holds_cudnn_to_deterministic_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same seed, the same CNN run on CUDA too: cuDNN's default may pick
    nondeterministic algorithms and benchmark them per shape. (A CPU machine can only see
    the switches; monkeypatch puts the process's own values back.)"""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    build(wire.validate_experiment({"model": {"arch": "cnn", "depth": 1, "width": 2},
                                    "solver": {"device": "cpu"}}))  # fmt: skip
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False


def test_cnn_on_digits_runs(tmp_path: Path, device: str) -> None:
    cfg = {"model": {"arch": "cnn", "depth": 2, "width": 4}, "every": 2,
           "solver": {"steps": 4, "device": device}}  # fmt: skip
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path), progress=False)
    assert summary["steps"] == 4 and math.isfinite(summary["train_loss"])


def test_overfit_100_passes_for_the_default_mlp_and_fails_with_lr_0(tmp_path: Path) -> None:
    base: dict[str, Any] = {"overfit": 100, "every": 100, "solver": {"steps": 300, "device": "cpu"}}
    passed = run_experiment(base, server=None, run_dir=str(tmp_path / "ok"), progress=False)
    assert passed["overfit"] == {"n": 100, "train_acc": 1.0, "passed": True}
    frozen = {**base, "solver": {"steps": 20, "device": "cpu", "lr": 0.0}}
    failed = run_experiment(frozen, server=None, run_dir=str(tmp_path / "lr0"), progress=False)
    assert failed["overfit"]["passed"] is False and failed["overfit"]["train_acc"] < 0.5
    # The verdict is an event too: the dashboard's pass/fail badge and the event log.
    ok = _events(tmp_path / "ok", "sanity")
    assert [(e["step"], e["data"]["passed"], e["data"]["examples"]) for e in ok] == [
        (300, True, 100)
    ]
    assert ok[0]["data"]["train_acc"] == 1.0 and ok[0]["data"]["message"].startswith("PASS")
    bad = _events(tmp_path / "lr0", "sanity")
    assert len(bad) == 1 and bad[0]["data"]["passed"] is False
    assert bad[0]["data"]["steps"] == 20 and bad[0]["data"]["message"].startswith("FAIL")


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    frames = [wire.parse_trainer_frame(t) for t in list(read_spool(run_dir / "spool.bin"))[1:]]
    return [f for f in frames if f["type"] == "event" and f["kind"] == kind]


def _probes(run_dir: Path, layer: str) -> list[dict[str, Any]]:
    frames = [wire.parse_trainer_frame(t) for t in list(read_spool(run_dir / "spool.bin"))[1:]]
    return [e for f in frames if f["type"] == "probe" for e in f["layers"] if e["name"] == layer]


# ---- rules and fine-tuning ----


def test_rule_and_finetune_fields_are_checked_and_normalised(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    cfg = wire.validate_experiment(
        {"rules": {"silence": " AllZero, DeadUnits ", "enabled": "none"},
         "finetune": {"from_checkpoint": str(ckpt), "freeze": "net.0, net.1,"}}
    )  # fmt: skip
    assert cfg["rules"]["silence"] == "AllZero,DeadUnits" and cfg["rules"]["enabled"] == "none"
    assert cfg["finetune"] == {"from_checkpoint": str(ckpt.resolve()), "freeze": "net.0,net.1"}
    assert wire.validate_experiment(cfg) == cfg  # a stored config re-validates unchanged
    errors = _errors(
        {"rules": {"enabled": "DeadRelu", "auto_weight_decay": True, "patience": 0},
         "finetune": {"from_checkpoint": str(tmp_path / "missing.pt")}}
    )  # fmt: skip
    assert "DeadRelu" in errors["rules.enabled"]
    assert "weight_decay > 0" in errors["rules.auto_weight_decay"]
    assert errors["rules.patience"] == "must be >= 1, got 0"
    assert errors["finetune.from_checkpoint"].startswith("no such file")


def _checkpoint(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    """Train a few steps and write a checkpoint the way the Checkpoint command does."""
    _, model, optimizer, _ = build(wire.validate_experiment(cfg))
    control = Control(model, optimizer, checkpoint_dir=tmp_path / "source")
    return control.checkpoint(7)


def test_finetune_loads_the_checkpoint_and_keeps_frozen_layers_bit_identical(
    tmp_path: Path,
) -> None:
    base: dict[str, Any] = {"every": 5, "solver": {"steps": 20, "device": "cpu", "lr": 0.01}}
    ckpt = _checkpoint(tmp_path, base)
    saved = torch.load(ckpt, weights_only=True)["model"]
    cfg = {**base, "finetune": {"from_checkpoint": str(ckpt), "freeze": "net.0"}}
    run_experiment(cfg, server=None, run_dir=str(tmp_path / "ft"), progress=False)
    (log,) = _events(tmp_path / "ft", "log")
    assert log["step"] == 0 and log["data"]["frozen"] == ["net.0"]
    assert str(ckpt) in log["data"]["message"] and "step 7" in log["data"]["message"]
    (frozen,) = [
        e for e in _events(tmp_path / "ft", "command_result") if e["data"]["name"] == "set_frozen"
    ]
    assert frozen["data"]["applied_at_step"] == 0 and frozen["data"]["state"]["frozen"] == ["net.0"]
    # Loaded: the first probe (step 1, after one update) starts from the checkpoint's weights.
    first = _probes(tmp_path / "ft", "net.0")
    expected = float(
        torch.sqrt(sum((t.double() ** 2).sum() for k, t in saved.items() if k.startswith("net.0.")))
    )
    assert all(abs(p["weight_norm"] - expected) < 1e-4 * expected for p in first)
    assert {p["update_ratio"] for p in first} == {0.0}
    later = [p["update_ratio"] for p in _probes(tmp_path / "ft", "net.2")]
    assert all(r > 0 for r in later)


def test_finetune_refuses_foreign_files_and_other_shapes(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, {"model": {"width": 32}})
    other = {"model": {"width": 16}, "solver": {"steps": 2, "device": "cpu"},
             "finetune": {"from_checkpoint": str(ckpt)}}  # fmt: skip
    with pytest.raises(ExperimentSetupError, match=r"net\.0\.weight has shape \(32, 64\)"):
        run_experiment(other, server=None, run_dir=str(tmp_path / "a"), progress=False)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    cfg = {**other, "model": {"width": 32}, "finetune": {"from_checkpoint": str(junk)}}
    with pytest.raises(ExperimentSetupError, match="not a layerscope checkpoint"):
        run_experiment(cfg, server=None, run_dir=str(tmp_path / "b"), progress=False)
    cfg = {**other, "model": {"width": 32},
           "finetune": {"from_checkpoint": str(ckpt), "freeze": "net.9"}}  # fmt: skip
    with pytest.raises(ExperimentSetupError, match=r"finetune.freeze: unknown layer"):
        run_experiment(cfg, server=None, run_dir=str(tmp_path / "c"), progress=False)


def test_auto_weight_decay_starts_with_decay_off(tmp_path: Path) -> None:
    cfg = {"every": 50, "rules": {"auto_weight_decay": True},
           "solver": {"steps": 3, "device": "cpu", "weight_decay": 0.01}}  # fmt: skip
    run_experiment(cfg, server=None, run_dir=str(tmp_path), progress=False)
    (result,) = _events(tmp_path, "command_result")
    assert result["data"]["name"] == "set_weight_decay" and result["data"]["args"] == {
        "enabled": False
    }
    assert result["data"]["state"]["rules"]["auto_weight_decay"] is True


def test_checkpoint_command_then_finetune_with_a_frozen_layer_then_unfreeze_live(
    tmp_path: Path,
) -> None:
    from layerscope.trainer.checkpoint import load_model_weights
    from layerscope.trainer.watch import watch

    def train(w: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(data.x_train[:64]), data.y_train[:64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss=loss.detach())

    cfg = wire.validate_experiment({"solver": {"device": "cpu", "lr": 0.01}})
    data, model, opt, _ = build(cfg)
    with watch(model, opt, every=0, run_dir=tmp_path / "a") as w:
        train(w, model, opt, 5)
        assert w.command("checkpoint")["ok"]
    ckpt = tmp_path / "a" / "checkpoint-5.pt"
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    _, tuned, opt, _ = build({**cfg, "solver": {**cfg["solver"], "seed": 1}})
    assert not torch.equal(tuned.state_dict()["net.0.weight"], saved["net.0.weight"])
    assert load_model_weights(tuned, ckpt) == {"path": str(ckpt), "step": 5, "tensors": 6}
    with watch(tuned, opt, every=0, run_dir=tmp_path / "b") as w:
        assert w.command("set_frozen", {"layers": ["net.0"], "frozen": True})["ok"]
        train(w, tuned, opt, 5)
        now = tuned.state_dict()
        assert torch.equal(now["net.0.weight"], saved["net.0.weight"])
        assert torch.equal(now["net.0.bias"], saved["net.0.bias"])
        assert not torch.equal(now["net.2.weight"], saved["net.2.weight"])
        result = w.command("set_frozen", {"layers": ["net.0"], "frozen": False})
        assert result["state"]["frozen"] == []
        train(w, tuned, opt, 2)
        assert not torch.equal(tuned.state_dict()["net.0.weight"], saved["net.0.weight"])


def test_a_batch_larger_than_the_training_set_trains_full_batch_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # blobs: 1000 points, 800 after a 20% validation split; a batch of 1024 cannot be drawn
    cfg = {"every": 50, "data": {"dataset": "blobs", "val_fraction": 0.2},
           "solver": {"steps": 2, "batch_size": 1024, "device": "cpu"}}  # fmt: skip
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path / "big"), progress=False)
    assert summary["steps"] == 2
    (note,) = [e for e in _events(tmp_path / "big", "log") if "batch_size" in e["data"]]
    assert note["data"]["batch_size"] == 1024 and note["data"]["train_examples"] == 800
    assert "full-batch" in note["data"]["message"]
    assert "batch size 1024 is larger than the 800 training examples" in capsys.readouterr().err
    cfg["solver"]["batch_size"] = 800  # exactly the set: nothing to say
    run_experiment(cfg, server=None, run_dir=str(tmp_path / "fits"), progress=False)
    assert not [e for e in _events(tmp_path / "fits", "log") if "batch_size" in e["data"]]
    assert "larger than" not in capsys.readouterr().err


def test_npz_labels_that_are_not_0_to_k_minus_1_train_a_k_way_head_and_show_in_the_config(
    tmp_path: Path,
) -> None:
    """A user's .npz labelled {3, 7} (a mask's {0, 255} alike) is a 2-class problem: the
    output layer has 2 units, not max+1 = 8, validation scores against the same classes,
    and the run's config says which label each class index stands for."""
    rng = np.random.default_rng(0)
    y = np.where(rng.random(300) < 0.5, 7, 3)
    x = rng.normal(size=(300, 2)).astype(np.float32) + np.where(y == 7, 3.0, -3.0)[:, None]
    np.savez(tmp_path / "two.npz", x=x, y=y)
    cfg = {"every": 5, "data": {"dataset": "npz", "path": str(tmp_path / "two.npz")},
           "solver": {"steps": 40, "eval_every": 20, "device": "cpu"}}  # fmt: skip
    data, model, _, _ = build(wire.validate_experiment(cfg))
    assert data.num_classes == 2 and data.labels == [3, 7]
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path / "run"), progress=False)
    assert summary["val_acc"] is not None and summary["val_acc"] > 0.95
    hello = wire.parse_trainer_frame(next(iter(read_spool(tmp_path / "run" / "spool.bin"))))
    assert hello["config"]["data"]["labels"] == "3, 7"
    assert hello["layers"][-1]["units"] == 2  # the output layer: one unit per class


def test_a_long_list_of_npz_labels_is_cut_in_the_config(tmp_path: Path) -> None:
    y = np.arange(1000) * 3  # 1000 classes, labels 0, 3, ..., 2997
    np.savez(tmp_path / "many.npz", x=np.zeros((1000, 1), np.float32), y=y)
    cfg = wire.validate_experiment(
        {"data": {"dataset": "npz", "path": str(tmp_path / "many.npz"), "val_fraction": 0.0}}
    )
    data = build(cfg)[0]
    shown = _run_config(cfg, 1, data)["data"]["labels"]
    assert shown.startswith("0, 3, 6, ") and shown.endswith(", ..., 2997 (1000 labels)")
    assert len(shown) <= MAX_LABELS_CONFIG_CHARS + 40
    assert "labels" not in cfg["data"]  # the validated config itself is left as it was


# ---- resuming (layerscope train --resume) ----


def test_resume_config_is_the_checkpoints_and_names_what_given_settings_change(
    tmp_path: Path,
) -> None:
    """The checkpoint's experiment with the user's settings over it: a name and a length
    may change (epochs then decide), any other field changed is a conflict (loc, its
    value, the given one); a value equal to the checkpoint's is none. The file a run was
    fine-tuned from is kept but not looked for: it is not read again."""
    source = tmp_path / "pretrained.pt"
    source.write_bytes(b"x")
    stored = wire.validate_experiment({"model": {"width": 16}, "solver": {"steps": 20},
                                       "finetune": {"from_checkpoint": str(source)}})  # fmt: skip
    source.unlink()
    assert resume_config(stored, {}) == (stored, [])
    cfg, conflicts = resume_config(stored, {"name": "longer", "solver": {"epochs": 3}})
    assert conflicts == [] and cfg["name"] == "longer"
    assert cfg["solver"]["steps"] is None and cfg["solver"]["epochs"] == 3
    assert cfg["finetune"]["from_checkpoint"] == str(source)
    _, conflicts = resume_config(stored, {"model": {"width": 16}, "solver": {"lr": 0.5}})
    assert conflicts == [(("solver", "lr"), 0.001, 0.5)]
    with pytest.raises(wire.ExperimentError, match=r"solver\.lr: must be >= 0"):
        resume_config(stored, {"solver": {"lr": -1}})


def test_a_finetuned_run_resumes_with_its_frozen_layers_without_its_source_file(
    tmp_path: Path,
) -> None:
    """A fine-tuned run's checkpoint (here its last-good.pt, at its first probe step),
    read once, resumes after the file it was fine-tuned from is gone: the weights come
    from the checkpoint, the frozen layer from its control state (restored, not --freeze
    again)."""
    from layerscope.trainer.experiment import read_resume

    base: dict[str, Any] = {"every": 5, "solver": {"steps": 4, "device": "cpu"}}
    source = _checkpoint(tmp_path, base)
    cfg = {**base, "finetune": {"from_checkpoint": str(source), "freeze": "net.0"}}
    run_experiment(cfg, server=None, run_dir=str(tmp_path / "ft"), progress=False)
    source.unlink()
    resume = read_resume(tmp_path / "ft" / "last-good.pt")
    assert resume.step == 1 and resume.config["finetune"]["freeze"] == "net.0"
    # read once (it was read again by watch(): a second read of a large checkpoint, and
    # "no such file" here): the run goes on from what read_resume read
    (tmp_path / "ft" / "last-good.pt").unlink()
    summary = run_experiment(resume.config, server=None, run_dir=str(tmp_path / "on"),
                             progress=False, resume=resume)  # fmt: skip
    assert summary["steps"] == 4 and summary["resumed_at"] == 1
    (frozen,) = _events(tmp_path / "on", "command_result")
    assert frozen["data"]["args"] == {"layers": ["net.0"], "frozen": True}
    assert frozen["data"]["reason"] == "restored from last-good.pt"
    (log,) = _events(tmp_path / "on", "log")
    assert log["data"]["message"].startswith("resuming from ") and log["step"] == 1
    assert {p["update_ratio"] for p in _probes(tmp_path / "on", "net.0")} == {0.0}
