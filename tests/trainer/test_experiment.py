"""Experiment configs (wire.EXPERIMENT_SCHEMA / validate_experiment, which the server uses
for POST /api/runs) and real built-in runs with server=None (spool only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from layerscope.trainer import wire
from layerscope.trainer.experiment import run_experiment, trainer_socket_url


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
    assert "Xavier for tanh-like layers, He (√2 larger) for ReLU" in init_help


def test_empty_config_gets_every_default() -> None:
    cfg = wire.validate_experiment({})
    for loc, spec in _fields():
        value = cfg[loc[0]] if len(loc) == 1 else cfg[loc[0]][loc[1]]
        if loc != ["name"]:
            assert value == spec["default"], loc
    assert cfg["name"] == "mlp-relu-he-digits"
    assert wire.validate_experiment(cfg) == cfg  # a filled config validates to itself


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
    assert "no such directory" in _errors({"data": {"dataset": "folder", "path": "d.npz"}})["data.path"]
    assert "no such file" in _errors({"data": {"dataset": "npz", "path": "imgs"}})["data.path"]


def test_cross_field_rules() -> None:
    assert "data.path" in _errors({"data": {"dataset": "npz"}})
    assert "no such file" in _errors({"data": {"dataset": "npz", "path": "/nope.npz"}})["data.path"]
    assert "model.arch" in _errors({"model": {"arch": "cnn"}, "data": {"dataset": "spirals"}})
    assert "solver.batch_size" in _errors({"model": {"batch_norm": True}, "solver": {"batch_size": 1}})
    assert "solver.steps" in _errors({"solver": {"steps": None}})


def test_batch_size_full_steps_vs_epochs_and_overfit_switches_regularisation_off() -> None:
    cfg = wire.validate_experiment({"solver": {"batch_size": "full", "epochs": 3}})
    assert cfg["solver"]["batch_size"] == 0
    assert cfg["solver"]["steps"] is None and cfg["solver"]["epochs"] == 3
    both = wire.validate_experiment({"solver": {"steps": 7, "epochs": 3}})
    assert both["solver"]["steps"] == 7  # steps wins; run_experiment uses it
    fit = wire.validate_experiment(
        {"overfit": 50, "model": {"dropout": 0.5}, "solver": {"weight_decay": 0.1},
         "data": {"input_noise": 0.3}}  # fmt: skip
    )
    assert fit["data"]["subset"] == 50 and fit["model"]["dropout"] == 0.0
    assert fit["solver"]["weight_decay"] == 0.0 and fit["data"]["input_noise"] == 0.0


def test_demo_experiment_is_valid_and_long() -> None:
    demo = wire.validate_experiment(wire.DEMO_EXPERIMENT)
    assert demo["model"]["activation"] == "tanh" and demo["model"]["init"] == "xavier"
    assert demo["model"]["depth"] == 4 and demo["solver"]["steps"] >= 10_000


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


def test_short_run_without_server_finishes_with_finite_loss_and_a_spool(tmp_path: Path) -> None:
    cfg = {"name": "short", "every": 5, "model": {"depth": 2, "width": 16, "batch_norm": True,
           "dropout": 0.1}, "data": {"input_noise": 0.05, "preprocess": "per_pixel"},
           "solver": {"steps": 30, "eval_every": 10, "batch_size": 32, "device": "cpu"}}  # fmt: skip
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path), progress=False)
    assert summary["steps"] == 30 and not summary["stopped"]
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


def test_cnn_on_digits_runs(tmp_path: Path) -> None:
    cfg = {"model": {"arch": "cnn", "depth": 2, "width": 4}, "every": 2,
           "solver": {"steps": 4, "device": "cpu"}}  # fmt: skip
    summary = run_experiment(cfg, server=None, run_dir=str(tmp_path), progress=False)
    assert summary["steps"] == 4 and math.isfinite(summary["train_loss"])


def test_overfit_100_passes_for_the_default_mlp_and_fails_with_lr_0(tmp_path: Path) -> None:
    base: dict[str, Any] = {"overfit": 100, "every": 100, "solver": {"steps": 300, "device": "cpu"}}
    passed = run_experiment(base, server=None, run_dir=str(tmp_path / "ok"), progress=False)
    assert passed["overfit"] == {"n": 100, "train_acc": 1.0, "passed": True}
    frozen = {**base, "solver": {"steps": 20, "device": "cpu", "lr": 0.0}}
    failed = run_experiment(frozen, server=None, run_dir=str(tmp_path / "lr0"), progress=False)
    assert failed["overfit"]["passed"] is False and failed["overfit"]["train_acc"] < 0.5
