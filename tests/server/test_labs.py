"""The init lab (server/labs.py): one POST launches five real runs of the same network, data
and seed that differ only in their initialisation, grouped under a lab id; bad bodies and a
launch cap too small for five are refused before anything is launched."""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from layerscope.trainer import cli
from server_harness import LiveServer, make_settings, running_server

# Small enough that five children start quickly; the server stops them at teardown.
# (The `lab` fixture asks for the same lab through the CLI.) The runs must outlive the
# module, which counts on them still running: a 2000-step run of this net ended a few
# seconds after torch was imported, before a loaded machine reached that check. Long runs,
# paused once they train, so five trainers do not load the machine meanwhile.
LAB = {
    "activation": "relu",
    "batch_norm": True,
    "depth": 2,
    "width": 8,
    "steps": 1_000_000,
    "dataset": "blobs",
}


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("labs") / "data", max_launched=6)
    with running_server(settings) as server:
        yield server


@pytest.fixture(scope="module")
def lab(lab_server: LiveServer) -> Iterator[dict[str, Any]]:
    """Launched the way a user does from a terminal: `layerscope lab init ...`."""
    out = io.StringIO()
    argv = ["lab", "init", "--activation", "relu", "--batch-norm", "--depth", "2", "--width", "8"]
    argv += ["--steps", str(LAB["steps"]), "--dataset", "blobs", "--server", str(lab_server)]
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    url = out.getvalue().strip().splitlines()[-1].split()[-1]
    lab_id = url.rsplit("/", 1)[-1]
    assert url == f"{lab_server}/labs/{lab_id}"
    got = httpx.get(f"{lab_server}/api/labs/{lab_id}").json()
    assert all(f"/runs/{r['id']}" in out.getvalue() for r in got["runs"])
    for run in got["runs"]:
        wait_running(lab_server, run["id"])
        paused = httpx.post(
            f"{lab_server}/api/runs/{run['id']}/commands", json={"name": "pause"}, timeout=30
        )
        assert paused.status_code == 202, paused.text
    yield {"lab_id": lab_id, "url": got["url"], "runs": got["runs"]}
    # Stopped through the API, which a paused trainer obeys at once, rather than signalled
    # at the server's shutdown (a SIGTERM grace per child).
    launcher = lab_server.app.state.launcher
    for run in got["runs"]:
        httpx.post(f"{lab_server}/api/runs/{run['id']}/stop", timeout=30)
    deadline = time.monotonic() + 60
    while any(r["id"] not in launcher.exit_codes for r in got["runs"]):
        assert time.monotonic() < deadline, "the lab's runs did not stop"
        time.sleep(0.1)


def wait_running(server: str, run_id: str, timeout_s: float = 180.0) -> None:
    """Until the run's trainer (a child importing torch, slow on a loaded machine) is connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        detail = httpx.get(f"{server}/api/runs/{run_id}", timeout=30).json()
        assert detail["status"] in ("starting", "running"), detail
        if detail["status"] == "running" and detail["trainer_connected"]:
            return
        assert time.monotonic() < deadline, f"run {run_id} never started training"
        time.sleep(0.1)


def config_of(server: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server}/api/runs/{run_id}")
    response.raise_for_status()
    return dict(response.json()["config"])


def test_the_lab_launches_five_runs_that_differ_only_in_init(
    lab_server: LiveServer, lab: dict[str, Any]
) -> None:
    assert lab["url"] == f"/labs/{lab['lab_id']}"
    schemes = [r["scheme"] for r in lab["runs"]]
    assert schemes == ["zero", "small_normal", "large_normal", "xavier", "he"]
    configs = [config_of(lab_server, r["id"]) for r in lab["runs"]]
    assert [(c["model"]["init"], c["model"]["init_std"]) for c in configs] == [
        ("zero", 0.01),
        ("normal", 0.01),
        ("normal", 1.0),
        ("xavier", 0.01),
        ("he", 0.01),
    ]
    stripped = []
    for config in configs:
        rest = copy.deepcopy(config)
        del rest["model"]["init"], rest["model"]["init_std"], rest["name"]
        stripped.append(rest)
    assert all(rest == stripped[0] for rest in stripped)  # same network, data, solver and seed
    base = stripped[0]
    assert base["model"]["activation"] == "relu" and base["model"]["batch_norm"] is True
    assert base["model"]["depth"] == 2 and base["data"]["dataset"] == "blobs"
    assert base["solver"]["seed"] == 0 and base["solver"]["steps"] == LAB["steps"]
    assert all(lab["lab_id"] in c["name"] for c in configs)


def test_get_lab_lists_its_runs_and_schemes(lab_server: LiveServer, lab: dict[str, Any]) -> None:
    got = httpx.get(f"{lab_server}/api/labs/{lab['lab_id']}").json()
    assert [(r["id"], r["scheme"]) for r in got["runs"]] == [
        (r["id"], r["scheme"]) for r in lab["runs"]
    ]
    assert all(r["status"] in ("running", "paused") for r in got["runs"])
    assert got["params"]["activation"] == "relu" and got["params"]["seed"] == 0
    listed = httpx.get(f"{lab_server}/api/labs").json()
    assert [x["id"] for x in listed] == [lab["lab_id"]]
    assert httpx.get(f"{lab_server}/api/labs/nosuchlab").status_code == 404
    assert httpx.get(f"{lab_server}/api/labs/..%2F..%2Fetc").status_code == 404
    page = httpx.get(f"{lab_server}/labs/{lab['lab_id']}")
    assert page.status_code == 200 and "/static/js/lab.js" in page.text


def test_a_bad_body_is_refused_naming_each_field_and_launches_nothing(
    lab_server: LiveServer, lab: dict[str, Any]
) -> None:
    before = len(httpx.get(f"{lab_server}/api/runs").json())
    for body, loc in (
        ({"activation": "swish"}, ["model", "activation"]),
        ({"depth": "deep"}, ["depth"]),
        ({"batch_norm": 1}, ["batch_norm"]),
        ({"colour": "red"}, ["colour"]),
        ({"steps": 0}, ["solver", "steps"]),
        ([1, 2], []),
    ):
        response = httpx.post(f"{lab_server}/api/labs/init", json=body)
        assert response.status_code == 422, (body, response.text)
        assert loc in [e["loc"] for e in response.json()["detail"]], response.json()
    assert len(httpx.get(f"{lab_server}/api/runs").json()) == before
    # The five lab runs are still running (paused): a second lab does not fit under the cap of 6.
    full = httpx.post(f"{lab_server}/api/labs/init", json=LAB)
    assert full.status_code == 429 and "lab needs 5" in full.json()["detail"]


def test_a_cap_below_five_refuses_the_lab_with_a_clear_message(live_server: LiveServer) -> None:
    assert live_server.settings.max_launched < 5
    response = httpx.post(f"{live_server}/api/labs/init", json={})
    assert response.status_code == 429
    assert "--max-launched 5" in response.json()["detail"]
    assert httpx.get(f"{live_server}/api/runs").json() == []


def test_the_cli_says_when_no_server_is_reachable_or_the_server_refuses(
    lab_server: LiveServer, lab: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["lab", "init", "--server", "http://127.0.0.1:9"]) == 2
    assert "no layerscope server reachable at http://127.0.0.1:9" in capsys.readouterr().err
    assert cli.main(["lab", "init", "--steps", "0", "--server", str(lab_server)]) == 2
    assert "refused (422): solver.steps: must be >= 1" in capsys.readouterr().err
