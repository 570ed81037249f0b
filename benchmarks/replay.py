"""replay — does a 100k-step run open as fast as a 1k-step one? And does ingest keep the
server's memory flat?

Three phases, all against real parts:

1. ingest: builds a 1,000-step and a 100,000-step run (30 layers, a probe every 10
   steps with a 64-bin histogram per layer, scalars loss/val_loss/lr/weight_decay
   every step) by calling Store.append directly, the way ingest batches frames
   (a metrics frame per 100 steps, a probe frame per probe step, a few appends in
   flight), and reports how long it took.
2. open: times what the run page fetches (run detail, series, one layer's probe
   stats, probe matrix, histograms over time for one layer, histogram at a step),
   first as the Store call in this process, then as the HTTP GET to the real server
   (`layerscope serve`, a child process) on that data directory. Median of 5 after
   one warm-up, the response size, both runs side by side with the ratio. Targets:
   <= 300 ms and <= 1 MB per chart. GET /healthz on the same connection is printed
   as the HTTP floor (what any request costs before the store is asked anything).
3. memory: a fresh Store in this process ingests 1M scalar points and 50,000 probe
   frames; RSS growth (psutil) must stay <= 100 MB.

Run:  .venv/bin/python benchmarks/replay.py            (about 10-20 minutes on 2 cores)
      .venv/bin/python benchmarks/replay.py --quick    (scaled down: a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from layerscope.server.store import Store
from layerscope.trainer import wire

LAYERS = 30
BINS = 64
PROBE_EVERY = 10
METRICS_ROWS = 100  # steps per metrics frame
IN_FLIGHT = 32  # appends awaiting their commit at once: a trainer streams without waiting for acks
TARGET_MS = 300.0
TARGET_BYTES = 1_000_000
TARGET_RSS_MB = 100.0
REPEATS = 5


def layer_names(n: int) -> list[str]:
    return [f"blocks.{i // 2}.{'fc' if i % 2 == 0 else 'act'}" for i in range(n)]


def histogram_variants(layer: int) -> list[dict[str, Any]]:
    """A few bell-shaped histograms per layer, drifting, reused across steps (building
    64 random counts per layer per step in Python would dominate the ingest time)."""
    out = []
    for k in range(8):
        center = BINS / 2 + (k - 4) * 1.5 + layer % 5
        counts = [int(4000 * math.exp(-(((i - center) / 9.0) ** 2))) for i in range(BINS)]
        out.append({"lo": -3.0 - 0.1 * k, "hi": 3.0 + 0.05 * layer, "counts": counts})
    return out


def frames(steps: int, layers: int) -> Iterator[list[dict[str, Any]]]:
    """Batches of validated frames (the shape wire.validate_* returns), one per METRICS_ROWS steps."""
    names = layer_names(layers)
    hists = [histogram_variants(i) for i in range(layers)]
    seq = 0
    for lo in range(0, steps, METRICS_ROWS):
        batch: list[dict[str, Any]] = []
        rows = []
        for step in range(lo, min(lo + METRICS_ROWS, steps)):
            loss = 2.5 * math.exp(-step / (steps / 4)) + 0.05 * math.sin(step * 0.7)
            rows.append(
                {
                    "step": step,
                    "time_s": step * 0.01,
                    "values": {
                        "loss": loss,
                        "val_loss": loss * 1.1,
                        "lr": 0.1 * 0.5 ** (step // 25_000),
                        "weight_decay": 5e-4,
                    },
                }
            )
        seq += 1
        batch.append({"type": "metrics", "seq": seq, "rows": rows})
        for step in range(lo, min(lo + METRICS_ROWS, steps), PROBE_EVERY):
            seq += 1
            k = (step // PROBE_EVERY) % 8
            probe_layers = []
            for i, name in enumerate(names):
                dead = min(1.0, step / steps * (i % 3) * 0.5)
                probe_layers.append(
                    {
                        "name": name,
                        "mean": 0.1 * i,
                        "std": 1.0 + 0.01 * k,
                        "min": -3.0,
                        "max": 3.0,
                        "zero_frac": dead * 0.9,
                        "nonfinite": 0.0,
                        "dead_ratio": dead,
                        "saturated_frac": None,
                        "saturated_ratio": None,
                        "grad_norm": 0.01 * (k + 1),
                        "weight_norm": 3.0,
                        "update_ratio": 1e-3,
                        "hist": hists[i][k],
                    }
                )
            batch.append({"type": "probe", "seq": seq, "step": step, "layers": probe_layers})
        yield batch


async def ingest(store: Store, run_id: str, steps: int, layers: int) -> tuple[float, int, int]:
    """(seconds, frames, acked seq) for one whole run."""
    await store.hello(
        wire.validate_hello(
            {
                "run_id": run_id,
                "name": run_id,
                "config": {"steps": steps},
                "layers": [
                    {"name": n, "kind": "Linear" if ".fc" in n else "ReLU", "units": 256}
                    for n in layer_names(layers)
                ],
            }
        )
    )
    start = time.perf_counter()
    pending: set[asyncio.Task[int]] = set()
    count = seq = 0
    for batch in frames(steps, layers):
        count += len(batch)
        seq = batch[-1]["seq"]
        pending.add(asyncio.create_task(store.append(run_id, batch)))
        if len(pending) >= IN_FLIGHT:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    for task in pending:
        await task
    acked = await store.append(
        run_id,
        [
            {
                "type": "event",
                "seq": seq + 1,
                "step": steps - 1,
                "kind": "status",
                "data": {"status": "finished"},
            }
        ],
    )
    return time.perf_counter() - start, count + 1, acked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "layerscope.server",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(proc, f"http://127.0.0.1:{port}", "the server")


def wait_healthy(proc: subprocess.Popen[bytes], base: str, what: str) -> str:
    """``base`` once its /healthz answers 200; kills ``proc`` if that takes over 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not start within 60 s")


def charts(run_id: str, steps: int) -> list[tuple[str, str, Callable[[Store], Any]]]:
    """(name, URL the run page fetches, the Store call behind it)."""
    layer = layer_names(LAYERS)[LAYERS // 2]
    at = steps // 2 + 3
    series = ["loss", "val_loss", "lr", "weight_decay"]
    return [
        ("run detail", f"/api/runs/{run_id}", lambda s: s.run(run_id)),
        (
            "series loss,val_loss,lr,wd",
            f"/api/runs/{run_id}/series?names={','.join(series)}&max_points=1500",
            lambda s: s.series(run_id, series, None, None, 1500),
        ),
        (
            "probes dead_ratio,std 1 layer",
            f"/api/runs/{run_id}/probes?layer={layer}&stats=dead_ratio,std",
            lambda s: s.probe_series(run_id, layer, ["dead_ratio", "std"]),
        ),
        (
            "probe matrix dead_ratio",
            f"/api/runs/{run_id}/probes/matrix?stat=dead_ratio&max_steps=300",
            lambda s: s.probe_matrix(run_id, "dead_ratio", None, None, 300),
        ),
        (
            "histograms 1 layer",
            f"/api/runs/{run_id}/histograms?layer={layer}&max_steps=200&bins=64",
            lambda s: s.histograms(run_id, layer, None, None, 200, 64),
        ),
        (
            "histogram at step",
            f"/api/runs/{run_id}/histogram?step={at}",
            lambda s: s.histogram_at(run_id, at),
        ),
    ]


def time_call(call: Callable[[], Any]) -> float:
    """Median ms of REPEATS calls after one warm-up."""
    call()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def time_get(client: httpx.Client, url: str) -> tuple[float, int]:
    client.get(url).raise_for_status()  # warm-up: page cache, thread pool
    times, size = [], 0
    for _ in range(REPEATS):
        t = time.perf_counter()
        r = client.get(url)
        times.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        size = len(r.content)
    return statistics.median(times), size


def tree_rss_mb(proc: psutil.Process) -> float:
    """RSS of a process and its children (the store's writer process), in MB."""
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def rss_phase(scalar_points: int, probe_frames: int, layers: int) -> tuple[float, float, float]:
    """(seconds, RSS before MB, RSS after MB) for a Store in this process, its writer
    process included."""
    proc = psutil.Process()

    async def run(data_dir: Path) -> tuple[float, float, float]:
        store = Store(data_dir)
        await store.open()
        await store.hello(wire.validate_hello({"run_id": "mem", "layers": []}))
        before = tree_rss_mb(proc)
        steps = scalar_points // 4
        every = max(1, steps // probe_frames)
        global PROBE_EVERY
        saved, PROBE_EVERY = PROBE_EVERY, every
        try:
            seconds, _frames, _acked = await ingest(store, "mem-run", steps, layers)
        finally:
            PROBE_EVERY = saved
        store.series("mem-run", None)  # reads allocate too
        store.probe_matrix("mem-run", "dead_ratio")
        after = tree_rss_mb(proc)
        await store.close()
        return seconds, before, after

    with tempfile.TemporaryDirectory(prefix="layerscope-rss-") as tmp:
        return asyncio.run(run(Path(tmp)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="scaled down (a smoke run)")
    parser.add_argument(
        "--data-dir", type=Path, help="keep the built runs here (default: a temp dir)"
    )
    args = parser.parse_args()
    big = 20_000 if args.quick else 100_000
    small = 1_000
    mem_points, mem_probes = (100_000, 5_000) if args.quick else (1_000_000, 50_000)

    tmp = None if args.data_dir else tempfile.TemporaryDirectory(prefix="layerscope-replay-")
    data_dir = args.data_dir or Path(tmp.name)  # type: ignore[union-attr]
    print(
        f"data dir: {data_dir}   cpu: {os.cpu_count()} cores   layers: {LAYERS}, probe every {PROBE_EVERY} steps"
    )

    store_ms: dict[tuple[int, str], float] = {}

    async def build() -> dict[str, tuple[float, int, int]]:
        store = Store(data_dir)
        await store.open()
        try:
            built = {
                f"run-{small}": await ingest(store, f"run-{small}", small, LAYERS),
                f"run-{big}": await ingest(store, f"run-{big}", big, LAYERS),
            }
            for steps in (small, big):
                for name, _url, call in charts(f"run-{steps}", steps):
                    store_ms[(steps, name)] = time_call(lambda call=call: call(store))  # type: ignore[misc]
            return built
        finally:
            await store.close()

    built = asyncio.run(build())
    print("\ningest (Store.append, group commit 100 ms)")
    for run_id, (seconds, count, acked) in built.items():
        steps = int(run_id.split("-")[1])
        points = steps * 4
        probes = steps // PROBE_EVERY
        print(
            f"  {run_id:>10}: {seconds:7.1f} s  {count} frames ({points:,} scalar points, "
            f"{probes:,} probe frames x {LAYERS} layers)  {points / seconds:,.0f} points/s  acked {acked}"
        )
    db = data_dir / "layerscope.db"
    print(f"  database: {db.stat().st_size / 2**20:.0f} MB")

    proc, base = start_server(data_dir)
    failures = 0
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            small_rows = {
                name: time_get(client, url) for name, url, _c in charts(f"run-{small}", small)
            }
            big_rows = {name: time_get(client, url) for name, url, _c in charts(f"run-{big}", big)}
            floor_ms, _size = time_get(client, "/healthz")
        server_rss = tree_rss_mb(psutil.Process(proc.pid))
    finally:
        proc.terminate()
        proc.wait(30)

    print(
        f"\nopen a run (median of {REPEATS} after a warm-up): the Store call in this process,"
        " and the HTTP GET to `layerscope serve`"
    )
    print(
        f"  {'chart':<30} {'store ' + str(small):>11} {'store ' + str(big):>12} {'ratio':>6}"
        f" {'HTTP ' + str(small):>11} {'HTTP ' + str(big):>11} {'ratio':>6} {'bytes ' + str(big):>13}  ok"
    )
    for name, (ms_small, _b_small) in small_rows.items():
        ms_big, b_big = big_rows[name]
        st_small, st_big = store_ms[(small, name)], store_ms[(big, name)]
        ok = ms_big <= TARGET_MS and b_big <= TARGET_BYTES
        failures += not ok
        print(
            f"  {name:<30} {st_small:8.1f} ms {st_big:9.1f} ms {st_big / st_small:5.1f}x"
            f" {ms_small:8.1f} ms {ms_big:8.1f} ms {ms_big / ms_small:5.1f}x {b_big:>13,}"
            f"  {'yes' if ok else 'NO'}"
        )
    print(f"  HTTP floor: GET /healthz takes {floor_ms:.1f} ms on the same keep-alive connection")
    print(f"  server RSS after serving both runs: {server_rss:.0f} MB")

    seconds, before, after = rss_phase(mem_points, mem_probes, LAYERS)
    growth = after - before
    ok = growth <= TARGET_RSS_MB
    failures += not ok
    print(
        f"\nmemory: a Store in this process ingests {mem_points:,} scalar points and {mem_probes:,} "
        f"probe frames x {LAYERS} layers in {seconds:.0f} s"
    )
    print(
        f"  RSS {before:.0f} MB -> {after:.0f} MB: growth {growth:.0f} MB "
        f"(target <= {TARGET_RSS_MB:.0f} MB)  {'ok' if ok else 'OVER'}"
    )
    if tmp is not None:
        tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
