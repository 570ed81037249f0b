"""Replaying a finished run in headless Chromium: the scrubber, ?step=N deep links, play/pause,
and every chart following the cursor (replay.js, snapshots.js, run.js)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import (
    LiveServer,
    chart_trace,
    guarded_page,
    open_ready,
    screenshot,
    serve,
    server_settings,
    wait_for,
    write_recorded_run,
)
from playwright.sync_api import Browser, Page, expect

pytestmark = pytest.mark.browser


def shown_histograms(page: Page) -> dict[str, list[int]]:
    pairs = page.eval_on_selector_all(
        ".multiple", "els => els.map(e => [e.dataset.layer, JSON.parse(e.dataset.counts)])"
    )
    return {name: counts for name, counts in pairs}


def stored_histograms(
    server: LiveServer, run_id: str, step: int
) -> tuple[int, dict[str, list[int]]]:
    answer = server.api("GET", f"/api/runs/{run_id}/histogram", params={"step": step}).json()
    return answer["step"], {layer["name"]: layer["counts"] for layer in answer["layers"]}


def multiple_ranges(page: Page) -> list[list[str]]:
    """The lo and hi printed under each small multiple."""
    return list(
        page.eval_on_selector_all(
            ".multiple .range",
            "els => els.map(e => [...e.querySelectorAll('span')].map(s => s.textContent))",
        )
    )


def scrub(page: Page, step: int) -> None:
    """Moves the scrubber as a drag does: set its value, fire `input`."""
    page.eval_on_selector(
        "#scrubber",
        "(el, s) => { el.value = String(s); el.dispatchEvent(new Event('input')); }",
        step,
    )


def cursor_lines(page: Page, chart: str) -> list[float]:
    """x of the solid (cursor) lines drawn on a chart."""
    return list(
        page.evaluate(
            "id => (document.getElementById(id).layout.shapes || [])"
            ".filter(s => s.line.dash !== 'dot' && s.name !== 'alert').map(s => s.x0)",
            chart,
        )
    )


def alert_lines(page: Page, chart: str) -> list[float]:
    """x of the alert markers drawn on a chart."""
    return list(
        page.evaluate(
            "id => (document.getElementById(id).layout.shapes || [])"
            ".filter(s => s.name === 'alert').map(s => s.x0)",
            chart,
        )
    )


def test_deep_link_and_scrubbing_show_the_histograms_stored_for_that_step(
    page: Page, server: LiveServer, finished_run: dict[str, Any]
) -> None:
    run_id = finished_run["id"]
    open_ready(page, f"{server.url}/runs/{run_id}?step=62")
    expect(page.locator("#replay")).to_be_visible()
    assert page.eval_on_selector("#scrubber", "el => el.value") == "62"
    step, stored = stored_histograms(server, run_id, 62)
    assert step <= 62
    expect(page.locator("#multiples-step")).to_have_text(str(step))
    assert shown_histograms(page) == stored


def test_space_on_the_scrubber_plays_and_pauses(
    page: Page, server: LiveServer, finished_run: dict[str, Any]
) -> None:
    """After stepping with the arrow keys the focus is on the scrubber, where Space did
    nothing (the page's Space leaves a focused field alone): it now plays and pauses."""
    run_id = finished_run["id"]
    last = finished_run["last_step"]
    open_ready(page, f"{server.url}/runs/{run_id}?step=0")
    # the scrubber starts at the first stored row (watch()'s step 1), not at 0
    assert page.eval_on_selector("#scrubber", "el => [el.min, el.value]") == ["1", "1"]
    page.select_option("#speed", "1")
    page.focus("#scrubber")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#cursor-step")).to_have_text("2")
    page.keyboard.press("Space")
    page.wait_for_function("Number(document.getElementById('replay').dataset.cursor) >= 3")
    page.keyboard.press("Space")
    expect(page.locator("#play")).to_have_text("▶")
    held = page.eval_on_selector("#replay", "el => Number(el.dataset.cursor)")
    page.wait_for_timeout(600)
    assert page.eval_on_selector("#replay", "el => Number(el.dataset.cursor)") == held
    assert held < last
    assert page.evaluate("document.activeElement.id") == "scrubber"

    scrub(page, 121)
    step, stored = stored_histograms(server, run_id, 121)
    expect(page.locator("#multiples-step")).to_have_text(str(step))
    assert shown_histograms(page) == stored
    page.wait_for_function("new URLSearchParams(location.search).get('step') === '121'")
    # (a tanh net: the dead heatmap shows its no-dead-region message, with no cursor)
    for chart in ("chart-loss", "chart-lr", "chart-sat", "chart-hist", "chart-grad", "chart-other"):
        page.wait_for_function(
            "id => (document.getElementById(id).layout.shapes || []).some(s => s.x0 === 121)",
            arg=chart,
        )
        assert cursor_lines(page, chart) == [121], chart

    expect(page.locator("#control-reason")).to_contain_text("ended")
    expect(page.locator("button[data-cmd='pause-toggle']")).to_be_disabled()
    screenshot(page, "run-replay")


def test_play_moves_the_cursor_and_pause_holds_it(
    page: Page, server: LiveServer, finished_run: dict[str, Any]
) -> None:
    run_id = finished_run["id"]
    last = finished_run["last_step"]
    open_ready(page, f"{server.url}/runs/{run_id}?step=0")
    # x1 is the pace the trainer's clock (its rows' time_s) says it trained at
    clock = server.run(run_id)["clock"]
    trained = (clock["last_step"] - clock["first_step"]) / (
        clock["last_time_s"] - clock["first_time_s"]
    )
    assert float(page.eval_on_selector("#replay", "el => el.dataset.pace")) == pytest.approx(
        trained
    )
    # x0.1: a fast built-in run trains ~150 steps a second, so at x1 a starved page's
    # next animation frame could carry the cursor to the end before the pause click
    page.select_option("#speed", "0.1")
    page.click("#play")
    page.wait_for_function("Number(document.getElementById('replay').dataset.cursor) >= 3")
    page.click("#play")
    held = page.eval_on_selector("#replay", "el => Number(el.dataset.cursor)")
    page.wait_for_timeout(600)
    assert page.eval_on_selector("#replay", "el => Number(el.dataset.cursor)") == held
    assert held < last

    page.select_option("#speed", "100")
    page.locator("body").press("Space")  # Space plays a replay
    page.wait_for_function(
        "last => Number(document.getElementById('replay').dataset.cursor) === last", arg=last
    )
    expect(page.locator("#play")).to_have_text("▶")
    step, stored = stored_histograms(server, run_id, last)
    expect(page.locator("#multiples-step")).to_have_text(str(step))
    assert shown_histograms(page) == stored
    # the event log gives an applied command's reason whoever sent it (a resumed run's
    # restored steering said only "set_lr_scale ×0.5 applied at step 500"), and says it was
    # applied after step 500 (it said "at": the new lr holds from step 501, DESIGN §4)
    described = page.evaluate(
        """async () => {
          const { describeEvent } = await import('/static/js/eventlog.js');
          const data = { name: "set_lr_scale", args: { value: 0.5 }, ok: true,
                         applied_at_step: 500, source: "api",
                         reason: "restored from checkpoint-500.pt" };
          return [describeEvent({ kind: "command_result", step: 500, data }),
                  describeEvent({ kind: "command_result", step: 500,
                                  data: { ...data, reason: undefined } })];
        }"""
    )
    assert described[0].endswith("applied after step 500 · restored from checkpoint-500.pt")
    assert described[1].endswith("applied after step 500"), described


def test_a_recorded_runs_alerts_rule_actions_and_sanity_verdict_show_in_replay(
    browser: Browser, tmp_path: Path
) -> None:
    """What the rules left in a run's record: the alert in the alerts panel, the rule's
    command as a 'rule: reason' marker apart from user markers and in the event log, and
    the overfit check's FAIL badge on the run page and in the runs list. Scrubbed back, the
    page shows the run as it stood at the cursor: the alerts raised by then (it listed
    every alert of the run) and the control state acknowledged by then (it showed the
    run's last); the loss chart marks where each alert fired."""
    data_dir = tmp_path / "data"
    state = {
        "paused": False,
        "lr_scale": 0.5,
        "weight_decay_enabled": True,
        "frozen": [],
        "stopping": False,
    }
    alert = {
        "rule": "Saturation",
        "layer": "layer2",
        "message": "layer2: 80% of units saturated",
        "value": 0.8,
        "threshold": 0.5,
        # an alert whose rule acts carries its action as the trainer sends it
        "action": {
            "name": "set_lr_scale",
            "args": {"value": 0.5},
            "source": "rule",
            "reason": "saturation",
        },
    }
    nan = {
        "rule": "NonFinite",
        "message": "loss is nan",
        "action": {"name": "pause", "args": {}, "source": "rule", "reason": "loss is nan"},
    }
    halve = {
        "id": "rule-1",
        "cmd_seq": None,
        "name": "set_lr_scale",
        "args": {"value": 0.5},
        "ok": True,
        "applied_at_step": 250,
        "state": state,
        "source": "rule",
        "reason": "validation loss plateau",
    }
    sanity = {
        "passed": False,
        "train_acc": 0.62,
        "steps": 300,
        "examples": 100,
        "message": "FAIL: 62.00% training accuracy on 100 examples",
    }
    write_recorded_run(
        data_dir,
        "ruled",
        steps=300,
        layers=3,
        every=20,
        config={"overfit": 100},
        events=[
            (120, "alert", alert),
            (250, "command_result", halve),
            (260, "alert", nan),
            (299, "sanity", sanity),
        ],
    )
    early = [
        (1, "alert", {"rule": rule, "layer": "layer0", "message": f"{rule} at step 1"})
        for rule in ("DeadUnits", "VanishingGradient", "AllZero")
    ]
    passed = {**sanity, "passed": True, "message": "PASS: 100.00% training accuracy"}
    scales = [
        (100 + i // 2, "command_result", {**halve, "id": f"c{i}", "args": {"value": v},
                                          "applied_at_step": 100 + i // 2,
                                          "state": {**state, "lr_scale": v}})
        for i, v in enumerate([0.5, 0.25] * 300)
    ]  # fmt: skip
    write_recorded_run(
        data_dir, "crowded", steps=400, layers=2, every=50,
        events=[*early, (2, "sanity", passed), *scales],
    )  # fmt: skip
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/ruled")
            expect(page.locator("#sanity")).to_have_text("sanity FAIL")
            alerts = page.locator("#alerts li.alert")
            expect(alerts).to_have_count(2)
            # an action in words, not "→ [object Object]" (review F's nan2.py)
            expect(alerts.nth(1)).to_contain_text(
                "Saturation [layer2] layer2: 80% of units saturated → set_lr_scale ×0.5"
            )
            expect(alerts.nth(1)).to_contain_text("step 120")
            expect(alerts.nth(0)).to_contain_text("NonFinite loss is nan → pause")
            expect(page.locator("#events")).to_contain_text("loss is nan → pause")
            expect(page.locator("#events")).not_to_contain_text("[object Object]")
            rule_line = page.locator("#events li.rule")
            expect(rule_line).to_contain_text("rule: validation loss plateau")
            markers = page.evaluate(
                "() => { const t = document.getElementById('chart-lr').data.find(d => d.name === 'commands');"
                " return {x: Array.from(t.x), text: Array.from(t.text), symbol: t.marker.symbol}; }"
            )
            # applied after step 250: drawn half a step on, on the heatmaps too, and said so
            assert markers["x"] == [250.5] and markers["symbol"] == ["triangle-up"]
            assert markers["text"][0].startswith("rule: validation loss plateau")
            assert markers["text"][0].endswith("· applied after step 250")
            expect(rule_line).to_contain_text("set_lr_scale ×0.5 applied after step 250")
            dotted = page.evaluate(
                "(document.getElementById('chart-dead').layout.shapes || [])"
                ".filter(s => s.line.dash === 'dot').map(s => s.x0)"
            )
            assert dotted == [250.5], dotted
            listed = server.api("GET", "/api/runs/ruled/commands").json()
            assert [(c["origin"], c["source"]) for c in listed] == [("trainer", "rule")]
            # the acknowledged state says at which step each part took its value, after a
            # (re)load too: the steps come from the stored commands
            # applied after step 250, the halving holds from step 251 on: said so, as the log does
            expect(page.locator("#acked")).to_contain_text("LR ×0.5 (after step 250)")
            expect(page.locator("#acked")).to_contain_text("last: set_lr_scale after step 250")
            expect(page.locator("#lr-scale")).to_have_value("0.5")
            assert alert_lines(page, "chart-loss") == [120, 260]
            # at the run's end no line of the log is after the cursor
            expect(page.locator("#events li.after-cursor")).to_have_count(0)
            # x1 is the trainer's clock's pace: its rows' time_s is 0.01 s a step
            pace = page.eval_on_selector("#replay", "el => Number(el.dataset.pace)")
            assert pace == pytest.approx(100)

            shown = page.locator("#alerts li.alert:visible")
            scrub(page, 255)  # the saturation alert and the rule's halving, not the NaN yet
            expect(shown).to_have_count(1)
            expect(shown).to_contain_text("step 120")
            expect(page.locator("#acked")).to_contain_text("as of step 255: running")
            expect(page.locator("#acked")).to_contain_text("LR ×0.5 (after step 250)")
            # the LR field is the cursor's scale too (it kept the run's last at every step)
            expect(page.locator("#lr-scale")).to_have_value("0.5")
            # the verdict came at step 299: none yet at 255 (it read FAIL at every step)
            expect(page.locator("#sanity")).to_have_text("sanity: no verdict yet")
            # the log keeps what came after the cursor, marked so: the NaN alert (260), the
            # verdict and the end (299); the halving (after step 250) is in effect
            later = page.locator("#events li.after-cursor")
            expect(later).to_have_count(3)
            expect(later.nth(2)).to_contain_text("loss is nan")
            expect(rule_line).not_to_have_class(re.compile("after-cursor"))
            scrub(page, 250)  # the halving's own step still trained at x1: not in effect yet
            expect(page.locator("#acked")).to_have_text(
                "run finished; no command acknowledged by step 250: it ran as started so far."
            )
            expect(page.locator("#lr-scale")).to_have_value("1")
            expect(rule_line).to_have_class(re.compile("after-cursor"))
            scrub(page, 200)  # before the halving
            expect(page.locator("#acked")).to_have_text(
                "run finished; no command acknowledged by step 200: it ran as started so far."
            )
            expect(shown).to_have_count(1)
            scrub(page, 100)  # before any alert
            expect(shown).to_have_count(0)
            expect(page.locator("#alerts li:visible")).to_have_text("No alerts by step 100.")
            page.wait_for_function(
                "(document.getElementById('chart-loss').layout.shapes || []).some(s => s.x0 === 100)"
            )
            assert cursor_lines(page, "chart-loss") == [100]
            assert alert_lines(page, "chart-loss") == [120, 260]  # a cursor move keeps them
            scrub(page, 299)  # the end: the whole run's again
            expect(page.locator("#alerts li.alert:visible")).to_have_count(2)
            expect(page.locator("#acked")).to_contain_text(
                "run finished; last acknowledged state: LR ×"
            )
            expect(page.locator("#sanity")).to_have_text("sanity FAIL")
            expect(page.locator("#lr-scale")).to_have_value("0.5")
            expect(later).to_have_count(0)

            # More events than the log reads (500): the alerts, the verdict and the control
            # state at the cursor are still the run's (the alerts at step 1 were lost with the
            # oldest events: "No alerts.", no marker), and the log says it lists only the newest
            open_ready(page, f"{server.url}/runs/crowded?step=50")
            crowded = page.locator("#alerts li.alert:visible")
            expect(crowded).to_have_count(3)
            for rule in ("DeadUnits", "VanishingGradient", "AllZero"):
                expect(page.locator("#alerts")).to_contain_text(rule)
            # dead units with no zero init in sight: a lower LR may help, the button is offered
            dead = page.locator("#alerts li.alert", has_text="DeadUnits")
            expect(dead.locator("button[data-suggest='halve_lr']")).to_have_count(1)
            assert alert_lines(page, "chart-loss") == [1]
            expect(page.locator("#sanity")).to_have_text("sanity PASS")
            expect(page.locator("#acked")).to_contain_text("no command acknowledged by step 50")
            expect(page.locator("#lr-scale")).to_have_value("1")
            lines = page.locator("#events li[data-kind]")
            expect(lines).to_have_count(500)
            older = page.locator("#events li.older")
            expect(older).to_contain_text("Older events not shown: this log lists the newest 500")
            expect(page.locator("#events li.after-cursor")).to_have_count(500)
            older.locator("button").click()
            expect(lines).to_have_count(605)
            expect(older).to_have_count(0)
            expect(lines.last).to_contain_text("DeadUnits")
            # the loaded lines are marked against the cursor as well: all but step 1's and 2's
            expect(page.locator("#events li.after-cursor")).to_have_count(601)
            scrub(page, 150)  # the commands applied after step 149 hold; step 150's do not yet
            expect(page.locator("#acked")).to_contain_text("LR ×0.25 (after step 149)")
            expect(page.locator("#acked")).to_contain_text("last: set_lr_scale after step 149")
            expect(page.locator("#lr-scale")).to_have_value("0.25")

            open_ready(page, f"{server.url}/")
            expect(page.locator("#runs tr[data-run-id='ruled'] .badge.sanity")).to_have_text("FAIL")
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_a_zero_init_runs_dead_units_alert_offers_no_halve_lr(
    browser: Browser, tmp_path: Path
) -> None:
    """A zero-init ReLU run's DeadUnits alert offered a one-click "Halve LR" (its advice says
    "a lower learning rate"); a zero init never breaks symmetry whatever the step size, and
    the fix is the init (PRACTICES.md). No button there, and the alert says why: when the
    run's config says init zero, or an alert by then names a zero init (a watch() run)."""
    data_dir = tmp_path / "data"
    dead = {
        "rule": "DeadUnits", "layer": "net.1", "value": 1.0, "threshold": 0.5,
        "message": "layer net.1: 100% of units are dead (active on at most 1% of their values), "
        "above the 50% threshold at step 10. Dead ReLUs pass no gradient and do not recover: "
        "try He init, a lower learning rate, batch norm or LeakyReLU.",
    }  # fmt: skip
    zeros = {
        "rule": "AllZero", "layer": "net.1", "value": 1.0, "threshold": 1.0,
        "message": "layer net.1: its input (the output of layer net.0) is 100% zeros at step 1. "
        "From the first probed layer, net.0, on every value is the same (std 0): a zero init, "
        "which never breaks symmetry. Use He init.",
    }  # fmt: skip
    config = {"model": {"arch": "mlp", "activation": "relu", "init": "zero"}}
    write_recorded_run(data_dir, "zero", steps=20, layers=2, every=10, config=config,
                       events=[(10, "alert", dead)])  # fmt: skip
    write_recorded_run(data_dir, "watched", steps=20, layers=2, every=10,
                       events=[(1, "alert", zeros), (10, "alert", dead)])  # fmt: skip
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            for run_id, why in (
                ("zero", "this run's init is zero"),
                ("watched", "AllZero alert at step 1 names a zero init"),
            ):
                open_ready(page, f"{server.url}/runs/{run_id}")
                alert = page.locator("#alerts li.alert", has_text="DeadUnits")
                expect(alert).to_have_count(1)
                expect(alert.locator(".suggest-none")).to_contain_text(f"No Halve LR: {why}")
                expect(alert.locator(".suggest-none")).to_contain_text("The fix is the init")
                expect(alert.locator("button")).to_have_count(0)
        finally:
            page.context.close()
        assert not guard.errors, guard.errors


def test_an_overfit_alert_offers_weight_decay_on_only_where_its_advice_asks_for_it(
    browser: Browser, tmp_path: Path
) -> None:
    """Every Overfit alert without an action offered "Switch weight decay on", even one
    whose advice was to fix an under-fitting model first (PRACTICES.md: no weight decay
    while the model under-fits) or one on a run whose weight decay was on already. The
    button now comes only with the advice that asks for it."""
    data_dir = tmp_path / "data"
    head = "validation loss 1.7 is 16% above training loss 1.5 at step {}, over the 10% threshold for 3 evaluations"
    alerts = {
        10: head.format(10) + ": the model is over-fitting. Switch weight decay on (it is off now), "
        "or add dropout or more data.",
        20: head.format(20) + ", but the model is still under-fitting: Saturation holds in net.1; "
        "fix those first: weight decay or dropout now would only add to the under-fitting.",
        30: head.format(30) + ": the model is over-fitting. Weight decay is on: raise it, or add "
        "dropout or more data.",
    }  # fmt: skip
    events = [
        (step, "alert", {"rule": "Overfit", "layer": None, "value": 0.16, "threshold": 0.1,
                         "message": message})
        for step, message in alerts.items()
    ]  # fmt: skip
    write_recorded_run(data_dir, "fits", steps=40, layers=2, every=10, events=events)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/fits")
            overfit = page.locator("#alerts li.alert", has_text="Overfit")
            expect(overfit).to_have_count(3)
            offered = page.locator("#alerts li.alert", has_text="it is off now")
            expect(offered.get_by_role("button", name="Switch weight decay on")).to_have_count(1)
            for words in ("still under-fitting", "Weight decay is on: raise it"):
                alert = page.locator("#alerts li.alert", has_text=words)
                expect(alert).to_have_count(1)
                expect(alert.get_by_role("button", name="Switch weight decay on")).to_have_count(0)
        finally:
            page.context.close()
        assert not guard.errors, guard.errors


def test_odd_run_ids_and_layer_names_step_0_and_space_on_a_dropdown(
    browser: Browser, tmp_path: Path
) -> None:
    """A run id holding '#', '?', ',' and a space (watch() takes it) gets a working export
    link; nn.Sequential's layer names ('0.1', '0.10', '1') are rows of their own in the
    heatmaps, not numbers on a linear axis; a ?step=0 link draws the cursor at step 0; and
    Space on a focused dropdown opens it instead of playing the replay (or pausing a run)."""
    data_dir = tmp_path / "data"
    run_id = "exp #1?lr=0.1,bs=32"
    names = ["0.1", "0.10", "0.11", "1"]
    write_recorded_run(data_dir, run_id, steps=200, layers=4, every=20, layer_names=names)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/{quote(run_id, safe='')}?step=0")
            for chart in ("chart-loss", "chart-dead"):
                assert cursor_lines(page, chart) == [0], chart
            href = page.eval_on_selector("#export", "el => el.href")
            assert server.client.get(href).status_code == 200, href
            axis = page.evaluate(
                "() => { const l = document.getElementById('chart-dead')._fullLayout.yaxis;"
                " return {type: l.type, ticks: l._vals.map(v => v.text)}; }"
            )
            assert axis["type"] == "category" and sorted(axis["ticks"]) == sorted(names)

            summary = page.locator("#freeze-picker summary")
            summary.focus()
            page.keyboard.press("Space")
            expect(page.locator("#freeze-picker")).to_have_attribute("open", "")
            assert page.locator("#play").inner_text() == "▶", "Space played the replay"
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


# Records every Plotly.react call (chart id, traces' point counts) before the page runs.
RECORD_DRAWS_JS = """
window.__draws = [];
let plotly;
Object.defineProperty(window, 'Plotly', { configurable: true, get: () => plotly, set(p) {
  plotly = p;
  const react = p.react;
  p.react = function (div, data, ...rest) {
    window.__draws.push([div.id, data.map((t) => (t.x || t.z || []).length)]);
    return react.call(this, div, data, ...rest);
  };
}});
"""


def test_opening_a_run_paints_the_charts_in_the_window_first_each_once_with_its_data(
    page: Page, server: LiveServer, finished_run: dict[str, Any]
) -> None:
    page.add_init_script(RECORD_DRAWS_JS)
    open_ready(page, f"{server.url}/runs/{finished_run['id']}")
    in_window = page.eval_on_selector_all(
        ".chart, #multiples",
        "els => els.filter(e => { const r = e.getBoundingClientRect();"
        " return r.width > 0 && r.bottom > 0 && r.top < innerHeight; }).map(e => e.id)",
    )
    painted = page.evaluate("document.body.dataset.paintedCharts").split()
    assert "chart-loss" in painted and "chart-update" not in painted
    assert sorted(painted) == sorted(in_window)
    painted_ms, ready_ms = page.evaluate(
        "[document.body.dataset.paintedMs, document.body.dataset.readyMs].map(Number)"
    )
    assert 0 < painted_ms <= ready_ms
    draws: list[tuple[str, list[int]]] = page.evaluate("window.__draws")
    first: dict[str, list[int]] = {}
    for chart, points in draws:
        first.setdefault(chart, points)
    # No chart was drawn empty first and again once its history arrived.
    # (the run is a tanh net: its dead heatmap has no rows, its saturated one has the tanh's)
    assert first["chart-loss"][0] > 1 and first["chart-lr"][0] > 1 and first["chart-sat"][0] > 0
    order = [chart for chart, _ in draws]
    below = [c for c in first if c not in painted]
    assert below and max(order.index(c) for c in painted if c in first) < min(
        order.index(c) for c in below
    )


def heatmap_rows(page: Page, chart: str) -> list[str]:
    """The layers a layers x steps heatmap draws as rows (none when it shows its message)."""
    return list(page.evaluate("id => (document.getElementById(id).data[0] || {}).y || []", chart))


def test_heatmaps_leave_out_layers_without_the_statistic_and_say_why_none_has_it(
    browser: Browser, tmp_path: Path
) -> None:
    """A tanh net has no dead region: every layer's dead ratio is null, so the dead heatmap
    says so in words instead of drawing a blank grid with no layer names (review F's
    replay_hist_cursor.py); the saturated heatmap leaves out the Linear layers (all-null
    rows) and draws the tanh ones. A ReLU net trained on batches of 1 has no dead ratio
    either, for another reason: a unit had fewer than 8 values (it was told 'tanh/sigmoid
    have no dead region'). Its spreads shrink with depth: the small multiples' 'same
    x-range' draws every layer on one range (each drew on its own: all looked alike),
    kept for the run across a reload."""
    data_dir = tmp_path / "data"
    names = ["0", "1", "2", "3"]
    kinds = ["Linear", "Tanh", "Linear", "Tanh"]
    no_dead = {"dead_ratio": None}
    stats = {
        "0": {**no_dead, "saturated_ratio": None},
        "1": no_dead,
        "2": {**no_dead, "saturated_ratio": None},
        "3": no_dead,
    }
    write_recorded_run(
        data_dir, "tanh", steps=100, layers=4, every=10,
        layer_names=names, layer_kinds=kinds, layer_stats=stats,
    )  # fmt: skip
    # each layer's values 10x narrower than the one before: +-1 down to +-0.001
    shrinking = {
        name: {
            "dead_ratio": None,
            "hist": {"lo": -(10.0**-i), "hi": 10.0**-i, "counts": [1, 3, 3, 1]},
        }
        for i, name in enumerate(names)
    }
    write_recorded_run(
        data_dir, "bs1", steps=100, layers=4, every=10,
        layer_names=names, layer_kinds=["Linear", "ReLU", "Linear", "ReLU"], layer_stats=shrinking,
    )  # fmt: skip
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/bs1?step=50")
            assert heatmap_rows(page, "chart-dead") == []
            expect(page.locator("#chart-dead")).to_contain_text(
                "fewer than 8 values a unit in each probed batch"
            )
            expect(page.locator("#chart-dead")).not_to_contain_text("tanh/sigmoid")
            assert multiple_ranges(page) == [
                ["-1", "1"],
                ["-0.1", "0.1"],
                ["-0.01", "0.01"],
                ["-0.001", "0.001"],
            ]
            page.check("#multiples-shared")
            page.wait_for_function(
                "[...document.querySelectorAll('.multiple .range')].every(r => r.innerText.startsWith('-1'))"
            )
            shared = shown_histograms(page)
            # on -1..1 (bins 0.5 wide) a narrower layer fills the two middle bins alone
            assert [sum(c > 0 for c in shared[n]) for n in names] == [4, 2, 2, 2], shared
            assert all(sum(counts) == pytest.approx(8) for counts in shared.values())
            page.reload()
            page.wait_for_function("document.body.dataset.ready === '1'")
            expect(page.locator("#multiples-shared")).to_be_checked()
            assert shown_histograms(page) == shared

            open_ready(page, f"{server.url}/runs/tanh?step=50")
            assert heatmap_rows(page, "chart-sat") == ["1", "3"]
            assert heatmap_rows(page, "chart-dead") == []
            expect(page.locator("#chart-dead")).to_contain_text(
                "no layer of this run has a dead-unit ratio: tanh/sigmoid have no dead region"
            )
            scrub(page, 70)  # the cursor moves on the other charts; the message stays
            page.wait_for_function(
                "(document.getElementById('chart-sat').layout.shapes || []).some(s => s.x0 === 70)"
            )
            expect(page.locator("#chart-dead")).to_contain_text("no layer of this run has")
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


# Pixels between the bottom of a chart's x tick labels and the top of its x-axis title.
TITLE_GAP_JS = """id => {
  const c = document.getElementById(id);
  const ticks = [...c.querySelectorAll('.xtick text')].map((t) => t.getBoundingClientRect().bottom);
  return c.querySelector('.xtitle').getBoundingClientRect().top - Math.max(...ticks);
}"""
# The chart's note (text) lies inside the chart's box.
NOTE_INSIDE_JS = """id => {
  const chart = document.getElementById(id).getBoundingClientRect();
  const range = document.createRange();
  range.selectNodeContents(document.querySelector(`#${id} > .chart-note`));
  const text = range.getBoundingClientRect();
  return text.width > 0 && text.left >= chart.left && text.right <= chart.right
    && text.top >= chart.top && text.bottom <= chart.bottom;
}"""


def test_a_single_probe_step_is_drawn_as_markers_and_empty_charts_say_what_is_missing(
    browser: Browser, tmp_path: Path
) -> None:
    """With watch()'s every=100 a run has one probe step for its first 100 steps: the
    per-layer line charts drew it as a line of one point (nothing to see), and the charts of
    series the run never logged drew bare axes (x 63-65, y -1..4) where the heatmaps say
    why they are empty (review's placeholder.py)."""
    data_dir = tmp_path / "data"
    # a probe at step 0, its gradient norms spread over more than a decade
    norms = {
        "layer0": {"grad_norm": 0.9, "saturated_ratio": None},
        "layer1": {"grad_norm": 0.2, "saturated_ratio": None},
        "layer2": {"grad_norm": 0.04, "saturated_ratio": None},
    }
    write_recorded_run(data_dir, "one-probe", steps=60, layers=3, every=100, layer_stats=norms)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/one-probe")
            grad = page.evaluate(
                "document.getElementById('chart-grad').data.filter(t => t.name.startsWith('layer'))"
                ".map(t => [t.mode, t.x.length])"
            )
            assert grad == [["lines+markers", 1]] * 3, grad
            page.locator("#chart-grad").scroll_into_view_if_needed()
            expect(page.locator("#chart-grad .scatterlayer .trace .points path")).to_have_count(3)
            assert page.evaluate("document.getElementById('chart-loss').data[0].mode") == "lines"
            # a log axis is labelled with powers of ten, and over a decade or two (0.04..0.2
            # here) with 2x/5x of them written out: Plotly's bare digits between them
            # ("9 8 7 6 5 4 3 2 0.1 9 8") read "5" as 0.05 or 0.5
            ticks = [
                t.replace("\u200b", "")  # Plotly's around a superscript
                for t in page.locator("#chart-grad .ytick text").all_text_contents()
            ]
            assert len(ticks) >= 2, ticks
            power = r"(\d×)?10([−-]?\d*|⁻?[⁰¹²³⁴⁵⁶⁷⁸⁹]*)|1"  # Plotly's 10−2, or ours: 5×10⁻²
            assert all(re.fullmatch(power, t) for t in ticks), ticks
            # the histogram over time's colour bar says what its colour is
            expect(page.locator("#chart-hist .colorbar")).to_contain_text("share of values")
            notes = [
                ("chart-acc", "no accuracy logged"),
                ("chart-wd", "no weight decay logged"),
                ("chart-sat", "no layer of this run has a saturated ratio"),
                ("chart-update", "no layer's update ratio recorded yet"),
                ("chart-other", "no other scalar logged"),
            ]
            for chart, note in notes:
                expect(page.locator(f"#{chart} .chart-note")).to_contain_text(note)
                assert page.locator(f"#{chart} .xtick").count() == 0, chart
            # the heatmaps' "step" title clears their tick labels (it overlapped them by 5 px)
            for chart in ("chart-dead", "chart-hist"):
                gap = page.evaluate(TITLE_GAP_JS, chart)
                assert gap >= 0, f"{chart}: the step title overlaps its tick labels by {-gap} px"
            # each note wraps inside its chart (one line ran past its edges), on a phone too
            for width in (1440, 390):
                page.set_viewport_size({"width": width, "height": 1000})
                for chart, _ in notes:
                    # 30 s: a note that overflows never fits, and a loaded machine's
                    # re-layout after a resize is no part of what this checks
                    page.wait_for_function(NOTE_INSIDE_JS, arg=chart, timeout=30_000)
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_picking_another_layers_histogram_keeps_the_replay_cursor(
    page: Page, server: LiveServer, finished_run: dict[str, Any]
) -> None:
    """Review F's replay_hist_cursor.py: the histogram-over-time drew no cursor once
    another layer was picked, while every other chart kept it at the replay step."""
    open_ready(page, f"{server.url}/runs/{finished_run['id']}?step=62")
    assert cursor_lines(page, "chart-hist") == [62]
    shown = page.eval_on_selector("#hist-layer", "el => el.value")
    other = next(layer["name"] for layer in finished_run["layers"] if layer["name"] != shown)
    page.select_option("#hist-layer", other)
    page.wait_for_function(
        "name => document.getElementById('chart-hist').layout.yaxis.title.text === name",
        arg=other,
    )
    assert cursor_lines(page, "chart-hist") == [62]


def test_the_freeze_picker_lists_only_layers_with_parameters(
    browser: Browser, tmp_path: Path
) -> None:
    """Review F: the freeze picker offered ReLU and Tanh layers, which have nothing to
    freeze. Layers the probes found no parameters on (no weight or gradient norm) are left
    out, whatever their kind."""
    data_dir = tmp_path / "data"
    names = ["0", "1", "2", "3", "4"]
    kinds = ["Linear", "Tanh", "Linear", "ReLU", "Custom"]
    no_params = {"grad_norm": None, "weight_norm": None}
    write_recorded_run(
        data_dir, "mixed", steps=100, layers=5, every=10, layer_names=names,
        layer_kinds=kinds, layer_stats={"1": no_params, "3": no_params, "4": no_params},
    )  # fmt: skip
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/mixed")
            listed = page.eval_on_selector_all(
                "#freeze-layers label", "els => els.map(e => e.dataset.layer)"
            )
            assert listed == ["0", "2"]
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_the_layers_and_alerts_dropdowns_close_on_escape_and_on_a_click_outside(
    browser: Browser, tmp_path: Path
) -> None:
    """Review F's keys1.py: once open, the Layers and Alerts dropdowns stayed open over the
    page until their own summary was clicked again."""
    data_dir = tmp_path / "data"
    write_recorded_run(data_dir, "drops", steps=100, layers=2, every=10)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/drops")
            for picker in ("#freeze-picker", "#rules-picker"):
                dropdown = page.locator(picker)
                page.click(f"{picker} summary")
                expect(dropdown).to_have_attribute("open", "")
                page.keyboard.press("Escape")
                expect(dropdown).not_to_have_attribute("open", "")
                page.click(f"{picker} summary")
                if picker == "#freeze-picker":  # (the recorded run lists no rules to click)
                    page.locator(f"{picker} .dropdown-list label").first.click()  # inside
                    expect(dropdown).to_have_attribute("open", "")
                page.click("#run-name")  # outside
                expect(dropdown).not_to_have_attribute("open", "")
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_replay_header_shows_the_cursor_steps_values_and_the_config_bar_only_the_inits_own(
    browser: Browser, tmp_path: Path
) -> None:
    """Review F: in replay the header's step and loss stayed at the last step wherever the
    cursor was, and the config bar showed model.init_std for a He run (it is the normal
    init's alone). Then the loss shown was the downsampled chart's point at or before the
    cursor (a bucket's highest: "step 5000 · loss 0.09053", step 4998's): it is the loss
    stored at the cursor's step."""
    data_dir = tmp_path / "data"
    config = {"model": {"arch": "mlp", "init": "he", "init_std": 0.02},
              "solver": {"lr": 0.05}, "lr": 0.05, "batch_size": 32}  # fmt: skip
    # more steps than the chart's 1,500 points: its loss line is downsampled
    write_recorded_run(data_dir, "he", steps=3200, layers=2, every=100, config=config)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/he?step=50")
            shown = page.eval_on_selector_all("#config .kv", "els => els.map(e => e.textContent)")
            assert "model.init he" in shown and not any("init_std" in s for s in shown), shown
            # watch()'s "lr" repeats the experiment's solver.lr: shown once (a reviewer
            # read "solver.lr 0.05 ... lr 0.05"); one of its own stays
            assert "solver.lr 0.05" in shown and "lr 0.05" not in shown, shown
            assert "batch_size 32" in shown, shown
            expect(page.locator("#step")).to_have_text("50 of 3199")
            expect(page.locator("#last-loss")).to_have_text("1.15")  # 2.3 / (1 + 50 / 50)
            scrub(page, 100)
            expect(page.locator("#step")).to_have_text("100 of 3199")
            expect(page.locator("#last-loss")).to_have_text("0.7667")
            # a step the downsampled line has no point at: the stored loss, not its neighbour's
            drawn = set(chart_trace(page, "chart-loss")["x"])
            step = next(s for s in range(2001, 3000) if s not in drawn and s - 1 not in drawn)
            scrub(page, step)
            expect(page.locator("#step")).to_have_text(f"{step} of 3199")
            stored = 2.3 / (1 + step / 50)
            expect(page.locator("#last-loss")).to_have_text(f"{float(f'{stored:.4g}'):g}")
            expect(page.locator("#last-loss")).not_to_have_class(re.compile("stale"))
            expect(page.locator("#last-val-loss")).to_have_text("—")  # none logged
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def test_compare_says_which_runs_lack_the_chosen_layer_or_its_statistic(
    browser: Browser, tmp_path: Path
) -> None:
    """Two offline runs synced later, one probing every layer every 10 steps, one probing
    only fc1 every 25 (a `layers=` filter): on the compare page the second run's dead and
    saturated lines silently vanished for fc2 and out, and out's (a Linear feeding no
    activation) chart was a blank grid, so a missing layer read as a zero or a fault.
    Options now name the runs that have the layer, and each chart says why a run has no line."""
    data_dir = tmp_path / "data"
    relu_free = {"dead_ratio": None, "saturated_ratio": None}
    write_recorded_run(
        data_dir, "every-layer", steps=300, layers=3, every=10,
        layer_names=["fc1", "fc2", "out"], layer_kinds=["Linear", "Linear", "Linear"],
        layer_stats={"fc1": {"saturated_ratio": None}, "fc2": {"saturated_ratio": None},
                     "out": relu_free},
    )  # fmt: skip
    write_recorded_run(
        data_dir, "fc1-only", steps=300, layers=1, every=25,
        layer_names=["fc1"], layer_kinds=["Linear"], layer_stats={"fc1": {"saturated_ratio": None}},
    )  # fmt: skip
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            page.goto(f"{server.url}/compare?ids=every-layer&ids=fc1-only")
            page.wait_for_function("document.body.dataset.ready === '1'")
            options = page.eval_on_selector_all("#layer option", "os => os.map(o => o.text)")
            assert options == ["fc1", "fc2 (every-layer only)", "out (every-layer only)"]
            expect(page.locator("#dead-note")).to_have_text("")  # both runs have fc1's
            expect(page.locator("#sat-note")).to_contain_text(
                "every-layer, fc1-only: fc1 has no saturated ratio"
            )
            page.select_option("#layer", "fc2")
            expect(page.locator("#dead-note")).to_have_text(
                "fc1-only: fc2 is not probed in this run."
            )
            page.select_option("#layer", "out")
            expect(page.locator("#dead-note")).to_have_text(
                "fc1-only: out is not probed in this run. every-layer: out has no dead ratio"
                " (no ReLU-like activation follows it)."
            )
            page.select_option("#layer", "fc1")  # back: both lines, each at its own cadence
            expect(page.locator("#dead-note")).to_have_text("")
            page.wait_for_function(
                "JSON.stringify(document.getElementById('chart-dead').data.map(t => t.x.length))"
                " === '[30,12]'"
            )
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote


def _offline_run(run_dir: Path, run_id: str, steps: int, every: int, step_s: float = 0.0) -> Path:
    """A real training loop under watch() with no server: the spool is the whole run. Each
    step sleeps step_s more (a slower trainer)."""
    import time

    import torch
    from layerscope.trainer import watch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    with watch(model, opt, run=run_id, run_id=run_id, every=every, run_dir=run_dir) as w:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            time.sleep(step_s)
            w.step(loss=loss)
    return run_dir / "spool.bin"


def test_a_crashed_offline_run_synced_in_two_goes_replays_step_by_step(
    browser: Browser, tmp_path: Path
) -> None:
    """The offline-then-replay path as a user meets it: a run trains with no server and its
    process dies mid-write (a torn last record); part of it reached the server before (its
    first records); `sync` uploads the rest, and again changes nothing. The run, lost, then
    replays from the keyboard: each step shows the histograms stored at the probe step at
    or before it. Its replay starts at its first stored step (1: watch()'s "running" status
    at step 0 made the run's first_step 0, where the scrubber started), and x1 plays at the
    pace it trained at by the trainer's clock: it played at the pace of its upload (the
    run's updated_at - created_at), many times faster."""
    import concurrent.futures
    import json

    from layerscope.trainer.spool import HEADER, iter_records
    from layerscope.trainer.sync import sync_spool as sync_here

    def sync_spool(path: Path, url: str, timeout_s: float) -> int:
        # on its own thread: playwright's sync API keeps an event loop running on this one
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(sync_here, path, url, timeout_s=timeout_s).result()

    spool = _offline_run(tmp_path / "run", "crashed", steps=60, every=10, step_s=0.005)
    records = [offset for offset, _ in iter_records(spool)]
    data = spool.read_bytes()
    torn = data[: records[-1] + HEADER.size + 3]  # kill -9 while the last record was written
    spool.write_bytes(torn)
    first_part = tmp_path / "first-part.bin"
    first_part.write_bytes(data[: records[len(records) // 2]])
    rows = [
        (row["step"], row["time_s"])
        for _, text in iter_records(spool)
        for frame in [json.loads(text)]
        if frame.get("type") == "metrics"
        for row in frame["rows"]
    ]
    (first_step, first_time), (last_step, last_time) = rows[0], rows[-1]
    trained_pace = (last_step - first_step) / (last_time - first_time)  # steps/s, trainer's clock
    for server in serve(server_settings(tmp_path / "data")):
        url = server.url.replace("http://", "ws://")
        early = sync_spool(first_part, url, timeout_s=20)
        assert early == len(records) // 2 - 1  # every record but the hello is a frame
        assert sync_spool(spool, url, timeout_s=20) == len(records) - 2  # less the torn one
        acked = server.run("crashed")["acked_seq"]
        assert sync_spool(spool, url, timeout_s=20) == len(records) - 2
        assert server.run("crashed")["acked_seq"] == acked
        wait_for(lambda s=server: s.run("crashed")["status"] == "lost", 30, "the run marked lost")
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/crashed?step=19")
            assert server.run("crashed")["first_step"] == 0  # the "running" status event's
            assert page.eval_on_selector("#scrubber", "el => el.min") == str(first_step) == "1"
            pace = float(page.eval_on_selector("#replay", "el => el.dataset.pace"))
            assert pace == pytest.approx(trained_pace, rel=1e-6)
            expect(page.locator("#multiples-step")).to_have_text("10")
            page.focus("#scrubber")
            page.keyboard.press("ArrowRight")  # 19 -> 20, a probe step
            expect(page.locator("#cursor-step")).to_have_text("20")
            expect(page.locator("#multiples-step")).to_have_text("20")
            step, stored = stored_histograms(server, "crashed", 20)
            assert step == 20
            page.wait_for_function(
                "[...document.querySelectorAll('.multiple')].every(e => e.dataset.step === '20')"
            )
            assert shown_histograms(page) == stored
            page.keyboard.press("ArrowRight")  # 21: between probe steps, still step 20's
            expect(page.locator("#cursor-step")).to_have_text("21")
            expect(page.locator("#multiples-step")).to_have_text("20")
            page.keyboard.press("End")
            last = server.run("crashed")["last_step"]
            expect(page.locator("#cursor-step")).to_have_text(str(last))
            page.keyboard.press("Home")  # the first stored step
            expect(page.locator("#cursor-step")).to_have_text("1")
            expect(page.locator("#multiples-step")).to_have_text("1")  # the first probe step
        finally:
            page.context.close()
        assert not guard.errors, guard.errors
        assert not guard.remote, guard.remote
