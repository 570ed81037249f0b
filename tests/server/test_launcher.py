"""Built-in runs launched from the dashboard: real child processes running
``python -m layerscope.trainer train`` against a real server. One server and three launches,
started together so the slow part (each child importing torch) overlaps:

* ``tiny``  — a few steps: starting -> running -> finished, the child reaped;
* ``broken`` — passes validation, fails at run time: failed, with the log tail;
* ``long``  — holds the cap of 3 and is stopped through the API.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from layerscope.server.settings import Settings, SettingsError, local_host
from layerscope.trainer import wire
from server_harness import FakeTrainer, LiveServer, make_settings, running_server

CHILD_TIMEOUT_S = 120.0  # a loaded 2-core machine takes a while to import torch three times
TINY = {
    "name": "tiny",
    "every": 2,
    "model": {"arch": "mlp", "depth": 1, "width": 8},
    "data": {"dataset": "blobs"},
    "solver": {"steps": 20, "eval_every": 10, "batch_size": 32},
}


def wait_for(predicate: Any, timeout: float = CHILD_TIMEOUT_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def status_of(server: str, run_id: str) -> str:
    return str(httpx.get(f"{server}/api/runs/{run_id}").json()["status"])


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, dict[str, Any]]]:
    data = tmp_path_factory.mktemp("launcher")
    garbage = data / "not-an-archive.npz"
    garbage.write_bytes(b"this is not a numpy archive")
    settings = make_settings(data / "data", max_launched=3, data_roots=(data,))
    with running_server(settings) as server:
        launches: dict[str, Any] = {}
        broken = {**TINY, "name": "broken", "data": {"dataset": "npz", "path": str(garbage)}}
        long = {**TINY, "name": "long", "solver": {"steps": 1_000_000}}
        for key, config in (("tiny", TINY), ("broken", broken), ("long", long)):
            response = httpx.post(f"{server}/api/runs", json=config, timeout=30)
            assert response.status_code == 201, response.text
            launches[key] = response.json()
        # Every child is still importing torch: the cap of 3 is reached.
        launches["over_cap"] = httpx.post(f"{server}/api/runs", json=TINY, timeout=30)
        yield server, launches
    assert not psutil.Process().children(), "shutting the server down must end every child"


def test_a_bad_config_is_refused_with_every_bad_field(live_server: LiveServer) -> None:
    bad = {"model": {"arch": "transformer", "depth": 0}, "solver": {"lr": "fast"}}
    response = httpx.post(f"{live_server}/api/runs", json=bad)
    assert response.status_code == 422
    locs = {tuple(e["loc"]) for e in response.json()["detail"]}
    assert {("model", "arch"), ("model", "depth"), ("solver", "lr")} <= locs
    assert all(e["msg"] for e in response.json()["detail"])
    assert httpx.get(f"{live_server}/api/runs").json() == []
    not_json = httpx.post(
        f"{live_server}/api/runs", content=b"steps=10", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422


def test_a_refusal_quoting_a_huge_value_or_field_is_cut(live_server: LiveServer) -> None:
    # Each 422 was as big as the value or field name it quoted (half a megabyte).
    huge = "x" * 500_000
    for body in ({**TINY, "model": {"arch": huge}}, {**TINY, huge: 1}):
        response = httpx.post(f"{live_server}/api/runs", json=body, timeout=30)
        assert response.status_code == 422 and len(response.text) < 5000, len(response.text)
        (error,) = response.json()["detail"]
        assert "characters cut" in error["msg"] + "".join(map(str, error["loc"]))


def test_unreadable_text_huge_numbers_and_no_file_names_are_422_naming_the_field(
    live_server: LiveServer,
) -> None:
    """Each was a 500: a lone surrogate (a name that is not UTF-8, "\\udc80", which
    FastAPI's JSON accepts) in the name or an unknown key failed the answer, and in
    finetune.freeze was launched and stored, after which GET /api/runs failed for every
    run; a float field given an integer past a double (10**400) raised OverflowError; a
    NUL in a path raised in realpath. An empty data.path was "no such file: <cwd>"."""
    surrogate = "which is not valid UTF-8 text"
    big = 10**400
    cases: list[tuple[dict[str, Any], list[Any], str]] = [
        ({"name": "run caf\udce9"}, ["name"], f"holds U+DCE9, {surrogate}"),
        ({"finetune": {"freeze": "net.0\udc80"}}, ["finetune", "freeze"], surrogate),
        (
            {"data": {"dataset": "npz", "path": "/data/caf\udce9.npz"}},
            ["data", "path"],
            surrogate,
        ),
        ({"k\udc80": 1}, ["k\\x80"], f"the key holds U+DC80, {surrogate}"),
        ({"solver": {**TINY["solver"], "lr": big}}, ["solver", "lr"], "must be a finite number"),
        (
            {"model": {"init": "normal", "init_std": big}},
            ["model", "init_std"],
            "must be a finite number",
        ),
        ({"data": {"dataset": "npz", "path": "a\0b.npz"}}, ["data", "path"], "NUL character"),
        ({"finetune": {"from_checkpoint": "/etc/\0x"}}, ["finetune", "from_checkpoint"], "NUL"),
        ({"data": {"dataset": "npz", "path": ""}}, ["data", "path"], "must be a non-empty string"),
    ]
    for section, loc, msg in cases:
        body = json.dumps({**TINY, **section}).encode()  # json writes a lone surrogate escaped
        response = httpx.post(
            f"{live_server}/api/runs",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 422, (section, response.text)
        (error,) = response.json()["detail"]
        assert error["loc"] == loc and msg in error["msg"], (section, error)
    listed = httpx.get(f"{live_server}/api/runs")
    assert listed.status_code == 200 and listed.json() == []


def test_a_launch_answers_201_starting_and_writes_its_config(
    launched: tuple[LiveServer, dict[str, Any]],
) -> None:
    server, launches = launched
    tiny = launches["tiny"]
    assert tiny["status"] == "starting" and tiny["id"].startswith("tiny-")
    run_dir = server.data_dir / "runs" / tiny["id"]
    assert (run_dir / "config.json").is_file()
    detail = httpx.get(f"{server}/api/runs/{tiny['id']}").json()
    assert detail["name"] == "tiny"
    assert detail["config"] == wire.validate_experiment(TINY)


def test_the_launch_cap_is_enforced(launched: tuple[LiveServer, dict[str, Any]]) -> None:
    _, launches = launched
    over = launches["over_cap"]
    assert over.status_code == 429
    assert "limit 3" in over.json()["detail"]


def test_a_launched_run_trains_to_finished_and_its_child_is_reaped(
    launched: tuple[LiveServer, dict[str, Any]],
) -> None:
    server, launches = launched
    run_id = launches["tiny"]["id"]
    wait_for(lambda: status_of(server, run_id) in wire.ENDED_STATUSES, what="the tiny run to end")
    log = (server.data_dir / "runs" / run_id / "trainer.log").read_text()
    assert status_of(server, run_id) == "finished", log
    events = httpx.get(f"{server}/api/runs/{run_id}/events?kind=status").json()
    assert [e["data"]["status"] for e in events] == ["running", "finished"]
    exported = httpx.get(f"{server}/api/runs/{run_id}/export").text
    assert exported.count('"type":"metrics"') >= 1
    launcher = server.app.state.launcher
    wait_for(lambda: run_id in launcher.exit_codes, what="the child to be reaped")
    assert launcher.exit_codes[run_id] == 0


def test_a_child_that_crashes_marks_its_run_failed_with_the_log_tail(
    launched: tuple[LiveServer, dict[str, Any]],
) -> None:
    server, launches = launched
    run_id = launches["broken"]["id"]
    wait_for(lambda: status_of(server, run_id) in wire.ENDED_STATUSES, what="the broken run to end")
    detail = httpx.get(f"{server}/api/runs/{run_id}").json()
    assert detail["status"] == "failed"
    # The child's own error line comes first, where the event log shows it.
    first = detail["status_reason"].splitlines()[0]
    assert first.startswith("trainer exited with code 2: layerscope train: "), first
    assert "not a readable .npz file" in first
    events = httpx.get(f"{server}/api/runs/{run_id}/events?kind=status").json()
    assert [e["data"]["reason"] for e in events if e["data"]["status"] == "failed"] == [
        detail["status_reason"]
    ]


def test_a_child_that_dies_at_once_or_cannot_start_fails_its_run_saying_why(
    tmp_path: Path,
) -> None:
    """A traceback's exception ended 20 lines into the reason; a trainer that could not be
    spawned at all left its run 'starting' for good and the form a bare 500."""
    with running_server(make_settings(tmp_path / "data")) as server:
        launcher = server.app.state.launcher
        crash = "print('loading data'); import sys; sys.stderr.write('warming up\\n'); 1 / 0"
        launcher.command_line = lambda *_: [sys.executable, "-c", crash]
        run_id = httpx.post(f"{server}/api/runs", json=TINY, timeout=30).json()["id"]
        wait_for(lambda: status_of(server, run_id) == "failed", timeout=30, what="the run to fail")
        reason = httpx.get(f"{server}/api/runs/{run_id}").json()["status_reason"]
        head, *tail = reason.splitlines()
        assert head == "trainer exited with code 1: ZeroDivisionError: division by zero"
        assert "Traceback (most recent call last):" in tail and "loading data" in tail

        launcher.command_line = lambda *_: [str(tmp_path / "no-such-python"), "-c", "pass"]
        refused = httpx.post(f"{server}/api/runs", json=TINY, timeout=30)
        assert refused.status_code == 500
        assert "could not start the trainer process" in refused.json()["detail"]
        (run,) = [r for r in httpx.get(f"{server}/api/runs").json() if r["id"] != run_id]
        assert run["status"] == "failed" and run["id"] in refused.json()["detail"]
        detail = httpx.get(f"{server}/api/runs/{run['id']}").json()
        assert "no-such-python" in detail["status_reason"]
        assert launcher.busy() == 0


def test_stop_ends_a_launched_run(launched: tuple[LiveServer, dict[str, Any]]) -> None:
    server, launches = launched
    run_id = launches["long"]["id"]
    wait_for(lambda: status_of(server, run_id) == "running", what="the long run to start")
    response = httpx.post(f"{server}/api/runs/{run_id}/stop")
    assert response.status_code == 202 and response.json() == {"id": run_id, "status": "stopping"}
    wait_for(lambda: status_of(server, run_id) == "stopped", timeout=60, what="the run to stop")
    launcher = server.app.state.launcher
    wait_for(lambda: run_id in launcher.exit_codes, timeout=30, what="the child to exit")
    commands = httpx.get(f"{server}/api/runs/{run_id}/commands").json()
    assert [c["name"] for c in commands] == ["stop"]
    again = httpx.post(f"{server}/api/runs/{run_id}/stop")
    assert again.status_code == 409


def test_stop_of_an_unknown_run_is_404(live_server: LiveServer) -> None:
    assert httpx.post(f"{live_server}/api/runs/nope/stop").status_code == 404


def test_the_cap_holds_for_concurrent_launches_and_a_lab_starts_all_or_none(
    tmp_path: Path,
) -> None:
    """The cap was checked before launch()'s awaits and a child counted only after them:
    four POSTs at once with --max-launched 1 started four trainers, and two labs at once
    each started part of their five runs. The child here sleeps (the race is the server's)."""
    with running_server(make_settings(tmp_path / "data", max_launched=5)) as server:
        launcher = server.app.state.launcher
        launcher.command_line = lambda *_: [sys.executable, "-c", "import time; time.sleep(60)"]

        async def post_all(path: str, bodies: list[Any]) -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                answers = await asyncio.gather(
                    *(client.post(f"{server}{path}", json=b) for b in bodies)
                )
            return [a.status_code for a in answers]

        try:
            lab = {"activation": "tanh"}
            codes = asyncio.run(post_all("/api/labs/init", [lab, lab]))
            assert sorted(codes) == [201, 429] and launcher.busy() == 5
            codes = asyncio.run(post_all("/api/runs", [TINY] * 3))
            assert codes == [429] * 3 and launcher.busy() == 5
            # its trainer never connected (it sleeps) but runs: it ends before the run goes
            some = next(iter(launcher.children))
            process = launcher.children[some].process
            assert httpx.delete(f"{server}/api/runs/{some}", timeout=30).status_code == 204
            assert process.returncode is not None and launcher.busy() == 4
            assert not (server.data_dir / "runs" / some).exists()
        finally:
            for child in list(launcher.children.values()):
                child.process.kill()
        wait_for(lambda: launcher.busy() == 0, timeout=30, what="the children to be reaped")
        codes = asyncio.run(post_all("/api/runs", [TINY] * 3))
        try:
            assert launcher.busy() == 3 and codes == [201] * 3
        finally:
            for child in list(launcher.children.values()):
                child.process.kill()


def test_runs_launched_from_one_config_are_numbered_apart_in_the_runs_list(
    tmp_path: Path,
) -> None:
    """Three launches of the New-run form's preset were listed as three runs of one name
    ('demo: digits mlp tanh xavier'), told apart by nothing. The second is '... #2' in the
    list and in the config its trainer reads (its hello names the run); ids are as before."""
    with running_server(make_settings(tmp_path / "data", max_launched=8)) as server:
        launcher = server.app.state.launcher
        launcher.command_line = lambda *_: [sys.executable, "-c", "pass"]

        async def post_all(bodies: list[Any]) -> list[str]:
            async with httpx.AsyncClient(timeout=30) as client:
                answers = await asyncio.gather(
                    *(client.post(f"{server}/api/runs", json=b) for b in bodies)
                )
            assert [a.status_code for a in answers] == [201] * len(bodies)
            return [a.json()["id"] for a in answers]

        long_name = "n" * wire.MAX_NAME_LEN
        ids = asyncio.run(post_all([TINY]))
        ids += asyncio.run(post_all([TINY, TINY]))  # at once: neither is stored yet
        ids += asyncio.run(post_all([{**TINY, "name": "tiny #2"}]))  # again: after the others
        ids += asyncio.run(post_all([{**TINY, "name": long_name}] * 2))
        ids += asyncio.run(post_all([{**TINY, "name": long_name}]))  # cut to fit, as #2 was
        names = {r["id"]: r["name"] for r in httpx.get(f"{server}/api/runs").json()}
        given = [names[i] for i in ids]
        assert sorted(given[:3]) == ["tiny", "tiny #2", "tiny #3"] and given[3] == "tiny #4"
        assert set(given[4:6]) == {long_name, "n" * (wire.MAX_NAME_LEN - 3) + " #2"}
        assert given[6] == "n" * (wire.MAX_NAME_LEN - 3) + " #3"
        assert all(i.startswith("tiny-") for i in ids[:4])
        for run_id in ids:
            config = json.loads((server.data_dir / "runs" / run_id / "config.json").read_text())
            assert config["name"] == names[run_id]


def test_a_launched_trainer_that_exits_cleanly_without_connecting_ends_the_run_lost(
    tmp_path: Path,
) -> None:
    """A clean exit with no final status (it never reached the server) left the run
    'starting' for good: nothing else ends a run that never connected."""
    with running_server(make_settings(tmp_path / "data")) as server:
        launcher = server.app.state.launcher
        launcher.command_line = lambda *_: [sys.executable, "-c", "pass"]
        run_id = httpx.post(f"{server}/api/runs", json=TINY, timeout=30).json()["id"]
        wait_for(lambda: status_of(server, run_id) == "lost", timeout=30, what="the run to end")
        detail = httpx.get(f"{server}/api/runs/{run_id}").json()
        assert "without reporting" in detail["status_reason"]


def test_deleting_a_launched_run_removes_its_folder(
    launched: tuple[LiveServer, dict[str, Any]],
) -> None:
    """The run folder (config, spool of every frame, checkpoints, trainer log) stayed on
    disk after DELETE. (A launched trainer still running ends first: the cap test.)"""
    server, launches = launched
    run_id = launches["tiny"]["id"]
    wait_for(lambda: status_of(server, run_id) in wire.ENDED_STATUSES, what="the tiny run to end")
    launcher = server.app.state.launcher
    wait_for(lambda: run_id in launcher.exit_codes, what="the child to be reaped")
    folder = server.data_dir / "runs" / run_id
    assert (folder / "spool.bin").is_file()
    assert httpx.delete(f"{server}/api/runs/{run_id}").status_code == 204
    assert not folder.exists()
    assert (server.data_dir / "runs").is_dir()  # the other runs' folders stay


def test_a_launch_from_a_relative_data_dir_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default data dir is relative (layerscope-data); the trainer runs in its run's
    folder, so the relative --config and --run-dir it was given named nothing there: the
    README's first command printed a dashboard URL for a demo run that had already failed."""
    monkeypatch.chdir(tmp_path)
    with running_server(make_settings(Path("layerscope-data"))) as server:
        run_id = httpx.post(f"{server}/api/runs", json=TINY, timeout=30).json()["id"]
        wait_for(lambda: status_of(server, run_id) in wire.ENDED_STATUSES, what="the run to end")
        detail = httpx.get(f"{server}/api/runs/{run_id}").json()
        assert detail["status"] == "finished", detail["status_reason"]
        assert (tmp_path / "layerscope-data" / "runs" / run_id / "spool.bin").is_file()


def _can_bind(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.2", "::1"])
def test_a_launched_run_reaches_a_server_bound_to_another_address(
    tmp_path: Path, host: str
) -> None:
    """Launched trainers were always sent to ws://127.0.0.1:PORT: bound to ::1 (or to one
    LAN address; 127.0.0.2 stands in for one here) the server never heard from its own
    launches, and the New-run form, the lab and the demo made runs that ended 'lost'."""
    if not _can_bind(host):
        pytest.skip(f"this machine cannot bind {host}")
    with running_server(make_settings(tmp_path / "data", host=host)) as server:
        assert host in server  # the harness reaches it there, not at 127.0.0.1
        run_id = httpx.post(f"{server}/api/runs", json=TINY, timeout=30).json()["id"]
        wait_for(lambda: status_of(server, run_id) in wire.ENDED_STATUSES, what="the run to end")
        detail = httpx.get(f"{server}/api/runs/{run_id}").json()
        log = (server.data_dir / "runs" / run_id / "trainer.log").read_text()
        assert detail["status"] == "finished", (detail["status_reason"], log)
        assert detail["last_step"] == 20


def test_the_trainer_url_names_an_address_the_server_listens_on() -> None:
    assert local_host("0.0.0.0") == "127.0.0.1"  # a wildcard: this machine's loopback
    assert local_host("::") == ("127.0.0.1" if socket.has_dualstack_ipv6() else "[::1]")
    assert local_host("::1") == "[::1]"
    assert local_host("192.0.2.7") == "192.0.2.7"
    assert local_host("fd00::7") == "[fd00::7]"


def test_a_launch_may_name_files_only_inside_the_data_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The New-run form read any path on the server's machine: data.path /etc/shadow was
    refused 'no such file' or launched (an oracle for what exists), and a folder's file
    names came back in the failed run's log tail. Only the data roots (default: the
    server's working directory) and the launched runs' folders are open to it now."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.npz"
    secret.write_bytes(b"private")
    inside = allowed / "sub" / "data.npz"
    inside.write_bytes(b"ours")
    (allowed / "escape.npz").symlink_to(secret)
    monkeypatch.chdir(allowed)  # the default root
    with running_server(make_settings(tmp_path / "data")) as server:
        server.app.state.launcher.command_line = lambda *_: [sys.executable, "-c", "pass"]

        def launch(**sections: Any) -> httpx.Response:
            return httpx.post(f"{server}/api/runs", json={**TINY, **sections}, timeout=30)

        paths = [str(secret), str(outside / "missing.npz"), "escape.npz", "../outside/secret.npz"]
        answers = [launch(data={"dataset": "npz", "path": p}) for p in [*paths, "/etc/passwd"]]
        assert [a.status_code for a in answers] == [422] * 5
        # One answer whether or not the file exists, and nothing of the file's name.
        assert len({json.dumps(a.json()["detail"]) for a in answers}) == 1
        [error] = answers[0].json()["detail"]
        assert error["loc"] == ["data", "path"]
        assert error["msg"].startswith(f"data.path must be inside {os.path.realpath(allowed)}")
        assert "start the server with --data-root DIR" in error["msg"]
        assert "secret" not in answers[0].text
        folder = launch(data={"dataset": "folder", "path": str(outside)})
        assert folder.status_code == 422
        checkpoint = launch(finetune={"from_checkpoint": str(secret)})
        assert checkpoint.status_code == 422
        assert [e["loc"] for e in checkpoint.json()["detail"]] == [["finetune", "from_checkpoint"]]
        both = launch(data={"dataset": "npz", "path": str(secret)}, solver={"lr": "fast"})
        assert {tuple(e["loc"]) for e in both.json()["detail"]} == {
            ("data", "path"),
            ("solver", "lr"),
        }
        assert httpx.get(f"{server}/api/runs").json() == []

        # Inside: a relative path is read against the server's working directory, as
        # before, and the child is given the resolved path that was checked.
        ok = launch(data={"dataset": "npz", "path": "sub/data.npz"})
        assert ok.status_code == 201, ok.text
        config = httpx.get(f"{server}/api/runs/{ok.json()['id']}").json()["config"]
        assert config["data"]["path"] == os.path.realpath(inside)
        # A checkpoint a launched run wrote (its folder is under the data dir) may be
        # fine-tuned from.
        written = server.data_dir / "runs" / ok.json()["id"] / "checkpoint-5.pt"
        written.write_bytes(b"weights")
        assert launch(finetune={"from_checkpoint": str(written)}).status_code == 201


def test_data_roots_come_from_flags_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env().data_roots == (Path(os.path.realpath(tmp_path)),)
    monkeypatch.setenv("LAYERSCOPE_DATA_ROOTS", f"{one}{os.pathsep}{two}")
    assert Settings.from_env().data_roots == tuple(Path(os.path.realpath(p)) for p in (one, two))
    assert Settings.from_env(data_roots=("two",)).data_roots == (Path(os.path.realpath(two)),)
    with pytest.raises(SettingsError, match="--data-root nowhere: no such directory"):
        Settings.from_env(data_roots=("nowhere",))


def test_stop_before_the_trainer_connects_is_stored_logged_and_delivered(tmp_path: Path) -> None:
    """Stop pressed while a launched trainer was still starting answered 202 but stored no
    command and logged no event: the trainer connected, never heard of it, and trained on
    until the grace's SIGTERM. Now it is stored, logged with its origin and delivered in
    the welcome; a trainer that never connects still ends after the grace."""
    with running_server(make_settings(tmp_path / "data")) as server:
        launcher = server.app.state.launcher
        launcher.stop_grace_s = 3.0
        launcher.command_line = lambda *_: [sys.executable, "-c", "import time; time.sleep(60)"]
        run_id = httpx.post(f"{server}/api/runs", json=TINY, timeout=30).json()["id"]
        response = httpx.post(f"{server}/api/runs/{run_id}/stop")
        assert response.status_code == 202 and response.json()["status"] == "stopping"
        [command] = httpx.get(f"{server}/api/runs/{run_id}/commands").json()
        assert (command["name"], command["source"], command["status"]) == ("stop", "api", "pending")
        assert command["origin"].startswith("api 127.0.0.1:")
        events = httpx.get(f"{server}/api/runs/{run_id}/events?kind=command").json()
        assert [e["data"]["name"] for e in events] == ["stop"]

        async def connect_late() -> list[dict[str, Any]]:
            trainer = await FakeTrainer.connect(server, run_id)
            await trainer.wait_for(lambda m: m["type"] == "command")
            await trainer.close()
            return trainer.commands

        delivered = asyncio.run(connect_late())
        assert [(c["name"], c["cmd_seq"]) for c in delivered] == [("stop", command["cmd_seq"])]
        # The child (it sleeps, as a trainer that never got there would) ends after the grace.
        wait_for(lambda: run_id in launcher.exit_codes, timeout=30, what="the child to be ended")
        assert launcher.exit_codes[run_id] == -signal.SIGTERM
        # the reaper stores the status just after it records the exit code: wait for it
        # (read at once, a clean clone's run found 'running' in between)
        wait_for(lambda: status_of(server, run_id) == "stopped", timeout=10, what="'stopped'")


def test_a_launched_trainer_gets_the_trainer_token_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launched trainer inherited LAYERSCOPE_TOKEN, the viewer token, from a server
    configured through its environment: a child that needs only the trainer socket could
    act as a browser."""
    monkeypatch.setenv("LAYERSCOPE_TOKEN", "viewer-secret-0123456789")
    monkeypatch.setenv("LAYERSCOPE_TRAINER_TOKEN", "trainer-secret-0123456789")
    settings = make_settings(
        tmp_path / "data",
        viewer_token="viewer-secret-0123456789",
        trainer_token="trainer-secret-0123456789",
    )
    # ours only: a machine's own variables (TIKTOKEN_CACHE_DIR on the GPU image) are not
    show = (
        "import json, os; print(json.dumps({k: v for k, v in os.environ.items()"
        " if k.startswith('LAYERSCOPE_') and 'TOKEN' in k}))"
    )
    with running_server(settings) as server:
        launcher = server.app.state.launcher
        launcher.command_line = lambda *_: [sys.executable, "-c", show]
        auth = {"Authorization": "Bearer viewer-secret-0123456789"}
        run_id = httpx.post(f"{server}/api/runs", json=TINY, headers=auth, timeout=30).json()["id"]
        wait_for(lambda: run_id in launcher.exit_codes, timeout=30, what="the child to exit")
        log = (server.data_dir / "runs" / run_id / "trainer.log").read_text()
    assert json.loads(log) == {"LAYERSCOPE_TRAINER_TOKEN": "trainer-secret-0123456789"}


# A child that takes its time over SIGTERM, as a trainer waiting for its last acks does.
SLOW_TO_STOP = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: None); "
    "print('ready', flush=True); time.sleep(60)"
)


def test_a_server_shutting_down_stops_its_children_first_and_launches_no_more(
    tmp_path: Path,
) -> None:
    """Shutdown stops the launched children while the server still answers (their sockets
    open, so a trainer's last frames are stored; test_cli checks that with a real trainer),
    and a launch asked for meanwhile is refused with 503, not started after the children
    were counted."""
    with running_server(make_settings(tmp_path / "data")) as server:
        launcher = server.app.state.launcher
        launcher.term_grace_s = 3.0
        launcher.command_line = lambda *_: [sys.executable, "-c", SLOW_TO_STOP]
        run_id = httpx.post(f"{server}/api/runs", json=TINY, timeout=30).json()["id"]
        log = server.data_dir / "runs" / run_id / "trainer.log"
        wait_for(lambda: log.exists() and "ready" in log.read_text(), timeout=30, what="child")
        server.server.should_exit = True
        wait_for(lambda: launcher.closing, timeout=10, what="the shutdown to begin")
        late = httpx.post(f"{server}/api/runs", json=TINY, timeout=30)
        assert late.status_code == 503 and "shutting down" in late.json()["detail"]
        wait_for(lambda: run_id in launcher.exit_codes, timeout=30, what="the child to end")
        assert launcher.exit_codes[run_id] == -signal.SIGKILL
    runs = [p.name for p in (tmp_path / "data" / "runs").iterdir()]
    assert runs == [run_id]
