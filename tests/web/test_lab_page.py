"""The init lab in headless Chromium against a real server (runs.js's Init-lab form, lab.js,
and the run page's alerts panel): the button launches five real runs that differ only in
their initialisation, the comparison view draws every chart from their stored probes, and
an alert a rule raised in one of them shows on its run page with its rule, layer and step."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    LiveServer,
    PageGuard,
    chart_points,
    guarded_page,
    open_ready,
    screenshot,
    serve,
    server_settings,
    wait_for,
    write_recorded_lab,
    write_recorded_run,
)
from playwright.sync_api import Browser, Page, Request, Route, expect

pytestmark = pytest.mark.browser

SCHEMES = ["zero", "small_normal", "large_normal", "xavier", "he"]
STEPS = 60
NO_DEAD_TANH = (
    "no layer has a dead-unit ratio: tanh has no dead region "
    "(only ReLU-family units die: their output stays 0)"
)
# A layer name Plotly would render as a link (it renders a subset of HTML in category labels,
# trace names and hover text).
LINK_NAME = "<a href='http://2130706433:18473/attack'>layer</a>"


@pytest.fixture(scope="module")
def lab(browser: Browser, server: LiveServer) -> Iterator[dict[str, Any]]:
    """A lab launched the way a person does: the runs page's Init lab button and its form."""
    page, guard = guarded_page(browser)
    open_ready(page, f"{server.url}/")
    page.click("#init-lab")
    page.select_option("#lab-activation", "tanh")
    page.fill("#lab-steps", str(STEPS))
    page.click("#lab-submit")
    page.wait_for_url("**/labs/*", timeout=60_000)
    lab_id = page.url.rsplit("/", 1)[-1]
    page.context.close()
    assert not guard.errors, "the runs page logged errors:\n" + "\n".join(guard.errors)
    assert not guard.remote, f"requests left localhost: {guard.remote}"
    detail = server.api("GET", f"/api/labs/{lab_id}").json()
    server.started_runs.extend(r["id"] for r in detail["runs"])
    yield detail


@pytest.fixture(scope="module")
def finished_lab(server: LiveServer, lab: dict[str, Any]) -> dict[str, Any]:
    def done() -> bool:
        return all(server.run(r["id"])["status"] == "finished" for r in lab["runs"])

    wait_for(done, 180, "the five lab runs to finish")
    return lab


def test_the_init_lab_button_launches_five_runs_differing_only_in_init(
    page: Page, server: LiveServer, lab: dict[str, Any]
) -> None:
    open_ready(page, f"{server.url}/")
    for run in lab["runs"]:  # each run of the lab links back to the comparison view
        link = page.locator(f"#runs tr[data-run-id='{run['id']}'] a.lab-link")
        expect(link).to_have_attribute("href", f"/labs/{lab['id']}")
    assert [r["scheme"] for r in lab["runs"]] == SCHEMES
    configs = [server.run(r["id"])["config"] for r in lab["runs"]]
    assert [c["model"]["init"] for c in configs] == ["zero", "normal", "normal", "xavier", "he"]
    assert [c["model"]["init_std"] for c in configs][1:3] == [0.01, 1.0]
    rest = []
    for config in configs:
        c = copy.deepcopy(config)
        del c["model"]["init"], c["model"]["init_std"], c["name"]
        rest.append(c)
    assert all(c == rest[0] for c in rest)  # same network, data, solver, seed
    assert rest[0]["model"]["activation"] == "tanh" and rest[0]["solver"]["steps"] == STEPS


def test_the_comparison_view_draws_every_scheme_at_the_latest_common_step(
    page: Page, server: LiveServer, finished_lab: dict[str, Any]
) -> None:
    open_ready(page, f"{server.url}/labs/{finished_lab['id']}", timeout_s=60)
    page.wait_for_function(f"document.body.dataset.step === '{STEPS}'", timeout=30_000)
    expect(page.locator("#legend li")).to_have_count(5)
    expect(page.locator("#lab-bn")).to_have_text("Same lab, batch norm on")
    layers = server.run(finished_lab["runs"][0]["id"])["layers"]
    for chart in ("chart-mean", "chart-sat", "chart-sym"):
        assert chart_points(page, chart) == [len(layers)] * 5, chart
    # a tanh lab: no layer has a dead ratio, and the chart says why (it drew empty axes)
    assert chart_points(page, "chart-dead") == []
    expect(page.locator("#chart-dead .chart-note")).to_have_text(NO_DEAD_TANH)
    # Zero init: every unit of the first layer is identical, so its unit_spread is exactly 0
    # ("identical"); He init breaks symmetry in every layer. The chart is scale-free (spread /
    # std): small normal's units differ too, and its deep layers' spreads (~1e-4 and below)
    # drew as zero init's 0 on an absolute axis that normal 1.0 (~2) set.
    sym = page.evaluate(
        "document.getElementById('chart-sym').data.map(t => ({y: Array.from(t.y), text: t.text}))"
    )
    sym_zero, sym_small, sym_he = sym[0]["y"], sym[1]["y"], sym[4]["y"]
    assert sym_zero[0] == 0 and sym[0]["text"][0] == "identical" and all(v > 0 for v in sym_he)
    assert all(0.05 < v <= 1.01 for v in sym_small + sym_he), (sym_small, sym_he)
    assert "identical" not in sym[1]["text"]
    expect(
        page.locator("#chart-sym").locator("xpath=..").locator("details.help p")
    ).to_contain_text("divided by the layer's std")
    # std against depth: small normal shrinks layer by layer, Xavier does not collapse.
    page.uncheck("#std-log")
    std = page.evaluate("document.getElementById('chart-std').data.map(t => Array.from(t.y))")
    small, xavier = std[1], std[3]
    assert small[-2] < small[0] and xavier[-2] > 10 * small[-2]
    cells = page.locator("#lab-grid .multiple")
    expect(cells).to_have_count(5 * len(layers))
    assert (
        sum(
            page.evaluate(
                "JSON.parse(document.querySelector('#lab-grid .multiple[data-run]:last-child').dataset.counts)"
            )
        )
        > 0
    )
    screenshot(page, "lab")
    # An earlier common step redraws every chart for that step.
    first = server.api("GET", f"/api/runs/{finished_lab['runs'][0]['id']}/probe_steps").json()
    page.eval_on_selector(
        "#lab-step", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    page.wait_for_function(f"document.body.dataset.step === '{first['steps'][0]}'", timeout=30_000)
    assert chart_points(page, "chart-mean") == [len(layers)] * 5


def test_an_alert_shows_in_the_alerts_panel_with_rule_layer_and_step(
    page: Page, server: LiveServer, finished_lab: dict[str, Any]
) -> None:
    alerts = {
        r["id"]: server.api("GET", f"/api/runs/{r['id']}/events", params={"kind": "alert"}).json()
        for r in finished_lab["runs"]
    }
    run_id, events = next((k, v) for k, v in alerts.items() if v)  # a poor init raised one
    first = events[0]
    open_ready(page, f"{server.url}/runs/{run_id}")
    shown = page.locator("#alerts li.alert")
    expect(shown).to_have_count(min(len(events), 500))
    text = page.locator("#alerts").inner_text()
    assert first["data"]["rule"] in text and f"step {first['step']}" in text
    if first["data"].get("layer"):
        assert first["data"]["layer"] in text


def test_the_refresh_failed_banner_clears_once_refreshing_works_again(
    page: Page, guard: PageGuard, server: LiveServer, finished_lab: dict[str, Any]
) -> None:
    """Review F's restart3.py: 'Refreshing the lab failed' stayed up for good once the
    server was back. The lab's answer is served as if its runs were still running (so the
    page keeps refreshing), first failing, then working again."""
    guard.expect_status(503)
    lab_url = f"{server.url}/api/labs/{finished_lab['id']}"
    failing = {"on": False}

    def answer(route: Route) -> None:
        if failing["on"]:
            route.fulfill(status=503, body="down")
            return
        lab = route.fetch().json()
        for run in lab["runs"]:
            run["status"] = "running"
        route.fulfill(json=lab)

    page.route(lab_url, answer)
    open_ready(page, f"{server.url}/labs/{finished_lab['id']}", timeout_s=60)
    banner = page.locator("#banner")
    failing["on"] = True
    expect(banner).to_contain_text("Refreshing the lab failed", timeout=15_000)
    failing["on"] = False
    expect(banner).to_be_hidden(timeout=15_000)


def test_the_help_popups_close_on_escape_and_on_a_click_outside(
    browser: Browser, tmp_path: Path
) -> None:
    """The lab page's "?" helps stayed open on Escape and on a click elsewhere (the run
    page's close on both); one open help covered the next chart's legend until clicked
    again. A lab recorded over five recorded runs, its own server."""
    data_dir = tmp_path / "data"
    lab = write_recorded_lab(data_dir, "helplab1")
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/labs/{lab['id']}")
            helps = page.locator("details.help")
            first, second = helps.nth(1), helps.nth(2)
            is_open = "d => d.open"
            first.locator("summary").click()
            expect(first.locator("p")).to_be_visible()
            page.keyboard.press("Escape")
            expect(first.locator("p")).to_be_hidden()
            assert first.evaluate("d => d.contains(document.activeElement)")  # focus stays

            page.keyboard.press("Enter")  # the keyboard opens it again from its summary
            expect(first.locator("p")).to_be_visible()
            second.locator("summary").click()  # another help: the first one closes
            expect(second.locator("p")).to_be_visible()
            assert first.evaluate(is_open) is False
            second.locator("p").click()  # a click inside a help leaves it open
            assert second.evaluate(is_open) is True
            page.locator("h1").click()  # a click outside closes it
            expect(second.locator("p")).to_be_hidden()
            assert helps.evaluate_all("ds => ds.filter(d => d.open).length") == 0
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_a_400px_window_holds_the_lab_page_and_its_keyboard_use(
    browser: Browser, tmp_path: Path
) -> None:
    """At 400 px the lab page scrolled sideways (its cards were at least 520 px wide, the
    histogram grid 640 px) and a help popup opened 116 px past the window's left edge. The
    step slider and the helps work from the keyboard."""
    data_dir = tmp_path / "data"
    lab = write_recorded_lab(data_dir, "narrowlab2")
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            page.set_viewport_size({"width": 400, "height": 800})
            open_ready(page, f"{server.url}/labs/{lab['id']}")
            assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            grid = page.locator("#lab-grid")  # five schemes side by side: scrolls in its card
            assert grid.evaluate("g => g.scrollWidth > g.clientWidth")
            card = page.locator("article.card", has=grid).bounding_box()
            assert card and card["x"] >= 0 and card["x"] + card["width"] <= 400, card
            helps = page.locator("details.help")
            for i in range(helps.count()):
                helps.nth(i).locator("summary").click()
                box = helps.nth(i).locator("p").bounding_box()
                assert box and box["x"] >= 0 and box["x"] + box["width"] <= 400, (i, box)
                page.keyboard.press("Escape")
                expect(helps.nth(i).locator("p")).to_be_hidden()

            slider = page.locator("#lab-step")
            slider.focus()
            page.keyboard.press("Home")  # the first probe step every run has
            page.wait_for_function("document.body.dataset.step === '0'")
            page.keyboard.press("ArrowRight")
            page.wait_for_function("document.body.dataset.step === '10'")
            expect(page.locator("#grid-step")).to_have_text("10")
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_a_run_that_ended_without_probe_data_leaves_the_other_four_compared(
    browser: Browser, tmp_path: Path
) -> None:
    """A lab run that failed before its first probe step (its probe_steps empty) left the
    five runs no step in common: the page said 'waiting for every run's first probe step'
    for good and drew nothing. The other four are compared, and the note names it."""
    data_dir = tmp_path / "data"
    lab = write_recorded_lab(data_dir, "failedlab2", failed=("zero",))
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/labs/{lab['id']}")
            expect(page.locator("#lab-steps-note")).to_have_text(
                "5 probe steps shared by 4 runs · no probe data from zero (failed)"
            )
            expect(page.locator("#lab-step-value")).to_have_text("40")
            means = page.evaluate("document.getElementById('chart-mean').data.map(t => t.y.length)")
            assert means == [4] * 5
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_the_step_note_counts_one_probe_step_and_one_run_in_the_singular(
    browser: Browser, tmp_path: Path
) -> None:
    """Review walk-through: a lab of one probe step read '1 probe steps shared by all 5 runs'
    (and with one run left to compare, '... shared by 1 runs')."""
    data_dir = tmp_path / "data"
    # a probe every 10 steps: step 0 only; four of the five runs failed before it
    write_recorded_lab(data_dir, "onerun", steps=5, failed=SCHEMES[:4])
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/labs/onerun")
            expect(page.locator("#lab-steps-note")).to_have_text(
                "1 probe step from 1 run · no probe data from zero (failed), normal 0.01 (failed),"
                " normal 1.0 (failed), xavier (failed)"
            )
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_the_batch_norm_twin_asks_before_launching_five_runs(
    browser: Browser, tmp_path: Path
) -> None:
    """The "Same lab, batch norm on" button launched five training runs at one click: a stray click
    started five trainers. It asks first, inline, naming the runs and their steps; Escape
    and Cancel back out, and only the confirm sends the launch. This server allows no
    launched run, so the launch it sends is refused (429) and nothing trains."""
    data_dir = tmp_path / "data"
    lab = write_recorded_lab(data_dir, "twinlab1")
    launches: list[str] = []

    def posted(request: Request) -> None:
        if request.method == "POST" and "/api/labs" in request.url:
            launches.append(request.url)

    for server in serve(server_settings(data_dir, max_launched=0)):
        page, guard = guarded_page(browser)
        guard.expect_status(429)
        page.on("request", posted)
        try:
            open_ready(page, f"{server.url}/labs/{lab['id']}")
            button, confirm = page.locator("#lab-bn"), page.locator("#lab-bn-confirm")
            expect(confirm).to_be_hidden()
            button.click()
            expect(confirm).to_be_visible()
            expect(confirm).to_contain_text(
                "Launch 5 training runs (zero, normal 0.01, normal 1.0, xavier, he), "
                "the same lab with batch norm on"
            )
            expect(confirm).to_contain_text("50 steps each (250 steps in all)")
            expect(button).to_have_attribute("aria-expanded", "true")
            page.keyboard.press("Escape")
            expect(confirm).to_be_hidden()
            assert page.evaluate("document.activeElement.id") == "lab-bn"
            button.click()
            page.click("#lab-bn-cancel")
            expect(confirm).to_be_hidden()
            assert launches == []  # asked twice, backed out twice: nothing sent

            button.click()
            page.click("#lab-bn-go")
            expect(confirm).to_be_hidden()
            expect(page.locator(".toast")).to_contain_text("Not launched: the init lab launches 5")
            expect(button).to_be_enabled()
            assert launches == [f"{server.url}/api/labs/init"]
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_a_tanh_labs_dead_unit_chart_says_why_it_is_empty_and_layer_names_stay_text(
    browser: Browser, tmp_path: Path
) -> None:
    """(1) A tanh lab's "Dead units per layer" drew empty axes and said nothing (the run page
    says tanh/sigmoid have no dead region): it says so. (2) Layer names are the charts' x
    categories: one named `<a href=...>` became a real link there. No <a> in any chart, and
    the name reads as written. Five recorded runs of tanh layers (no dead ratio)."""
    data_dir = tmp_path / "data"
    names = [LINK_NAME, "net.1", "net.2", "net.3"]
    runs = []
    for scheme in SCHEMES:
        run_id = f"tanhlab1-{scheme}"
        write_recorded_run(
            data_dir,
            run_id,
            steps=20,
            layers=4,
            every=10,
            layer_names=names,
            layer_kinds=["Tanh"] * 4,
            layer_stats={n: {"dead_ratio": None} for n in names},
        )
        runs.append({"id": run_id, "scheme": scheme, "label": scheme})
    params = {
        "activation": "tanh",
        "batch_norm": False,
        "depth": 4,
        "width": 8,
        "steps": 20,
        "every": 10,
        "dataset": "digits",
        "seed": 0,
        "lr": 0.01,
        "device": "cpu",
    }
    record = {"id": "tanhlab1", "kind": "init", "created_at": 0, "params": params, "runs": runs}
    (data_dir / "labs").mkdir(parents=True)
    (data_dir / "labs" / "tanhlab1.json").write_text(json.dumps(record))
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/labs/tanhlab1")
            expect(page.locator("#chart-dead .chart-note")).to_have_text(NO_DEAD_TANH)
            assert chart_points(page, "chart-dead") == []
            # the saturated chart has its lines, no note
            assert chart_points(page, "chart-sat") == [4] * 5
            expect(page.locator("#chart-sat .chart-note")).to_have_count(0)
            for chart in ("chart-mean", "chart-std", "chart-sym"):
                ticks = page.locator(f"#{chart} .xtick text").all_text_contents()
                assert ticks[0] == LINK_NAME, (chart, ticks)
            page.evaluate(
                "(() => { for (const gd of document.querySelectorAll('.js-plotly-plot'))"
                " for (let c = 0; c < (gd.data || []).length; c++)"
                " try { Plotly.Fx.hover(gd, [{curveNumber: c, pointNumber: 0}]); } catch (e) {} })()"
            )
            page.wait_for_timeout(100)  # Plotly drops a hover within 50 ms of the last
            page.evaluate(
                "Plotly.Fx.hover(document.getElementById('chart-mean'), [{curveNumber: 0, pointNumber: 0}])"
            )
            expect(page.locator("#chart-mean .hoverlayer")).to_contain_text(LINK_NAME)
            assert page.evaluate("document.querySelectorAll('.js-plotly-plot a').length") == 0
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote
