"""The run page's canvas preview (preview.js, wired in run.js) in headless Chromium against
a real server and a real finished training run.

Plotly's bundle takes seconds to run on a slow machine; until it has, the line charts in the
window are drawn on canvases from the data the page fetched. Here the bundle's answer is
held back until the test lets it go, so the preview is all there is to see: it must show the
traces in Plotly's colours and count as the page's first paint, then give way to Plotly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import LiveServer, PageGuard
from playwright.sync_api import Browser, Page, Route

pytestmark = pytest.mark.browser

WINDOW_CHARTS = ["chart-loss", "chart-acc", "chart-lr", "chart-wd"]
TRAIN, VALIDATION = "#4aa3ff", "#f5a623"  # COLORS[0] and COLORS[1] in charts.js
# The finished run's four charts and their traces' colours; on the live run (opened a few
# probe steps in) the validation lines may hold a single point, so only the training lines.
EXPECTED_COLORS = {
    "finished": {
        "chart-loss": [TRAIN, VALIDATION],
        "chart-acc": [TRAIN, VALIDATION],
        "chart-lr": [TRAIN],
        "chart-wd": [TRAIN],
    },
    "live": {chart: [TRAIN] for chart in WINDOW_CHARTS},
}

IN_WINDOW_JS = """els => els.filter((e) => { const r = e.getBoundingClientRect();
  return r.width > 0 && r.bottom > 0 && r.top < innerHeight; }).map((e) => e.id)"""

# Reads a preview canvas back: its size against its CSS size, its label, and for each colour
# how many opaque pixels carry it (a line across the plot has hundreds; a legend swatch ~60).
PREVIEW_PIXELS_JS = """
([id, colors]) => {
  const c = document.querySelector(`#${id} > canvas.chart-preview`);
  if (!c) return null;
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const rgb = colors.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  const hits = rgb.map(() => 0);
  for (let i = 0; i < px.length; i += 4) {
    if (px[i + 3] < 96) continue;
    rgb.forEach(([r, g, b], k) => {
      if (Math.abs(px[i] - r) + Math.abs(px[i + 1] - g) + Math.abs(px[i + 2] - b) < 60) hits[k]++;
    });
  }
  return { width: c.width, height: c.height, cssWidth: c.clientWidth, cssHeight: c.clientHeight,
           label: c.getAttribute('aria-label'), hits };
}
"""


@pytest.fixture
def hidpi_page(browser: Browser, guard: PageGuard) -> Iterator[Page]:
    """A fresh page at devicePixelRatio 2 (the canvases must be sized for it), guarded like
    conftest's: no console or page errors, no request leaving localhost."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=2)
    page = context.new_page()
    page.on("console", guard.console)
    page.on("pageerror", lambda exc: guard.errors.append(f"pageerror: {exc}"))
    page.on("request", guard.request)
    page.on("websocket", lambda ws: guard.url(ws.url))
    yield page
    context.close()
    assert not guard.errors, "the page logged errors:\n" + "\n".join(guard.errors)
    assert not guard.remote, f"requests left localhost: {guard.remote}"


@pytest.mark.parametrize("which", ["finished", "live"])
def test_the_window_is_previewed_on_canvas_until_plotly_has_run(
    hidpi_page: Page, server: LiveServer, request: pytest.FixtureRequest, which: str
) -> None:
    page = hidpi_page
    run: dict[str, Any] = request.getfixturevalue(f"{which}_run")
    held: list[Route] = []
    holding = [True]

    def hold_plotly(route: Route) -> None:
        if holding[0]:
            held.append(route)
        else:
            route.continue_()

    page.route("**/static/plotly.min.js*", hold_plotly)
    page.goto(f"{server.url}/runs/{run['id']}", wait_until="domcontentloaded")
    page.wait_for_function(
        "document.querySelectorAll('canvas.chart-preview').length === 4", timeout=30_000
    )
    # The preview is the first paint only when the window holds nothing but its charts. The
    # live page has no replay bar, so a 1000 px window shows the heatmaps' top edge too: its
    # first paint stays Plotly's.
    in_window = page.eval_on_selector_all(".chart, #multiples", IN_WINDOW_JS)
    alone = in_window == WINDOW_CHARTS
    assert alone or which == "live", in_window
    if alone:
        page.wait_for_function("document.body.dataset.paintedMs !== undefined", timeout=10_000)
    else:
        page.wait_for_timeout(500)  # the preview's frame has long been painted by then

    assert held, "the Plotly bundle was never asked for"
    assert page.evaluate("window.Plotly === undefined")
    body = page.evaluate("({...document.body.dataset})")
    if alone:
        assert body["paintedBy"] == "preview"
        assert body["paintedCharts"].split() == WINDOW_CHARTS
        assert page.evaluate("performance.getEntriesByName('layerscope:painted').length") == 1
    else:
        assert "paintedMs" not in body, "painted with charts in the window not drawn"
    assert "plotlyPaintedMs" not in body and "ready" not in body
    for chart, colors in EXPECTED_COLORS[which].items():
        preview = page.evaluate(PREVIEW_PIXELS_JS, [chart, colors])
        assert preview is not None, f"{chart} has no preview canvas"
        assert (preview["width"], preview["height"]) == (
            2 * preview["cssWidth"],
            2 * preview["cssHeight"],
        ), f"{chart}'s canvas is not sized for devicePixelRatio 2: {preview}"
        for color, hits in zip(colors, preview["hits"], strict=True):
            assert hits >= preview["width"] / 4, f"{chart}: too few {color} pixels ({preview})"
        assert "over steps" in preview["label"], preview["label"]
    loss_label = page.get_attribute("#chart-loss > canvas.chart-preview", "aria-label") or ""
    assert loss_label.startswith(
        "Loss: train, validation" if which == "finished" else "Loss: train"
    )
    # Nothing below the window was previewed: those charts are Plotly's alone.
    assert page.locator("#chart-dead canvas, #chart-grad canvas").count() == 0

    holding[0] = False
    for route in held:
        route.continue_()
    # Plotly's paint of the window is the end of the preview (the charts below follow).
    page.wait_for_function(
        "document.body.dataset.plotlyPaintedMs !== undefined || document.body.dataset.ready",
        timeout=60_000,
    )

    assert page.evaluate("document.body.dataset.ready") != "error", page.inner_text("#banner")
    assert page.locator("canvas.chart-preview").count() == 0
    painted, plotted = page.evaluate(
        "[document.body.dataset.paintedMs, document.body.dataset.plotlyPaintedMs].map(Number)"
    )
    if alone:
        assert 0 < painted < plotted
    else:
        assert page.evaluate("document.body.dataset.paintedBy") == "plotly"
        assert 0 < plotted <= painted
    assert page.evaluate("performance.getEntriesByName('layerscope:plotly-painted').length") == 1
    for chart, colors in EXPECTED_COLORS[which].items():
        paths = page.locator(f"#{chart} .scatterlayer .trace path.js-line")
        assert paths.count() >= len(colors), f"{chart}: Plotly drew {paths.count()} lines"


# Draws one LineChart's preview on a bare page of the server (no run, no Plotly), the way run.js
# does, and reads back the row of the trace's colour (the middle of its pixels) in the columns at
# a quarter, half and three quarters of the plot's width, and in the middle of the line's gap.
BLANK_HTML = "<!doctype html><link rel=icon href='data:,'><body></body>"
DRAW_ALONE_JS = """
async ([logY]) => {
  const { LineChart } = await import('/static/js/charts.js');
  const { drawPreview } = await import('/static/js/preview.js');
  const div = document.createElement('div');
  div.style.cssText = 'width: 600px; height: 260px';
  document.body.replaceChildren(div);
  const chart = new LineChart(div, [{ name: 'grad' }], { logY, yTitle: 'grad norm', showLegend: false });
  const steps = Array.from({ length: 401 }, (_, i) => i * 10);
  // 1e-4 .. 1, tenfold every 1000 steps: a straight line on a log axis; no value at step 3500.
  chart.setSeries(0, steps, steps.map((s) => (s === 3500 ? null : 10 ** (-4 + s / 1000))));
  const canvas = drawPreview(chart, 'Gradient norm');
  const ctx = canvas.getContext('2d');
  const rowAt = (f) => {
    const x = Math.round(52 + f * (canvas.width - 52 - 12));  // charts.js baseLayout's margins
    const col = ctx.getImageData(x, 0, 1, canvas.height).data;
    const rows = [];
    for (let y = 0; y < canvas.height; y++) {
      const [r, g, b, a] = col.slice(4 * y, 4 * y + 4);
      if (a > 96 && Math.abs(r - 0x4a) + Math.abs(g - 0xa3) + Math.abs(b - 0xff) < 60) rows.push(y);
    }
    return rows.length ? rows[rows.length >> 1] : null;
  };
  return { label: canvas.getAttribute('aria-label'), rows: [0.25, 0.5, 0.75].map(rowAt), gap: rowAt(0.875) };
}
"""


def test_a_log_scale_preview_puts_values_on_a_log_axis_and_breaks_lines_at_gaps(
    page: Page, server: LiveServer
) -> None:
    # A blank page of the server's origin, so that the modules import from it.
    page.route(
        f"{server.url}/blank",
        lambda route: route.fulfill(content_type="text/html", body=BLANK_HTML),
    )
    page.goto(f"{server.url}/blank")
    log = page.evaluate(DRAW_ALONE_JS, [True])
    assert log["label"].startswith("Gradient norm: grad over steps 0–4000, log scale"), log
    q1, mid, q3 = log["rows"]
    assert None not in log["rows"], log
    # Tenfold growth every equal number of steps is a straight line on a log axis.
    assert abs(mid - (q1 + q3) / 2) <= 3, log
    assert log["gap"] is None, "the line was drawn across a missing value"
    linear = page.evaluate(DRAW_ALONE_JS, [False])
    assert "log scale" not in linear["label"]
    l1, _, l3 = linear["rows"]
    assert l1 is not None and l3 is not None, linear
    # On a linear axis the same values hug the bottom until the last quarter.
    assert abs(l1 - l3) < abs(q1 - q3) / 4, (log, linear)


# One LineChart per case drawn as run.js draws it before Plotly has run, then by Plotly: a
# trace of a single point, one of three points, and a chart with no point at all.
FEW_AND_EMPTY_JS = """
async () => {
  const { LineChart, FEW_POINTS } = await import('/static/js/charts.js');
  const { drawPreview } = await import('/static/js/preview.js');
  const make = (steps, values) => {
    const div = document.createElement('div');
    div.style.cssText = 'width: 600px; height: 260px';
    document.body.append(div);
    const chart = new LineChart(div, [{ name: 'train' }], { yTitle: 'loss', showLegend: false,
      empty: 'no loss logged yet: pass loss= to w.step' });
    if (steps.length) chart.setSeries(0, steps, values);
    return chart;
  };
  document.body.replaceChildren();
  const charts = { one: make([0], [2.3]), three: make([0, 10, 20], [2.3, 1.9, 1.7]), none: make([], []) };
  // the trace's colour (COLORS[0]) within 4 px of a point's place, as drawn on the canvas
  const around = (canvas, x, y) => {
    const ctx = canvas.getContext('2d');
    const d = ctx.getImageData(x - 4, y - 4, 9, 9).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] > 96 && Math.abs(d[i] - 0x4a) + Math.abs(d[i + 1] - 0xa3) + Math.abs(d[i + 2] - 0xff) < 60) n++;
    }
    return n;
  };
  const note = (div) => { const n = div.querySelector(':scope > .chart-note'); return n && !n.hidden ? n.textContent : null; };
  const preview = {};
  for (const [name, chart] of Object.entries(charts)) {
    const canvas = drawPreview(chart, 'Loss');
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let inked = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i]) inked++;
    preview[name] = { label: canvas.getAttribute('aria-label'), note: note(chart.div), inked,
      markers: canvas.dataset.markers };
  }
  // the one point sits in the middle of the plot (Plotly's range: its step ± 1, its value
  // ± 1) inside charts.js baseLayout's margins (l 52, r 12, t 8, b 32)
  preview.one.dot = around(charts.one.div.querySelector('canvas'), 52 + (600 - 64) / 2, 8 + (260 - 40) / 2);
  await new Promise((resolve, reject) => {
    const s = document.createElement('script');
    s.src = '/static/plotly.min.js';
    s.onload = resolve; s.onerror = reject;
    document.head.append(s);
  });
  const plotly = {};
  for (const [name, chart] of Object.entries(charts)) {
    await chart.draw();
    plotly[name] = { modes: chart.div.data.map((t) => t.mode), note: note(chart.div),
      canvas: chart.div.querySelectorAll('canvas.chart-preview').length };
  }
  return { preview, plotly, few: FEW_POINTS };
}
"""


def test_a_preview_marks_each_point_of_a_short_trace_and_says_why_a_chart_is_empty(
    page: Page, server: LiveServer
) -> None:
    """A run of one probe step previewed as empty charts: a single point drawn as a line is
    nothing, and a chart with no data had bare axes where Plotly's says what to log. The
    preview draws a marker on each point of a short trace and the chart's note, as Plotly."""
    page.route(
        f"{server.url}/blank",
        lambda route: route.fulfill(content_type="text/html", body=BLANK_HTML),
    )
    page.goto(f"{server.url}/blank")
    got = page.evaluate(FEW_AND_EMPTY_JS)
    preview, plotly = got["preview"], got["plotly"]
    assert got["few"] >= 3
    assert preview["one"]["dot"] >= 20, got  # a 6 px disc: it drew nothing
    assert preview["one"]["label"].startswith("Loss: train at step 0"), got
    assert preview["one"]["note"] is None and preview["three"]["note"] is None, got
    note = "no loss logged yet: pass loss= to w.step"
    assert preview["three"]["markers"] == "3", got
    # no axes, no ticks: an empty canvas under the note, which Plotly's chart keeps
    assert preview["none"]["note"] == note and preview["none"]["inked"] == 0, got
    assert preview["none"]["label"] == f"Loss: {note}", got
    assert plotly["one"]["modes"] == plotly["three"]["modes"] == ["lines+markers"], got
    assert plotly["none"]["note"] == note and plotly["one"]["note"] is None, got
    assert all(p["canvas"] == 0 for p in plotly.values()), got
