"""examples/train_digits.py, a plain user loop with watch(), runs as a script with no server."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from layerscope.trainer.spool import read_spool

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


@pytest.mark.slow
def test_example_runs_without_a_server_and_leaves_a_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LAYERSCOPE_SERVER"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "120", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "done after 120 steps" in out.stdout
    spool = tmp_path / "run" / "spool.bin"
    assert spool.is_file()
    frames = [json.loads(text) for text in read_spool(spool)]
    kinds = {f["type"] for f in frames}
    assert {"hello", "metrics", "probe"} <= kinds
    rows = [row for f in frames if f["type"] == "metrics" for row in f["rows"]]
    series = {name for row in rows for name in row["values"]}
    assert {"loss", "val_loss", "val_acc", "lr"} <= series
    lrs = {row["values"]["lr"] for row in rows if "lr" in row["values"]}
    assert lrs == {0.1}, "the user's LambdaLR has not decayed yet at step 120"

    # it ends with a checkpoint, from which --resume goes on (here in this process: one
    # interpreter start less), its steps numbered on from the checkpoint's
    checkpoint = tmp_path / "run" / "checkpoint-120.pt"
    assert checkpoint.is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--steps", "130", "--resume",
                                      str(checkpoint), "--run-dir", str(tmp_path / "again")])  # fmt: skip
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    frames = [json.loads(text) for text in read_spool(tmp_path / "again" / "spool.bin")]
    assert frames[0]["config"]["resumed_from"]["step"] == 120
    rows = [row for f in frames if f["type"] == "metrics" for row in f["rows"]]
    assert [row["step"] for row in rows if "loss" in row["values"]] == list(range(121, 131))
    assert (tmp_path / "again" / "checkpoint-130.pt").is_file()
