"""api: the read routes over a real Store on a real SQLite file, through a tiny app built
inline (api.router + app.state.store + a hub that knows which runs have a trainer)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from layerscope.server import api
from layerscope.server.store import Store
from layerscope.trainer import wire
from pydantic import TypeAdapter
from server_harness import FakeTrainer, LiveServer, make_settings, metrics_frame, running_server

pytestmark = pytest.mark.anyio


class ConnectedRuns:
    """The hub methods the routes use, over a plain set of run ids."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def is_connected(self, run_id: str) -> bool:
        return run_id in self.ids

    def is_attached(self, run_id: str) -> bool:
        return run_id in self.ids

    def is_uploading(self, run_id: str) -> bool:
        return False

    def forget_run(self, run_id: str) -> None:
        self.ids.discard(run_id)


async def populate(data_dir: Path) -> None:
    store = Store(data_dir, commit_interval_s=0.005)
    await store.open()
    await store.hello(
        wire.validate_hello(
            {
                "run_id": "r1",
                "name": "first",
                "config": {"lr": 0.1},
                "layers": [
                    {"name": "fc1", "kind": "Linear", "units": 8},
                    {"name": "act", "kind": "ReLU"},
                ],
            }
        )
    )
    loss = [2.0 - s / 1000 for s in range(3000)]
    loss[1234] = float("nan")
    loss[2222] = 50.0
    rows = [
        {"step": s, "time_s": s * 0.1, "values": {"loss": loss[s], "lr": 0.1}} for s in range(3000)
    ]
    probes = [
        wire.validate_probe(
            {
                "seq": 2 + i,
                "step": step,
                "layers": [
                    {
                        "name": "fc1",
                        "mean": 0.1,
                        "dead_ratio": 0.0,
                        "hist": {"lo": -1.0, "hi": 1.0, "counts": [1, 3]},
                    },
                    {
                        "name": "act",
                        "mean": 0.2,
                        "dead_ratio": step / 3000,
                        "hist": {"lo": 0.0, "hi": 2.0, "counts": [4, 0]},
                    },
                ],
            }
        )
        for i, step in enumerate(range(0, 3000, 100))
    ]
    await store.append("r1", [wire.validate_metrics({"seq": 1, "rows": rows}), *probes])
    await store.append(
        "r1",
        [
            wire.validate_event(
                {"seq": 32, "step": 2999, "kind": "alert", "data": {"message": "act is dying"}}
            )
        ],
    )
    await store.add_command(
        "r1", wire.validate_command({"id": "c1", "name": "pause"}), origin="api"
    )
    await store.close()


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stored run, written once per module; each test works on its own copy."""
    data_dir = tmp_path_factory.mktemp("api") / "data"
    asyncio.run(populate(data_dir))
    return data_dir


@pytest.fixture
async def setup(
    populated: Path, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Store, ConnectedRuns]]:
    shutil.copytree(populated, tmp_path / "data")
    store = Store(tmp_path / "data", commit_interval_s=0.005)
    await store.open()
    hub = ConnectedRuns()
    app = FastAPI()
    app.include_router(api.router)
    app.state.store = store
    app.state.hub = hub
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, store, hub
    await store.close()


def strict(text: str) -> Any:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def check(model: Any, body: Any) -> None:
    """The body matches the route's documented response model."""
    TypeAdapter(model).validate_python(body)


async def test_run_list_and_detail(setup: tuple[httpx.AsyncClient, Store, ConnectedRuns]) -> None:
    client, _store, hub = setup
    hub.ids.add("r1")
    r = await client.get("/api/runs")
    assert r.status_code == 200
    (run,) = strict(r.text)
    check(list[api.RunSummary], [run])
    assert (run["id"], run["name"], run["status"], run["trainer_connected"]) == (
        "r1",
        "first",
        "running",
        True,
    )
    assert run["last_step"] == 2999 and run["last"]["loss"] == pytest.approx(2.0 - 2.999)
    assert 0 < len(run["sparkline"]) <= 50
    # the list's sparkline is for a 120-pixel line: 4 significant digits keep its bytes down
    assert all(v is None or v == float(f"{v:.4g}") for v in run["sparkline"])
    assert any(v is not None and v != round(v, 1) for v in run["sparkline"])
    r = await client.get("/api/runs/r1")
    detail = strict(r.text)
    check(api.RunDetail, detail)
    assert detail["layers"] == [
        {"name": "fc1", "kind": "Linear", "units": 8},
        {"name": "act", "kind": "ReLU", "units": None},
    ]
    assert detail["series_names"] == ["loss", "lr"] and detail["first_step"] == 0
    # the trainer's own clock (its rows' time_s), which sets the replay's x1 pace: for a run
    # uploaded by sync, created_at and updated_at time the upload, not the training
    assert detail["clock"] == {
        "first_step": 0,
        "first_time_s": 0.0,
        "last_step": 2999,
        "last_time_s": pytest.approx(299.9),
    }
    hub.ids.clear()
    assert (await client.get("/api/runs/r1")).json()["trainer_connected"] is False


async def test_a_run_whose_rows_carry_no_time_has_no_clock(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    client, store, _hub = setup
    await store.hello(wire.validate_hello({"run_id": "untimed", "layers": []}))
    rows = [{"step": s, "values": {"acc": 0.5}} for s in range(5, 10)]
    await store.append("untimed", [wire.validate_metrics({"seq": 1, "rows": rows})])
    detail = (await client.get("/api/runs/untimed")).json()
    check(api.RunDetail, detail)
    assert detail["last_step"] == 9 and detail["clock"] is None


async def test_the_run_list_pages_and_carries_the_config_the_runs_page_shows(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    """Reviewer's /tmp/revE/t10_many_runs.py and t10b_poll_cost.py: with 2,000 runs the list
    the runs page polls every 2 s was 2 MB and took ~50 ms of server CPU, limit and offset
    were silently ignored, and each row carried the whole config. Now it pages (validated;
    X-Total-Count says how many runs there are) and carries what the page shows of each
    config (its key fields, or a watch() run's first few values, and overfit) unless full."""
    client, store, _hub = setup
    built_in = {
        "name": "mlp",
        "model": {"arch": "mlp", "depth": 4, "width": 64, "activation": "relu", "init": "he"},
        "data": {"dataset": "digits", "path": None, "val_fraction": 0.2},
        "solver": {"optimizer": "sgd", "lr": 0.1, "batch_size": 32, "steps": 500},
        "overfit": {"batches": 1},
        "rules": {"enabled": ["DeadUnits"], "silenced": []},
    }
    watched = {
        "lr": 0.01,
        "groups": [0.1],
        "note": None,
        "a": 1,
        "b": 2,
        "c": 3,
        "d": 4,
        "e": 5,
        "f": 6,
    }
    for i, config in enumerate([built_in, watched, {"lr": 0.5}]):
        await store.create_run(f"n{i}", f"new {i}", config)
    r = await client.get("/api/runs")
    assert r.status_code == 200 and r.headers["x-total-count"] == "4"
    listed = strict(r.text)
    check(list[api.RunSummary], listed)
    assert [run["id"] for run in listed] == ["n2", "n1", "n0", "r1"]
    assert [run["config"] for run in listed] == [
        {"lr": 0.5},
        {"lr": 0.01, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5},  # its first six plain values
        {
            "model": {"arch": "mlp", "depth": 4, "width": 64, "activation": "relu", "init": "he"},
            "data": {"dataset": "digits"},
            "solver": {"optimizer": "sgd", "lr": 0.1, "batch_size": 32},
            "overfit": {"batches": 1},
        },
        {"lr": 0.1},
    ]
    full = strict((await client.get("/api/runs?full=true")).text)
    assert [run["config"] for run in full] == [{"lr": 0.5}, watched, built_in, {"lr": 0.1}]
    page = await client.get("/api/runs?limit=2&offset=1")
    assert [run["id"] for run in page.json()] == ["n1", "n0"]
    assert page.headers["x-total-count"] == "4"
    assert (await client.get("/api/runs?offset=3")).json()[0]["id"] == "r1"
    assert (await client.get("/api/runs?offset=4")).json() == []
    for query, where in (
        ("limit=0", "limit"),
        (f"limit={api.MAX_RUNS_PAGE + 1}", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("full=maybe", "full"),
    ):
        r = await client.get(f"/api/runs?{query}")
        assert r.status_code == 422, query
        (problem,) = r.json()["detail"]
        assert problem["loc"] == ["query", where] and problem["msg"]
    # a normal init's std is shown beside it (runs differing only by it looked alike); every
    # built-in config holds init_std, which the other inits ignore: not shown there
    for init, shown in (("normal", {"init": "normal", "init_std": 0.01}), ("he", {"init": "he"})):
        config = {**built_in, "model": {"arch": "mlp", "init": init, "init_std": 0.01}}
        await store.create_run(f"std-{init}", "std", config)
        (run,) = [r for r in (await client.get("/api/runs")).json() if r["id"] == f"std-{init}"]
        assert run["config"]["model"] == {"arch": "mlp", **shown}


async def test_unknown_run_is_404_everywhere(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    client, _store, _hub = setup
    for path in (
        "",
        "/series",
        "/probes?layer=fc1",
        "/probes/matrix",
        "/histograms?layer=fc1",
        "/histogram?step=1",
        "/probe_steps",
        "/events",
        "/commands",
        "/export",
    ):
        r = await client.get(f"/api/runs/ghost{path}")
        assert r.status_code == 404, path
        assert r.json() == {"detail": "run 'ghost' not found"}
    r = await client.delete("/api/runs/ghost")
    assert r.status_code == 404 and r.json() == {"detail": "run 'ghost' not found"}


async def test_series_are_downsampled_with_nan_as_null(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    client, _store, _hub = setup
    r = await client.get("/api/runs/r1/series", params={"names": "loss,lr", "max_points": 100})
    body = strict(r.text)
    check(dict[str, api.Series], body)
    loss = body["loss"]
    assert len(loss["steps"]) <= 100 and loss["steps"][0] == 0 and loss["steps"][-1] == 2999
    assert 2222 in loss["steps"] and 50.0 in loss["values"]
    full = strict((await client.get("/api/runs/r1/series?names=loss&start=1230&end=1240")).text)
    assert full["loss"]["steps"] == list(range(1230, 1241))
    assert full["loss"]["values"][4] is None  # step 1234 was NaN
    everything = strict((await client.get("/api/runs/r1/series")).text)
    assert set(everything) == {"loss", "lr"} and len(everything["lr"]["steps"]) <= 1500


async def test_probe_routes(setup: tuple[httpx.AsyncClient, Store, ConnectedRuns]) -> None:
    client, _store, _hub = setup
    r = await client.get("/api/runs/r1/probes", params={"layer": "act", "stats": "dead_ratio,mean"})
    body = strict(r.text)
    check(api.ProbeSeries, body)
    assert body["steps"] == list(range(0, 3000, 100))
    assert body["dead_ratio"][-1] == pytest.approx(2900 / 3000) and body["mean"] == [0.2] * 30

    matrix = strict(
        (await client.get("/api/runs/r1/probes/matrix?stat=dead_ratio&max_steps=4")).text
    )
    check(api.Matrix, matrix)
    assert matrix["layers"] == ["fc1", "act"] and matrix["steps"] == [0, 1000, 1900, 2900]
    assert matrix["z"][0] == [0.0] * 4 and matrix["z"][1][1] == pytest.approx(1000 / 3000)

    hists = strict((await client.get("/api/runs/r1/histograms?layer=fc1&bins=4&max_steps=3")).text)
    check(api.HistogramsOverTime, hists)
    assert hists["steps"] == [0, 1400, 2900] and hists["edges"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert hists["z"] == [[0.5, 0.5, 1.5, 1.5]] * 3

    at = strict((await client.get("/api/runs/r1/histogram?step=150")).text)
    check(api.HistogramAt, at)
    assert at["step"] == 100 and [x["name"] for x in at["layers"]] == ["fc1", "act"]
    assert at["layers"][1]["counts"] == [4, 0] and at["layers"][1]["dead_ratio"] == pytest.approx(
        100 / 3000
    )

    steps = strict((await client.get("/api/runs/r1/probe_steps")).text)
    assert steps == {"steps": list(range(0, 3000, 100))}
    nothing = strict((await client.get("/api/runs/r1/probes?layer=nope&stats=std")).text)
    assert nothing == {"layer": "nope", "steps": [], "std": []}


async def test_events_and_commands(setup: tuple[httpx.AsyncClient, Store, ConnectedRuns]) -> None:
    client, _store, _hub = setup
    events = strict((await client.get("/api/runs/r1/events")).text)
    check(list[api.Event], events)
    assert [e["kind"] for e in events] == ["alert", "command"]
    assert strict((await client.get("/api/runs/r1/events?kind=alert")).text)[0]["data"] == {
        "message": "act is dying"
    }
    assert [e["kind"] for e in strict((await client.get("/api/runs/r1/events?limit=1")).text)] == [
        "command"
    ]
    commands = strict((await client.get("/api/runs/r1/commands")).text)
    check(list[api.Command], commands)
    assert [(c["id"], c["cmd_seq"], c["status"]) for c in commands] == [("c1", 1, "pending")]


@pytest.mark.parametrize(
    ("query", "where"),
    [
        ("/series?max_points=1", "max_points"),
        ("/series?max_points=20001", "max_points"),
        ("/series?start=10&end=5", "start"),
        ("/series?start=-1", "start"),
        ("/probes?layer=fc1&stats=mean,bogus", "stats"),
        ("/probes?stats=mean", "layer"),
        ("/probes/matrix?stat=bogus", "stat"),
        ("/probes/matrix?max_steps=0", "max_steps"),
        ("/probes/matrix?max_steps=2001", "max_steps"),
        ("/histograms?layer=fc1&bins=0", "bins"),
        ("/histograms?layer=fc1&bins=1025", "bins"),
        ("/histogram", "step"),
        ("/histogram?step=abc", "step"),
        ("/events?limit=0", "limit"),
        # past SQLite's 64-bit integers: an OverflowError (500) before the bound
        ("/series?end=9223372036854775808", "end"),
        ("/histogram?step=9223372036854775808", "step"),
        ("/histograms?layer=fc1&end=9223372036854775808", "end"),
        ("/probes/matrix?start=9223372036854775808", "start"),
        # each was answered as if it were not there: every series, every event, or none
        ("/series?name=loss", "name"),
        ("?lmit=1", "lmit"),
        ("/events?kind=alerts", "kind"),
        # a name no series can have, or more names than a run holds: each got an empty series
        ("/series?names=" + "x" * (wire.MAX_NAME_LEN + 1), "names"),
        ("/series?names=" + ",".join(f"s{i}" for i in range(wire.MAX_SERIES + 1)), "names"),
    ],
)
async def test_bad_query_parameters_are_422_naming_the_parameter(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns], query: str, where: str
) -> None:
    client, _store, _hub = setup
    r = await client.get(f"/api/runs/r1{query}")
    assert r.status_code == 422
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["query", where] and problem["msg"]


async def test_the_viewer_token_and_every_kind_stored_are_taken(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    client, _store, _hub = setup
    assert (await client.get("/api/runs?token=t&limit=1")).status_code == 200
    for kind in sorted(api.EVENT_KINDS):
        assert (await client.get(f"/api/runs/r1/events?kind={kind}")).status_code == 200, kind
    r = await client.get("/api/runs?limt=5")
    assert r.status_code == 422 and "takes full, limit, offset, q" in r.json()["detail"][0]["msg"]


async def test_export_streams_strict_json_lines(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    client, store, _hub = setup
    r = await client.get("/api/runs/r1/export")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    header, *frames = [strict(line) for line in r.text.splitlines()]
    assert (
        header["type"] == "hello" and header["run_id"] == "r1" and header["run"]["name"] == "first"
    )
    assert [f["seq"] for f in frames] == list(range(1, 33))
    assert frames[0]["rows"][1234]["values"]["loss"] is None
    assert frames == [{"v": 1, **f} for f in store.frames_after("r1", 0)]


async def test_delete_refuses_a_connected_run_then_deletes(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    client, store, hub = setup
    hub.ids.add("r1")
    r = await client.delete("/api/runs/r1")
    assert r.status_code == 409 and "stop it first" in r.json()["detail"]
    assert store.run("r1") is not None
    hub.ids.clear()
    r = await client.delete("/api/runs/r1")
    assert r.status_code == 204 and r.content == b""
    assert (await client.get("/api/runs/r1")).status_code == 404
    assert (await client.get("/api/runs")).json() == []


async def test_delete_waits_for_a_runs_upload_by_sync(live_server: LiveServer) -> None:
    """A run that `layerscope sync` is uploading (its hello says upload) is not deleted
    midway: its connection applies no commands, but its next reconnect would recreate
    the run from the rest of the spool."""
    upload = await FakeTrainer.connect(live_server, "up1", upload=True)
    try:
        await upload.send(metrics_frame(1, 1, loss=1.0))
        await upload.wait_acked(1)
        async with httpx.AsyncClient(base_url=live_server) as client:
            r = await client.delete("/api/runs/up1")
            assert r.status_code == 409 and "uploaded by layerscope sync" in r.json()["detail"]
            assert (await client.get("/api/runs/up1")).status_code == 200
    finally:
        await upload.close()
    async with httpx.AsyncClient(base_url=live_server) as client:
        deadline = asyncio.get_running_loop().time() + 15
        while (r := await client.delete("/api/runs/up1")).status_code == 409:
            assert asyncio.get_running_loop().time() < deadline, r.text
            await asyncio.sleep(0.05)
        assert r.status_code == 204


async def test_delete_of_a_run_whose_id_no_folder_can_have_is_204(live_server: LiveServer) -> None:
    """200 Cyrillic letters are within the 256-character limit but 400 bytes, past the
    filesystem's 255 for a name: looking for the run's folder raised, and the DELETE that
    had already removed the run answered 500."""
    long_id = "ю" * 200
    (live_server.data_dir / "runs" / "other").mkdir(parents=True)  # data_dir/runs exists
    for run_id in (long_id, "other"):
        trainer = await FakeTrainer.connect(live_server, run_id)
        await trainer.send(metrics_frame(1, 1, loss=1.0))
        await trainer.wait_acked(1)
        await trainer.close()
    async with httpx.AsyncClient(base_url=live_server) as client:
        deadline = asyncio.get_running_loop().time() + 15
        while (r := await client.delete(f"/api/runs/{long_id}")).status_code == 409:
            assert asyncio.get_running_loop().time() < deadline, r.text
            await asyncio.sleep(0.05)
        assert r.status_code == 204, r.text
        assert (await client.get(f"/api/runs/{long_id}")).status_code == 404
        assert (await client.get("/api/runs/other/series")).json()["loss"]["values"] == [1.0]
    assert (live_server.data_dir / "runs" / "other").is_dir()


async def test_openapi_documents_every_route(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    client, _store, _hub = setup
    schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/series",
        "/api/runs/{run_id}/probes",
        "/api/runs/{run_id}/probes/matrix",
        "/api/runs/{run_id}/histograms",
        "/api/runs/{run_id}/histogram",
        "/api/runs/{run_id}/probe_steps",
        "/api/runs/{run_id}/events",
        "/api/runs/{run_id}/commands",
        "/api/runs/{run_id}/export",
    ):
        op = paths[path]["get"]
        assert op["summary"] and "200" in op["responses"], path
    assert set(paths["/api/runs/{run_id}"]) == {"get", "delete"}
    assert "409" in paths["/api/runs/{run_id}"]["delete"]["responses"]
    bins = next(
        p
        for p in paths["/api/runs/{run_id}/histograms"]["get"]["parameters"]
        if p["name"] == "bins"
    )
    assert bins["schema"]["maximum"] == wire.MAX_BINS


async def test_the_run_list_searches_every_runs_whole_config_on_the_server(
    tmp_path: Path,
) -> None:
    """The runs page searched on the client over what the list carried: a config value the
    list trims (or a run past the page it polls) was never found. ?q= matches every word
    (case-insensitively) against each run's id, name, status and whole stored config, pages
    and counts the matches, and refuses a search it cannot run (422 naming q). Over a real
    server on loopback, its store filled first."""
    data_dir = tmp_path / "data"
    store = Store(data_dir, commit_interval_s=0.005)
    await store.open()
    deep = {
        "model": {"arch": "mlp", "depth": 4, "activation": "relu"},
        "solver": {"optimizer": "sgd", "lr": 0.1},
        "notes": {"tag": "Needle-42", "why": 'said "hi"'},
    }
    await store.create_run("alpha-1", "first sweep", deep, status="finished")
    await store.create_run("alpha-2", '<b>x</b> "quoted"', {"lr": 0.01, "where": "café"})
    await store.create_run("beta", "other", {"model": {"activation": "tanh"}}, status="failed")
    for i in range(60):
        await store.create_run(f"filler-{i:02d}", f"filler {i}", {"lr": 0.5})
    await store.close()

    def ids(r: httpx.Response) -> list[str]:
        assert r.status_code == 200, r.text
        return [run["id"] for run in strict(r.text)]

    with running_server(make_settings(data_dir)) as server:
        async with httpx.AsyncClient(base_url=server) as client:
            r = await client.get("/api/runs", params={"q": "needle-42", "limit": 50})
            assert ids(r) == ["alpha-1"] and r.headers["x-total-count"] == "1"
            check(list[api.RunSummary], r.json())
            assert "notes" not in r.json()[0]["config"]  # found by it, yet trimmed from the row
            full = await client.get("/api/runs", params={"q": "NEEDLE", "full": "true"})
            assert full.json()[0]["config"] == deep
            for q, expected in (
                ("relu sgd", ["alpha-1"]),  # every word, anywhere in the run
                ("relu tanh", []),
                ("alpha", ["alpha-2", "alpha-1"]),  # the id, newest first
                ("first", ["alpha-1"]),  # the name
                ("<b>x</b>", ["alpha-2"]),
                ('"quoted"', ["alpha-2"]),
                ('"hi"', ["alpha-1"]),  # a quote inside a config string
                ("CAFÉ".lower(), ["alpha-2"]),  # stored as \u00e9 in the JSON text
                ("failed", ["beta"]),  # the status
                ("zzz", []),
            ):
                assert ids(await client.get("/api/runs", params={"q": q})) == expected, q
            r = await client.get("/api/runs", params={"q": "filler", "limit": 5, "offset": 2})
            assert ids(r) == [f"filler-{i:02d}" for i in (57, 56, 55, 54, 53)]
            assert r.headers["x-total-count"] == "60"
            everything = await client.get("/api/runs", params={"q": "  ", "limit": 2})
            assert len(ids(everything)) == 2 and everything.headers["x-total-count"] == "63"
            for params in (
                {"q": " ".join(["w"] * 17)},
                {"q": "x" * 201},
                {"q": "alpha", "limit": 0},
            ):
                r = await client.get("/api/runs", params=params)
                assert r.status_code == 422, params
                (problem,) = r.json()["detail"]
                assert problem["loc"] == ["query", "limit" if "limit" in params else "q"]
                assert problem["msg"]
            assert (await client.get("/api/runs")).headers["x-total-count"] == "63"


async def test_a_run_stored_with_a_lone_surrogate_reads_escaped_not_500(
    setup: tuple[httpx.AsyncClient, Store, ConnectedRuns],
) -> None:
    """A string holding a lone surrogate (os.fsdecode of a name that is not UTF-8), stored in
    a JSON column before the doors refused it: GET /api/runs was a 500 for every run, the
    run's detail, events and commands too, until that run was deleted. Now it reads with the
    surrogate written as an escape, and the other runs are listed."""
    client, store, _hub = setup
    await store.create_run("old", "old", {"data": "/data/caf\udce9.npz", "k\udc80": 1})
    await store.add_command(
        "old",
        {"id": "c1", "name": "set_frozen", "args": {"layers": ["n\udce9"], "frozen": True}},
        origin="api",
    )
    r = await client.get("/api/runs", params={"full": "true"})
    assert r.status_code == 200, r.text
    runs = {run["id"]: run for run in strict(r.text)}
    assert set(runs) == {"old", "r1"}
    assert runs["old"]["config"] == {"data": "/data/caf\\xe9.npz", "k\\x80": 1}
    detail = await client.get("/api/runs/old")
    assert detail.status_code == 200 and detail.json()["config"]["data"] == "/data/caf\\xe9.npz"
    commands = await client.get("/api/runs/old/commands")
    assert commands.status_code == 200 and commands.json()[0]["args"]["layers"] == ["n\\xe9"]
    events = await client.get("/api/runs/old/events")
    assert events.status_code == 200
    assert events.json()[-1]["data"]["args"]["layers"] == ["n\\xe9"]
