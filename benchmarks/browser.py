"""browser — the dashboard in headless Chromium: how fast a big finished run paints, and
whether a fast live run stays current with flat memory.

Two phases, against real parts (the server is `layerscope serve` in a child process):

1. first paint: a finished 100,000-step, 30-layer run (a probe every 10 steps with 64-bin
   histograms; loss, val_loss, lr, weight decay every step) is written through Store.append
   (benchmarks/replay.py's ingest), next to a 1,000-step run of the same shape. The run page
   is loaded REPEATS times per run in a 1440x1000 window, cold (a fresh browser context:
   nothing cached) and warm (the same context again: the Plotly bundle cached), and timed
   from navigation start to its first complete paint: every chart inside the window visible
   with its data (the page's ``data-painted-ms``). Since Plotly's bundle takes seconds to
   run, the page first draws the window's line charts on canvas previews (preview.js) and
   runs Plotly after that paint; a check installed before the page's scripts confirms at
   that moment that every chart in the window is drawn: Plotly's lines or heatmap in the
   DOM, or a preview canvas whose pixels, read back, carry each of its traces' colours. The
   same check runs again when Plotly has drawn those charts (``data-plotly-painted-ms``,
   the "Plotly drawn" column), and the time until every chart on the page is drawn, below
   the fold too (``data-ready-ms``), is printed beside it. Target: cold median <= 1.5 s for
   the 100k run. Interleaved with those loads, round by round: the floor, a page holding
   nothing but the Plotly bundle (parser-inserted, served by the same server), timed until
   the bundle has run; no page can show Plotly's charts before it. ``--baseline DIR`` serves
   another checkout's web/ folder (templates, JS, CSS) from a second server on a copy of the
   data and times its pages in the same rounds ("before" beside "after").
2. live: a synthetic trainer speaking the wire protocol over /ws/trainer (hello, metrics every
   100 ms, a probe frame every 10 steps with 30 layers x 64 bins, heartbeats, reading acks)
   at 50 steps/s, with the run page open for --minutes. Every 5 s: lag = (trainer's step -
   the last step drawn in the loss chart) / rate, and the JS heap (CDP, after a forced GC).
   Targets: lag <= 1 s; heap flat once the charts hold their maximum number of points
   (4,000 per line = 80 s at 50 steps/s): the last samples against the first ones taken
   after FULL_AFTER_S. A run shorter than that reports the lag only (use --minutes 5).

Run:  .venv/bin/python benchmarks/browser.py                 (about 3-4 minutes on 2 cores)
      .venv/bin/python benchmarks/browser.py --minutes 5     (the full live target)
      .venv/bin/python benchmarks/browser.py --skip-paint    (live phase only)
      git worktree add /tmp/old HEAD~1 && .venv/bin/python benchmarks/browser.py --skip-live \
          --baseline /tmp/old/web                            (first paint, before and after)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerscope.server.store import Store
from layerscope.trainer import wire
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright
from replay import LAYERS, free_port, ingest, layer_names, start_server, wait_healthy
from websockets.asyncio.client import connect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPEATS = 5
TARGET_PAINT_S = 1.5
TARGET_LAG_S = 1.0
LIVE_RATE = 50  # steps per second
LIVE_PROBE_EVERY = 10
LIVE_FLUSH_S = 0.1
SAMPLE_EVERY_S = 5.0
FULL_AFTER_S = 100.0  # charts' point caps reached (MAX_POINTS in charts.js / LIVE_RATE, plus slack)
BINS = 64
VIEWPORT: ViewportSize = {"width": 1440, "height": 1000}


# ---- phase 1: first paint ----


def build_runs(data_dir: Path) -> None:
    async def build() -> None:
        store = Store(data_dir, commit_interval_s=0.05)
        await store.open()
        try:
            for run_id, steps in (("run-1k", 1_000), ("run-100k", 100_000)):
                seconds, frames, _ = await ingest(store, run_id, steps, LAYERS)
                print(f"  wrote {run_id}: {frames} frames in {seconds:.1f} s", flush=True)
        finally:
            await store.close()

    asyncio.run(build())


# Installed before the page's own scripts. The moment the page says the window is painted
# (body data-painted-ms), this checks, independently of the page's own list, that every chart
# intersecting the window then has its data drawn: a Plotly chart laid out with a line path for
# every trace holding points and a heatmap image for every heatmap, every layer's small-multiple
# canvas, or a canvas preview (preview.js, drawn before Plotly has run) whose pixels, read back,
# hold each of its traces' colours along at least a quarter of its width (its legend's swatches
# alone cannot pass). The moment the page says Plotly has drawn the window
# (data-plotly-painted-ms), it checks again with Plotly's charts alone. Read back after the page
# is ready; the readback costs the page a few ms before Plotly runs, counted against it.
VERIFY_JS = """
(() => {
  const visible = (el) => { const r = el.getBoundingClientRect();
    return r.width > 0 && r.bottom > 0 && r.right > 0 && r.top < innerHeight && r.left < innerWidth; };
  const rgb = (hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const previewDrawn = (canvas) => {
    const colors = (canvas.dataset.colors || '').split(' ').filter(Boolean).map(rgb);
    const lines = Number(canvas.dataset.lines);
    if (!(canvas.width > 1) || colors.length !== lines) return false;
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const hits = colors.map(() => 0);
    for (let i = 0; i < px.length; i += 4) {
      if (px[i + 3] < 96) continue;
      colors.forEach(([r, g, b], k) => {
        if (Math.abs(px[i] - r) + Math.abs(px[i + 1] - g) + Math.abs(px[i + 2] - b) < 60) hits[k]++;
      });
    }
    return hits.every((h) => h >= canvas.width / 4);
  };
  const drawn = (el, previews) => {
    if (el.id === 'multiples') {
      const cells = el.querySelectorAll('.multiple canvas');
      return cells.length > 0 && [...cells].every((c) => c.width > 1);
    }
    const preview = el.querySelector(':scope > canvas.chart-preview');
    if (!el._fullLayout) return previews && preview !== null && previewDrawn(preview);
    if (!el.querySelector('.main-svg')) return false;
    const data = el.data || [];
    const lines = data.filter((t) => t.type === 'scatter' && (t.x || []).length > 1).length;
    const maps = data.filter((t) => t.type === 'heatmap' && (t.z || []).length > 0).length;
    const paths = [...el.querySelectorAll('.scatterlayer .trace path.js-line')].filter((p) => (p.getAttribute('d') || '').length > 2).length;
    const images = el.querySelectorAll('.heatmaplayer image').length;
    return paths >= lines && images >= maps;
  };
  const check = (previews) => {
    const charts = [...document.querySelectorAll('.chart, #multiples')];
    const shown = charts.filter(visible);
    return {
      at: performance.now(),
      visible: shown.map((el) => el.id),
      undrawn: shown.filter((el) => !drawn(el, previews)).map((el) => el.id),
      previews: shown.filter((el) => !el._fullLayout && el.querySelector(':scope > canvas.chart-preview')).map((el) => el.id),
    };
  };
  new MutationObserver(() => {
    const body = document.body.dataset;
    if (body.paintedMs !== undefined && !window.__paintCheck) window.__paintCheck = check(true);
    if (body.plotlyPaintedMs !== undefined && !window.__plotlyCheck) window.__plotlyCheck = check(false);
  }).observe(document, { attributes: true, subtree: true, attributeFilter: ['data-painted-ms', 'data-plotly-painted-ms'] });
})();
"""


@dataclass
class Paint:
    painted_s: float  # every chart in the window visible with its data: the first complete paint
    plotly_painted_s: float  # the same charts drawn by Plotly (painted_s without a preview)
    ready_s: float  # every chart on the page drawn
    plotly_s: float  # the Plotly bundle has run
    history_s: float  # the REST history is in
    by_preview: bool  # the first complete paint was the canvas preview's
    visible: list[str]


def time_paint(page: Page, url: str) -> Paint:
    """One load of the run page, timed from navigation start."""
    page.add_init_script(VERIFY_JS)
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready !== undefined", timeout=60_000)
    if page.evaluate("document.body.dataset.ready") != "1":
        raise RuntimeError(f"{url} did not load: {page.inner_text('#banner')}")
    check = page.evaluate("window.__paintCheck")
    if not check or check["undrawn"] or not check["visible"]:
        raise RuntimeError(f"{url}: the first paint was declared with charts undrawn: {check}")
    # A page from before the preview has no Plotly mark of its own: its paint was Plotly's.
    plotly_check = page.evaluate("window.__plotlyCheck") or check
    if plotly_check["undrawn"] or plotly_check["previews"]:
        raise RuntimeError(
            f"{url}: Plotly's paint was declared with charts undrawn: {plotly_check}"
        )
    marks = page.evaluate(
        "Object.fromEntries(performance.getEntriesByType('mark').map(m => [m.name, m.startTime]))"
    )
    data = page.evaluate("({...document.body.dataset})")
    painted = float(data["paintedMs"]) / 1000
    return Paint(
        painted_s=painted,
        plotly_painted_s=float(data.get("plotlyPaintedMs", data["paintedMs"])) / 1000,
        ready_s=float(data["readyMs"]) / 1000,
        plotly_s=marks.get("layerscope:plotly", float("nan")) / 1000,
        history_s=marks.get("layerscope:history", float("nan")) / 1000,
        by_preview=bool(check["previews"]),
        visible=list(check["visible"]),
    )


CALIBRATE_JS = "() => { const t = performance.now(); let x = 0; for (let i = 0; i < 1e8; i++) x += i % 7; return [performance.now() - t, x]; }"
# The floor: a page holding nothing but the Plotly bundle, the way a page includes it (a
# parser-inserted script, compiled while it streams in), served by the same server.
FLOOR_HTML = """<!doctype html><html><head><meta charset="utf-8">
<script src="{src}"></script><script>performance.mark('plotly')</script></head><body></body></html>"""


def plotly_floor(browser: Browser, base: str, plotly_src: str) -> float:
    """Seconds from navigation start until the Plotly bundle alone has run (fresh context)."""
    context = browser.new_context()
    html = FLOOR_HTML.format(src=plotly_src)
    context.route(
        f"{base}/__floor", lambda route: route.fulfill(content_type="text/html", body=html)
    )
    page = context.new_page()
    page.goto(f"{base}/__floor")
    seconds = float(page.evaluate("performance.getEntriesByName('plotly')[0].startTime")) / 1000
    context.close()
    return seconds


def calibrate(browser: Browser, base: str) -> float:
    """ms for a 1e8-step JS loop: how fast this machine is right now (idle modern core ~100-150)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{base}/healthz")
    ms = float(page.evaluate(CALIBRATE_JS)[0])
    context.close()
    return ms


@dataclass
class PaintRow:
    site: str  # "" alone; "before" / "after" with --baseline
    run_id: str
    kind: str  # cold (fresh context) or warm (the same context again: Plotly cached)
    loads: list[Paint]

    def median(self, attr: str) -> float:
        return statistics.median(getattr(p, attr) for p in self.loads)


def paint_phase(
    browser: Browser, sites: dict[str, str], repeats: int = REPEATS
) -> tuple[list[PaintRow], list[float], list[float]]:
    """Cold and warm loads of both runs on every site (label -> base URL) and the Plotly-alone
    floor, interleaved round by round (the sites' order alternating) so that the machine's
    load drifts over all of them alike."""
    base = list(sites.values())[-1]  # the page under test's server serves the floor
    plotly_src = ""
    for site_base in sites.values():
        for run_id in ("run-1k", "run-100k"):
            warmup = browser.new_context(viewport=VIEWPORT)
            page = warmup.new_page()
            time_paint(page, f"{site_base}/runs/{run_id}")  # server caches, OS page cache
            plotly_src = page.evaluate(
                "document.querySelector('link[href*=\"plotly.min.js\"]').href"
            )
            warmup.close()
    rows = {
        (site, r, k): PaintRow(site, r, k, [])
        for site in sites
        for r in ("run-1k", "run-100k")
        for k in ("cold", "warm")
    }
    floors: list[float] = []
    loops: list[float] = []
    for round_no in range(repeats):
        order = list(sites.items())
        for site, site_base in order[round_no % 2 :] + order[: round_no % 2]:
            for run_id in ("run-1k", "run-100k"):
                context = browser.new_context(viewport=VIEWPORT)
                url = f"{site_base}/runs/{run_id}"
                rows[(site, run_id, "cold")].loads.append(time_paint(context.new_page(), url))
                rows[(site, run_id, "warm")].loads.append(time_paint(context.new_page(), url))
                context.close()
        floors.append(plotly_floor(browser, base, plotly_src))
        loops.append(calibrate(browser, base))
        for site in sites:
            big = rows[(site, "run-100k", "cold")].loads[-1]
            print(
                f"  round {len(floors)} {site}: 100k cold painted {big.painted_s:.2f} s"
                f" ({'preview' if big.by_preview else 'Plotly'}), Plotly drawn"
                f" {big.plotly_painted_s:.2f} s, all drawn {big.ready_s:.2f} s;"
                f" Plotly alone {floors[-1]:.2f} s",
                flush=True,
            )
    return list(rows.values()), floors, loops


# A server whose dashboard files (templates, JS, CSS) come from another checkout's web/
# folder: the page before a change, served beside the page after it, for side-by-side timing.
BASELINE_SERVER = """
import sys
from pathlib import Path
import layerscope.web as web
web.STATIC_DIR = Path(sys.argv[1]) / "static"
web.TEMPLATES_DIR = Path(sys.argv[1]) / "templates"
from layerscope.server.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def start_baseline_server(data_dir: Path, web_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`layerscope serve` on a copy of data_dir with web_dir's dashboard files."""
    if not (web_dir / "static" / "js" / "run.js").is_file():
        raise SystemExit(f"--baseline {web_dir}: no static/js/run.js there (give a web/ folder)")
    copy = Path(tempfile.mkdtemp(prefix="layerscope-browser-baseline-")) / "data"
    shutil.copytree(data_dir, copy)
    port = free_port()
    cmd = [sys.executable, "-c", BASELINE_SERVER, str(web_dir), "serve", "--port", str(port)]
    cmd += ["--data-dir", str(copy), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(proc, f"http://127.0.0.1:{port}", "the baseline server")


# ---- phase 2: a live run ----


@dataclass
class TrainerState:
    step: int = -1
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def probe_layers(step: int) -> list[dict[str, Any]]:
    out = []
    for i, name in enumerate(layer_names(LAYERS)):
        center = BINS / 2 + ((step // LIVE_PROBE_EVERY + i) % 9) - 4
        counts = [int(3000 * 2.718 ** (-(((b - center) / 8.0) ** 2))) for b in range(BINS)]
        out.append(
            {
                "name": name,
                "mean": 0.0,
                "std": 1.0,
                "min": -3.0,
                "max": 3.0,
                "zero_frac": 0.1,
                "nonfinite": 0,
                "dead_ratio": (i % 5) / 10,
                "saturated_frac": None,
                "saturated_ratio": None,
                "grad_norm": 0.01 * (1 + i),
                "weight_norm": 3.0,
                "update_ratio": 1e-3,
                "hist": {"lo": -3.0, "hi": 3.0, "counts": counts},
            }
        )
    return out


async def synthetic_trainer(ws_url: str, run_id: str, state: TrainerState) -> None:
    """The trainer's side of the protocol at LIVE_RATE steps/s, paced by the wall clock."""
    hello = {
        "type": "hello",
        "run_id": run_id,
        "name": "live benchmark",
        "config": {"rate": LIVE_RATE},
        "layers": [
            {"name": n, "kind": "Linear" if ".fc" in n else "ReLU", "units": 256}
            for n in layer_names(LAYERS)
        ],
    }
    async with connect(ws_url, max_size=None) as ws:
        await ws.send(wire.encode(hello))
        json.loads(await ws.recv())  # welcome

        async def drain() -> None:
            async for _ in ws:  # acks and commands; reading keeps the socket's buffers empty
                pass

        reader = asyncio.create_task(drain())
        seq = 0
        start = time.monotonic()
        last_beat = 0.0
        while not state.stop.is_set():
            now = time.monotonic()
            target = int((now - start) * LIVE_RATE)
            if target > state.step + 1:
                steps = range(state.step + 1, target)
                rows = [
                    {
                        "step": s,
                        "time_s": now - start,
                        "values": {"loss": 2.0 / (1 + s / 500), "lr": 0.1},
                    }
                    for s in steps
                ]
                seq += 1
                await ws.send(wire.encode({"type": "metrics", "seq": seq, "rows": rows}))
                for s in steps:
                    if s % LIVE_PROBE_EVERY == 0:
                        seq += 1
                        frame = {"type": "probe", "seq": seq, "step": s, "layers": probe_layers(s)}
                        await ws.send(wire.encode(frame))
                state.step = target - 1
            if now - last_beat >= 1.0:
                await ws.send(
                    wire.encode(
                        {"type": "heartbeat", "step": max(0, state.step), "status": "running"}
                    )
                )
                last_beat = now
            await asyncio.sleep(LIVE_FLUSH_S)
        end = {
            "type": "event",
            "seq": seq + 1,
            "step": max(0, state.step),
            "kind": "status",
            "data": {"status": "finished"},
        }
        await ws.send(wire.encode(end))
        reader.cancel()


def run_trainer(ws_url: str, run_id: str, state: TrainerState) -> None:
    try:
        asyncio.run(synthetic_trainer(ws_url, run_id, state))
    except BaseException as exc:  # reported by the main thread
        state.error = exc


def drawn_step(page: Page) -> int:
    return int(
        page.evaluate(
            "(() => { const x = document.getElementById('chart-loss').data?.[0]?.x; return x && x.length ? x[x.length - 1] : -1; })()"
        )
    )


def live_phase(browser: Browser, base: str, minutes: float) -> dict[str, Any]:
    state = TrainerState()
    ws_url = base.replace("http://", "ws://") + "/ws/trainer"
    run_id = f"live-bench-{wire.new_id()[:8]}"  # a fresh run even when --data-dir is reused
    thread = threading.Thread(target=run_trainer, args=(ws_url, run_id, state), daemon=True)
    thread.start()
    while state.step < 20:
        if state.error:
            raise state.error
        time.sleep(0.1)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"{base}/runs/{run_id}")
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
    cdp = context.new_cdp_session(page)
    samples: list[tuple[float, float, float]] = []  # (t, lag_s, heap_mb)
    start = time.monotonic()
    while time.monotonic() - start < minutes * 60:
        time.sleep(SAMPLE_EVERY_S)
        if state.error:
            raise state.error
        before = state.step
        shown = drawn_step(page)
        after = state.step
        lag_s = max(0.0, ((before + after) / 2 - shown) / LIVE_RATE)
        cdp.send("HeapProfiler.collectGarbage")
        heap_mb = cdp.send("Runtime.getHeapUsage")["usedSize"] / 2**20
        samples.append((time.monotonic() - start, lag_s, heap_mb))
        print(
            f"  t={samples[-1][0]:5.0f} s  trainer step {after:6d}  drawn {shown:6d}  lag {lag_s:5.2f} s  heap {heap_mb:6.1f} MB",
            flush=True,
        )
    state.stop.set()
    thread.join(10)
    context.close()
    lags = [s[1] for s in samples]
    full = [s[2] for s in samples if s[0] >= FULL_AFTER_S]
    third = max(1, len(full) // 3)
    return {
        "samples": len(samples),
        "lag_median_s": statistics.median(lags),
        "lag_max_s": max(lags),
        "heap_start_mb": samples[0][2],
        "heap_first_mb": statistics.median(full[:third]) if len(full) >= 3 else None,
        "heap_last_mb": statistics.median(full[-third:]) if len(full) >= 3 else None,
        "heap_end_mb": samples[-1][2],
        "final_step": state.step,
    }


def report_paint(paint: list[PaintRow], floors: list[float], loops: list[float]) -> bool:
    print()
    print(
        f"machine now: a 1e8-step JS loop takes {statistics.median(loops):.0f} ms"
        " (an idle modern core: ~100-150 ms)"
    )
    floor = statistics.median(floors)
    print(
        f"floor: a page with nothing but the Plotly bundle has run it after {floor:.2f} s"
        f" (median of {len(floors)}, min {min(floors):.2f} s)"
    )
    visible = " ".join(paint[0].loads[0].visible)
    print(
        f"first complete paint ('painted') = every chart in the {VIEWPORT['width']}x{VIEWPORT['height']}"
    )
    print(f"  window ({visible}) visible with its data, checked in the page at that moment")
    print("  (Plotly's lines, or a canvas preview's pixels in every trace's colour; 'preview' =")
    print("  loads painted by the preview); 'Plotly drawn' = those charts drawn by Plotly;")
    print(f"  'all drawn' = every chart on the page, below the fold too (median of {len(floors)}):")
    print(
        f"{'site':<7} {'run':<9} {'load':<5} {'painted':>8} {'max':>7} {'preview':>8}"
        f" {'Plotly drawn':>13} {'all drawn':>10} {'Plotly ran':>11} {'REST in':>8}"
        f" {'painted - floor':>16}"
    )
    for row in paint:
        worst = max(p.painted_s for p in row.loads)
        painted = row.median("painted_s")
        previews = f"{sum(p.by_preview for p in row.loads)}/{len(row.loads)}"
        print(
            f"{row.site or '-':<7} {row.run_id:<9} {row.kind:<5} {painted:>6.2f} s {worst:>5.2f} s"
            f" {previews:>8} {row.median('plotly_painted_s'):>11.2f} s"
            f" {row.median('ready_s'):>8.2f} s {row.median('plotly_s'):>9.2f} s"
            f" {row.median('history_s'):>6.2f} s {painted - floor:>+14.2f} s"
        )
    site = paint[-1].site  # the page under test: "after" beside a baseline
    cold = {r.run_id: r for r in paint if r.site == site and r.kind == "cold"}
    big, small = cold["run-100k"].median("painted_s"), cold["run-1k"].median("painted_s")
    ok = big <= TARGET_PAINT_S
    print(
        f"100k / 1k cold ratio {big / small:.2f};  target: cold 100k first complete paint"
        f" <= {TARGET_PAINT_S} s: {'ok' if ok else 'MISSED'}"
        f" (Plotly drawn {cold['run-100k'].median('plotly_painted_s'):.2f} s)"
    )
    before = [r for r in paint if r.site == "before" and r.run_id == "run-100k"]
    for row in before:
        after = next(
            r for r in paint if r.site == site and r.run_id == row.run_id and r.kind == row.kind
        )
        print(
            f"  100k {row.kind}: painted {row.median('painted_s'):.2f} -> {after.median('painted_s'):.2f} s,"
            f" Plotly drawn {row.median('plotly_painted_s'):.2f} -> {after.median('plotly_painted_s'):.2f} s"
        )
    return ok


def report_live(live: dict[str, Any]) -> bool:
    print()
    lag_ok = bool(live["lag_max_s"] <= TARGET_LAG_S)
    print(f"live: {live['samples']} samples, final step {live['final_step']}")
    print(
        f"  lag median {live['lag_median_s']:.2f} s, max {live['lag_max_s']:.2f} s"
        f"  (target <= {TARGET_LAG_S} s: {'ok' if lag_ok else 'MISSED'})"
    )
    print(
        f"  JS heap {live['heap_start_mb']:.1f} MB at the first sample,"
        f" {live['heap_end_mb']:.1f} MB at the last"
    )
    if live["heap_first_mb"] is None:
        print(
            f"  heap flatness not judged: the charts fill their point caps after"
            f" ~{FULL_AFTER_S:.0f} s (use --minutes 5)"
        )
        return lag_ok
    growth = live["heap_last_mb"] - live["heap_first_mb"]
    flat = bool(growth <= max(5.0, 0.2 * live["heap_first_mb"]))
    print(
        f"  after the caps: first third {live['heap_first_mb']:.1f} MB, last third"
        f" {live['heap_last_mb']:.1f} MB, growth {growth:+.1f} MB ({'flat' if flat else 'GROWING'})"
    )
    return lag_ok and flat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=1.0,
        help="live phase length (default 1; 5 for the full target)",
    )
    parser.add_argument("--skip-paint", action="store_true", help="live phase only")
    parser.add_argument("--skip-live", action="store_true", help="first-paint phase only")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="reuse (or keep) the written runs here"
    )
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"rounds of page loads (default {REPEATS})"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout's web/ folder (e.g. from `git worktree add /tmp/old HEAD~1`):"
        " its pages are timed beside this tree's, round by round, as 'before' and 'after'",
    )
    args = parser.parse_args()

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="layerscope-browser-bench-"))
    if not args.skip_paint and not (data_dir / "layerscope.db").exists():
        print(f"writing runs into {data_dir} ...", flush=True)
        build_runs(data_dir)
    proc, base = start_server(data_dir)
    baseline = start_baseline_server(data_dir, args.baseline) if args.baseline else None
    sites = {"before": baseline[1], "after": base} if baseline else {"": base}
    paint: list[PaintRow] = []
    floors: list[float] = []
    loops: list[float] = []
    live: dict[str, Any] | None = None
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            if not args.skip_paint:
                paint, floors, loops = paint_phase(browser, sites, args.repeats)
            if not args.skip_live:
                print(
                    f"live run: {LIVE_RATE} steps/s, {LAYERS} layers, {args.minutes:g} min",
                    flush=True,
                )
                live = live_phase(browser, base, args.minutes)
            browser.close()
    finally:
        for server in [proc] + ([baseline[0]] if baseline else []):
            server.terminate()
            server.wait(10)
    ok = True
    if paint:
        ok &= report_paint(paint, floors, loops)
    if live is not None:
        ok &= report_live(live)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
