"""browser — the dashboard in headless Chromium: how fast a big finished run paints, and
whether a fast live run stays current with flat memory.

Two phases, against real parts (the server is `layerscope serve` in a child process):

1. first paint: a finished 100,000-step, 30-layer run (a probe every 10 steps with 64-bin
   histograms; loss, val_loss, lr, weight decay every step) is written through Store.append
   (benchmarks/replay.py's ingest), next to a 1,000-step run of the same shape. The run page
   is loaded REPEATS times per run in a 1440x1000 window, cold (a fresh browser context:
   nothing cached) and warm (the same context again: the Plotly bundle cached), and timed
   from navigation start to its first complete paint: every chart inside the window drawn
   with its data and painted (the page's ``data-painted-ms``; a check installed before the
   page's scripts confirms at that moment, from the charts' DOM, that every chart in the
   window has its lines or heatmap drawn). The time until every chart on the page is drawn,
   below the fold too (``data-ready-ms``), is printed beside it. Target: cold median <= 1.5 s
   for the 100k run. Interleaved with those loads, round by round: the floor, a page holding
   nothing but the Plotly bundle (parser-inserted, served by the same server), timed until
   the bundle has run; no page that draws with Plotly can paint before it.
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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerscope.server.store import Store
from layerscope.trainer import wire
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright
from replay import LAYERS, ingest, layer_names, start_server
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


# Installed before the page's own scripts: the moment the page says its first viewport is
# drawn (body data-painted-ms), this checks, independently of the page's own list, that every
# chart intersecting the window then has its data drawn: a Plotly chart laid out with a line
# path for every trace holding points and a heatmap image for every heatmap, and every layer's
# small-multiple canvas. What it finds is read back after the page is ready.
VERIFY_JS = """
(() => {
  const visible = (el) => { const r = el.getBoundingClientRect();
    return r.width > 0 && r.bottom > 0 && r.right > 0 && r.top < innerHeight && r.left < innerWidth; };
  const drawn = (el) => {
    if (el.id === 'multiples') {
      const cells = el.querySelectorAll('.multiple canvas');
      return cells.length > 0 && [...cells].every((c) => c.width > 1);
    }
    if (!el._fullLayout || !el.querySelector('.main-svg')) return false;
    const data = el.data || [];
    const lines = data.filter((t) => t.type === 'scatter' && (t.x || []).length > 1).length;
    const maps = data.filter((t) => t.type === 'heatmap' && (t.z || []).length > 0).length;
    const paths = [...el.querySelectorAll('.scatterlayer .trace path.js-line')].filter((p) => (p.getAttribute('d') || '').length > 2).length;
    const images = el.querySelectorAll('.heatmaplayer image').length;
    return paths >= lines && images >= maps;
  };
  const check = () => {
    const charts = [...document.querySelectorAll('.chart, #multiples')];
    const shown = charts.filter(visible);
    window.__paintCheck = {
      at: performance.now(),
      visible: shown.map((el) => el.id),
      undrawn: shown.filter((el) => !drawn(el)).map((el) => el.id),
      drawnBelow: charts.filter((el) => !visible(el) && el.id !== 'multiples' && el._fullLayout).map((el) => el.id),
    };
  };
  new MutationObserver((records, observer) => {
    if (document.body.dataset.paintedMs !== undefined) { observer.disconnect(); check(); }
  }).observe(document, { attributes: true, subtree: true, attributeFilter: ['data-painted-ms'] });
})();
"""


@dataclass
class Paint:
    painted_s: float  # every chart in the window drawn with its data: the first complete paint
    ready_s: float  # every chart on the page drawn
    plotly_s: float  # the Plotly bundle has run
    history_s: float  # the REST history is in
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
    marks = page.evaluate(
        "Object.fromEntries(performance.getEntriesByType('mark').map(m => [m.name, m.startTime]))"
    )
    return Paint(
        painted_s=float(page.evaluate("document.body.dataset.paintedMs")) / 1000,
        ready_s=float(page.evaluate("document.body.dataset.readyMs")) / 1000,
        plotly_s=marks.get("layerscope:plotly", float("nan")) / 1000,
        history_s=marks.get("layerscope:history", float("nan")) / 1000,
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
    run_id: str
    kind: str  # cold (fresh context) or warm (the same context again: Plotly cached)
    loads: list[Paint]

    def median(self, attr: str) -> float:
        return statistics.median(getattr(p, attr) for p in self.loads)


def paint_phase(browser: Browser, base: str) -> tuple[list[PaintRow], list[float], list[float]]:
    """Cold and warm loads of both runs and the Plotly-alone floor, interleaved round by
    round so that the machine's load drifts over all of them alike."""
    plotly_src = ""
    for run_id in ("run-1k", "run-100k"):
        warmup = browser.new_context(viewport=VIEWPORT)
        page = warmup.new_page()
        time_paint(page, f"{base}/runs/{run_id}")  # server-side caches and the OS page cache
        plotly_src = page.evaluate("document.querySelector('link[href*=\"plotly.min.js\"]').href")
        warmup.close()
    rows = {(r, k): PaintRow(r, k, []) for r in ("run-1k", "run-100k") for k in ("cold", "warm")}
    floors: list[float] = []
    loops: list[float] = []
    for _ in range(REPEATS):
        for run_id in ("run-1k", "run-100k"):
            context = browser.new_context(viewport=VIEWPORT)
            rows[(run_id, "cold")].loads.append(
                time_paint(context.new_page(), f"{base}/runs/{run_id}")
            )
            rows[(run_id, "warm")].loads.append(
                time_paint(context.new_page(), f"{base}/runs/{run_id}")
            )
            context.close()
        floors.append(plotly_floor(browser, base, plotly_src))
        loops.append(calibrate(browser, base))
        big = rows[("run-100k", "cold")].loads[-1]
        print(
            f"  round {len(floors)}: 100k cold painted {big.painted_s:.2f} s,"
            f" all drawn {big.ready_s:.2f} s; Plotly alone {floors[-1]:.2f} s",
            flush=True,
        )
    return list(rows.values()), floors, loops


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
    print(f"first complete paint = every chart in the {VIEWPORT['width']}x{VIEWPORT['height']}")
    print(f"  window ({visible}) drawn with its data, checked in the page at that moment;")
    print(f"  'all drawn' = every chart on the page, below the fold too (median of {REPEATS}):")
    print(
        f"{'run':<10} {'load':<5} {'painted':>8} {'max':>7} {'all drawn':>10}"
        f" {'Plotly ran':>11} {'REST in':>8} {'painted - floor':>16}"
    )
    for row in paint:
        worst = max(p.painted_s for p in row.loads)
        painted = row.median("painted_s")
        print(
            f"{row.run_id:<10} {row.kind:<5} {painted:>6.2f} s {worst:>5.2f} s"
            f" {row.median('ready_s'):>8.2f} s {row.median('plotly_s'):>9.2f} s"
            f" {row.median('history_s'):>6.2f} s {painted - floor:>+14.2f} s"
        )
    big = next(r for r in paint if r.run_id == "run-100k" and r.kind == "cold").median("painted_s")
    small = next(r for r in paint if r.run_id == "run-1k" and r.kind == "cold").median("painted_s")
    ok = big <= TARGET_PAINT_S
    print(
        f"100k / 1k cold ratio {big / small:.2f};  target: cold 100k first complete paint"
        f" <= {TARGET_PAINT_S} s: {'ok' if ok else 'MISSED'}"
    )
    if not ok and floor > TARGET_PAINT_S:
        print(
            f"  (unreachable on this machine while the charts are Plotly's: the bundle alone"
            f" takes {floor:.2f} s)"
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
    args = parser.parse_args()

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="layerscope-browser-bench-"))
    if not args.skip_paint and not (data_dir / "layerscope.db").exists():
        print(f"writing runs into {data_dir} ...", flush=True)
        build_runs(data_dir)
    proc, base = start_server(data_dir)
    paint: list[PaintRow] = []
    floors: list[float] = []
    loops: list[float] = []
    live: dict[str, Any] | None = None
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            if not args.skip_paint:
                paint, floors, loops = paint_phase(browser, base)
            if not args.skip_live:
                print(
                    f"live run: {LIVE_RATE} steps/s, {LAYERS} layers, {args.minutes:g} min",
                    flush=True,
                )
                live = live_phase(browser, base, args.minutes)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    ok = True
    if paint:
        ok &= report_paint(paint, floors, loops)
    if live is not None:
        ok &= report_live(live)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
