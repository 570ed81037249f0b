"""The runs list, the New-run form and the comparison page in headless Chromium
(runs.js, experiment_form.js, compare.js) against a real server and real runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from conftest import (
    FAST_CONFIG,
    LiveServer,
    PageGuard,
    chart_points,
    guarded_page,
    open_ready,
    screenshot,
    serve,
    server_settings,
    wait_for,
    write_many_runs,
    write_recorded_run,
)
from playwright.sync_api import Browser, Dialog, Locator, Page, Response, Route, expect
from websockets.sync.client import connect

pytestmark = pytest.mark.browser


def row(page: Page, run_id: str) -> Locator:
    return page.locator(f"#runs tr[data-run-id='{run_id}']")


def schema_paths(schema: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, spec in schema.items():
        if spec["type"] == "section":
            paths += schema_paths(spec["fields"], f"{prefix}{key}.")
        else:
            paths.append(prefix + key)
    return paths


def test_runs_list_filters_and_opens_a_comparison(
    page: Page, server: LiveServer, finished_run: dict[str, Any], live_run: dict[str, Any]
) -> None:
    open_ready(page, f"{server.url}/")
    done, live = row(page, finished_run["id"]), row(page, live_run["id"])
    expect(done.locator(".pill")).to_have_text("finished")
    expect(live.locator(".pill")).to_have_text("running")
    expect(done.locator("a")).to_have_text("replay digits")
    expect(done.locator(".config")).to_contain_text("activation tanh")
    assert done.locator("td.num").nth(1).inner_text() not in ("", "—")
    assert done.locator("td.spark polyline").count() == 1
    expect(live.locator("button.danger")).to_be_disabled()  # a connected trainer: stop it first
    screenshot(page, "runs-list")

    page.fill("#filter", "replay")
    expect(live).to_be_hidden()
    expect(done).to_be_visible()
    page.fill("#filter", "")
    expect(live).to_be_visible()

    compare = page.locator("#compare")
    expect(compare).to_be_disabled()
    done.locator("input[type=checkbox]").check()
    live.locator("input[type=checkbox]").check()
    expect(compare).to_be_enabled()
    compare.click()
    page.wait_for_url("**/compare?ids=*")
    page.wait_for_function("document.body.dataset.ready !== undefined", timeout=30_000)
    assert page.evaluate("document.body.dataset.ready") == "1"
    points = chart_points(page, "chart-loss")
    assert len(points) == 4 and points[0] > 0 and points[2] > 0  # train loss of both runs
    layer = page.eval_on_selector("#layer", "el => el.value")
    assert layer in [x["name"] for x in finished_run["layers"]]
    assert len(chart_points(page, "chart-dead")) == 2
    assert max(chart_points(page, "chart-sat")) > 0
    screenshot(page, "compare")


def test_new_run_form_shows_inline_errors_then_starts_a_run(
    page: Page, guard: PageGuard, server: LiveServer
) -> None:
    """A refused field's message is scrolled into view (review walk-through: the field at the
    form's bottom edge kept its message just below it, out of view), and a started run
    opens its own page (it stayed on the list)."""
    guard.expect_status(422)
    schema = server.api("GET", "/api/experiment_schema").json()
    before = {r["id"] for r in server.api("GET", "/api/runs").json()}
    open_ready(page, f"{server.url}/")
    page.click("#new-run")
    dialog = page.locator("#new-run-dialog")
    expect(dialog).to_be_visible()
    for path in schema_paths(schema):  # every knob the trainer offers has an input
        assert page.locator(f"[name='{path}']").count() == 1, path

    page.fill("[name='solver.batch_size']", "lots")
    page.locator("#new-run-fields").evaluate("e => { e.scrollTop = 0; }")
    page.fill("[name='solver.lr']", "-1")  # scrolled just into view: at the form's bottom edge
    page.click("#new-run-submit")
    lr = page.locator("[data-field='solver.lr']")
    expect(lr).to_have_class("field invalid")
    lr_error = page.locator(".field-wrap", has=lr).locator(".error")
    expect(lr_error).to_contain_text("must be >= 0")
    expect(page.locator("[name='solver.lr']")).to_be_focused()  # the first refused field
    in_view = """e => { const r = e.getBoundingClientRect();
        const box = document.getElementById('new-run-fields').getBoundingClientRect();
        return r.top >= box.top - 1 && r.bottom <= box.bottom + 1; }"""  # scrollTop is whole pixels
    assert lr_error.evaluate(in_view)
    batch = page.locator(".field-wrap", has=page.locator("[data-field='solver.batch_size']"))
    expect(batch.locator(".error")).to_contain_text("must be an integer")
    expect(dialog).to_be_visible()
    assert {r["id"] for r in server.api("GET", "/api/runs").json()} == before

    page.fill("[name='name']", "form digits")
    page.fill("[name='solver.lr']", "0.05")
    page.fill("[name='solver.batch_size']", "32")
    page.fill("[name='solver.steps']", "30")
    page.fill("[name='model.width']", "16")
    page.click("#new-run-submit")
    page.wait_for_url(f"{server.url}/runs/*")  # the started run's own page
    run_id = unquote(page.url.rsplit("/", 1)[1])
    assert run_id not in before
    config = server.run(run_id)["config"]
    assert config["solver"]["steps"] == 30 and config["model"]["width"] == 16

    wait_for(lambda: server.run(run_id)["status"] == "finished", 90, "the form's run to finish")
    page.go_back()  # the list, with the run on it
    expect(dialog).to_be_hidden()
    new_row = row(page, run_id)
    expect(new_row.locator("a")).to_have_text("form digits")
    delete = new_row.locator("button.danger")
    expect(delete).to_be_enabled()  # at the list's next poll after the trainer left
    delete.click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-ok")
    expect(new_row).to_have_count(0)
    assert server.api("GET", f"/api/runs/{run_id}").status_code == 404


def test_comparison_keeps_each_runs_curve_under_its_name_with_commas_and_a_deleted_run(
    browser: Browser, tmp_path: Path
) -> None:
    """Run ids may hold commas (one ids= per run; the older single ids=a,b is still split),
    and a run that stops loading (deleted since) keeps its slot: the charts' traces are by
    position, and dropping it moved every later run's curve under the run before it."""
    data_dir = tmp_path / "data"
    for run_id, steps in (("gone", 300), ("plain", 200), ("lr=0.1,bs=32", 100)):
        write_recorded_run(data_dir, run_id, steps=steps, layers=2, every=50)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            ids = "&".join(f"ids={quote(i, safe='')}" for i in ("gone", "plain", "lr=0.1,bs=32"))
            open_ready(page, f"{server.url}/compare?{ids}")
            legend = page.locator("#legend li")
            expect(legend).to_have_count(3)
            expect(legend.nth(2)).to_have_text("lr=0.1,bs=32 (finished)")
            assert chart_points(page, "chart-loss")[0::2] == [300, 200, 100]  # train losses
            assert server.api("DELETE", "/api/runs/gone").status_code == 204
            expect(page.locator("#banner")).to_contain_text("Not found: gone", timeout=20_000)
            time.sleep(1.0)  # the refresh's series requests come after the details
            assert chart_points(page, "chart-loss")[0::2] == [300, 200, 100]
            names = page.evaluate(
                "Array.from(document.getElementById('chart-loss').data, t => t.name)"
            )
            assert names[0::2] == ["gone train", "plain train", "lr=0.1,bs=32 train"]

            open_ready(page, f"{server.url}/compare?ids=plain,{quote('lr=0.1', safe='')}")
            expect(page.locator("#banner")).to_contain_text("Not found: lr=0.1")  # split: old form
        finally:
            page.context.close()
        assert not [e for e in guard.errors if "404" not in e], guard.errors
        assert not guard.remote, guard.remote


def test_comparison_legend_follows_each_runs_status_and_tells_same_named_runs_apart(
    browser: Browser, tmp_path: Path
) -> None:
    """Review F's compare1.py: the legend's statuses were built once ('(running)' after the
    run had finished), and two runs of the same name had the same legend and trace names.
    The first run's detail is answered as 'running' until the test lets the real one
    (finished) through."""
    data_dir = tmp_path / "data"
    for run_id in ("seed-a1b2c3d4e5f6", "seed-f6e5d4c3b2a1"):
        write_recorded_run(data_dir, run_id, steps=100, layers=2, every=50, name="digits")
    running = {"on": True}

    def answer(route: Route) -> None:
        detail = route.fetch().json()
        if running["on"]:
            detail["status"] = "running"
        route.fulfill(json=detail)

    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            page.route(f"{server.url}/api/runs/seed-a1b2c3d4e5f6", answer)
            open_ready(page, f"{server.url}/compare?ids=seed-a1b2c3d4e5f6&ids=seed-f6e5d4c3b2a1")
            legend = page.locator("#legend li")
            expect(legend.nth(0)).to_have_text("digits […c3d4e5f6] (running)")
            expect(legend.nth(1)).to_have_text("digits […d4c3b2a1] (finished)")
            names = page.evaluate(
                "Array.from(document.getElementById('chart-loss').data, t => t.name)"
            )
            assert names[0::2] == ["digits […c3d4e5f6] train", "digits […d4c3b2a1] train"]
            running["on"] = False
            expect(legend.nth(0)).to_have_text("digits […c3d4e5f6] (finished)", timeout=20_000)
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_comparison_ratio_charts_start_at_zero_with_no_data_or_all_zeros(
    browser: Browser, tmp_path: Path
) -> None:
    """Review walk-through: with no dead ratio (a tanh net) the dead-ratio chart's y axis ran
    -1 to 4, and an all-zero saturated ratio -1 to 1. With no data the chart says so (no
    axes); a ratio's axis runs 0 to 1 for zeros, and 0 to just above the largest value."""
    data_dir = tmp_path / "data"
    write_recorded_run(
        data_dir, "tanh", steps=100, layers=2, every=10, layer_kinds=["Tanh", "Tanh"],
        layer_stats={"layer0": {"dead_ratio": None}, "layer1": {"dead_ratio": None}},
    )  # fmt: skip
    write_recorded_run(data_dir, "relu", steps=100, layers=2, every=10)  # layer1: 0 .. 0.45
    y_range = "id => Array.from(document.getElementById(id)._fullLayout.yaxis.range)"
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/compare?ids=tanh")
            # no data at all: a note says so, with no axes to read a range from (charts.js)
            expect(page.locator("#chart-dead .chart-note")).to_contain_text("no dead ratio")
            assert (
                page.evaluate("document.getElementById('chart-dead')._fullLayout.yaxis.visible")
                is False
            )
            assert page.evaluate(y_range, "chart-sat") == [0, 1]  # zeros
            open_ready(page, f"{server.url}/compare?ids=tanh&ids=relu")
            page.select_option("#layer", "layer1")
            page.wait_for_function(
                "document.getElementById('chart-dead').data[1].y.some(v => v > 0.4)"
            )
            low, high = page.evaluate(y_range, "chart-dead")
            assert low == 0 and 0.45 < high < 0.6, (low, high)
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_select_all_acts_on_the_rows_the_filter_shows_and_reflects_them(
    browser: Browser, tmp_path: Path
) -> None:
    """Review F's selectall_filter.py: with a filter on, 'Select all' selected the rows
    shown and then unticked itself (it compared with every run), and a second click did
    not clear them."""
    data_dir = tmp_path / "data"
    for run_id in ("alpha-1", "alpha-2", "beta"):
        write_recorded_run(data_dir, run_id, steps=50, layers=1, every=25)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/")
            expect(page.locator("#runs tbody tr")).to_have_count(3)
            page.fill("#filter", "alpha")
            expect(page.locator("#runs tbody tr")).to_have_count(2)  # the server's search
            select_all = page.locator("#select-all")
            select_all.click()
            expect(select_all).to_be_checked()
            for run_id in ("alpha-1", "alpha-2"):
                expect(row(page, run_id).locator("input")).to_be_checked()
            expect(page.locator("#compare")).to_have_text("Compare selected (2)")
            time.sleep(2.5)  # a poll of the runs list (2 s) re-renders: still ticked
            expect(select_all).to_be_checked()
            select_all.click()
            expect(select_all).not_to_be_checked()
            for run_id in ("alpha-1", "alpha-2"):
                expect(row(page, run_id).locator("input")).not_to_be_checked()
            expect(page.locator("#compare")).to_have_text("Compare selected")
            select_all.click()
            page.fill("#filter", "")  # every run again: beta was never selected
            expect(page.locator("#runs tbody tr")).to_have_count(3)
            expect(row(page, "beta").locator("input")).not_to_be_checked()
            expect(select_all).to_have_js_property("indeterminate", True)
            expect(page.locator("#compare")).to_have_text("Compare selected (2)")
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_an_empty_required_number_is_an_inline_error_not_the_default(
    browser: Browser, tmp_path: Path
) -> None:
    """Review F's form1.py: clearing 'every' in the New-run form started a run with the
    default, and the Init lab with Steps empty said 'must be >= 1, got 0'."""
    for server in serve(server_settings(tmp_path / "data")):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/")
            expect(page.locator("#empty")).to_be_visible()  # an empty data dir: how to start
            expect(page.locator("#runs-count")).to_be_hidden()
            expect(page.locator("#more")).to_be_hidden()
            page.click("#new-run")
            dialog = page.locator("#new-run-dialog")
            expect(dialog).to_be_visible()
            page.fill("[name='every']", "")
            page.click("#new-run-submit")
            every = page.locator(".field-wrap", has=page.locator("[data-field='every']"))
            expect(every.locator(".error")).to_contain_text("required")
            expect(page.locator("[name='every']")).to_have_attribute("aria-invalid", "true")
            expect(dialog).to_be_visible()
            time.sleep(0.5)
            assert server.api("GET", "/api/runs").json() == []
            page.click("#new-run-cancel")

            page.click("#init-lab")
            page.fill("#lab-steps", "")
            page.click("#lab-submit")
            error = page.locator("#lab-error")
            expect(error).to_contain_text("Steps: required")
            expect(error).not_to_contain_text("got 0")
            assert server.api("GET", "/api/runs").json() == []
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_a_narrow_window_scrolls_the_runs_table_inside_its_panel(
    browser: Browser, tmp_path: Path
) -> None:
    """Review F's narrow1.py: at 800 px the table's last column (Delete) ran past its panel."""
    data_dir = tmp_path / "data"
    # a built-in run's config column; a normal init's std shown beside it (runs differing
    # only by std read alike)
    model = {**FAST_CONFIG["model"], "init": "normal", "init_std": 1.0}
    config = {**FAST_CONFIG, "model": model, "name": "mlp-tanh-normal1-digits"}
    name = "init lab 7ccf3782: normal 1.0 (tanh)"  # as long as a lab run's
    write_recorded_run(data_dir, "narrow", steps=50, layers=1, every=25, config=config, name=name)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            page.set_viewport_size({"width": 800, "height": 900})
            open_ready(page, f"{server.url}/")
            std = row(page, "narrow").locator(".config .kv", has_text="init_std")
            expect(std).to_have_text("init_std 1")
            delete = row(page, "narrow").locator("button.danger")
            delete.scroll_into_view_if_needed()
            expect(delete).to_be_in_viewport()
            box = delete.bounding_box()
            panel = page.locator("section.panel").first.bounding_box()
            assert box and panel
            assert box["x"] + box["width"] <= panel["x"] + panel["width"], (box, panel)
            assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_a_390px_window_shows_each_run_as_a_card_with_every_field_in_view(
    browser: Browser, tmp_path: Path
) -> None:
    """Review walk-through at 390 px: Step, Loss, the curve, Started and Delete sat in a
    sideways scroll with no cue, and the config was cut mid-word ('batch_norm fals'). Each
    run is a card there, every cell inside the panel; a desktop window keeps the table."""
    data_dir = tmp_path / "data"
    config = {**FAST_CONFIG, "model": {**FAST_CONFIG["model"], "batch_norm": False}}
    name = "init lab 9560e546: normal 0.01 (tanh)"
    write_recorded_run(data_dir, "card", steps=50, layers=1, every=25, config=config, name=name)
    outside = """tr => { const panel = document.querySelector('.table-scroll').getBoundingClientRect();
        return Array.from(tr.cells).filter((td) => { const r = td.getBoundingClientRect();
            return r.left < panel.left - 1 || r.right > panel.right + 1 || td.scrollWidth > td.clientWidth + 1;
        }).map((td) => td.className); }"""
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            page.set_viewport_size({"width": 390, "height": 844})
            open_ready(page, f"{server.url}/")
            card = row(page, "card")
            expect(card.locator(".config")).to_contain_text("batch_norm false")
            assert card.evaluate(outside) == []
            assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            label = "td => getComputedStyle(td, '::before').content + td.textContent"
            assert card.locator("td.step").evaluate(label) == '"step "49'  # no header shows
            expect(card.locator("button.danger")).to_be_in_viewport()
            page.get_by_text("Select all").click()
            expect(card.locator("input")).to_be_checked()

            page.set_viewport_size({"width": 1280, "height": 844})  # the table, one line a run
            assert card.evaluate("tr => getComputedStyle(tr).display") == "table-row"
            tops = card.evaluate(
                "tr => Array.from(tr.cells, (td) => td.getBoundingClientRect().top)"
            )
            assert len(set(tops)) == 1, tops
            expect(page.get_by_text("Select all")).to_be_hidden()
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


class ListPolls:
    """The runs list's answers a page received: (path and query, body bytes)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.seen: list[tuple[str, int]] = []
        self.labs = 0  # GET /api/labs answers

    def answered(self, response: Response) -> None:
        path = response.url.removeprefix(self.base_url)
        if path.startswith("/api/runs?") or path == "/api/runs":
            self.seen.append((path, len(response.body())))
        elif path == "/api/labs":
            self.labs += 1


def sweep_config(i: int) -> dict[str, Any]:
    """A built-in run's config; run 7's notes hold a tag the runs list trims from its rows."""
    return {
        **FAST_CONFIG,
        "name": f"sweep {i}",
        "notes": {"tag": "needle-7" if i == 7 else "hay"},
    }


def test_hundreds_of_runs_poll_a_page_and_search_every_runs_config_on_the_server(
    browser: Browser, tmp_path: Path
) -> None:
    """With 300 stored runs the page polled the whole list (GET /api/runs: 430 KB every 2 s),
    and its search filtered what it had received: a config value the list trims from its
    rows (notes.tag) or a run it did not hold was never found. It now polls the newest 50
    (Show more: 50 more), new runs still arrive at the top and statuses still change while
    it polls, and the search box's words are the server's q=."""
    data_dir = tmp_path / "data"
    write_many_runs(data_dir, 300, config_of=sweep_config)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        polls = ListPolls(server.url)
        page.on("response", polls.answered)
        try:
            open_ready(page, f"{server.url}/")
            listed = page.locator("#runs tbody tr")
            expect(listed).to_have_count(50)
            expect(listed.first).to_have_attribute("data-run-id", "run-0299")  # newest first
            expect(page.locator("#runs-count")).to_have_text("The newest 50 of 300 runs")
            # a comparison shows at most 10 runs (the server refuses more): the button says so
            boxes, compare = listed.locator("input[type=checkbox]"), page.locator("#compare")
            for i in range(11):
                boxes.nth(i).check()
            expect(compare).to_have_text("Compare selected (11; at most 10)")
            expect(compare).to_be_disabled()
            boxes.nth(10).uncheck()
            expect(compare).to_be_enabled()
            for i in range(10):
                boxes.nth(i).uncheck()
            deadline = time.monotonic() + 10
            while len(polls.seen) < 2 and time.monotonic() < deadline:
                page.wait_for_timeout(
                    100
                )  # playwright delivers responses meanwhile; sleep would not
            assert len(polls.seen) >= 2, polls.seen
            for path, size in polls.seen:
                assert path == "/api/runs?limit=50", path
                assert size < 60_000, (path, size)  # the whole list was 430 KB
            # every lab and its runs' details: asked when the list shows a run not seen before
            assert polls.labs == 1

            more = page.locator("#more")
            expect(more).to_have_text("Show 50 more")
            more.click()
            expect(listed).to_have_count(100)
            expect(page.locator("#runs-count")).to_have_text("The newest 100 of 300 runs")
            row(page, "run-0299").locator("input").check()

            # a trainer connects: its run arrives at the top, and its status follows it
            with connect(f"ws://127.0.0.1:{server.settings.port}/ws/trainer") as trainer:
                hello = {
                    "v": 1,
                    "type": "hello",
                    "run_id": "fresh",
                    "name": "fresh run",
                    "config": {"lr": 0.1},
                    "layers": [{"name": "layer0", "kind": "Linear", "units": 8}],
                }
                trainer.send(json.dumps(hello))
                assert json.loads(trainer.recv(10))["type"] == "welcome"
                expect(listed.first).to_have_attribute("data-run-id", "fresh")
                fresh = row(page, "fresh")
                expect(fresh.locator(".pill")).to_have_text("running")
                expect(fresh.locator("button.danger")).to_be_disabled()
                paused = {"status": "paused"}
                event = {
                    "v": 1,
                    "type": "event",
                    "seq": 1,
                    "step": 0,
                    "kind": "status",
                    "data": paused,
                }
                trainer.send(json.dumps(event))
                expect(fresh.locator(".pill")).to_have_text("paused")
            expect(page.locator("#runs-count")).to_have_text("The newest 100 of 301 runs")
            assert polls.labs >= 2  # the new run's lab, if any

            page.fill("#filter", "needle-7")  # run-0007: far past the page, its tag trimmed
            expect(listed).to_have_count(1)
            expect(listed.first).to_have_attribute("data-run-id", "run-0007")
            expect(page.locator("#runs-count")).to_have_text("1 run matches “needle-7”")
            expect(more).to_be_hidden()
            assert any("q=needle-7" in path for path, _ in polls.seen)
            row(page, "run-0007").locator("input").check()
            expect(page.locator("#compare")).to_have_text("Compare selected (2)")  # both searches'

            page.fill("#filter", "sweep 29")  # every word: sweep 29, 290-299, 129, 229
            expect(page.locator("#runs-count")).to_have_text("13 runs match “sweep 29”")
            page.fill("#filter", "no-such-thing")
            expect(listed).to_have_count(0)
            expect(page.locator("#runs-count")).to_contain_text("No run matches “no-such-thing”")
            expect(page.locator("#empty")).to_be_hidden()  # not "No runs yet"
            page.fill("#filter", "")
            expect(listed).to_have_count(50)  # the newest page again
            expect(row(page, "run-0299").locator("input")).to_be_checked()
            expect(page.locator("#compare")).to_have_text("Compare selected (2)")
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


class Dialogs:
    """The alert/confirm dialogs a page opened (each dismissed)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def opened(self, dialog: Dialog) -> None:
        self.seen.append(dialog.message)
        dialog.dismiss()


def test_a_400px_window_keyboard_use_and_a_run_named_with_html(
    browser: Browser, tmp_path: Path
) -> None:
    """A new user's try at 400 px: the toolbar ran its buttons (New run among them) past
    the panel and the page scrolled sideways. A run name holding HTML and quotes shows as
    written (text, never markup) and is found by the search, driven from the keyboard."""
    data_dir = tmp_path / "data"
    odd = "<b>x</b> \"quoted\" & 'single' <img src=x onerror=alert(1)>"
    write_recorded_run(data_dir, "odd", steps=50, layers=1, every=25, name=odd)
    write_recorded_run(data_dir, "plain", steps=50, layers=1, every=25)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        dialogs = Dialogs()
        page.on("dialog", dialogs.opened)  # an alert() made of the name: never
        try:
            page.set_viewport_size({"width": 400, "height": 800})
            open_ready(page, f"{server.url}/")
            assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            panel = page.locator("section.panel").first.bounding_box()
            assert panel
            for button in ("#new-run", "#init-lab", "#compare"):
                box = page.locator(button).bounding_box()
                assert box and box["x"] + box["width"] <= panel["x"] + panel["width"], button
            link = row(page, "odd").locator("td a").first
            expect(link).to_have_text(odd)
            assert link.evaluate("a => a.children.length") == 0  # no <b> or <img> made of it

            page.locator("#filter").focus()
            page.keyboard.type('"quoted" <b>')
            page.keyboard.press("Enter")
            expect(page.locator("#runs tbody tr")).to_have_count(1)
            expect(page.locator("#runs-count")).to_have_text('1 run matches “"quoted" <b>”')
            page.keyboard.press("Tab")  # on to the toolbar's buttons, then the row
            for _ in range(6):
                if page.evaluate("document.activeElement.closest('tr')?.dataset.runId") == "odd":
                    break
                page.keyboard.press("Tab")
            page.keyboard.press("Space")  # the row's checkbox
            expect(row(page, "odd").locator("input")).to_be_checked()
        finally:
            page.context.close()
        assert not dialogs.seen, dialogs.seen
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_a_run_that_ended_without_a_sanity_verdict_is_not_asked_for_one_every_poll(
    browser: Browser, tmp_path: Path
) -> None:
    """Every 2 s poll asked each listed run whose config has an overfit check for its
    sanity event until one came, for good when none ever would (the run ended first): up
    to 50 requests a poll. A run that ended is asked once; one with a verdict shows it."""
    data_dir = tmp_path / "data"
    overfit = {"source": "recorded", "overfit": {"batches": 1}}
    verdict = {"passed": True, "message": "overfit one batch"}
    write_recorded_run(data_dir, "silent", steps=50, layers=1, every=25, config=overfit)
    write_recorded_run(
        data_dir, "checked", steps=50, layers=1, every=25, config=overfit,
        events=[(10, "sanity", verdict)],
    )  # fmt: skip
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/")
            expect(row(page, "checked").locator(".badge.sanity")).to_have_text("PASS")
            polls = ListPolls(server.url)
            page.on("response", polls.answered)
            deadline = time.monotonic() + 10
            while len(polls.seen) < 2 and time.monotonic() < deadline:
                page.wait_for_timeout(100)
            assert len(polls.seen) >= 2, polls.seen
            asked = [u for u in guard.requests if "/events?kind=sanity" in u]
            assert len([u for u in asked if "/runs/silent/" in u]) == 1, asked
            assert len([u for u in asked if "/runs/checked/" in u]) == 1, asked
            expect(row(page, "silent").locator(".badge.sanity")).to_have_count(0)
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_the_last_show_more_from_the_keyboard_goes_on_at_the_first_run_it_added(
    browser: Browser, tmp_path: Path
) -> None:
    """'Show N more' hides itself once every run is listed; pressed from the keyboard, the
    focus fell back to the page's start. It moves to the first run it added."""
    data_dir = tmp_path / "data"
    write_many_runs(data_dir, 60, config_of=sweep_config)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/")
            more = page.locator("#more")
            expect(more).to_have_text("Show 10 more")
            more.focus()
            page.keyboard.press("Enter")
            expect(page.locator("#runs tbody tr")).to_have_count(60)
            expect(more).to_be_hidden()
            expect(page.locator("#runs-count")).to_have_text("60 runs")
            expect(row(page, "run-0009").locator("input")).to_be_focused()  # the 51st, newest first
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote
