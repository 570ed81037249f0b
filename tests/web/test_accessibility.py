"""What a keyboard or screen-reader user meets on the pages: live regions that say new alerts
(and nothing else over and over), the focus kept on a control or a link when the page
redraws it, names for buttons that show a symbol, dialogs that open on their first field.

The run page is driven by a hand-held trainer: a real websocket to the real server's
/ws/trainer (hello, frames, heartbeats, acknowledgements), so a test decides when an alert
comes and when a command is acknowledged (a real trainer acknowledges in milliseconds, and
a NaN run takes a minute to launch). One page of that run is shared by the run-page tests,
which run in file order.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FAST_CONFIG,
    LiveServer,
    PageGuard,
    guarded_page,
    open_ready,
    serve,
    server_settings,
    write_recorded_lab,
)
from playwright.sync_api import Browser, Page, expect
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

LAYERS = ["fc1", "relu1", "fc2"]
STATE = {
    "paused": False,
    "lr_scale": 1.0,
    "weight_decay_enabled": True,
    "frozen": [],
    "stopping": False,
}


class HandTrainer:
    """The trainer side of /ws/trainer, driven by the test: it sends what it is told and
    queues every command the server hands it."""

    def __init__(self, ws: ClientConnection, run_id: str) -> None:
        self.run_id = run_id
        self.ws = ws
        self.lock = threading.Lock()
        self.seq = 0
        self.step = 0
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stopping = threading.Event()
        hello = {
            "type": "hello",
            "v": 1,
            "run_id": run_id,
            "name": run_id,
            "config": {"lr": 0.1},
            "layers": [
                {"name": n, "kind": "ReLU" if "relu" in n else "Linear", "units": 8} for n in LAYERS
            ],
            "last_acked_seq": 0,
            "last_cmd_seq": 0,
        }
        self.ws.send(json.dumps(hello))
        assert json.loads(self.ws.recv(timeout=10))["type"] == "welcome"
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._read, self._beat)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                message = json.loads(raw)
                if message["type"] == "command":
                    self.commands.put(message)
        except Exception:  # the socket closed: the test is over  # noqa: BLE001
            return

    def _beat(self) -> None:  # else the server marks the run lost
        while not self.stopping.wait(0.3):
            self.send({"type": "heartbeat", "v": 1, "step": self.step, "status": "running"})

    def send(self, frame: dict[str, Any]) -> None:
        with self.lock:
            self.ws.send(json.dumps(frame))

    def frame(self, frame_type: str, **body: Any) -> None:
        self.seq += 1
        self.send({"type": frame_type, "v": 1, "seq": self.seq, **body})

    def event(self, step: int, kind: str, data: dict[str, Any]) -> None:
        self.step = max(self.step, step)
        self.frame("event", step=step, kind=kind, data=data)

    def command(self, timeout_s: float = 15.0) -> dict[str, Any]:
        return self.commands.get(timeout=timeout_s)

    def ack(self, command: dict[str, Any], **state: Any) -> None:
        self.event(
            self.step,
            "command_result",
            {
                "id": command["id"],
                "cmd_seq": command["cmd_seq"],
                "name": command["name"],
                "args": command["args"],
                "ok": True,
                "applied_at_step": self.step,
                "state": {**STATE, **state},
                "source": command.get("source", "user"),
            },
        )

    def close(self) -> None:
        self.stopping.set()
        self.threads[1].join(5)


@pytest.fixture(scope="module")
def trainer(server: LiveServer) -> Iterator[HandTrainer]:
    """A live run with a loss curve, one probe step and one alert from before the page opened."""
    with ws_connect(server.url.replace("http://", "ws://") + "/ws/trainer") as ws:
        hand = HandTrainer(ws, f"a11y-{uuid.uuid4().hex[:8]}")
        try:
            yield from fill(server, hand)
        finally:
            hand.close()


def fill(server: LiveServer, hand: HandTrainer) -> Iterator[HandTrainer]:
    rows = [
        {"step": s, "time_s": 0.01 * s, "values": {"loss": 2.3 / (1 + s / 10)}}
        for s in range(1, 21)
    ]
    hand.frame("metrics", rows=rows)
    probe = [
        {"name": n, "mean": 0.0, "std": 0.5, "dead_ratio": 0.1, "saturated_ratio": 0.0,
         "grad_norm": 0.1, "hist": {"lo": -1.0, "hi": 1.0, "counts": [1, 3, 5, 3, 1]}}
        for n in LAYERS
    ]  # fmt: skip
    hand.frame("probe", step=20, layers=probe)
    hand.event(20, "alert", {"rule": "Overfit", "layer": None, "message": "val loss rising"})
    hand.step = 20
    server.wait_step(hand.run_id, 20, 30)
    yield hand


@pytest.fixture(scope="module")
def run_page(browser: Browser, server: LiveServer, trainer: HandTrainer) -> Iterator[Page]:
    page, guard = guarded_page(browser)
    open_ready(page, f"{server.url}/runs/{trainer.run_id}")
    page.wait_for_function("document.body.dataset.socket === 'open'")
    expect(page.locator("#trainer")).to_have_text("trainer connected")
    yield page
    page.context.close()
    assert not guard.errors, guard.errors


def focused(page: Page) -> str:
    return str(
        page.evaluate(
            "(e => e === document.body ? 'body' : e.dataset.cmd || e.id || e.tagName)(document.activeElement)"
        )
    )


def test_a_new_alert_is_announced_politely_or_assertively_and_the_old_ones_are_not(
    run_page: Page, trainer: HandTrainer
) -> None:
    """Alerts, the run pausing and acknowledgements were never said aloud: a new alert is
    now a line in a visually hidden live region (assertive when its rule paused the run),
    the alerts list itself is no live region, and #status and #acked are polite ones."""
    page = run_page
    expect(page.locator("#alerts li.alert")).to_have_count(1)  # the one from before the page
    urgent, polite = page.locator("#announce-urgent"), page.locator("#announce")
    expect(urgent).to_have_attribute("aria-live", "assertive")
    expect(polite).to_have_attribute("aria-live", "polite")
    assert polite.inner_text() == "" and urgent.inner_text() == "", "an old alert was announced"
    assert page.get_attribute("#alerts", "aria-live") is None
    for live in ("#status", "#acked"):
        expect(page.locator(live)).to_have_attribute("aria-live", "polite")
    action = {"name": "pause", "args": {}, "source": "rule", "reason": "NaN in fc1"}
    trainer.event(
        21, "alert", {"rule": "ExplodingTensor", "layer": "fc1", "message": "NaN", "action": action}
    )
    expect(urgent).to_have_text("Alert: ExplodingTensor on fc1 at step 21 — run paused")
    trainer.event(22, "alert", {"rule": "DeadUnits", "layer": "relu1", "message": "60% dead"})
    expect(polite).to_have_text("Alert: DeadUnits on relu1 at step 22")
    expect(urgent).to_have_text(
        "Alert: ExplodingTensor on fc1 at step 21 — run paused"
    )  # not said again


def test_a_control_keeps_the_focus_while_its_command_is_pending(
    run_page: Page, trainer: HandTrainer
) -> None:
    """A pending command's button was disabled, which sent the keyboard focus to <body>
    after Enter: it is aria-disabled now, keeps the focus, and ignores a second press; an
    alert's suggestion button too."""
    page = run_page
    halve = page.locator("button[data-cmd='halve_lr']")
    halve.focus()
    page.keyboard.press("Enter")
    command = trainer.command()
    assert (command["name"], command["args"]) == ("set_lr_scale", {"value": 0.5})
    expect(halve).to_have_attribute("aria-disabled", "true")
    expect(halve).to_have_text("Halve LR …")
    assert focused(page) == "halve_lr"
    page.keyboard.press("Enter")  # pending: nothing more is sent
    time.sleep(0.5)
    assert trainer.commands.empty(), trainer.commands.get_nowait()
    trainer.ack(command, lr_scale=0.5)
    expect(halve).to_have_text("Halve LR")
    expect(halve).not_to_have_attribute("aria-disabled", "true")
    assert focused(page) == "halve_lr"
    # so does an alert's own "Halve LR" (the NaN alert's advice)
    nan = page.locator("#alerts li.alert", has_text="ExplodingTensor")
    suggested = nan.locator("button[data-suggest='halve_lr']")
    suggested.focus()
    page.keyboard.press("Enter")
    command = trainer.command()
    assert (command["name"], command["args"]) == ("set_lr_scale", {"value": 0.25})
    expect(suggested).to_have_attribute("aria-disabled", "true")
    expect(suggested).to_be_focused()
    trainer.ack(command, lr_scale=0.25)
    expect(suggested).not_to_have_attribute("aria-disabled", "true")
    expect(suggested).to_be_focused()


def test_enter_in_the_lr_field_sets_it(run_page: Page, trainer: HandTrainer) -> None:
    """Enter in "LR ×" did nothing: it sets the scale, as the Set button does."""
    page = run_page
    field = page.locator("#lr-scale")
    field.fill("0.25")
    field.press("Enter")
    command = trainer.command()
    assert (command["name"], command["args"]) == ("set_lr_scale", {"value": 0.25})
    trainer.ack(command, lr_scale=0.25)
    expect(page.locator("#acked")).to_contain_text("LR ×0.25")


def test_an_error_toast_is_an_alert_that_stays_until_dismissed(run_page: Page) -> None:
    """Error toasts went after 5 s and were read politely: an alert now, with a Dismiss button."""
    page = run_page
    page.locator("#lr-scale").fill("-1")
    page.locator("#lr-scale").press("Enter")
    toast = page.locator("[role=alert] .toast.error", has_text="LR scale must be a number")
    expect(toast).to_have_count(1)
    page.locator("#lr-scale").press("Enter")  # the same error again: not a second toast
    expect(toast).to_have_count(1)
    # dismissed from the keyboard, the focus goes back to the field (it fell to <body>,
    # where the page's next Space paused or resumed the run); one alert per toast
    toast.get_by_role("button", name="Dismiss").focus()
    page.keyboard.press("Enter")
    expect(toast).to_have_count(0)
    assert page.evaluate("document.activeElement.id") == "lr-scale"
    assert page.locator("#toasts-errors").get_attribute("aria-atomic") == "false"
    page.locator("#lr-scale").fill("0.25")


def test_charts_toolbars_are_short_visible_when_focused_and_offer_no_upload(run_page: Page) -> None:
    """Each chart's toolbar had 8 buttons (80 of the page's 115 tab stops), showed a focused
    one at opacity ~0.3, and offered "Share chart..." (an upload to Plotly's cloud)."""
    page = run_page
    titles = page.evaluate(
        "[...document.querySelectorAll('.modebar')].map(m => [...m.querySelectorAll('.modebar-btn')]"
        ".map(b => b.getAttribute('data-title')))"
    )
    assert titles, "no chart toolbar"
    assert all(len(t) <= 4 for t in titles), titles
    assert not [t for bar in titles for t in bar if "share" in t.lower() or "cloud" in t.lower()], (
        titles
    )
    # each toolbar is one tab stop, the arrow keys move along it
    stops = page.evaluate(
        "[...document.querySelectorAll('.modebar')].map(m => [m.getAttribute('role'),"
        " [...m.querySelectorAll('.modebar-btn')].filter(b => b.tabIndex >= 0).length])"
    )
    assert stops == [["toolbar", 1]] * len(titles), stops
    expect(page.locator("#chart-loss .modebar")).to_have_attribute(
        "aria-label", "Chart tools: Loss"
    )
    page.locator("#chart-loss .modebar-btn").first.focus()
    page.keyboard.press("ArrowRight")
    button = page.locator("#chart-loss .modebar-btn").nth(1)
    expect(button).to_be_focused()
    opacity = button.evaluate(
        "e => { let o = 1; for (let n = e; n; n = n.parentElement) o *= +getComputedStyle(n).opacity; return o; }"
    )
    assert opacity == 1, opacity
    # and the symbol-only buttons have names: every help "?" says what it is about
    helps = page.locator("details.help > summary")
    assert helps.count() > 5
    for name in helps.evaluate_all("s => s.map(e => e.getAttribute('aria-label'))"):
        assert name and name.startswith("Help: ") and len(name) > len("Help: "), name


RUN_PAGE_FIGURES = [
    "Loss",
    "Accuracy",
    "Learning rate",
    "Weight decay",
    "Dead units",
    "Saturated units",
    "Activations over time",
    "Gradient norm per layer",
    "Every layer's activation histogram",
    "Update ratio per layer",
    "Other scalars",
]


def test_every_chart_is_a_named_figure_with_a_summary_of_what_it_shows(run_page: Page) -> None:
    """A screen reader heard nothing of a chart but Plotly's tick labels ("img: 0 50 100
    150 200 250 layer0 layer1 layer2"): each chart is now a figure named by its card's
    heading and described by a short summary (charts.js describeChart), Plotly's drawing
    hidden from it."""
    page = run_page
    figures = page.get_by_role("figure")
    expect(figures).to_have_count(len(RUN_PAGE_FIGURES))
    names = figures.evaluate_all("fs => fs.map(f => f.getAttribute('aria-label'))")
    assert names == RUN_PAGE_FIGURES, names
    # the loss curve's last point (fill: step 20, 2.3 / 3)
    expect(page.get_by_role("figure", name="Loss")).to_have_accessible_description(
        re.compile(r"^1 series of loss, steps 1 to 20\. Latest: train 0\.7667 at step 20\.")
    )
    expect(page.get_by_role("figure", name="Dead units")).to_have_accessible_description(
        re.compile(r"^3 layers, 1 probe step, step 20\. At step 20: highest dead ratio \w+ 0\.1")
    )
    expect(page.get_by_role("figure", name="Activations over time")).to_have_accessible_description(
        re.compile(r"^Layer relu1: 1 probe step, step 20\. At step 20: 90% of values between -")
    )
    expect(page.get_by_role("figure", name="Accuracy")).to_have_accessible_description(
        re.compile("^no accuracy logged")
    )
    for name in RUN_PAGE_FIGURES:
        expect(page.get_by_role("figure", name=name)).to_have_accessible_description(
            re.compile(r"\S")
        )
    exposed = page.evaluate(
        "[...document.querySelectorAll('[role=figure] .main-svg:not([aria-hidden=true])')].length"
    )
    assert exposed == 0, f"{exposed} Plotly drawings still read out"
    # read on demand, never announced: no summary is in a live region
    live = page.evaluate(
        "[...document.querySelectorAll('.chart-summary')].filter(p => p.closest('[aria-live]')).length"
    )
    assert live == 0


def test_a_charts_summary_follows_live_data_at_most_once_a_second(
    run_page: Page, trainer: HandTrainer
) -> None:
    """At 50 steps a second the accuracy chart redraws several times a second; its summary
    is rewritten at most once a second (SUMMARY_INTERVAL_MS), and still ends on the last
    point once the steps stop. (Accuracy, not loss: the runs list's test reads the loss.)"""
    page = run_page
    page.evaluate("window.scrollTo(0, 0)")  # in the window: redrawn at the live pace
    page.evaluate(
        """() => {
        window.summaryWrites = 0;
        window.accLengths = new Set();
        const p = document.getElementById('chart-acc-summary');
        new MutationObserver((records) => { window.summaryWrites += records.length; })
          .observe(p, { childList: true, characterData: true, subtree: true });
        window.accTimer = setInterval(() => window.accLengths.add(
          (document.getElementById('chart-acc').data[0].x || []).length), 50);
    }"""
    )
    started = time.monotonic()
    for step in range(100, 250):  # 3 s at 50 steps a second
        values = {"acc": 0.9876 - (249 - step) * 0.001}
        trainer.frame("metrics", rows=[{"step": step, "time_s": 0.01 * step, "values": values}])
        trainer.step = step
        time.sleep(max(0.0, started + (step - 99) * 0.02 - time.monotonic()))
    accuracy = page.get_by_role("figure", name="Accuracy")
    expect(accuracy).to_have_accessible_description(
        re.compile(r"Latest: train 0\.9876 at step 249\.")
    )
    seconds = time.monotonic() - started
    writes, redraws = page.evaluate(
        "() => { clearInterval(window.accTimer); return [window.summaryWrites, window.accLengths.size]; }"
    )
    assert 2 <= writes <= seconds + 2, (writes, seconds)
    assert redraws > writes, (redraws, writes)  # the chart itself redrew more often


def test_space_on_the_focused_event_log_scrolls_it_and_does_not_pause(
    run_page: Page, trainer: HandTrainer
) -> None:
    """Chromium makes the scrolling event log focusable, and Space there (scroll) paused
    the run through the page-wide shortcut. It acts only when nothing has the focus."""
    page = run_page
    for i in range(40):  # enough lines for the log to scroll
        trainer.event(23, "log", {"message": f"line {i}"})
    log = page.locator("#events")
    page.wait_for_function(
        "(e => e.scrollHeight > e.clientHeight + 50)(document.getElementById('events'))"
    )
    log.focus()
    assert focused(page) == "events", "the scrolling log took no focus: the test proves nothing"
    page.keyboard.press("Space")
    time.sleep(1.0)
    assert trainer.commands.empty(), f"Space on the log sent {trainer.commands.get_nowait()}"
    assert log.evaluate("e => e.scrollTop") > 0  # Space did what it does there
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("Space")  # with nothing focused, Space still pauses
    assert trainer.command()["name"] == "pause"


@pytest.fixture
def runs_page(page: Page, server: LiveServer, trainer: HandTrainer) -> Page:
    page.goto(server.url)
    expect(
        page.locator(f"#runs tr[data-run-id='{trainer.run_id}'] td.name a").first
    ).to_be_visible()
    return page


def test_a_run_link_keeps_the_focus_across_the_lists_polls(
    runs_page: Page, trainer: HandTrainer
) -> None:
    """The list's 2 s poll rebuilt each name cell, so a focused run link lost the focus
    every 2 s. The row's loss curve and Delete button are named too."""
    page = runs_page
    row = page.locator(f"#runs tr[data-run-id='{trainer.run_id}']")
    row.locator("td.name a").focus()
    for _ in range(2):  # two polls answered and drawn
        with page.expect_response(lambda r: "/api/runs?" in r.url):
            pass
    page.wait_for_timeout(200)
    assert page.evaluate("document.activeElement.textContent") == trainer.run_id
    curve = re.compile(r"^Loss curve: from 2\.09\d* to 0\.76\d*, lowest 0\.76\d*$")
    expect(row.locator("td.spark svg")).to_have_attribute("aria-label", curve)
    expect(row.get_by_role("button", name=f"Delete {trainer.run_id}")).to_have_count(1)


def test_the_forms_dialogs_are_named_open_on_a_field_and_tie_errors_to_fields(
    runs_page: Page,
) -> None:
    """The New-run dialog opened on its fields' scroll container and had no name; the
    Init-lab Steps error was tied to no field."""
    page = runs_page
    page.locator("#new-run").focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="New run")
    expect(dialog).to_be_visible()
    expect(page.locator("#new-run-fields input, #new-run-fields select").first).to_be_focused()
    lr = page.locator("#f-solver-lr")
    assert "f-solver-lr-error" in (lr.get_attribute("aria-describedby") or "").split()
    page.keyboard.press("Escape")
    page.locator("#init-lab").click()
    expect(page.get_by_role("dialog", name="Init lab")).to_be_visible()
    steps = page.locator("#lab-steps")
    steps.fill("")
    page.locator("#lab-submit").click()
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(steps).to_have_accessible_description(
        "Steps: required (a whole number of training steps, at least 1)"
    )
    expect(steps).to_be_focused()


def test_a_starting_runs_page_does_not_say_its_trainer_is_not_connected(
    browser: Browser, server: LiveServer
) -> None:
    """A launched run's page alerted "The trainer is not connected…" for the seconds its
    trainer took to start: while the run is starting it says it waits for the trainer."""
    run_id = server.launch(
        {**FAST_CONFIG, "name": "a11y starting", "solver": {**FAST_CONFIG["solver"], "steps": 30}}
    )
    page, guard = guarded_page(browser, PageGuard())
    try:
        # every banner text and the status shown with it, from the page's first script on
        page.add_init_script(
            "window.seen = []; new MutationObserver(() => { const b = document.getElementById('banner');"
            " const s = document.getElementById('status'); if (b && s) window.seen.push([s.textContent, b.hidden ? '' : b.textContent,"
            " document.getElementById('trainer').textContent]); })"
            ".observe(document, {subtree: true, childList: true, characterData: true, attributes: true})"
        )
        open_ready(page, f"{server.url}/runs/{run_id}")
        expect(page.locator("#status")).not_to_have_text("starting", timeout=60_000)
        seen = page.evaluate("window.seen")
        starting = [s for s in seen if s[0] == "starting"]
        assert not [s for s in starting if "not connected" in s[1]], starting
        assert all(s[2] in ("", "waiting for the trainer to start") for s in starting), starting
    finally:
        page.context.close()
    assert not guard.errors, guard.errors


def test_compare_tells_runs_apart_by_symbol_and_dash_not_colour_alone(
    page: Page, server: LiveServer, trainer: HandTrainer
) -> None:
    """/compare drew each run's lines in its own colour and otherwise alike (solid lines, no
    marker, or the same circle on a short series): two close colours, or a viewer who tells
    few apart, read two runs as one. Each run has its own marker symbol on every chart and
    its own dash on the ratio charts; the legends name the runs and show the symbol."""
    with ws_connect(server.url.replace("http://", "ws://") + "/ws/trainer") as ws:
        other = HandTrainer(ws, f"a11y-b-{uuid.uuid4().hex[:8]}")
        try:
            rows = [
                {"step": s, "time_s": 0.01 * s, "values": {"loss": 2.0 / (1 + s / 5)}}
                for s in range(1, 21)
            ]
            other.frame("metrics", rows=rows)
            probe = [
                {"name": n, "mean": 0.0, "std": 0.5, "dead_ratio": 0.2, "saturated_ratio": 0.0,
                 "hist": {"lo": -1.0, "hi": 1.0, "counts": [1, 3, 5, 3, 1]}}
                for n in LAYERS
            ]  # fmt: skip
            other.frame("probe", step=20, layers=probe)
            other.step = 20
            server.wait_step(other.run_id, 20, 30)
        finally:
            other.close()
    open_ready(page, f"{server.url}/compare?ids={trainer.run_id}&ids={other.run_id}")
    drawn = (
        "id => document.getElementById(id)._fullData.map(t => ({name: t.name, color: t.line?.color,"
        " dash: t.line?.dash, symbol: t.mode?.includes('markers') ? t.marker.symbol : null}))"
    )
    loss = page.evaluate(drawn, "chart-loss")
    train = [loss[0], loss[2]]  # each run's train loss (then its val loss)
    assert [t["name"] for t in train] == [f"{trainer.run_id} train", f"{other.run_id} train"]
    assert train[0]["color"] != train[1]["color"]
    assert (train[0]["dash"], train[0]["symbol"]) != (train[1]["dash"], train[1]["symbol"]), train
    assert all(t["symbol"] for t in train), train
    page.wait_for_function("document.getElementById('chart-dead').data.every(t => t.y.length)")
    dead = page.evaluate(drawn, "chart-dead")
    assert [t["name"] for t in dead[:2]] == [trainer.run_id, other.run_id]
    assert dead[0]["dash"] != dead[1]["dash"] and dead[0]["symbol"] != dead[1]["symbol"], dead
    # the legends name each run and the page's shows its symbol
    expect(page.locator("#chart-loss .legendtext")).to_contain_text(
        [f"{trainer.run_id} train", f"{other.run_id} train"]
    )
    legend = page.locator("#legend li")
    expect(legend).to_have_count(2)
    expect(legend.nth(1)).to_contain_text(other.run_id)
    symbols = legend.locator("svg").evaluate_all("s => s.map(e => e.dataset.symbol)")
    assert symbols == [train[0]["symbol"], train[1]["symbol"]], symbols
    # drawn about 10 px across (at 7 a square, a diamond and a circle looked alike)
    box = legend.nth(1).locator("svg path").bounding_box()
    assert box and box["width"] >= 9 and box["height"] >= 9, box
    # no run's ratio line is dashed as the loss chart's validation loss is ("dash", the
    # card's note), for any of the page's ten runs; the summaries name the chosen layer
    dashes = page.evaluate(
        "import('/static/js/compare.js').then(m => [...Array(10).keys()].map(i => m.runStyle(i).dash))"
    )
    assert set(dashes) <= {"solid", "dot", "dashdot"}, dashes
    layer = page.locator("#layer").input_value()
    expect(page.get_by_role("figure", name="Dead units")).to_have_accessible_description(
        re.compile(rf"^2 series of dead ratio of {re.escape(layer)}, step 20\. ")
    )


# A chart made on the run page from charts.js and heatmaps.js (the page's own modules: one
# scheduler), in a div of its own; `below` puts it outside the window.
MAKE_CHARTS = """async ([id, below]) => {
    const c = await import('/static/js/charts.js');
    const h = await import('/static/js/heatmaps.js');
    const div = (suffix) => {
        const el = document.createElement('div');
        el.id = id + suffix;
        el.className = 'test-chart';
        el.style.cssText = `width: 500px; height: 200px; position: absolute; left: 0; top: ${below ? 6000 : 0}px`;
        document.body.append(el);
        return el;
    };
    const span = document.createElement('span');
    window.testCharts = {
        c, h,
        line: new c.LineChart(div('-line'), [{ name: 'train' }, { name: 'validation' }], { yTitle: 'loss' }),
        layers: new c.LineChart(div('-layers'), ['l0', 'l1', 'l2', 'l3', 'l4', 'l5'].map((name) => ({ name })),
            { yTitle: 'grad norm', depthColors: true }),
        heat: new h.LayerHeatmap(div('-heat'), { title: 'dead ratio' }),
        multiples: new h.SmallMultiples(div('-multiples'), span),
    };
}"""


@pytest.fixture
def own_charts(run_page: Page) -> Iterator[Page]:
    yield run_page
    run_page.evaluate("document.querySelectorAll('.test-chart').forEach(e => e.remove())")


def test_a_summary_counts_series_says_missing_values_and_the_smoothed_one_drawn(
    own_charts: Page,
) -> None:
    """A summary said "2 seriess of loss"; a loss whose last values are NaN (sent as null) left out of the
    summary, which read as if the run were fine; with smoothing on, the value logged stated
    as the one drawn. The summary paragraph was visually hidden and read twice (as the
    figure's description and as a paragraph inside it): it is `hidden`, and still describes."""
    page = own_charts
    page.evaluate(MAKE_CHARTS, ["t1", False])
    page.evaluate(
        """() => {
        const { line, layers } = window.testCharts;
        line.setSeries(0, [1, 2, 3, 4, 5], [0.9, 0.5, 0.3, null, null]);
        line.setSeries(1, [1, 5], [0.8, 0.6]);
        layers.traces.forEach((_, i) => layers.setSeries(i, [1, 2, 3], i === 5 ? [null, null, null] : [1, 2, i + 1]));
    }"""
    )
    line = page.get_by_role("figure", name="t1-line")
    expect(line).to_have_accessible_description(
        "2 series of loss, steps 1 to 5. Latest: validation 0.6 at step 5. "
        "train: no value since step 4 (last 0.3 at step 3)."
    )
    expect(page.get_by_role("figure", name="t1-layers")).to_have_accessible_description(
        "6 layers of grad norm, steps 1 to 3. Latest values: highest l4 5 at step 3, "
        "lowest l0 1 at step 3. l5: no finite value logged."
    )
    # read once: the paragraph is hidden, no content of the figure
    summary = page.locator("#t1-line-summary")
    expect(summary).to_be_hidden()
    assert "0.6" not in line.aria_snapshot()
    # the hidden paragraph still describes the figure as the data change (smoothing on)
    page.evaluate("window.testCharts.line.setSmoothing(0.5)")
    expect(line).to_have_accessible_description(
        re.compile(
            r"Latest: validation smoothed 0\.6\d*, logged 0\.6 at step 5\. train: no value since "
            r"step 4 \(last smoothed 0\.4\d*, logged 0\.3 at step 3\)\.$"
        )
    )


def test_a_summary_below_the_fold_follows_its_data_not_its_drawing(own_charts: Page) -> None:
    """A chart outside the window is redrawn every 5 s, and its summary, rewritten after a
    draw, said the replay cursor's old step for as long: it follows the chart's data now,
    at most once a second. So do the dead-unit heatmap's "0 everywhere" and the small
    multiples' cell names (short: layer and range; the statistics are the cell's title,
    its description, and were read twice); a run with no probe step says so."""
    page = own_charts
    page.evaluate(MAKE_CHARTS, ["t2", True])
    multiples = page.get_by_role("figure", name="Every layer's activation histogram").last
    expect(multiples).to_have_accessible_description("no probe step yet")
    page.evaluate(
        """() => {
        const { line, heat, multiples } = window.testCharts;
        line.setSeries(0, [1, 2, 3, 4], [0.9, 0.5, 0.3, 0.2]);
        heat.set(['a', 'b'], [10, 20], [[0.1, 0.2], [0, 0.3]]);
        const layer = (name, lo, hi) => ({ name, lo, hi, counts: [1, 2, 1], mean: 0, std: hi / 2 });
        multiples.show(10, [layer('a', -1, 1), layer('b', -2, 2)]);
    }"""
    )
    line = page.get_by_role("figure", name="t2-line")
    heat = page.get_by_role("figure", name="t2-heat")
    expect(line).to_have_accessible_description(re.compile("Latest: train 0.2 at step 4."))
    expect(heat).to_have_accessible_description(re.compile("highest dead ratio b 0.3"))
    expect(multiples).to_have_accessible_description(re.compile("^2 layers at step 10"))
    # drawn once, then known to be outside the window: not drawn again for 5 s
    page.wait_for_function(
        """() => { const { c, line, heat, multiples } = window.testCharts;
        return [line, heat, multiples].every((x) => c.scheduler.drawnAt.has(x) && !c.scheduler.dirty.has(x)
            && !c.scheduler.inWindow(x)); }"""
    )
    drawn = "() => { const { c, line, heat, multiples } = window.testCharts; return [line, heat, multiples].map((x) => c.scheduler.drawnAt.get(x)); }"
    before = page.evaluate(drawn)
    page.evaluate(
        """() => {
        const { line, heat, multiples } = window.testCharts;
        line.setCursor(2);
        heat.set(['a', 'b'], [10, 20], [[0, 0], [0, 0]]);
        const layer = (name, lo, hi) => ({ name, lo, hi, counts: [1, 2, 1], mean: 0, std: hi / 2 });
        multiples.show(20, [layer('a', -3, 3), layer('b', -2, 2)]);
    }"""
    )
    expect(line).to_have_accessible_description(
        re.compile(r"At the cursor, step 2: train 0\.5\.$"), timeout=2500
    )
    expect(heat).to_have_accessible_description(
        re.compile("dead ratio 0 at every layer and probe step"), timeout=2500
    )
    expect(multiples).to_have_accessible_description(
        re.compile("^2 layers at step 20"), timeout=2500
    )
    cell = page.locator("#t2-multiples .multiple[data-layer='a']")
    expect(cell).to_have_attribute("role", "img")
    expect(cell).to_have_accessible_name("a, values from -3 to 3", timeout=2500)
    expect(cell).to_have_accessible_description(re.compile("^a at step 20 mean 0 std 1.5"))
    assert page.evaluate(drawn) == before, (
        "a chart outside the window was redrawn: the test proves nothing"
    )


def test_a_small_multiple_is_named_by_its_layer_and_range_and_described_by_its_stats(
    run_page: Page,
) -> None:
    """Each cell's name held its statistics, and its title (its description) the same: read
    twice. Its name is its layer and range now, its inner text hidden from screen readers."""
    cell = run_page.locator("#multiples .multiple[data-layer='fc1']")
    expect(cell).to_have_accessible_name("fc1, values from -1 to 1")
    expect(cell).to_have_accessible_description(re.compile(r"^fc1 at step \d+ mean 0 std 0.5"))
    assert cell.locator("[aria-hidden=true]").count() == 2  # its name and range text


def test_the_init_labs_charts_are_named_figures_with_a_summary(
    browser: Browser, tmp_path: Path
) -> None:
    """The init lab's charts read as their tick labels and nothing else: each is a figure
    named by its card's heading, described by what it shows at the chosen step, and each
    histogram cell an image named by its scheme, layer and range."""
    data_dir = tmp_path / "data"
    write_recorded_lab(data_dir, "a11ylab")
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/labs/a11ylab")
            mean = page.get_by_role("figure", name="Activation mean against depth")
            expect(mean).to_have_accessible_description(
                re.compile(
                    r"^Step 40, 4 layers, layer0 to layer3\. mean, first to last layer: zero -?[\d.e-]+ to "
                )
            )
            expect(
                page.get_by_role("figure", name="Dead units per layer")
            ).to_have_accessible_description(
                re.compile(r"^Step 40, 4 layers, layer0 to layer3\. (dead ratio|no layer has)")
            )
            grid = page.get_by_role("figure", name="Histograms per layer", exact=True)
            expect(grid).to_have_accessible_description(
                "4 layers × 5 schemes at step 40: each cell one scheme's activation histogram of one layer."
            )
            expect(
                grid.get_by_role("img", name=re.compile(r"^he, layer3, values from "))
            ).to_have_count(1)
            assert page.get_by_role("figure").count() == 6
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
