"""browser — the dashboard in headless Chromium: how fast a big finished run paints, and
whether a fast live run stays current with flat memory.

Two phases, against real parts (the server is `layerscope serve` in a child process):

1. first paint: a finished 100,000-step, 30-layer run (a probe every 10 steps with 64-bin
   histograms; loss, val_loss, lr, weight decay every step) is written through Store.append
   (benchmarks/replay.py's ingest), next to a 1,000-step run of the same shape. The run page
   is loaded REPEATS times per run and timed from navigation start to the moment the page
   sets ``document.body.dataset.ready`` (every chart rendered, small multiples drawn):
   cold (a fresh browser context: nothing cached) and warm (the same context again: the
   Plotly bundle cached). Target: cold median <= 1.5 s for the 100k run.
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
from playwright.sync_api import Browser, Page, sync_playwright
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


def time_paint(page: Page, url: str) -> tuple[float, float, float]:
    """Seconds from navigation start to: ready (all drawn), DOMContentLoaded (Plotly parsed
    and run), and the REST history fetched (the page's `layerscope:history` mark)."""
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready !== undefined", timeout=60_000)
    if page.evaluate("document.body.dataset.ready") != "1":
        raise RuntimeError(f"{url} did not load: {page.inner_text('#banner')}")
    ready_ms = float(page.evaluate("document.body.dataset.readyMs"))
    dcl_ms = float(
        page.evaluate("performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
    )
    history_ms = float(
        page.evaluate("performance.getEntriesByName('layerscope:history')[0]?.startTime ?? NaN")
    )
    return ready_ms / 1000, dcl_ms / 1000, history_ms / 1000


PaintRow = tuple[str, str, float, float, float, float]
CALIBRATE_JS = "() => { const t = performance.now(); let x = 0; for (let i = 0; i < 1e8; i++) x += i % 7; return [performance.now() - t, x]; }"
PLOTLY_ALONE_JS = """async url => {
  const t = performance.now();
  await new Promise((ok, fail) => {
    const s = document.createElement('script');
    s.src = url; s.onload = ok; s.onerror = fail;
    document.head.append(s);
  });
  return performance.now() - t;
}"""


def baselines(browser: Browser, base: str) -> tuple[float, float]:
    """Side by side with the page: (ms for a 1e8-step JS loop, s to load and run the Plotly
    bundle alone in a blank page). The first says how fast this machine is right now (an idle
    modern core: ~100-150 ms); the second is the part of a first paint no page code can avoid."""
    loops, plotly = [], []
    for i in range(REPEATS):
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{base}/healthz")
        loops.append(float(page.evaluate(CALIBRATE_JS)[0]))
        plotly.append(
            float(page.evaluate(PLOTLY_ALONE_JS, f"{base}/static/plotly.min.js?alone={i}")) / 1000
        )
        context.close()
    return statistics.median(loops), statistics.median(plotly)


def paint_phase(browser: Browser, base: str) -> list[PaintRow]:
    rows: list[PaintRow] = []
    for run_id in ("run-1k", "run-100k"):
        url = f"{base}/runs/{run_id}"
        warmup = browser.new_context()
        time_paint(warmup.new_page(), url)  # server-side caches and the OS page cache
        warmup.close()
        cold: list[tuple[float, float, float]] = []
        warm: list[tuple[float, float, float]] = []
        for _ in range(REPEATS):
            context = browser.new_context(viewport={"width": 1440, "height": 1000})
            cold.append(time_paint(context.new_page(), url))
            warm.append(time_paint(context.new_page(), url))
            context.close()
        for kind, times in (("cold", cold), ("warm", warm)):
            ready = [t[0] for t in times]
            dcl = statistics.median(t[1] for t in times)
            history = statistics.median(t[2] for t in times)
            rows.append((run_id, kind, statistics.median(ready), max(ready), dcl, history))
        print(f"  {run_id}: cold median {rows[-2][2]:.2f} s, warm {rows[-1][2]:.2f} s", flush=True)
    return rows


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
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
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


def report_paint(paint: list[PaintRow], loop_ms: float, plotly_s: float) -> bool:
    print()
    print(
        f"machine now: a 1e8-step JS loop takes {loop_ms:.0f} ms (an idle modern core: ~100-150 ms)"
    )
    print(f"Plotly bundle alone (load + run in a blank page): {plotly_s:.2f} s")
    print(f"first complete paint, navigation start -> every chart drawn (median of {REPEATS}):")
    print(
        f"{'run':<10} {'load':<5} {'ready':>8} {'max':>8} {'plotly run (DCL)':>17} {'REST history':>13}"
    )
    for run_id, kind, med, worst, dcl, hist in paint:
        print(
            f"{run_id:<10} {kind:<5} {med:>6.2f} s {worst:>6.2f} s {dcl:>15.2f} s {hist:>11.2f} s"
        )
    big = next(m for r, k, m, *_ in paint if r == "run-100k" and k == "cold")
    small = next(m for r, k, m, *_ in paint if r == "run-1k" and k == "cold")
    ok = big <= TARGET_PAINT_S
    verdict = "ok" if ok else "MISSED"
    print(
        f"100k / 1k cold ratio {big / small:.2f};  target cold 100k <= {TARGET_PAINT_S} s: {verdict}"
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
    live: dict[str, Any] | None = None
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            if not args.skip_paint:
                paint = paint_phase(browser, base)
                loop_ms, plotly_s = baselines(browser, base)
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
        ok &= report_paint(paint, loop_ms, plotly_s)
    if live is not None:
        ok &= report_live(live)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
