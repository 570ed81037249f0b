"""The `layerscope` command as a user runs it: help and version everywhere, the loopback
guard, and `layerscope demo` serving a dashboard with a live demo run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

LAYERSCOPE = [sys.executable, "-m", "layerscope.server"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAYERSCOPE, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("cmd", [[], ["serve"], ["demo"], ["train"], ["sync"]])
def test_help_and_version_on_every_level(cmd: list[str]) -> None:
    helped = _run(*cmd, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage:" in helped.stdout
    versioned = _run(*cmd, "--version")
    assert versioned.returncode == 0, versioned.stderr
    assert re.search(r"\d+\.\d+\.\d+", versioned.stdout)


def test_non_loopback_bind_without_tokens_is_refused(tmp_path: Path) -> None:
    out = _run("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert "refusing to bind 0.0.0.0" in out.stderr
    assert not any(tmp_path.iterdir()), "nothing may be created when refusing to start"


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


@pytest.mark.slow
def test_demo_prints_a_url_that_serves_a_running_demo_within_10_s(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.Popen(
        [*LAYERSCOPE, "demo", "--port", "0", "--data-dir", str(tmp_path), "--steps", "5000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = None
        assert proc.stdout is not None
        while time.monotonic() - started < 10 and url is None:
            line = proc.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/runs/[0-9a-zA-Z_-]+)", line)
            url = match.group(1) if match else None
        assert url, "demo printed no dashboard URL within 10 s"
        base = url.split("/runs/")[0]
        run_id = url.rsplit("/", 1)[1]
        status, page = _get(url)
        assert status == 200 and "<html" in page.lower()
        _, body = _get(base + "/api/runs")
        runs = json.loads(body)
        assert [r["id"] for r in runs] == [run_id]
        # The demo run is really training: its step advances over HTTP.
        deadline = time.monotonic() + 60
        last_step = 0
        while time.monotonic() < deadline and last_step < 20:
            _, body = _get(f"{base}/api/runs/{run_id}")
            last_step = json.loads(body).get("last_step") or 0
            time.sleep(0.5)
        assert last_step >= 20, f"demo run did not advance (last_step={last_step})"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the demo trainer should be a child process"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()
    assert proc.returncode in (0, -signal.SIGINT, 130), proc.returncode
    # The trainer ends on its own signal handling, after the demo process may have returned:
    # wait for it (a fixed sleep is not enough on a loaded machine), then check none is left.
    psutil.wait_procs(children, timeout=30)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], (
        "Ctrl-C must stop the demo trainer too"
    )
