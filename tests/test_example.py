"""examples/train_digits.py, a plain user loop with watch(), runs as a script with no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from layerscope.trainer.spool import read_spool

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


@pytest.mark.slow
def test_example_runs_without_a_server_and_leaves_a_spool(tmp_path: Path) -> None:
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
