"""The live run page in headless Chromium against a real server and a real training run.

Covers run.js, charts.js, heatmaps.js, controls.js, socket.js and eventlog.js as a person
uses them: the curves grow, and the controls pause, step, halve the LR and switch weight
decay off, each shown only once the trainer has acknowledged it.
"""

from __future__ import annotations

import json
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
    chart_points,
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
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def run_page(browser: Browser, server: LiveServer, live_run: dict[str, Any]) -> Iterator[Page]:
    """One page on the live run for the whole module, the way a person keeps the tab open:
    each test drives it further. It must never log an error or ask a non-local host."""
    page, guard = guarded_page(browser)
    open_ready(page, f"{server.url}/runs/{live_run['id']}")
    yield page
    page.context.close()
    assert not guard.errors, "the page logged errors:\n" + "\n".join(guard.errors)
    assert not guard.remote, f"requests left localhost: {guard.remote}"


def last_command(server: LiveServer, run_id: str, name: str) -> dict[str, Any]:
    """The most recent applied command of this name, as the server recorded it."""

    def applied() -> dict[str, Any] | None:
        rows = server.api("GET", f"/api/runs/{run_id}/commands").json()
        mine = [r for r in rows if r["name"] == name]
        return mine[-1] if mine and mine[-1]["status"] == "applied" else None

    return dict(wait_for(applied, 30, f"{name} to be applied"))


def color_distance(a: str, b: str) -> int:
    """Sum of channel differences between two CSS colours (#rrggbb or rgb(r, g, b))."""

    def rgb(c: str) -> list[int]:
        if c.startswith("#"):
            return [int(c[i : i + 2], 16) for i in (1, 3, 5)]
        return [int(v) for v in re.findall(r"\d+", c)[:3]]

    return sum(abs(x - y) for x, y in zip(rgb(a), rgb(b), strict=True))


def record_pending(page: Page, cmd: str) -> None:
    """Remembers (window.sawPending) whether the button ever showed itself pending."""
    page.evaluate(
        """cmd => {
            window.sawPending = false;
            const b = document.querySelector(`button[data-cmd='${cmd}']`);
            new MutationObserver(() => {
                if (b.classList.contains('pending') && b.textContent.endsWith('…')) window.sawPending = true;
            }).observe(b, {attributes: true, childList: true, characterData: true, subtree: true});
        }""",
        cmd,
    )


def hand_held_hello(run_id: str, **extra: Any) -> dict[str, Any]:
    """A test's own trainer's hello: one Linear layer, nothing acked yet."""
    return {
        "type": "hello", "v": 1, "run_id": run_id, "name": run_id, "config": {"lr": 0.1},
        "layers": [{"name": "fc1", "kind": "Linear", "units": 8}],
        "last_acked_seq": 0, "last_cmd_seq": 0, **extra,
    }  # fmt: skip


def test_page_loads_and_the_loss_curve_grows(run_page: Page, live_run: dict[str, Any]) -> None:
    page = run_page
    expect(page.locator("#status")).to_have_text("running")
    before = chart_points(page, "chart-loss")[0]
    assert before > 0
    page.wait_for_function(
        "n => document.getElementById('chart-loss').data[0].x.length > n + 20",
        arg=before,
        timeout=30_000,
    )
    for chart in (
        "chart-acc",
        "chart-lr",
        "chart-wd",
        "chart-sat",
        "chart-hist",
        "chart-grad",
    ):
        assert max(chart_points(page, chart)) > 0, f"{chart} is empty"
    # a tanh net has no dead region: the dead heatmap says so rather than drawing nothing
    expect(page.locator("#chart-dead")).to_contain_text("no layer of this run has a dead-unit")
    names = page.eval_on_selector_all(".multiple", "els => els.map(e => e.dataset.layer)")
    assert names == [layer["name"] for layer in live_run["layers"]]
    screenshot(page, "run-live")


def test_other_scalars_chart_the_series_no_other_chart_shows_live_and_keep_the_pick(
    page: Page, server: LiveServer, live_run: dict[str, Any]
) -> None:
    """The page charted loss, accuracy, lr and weight decay alone: grad_norm, step_time_s,
    samples_per_s and a user's own w.step(name=value) were stored but never shown. "Other
    scalars" picks any one of them (grad_norm by default), follows it live, and keeps the
    pick over a reload."""
    run_id = live_run["id"]
    open_ready(page, f"{server.url}/runs/{run_id}")
    names = page.eval_on_selector_all("#other-series option", "os => os.map(o => o.value)")
    assert "grad_norm" in names and "step_time_s" in names, names
    assert not {"loss", "val_loss", "acc", "lr", "weight_decay"} & set(names), names
    assert page.input_value("#other-series") == "grad_norm"
    page.wait_for_function(
        "() => { const t = document.getElementById('chart-other').data?.[0];"
        " return t?.name === 'grad_norm' && t.x.length > 0; }"
    )

    page.locator("#chart-other").scroll_into_view_if_needed()  # offscreen charts redraw every 5 s
    page.select_option("#other-series", "step_time_s")
    page.wait_for_function(
        "() => { const t = document.getElementById('chart-other').data?.[0];"
        " return t?.name === 'step_time_s' && t.x.length > 5; }"
    )
    shown = chart_trace(page, "chart-other")
    assert all(v is not None and 0 < v < 10 for v in shown["y"]), shown["y"][:5]
    page.wait_for_function(
        "last => document.getElementById('chart-other').data[0].x.some(x => x > last + 5)",
        arg=shown["x"][-1],
    )

    open_ready(page, f"{server.url}/runs/{run_id}")
    assert page.input_value("#other-series") == "step_time_s"
    page.wait_for_function(
        "() => { const t = document.getElementById('chart-other').data?.[0];"
        " return t?.name === 'step_time_s' && t.x.length > 5; }"
    )


def test_pause_stops_the_trainer_and_step_once_advances_one_step(
    run_page: Page, server: LiveServer, live_run: dict[str, Any]
) -> None:
    page, run_id = run_page, live_run["id"]
    pause = page.locator("button[data-cmd='pause-toggle']")
    expect(pause).to_have_text("Pause")
    # greyed while the run runs, and its title says why (it said nothing)
    step_once = page.locator("button[data-cmd='step_once']")
    expect(step_once).to_be_disabled()
    expect(step_once).to_have_attribute("title", re.compile("while it is paused: pause it first"))
    # ... and in words under the buttons, which it names (a title reaches no touch or
    # keyboard user): it was only in the title
    reason = page.locator("#control-reason")
    expect(reason).to_be_visible()
    expect(reason).to_have_text(re.compile(r"^Step once: .*while it is paused: pause it first\.$"))
    expect(step_once).to_have_attribute("aria-describedby", "control-reason")
    pause.click()
    expect(pause).to_have_text("Resume", timeout=20_000)  # only after the trainer's acknowledgement
    # paused, every control is on: the line is empty (its room kept) and describes nothing
    expect(reason).to_have_text("")
    expect(step_once).not_to_have_attribute("aria-describedby", re.compile("."))
    expect(page.locator("#status")).to_have_text("paused", timeout=20_000)
    applied_at = last_command(server, run_id, "pause")["applied_at_step"]
    # a command without arguments reads "pause sent by user, viewer ...", not "pause  sent"
    expect(page.locator("#events li[data-kind='command']").first).to_contain_text(
        re.compile(r"pause sent by user")
    )
    # the steps before the pause reach the server (behind a backlog on a loaded machine)
    wait_for(
        lambda: server.run(run_id)["last_step"] >= applied_at, 30, "the steps before the pause"
    )
    time.sleep(0.5)
    paused_step = server.run(run_id)["last_step"]
    assert paused_step <= applied_at + 1
    time.sleep(1.5)
    assert server.run(run_id)["last_step"] == paused_step, "the trainer kept stepping while paused"

    expect(step_once).to_be_enabled()
    # Four quick clicks, a real mouse's, none waiting for the last: four steps. A click
    # while the previous step_once was pending was lost (the button was disabled for it).
    box = step_once.bounding_box()
    assert box
    for _ in range(4):
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_for(lambda: server.run(run_id)["last_step"] == paused_step + 4, 30, "four more steps")
    expect(step_once).to_have_text("Step once")  # every queued click sent and acknowledged
    time.sleep(1.0)
    assert server.run(run_id)["last_step"] == paused_step + 4
    steps = server.api("GET", f"/api/runs/{run_id}/commands").json()[-4:]
    assert [c["name"] for c in steps] == ["step_once"] * 4
    assert [c["applied_at_step"] for c in steps] == list(range(paused_step, paused_step + 4))

    # The pause's marker names who sent it as a reload does: it read "by you (this page)"
    # live and "by user · viewer 127.0.0.1:<port>" after a reload.
    def pause_label() -> str:
        texts = page.evaluate(
            "document.getElementById('chart-lr').data.find(t => t.name === 'commands').text"
        )
        return str(
            next(t for t in texts if t.startswith("pause · by ") and f"step {applied_at}" in t)
        )

    live_label = pause_label()
    assert re.fullmatch(
        rf"pause · by user · viewer 127\.0\.0\.1:\d+ · applied after step {applied_at}", live_label
    ), live_label

    # Space toggles pause: resume (from the page, not the focused Step once: a button
    # takes the Space that falls on it)
    page.evaluate("document.activeElement.blur()")
    page.locator("body").press("Space")
    expect(pause).to_have_text("Pause", timeout=20_000)
    expect(page.locator("#status")).to_have_text("running", timeout=20_000)
    wait_for(lambda: server.run(run_id)["last_step"] > paused_step + 5, 20, "training to resume")
    open_ready(page, f"{server.url}/runs/{run_id}")  # a reload: the marker reads the same
    assert pause_label() == live_label


def test_halve_lr_halves_the_lr_line_at_the_acknowledged_step(
    run_page: Page, server: LiveServer, live_run: dict[str, Any]
) -> None:
    page, run_id = run_page, live_run["id"]
    base_lr = FAST_CONFIG["solver"]["lr"]
    scale = float(
        page.eval_on_selector("#controls", "el => JSON.parse(el.dataset.acked)?.lr_scale ?? 1")
    )
    halve = page.locator("button[data-cmd='halve_lr']")
    record_pending(page, "halve_lr")
    halve.click()
    expect(page.locator("#acked")).to_contain_text(f"LR ×{scale * 0.5:g}", timeout=20_000)
    expect(halve).to_have_text("Halve LR")
    assert page.evaluate("window.sawPending"), "the button never showed the command as pending"
    cmd = last_command(server, run_id, "set_lr_scale")
    assert cmd["args"] == {"value": scale * 0.5}
    at = cmd["applied_at_step"]
    page.wait_for_function(
        "s => document.getElementById('chart-lr').data[0].x.some(x => x > s + 5)",
        arg=at,
        timeout=30_000,
    )
    lr = chart_trace(page, "chart-lr")
    # applied at the boundary after step `at` (DESIGN §4): step `at` itself trained at the old
    # lr, the new one holds from at + 1, and the page says "after step at" with its marker
    # between the two (it said "applied at step at", its marker on the old value's step)
    before = [y for x, y in zip(lr["x"], lr["y"], strict=True) if x <= at]
    after = [y for x, y in zip(lr["x"], lr["y"], strict=True) if x > at]
    assert before and after
    assert all(y == pytest.approx(base_lr * scale) for y in before)
    assert all(y == pytest.approx(base_lr * scale * 0.5) for y in after)
    markers = page.evaluate(
        "document.getElementById('chart-lr').data.find(t => t.name === 'commands')"
    )
    assert at + 0.5 in markers["x"] and at not in markers["x"]
    assert any(
        "set_lr_scale" in text and text.endswith(f"applied after step {at}")
        for text in markers["text"]
    )
    shapes = page.evaluate("document.getElementById('chart-lr').layout.shapes.map(s => s.x0)")
    assert at + 0.5 in shapes and at not in shapes
    expect(page.locator("#events")).to_contain_text(f"applied after step {at}")


def test_freeze_stops_a_layers_updates_and_unfreeze_restores_them(
    run_page: Page, server: LiveServer, live_run: dict[str, Any]
) -> None:
    page, run_id = run_page, live_run["id"]
    layer = live_run["layers"][0]["name"]  # the first Linear: it has parameters
    page.click("#freeze-picker summary")
    page.check(f"#freeze-layers label[data-layer='{layer}'] input")
    page.click("button[data-cmd='freeze']")
    expect(page.locator("#acked")).to_contain_text(f"frozen: {layer}", timeout=20_000)
    # the picker says which layers are frozen in words (it was a text colour alone)
    picked = page.locator(f"#freeze-layers label[data-layer='{layer}']")
    expect(picked).to_contain_text("· frozen")
    at = last_command(server, run_id, "set_frozen")["applied_at_step"]
    index = page.evaluate(
        "name => document.getElementById('chart-update').data.findIndex(t => t.name === name)",
        layer,
    )
    assert index >= 0, f"no update-ratio line for {layer}"
    page.wait_for_function(
        "([s, i]) => document.getElementById('chart-update').data[i].x.some(x => x > s + 15)",
        arg=[at, index],
        timeout=30_000,
    )
    update = chart_trace(page, "chart-update", index)
    after = [y for x, y in zip(update["x"], update["y"], strict=True) if x > at + 5]
    assert after and all(not y for y in after), f"{layer} kept changing while frozen: {after[:5]}"
    assert any(y for x, y in zip(update["x"], update["y"], strict=True) if x < at)
    # its gradient-norm line drops out too (freezing drops its gradients), and the chart's
    # help says so as the update ratio's does
    grad = page.evaluate(
        "name => { const t = document.getElementById('chart-grad').data.find(t => t.name === name);"
        " return {x: Array.from(t.x), y: Array.from(t.y)}; }",
        layer,
    )
    assert not [y for x, y in zip(grad["x"], grad["y"], strict=True) if x > at + 5 and y]
    expect(
        page.locator("#chart-grad").locator("xpath=..").locator("details.help p")
    ).to_contain_text("A frozen layer's line drops out from the freeze on")

    page.click("button[data-cmd='unfreeze']")
    expect(page.locator("#acked")).to_contain_text("frozen: none", timeout=20_000)
    expect(picked).not_to_contain_text("frozen")


def test_another_tabs_freeze_is_marked_with_its_layers(
    run_page: Page, browser: Browser, server: LiveServer, live_run: dict[str, Any]
) -> None:
    """Review F's eventlog_live_vs_reload.py: a freeze sent from another tab was marked
    'set_frozen · by user' here (its args were looked up among this page's own commands),
    while a reload read 'set_frozen freeze <layer>'."""
    page, run_id = run_page, live_run["id"]
    layer = live_run["layers"][0]["name"]
    other, guard = guarded_page(browser)
    try:
        open_ready(other, f"{server.url}/runs/{run_id}")
        other.click("#freeze-picker summary")
        other.check(f"#freeze-layers label[data-layer='{layer}'] input")
        other.click("button[data-cmd='freeze']")
        expect(other.locator("#acked")).to_contain_text(f"frozen: {layer}", timeout=20_000)
        at = last_command(server, run_id, "set_frozen")["applied_at_step"]
        page.wait_for_function(
            "at => (document.getElementById('chart-lr').data.find(t => t.name === 'commands')"
            " || {text: []}).text.some(t => t.includes(`applied after step ${at}`))",
            arg=at,
        )
        texts = page.evaluate(
            "document.getElementById('chart-lr').data.find(t => t.name === 'commands').text"
        )
        wanted = rf"set_frozen freeze {re.escape(layer)} · by user · viewer 127\.0\.0\.1:\d+ · applied after step {at}"
        assert any(re.fullmatch(wanted, t) for t in texts), texts
        expect(page.locator("#events")).to_contain_text(f"set_frozen freeze {layer} applied")
        other.click("button[data-cmd='unfreeze']")  # back as it was
        expect(other.locator("#acked")).to_contain_text("frozen: none", timeout=20_000)
    finally:
        other.context.close()
    assert not guard.errors, guard.errors


def test_weight_decay_off_reads_zero(
    run_page: Page, server: LiveServer, live_run: dict[str, Any]
) -> None:
    """After a reload: the page starts from the acknowledged state the server holds."""
    page, run_id = run_page, live_run["id"]
    open_ready(page, f"{server.url}/runs/{run_id}")
    control = server.run(run_id)["control"]
    if control is not None:
        expect(page.locator("#acked")).to_contain_text(f"LR ×{control['lr_scale']:g}")
    toggle = page.locator("button[data-cmd='wd-toggle']")
    expect(toggle).to_have_text("Weight decay: on")
    toggle.click()
    expect(toggle).to_have_text("Weight decay: off", timeout=20_000)
    at = last_command(server, run_id, "set_weight_decay")["applied_at_step"]
    page.wait_for_function(
        "s => document.getElementById('chart-wd').data[0].x.some(x => x > s + 5)",
        arg=at,
        timeout=30_000,
    )
    wd = chart_trace(page, "chart-wd")
    assert all(y == 0 for x, y in zip(wd["x"], wd["y"], strict=True) if x > at)
    assert any(y and y > 0 for x, y in zip(wd["x"], wd["y"], strict=True) if x < at)
    toggle.click()
    expect(toggle).to_have_text("Weight decay: on", timeout=20_000)
    screenshot(page, "run-controls")


def test_a_command_lost_as_the_socket_drops_is_sent_again_once_on_reconnect(
    run_page: Page, server: LiveServer, live_run: dict[str, Any]
) -> None:
    """The server may close a viewer's socket (a restart, a slow viewer) just as a click
    sends: the command it never read is sent again, same id, when the socket is back."""
    page, run_id = run_page, live_run["id"]
    toggle = page.locator("button[data-cmd='wd-toggle']")
    expect(toggle).to_have_text("Weight decay: on")
    # A long session's commands (each Set of the LR scale it has: no change to the run),
    # one after another's acknowledgement: the page kept every one it ever sent, for good.
    kept = page.evaluate(
        """async (n) => {
            const b = document.querySelector("button[data-cmd='set_lr_scale']");
            const settled = () => new Promise((resolve) => {
                const poll = () => (b.classList.contains('pending') ? setTimeout(poll, 5) : resolve());
                poll();
            });
            for (let i = 0; i < n; i++) { b.click(); await settled(); }
            return Number(document.getElementById('controls').dataset.commandsKept);
        }""",
        30,
    )
    assert 1 <= kept <= 9, kept  # KEEP_SETTLED (8) settled ones and the last
    # The fault: the next command never leaves the page, and its socket closes under it.
    page.evaluate(
        """() => {
            const send = WebSocket.prototype.send;
            window.lostCommand = null;
            WebSocket.prototype.send = function (data) {
                const msg = JSON.parse(data);
                if (msg.type !== "command") return send.call(this, data);
                WebSocket.prototype.send = send;
                window.lostCommand = msg.id;
                this.close(4000, "test: closed as a command was sent");
            };
        }"""
    )
    record_pending(page, "wd-toggle")
    toggle.click()
    page.wait_for_function("document.body.dataset.socket === 'lost'", timeout=10_000)
    lost = page.evaluate("window.lostCommand")
    assert lost
    expect(toggle).to_have_text("Weight decay: off", timeout=30_000)
    assert page.evaluate("window.sawPending")

    def stored() -> list[dict[str, Any]] | None:
        # the page hears the acknowledgement live, before the store has committed it
        rows = server.api("GET", f"/api/runs/{run_id}/commands").json()
        mine = [r for r in rows if r["id"] == lost]
        return mine if mine and mine[0]["status"] != "pending" else None

    mine = wait_for(stored, 20, "the acknowledgement to be stored")
    assert len(mine) == 1 and mine[0]["status"] == "applied", mine
    assert mine[0]["args"] == {"enabled": False}
    toggle.click()  # back as it was, over the reopened socket
    expect(toggle).to_have_text("Weight decay: on", timeout=20_000)


def test_rule_switches_send_set_rules_and_show_only_the_acknowledged_state(
    run_page: Page, server: LiveServer, live_run: dict[str, Any]
) -> None:
    page, run_id = run_page, live_run["id"]
    auto = page.locator("#rules button[data-rule-auto='auto_halve_lr']")
    # The trainer's first status carried its rules state: the switch is known before any command.
    expect(auto).to_have_text("Auto-halve LR: off")
    page.evaluate(
        """() => {
            window.sawRulePending = false;
            const b = document.querySelector("#rules button[data-rule-auto='auto_halve_lr']");
            new MutationObserver(() => { if (b.textContent.endsWith('…')) window.sawRulePending = true; })
                .observe(b, {childList: true, characterData: true, subtree: true});
        }"""
    )
    # ValidationPlateau, auto-halve's alert, raises nothing while auto-halve is off: the
    # trainer takes `--silence ValidationPlateau` as that and acknowledges auto_halve_lr
    # false (never in `silenced`), and the list showed no such rule at all.
    plateau = page.locator("#rules-silence label[data-rule='ValidationPlateau'] input")
    expect(plateau).to_be_checked()
    # counted by name only: a run no one silenced anything on reads so
    expect(page.locator("#rules-silenced-count")).to_have_text("none silenced")
    auto.click()
    expect(auto).to_have_text("Auto-halve LR: on", timeout=20_000)
    assert page.evaluate("window.sawRulePending")  # shown pending until the trainer acknowledged
    row = last_command(server, run_id, "set_rules")
    assert row["args"] == {"auto_halve_lr": True} and row["state"]["rules"]["auto_halve_lr"] is True
    expect(plateau).not_to_be_checked()

    page.click("#rules-picker summary")
    box = page.locator("#rules-silence label[data-rule='DeadUnits'] input")
    box.click()  # the box stays as acknowledged (unticked) until the trainer applies it
    expect(page.locator("#rules-silenced-count")).to_have_text("1 silenced", timeout=20_000)
    expect(box).to_be_checked()
    row = last_command(server, run_id, "set_rules")
    assert row["args"] == {"silenced": ["DeadUnits"]}
    assert row["state"]["rules"]["silenced"] == ["DeadUnits"]
    expect(page.locator("#events")).to_contain_text(
        "set_rules silenced=DeadUnits applied after step"
    )

    # Back as they were, so the run keeps training unattended: silencing ValidationPlateau
    # is switching auto-halve off.
    box.click()
    expect(page.locator("#rules-silenced-count")).to_have_text("none silenced", timeout=20_000)
    plateau.click()
    expect(auto).to_have_text("Auto-halve LR: off", timeout=20_000)
    expect(plateau).to_be_checked()
    expect(page.locator("#rules-silenced-count")).to_have_text("none silenced")
    assert last_command(server, run_id, "set_rules")["args"] == {"auto_halve_lr": False}


def test_a_run_started_without_weight_decay_has_its_switch_off_and_says_why(
    page: Page, server: LiveServer
) -> None:
    """Review F: 'Weight decay: on' showed for a run whose weight decay is 0, and toggling
    it did nothing. The switch reads 0 and is disabled, its title says why, while the other
    controls of the live run stay on."""
    run_id = server.launch(
        {
            **FAST_CONFIG,
            "name": "no weight decay",
            "every": 20,
            "solver": {**FAST_CONFIG["solver"], "weight_decay": 0.0, "steps": 10_000_000},
        }
    )
    server.wait_step(run_id, 5, 120)
    open_ready(page, f"{server.url}/runs/{run_id}")
    expect(page.locator("#trainer")).to_have_text("trainer connected")
    expect(page.locator("button[data-cmd='pause-toggle']")).to_be_enabled()
    toggle = page.locator("button[data-cmd='wd-toggle']")
    expect(toggle).to_have_text("Weight decay: 0")
    expect(toggle).to_be_disabled()
    expect(toggle).to_have_attribute("title", re.compile("started with weight decay 0"))
    # nor can Auto weight decay be switched on: the Overfit rule would have no decay to add
    # (it was switchable, and then acknowledged 'on' for a run it could never act on)
    expect(page.locator("button[data-rule-auto='auto_halve_lr']")).to_be_enabled()
    auto = page.locator("button[data-rule-auto='auto_weight_decay']")
    expect(auto).to_have_text("Auto weight decay: off")
    expect(auto).to_be_disabled()
    expect(auto).to_have_attribute("title", re.compile("started with weight decay 0"))
    # both reasons in words, each beside its group and named by its button's description
    expect(page.locator("#control-reason")).to_contain_text(
        "Weight decay: this run was started with weight decay 0"
    )
    expect(toggle).to_have_attribute("aria-describedby", "control-reason")
    expect(page.locator("#rules-note")).to_have_text(
        re.compile(r"^Auto weight decay: This run was started with weight decay 0")
    )
    expect(auto).to_have_attribute("aria-describedby", "rules-note")
    server.api("POST", f"/api/runs/{run_id}/stop")


# Before the page's scripts run: every viewer socket it opens is kept in window.sockets,
# and while window.blockSockets is set a new one goes to a closed port (refused), so the
# page stays disconnected, retrying, until the test lets it back.
BLOCKABLE_SOCKETS = """
window.sockets = [];
window.blockSockets = false;
const RealWebSocket = window.WebSocket;
window.WebSocket = class extends RealWebSocket {
  constructor(url, protocols) {
    super(window.blockSockets ? "ws://127.0.0.1:9/" : url, protocols);
    window.sockets.push(this);
  }
};
"""


def blockable_page(browser: Browser, server: LiveServer, run_id: str) -> tuple[Page, PageGuard]:
    page, guard = guarded_page(browser)
    guard.expect_refused_websocket()
    page.add_init_script(BLOCKABLE_SOCKETS)
    open_ready(page, f"{server.url}/runs/{run_id}")
    return page, guard


def drop_socket(page: Page) -> None:
    """Close the page's viewer socket and keep it from reconnecting until let_back."""
    page.evaluate("window.blockSockets = true; window.sockets.at(-1).close()")
    page.wait_for_function("document.body.dataset.socket === 'lost'", timeout=10_000)


def let_back(page: Page) -> None:
    page.evaluate("window.blockSockets = false")
    page.wait_for_function("document.body.dataset.socket === 'open'", timeout=30_000)


def api_command(
    server: LiveServer, run_id: str, name: str, args: dict[str, Any], **extra: Any
) -> str:
    """A script's command through the REST API; returns its id."""
    cmd_id = uuid.uuid4().hex
    body = {"id": cmd_id, "name": name, "args": args, **extra}
    response = server.api("POST", f"/api/runs/{run_id}/commands", json=body)
    assert response.status_code == 202, response.text
    return cmd_id


def log_lines(page: Page, text: str) -> int:
    return int(
        page.evaluate(
            "t => [...document.querySelectorAll('#events li')].filter(li => li.textContent.includes(t)).length",
            text,
        )
    )


def test_a_command_sent_elsewhere_is_in_the_log_at_once_and_once_after_a_reconnect_and_a_reload(
    browser: Browser, server: LiveServer, live_run: dict[str, Any]
) -> None:
    """Who sent which command is in the run's event log; an open page learned of a command
    sent elsewhere (another tab, a script) only on a reload. It is shown live, one line for
    it whether it came live, in the history, or both; one sent while the page's socket was
    down is shown when it reconnects."""
    run_id = live_run["id"]
    page, guard = blockable_page(browser, server, run_id)
    try:
        control = server.run(run_id)["control"] or {}
        wd_on = bool(control.get("weight_decay_enabled", True))
        tag = f"tag-{uuid.uuid4().hex[:8]}"  # its reason: the one line that names it
        # the run's state as it is (a command is a target state): harmless to the run
        api_command(server, run_id, "set_weight_decay", {"enabled": wd_on}, reason=tag)
        wanted = f"set_weight_decay {'on' if wd_on else 'off'} sent by api, api 127.0.0.1:"
        expect(page.locator("#events li", has_text=tag)).to_contain_text(wanted)
        assert log_lines(page, tag) == 1

        drop_socket(page)
        missed = f"tag-{uuid.uuid4().hex[:8]}"
        scale = float(control.get("lr_scale", 1.0))
        api_command(server, run_id, "set_lr_scale", {"value": scale}, reason=missed)
        let_back(page)
        expect(page.locator("#events li", has_text=missed)).to_contain_text("set_lr_scale")
        time.sleep(1.0)  # the catch-up and the log's read both in
        assert (log_lines(page, tag), log_lines(page, missed)) == (1, 1)

        open_ready(page, f"{server.url}/runs/{run_id}")
        expect(page.locator("#events li", has_text=missed)).to_have_count(1)
        assert (log_lines(page, tag), log_lines(page, missed)) == (1, 1)
    finally:
        page.context.close()
    assert not guard.errors, guard.errors


def test_after_its_socket_reconnects_the_page_shows_a_pause_and_halved_lr_sent_meanwhile(
    browser: Browser, server: LiveServer, live_run: dict[str, Any]
) -> None:
    """The catch-up after a reconnect carries the trainer's acknowledgements, not a state:
    a run paused and its LR halved (by a script) while the page's socket was down shows
    paused and the halved LR once it is back, with no reload."""
    run_id = live_run["id"]
    page, guard = blockable_page(browser, server, run_id)
    scale = float((server.run(run_id)["control"] or {}).get("lr_scale", 1.0))
    try:
        expect(page.locator("#status")).to_have_text("running")
        drop_socket(page)
        api_command(server, run_id, "pause", {})
        api_command(server, run_id, "set_lr_scale", {"value": scale * 0.5})
        last_command(server, run_id, "set_lr_scale")  # both applied by the trainer
        wait_for(lambda: server.run(run_id)["status"] == "paused", 20, "the run to be paused")
        let_back(page)
        expect(page.locator("#status")).to_have_text("paused")
        expect(page.locator("button[data-cmd='pause-toggle']")).to_have_text("Resume")
        page.wait_for_function(
            "s => JSON.parse(document.getElementById('controls').dataset.acked || '{}').lr_scale === s",
            arg=scale * 0.5,
        )
        acked = json.loads(page.evaluate("document.getElementById('controls').dataset.acked"))
        assert acked["paused"] is True and acked["lr_scale"] == scale * 0.5
    finally:
        api_command(server, run_id, "set_lr_scale", {"value": scale})  # back as it was
        api_command(server, run_id, "resume", {})
        wait_for(lambda: server.run(run_id)["status"] == "running", 20, "the run to resume")
        page.context.close()
    assert not guard.errors, guard.errors


def test_an_auto_halve_alert_names_its_relative_action_and_an_ended_run_is_not_running(
    browser: Browser, tmp_path: Path
) -> None:
    """The auto-halve rule's alert carries its action as the trainer sends it, relative to
    the acknowledged scale ({relative: 0.5}): the alerts list and the log read
    'set_lr_scale ×0.5 of the current scale', where they read 'set_lr_scale ×undefined'.
    A run stopped from the page read 'acknowledged: running ... stopping' for good. Its
    final stop, applied after its last step, was dimmed as after the replay cursor there."""
    data_dir = tmp_path / "data"
    plateau = {
        "rule": "ValidationPlateau",
        "layer": None,
        "message": "validation loss has not improved on 2.307 for 2 evaluations; "
        "halving the learning rate (auto-halve on plateau).",
        "value": 2.31,
        "threshold": 2.307,
        "action": {
            "name": "set_lr_scale",
            "args": {"relative": 0.5},
            "source": "rule",
            "reason": "validation loss has not improved",
        },
    }
    state = {"paused": False, "lr_scale": 2**-21, "weight_decay_enabled": True, "frozen": []}
    halved = {"id": "rule-1", "cmd_seq": None, "name": "set_lr_scale", "args": {"value": 2**-21},
              "ok": True, "applied_at_step": 61, "state": state, "source": "rule",
              "reason": "validation loss has not improved"}  # fmt: skip
    stop = {"id": "stop-1", "cmd_seq": 1, "name": "stop", "args": {}, "ok": True,
            "applied_at_step": 99, "state": {**state, "stopping": True}}  # fmt: skip
    write_recorded_run(
        data_dir, "plateau", steps=100, layers=2, every=10,
        events=[(60, "alert", plateau), (61, "command_result", halved), (99, "command_result", stop)],
    )  # fmt: skip
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/plateau")
            alert = page.locator("#alerts li.alert")
            expect(alert).to_have_count(1)
            expect(alert).to_contain_text("→ set_lr_scale ×0.5 of the current scale")
            expect(page.locator("#events")).to_contain_text("×0.5 of the current scale")
            expect(page.locator("#alerts")).not_to_contain_text("undefined")
            expect(page.locator("#events")).not_to_contain_text("undefined")
            # a scale halved 21 times reads as the control bar writes it, not ×4.76837158203125e-7
            expect(page.locator("#events")).to_contain_text("set_lr_scale ×4.77e-7 applied")
            # the run ended: the bar no longer says 'acknowledged: running ... stopping'
            acked = page.locator("#acked")
            expect(acked).to_contain_text("run finished; last acknowledged state:")
            expect(acked).to_contain_text("LR ×4.77e-7 (after step 61)")
            expect(acked).not_to_contain_text("running")
            expect(acked).not_to_contain_text("stopping")
            # the run's own last command, applied after its last step (99): the replay cursor
            # is there and can go no further, so it is not dimmed as after the cursor; a step
            # back, it is
            stop_line = page.locator("#events li", has_text="stop applied after step 99")
            expect(stop_line).to_have_count(1)
            expect(stop_line).not_to_have_class(re.compile("after-cursor"))
            page.eval_on_selector(
                "#scrubber", "el => { el.value = '98'; el.dispatchEvent(new Event('input')); }"
            )
            expect(stop_line).to_have_class(re.compile("after-cursor"))
        finally:
            page.context.close()
        assert not guard.errors, guard.errors


def test_a_nan_alert_offers_halve_lr_and_its_button_halves_the_acknowledged_lr(
    page: Page, server: LiveServer
) -> None:
    """An alert's advice that a control carries out is a button on the alert: a NaN/Inf
    ('Lower the learning rate'; the run pauses) offers Halve LR, which sends
    set_lr_scale(acknowledged × 0.5) as the bar's own button does. The alerts had advice
    in words only."""
    run_id = server.launch(
        {
            **FAST_CONFIG,
            "name": "exploding",
            "model": {**FAST_CONFIG["model"], "depth": 4, "activation": "relu", "init": "he"},
            "solver": {**FAST_CONFIG["solver"], "lr": 50.0, "batch_size": 64, "steps": 10_000_000},
        }
    )
    wait_for(lambda: server.run(run_id)["status"] == "paused", 120, "the NaN alert's pause")
    open_ready(page, f"{server.url}/runs/{run_id}")
    alert = page.locator("#alerts li.alert", has_text="ExplodingTensor")
    expect(alert).to_have_count(1)
    button = alert.locator("button[data-suggest='halve_lr']")
    expect(button).to_have_text("Halve LR")
    expect(button).to_be_enabled()
    button.click()
    expect(page.locator("#acked")).to_contain_text("LR ×0.5", timeout=20_000)
    applied = last_command(server, run_id, "set_lr_scale")
    assert applied["args"] == {"value": 0.5}
    server.api("POST", f"/api/runs/{run_id}/stop")
    expect(page.locator("#status")).to_have_text("stopped", timeout=30_000)
    expect(button).to_be_disabled()  # the run ended: nothing to act on


def test_a_run_being_uploaded_by_sync_says_so_and_its_controls_say_why_they_are_off(
    browser: Browser, server: LiveServer
) -> None:
    """While `layerscope sync` holds a run (its hello says upload), the server reports no
    trainer that can apply commands and refuses them; the page said only "no trainer" and
    "No trainer is connected". It names the upload, in the header and on every control."""
    run_id = f"upload-{uuid.uuid4().hex[:8]}"
    ws_url = server.url.replace("http://", "ws://") + "/ws/trainer"
    hello = hand_held_hello(run_id, upload=True)
    metrics = {
        "type": "metrics",
        "seq": 1,
        "rows": [{"step": 1, "time_s": 0.0, "values": {"loss": 2.0}}],
    }
    with ws_connect(ws_url) as ws:
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send(json.dumps(metrics))
        beating = threading.Event()

        def beat() -> None:  # as sync's link does: else the run is marked lost after 5 s
            while not beating.wait(0.3):
                ws.send(json.dumps({"type": "heartbeat", "v": 1, "step": 1, "status": "running"}))

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/{run_id}")
            expect(page.locator("#trainer")).to_have_text("uploading from its spool")
            pause = page.locator("button[data-cmd='pause-toggle']")
            expect(pause).to_be_disabled()
            expect(pause).to_have_attribute("title", re.compile("uploaded from its spool"))
        finally:
            beating.set()
            beater.join()
            page.context.close()
    assert not guard.errors, guard.errors


OTHER_TRACES = (
    "() => (document.getElementById('chart-other').data || [])"
    ".filter(t => t.name !== 'commands').map(t => [t.name, t.x.length, t.x[t.x.length - 1]])"
)
COMMAND_SHAPES = (
    "id => (document.getElementById(id).layout.shapes || []).filter(s => s.name !== 'alert')"
    ".map(s => [s.type, s.x0, s.x1])"
)
COMMAND_TRACE = (
    "id => { const t = document.getElementById(id).data.find(t => t.name === 'commands');"
    " return {x: Array.from(t.x), text: Array.from(t.text)}; }"
)


def test_a_distributed_runs_ranks_chart_together_and_dense_commands_leave_the_lines_readable(
    browser: Browser, server: LiveServer
) -> None:
    """(1) A run of 2 ranks (hello world_size 2, a step_time_s/rankN series a rank): the
    header did not say so, and "Other scalars" charted one rank's series at a time, so a
    straggler could not be seen. The header reads "world size 2" and the picker's
    "step_time_s (every rank)" draws a line per rank, live and, once the run ends, in replay.
    (2) 300 commands applied over 150 steps drew 300 dotted lines and diamonds: a solid band
    over the loss, lr and dead-unit lines. Eight or more markers closer than a few pixels are
    one faint band and one hover point giving the count and the first and last; a lone one,
    and a few together, are drawn as before, at step + 0.5."""
    run_id = f"ranks-{uuid.uuid4().hex[:8]}"
    ws_url = server.url.replace("http://", "ws://") + "/ws/trainer"
    hello = {"type": "hello", "v": 1, "run_id": run_id, "name": run_id, "config": {"lr": 0.1},
             "layers": [{"name": "fc1", "kind": "ReLU", "units": 8}], "world_size": 2}  # fmt: skip

    def rows(first: int, last: int) -> list[dict[str, Any]]:
        return [{"step": s, "time_s": 0.1 * s, "values": {"loss": 2.0 / s, "lr": 0.1,
                 "step_time_s/rank0": 0.01, "step_time_s/rank1": 0.05, "step_time_s/max": 0.05}}
                for s in range(first, last + 1)]  # fmt: skip

    state = {"paused": False, "lr_scale": 0.5, "weight_decay_enabled": True, "frozen": []}

    def applied(i: int, step: int) -> dict[str, Any]:
        return {"type": "event", "seq": 3 + i, "step": step, "kind": "command_result",
                "data": {"id": f"c{i}", "cmd_seq": None, "name": "set_lr_scale",
                         "args": {"value": 0.5}, "ok": True, "applied_at_step": step,
                         "state": state, "source": "rule", "reason": "plateau"}}  # fmt: skip

    with ws_connect(ws_url) as ws:
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        ws.send(json.dumps({"type": "metrics", "seq": 1, "rows": rows(1, 300)}))
        ws.send(json.dumps({"type": "probe", "seq": 2, "step": 10, "layers": [
            {"name": "fc1", "mean": 0.0, "std": 1.0, "dead_ratio": 0.1,
             "hist": {"lo": -1.0, "hi": 1.0, "counts": [1, 2, 3, 4]}}]}))  # fmt: skip
        ws.send(json.dumps(applied(0, 20)))  # alone: drawn as before
        for i in range(1, 301):  # two a step over steps 100-249
            ws.send(json.dumps(applied(i, 100 + (i - 1) // 2)))
        for i in range(301, 304):  # a few at one step: drawn as before too
            ws.send(json.dumps(applied(i, 40)))
        beating = threading.Event()

        def beat() -> None:  # else the run is marked lost after 5 s
            while not beating.wait(0.3):
                ws.send(json.dumps({"type": "heartbeat", "v": 1, "step": 300, "status": "running"}))

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        page, guard = guarded_page(browser)
        try:
            wait_for(lambda: len(server.api("GET", f"/api/runs/{run_id}/commands").json()) == 304,
                     20, "the commands to be stored")  # fmt: skip
            open_ready(page, f"{server.url}/runs/{run_id}")
            expect(page.locator("#world")).to_be_visible()
            expect(page.locator("#world")).to_have_text("world size 2")
            options = page.eval_on_selector_all(
                "#other-series option", "os => os.map(o => [o.value, o.textContent])"
            )
            assert ["step_time_s/rank*", "step_time_s (every rank)"] in options, options
            page.locator("#chart-other").scroll_into_view_if_needed()  # offscreen: every 5 s
            page.select_option("#other-series", "step_time_s/rank*")
            page.wait_for_function(
                "() => (document.getElementById('chart-other').data || []).length === 2"
                " && document.getElementById('chart-other').data[1].x.length === 300"
            )
            assert page.evaluate(OTHER_TRACES) == [["rank0", 300, 300], ["rank1", 300, 300]]
            assert chart_trace(page, "chart-other", 1)["y"][-1] == 0.05  # the straggler's
            expect(page.locator("#chart-other .legendtext")).to_have_text(["rank0", "rank1"])
            # live: each rank's line grows
            ws.send(json.dumps({"type": "metrics", "seq": 400, "rows": rows(301, 310)}))
            page.wait_for_function(
                "() => document.getElementById('chart-other').data.every(t => t.x.includes(310))"
            )

            # (2) the lone command as before; the 300 as one band and one hover point
            for chart in ("chart-loss", "chart-lr"):
                assert page.evaluate(COMMAND_SHAPES, chart) == [
                    ["line", 20.5, 20.5],
                    *[["line", 40.5, 40.5]] * 3,
                    ["rect", 100.5, 249.5],
                ], chart
                marks = page.evaluate(COMMAND_TRACE, chart)
                assert marks["x"] == [20.5, 40.5, 40.5, 40.5, 100.5]
                assert marks["text"][1].endswith("applied after step 40")
                assert marks["text"][4].startswith("300 commands applied after steps 100–249")
                assert "first: rule: plateau" in marks["text"][4]
                assert "last: rule: plateau" in marks["text"][4]
            assert page.evaluate(COMMAND_SHAPES, "chart-dead") == [
                ["line", 20.5, 20.5],
                *[["line", 40.5, 40.5]] * 3,
                ["rect", 100.5, 249.5],
            ]

            # the run ends: replay keeps every rank's lines
            ws.send(json.dumps({"type": "event", "seq": 401, "step": 310, "kind": "status",
                                "data": {"status": "finished"}}))  # fmt: skip
            expect(page.locator("#status")).to_have_text("finished")
            expect(page.locator("#replay")).to_be_visible()
            page.wait_for_function(
                "() => document.getElementById('chart-other').layout.shapes.some(s => s.x0 === 310)"
            )
            assert page.evaluate(OTHER_TRACES) == [["rank0", 310, 310], ["rank1", 310, 310]]
            expect(page.locator("#world")).to_have_text("world size 2")
        finally:
            beating.set()
            beater.join()
            page.context.close()
    assert not guard.errors, guard.errors


def test_a_44_layer_nets_grad_lines_are_coloured_by_depth_and_its_heatmap_names_every_row(
    browser: Browser, tmp_path: Path
) -> None:
    """A 44-layer net: the gradient-norm chart drew its 44 lines in ten cycled colours with
    no legend (shallow and deep layers alike), and the dead-unit heatmap named every third
    row. The lines run first layer to last on a sequential scale with a colour bar naming
    both; the heatmap grows to name every row, and hover names the layer, step and value.
    Its first layer is on top, also when the heatmap was first drawn with no probe step."""
    data_dir = tmp_path / "data"
    names = [f"block{i}.conv" for i in range(44)]
    write_recorded_run(data_dir, "deep44", steps=40, layers=44, every=10, layer_names=names)
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/deep44")
            page.wait_for_function(
                "document.getElementById('chart-grad').data?.length >= 44"
                " && document.querySelectorAll('#chart-dead .ytick text').length > 0"
            )
            colors = page.evaluate(
                "document.getElementById('chart-grad').data.slice(0, 44).map(t => t.line.color)"
            )
            assert colors[0] == "rgb(91, 143, 249)" and colors[-1] == "rgb(253, 231, 37)", colors
            # one colour a layer, in depth order: the blue channel falls from first to last
            assert len(set(colors)) == 44, colors
            blues = [int(c.rstrip(")").split(",")[2]) for c in colors]
            assert blues == sorted(blues, reverse=True), blues
            bar = page.locator("#chart-grad .colorbar")
            expect(bar).to_contain_text("first: block0.conv")
            expect(bar).to_contain_text("last: block43.conv")
            expect(bar).to_contain_text("depth (44 layers)")
            # the help says what the scale shows (it said "dark purple", a colour it has not)
            for chart in ("chart-grad", "chart-update"):
                help_text = page.locator(f".card:has(#{chart}) .help p").text_content() or ""
                assert "first layer blue through green to last layer yellow" in help_text, chart

            rows = page.evaluate(
                "[...document.querySelectorAll('#chart-dead .ytick text')]"
                ".map(t => [t.textContent, t.getBoundingClientRect().top])"
            )
            rows.sort(key=lambda r: r[1])
            assert [r[0] for r in rows] == names  # every row named, first layer on top
            # ... also on a heatmap first drawn before any probe step (its note), as a page
            # opened when its run starts draws it: the note's axes were kept (uirevision) and
            # the first layer came out at the bottom
            first_on_top = page.evaluate(
                """import('/static/js/heatmaps.js').then(async ({ LayerHeatmap }) => {
                  const div = document.createElement('div');
                  div.style.cssText = 'width: 600px; height: 260px';
                  document.body.append(div);
                  const h = new LayerHeatmap(div, { title: 'dead ratio', empty: 'none' });
                  await h.draw();
                  const noted = div.querySelector('.chart-note').textContent;
                  h.set(['in', 'mid', 'out'], [0, 10], [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]);
                  await h.draw();
                  const tops = [...div.querySelectorAll('.ytick text')]
                    .map((t) => [t.textContent, t.getBoundingClientRect().top]);
                  div.remove();
                  return [noted, tops.sort((a, b) => a[1] - b[1]).map((t) => t[0])];
                })"""
            )
            assert first_on_top[0].startswith("no probe step recorded yet"), first_on_top
            assert first_on_top[1] == ["in", "mid", "out"], first_on_top
            tops = [r[1] for r in rows]
            assert min(b - a for a, b in zip(tops, tops[1:], strict=False)) >= 9  # none overlap
            hover = page.evaluate("document.getElementById('chart-dead').data[0].hovertemplate")
            assert "%{y}" in hover and "step %{text}" in hover and "%{z" in hover
            # hover names the probe step a column shows (the grid's own steps are not one)
            shown = page.evaluate(
                "(() => { const gd = document.getElementById('chart-dead');"
                " Plotly.Fx.hover(gd, {xval: 20, yval: 3});"
                " return gd.querySelector('.hoverlayer').textContent; })()"
            )
            assert shown.startswith("block3.conv") and "step 20" in shown, shown
            shown = page.evaluate(
                "(() => { const gd = document.getElementById('chart-hist');"
                " Plotly.Fx.hover(gd, {xval: 20, yval: 0});"
                " return gd.querySelector('.hoverlayer').textContent; })()"
            )
            assert shown.startswith("step 20value"), shown

            # Painted as one image of a pixel a cell, scaled up (Plotly's way for evenly
            # spaced cells with no gaps), the rows' 1 px gaps drawn over it: painted cell by
            # cell into a plot-sized canvas and PNG-encoded, a 45-layer heatmap of a fast live
            # run took 140-300 ms a draw on 2 cores and most of the tab's main thread.
            style = page.get_attribute("#chart-dead .heatmaplayer image", "style") or ""
            assert "pixelated" in style, style
            # A healthy run's saturation (0 in every cell here) read as an empty chart: its 0
            # was all but the card's colour. Now a tint clearly apart from the card (a cell
            # with no value shows the card), and a note says so; still one image. The dead
            # heatmap (values above 0) has no such note.
            zero, card = page.evaluate(
                "[document.getElementById('chart-sat').data[0].colorscale[0][1],"
                " getComputedStyle(document.querySelector('.card:has(#chart-sat)')).backgroundColor]"
            )
            assert color_distance(zero, card) >= 40, (zero, card)
            expect(page.locator("#chart-sat .annotation-text")).to_have_text(
                "0 everywhere: no saturated units at any probe step (steps 0–30)"
            )
            style = page.get_attribute("#chart-sat .heatmaplayer image", "style") or ""
            assert "pixelated" in style, style
            assert page.locator("#chart-dead .annotation-text").count() == 0
            lines = page.evaluate(
                "(() => { const el = document.querySelector('#chart-dead .row-lines');"
                " return el && !el.hidden ? getComputedStyle(el).backgroundImage : null; })()"
            )
            assert lines and "repeating-linear-gradient" in lines, lines
            # each chart on its own compositing layer: a redraw repaints that chart alone
            layered = page.evaluate(
                "[...document.querySelectorAll('.grid .chart, .grid .multiples')]"
                ".every(el => getComputedStyle(el).willChange === 'transform')"
            )
            assert layered
            # A history's downsampled steps then live ones every probe step (uneven): drawn on
            # an even grid ending at the last step; past the plot's width, columns merge. Every
            # step is drawn in exactly one column.
            uneven, merged = page.evaluate(
                "import('/static/js/heatmaps.js').then(({ evenGrid }) => ["
                " evenGrid([0, 100, 200, 300, 310, 320], 560),"
                " evenGrid(Array.from({length: 600}, (_, i) => i * 10), 300)])"
            )
            assert uneven["x"] == list(range(0, 321, 10))
            assert uneven["spans"][-3:] == [[3, 4], [4, 5], [5, 6]]
            assert len(merged["x"]) <= 300 and merged["x"][-1] == 5990
            steps = len(set(b - a for a, b in zip(merged["x"], merged["x"][1:], strict=False)))
            assert steps == 1  # evenly spaced
            drawn = [j for a, b in merged["spans"] for j in range(a, b)]
            assert drawn == list(range(600))
        finally:
            page.context.close()
        assert not guard.errors, guard.errors


def test_the_pages_command_senders_stay_bounded_and_a_live_marker_still_names_its_sender(
    page: Page, server: LiveServer
) -> None:
    """The log kept who sent each command for the page's life (one more a command); now an
    entry goes with its command's acknowledgement, and the oldest past MAX_SENDERS."""
    page.goto(server.url)
    result = page.evaluate(
        """async () => {
            const m = await import('/static/js/eventlog.js');
            const log = new m.EventLog(document.createElement('ul'), document.createElement('ul'));
            const markers = new m.Markers();
            const before = m.sendersHeld();
            const n = m.MAX_SENDERS + 200;
            for (let i = 0; i < n; i++) {
                log.add([{kind: 'command', step: i, seq: null, created_at: i,
                    data: {id: `c${i}`, name: 'pause', args: {}, source: 'user', origin: 'viewer 10.0.0.1:5'}}]);
            }
            const held = m.sendersHeld() - before;
            markers.fromEvent({kind: 'command_result', step: n, data: {id: `c${n - 1}`, name: 'pause',
                ok: true, applied_at_step: n, source: 'user'}}, new Map());
            return {max: m.MAX_SENDERS, held, after: m.sendersHeld() - before, label: markers.list()[0].label};
        }"""
    )
    assert result["held"] == result["max"], result
    assert result["after"] == result["max"] - 1, result  # the acknowledged one went
    at = result["max"] + 200
    assert result["label"] == f"pause · by user · viewer 10.0.0.1:5 · applied after step {at}", (
        result
    )


# A layer (or run) name Plotly would render as a link: it renders a subset of HTML in trace
# names, legends, axis and category labels and hover text.
LINK_NAME = "<a href='http://2130706433:18473/attack'>layer</a>"
CHART_LINKS = (
    "[...document.querySelectorAll('.js-plotly-plot a')]"
    ".map(a => [a.closest('.js-plotly-plot').id, a.getAttribute('href') || a.getAttribute('xlink:href')])"
)
HOVER_EVERY_TRACE = (
    "(() => { for (const gd of document.querySelectorAll('.js-plotly-plot'))"
    " for (let c = 0; c < (gd.data || []).length; c++)"
    " try { Plotly.Fx.hover(gd, [{curveNumber: c, pointNumber: 0}]); } catch (e) {} })()"
)


def test_user_names_reach_the_charts_as_text_never_as_links_and_log_axes_keep_three_labels(
    browser: Browser, tmp_path: Path
) -> None:
    """(1) A layer named `<a href=...>layer</a>` became a real link (target=_blank) in the run
    page's gradient and update-ratio charts (trace names, colour bar, hover), the heatmaps'
    row labels and the histogram's axis title; a run of that name did in the comparison's
    legend. Every user string is escaped before Plotly: no <a> in any chart, the name reads
    as written. (2) The update-ratio chart's log axis over 3e-4..3e-3 was labelled "10⁻³"
    alone; it gets 2×/5× labels written out. (3) Loss smoothing counted points, not steps: a
    validation loss every 50 steps lagged ~500 steps behind. (4) A layer whose gradient norm
    is exactly 0 (zero init) had no line on the log axis and nothing said so."""
    data_dir = tmp_path / "data"
    write_recorded_run(
        data_dir,
        "links",
        steps=40,
        layers=2,
        every=10,
        layer_names=[LINK_NAME, "net.1"],
        layer_stats={
            LINK_NAME: {"update_ratio": 3e-4},
            "net.1": {"update_ratio": 3e-3, "grad_norm": 0.0},
        },
        name=f"run {LINK_NAME}",
    )
    for server in serve(server_settings(data_dir)):
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/links")
            page.select_option("#hist-layer", LINK_NAME)
            page.wait_for_function(
                "document.getElementById('chart-update').data?.length >= 2"
                " && document.querySelectorAll('#chart-dead .ytick text').length === 2"
                " && document.querySelector('#chart-hist .ytitle') !== null"
            )
            page.evaluate(
                "document.querySelectorAll('.grid .chart').forEach(c => c.scrollIntoView())"
            )
            page.wait_for_function(
                "document.querySelectorAll('#chart-update .ytick text').length > 0"
            )
            page.evaluate(HOVER_EVERY_TRACE)
            assert page.evaluate(CHART_LINKS) == []
            for chart in ("chart-grad", "chart-update"):
                expect(page.locator(f"#{chart} .colorbar")).to_contain_text(f"first: {LINK_NAME}")
            ticks = page.locator("#chart-dead .ytick text").all_text_contents()
            assert LINK_NAME in ticks, ticks
            expect(page.locator("#chart-hist .ytitle")).to_have_text(LINK_NAME)
            page.wait_for_timeout(100)  # Plotly drops a hover within 50 ms of the last
            page.evaluate(
                "Plotly.Fx.hover(document.getElementById('chart-grad'), [{curveNumber: 0, pointNumber: 0}])"
            )
            expect(page.locator("#chart-grad .hoverlayer")).to_contain_text(f"{LINK_NAME}: ")
            # (2) at least three labels, unambiguous: no bare digit
            labels = page.locator("#chart-update .ytick text").all_text_contents()
            assert labels == ["5×10⁻⁴", "10⁻³", "2×10⁻³"], labels
            ticks_of = page.evaluate(
                "import('/static/js/charts.js').then(({ logTicks }) => ["
                " logTicks(1e-5, 2e-2), logTicks(6e-4, 2.5e-3), logTicks(2.1e-3, 2.9e-3),"
                " logTicks(0.5, 0.5)])"
            )
            assert ticks_of[0] is None  # 10⁻⁵..10⁻²: the powers of ten are enough
            for t in ticks_of[1:]:
                assert len(t["ticktext"]) >= 2, ticks_of
                assert all(
                    re.fullmatch(r"([\d.]+×)?10[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+|[\d.]+", s) for s in t["ticktext"]
                )
            assert ticks_of[3]["ticktext"] == ["4.8×10⁻¹", "5×10⁻¹", "5.2×10⁻¹"]  # a flat line
            # (4) the layer at 0 is named on the chart and in its summary
            zero = "1 of 2 layers (net.1) at 0 at the latest step: a log axis cannot draw 0"
            expect(page.locator("#chart-grad .log-zero-note")).to_have_text(zero)
            expect(page.locator("#chart-grad-summary")).to_contain_text(f"{zero}.")
            expect(page.locator("#chart-update .log-zero-note")).to_have_count(0)
            # (3) a validation loss every 50 steps beside a training loss every step: at 0.9
            # the sparse one follows its own points (it read 0.10 for a real 0.052 at step
            # 2000), the dense one is smoothed as before
            train, val = page.evaluate(
                """import('/static/js/charts.js').then(({ LineChart }) => {
                  const div = document.createElement('div');
                  document.body.append(div);
                  const c = new LineChart(div, [{ name: 'train' }, { name: 'validation' }]);
                  const f = (s) => 0.05 + 2 * Math.exp(-s / 200);
                  const steps = Array.from({ length: 2001 }, (_, s) => s);
                  const vsteps = steps.filter((s) => s % 50 === 0);
                  c.setSeries(0, steps, steps.map(f));
                  c.setSeries(1, vsteps, vsteps.map((s) => f(s) + 0.002));
                  c.setSmoothing(0.9);
                  const d = c.plotData();
                  div.remove();
                  return [d[0].y, d[1].y];
                })"""
            )
            assert abs(val[-1] - 0.052) < 0.001, val[-1]
            assert abs(val[2] - (0.052 + 2 * 0.6065)) < 0.01, val[2]  # step 100
            assert 0.01 < train[100] - (0.05 + 2 * 0.6065) < 0.2  # lags ~10 steps

            # the comparison page: the run's name in the loss legend, as text
            page.goto(f"{server.url}/compare?ids=links")
            page.wait_for_function("document.body.dataset.ready === '1'")
            page.evaluate(HOVER_EVERY_TRACE)
            assert page.evaluate(CHART_LINKS) == []
            expect(page.locator("#chart-loss .legendtext").first).to_have_text(
                f"run {LINK_NAME} train"
            )
        finally:
            page.context.close()
        assert not guard.errors, guard.errors


# The warning's state (run.js: body data-stall "first" / "step" / "") once step s is shown.
STALL_CLEARED = "s => document.body.dataset.lastStep === s && document.body.dataset.stall === ''"


def test_a_connected_run_with_no_new_step_warns_its_loop_may_be_stuck_until_a_step_or_a_pause(
    browser: Browser, server: LiveServer
) -> None:
    """A training loop stuck in a hung data loader or a deadlock keeps its link thread
    heartbeating: the page said 'running · trainer connected' with charts that merely
    stopped, as a slow run's do. Past the threshold (?stall_s=1 here; 60 s at least
    otherwise) the banner says no step came, or none yet before the first; a new step
    clears it at once; a paused run (rightly stepless) and an ended one are not warned."""
    run_id = f"stuck-{uuid.uuid4().hex[:8]}"
    ws_url = server.url.replace("http://", "ws://") + "/ws/trainer"
    hello = hand_held_hello(run_id)
    metrics = {
        "type": "metrics",
        "v": 1,
        "seq": 1,
        "rows": [{"step": 1, "time_s": 0.0, "values": {"loss": 2.0}}],
    }
    with ws_connect(ws_url) as ws:
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        said = {"status": "running"}
        stop = threading.Event()

        def beat() -> None:  # the link thread's heartbeats, on while the "loop" is stuck
            while not stop.wait(0.3):
                ws.send(json.dumps({"type": "heartbeat", "v": 1, "step": 1, **said}))

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        page, guard = guarded_page(browser)
        try:
            banner = page.locator("#banner")
            open_ready(page, f"{server.url}/runs/{run_id}?stall_s=1")
            expect(banner).to_contain_text(
                re.compile(
                    r"^No step yet: the run has been running for over \d+ s \(since .+, its start or "
                    r"resume\) with the trainer connected"
                )
            )
            assert page.evaluate("document.body.dataset.stall") == "first"

            ws.send(json.dumps(metrics))
            page.wait_for_function(STALL_CLEARED, arg="1", polling="raf")  # at once
            expect(banner).to_contain_text(  # and a threshold later, again
                re.compile(
                    r"^No new step for over \d+ s \(since .+\) while the trainer is connected: "
                    r"the training loop may be stuck \(a hung data loader, a deadlock"
                )
            )
            expect(banner).to_have_class(re.compile(r"\bwarn\b"))

            said["status"] = "paused"  # the trainer's word, as when a Pause is applied
            expect(page.locator("#status")).to_have_text("paused")
            expect(banner).to_be_hidden()
            page.wait_for_timeout(1500)  # past the threshold: a paused run is not stuck
            assert page.evaluate("document.body.dataset.stall") == ""

            said["status"] = "running"
            expect(page.locator("#status")).to_have_text("running")
            expect(banner).to_contain_text("No new step for over")

            stop.set()
            beater.join()
            ended = {"type": "event", "v": 1, "seq": 2, "step": 1, "kind": "status"}
            ws.send(json.dumps({**ended, "data": {"status": "finished"}}))
            expect(page.locator("#status")).to_have_text("finished")
            expect(banner).to_be_hidden()
        finally:
            stop.set()
            beater.join()
            page.context.close()
    assert not guard.errors, guard.errors


def test_a_page_opened_on_a_stuck_run_times_it_by_the_trainers_own_step_times_and_past_gaps(
    browser: Browser, server: LiveServer
) -> None:
    """The page took a run's cadence from the snapshot's step_time_s chart series, min and
    max per bucket: a run stepping every 50 ms with a 1.5 s validation every 4th step had
    a median of ~0.8 s there (20 x: a 15 s threshold), so a page opened on it once stuck
    stayed silent. It now takes the server's raw step times (median 50 ms) and never
    less than 1.5 x the longest healthy gap seen (1.5 s): it warns a couple of seconds
    in, and a validation as long as one seen before raises no alert."""
    run_id = f"paced-{uuid.uuid4().hex[:8]}"
    ws_url = server.url.replace("http://", "ws://") + "/ws/trainer"
    hello = hand_held_hello(run_id)
    clock = {"t": 0.0}

    def rows(first: int, last: int, validate_every: int = 0) -> list[dict[str, Any]]:
        out = []
        for step in range(first, last + 1):
            seconds = 1.5 if validate_every and step % validate_every == 0 else 0.05
            clock["t"] += seconds
            out.append(
                {
                    "step": step,
                    "time_s": clock["t"],
                    "values": {"loss": 1.0, "step_time_s": seconds},
                }
            )
        return out

    with ws_connect(ws_url) as ws:
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        stop = threading.Event()

        def beat() -> None:  # the link thread's heartbeats, on while the "loop" is stuck
            while not stop.wait(0.3):
                ws.send(
                    json.dumps({"type": "heartbeat", "v": 1, "step": 2000, "status": "running"})
                )

        for seq in range(1, 5):
            batch = rows(500 * seq - 499, 500 * seq, validate_every=4)
            ws.send(json.dumps({"type": "metrics", "v": 1, "seq": seq, "rows": batch}))
        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        page, guard = guarded_page(browser)
        try:
            banner = page.locator("#banner")
            open_ready(page, f"{server.url}/runs/{run_id}?stall_s=1")
            page.wait_for_function("document.body.dataset.lastStep === '2000'")
            expect(banner).to_contain_text("No new step for over", timeout=4000)

            # steps again, every 50 ms; then a pause between steps as long as a
            # validation seen before: no alert
            ws.send(json.dumps({"type": "metrics", "v": 1, "seq": 5, "rows": rows(2001, 2070)}))
            page.wait_for_function(STALL_CLEARED, arg="2070", polling="raf")
            for _ in range(18):
                page.wait_for_timeout(100)
                assert page.evaluate("document.body.dataset.stall") == ""
        finally:
            stop.set()
            beater.join()
            page.context.close()
    assert not guard.errors, guard.errors


def test_a_slow_run_is_not_called_stuck_during_its_second_step(
    browser: Browser, server: LiveServer
) -> None:
    """Step 1's time is left out of the cadence (it counts the setup from watch()), so
    during step 2 the threshold was the floor alone: a healthy run stepping every 2 min was
    "stuck" a minute into its second step. With no other step time yet it is STALL_CADENCE
    x the one left out (here 20 x 3 s, against ?stall_s=1)."""
    run_id = f"slow-{uuid.uuid4().hex[:8]}"
    ws_url = server.url.replace("http://", "ws://") + "/ws/trainer"
    hello = hand_held_hello(run_id)
    row = {"step": 1, "time_s": 3.0, "values": {"loss": 2.0, "step_time_s": 3.0}}
    with ws_connect(ws_url) as ws:
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(0.3):
                ws.send(json.dumps({"type": "heartbeat", "v": 1, "step": 1, "status": "running"}))

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        page, guard = guarded_page(browser)
        try:
            open_ready(page, f"{server.url}/runs/{run_id}?stall_s=1")
            ws.send(json.dumps({"type": "metrics", "v": 1, "seq": 1, "rows": [row]}))
            page.wait_for_function(STALL_CLEARED, arg="1", polling="raf")
            page.wait_for_timeout(2500)  # past the 1 s floor, well within 20 x 3 s
            assert page.evaluate("document.body.dataset.stall") == ""
        finally:
            stop.set()
            beater.join()
            page.context.close()
    assert not guard.errors, guard.errors


def test_a_full_disk_is_said_on_the_run_page_and_cleared_once_writes_fit(
    browser: Browser, tmp_path: Path
) -> None:
    """With the data dir's disk full the page said only "The trainer is not connected"
    (review /tmp/h17c/t2_full_page.sh). The server tells a run's viewers why it cannot
    store (2c41bb4); the page now says it, and clears it once writes fit again. The fault
    is real: the writer process may not write past byte 1 of a file (RLIMIT_FSIZE)."""
    import psutil
    from layerscope.server.serving import make_server

    uv, sock, settings, app = make_server(server_settings(tmp_path / "data"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: uv.started or not thread.is_alive(), 20, "server start")
    url = f"http://127.0.0.1:{settings.port}"
    ws_url = f"ws://127.0.0.1:{settings.port}/ws/trainer"
    store = app.state.store
    proc = psutil.Process(store._writes.pid)
    _soft, hard = proc.rlimit(psutil.RLIMIT_FSIZE)

    def metrics(seq: int) -> str:
        row = {"step": seq, "time_s": float(seq), "values": {"loss": 2.0 / seq}}
        return json.dumps({"type": "metrics", "v": 1, "seq": seq, "rows": [row]})

    page, guard = guarded_page(browser)
    banner = page.locator("#banner")
    try:
        with ws_connect(ws_url) as ws:
            ws.send(json.dumps(hand_held_hello("full")))
            assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
            ws.send(metrics(1))
            assert json.loads(ws.recv(timeout=10)) == {"type": "ack", "v": 1, "seq": 1}
            open_ready(page, f"{url}/runs/full")
            proc.rlimit(psutil.RLIMIT_FSIZE, (1, hard))
            ws.send(metrics(2))
            expect(banner).to_contain_text(
                "The server cannot store this run's data: cannot store: ", timeout=15_000
            )
        proc.rlimit(psutil.RLIMIT_FSIZE, (hard, hard))  # space is back
        store._writes.clear_after_s = 0.0
        with ws_connect(ws_url) as ws:
            ws.send(json.dumps(hand_held_hello("full", last_acked_seq=1)))
            assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
            ws.send(metrics(2))
            expect(banner).not_to_contain_text("cannot store", timeout=15_000)
    finally:
        proc.rlimit(psutil.RLIMIT_FSIZE, (hard, hard))
        page.context.close()
        uv.should_exit = True
        thread.join(30)
        sock.close()
    assert not guard.errors, guard.errors
