"""server_process — starts `layerscope serve` in its own process for the benchmarks, so
the server's CPU is separate from the load generator's. Not a benchmark itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """Start on a free port; returns the process and the port it printed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "layerscope.server",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
    if match is None:
        proc.kill()
        raise SystemExit("server did not start")
    return proc, int(match.group(1))
