"""trainer/cli.py as a user and the server's launcher run it: `layerscope train` flags
generated from the schema, preset < config file < flags, every bad field printed with its
loc, `sync`. (Named apart from tests/server/test_cli.py: pytest needs unique basenames.)"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from layerscope.trainer import cli, wire
from layerscope.trainer.spool import read_spool


def _config(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert cli.main(["train", "--print-config", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_schema_field_has_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for section, key, spec in cli.schema_fields():
        flag = cli.flag_for(section, key)
        assert flag in text, flag
        if spec["type"] == "bool":
            assert f"--no-{flag[2:]}" in text
    for flag in ("--config", "--preset", "--server", "--run-id", "--run-dir", "--no-progress"):
        assert flag in text
    assert "--data-path" in text and "--init-std" in text and "--overfit" in text
    assert "(default 1000)" in " ".join(text.split()) and "(default: 1000)" not in text  # once


def test_lab_init_help_says_what_every_option_is() -> None:
    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices[name]

    init = sub(sub(cli.build_parser(), "lab"), "init")
    for action in init._actions:  # --steps said only "(default: the server's)"
        assert action.help and not action.help.startswith("("), action.option_strings


def test_flags_override_the_config_file_which_overrides_the_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"model": {"depth": 3, "width": 32}, "solver": {"lr": 0.5}}))
    cfg = _config(capsys, "--preset", "demo", "--config", str(path), "--lr", "0.25",
                  "--batch-norm", "--batch-size", "full", "--epochs", "2", "--name", "x")  # fmt: skip
    assert cfg["model"]["depth"] == 3 and cfg["model"]["width"] == 32  # file over preset
    assert cfg["model"]["activation"] == "tanh"  # preset kept where nothing overrides
    assert cfg["solver"]["lr"] == 0.25 and cfg["model"]["batch_norm"] is True  # flags win
    assert cfg["solver"]["batch_size"] == 0 and cfg["name"] == "x"
    # --epochs alone wins over the preset's steps, as every flag does; with --steps too,
    # steps decide (as within one config)
    assert cfg["solver"]["steps"] is None and cfg["solver"]["epochs"] == 2
    both = _config(capsys, "--preset", "demo", "--epochs", "2", "--steps", "7")
    assert both["solver"]["steps"] == 7
    kept = _config(capsys, "--preset", "demo", "--lr", "0.2")
    assert kept["solver"]["steps"] == wire.DEMO_EXPERIMENT["solver"]["steps"]
    # the demo's auto weight decay goes with its decay: --weight-decay 0 alone was refused
    no_decay = _config(capsys, "--preset", "demo", "--weight-decay", "0")
    assert no_decay["solver"]["weight_decay"] == 0 and not no_decay["rules"]["auto_weight_decay"]
    assert cli.main(["train", "--print-config", "--preset", "demo", "--weight-decay", "0",
                     "--auto-weight-decay"]) == 2  # fmt: skip
    assert "needs solver.weight_decay > 0" in capsys.readouterr().err
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"solver": {"weight_decay": 0}}))
    filed = _config(capsys, "--preset", "demo", "--config", str(zero))
    assert not filed["rules"]["auto_weight_decay"]
    off = _config(capsys, "--config", str(path), "--no-batch-norm", "--subset", "none")
    assert off["model"]["batch_norm"] is False and off["data"]["subset"] is None


def test_a_config_files_epochs_without_steps_win_over_the_presets_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each layer's epochs-without-steps drops the steps below it, as --epochs does: the
    demo preset's 20000 steps no longer outlive a file's epochs. Steps given in the same
    layer, or in a later one, still decide."""
    epochs = tmp_path / "epochs.json"
    epochs.write_text(json.dumps({"solver": {"epochs": 2}}))
    cfg = _config(capsys, "--preset", "demo", "--config", str(epochs))
    assert cfg["solver"]["steps"] is None and cfg["solver"]["epochs"] == 2
    flagged = _config(capsys, "--preset", "demo", "--config", str(epochs), "--steps", "7")
    assert flagged["solver"]["steps"] == 7
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"solver": {"epochs": 2, "steps": 5}}))
    assert _config(capsys, "--preset", "demo", "--config", str(both))["solver"]["steps"] == 5
    # A real run: 2 epochs of 64 examples in batches of 32 are 4 steps, not 20000.
    args = ["--preset", "demo", "--config", str(epochs), "--subset", "64", "--device", "cpu",
            "--no-progress", "--run-dir", str(tmp_path / "r")]  # fmt: skip
    assert cli.main(["train", *args]) == 0
    assert ": 4 steps" in capsys.readouterr().out


def test_a_printed_config_can_be_retargeted_with_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full --print-config file (normal init with its std) run with --init xavier: the
    file's init_std no longer applies and goes; the same std given as a flag is refused."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_config(capsys, "--init", "normal", "--init-std", "0.5")))
    cfg = _config(capsys, "--config", str(path), "--init", "xavier")
    assert cfg["model"]["init"] == "xavier" and cfg["model"]["init_std"] == 0.01
    assert cli.main(["train", "--config", str(path), "--init", "xavier", "--init-std", "0.5"]) == 2
    assert "init_std: only used when init is normal" in capsys.readouterr().err


def test_a_name_built_from_the_settings_or_a_presets_follows_the_final_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A printed config leaves a generated name out, so the file run with other flags is
    named after them; so is an older file holding its generated name, and a preset whose
    model or data a flag changed. A name the user gave stays, and is printed."""

    def run_name(*args: str) -> str:
        common = ["--steps", "1", "--device", "cpu", "--no-progress", "--every", "50"]
        assert cli.main(["train", *args, *common, "--run-dir", str(tmp_path / "r")]) == 0
        return capsys.readouterr().out.split("(", 1)[1].split(")", 1)[0]

    printed = _config(capsys)
    assert printed["name"] is None
    path = tmp_path / "printed.json"
    path.write_text(json.dumps(printed))
    retargeted = ["--activation", "tanh", "--init", "xavier", "--dataset", "spirals"]
    assert run_name("--config", str(path), *retargeted) == "mlp-tanh-xavier-spirals"
    old = tmp_path / "old.json"  # printed before: the generated name in the file
    old.write_text(json.dumps({**printed, "name": "mlp-relu-he-digits"}))
    assert run_name("--config", str(old), *retargeted) == "mlp-tanh-xavier-spirals"
    assert run_name("--config", str(old)) == "mlp-relu-he-digits"
    # a normal init names its std (runs differing only by it were named alike); a file
    # printed before that, holding the name without it, still follows its settings
    assert run_name("--init", "normal", "--init-std", "1") == "mlp-relu-normal1-digits"
    normal = {**printed, "model": {**printed["model"], "init": "normal", "init_std": 0.5}}
    older = tmp_path / "older.json"
    older.write_text(json.dumps({**normal, "name": "mlp-relu-normal-digits"}))
    assert run_name("--config", str(older), "--init-std", "0.01") == "mlp-relu-normal0.01-digits"

    demo = wire.DEMO_EXPERIMENT["name"]
    assert (
        run_name("--preset", "demo", "--activation", "relu", "--init", "he") == "mlp-relu-he-digits"
    )
    assert run_name("--preset", "demo", "--lr", "0.02") == demo  # solver only: still the demo
    assert _config(capsys, "--preset", "demo")["name"] is None
    saved = tmp_path / "demo.json"
    saved.write_text(json.dumps({**_config(capsys, "--preset", "demo"), "name": demo}))
    assert run_name("--config", str(saved), "--batch-norm") == "mlp-tanh-xavier-digits"

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"name": "mine"}))
    assert run_name("--config", str(mine), *retargeted) == "mine"
    assert _config(capsys, "--config", str(mine), "--activation", "tanh")["name"] == "mine"
    assert _config(capsys, "--preset", "demo", "--name", "x", "--depth", "3")["name"] == "x"


def test_a_config_with_a_bad_solver_section_and_epochs_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"solver": [1]}))
    assert cli.main(["train", "--config", str(path), "--epochs", "2", "--print-config"]) == 2
    assert "solver: must be an object" in capsys.readouterr().err


def test_a_config_files_relative_paths_are_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "d.npz").write_bytes(b"")
    (folder / "exp.json").write_text(json.dumps({"data": {"dataset": "npz", "path": "d.npz"}}))
    monkeypatch.chdir(tmp_path)  # run from elsewhere
    cfg = _config(capsys, "--config", "exp/exp.json")
    assert cfg["data"]["path"] == str(folder / "d.npz")
    flag = _config(capsys, "--config", "exp/exp.json", "--data-path", "exp/d.npz")
    assert flag["data"]["path"] == str(folder / "d.npz")  # a flag is the shell's: from cwd


def test_overfit_flag_sets_subset_and_turns_regularisation_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file's regularisation is dropped under --overfit (as a file's irrelevant setting
    is); a flag naming one is refused, as every flag that would be ignored is: it was
    dropped without a word ('--overfit 100 --dropout 0.3' trained with none)."""
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps({"model": {"dropout": 0.5}, "solver": {"weight_decay": 0.1}}))
    cfg = _config(capsys, "--config", str(exp), "--overfit", "100")
    assert cfg["data"]["subset"] == 100 and cfg["overfit"] == 100
    assert cfg["model"]["dropout"] == 0.0 and cfg["solver"]["weight_decay"] == 0.0
    code = cli.main(
        ["train", "--print-config", "--overfit", "100", "--dropout", "0.5", "--weight-decay",
         "0.1", "--subset", "500", "--auto-weight-decay"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    for field in ("model.dropout", "solver.weight_decay", "data.subset", "rules.auto_weight_decay"):
        assert f"{field}: ignored with overfit" in err, err


def test_bad_fields_are_all_printed_with_their_loc_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["train", "--lr", "-1", "--depth", "100", "--dataset", "npz"])
    err = capsys.readouterr().err
    assert code == 2
    assert "solver.lr: must be >= 0.0, got -1.0" in err
    assert "model.depth: must be <= 64" in err and "data.path: required when dataset is npz" in err


def test_settings_that_would_be_ignored_or_fail_late_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field whose `when` does not hold (--data-path with the digits set, --init-std
    with xavier), even given its default value, batch norm over one training example, a
    run id that is a path, a run directory that is a file: each a one-line error with
    exit 2, before any training."""
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    for args, words in (
        (["--data-path", str(data)], "data.path: only used when dataset is npz or folder"),
        (["--data-path", "none"], "data.path: only used when dataset is npz or folder"),
        (
            ["--dataset", "spirals", "--data-path", "none"],
            "data.path: only used when dataset is npz or folder (dataset is spirals)",
        ),
        (
            ["--init", "xavier", "--init-std", "0.5"],
            "model.init_std: only used when init is normal",
        ),
        (
            ["--init", "xavier", "--init-std", "0.01"],  # the default: still ignored
            "model.init_std: only used when init is normal",
        ),
        (["--batch-norm", "--overfit", "1"], "overfit: batch norm needs at least 2 training"),
        (["--batch-norm", "--subset", "1"], "data.subset: batch norm needs at least 2 training"),
    ):
        assert cli.main(["train", "--steps", "1", *args]) == 2, args
        assert words in capsys.readouterr().err, args
    import numpy as np

    np.savez(tmp_path / "two.npz", x=np.zeros((2, 3)), y=np.array([0, 1]))
    two = ["--dataset", "npz", "--data-path", str(tmp_path / "two.npz"), "--val-fraction", "0.5"]
    run_dir = tmp_path / "never"
    quiet = ["--steps", "1", "--no-progress", "--run-dir", str(run_dir)]
    assert cli.main(["train", *two, "--batch-norm", *quiet]) == 2  # one left to train on
    err = capsys.readouterr().err
    assert "data.val_fraction: batch norm needs at least 2 training examples" in err
    assert "leaves 1" in err and "Expected more than 1 value" not in err
    assert not run_dir.exists()  # refused before the run was recorded
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["train", "--steps", "1", "--no-progress", "--run-dir", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerscope train: ") and "Traceback" not in err and str(afile) in err
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")  # were it taken, ../../x would stay in tmp_path
    assert cli.main(["train", "--steps", "1", "--no-progress", "--run-id", "../../x"]) == 2
    assert "must be a plain name" in capsys.readouterr().err


def test_freezing_a_layer_the_model_lacks_is_one_error_naming_its_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "never"
    args = ["train", "--freeze", "net.0,net.9", "--steps", "1", "--no-progress", "--run-dir",
            str(run_dir)]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        "layerscope train: finetune.freeze: unknown layer(s) net.9; this model's layers "
        "with parameters are net.0, net.2, net.4\n"
    )
    assert "set_frozen failed" not in caplog.text and not run_dir.exists()


def test_bad_config_files_and_flag_types_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["train", "--config", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1]")
    assert cli.main(["train", "--config", str(tmp_path / "list.json")]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err
    (tmp_path / "unknown.json").write_text('{"solver": {"learning_rate": 1}}')
    assert cli.main(["train", "--config", str(tmp_path / "unknown.json")]) == 2
    assert "solver.learning_rate: unknown field" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert cli.main(["train", "--depth", "two"]) == 2
    assert "--depth: expected int, got 'two'" in capsys.readouterr().err


def test_an_unknown_command_is_refused_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["labs", "init"]) == 2
    err = capsys.readouterr().err
    assert "unknown command" in err and "train, sync, lab" in err
    for argv in (
        ["--version"],
        ["sync", "--version"],
        ["lab", "--version"],
        ["lab", "init", "--version"],
    ):
        assert cli.main(argv) == 0, argv  # every level, as the README says
        assert capsys.readouterr().out.startswith("layerscope "), argv


def test_lab_init_takes_the_server_as_train_and_sync_do() -> None:
    from layerscope.trainer.link import http_base as _http_base

    for given in ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765/ws/trainer", "127.0.0.1:8765",
                  "http://127.0.0.1:8765/", "http://127.0.0.1:8765"):  # fmt: skip
        assert _http_base(given) == "http://127.0.0.1:8765", given
    assert _http_base("wss://lab.example/ls/ws/trainer") == "https://lab.example/ls"


def test_sync_needs_a_server_and_an_existing_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAYERSCOPE_SERVER", raising=False)
    assert cli.main(["sync", str(tmp_path)]) == 2
    assert "--server URL is required" in capsys.readouterr().err
    assert cli.main(["sync", str(tmp_path / "nope"), "--server", "ws://127.0.0.1:9"]) == 2
    assert "no such spool" in capsys.readouterr().err
    assert cli.main(["sync", str(tmp_path), "--server", "ws://127.0.0.1:9"]) == 2
    assert f"{tmp_path / 'spool.bin'}: no such spool file" in capsys.readouterr().err
    # sync needs no torch: importing it took ~11 s of a 12 s sync on a cold cache
    code = ("import sys; from layerscope.trainer import cli; "
            f"cli.main(['sync', {str(tmp_path)!r}, '--server', 'ws://127.0.0.1:9']); "
            "print('torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_train_runs_and_a_failed_overfit_check_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--device", "cpu", "--run-dir", str(tmp_path), "--no-progress", "--every", "50"]
    assert cli.main(["train", "--steps", "5", "--dataset", "blobs", *common]) == 0
    assert "5 steps" in capsys.readouterr().out
    code = cli.main(["train", "--overfit", "20", "--lr", "0", "--steps", "5", *common])
    out = capsys.readouterr().out
    assert code == 1 and "overfit check: FAIL" in out


def test_a_run_the_nan_rule_stopped_exits_3_and_one_the_user_stopped_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A run that blew up to NaN, stopped by ExplodingTensor (no server to resume its
    pause), is not a finished run: exit 3, even in an overfit check it made fail. A run
    stopped with the dashboard's Stop (a user's command through the server) exits 0."""
    blow_up = ["--optimizer", "sgd", "--lr", "100", "--init", "normal", "--init-std", "10",
               "--steps", "50", "--every", "1", "--rules", "ExplodingTensor", "--device", "cpu",
               "--no-progress"]  # fmt: skip
    assert cli.main(["train", *blow_up, "--run-dir", str(tmp_path / "nan")]) == 3
    out = capsys.readouterr().out
    assert "(stopped by a rule: NaN/Inf in " in out and "50 steps" not in out
    # a CLI user has no w.should_stop to read
    assert "[ExplodingTensor] NaN/Inf" in caplog.text and "should_stop" not in caplog.text
    assert cli.main(["train", *blow_up, "--overfit", "64", "--run-dir", str(tmp_path / "of")]) == 3

    from trainer_server import TrainerServer
    from waiting import wait_until

    server = TrainerServer().start()
    codes: list[int] = []
    try:
        args = ["train", "--steps", "1000000", "--dataset", "blobs", "--every", "5", "--device",
                "cpu", "--no-progress", "--run-dir", str(tmp_path / "user"), "--server", server.url]  # fmt: skip
        thread = threading.Thread(target=lambda: codes.append(cli.main(args)), daemon=True)
        thread.start()
        wait_until(lambda: bool(server.events("status")) and server.received > 3)
        server.send_command("stop")
        thread.join(60)
    finally:
        server.close()
    assert codes == [0]
    assert "steps (stopped)" in capsys.readouterr().out


def test_train_with_a_server_prints_its_run_and_dashboard_url_before_the_progress_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer_server import TrainerServer

    server = TrainerServer().start()
    try:
        args = ["train", "--steps", "3", "--dataset", "blobs", "--every", "50", "--device",
                "cpu", "--run-dir", str(tmp_path / "r"), "--server", server.url]  # fmt: skip
        assert cli.main(args) == 0
        err = capsys.readouterr().err
        (hello,) = server.hellos
        run_id = hello["run_id"]
        line = f"layerscope train: run {run_id}: dashboard at http://127.0.0.1:{server.port}/runs/{run_id}\n"
        assert err.startswith(line), err
        assert err.count("dashboard at") == 1 and "[layerscope] step" in err  # progress after it
        assert cli.main([*args, "--no-progress", "--run-id", "quiet1"]) == 0
        assert "dashboard at" not in capsys.readouterr().err  # launchers' quiet mode
    finally:
        server.close()


def test_module_entry_point_help_exits_0() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "layerscope.trainer", "train", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "usage: layerscope train" in out.stdout


@pytest.mark.slow
def test_launcher_command_line_trains_unreachable_server_and_sigterm_stops_cleanly(
    tmp_path: Path,
) -> None:
    """Exactly the launcher's invocation. The server is unreachable, so training must go
    on into the spool under ./layerscope-runs/<id>; SIGTERM (the launcher's stop) ends the
    run as "stopped" with exit 130, not as a killed process."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"solver": {"steps": 1_000_000, "device": "cpu"}, "every": 5}))
    env = {**os.environ, "LAYERSCOPE_TRAINER_TOKEN": "secret"}
    env.pop("LAYERSCOPE_SERVER", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerscope.trainer", "train", "--config", str(config),
         "--run-id", "launched1", "--server", "ws://127.0.0.1:9/ws/trainer", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    spool = tmp_path / "layerscope-runs" / "launched1" / "spool.bin"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if spool.is_file() and any('"metrics"' in t for t in read_spool(spool)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    statuses = [f["data"]["status"] for f in map(json.loads, read_spool(spool))
                if f["type"] == "event" and f["kind"] == "status"]  # fmt: skip
    assert statuses[0] == "running" and statuses[-1] == "stopped"


@pytest.mark.slow
def test_spooled_run_syncs_and_live_run_streams_to_a_real_server_with_a_trainer_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train with no server, then `layerscope sync RUN_DIR --server http://...`: the server
    holds the run with its validated config. Then train live against ws://HOST:PORT."""
    import threading
    import urllib.request

    from layerscope.server.serving import make_server
    from layerscope.server.settings import Settings

    monkeypatch.delenv("LAYERSCOPE_SERVER", raising=False)
    run_dir = tmp_path / "run"
    args = ["train", "--steps", "12", "--every", "4", "--dataset", "spirals", "--device", "cpu",
            "--run-id", "offline1", "--run-dir", str(run_dir), "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    capsys.readouterr()

    # the two tokens go together (a4038e8); the REST reads below present the viewer's
    # (tokens of 16+ characters, as the server requires since 87a79d9)
    trainer_token, viewer_token = "t0ken-for-trainers", "v1ewer-for-people"
    settings = Settings(
        data_dir=tmp_path / "data", port=0, trainer_token=trainer_token, viewer_token=viewer_token
    )
    server, sock, settings, _app = make_server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        base = f"http://127.0.0.1:{settings.port}"
        assert cli.main(["sync", str(run_dir), "--server", base]) == 2  # no token: refused
        assert "layerscope sync:" in capsys.readouterr().err
        monkeypatch.setenv("LAYERSCOPE_TRAINER_TOKEN", trainer_token)
        assert cli.main(["sync", str(run_dir), "--server", base]) == 0
        out = capsys.readouterr().out
        acked = int(out.split("now holds all ")[1].split()[0])
        assert acked >= 3  # metrics, probes and status events of a 12-step run
        assert f"sent {acked} frames" in out
        assert cli.main(["sync", str(run_dir), "--server", base]) == 0  # again: nothing new
        out = capsys.readouterr().out  # it said "the server acknowledged N frames" as if sent
        assert f"the server already had all {acked} frames; nothing sent" in out
        with urllib.request.urlopen(
            f"{base}/api/runs/offline1?token={viewer_token}", timeout=5
        ) as resp:
            run = json.loads(resp.read())
        assert run["config"]["data"]["dataset"] == "spirals" and run["last_step"] == 12

        # Live: a bare base URL is completed to the trainer socket.
        live = ["train", "--steps", "8", "--dataset", "blobs", "--device", "cpu", "--run-id",
                "live1", "--run-dir", str(tmp_path / "live"), "--no-progress", "--server",
                f"ws://127.0.0.1:{settings.port}"]  # fmt: skip
        assert cli.main(live) == 0
        deadline = time.monotonic() + 10  # acked frames are committed; the status may trail
        while True:
            with urllib.request.urlopen(
                f"{base}/api/runs/live1?token={viewer_token}", timeout=5
            ) as resp:
                run = json.loads(resp.read())
            if run["status"] == "finished" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert run["status"] == "finished" and run["last_step"] == 8
        assert run["config"]["data"]["dataset"] == "blobs"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_rule_and_finetune_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "c.pt"
    ckpt.write_text("not a checkpoint")
    cfg = _config(
        capsys, "--silence", "DeadUnits,AllZero", "--auto-halve-lr", "--auto-weight-decay",
        "--weight-decay", "0.01", "--patience", "5", "--from", str(ckpt), "--freeze", "net.0",
    )  # fmt: skip
    assert cfg["rules"] == {"enabled": "all", "silence": "DeadUnits,AllZero",
                            "auto_halve_lr": True, "auto_weight_decay": True, "patience": 5}  # fmt: skip
    assert cfg["finetune"] == {"from_checkpoint": str(ckpt), "freeze": "net.0"}
    assert _config(capsys, "--no-rules")["rules"]["enabled"] == "none"
    assert _config(capsys, "--rules", "Overfit")["rules"]["enabled"] == "Overfit"
    assert cli.main(["train", "--print-config", "--silence", "DeadRelu"]) == 2
    assert "rules.silence: unknown rule(s) DeadRelu" in capsys.readouterr().err
    # the alert auto-halve raises is named as a rule may be (it was refused as unknown) ...
    quiet = _config(capsys, "--silence", "ValidationPlateau,Overfit", "--rules", "all")
    assert quiet["rules"]["silence"] == "ValidationPlateau,Overfit"
    # ... and silencing it (no alert, no halving) is auto-halve off: not beside it
    assert cli.main(["train", "--print-config", "--silence", "ValidationPlateau",
                     "--auto-halve-lr"]) == 2  # fmt: skip
    assert "ValidationPlateau is auto-halve's alert" in capsys.readouterr().err
    common = ["--device", "cpu", "--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert cli.main(["train", "--steps", "2", "--silence", "ValidationPlateau", *common]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert cli.main(["train", "--steps", "2", "--from", str(ckpt), *common]) == 2
    assert "not a layerscope checkpoint" in capsys.readouterr().err


def test_print_config_into_a_closed_pipe_exits_quietly() -> None:
    """`layerscope train --print-config | head`: a reader that stops early is not an error
    (it printed a BrokenPipeError traceback)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "layerscope.trainer", "train", "--print-config"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()


@pytest.mark.slow
def test_nproc_exits_as_the_ranks_do_3_for_a_run_the_nan_rule_stopped(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Under --nproc a rank's exit 3 (the NaN rule stopped the run) reached the shell as
    torchrun's 1 for any failed rank, after a ChildFailedError report; the launcher now
    exits with the ranks' code, and torchrun has no failure to report."""
    blow_up = ["--nproc", "2", "--optimizer", "sgd", "--lr", "100", "--init", "normal",
               "--init-std", "10", "--steps", "50", "--every", "1", "--rules", "ExplodingTensor",
               "--dataset", "blobs", "--width", "8", "--depth", "2", "--device", "cpu",
               "--no-progress", "--run-dir", str(tmp_path / "nan")]  # fmt: skip
    assert cli.main(["train", *blow_up]) == 3
    out, err = capfd.readouterr()  # the ranks' output too: they write to this process's fds
    assert "(stopped by a rule: NaN/Inf in " in out
    assert "ChildFailedError" not in err and "FAILED" not in err


@pytest.mark.slow
@pytest.mark.parametrize("to", ["pid", "group"])
def test_nproc_sigint_to_the_launcher_or_its_group_stops_the_run_saying_so_once(
    tmp_path: Path, to: str
) -> None:
    """SIGINT to the launcher's pid alone (a process manager's or an IDE's stop) was
    ignored and the run trained to its end: the launcher passes it on to torchrun now. A
    terminal's Ctrl-C (the group) stopped it, but printed torchrun's SignalException
    traceback and "interrupted" once per rank: now one line, from rank 0, either way."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerscope.trainer", "train", "--nproc", "2",
         "--steps", "1000000", "--every", "50", "--dataset", "blobs", "--width", "8",
         "--depth", "2", "--device", "cpu", "--no-progress", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    spool = run_dir / "spool.bin"
    try:
        deadline = time.monotonic() + 120  # two ranks import torch on a loaded machine
        while time.monotonic() < deadline and proc.poll() is None:
            if spool.is_file() and any('"metrics"' in t for t in read_spool(spool)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        if to == "pid":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGINT to the {to} did not stop the run in 30 s")
    finally:
        if proc.poll() is None:  # torchrun's ranks are in sessions of their own:
            proc.terminate()  # SIGTERM, passed on to torchrun, stops them
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert err.count("layerscope train: interrupted; the run was recorded as stopped") == 1, err
    assert "Traceback" not in err and "SignalException" not in err, err
    assert "death signal" not in err and "closing signal" not in err, err
    statuses = [f["data"]["status"] for f in map(json.loads, read_spool(spool))
                if f["type"] == "event" and f["kind"] == "status"]  # fmt: skip
    assert statuses[0] == "running" and statuses[-1] == "stopped"


# ---- train --resume ----


def _spool_frames(run_dir: Path) -> list[dict]:
    return [wire.parse_trainer_frame(t) for t in list(read_spool(run_dir / "spool.bin"))[1:]]


def _train_rows(run_dir: Path) -> dict[int, dict]:
    """Each training step's metrics row values (not the validation rows), by step."""
    return {
        row["step"]: row["values"]
        for frame in _spool_frames(run_dir)
        if frame["type"] == "metrics"
        for row in frame["rows"]
        if "loss" in row["values"]
    }


def test_a_stopped_run_resumes_from_its_checkpoint_steps_rng_and_lr_scale_going_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `layerscope train` run steered (lr scale 0.5), checkpointed from the dashboard and
    stopped; `train --resume RUN_DIR --steps N` goes on from its newest checkpoint: steps
    after the checkpoint's, the lr scale restored as an acknowledged command, no flag
    repeated. Resumed from the unsteered checkpoint before it, the losses (dropout and
    input noise on: the RNG; the batch order) are bit-identical to a run never stopped."""
    from trainer_server import TrainerServer
    from waiting import wait_until

    experiment = ["--dataset", "digits", "--depth", "1", "--width", "16", "--every", "5",
                  "--dropout", "0.2", "--input-noise", "0.1", "--device", "cpu"]  # fmt: skip
    first = tmp_path / "first"
    server = TrainerServer().start()
    codes: list[int] = []
    try:
        args = ["train", *experiment, "--steps", "1000000", "--no-progress", "--run-dir",
                str(first), "--server", server.url]  # fmt: skip
        thread = threading.Thread(target=lambda: codes.append(cli.main(args)), daemon=True)
        thread.start()
        wait_until(lambda: server.received > 2)
        server.send_command("pause")
        wait_until(lambda: any(e["data"]["status"] == "paused" for e in server.events("status")))
        # Paused at step K: checkpoint-K (unsteered), halve the lr, one step; once step K+1
        # is in (the run paused again after it), checkpoint-(K+1) and stop.
        server.send_command("checkpoint")
        server.send_command("set_lr_scale", value=0.5)
        server.send_command("step_once")

        def applied(name: str) -> list[int]:
            results = server.events("command_result")
            return [e["data"]["applied_at_step"] for e in results if e["data"]["name"] == name]

        wait_until(lambda: bool(applied("step_once")))
        stepped = applied("step_once")[0] + 1
        wait_until(
            lambda: any(
                row["step"] == stepped
                for frame in server.frames.values()
                if frame["type"] == "metrics"
                for row in frame["rows"]
            )
        )
        server.send_command("checkpoint")
        server.send_command("stop")
        thread.join(60)
    finally:
        server.close()
    assert codes == [0]
    steps = sorted(int(p.stem.split("-")[1]) for p in first.glob("checkpoint-*.pt"))
    assert len(steps) == 2 and steps[1] == steps[0] + 1
    k = steps[0]
    capsys.readouterr()

    # The run's folder: its newest checkpoint, K+1, with the lr scale set before it.
    resumed = tmp_path / "resumed"
    assert cli.main(["train", "--resume", str(first), "--steps", str(k + 3), "--no-progress",
                     "--run-dir", str(resumed)]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert f"{k + 3} steps (resumed at step {k + 1})" in out
    assert f"checkpoint-{k + 1}.pt" in err and f"at step {k + 1}" in err
    rows = _train_rows(resumed)
    assert sorted(rows) == [k + 2, k + 3]  # steps go on from the checkpoint's
    assert {v["lr"] for v in rows.values()} == {0.0005}  # 0.001 at the restored scale 0.5
    (restored,) = [e for e in _spool_frames(resumed) if e.get("kind") == "command_result"]
    assert restored["data"]["name"] == "set_lr_scale" and restored["data"]["ok"]
    assert restored["data"]["reason"] == f"restored from checkpoint-{k + 1}.pt"
    assert restored["data"]["applied_at_step"] == k + 1
    hello = json.loads(next(iter(read_spool(resumed / "spool.bin"))))
    assert hello["config"]["model"]["width"] == 16 and hello["config"]["solver"]["steps"] == k + 3
    assert hello["config"]["resumed_from"]["step"] == k + 1

    # From checkpoint-K (before the lr was touched): the same numbers as a run never stopped.
    again = tmp_path / "again"
    assert cli.main(["train", "--resume", str(first / f"checkpoint-{k}.pt"), "--steps",
                     str(k + 2), "--no-progress", "--run-dir", str(again)]) == 0  # fmt: skip
    reference = tmp_path / "reference"
    assert cli.main(["train", *experiment, "--steps", str(k + 2), "--no-progress",
                     "--run-dir", str(reference)]) == 0  # fmt: skip
    going_on, never_stopped = _train_rows(again), _train_rows(reference)
    assert sorted(going_on) == [k + 1, k + 2]
    for step in (k + 1, k + 2):
        assert going_on[step]["loss"] == never_stopped[step]["loss"], step
        assert going_on[step]["acc"] == never_stopped[step]["acc"], step


def test_train_takes_file_names_and_a_name_that_are_not_utf8_and_resumes_from_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data file, run folder and run name whose bytes are not UTF-8 (sys.argv carries
    b"caf\\xe9" as "caf\\udce9"): `layerscope train` refused the file and the name
    ("data.path: holds U+DCE9 ...", exit 2) since lone surrogates were refused (8043dbe);
    it trained with them before. Now the file opens by its real name, the name and every
    path the run sends are escaped (\\xNN) so the server takes each frame, and the run
    resumes (--resume) and fine-tunes (--from) from a checkpoint in such a folder."""
    import numpy as np

    def named(*parts: bytes) -> str:
        return os.fsdecode(b"/".join([os.fsencode(tmp_path), *parts]))

    def shown(path: str) -> str:
        return os.fsencode(path).decode("utf-8", "backslashreplace")

    def frames(run_dir: str) -> list[dict]:
        texts = list(read_spool(Path(run_dir) / "spool.bin"))
        hello = wire.parse_trainer_frame(texts[0])
        # as the server reads them: a lone surrogate anywhere raises WireError here
        return [hello, *(wire.parse_trainer_frame(t, run_id=hello["run_id"]) for t in texts[1:])]

    # as a process's own stderr writes a lone surrogate (capsys' stream refused it)
    sys.stderr.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    data = named(b"caf\xe9.npz")
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(64, 4)).astype(np.float32), y=np.arange(64) % 2)
    first, name = named(b"run\xe9"), os.fsdecode(b"caf\xe9")
    common = ["--device", "cpu", "--no-progress", "--every", "1"]
    assert cli.main(["train", "--dataset", "npz", "--data-path", data, "--name", name,
                     "--steps", "3", "--run-dir", first, *common]) == 0  # fmt: skip
    assert "(caf\\xe9) on cpu: 3 steps" in capsys.readouterr().out
    hello = frames(first)[0]
    assert hello["name"] == "caf\\xe9" and hello["config"]["data"]["path"] == shown(data)

    resumed = named(b"resumed\xe9")
    good = os.path.join(first, "last-good.pt")
    assert cli.main(["train", "--resume", good, "--steps", "4", "--run-dir", resumed, *common]) == 0
    assert "4 steps (resumed at step 1)" in capsys.readouterr().out
    (log,) = [f for f in frames(resumed) if "resumed_from" in f.get("data", {})]
    assert log["data"]["resumed_from"] == shown(good) and shown(good) in log["data"]["message"]

    tuned = named(b"tuned")
    assert cli.main(["train", "--from", good, "--dataset", "npz", "--data-path", data,
                     "--steps", "2", "--run-dir", tuned, *common]) == 0  # fmt: skip
    (hello, *_) = frames(tuned)
    assert hello["config"]["finetune"]["from_checkpoint"] == shown(good)


def test_resume_refuses_bad_input_in_one_line_with_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file, a folder without checkpoints, a checkpoint of a user's own loop or
    one from before checkpoints held their experiment, a corrupt file, --resume with
    --from, flags that contradict the checkpoint's experiment, and a checkpoint already at
    the run's last step: each one line on stderr, exit 2, no run folder."""
    import torch
    from layerscope.trainer.control import Control
    from layerscope.trainer.experiment import EXPERIMENT_EXTRA, ExperimentState, build
    from layerscope.trainer.watch import watch

    solver = {"steps": 20, "device": "cpu"}
    cfg = wire.validate_experiment({"model": {"width": 16}, "solver": solver})
    _, model, opt, device = build(cfg)
    state = {EXPERIMENT_EXTRA: ExperimentState(cfg, device)}

    def checkpoint(folder: str, step: int, extras: dict | None = None) -> Path:
        control = Control(model, opt, checkpoint_dir=tmp_path / folder, extras=extras)
        try:
            return control.checkpoint(step)
        finally:
            control.close()

    ours = checkpoint("ours", 20, state)
    checkpoint("old", 7)  # as built-in runs wrote them before --resume: no experiment in it
    linear = torch.nn.Linear(2, 2)
    with watch(linear, torch.optim.SGD(linear.parameters(), lr=0.1), every=0,
               run_dir=tmp_path / "own") as w:  # fmt: skip
        w.step(loss=0.0)
        assert w.command("checkpoint")["ok"]
    (tmp_path / "corrupt.pt").write_bytes(ours.read_bytes()[:200])  # a torn copy
    (tmp_path / "empty").mkdir()
    (tmp_path / "nan").mkdir()  # a run the NaN rule stopped: its last good state only
    (tmp_path / "nan" / "last-good.pt").write_bytes(ours.read_bytes())
    out = tmp_path / "out"
    cases = {
        "no such file": ["--resume", str(tmp_path / "missing.pt")],
        "no checkpoint-<step>.pt in this folder (the dashboard's Checkpoint writes one into "
        "the run's folder)\n": ["--resume", str(tmp_path / "empty")],
        f"it holds last-good.pt, the last state whose numbers were all finite: --resume "
        f"{tmp_path / 'nan' / 'last-good.pt'} goes on from that": [
            "--resume",
            str(tmp_path / "nan"),
        ],
        "not a checkpoint of a built-in experiment": ["--resume", str(tmp_path / "own")],
        "holds no experiment config": ["--resume", str(tmp_path / "old" / "checkpoint-7.pt")],
        "not a layerscope checkpoint": ["--resume", str(tmp_path / "corrupt.pt")],
        "--resume and --from do not go together": ["--resume", str(ours), "--from", str(ours)],
        # --depth 2 is the checkpoint's own: no conflict
        "not --width 32 (it holds 16), --lr 0.1 (it holds 0.001); only --name, --device, "
        "--epochs, --steps may change": [
            "--resume",
            str(ours),
            "--lr",
            "0.1",
            "--width",
            "32",
            "--depth",
            "2",
            "--steps",
            "40",
        ],  # fmt: skip
        "it is at step 20, the end of this run (solver.steps 20); pass --steps N with N > 20": [
            "--resume",
            str(ours),
        ],  # fmt: skip
    }
    for expected, args in cases.items():
        code = cli.main(["train", *args, "--no-progress", "--run-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (expected, err)
        assert err.count("\n") == 1 and err.startswith("layerscope train: "), err
        assert expected in err, err
        assert not out.exists(), expected


def _offline_spool(
    tmp_path: Path, run_id: str, steps: int, extra: dict[int, dict[str, Any]] | None = None
) -> Path:
    """A run recorded with no server: a metrics frame a step, and ``extra[step]`` after
    that step's (the server harness's path is put on sys.path for the caller too)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
    from layerscope.trainer.link import Link
    from trainer_server import make_hello, metrics

    spool = tmp_path / "spool.bin"
    link = Link(make_hello(run_id), spool_path=spool, server=None)
    link.start()
    for step in range(1, steps + 1):
        link.submit(metrics(step))
        if extra and step in extra:
            link.submit(extra[step])
    link.close()
    return spool


def test_sync_says_which_frames_the_server_holds_only_as_a_refusal_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool holding an event the server refuses for its content (100 KB of data over
    its 64 KiB limit): the server records the refusal in its place and acks past it. The
    CLI said "sent 6 frames; the server now holds all 6" as if the event were stored."""
    monkeypatch.delenv("LAYERSCOPE_TRAINER_TOKEN", raising=False)
    big = {"type": "event", "step": 3, "kind": "log", "data": {"message": "x" * 100_000}}
    spool = _offline_spool(tmp_path, "cli-refused", 5, extra={3: big})
    from server_harness import make_settings, running_server

    with running_server(make_settings(tmp_path / "data")) as server:
        assert cli.main(["sync", str(spool), "--server", str(server), "--timeout", "20"]) == 0
    out = capsys.readouterr().out
    assert (
        "sent 6 frames; the server now holds all 6, 1 of them as a record of its refusal"
        " (seq 4; the spool keeps the frames)"
    ) in out


def test_sync_of_a_damaged_spool_says_what_is_missing_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool whose frame 10 of 20 fails its CRC: every frame it still holds is sent, but
    the server can confirm only 1-9 (acks are the highest contiguous seq) and the run lacks
    frame 10 for good. The CLI said "sent 19 frames; the server now holds all 9" and exit 0
    (README: 0 only when the server acknowledged everything)."""
    monkeypatch.delenv("LAYERSCOPE_TRAINER_TOKEN", raising=False)
    spool = _offline_spool(tmp_path, "cli-damaged", 20)
    from server_harness import exported, make_settings, running_server

    data = bytearray(spool.read_bytes())
    data[data.index(b'"seq":10}') + 3] ^= 0x20  # the record's CRC no longer matches
    spool.write_bytes(bytes(data))
    with running_server(make_settings(tmp_path / "data")) as server:
        assert cli.main(["sync", str(spool), "--server", str(server), "--timeout", "20"]) == 1
        stored = [f["seq"] for f in exported(server, "cli-damaged")]
    assert stored == [*range(1, 10), *range(11, 21)]
    out = capsys.readouterr().out
    assert (
        "in part: sent 19 frames; the server confirmed 9, up to the spool's first damaged"
        " record: 1 frame (seq 10) could not be read from the spool and is missing"
        " from the run; the frames after it were sent, unconfirmed"
    ) in out
    assert "holds all" not in out
