"""Fixtures for the browser tests: one real server and a few real runs per session.

* ``server`` — ``create_app`` served by uvicorn on 127.0.0.1 (port 0) in a thread, data in a
  session tmp dir (the same approach as tests/server's harness, copied so the folders stay
  independent).
* ``browser`` — headless Debian Chromium driven by playwright; ``page`` is a fresh page that
  records console errors, uncaught page errors and every request, and fails the test if any
  error was logged or any request left localhost.
* ``finished_run`` / ``live_run`` — built-in digits MLP runs started through POST /api/runs:
  a short one that has finished, and a long one (stopped at teardown) to steer.

Everything here is real: no mocked server, trainer or browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from layerscope.server.serving import make_server
from layerscope.server.settings import Settings
from layerscope.server.store import Store
from layerscope.trainer import wire
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
START_TIMEOUT_S = 20.0

# expect()'s own default is 5 s. A page's next state often waits on the runs list's 2 s poll,
# a trainer's acknowledgement or Plotly on a loaded 2-core machine running trainers beside
# Chromium: every expectation gets as long as a page load does. A passing one costs nothing.
expect.set_options(timeout=30_000)

# A digits MLP small enough to train hundreds of steps a second on one CPU core.
FAST_CONFIG: dict[str, Any] = {
    "every": 5,
    "model": {"arch": "mlp", "depth": 3, "width": 32, "activation": "tanh", "init": "xavier"},
    "data": {"dataset": "digits", "val_fraction": 0.2},
    "solver": {
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 0.001,
        "batch_size": 32,
        "eval_every": 20,
        "seed": 0,
        "device": "cpu",
    },
}


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class LiveServer:
    """A running server: its base URL, settings and an httpx client for its REST API."""

    url: str
    settings: Settings
    client: httpx.Client
    started_runs: list[str] = field(default_factory=list)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.request(method, f"{self.url}{path}", **kwargs)

    def run(self, run_id: str) -> dict[str, Any]:
        response = self.api("GET", f"/api/runs/{run_id}")
        response.raise_for_status()
        detail = dict(response.json())
        if detail["status"] == "failed":
            log = self.settings.data_dir / "runs" / run_id / "trainer.log"
            tail = log.read_text()[-3000:] if log.exists() else "(no trainer log)"
            raise AssertionError(f"run {run_id} failed ({detail.get('status_reason')}):\n{tail}")
        return detail

    def launch(self, config: dict[str, Any]) -> str:
        response = self.api("POST", "/api/runs", json=config)
        assert response.status_code == 201, response.text
        run_id = str(response.json()["id"])
        self.started_runs.append(run_id)
        return run_id

    def wait_step(self, run_id: str, step: int, timeout_s: float = 60.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            if self.api("GET", f"/api/runs/{run_id}").status_code == 404:
                return None  # a trainer started by hand creates its run with its hello
            detail = self.run(run_id)
            return detail if (detail.get("last_step") or 0) >= step else None

        return dict(wait_for(reached, timeout_s, f"run {run_id} to reach step {step}"))


def write_recorded_run(
    data_dir: Path,
    run_id: str,
    *,
    steps: int,
    layers: int,
    every: int,
    config: dict[str, Any] | None = None,
    events: Sequence[tuple[int, str, dict[str, Any]]] = (),
    layer_names: Sequence[str] | None = None,
    layer_stats: dict[str, dict[str, Any]] | None = None,
    layer_kinds: Sequence[str] | None = None,
    name: str | None = None,
) -> None:
    """A finished run written straight through the real Store (no trainer), frames validated
    by wire exactly as ingest would: loss every step, a probe frame every `every` steps, then
    each of `events` (step, kind, data) as the trainer would send it. Layers are named
    `layer0`, `layer1`, ... unless `layer_names` (one per layer) says otherwise, all of kind
    ReLU unless `layer_kinds` does; `layer_stats` overrides a layer's probe statistics at every
    probe step (layer name -> {stat: value}, None for a statistic the layer lacks). The run
    is named `name`, or its id."""
    names = list(layer_names) if layer_names is not None else [f"layer{i}" for i in range(layers)]
    assert len(names) == layers
    kinds = list(layer_kinds) if layer_kinds is not None else ["ReLU"] * layers
    assert len(kinds) == layers

    def frames() -> Iterator[dict[str, Any]]:
        seq = 0
        for start in range(0, steps, 500):
            rows = [
                {"step": s, "time_s": 0.01 * s, "values": {"loss": 2.3 / (1 + s / 50), "lr": 0.01}}
                for s in range(start, min(steps, start + 500))
            ]
            seq += 1
            yield wire.validate_metrics({"type": "metrics", "seq": seq, "rows": rows})
        for step in range(0, steps, every):
            seq += 1
            probe = [
                {
                    "name": names[i],
                    "mean": 0.0,
                    "std": 1.0 / (1 + i),
                    "dead_ratio": (step / steps) * i / layers,
                    "saturated_ratio": 0.0,
                    "grad_norm": 0.1 / (1 + i),
                    "hist": {
                        "lo": -1.0,
                        "hi": 1.0,
                        "counts": [(b * (i + 1) + step) % 7 for b in range(16)],
                    },
                    **(layer_stats or {}).get(names[i], {}),
                }
                for i in range(layers)
            ]
            yield wire.validate_probe({"type": "probe", "seq": seq, "step": step, "layers": probe})
        for step, kind, data in events:
            seq += 1
            yield wire.validate_event(
                {"type": "event", "seq": seq, "step": step, "kind": kind, "data": data}
            )
        yield wire.validate_event(
            {
                "type": "event",
                "seq": seq + 1,
                "step": steps - 1,
                "kind": "status",
                "data": {"status": "finished"},
            }
        )

    async def write() -> None:
        store = Store(data_dir, commit_interval_s=0.01)
        await store.open()
        try:
            hello = {
                "type": "hello",
                "run_id": run_id,
                "name": name or run_id,
                "config": config or {"source": "recorded"},
                "layers": [
                    {"name": layer, "kind": kind, "units": 8}
                    for layer, kind in zip(names, kinds, strict=True)
                ],
            }
            await store.hello(wire.validate_hello(hello))
            await store.append(run_id, list(frames()))
        finally:
            await store.close()

    # On its own thread: playwright's sync API keeps an event loop running on this one.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(write())
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    writer = threading.Thread(target=run)
    writer.start()
    writer.join()
    if errors:
        raise errors[0]


def write_recorded_lab(
    data_dir: Path, lab_id: str, *, steps: int = 50, failed: Sequence[str] = ()
) -> dict[str, Any]:
    """An init lab as the server records one (<data_dir>/labs/<lab_id>.json) over five
    recorded runs (write_recorded_run's, four layers, a probe every 10 steps), one per
    scheme: the lab page without launching five trainers. The run of each scheme in
    `failed` failed at step 0 instead, before any probe. Returns the lab record."""
    schemes = [
        ("zero", "zero"),
        ("small_normal", "normal 0.01"),
        ("large_normal", "normal 1.0"),
        ("xavier", "xavier"),
        ("he", "he"),
    ]
    runs = []
    for scheme, label in schemes:
        run_id = f"{lab_id}-{scheme.replace('_', '-')}"
        if scheme in failed:
            write_failed_run(data_dir, run_id, name=f"init lab {lab_id}: {label} (tanh)", layers=4)
            runs.append({"id": run_id, "scheme": scheme, "label": label})
            continue
        write_recorded_run(
            data_dir,
            run_id,
            steps=steps,
            layers=4,
            every=10,
            name=f"init lab {lab_id}: {label} (tanh)",
        )
        runs.append({"id": run_id, "scheme": scheme, "label": label})
    params = {
        "activation": "tanh",
        "batch_norm": False,
        "depth": 4,
        "width": 8,
        "steps": steps,
        "every": 10,
        "dataset": "digits",
        "seed": 0,
        "lr": 0.01,
        "device": "cpu",
    }
    record = {
        "id": lab_id,
        "kind": "init",
        "created_at": time.time(),
        "params": params,
        "runs": runs,
    }
    (data_dir / "labs").mkdir(parents=True, exist_ok=True)
    (data_dir / "labs" / f"{lab_id}.json").write_text(json.dumps(record, indent=2))
    return record


def write_failed_run(data_dir: Path, run_id: str, *, name: str, layers: int) -> None:
    """A run whose trainer said hello, then failed at step 0: no metrics, no probes."""

    async def write() -> None:
        store = Store(data_dir, commit_interval_s=0.01)
        await store.open()
        try:
            layer_list = [{"name": f"layer{i}", "kind": "ReLU", "units": 8} for i in range(layers)]
            hello = {"type": "hello", "run_id": run_id, "name": name, "layers": layer_list}
            await store.hello(wire.validate_hello(hello))
            status = {"type": "event", "seq": 1, "step": 0, "kind": "status"}
            await store.append(
                run_id, [wire.validate_event({**status, "data": {"status": "failed"}})]
            )
        finally:
            await store.close()

    errors: list[BaseException] = []

    def run() -> None:  # on its own thread, as write_recorded_run's
        try:
            asyncio.run(write())
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=run)
    writer.start()
    writer.join()
    if errors:
        raise errors[0]


def write_many_runs(
    data_dir: Path, count: int, *, steps: int = 100, config_of: Callable[[int], dict[str, Any]]
) -> list[str]:
    """``count`` small finished runs, ``run-0000`` (the oldest) to ``run-<count-1>``, named
    ``sweep <i>`` with ``config_of(i)``: a loss every step and a status event, written through
    the real Store in one session (write_recorded_run opens a Store per run: too slow for
    hundreds). Returns their ids, oldest first."""
    ids = [f"run-{i:04d}" for i in range(count)]

    async def write() -> None:
        store = Store(data_dir, commit_interval_s=0.01)
        await store.open()
        try:
            for i, run_id in enumerate(ids):
                hello = {
                    "type": "hello",
                    "run_id": run_id,
                    "name": f"sweep {i}",
                    "config": config_of(i),
                    "layers": [{"name": "layer0", "kind": "ReLU", "units": 8}],
                }
                await store.hello(wire.validate_hello(hello))
                rows = [
                    {"step": s, "time_s": 0.01 * s, "values": {"loss": 2.3 / (1 + s / 50)}}
                    for s in range(steps)
                ]
                status = {"status": "finished"}
                await store.append(
                    run_id,
                    [
                        wire.validate_metrics({"type": "metrics", "seq": 1, "rows": rows}),
                        wire.validate_event(
                            {
                                "type": "event",
                                "seq": 2,
                                "step": steps - 1,
                                "kind": "status",
                                "data": status,
                            }
                        ),
                    ],
                )
        finally:
            await store.close()

    errors: list[BaseException] = []

    def run() -> None:  # on its own thread, as write_recorded_run's
        try:
            asyncio.run(write())
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=run)
    writer.start()
    writer.join()
    if errors:
        raise errors[0]
    return ids


def serve(settings: Settings) -> Iterator[LiveServer]:
    """create_app(settings) under uvicorn on a thread; stops launched runs, then the server."""
    server, sock, settings, app = make_server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), START_TIMEOUT_S, "server start")
    assert server.started, "test server did not start"
    headers = {"Authorization": f"Bearer {settings.viewer_token}"} if settings.viewer_token else {}
    client = httpx.Client(timeout=30.0, headers=headers)
    live = LiveServer(f"http://127.0.0.1:{settings.port}", settings, client)
    try:
        yield live
    finally:
        for run_id in live.started_runs:
            live.api("POST", f"/api/runs/{run_id}/stop")
        client.close()
        launched = [child.process.pid for child in app.state.launcher.children.values()]
        server.should_exit = True
        thread.join(30)
        sock.close()
        for pid in launched:  # the server reaps its children; never leave one behind regardless
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def server_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "port": 0,
        "commit_interval_s": 0.02,
        "heartbeat_timeout_s": 5.0,
        "reconnect_grace_s": 3.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Room for the two shared runs, the init lab's five and a New-run form launch.
    yield from serve(server_settings(tmp_path_factory.mktemp("web") / "data", max_launched=10))


@pytest.fixture(scope="session")
def launched(server: LiveServer) -> dict[str, str]:
    """Two built-in runs started together (their start-up, mostly importing torch, overlaps):
    a short one that will finish, and a long one to watch and steer, stopped at teardown."""
    short = {
        **FAST_CONFIG,
        "name": "replay digits",
        "solver": {**FAST_CONFIG["solver"], "steps": 150},
    }
    long = {
        **FAST_CONFIG,
        "name": "live digits",
        # It trains at full speed for the whole session: probing every 20th step keeps its
        # frames from outrunning a loaded server, where a command's acknowledgement would
        # queue behind the backlog.
        "every": 20,
        "solver": {**FAST_CONFIG["solver"], "steps": 10_000_000},
    }
    return {"finished": server.launch(short), "live": server.launch(long)}


@pytest.fixture(scope="session")
def finished_run(server: LiveServer, launched: dict[str, str]) -> dict[str, Any]:
    """The short run, once it has finished: the replay subject."""
    run_id = launched["finished"]

    def finished() -> dict[str, Any] | None:
        detail = server.run(run_id)
        assert detail["status"] not in ("failed", "lost"), detail
        return detail if detail["status"] == "finished" else None

    return dict(wait_for(finished, 120, f"run {run_id} to finish"))


@pytest.fixture(scope="session")
def live_run(server: LiveServer, launched: dict[str, str]) -> dict[str, Any]:
    """The long run, once it has recorded a few probe steps."""
    return server.wait_step(launched["live"], 60, 120)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class PageGuard:
    """What a page did that a test must not allow: console errors, page errors, remote requests."""

    errors: list[str] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error" or any(p.search(msg.text) for p in self.allowed):
            return
        self.errors.append(f"console: {msg.text} ({msg.location.get('url', '')})")

    def expect_status(self, status: int) -> None:
        """Chromium logs every 4xx answer to fetch(); a test that provokes one on purpose says so."""
        self.allowed.append(re.compile(rf"the server responded with a status of {status}\b"))

    def expect_refused_websocket(self) -> None:
        """Chromium logs a refused websocket; a test that stops the server on purpose says so."""
        self.allowed.append(re.compile(r"WebSocket connection to .* failed"))

    def request(self, request: Request) -> None:
        self.url(request.url)

    def url(self, url: str) -> None:
        self.requests.append(url)
        parts = urlsplit(url)
        if parts.scheme not in ("data", "blob", "about") and parts.hostname not in LOCAL_HOSTS:
            self.remote.append(url)


def guarded_page(browser: Browser, guard: PageGuard | None = None) -> tuple[Page, PageGuard]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    guard = guard or PageGuard()
    page.on("console", guard.console)
    page.on("pageerror", lambda exc: guard.errors.append(f"pageerror: {exc}"))
    page.on("request", guard.request)
    page.on("websocket", lambda ws: guard.url(ws.url))
    return page, guard


@pytest.fixture
def guard() -> PageGuard:
    return PageGuard()


@pytest.fixture
def page(browser: Browser, guard: PageGuard) -> Iterator[Page]:
    """A fresh page; the test fails if it logged an error or asked anything of a non-local host."""
    page, _ = guarded_page(browser, guard)
    yield page
    page.context.close()
    assert not guard.errors, "the page logged errors:\n" + "\n".join(guard.errors)
    assert not guard.remote, f"requests left localhost: {guard.remote}"
    assert guard.requests, "the page made no requests at all"


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def chart_points(page: Page, div_id: str) -> list[int]:
    """Points in each trace of the Plotly chart in #div_id, read from the live graph div."""
    return list(
        page.evaluate(
            "id => (document.getElementById(id).data || []).map(t => (t.x || []).length)", div_id
        )
    )


def chart_trace(page: Page, div_id: str, index: int = 0) -> dict[str, list[Any]]:
    return dict(
        page.evaluate(
            "([id, i]) => { const t = document.getElementById(id).data[i]; return {x: Array.from(t.x), y: Array.from(t.y)}; }",
            [div_id, index],
        )
    )


def open_ready(page: Page, url: str, timeout_s: float = 30.0) -> None:
    """Loads url and waits until the page says every chart has rendered."""
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready !== undefined", timeout=timeout_s * 1000)
    assert page.evaluate("document.body.dataset.ready") == "1", page.inner_text("#banner")
