"""The runs list, the New-run form and the comparison page in headless Chromium
(runs.js, experiment_form.js, compare.js) against a real server and real runs."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import LiveServer, PageGuard, chart_points, open_ready, screenshot, wait_for
from playwright.sync_api import Locator, Page, expect

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
    guard.expect_status(422)
    schema = server.api("GET", "/api/experiment_schema").json()
    before = {r["id"] for r in server.api("GET", "/api/runs").json()}
    open_ready(page, f"{server.url}/")
    page.click("#new-run")
    dialog = page.locator("#new-run-dialog")
    expect(dialog).to_be_visible()
    for path in schema_paths(schema):  # every knob the trainer offers has an input
        assert page.locator(f"[name='{path}']").count() == 1, path

    page.fill("[name='solver.lr']", "-1")
    page.fill("[name='solver.batch_size']", "lots")
    page.click("#new-run-submit")
    lr = page.locator("[data-field='solver.lr']")
    expect(lr).to_have_class("field invalid")
    expect(page.locator(".field-wrap", has=lr).locator(".error")).to_contain_text("must be >= 0")
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
    expect(dialog).to_be_hidden()
    new_row = page.locator("#runs tr", has=page.locator("a", has_text="form digits"))
    expect(new_row).to_be_visible()
    run_id = new_row.get_attribute("data-run-id")
    assert run_id and run_id not in before
    config = server.run(run_id)["config"]
    assert config["solver"]["steps"] == 30 and config["model"]["width"] == 16

    wait_for(lambda: server.run(run_id)["status"] == "finished", 90, "the form's run to finish")
    delete = new_row.locator("button.danger")
    expect(delete).to_be_enabled()  # at the list's next poll after the trainer left
    delete.click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-ok")
    expect(new_row).to_have_count(0)
    assert server.api("GET", f"/api/runs/{run_id}").status_code == 404
