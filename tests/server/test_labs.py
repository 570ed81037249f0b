"""The init lab (server/labs.py): one POST launches five real runs of the same network, data
and seed that differ only in their initialisation, grouped under a lab id; bad bodies and a
launch cap too small for five are refused before anything is launched."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from layerscope.server.settings import Settings
from layerscope.trainer import cli
from server_harness import LiveServer, make_settings, running_server

# httpx's default is 5 s; the server shares this process and two cores with five children
# training flat out, so an answer can take longer on a loaded machine.
HTTP_TIMEOUT_S = 30.0

# Small enough that five children start quickly; the server stops them at teardown.
# (The `lab` fixture asks for the same lab through the CLI.)
LAB = {
    "activation": "relu",
    "batch_norm": True,
    "depth": 2,
    "width": 8,
    "steps": 2000,
    "dataset": "blobs",
}


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("labs") / "data", max_launched=6)
    with running_server(settings) as server:
        yield server


@pytest.fixture(scope="module")
def lab(lab_server: LiveServer) -> dict[str, Any]:
    """Launched the way a user does from a terminal: `layerscope lab init ...`."""
    out = io.StringIO()
    argv = ["lab", "init", "--activation", "relu", "--batch-norm", "--depth", "2", "--width", "8"]
    # the trainer's socket URL, as `train` and `sync` take it: lab init reaches the HTTP API
    socket_url = str(lab_server).replace("http://", "ws://") + "/ws/trainer"
    argv += ["--steps", "2000", "--dataset", "blobs", "--server", socket_url]
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    url = out.getvalue().strip().splitlines()[-1].split()[-1]
    lab_id = url.rsplit("/", 1)[-1]
    assert url == f"{lab_server}/labs/{lab_id}"
    got = httpx.get(f"{lab_server}/api/labs/{lab_id}", timeout=HTTP_TIMEOUT_S).json()
    assert all(f"/runs/{r['id']}" in out.getvalue() for r in got["runs"])
    # Every child is still importing torch: a second lab meets the cap of 6. Asked here, not
    # in a later test: a 2000-step run ends seconds after its import, and on a loaded machine
    # the tests before that one took longer (the runs had finished; the second lab was made).
    second = httpx.post(f"{lab_server}/api/labs/init", json=LAB, timeout=HTTP_TIMEOUT_S)
    return {"lab_id": lab_id, "url": got["url"], "runs": got["runs"], "second": second}


def config_of(server: LiveServer, run_id: str) -> dict[str, Any]:
    """The config the launcher gave the run (its run directory's config.json). Not the API's
    copy: that becomes the trainer's hello config once the child connects, so on a slow run
    some of the five would be compared as launched and some as the trainer reports them."""
    return dict(json.loads((server.data_dir / "runs" / run_id / "config.json").read_text()))


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
    assert base["solver"]["seed"] == 0 and base["solver"]["steps"] == 2000
    assert all(lab["lab_id"] in c["name"] for c in configs)


def test_get_lab_lists_its_runs_and_schemes(lab_server: LiveServer, lab: dict[str, Any]) -> None:
    got = httpx.get(f"{lab_server}/api/labs/{lab['lab_id']}", timeout=HTTP_TIMEOUT_S).json()
    assert [(r["id"], r["scheme"]) for r in got["runs"]] == [
        (r["id"], r["scheme"]) for r in lab["runs"]
    ]
    assert all(r["status"] in ("starting", "running", "finished") for r in got["runs"])
    assert got["params"]["activation"] == "relu" and got["params"]["seed"] == 0
    listed = httpx.get(f"{lab_server}/api/labs", timeout=HTTP_TIMEOUT_S).json()
    assert [x["id"] for x in listed] == [lab["lab_id"]]
    assert httpx.get(f"{lab_server}/api/labs/nosuchlab", timeout=HTTP_TIMEOUT_S).status_code == 404
    assert (
        httpx.get(f"{lab_server}/api/labs/..%2F..%2Fetc", timeout=HTTP_TIMEOUT_S).status_code == 404
    )
    page = httpx.get(f"{lab_server}/labs/{lab['lab_id']}", timeout=HTTP_TIMEOUT_S)
    assert page.status_code == 200 and "/static/js/lab.js" in page.text


def test_a_bad_body_is_refused_naming_each_field_and_launches_nothing(
    lab_server: LiveServer, lab: dict[str, Any]
) -> None:
    before = len(httpx.get(f"{lab_server}/api/runs", timeout=HTTP_TIMEOUT_S).json())
    for body, loc in (
        ({"activation": "swish"}, ["model", "activation"]),
        ({"depth": "deep"}, ["depth"]),
        ({"batch_norm": 1}, ["batch_norm"]),
        ({"colour": "red"}, ["colour"]),
        ({"steps": 0}, ["solver", "steps"]),
        ([1, 2], []),
    ):
        response = httpx.post(f"{lab_server}/api/labs/init", json=body, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 422, (body, response.text)
        assert loc in [e["loc"] for e in response.json()["detail"]], response.json()
    assert len(httpx.get(f"{lab_server}/api/runs", timeout=HTTP_TIMEOUT_S).json()) == before
    # While the five lab runs were running, a second lab did not fit under the cap of 6.
    full = lab["second"]
    assert full.status_code == 429 and "lab needs 5" in full.json()["detail"]


def test_a_refusal_quoting_a_huge_value_or_field_is_cut(live_server: LiveServer) -> None:
    # Each 422 was as big as the value or field name it quoted (half a megabyte).
    huge = "x" * 500_000
    for body in ({"activation": huge}, {huge: 1}):
        response = httpx.post(f"{live_server}/api/labs/init", json=body, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 422 and len(response.text) < 5000, len(response.text)
        assert "characters cut" in response.text
    assert httpx.get(f"{live_server}/api/runs", timeout=HTTP_TIMEOUT_S).json() == []


def test_unreadable_text_or_a_huge_lr_is_422_naming_the_field(live_server: LiveServer) -> None:
    """Each was a 500: a lone surrogate ("\\udc80", a name that is not UTF-8) in an unknown
    key was quoted back raw in an answer that could not be encoded; an lr of 10**400
    raised OverflowError in float()."""
    for body, loc, msg in (
        ({"k\udc80": 1}, ["k\\x80"], "the key holds U+DC80, which is not valid UTF-8 text"),
        ({"dataset": "\udce9"}, ["dataset"], "holds U+DCE9, which is not valid UTF-8 text"),
        ({"lr": 10**400}, ["solver", "lr"], "must be a finite number"),
    ):
        response = httpx.post(
            f"{live_server}/api/labs/init",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            timeout=HTTP_TIMEOUT_S,
        )
        assert response.status_code == 422, (loc, response.text)
        (error,) = response.json()["detail"]
        assert error["loc"] == loc and msg in error["msg"], error
    assert httpx.get(f"{live_server}/api/runs", timeout=HTTP_TIMEOUT_S).json() == []


def test_a_cap_below_five_refuses_the_lab_with_a_clear_message(tmp_path: Path) -> None:
    with running_server(make_settings(tmp_path / "data", max_launched=4)) as server:
        response = httpx.post(f"{server}/api/labs/init", json={}, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 429
        assert "--max-launched 5" in response.json()["detail"]
        assert httpx.get(f"{server}/api/runs", timeout=HTTP_TIMEOUT_S).json() == []


def test_the_default_cap_fits_the_lab_beside_a_demo_run() -> None:
    """The README's `layerscope lab init` on a server with default options was refused (4
    launched runs at once, the lab needs 5): the default leaves room for the lab and one more."""
    assert Settings().max_launched >= 6


def test_the_cli_says_when_no_server_is_reachable_or_the_server_refuses(
    lab_server: LiveServer, lab: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["lab", "init", "--server", "http://127.0.0.1:9"]) == 2
    assert "no layerscope server reachable at http://127.0.0.1:9" in capsys.readouterr().err
    assert cli.main(["lab", "init", "--steps", "0", "--server", str(lab_server)]) == 2
    assert "refused (422): solver.steps: must be >= 1" in capsys.readouterr().err
