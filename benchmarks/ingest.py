"""Ingest throughput: N synthetic trainers against a real server in its own process.

Each trainer is a ``websockets`` client speaking the wire protocol (hello, frames, acks),
like the trainer's link thread. Three phases, each open-loop at a target rate (so a server
that cannot keep up shows a growing lag, sent seq - acked seq), then one closed-loop phase
that finds the ceiling:

* probe   — 50-layer, 64-bin probe frames at --probe-rate frames/s in total;
* metrics — metrics frames of 100 rows x 5 series at --points-rate scalar points/s;
* mixed   — both at once;
* max     — every trainer sends as fast as its window of unacked frames allows.

Targets (DESIGN, on a 2-core machine): >= 500 probe frames/s and >= 50,000 scalar
points/s sustained, lag not growing. Usage::

    .venv/bin/python benchmarks/ingest.py [--trainers 4] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from server_process import start_server
from websockets.asyncio.client import ClientConnection, connect

LAYERS, BINS = 50, 64
ROWS, SERIES = 100, 5
WINDOW = 512  # unacked frames a trainer allows itself (the link keeps more, spooled)


def probe_template(step: int) -> tuple[str, str]:
    """A probe frame's JSON split around its seq, so sending costs no encoding. Its layers
    are shaped like the trainer's (trainer/stats.py decode): every stat a float or null,
    unit_spread included, and a 64-bin histogram over [min, max]."""
    layers = [
        {
            "name": f"blocks.{i}.mlp.act",
            "mean": 0.01 * i,
            "std": 1.0 + 0.001 * i,
            "min": -3.2,
            "max": 3.3,
            "zero_frac": 0.12,
            "nonfinite": 0.0,
            "dead_ratio": 0.05,
            "saturated_frac": None,
            "saturated_ratio": None,
            "unit_spread": 0.02 + 0.0001 * i,
            "grad_norm": 0.4,
            "weight_norm": 12.5,
            "update_ratio": 0.001,
            "hist": {
                "lo": -3.2,
                "hi": 3.3,
                "counts": [(i * 7 + b * 13) % 997 for b in range(BINS)],
            },
        }
        for i in range(LAYERS)
    ]
    text = json.dumps({"type": "probe", "v": 1, "seq": 0, "step": step, "layers": layers})
    head, tail = text.split('"seq": 0', 1)
    return head + '"seq": ', tail


def metrics_text(seq: int, first_step: int) -> str:
    rows = [
        {
            "step": first_step + r,
            "time_s": 0.01 * (first_step + r),
            "values": {f"s{k}": 1.0 / (1 + first_step + r + k) for k in range(SERIES)},
        }
        for r in range(ROWS)
    ]
    return json.dumps({"type": "metrics", "v": 1, "seq": seq, "rows": rows})


@dataclass
class Trainer:
    ws: ClientConnection
    run_id: str
    sent: int = 0
    acked: int = 0
    acked_probes: int = 0
    acked_points: int = 0
    kinds: dict[int, tuple[str, int]] = field(default_factory=dict)  # seq -> (kind, points)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    beat: asyncio.Task[None] | None = None

    async def read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if message["type"] != "ack":
                continue
            for seq in range(self.acked + 1, message["seq"] + 1):
                kind, points = self.kinds.pop(seq, ("?", 0))
                self.acked_probes += kind == "probe"
                self.acked_points += points
            self.acked = max(self.acked, message["seq"])
            self.progress.set()

    async def heartbeat(self) -> None:
        """Every second, as the link thread does, even while its window is full."""
        while True:
            await asyncio.sleep(1.0)
            await self.ws.send(json.dumps({"type": "heartbeat", "v": 1, "step": self.sent}))

    async def send(self, kind: str, probe: tuple[str, str]) -> None:
        while self.sent - self.acked >= WINDOW:
            self.progress.clear()
            await self.progress.wait()
        self.sent += 1
        if kind == "probe":
            text = f"{probe[0]}{self.sent}{probe[1]}"
            self.kinds[self.sent] = ("probe", 0)
        else:
            text = metrics_text(self.sent, self.sent * ROWS)
            self.kinds[self.sent] = ("metrics", ROWS * SERIES)
        await self.ws.send(text)
        await asyncio.sleep(0)  # a send that does not block must still let acks be read


async def open_trainer(port: int, run_id: str) -> tuple[Trainer, asyncio.Task[None]]:
    # No permessage-deflate: this measures the server, not a client's zlib on a shared core.
    ws = await connect(f"ws://127.0.0.1:{port}/ws/trainer", max_size=None, compression=None)
    await ws.send(json.dumps({"type": "hello", "v": 1, "run_id": run_id, "name": run_id}))
    json.loads(await ws.recv())
    trainer = Trainer(ws, run_id)
    trainer.beat = asyncio.create_task(trainer.heartbeat())
    return trainer, asyncio.create_task(trainer.read())


@dataclass
class PhaseResult:
    name: str
    target: str
    probes_per_s: float
    points_per_s: float
    lag_start: int
    lag_end: int
    lag_max: int
    sent_per_s: float
    drain_s: float
    cpu_ms_per_frame: float
    process_ms_per_frame: list[float]  # the server's process (event loop), its store writer process


def process_cpu_s(server: psutil.Process) -> list[float]:
    """CPU seconds of the server process and of its store writer process (its child)."""
    out = []
    for proc in [server, *server.children(recursive=True)]:
        times = proc.cpu_times()
        out.append(float(times.user + times.system))
    return out


async def run_phase(
    name: str,
    trainers: list[Trainer],
    seconds: float,
    probe_rate: float,
    metrics_rate: float,
    server: psutil.Process,
) -> PhaseResult:
    """Open loop at the given total rates (frames/s); 0 and 0 means as fast as allowed."""
    probe = probe_template(1)
    before = [(t.acked_probes, t.acked_points) for t in trainers]
    acked_before = sum(t.acked for t in trainers)
    cpu_before = process_cpu_s(server)
    sent_before = sum(t.sent for t in trainers)
    lags: list[int] = []
    start = time.monotonic()
    stop = start + seconds

    async def drive(trainer: Trainer, share: int) -> None:
        n = len(trainers)
        probe_gap = n / probe_rate if probe_rate else 0.0
        metrics_gap = n / metrics_rate if metrics_rate else 0.0
        next_probe = next_metrics = time.monotonic() + share * 0.001
        while time.monotonic() < stop:
            now = time.monotonic()
            if probe_rate == metrics_rate == 0:
                await trainer.send("probe" if trainer.sent % 2 else "metrics", probe)
                continue
            if probe_rate and now >= next_probe:
                await trainer.send("probe", probe)
                next_probe += probe_gap
            elif metrics_rate and now >= next_metrics:
                await trainer.send("metrics", probe)
                next_metrics += metrics_gap
            else:
                wake = min(
                    x
                    for x in (
                        next_probe if probe_rate else stop,
                        next_metrics if metrics_rate else stop,
                    )
                )
                await asyncio.sleep(max(0.0, wake - time.monotonic()))

    async def sample() -> None:
        while time.monotonic() < stop:
            lags.append(sum(t.sent - t.acked for t in trainers))
            await asyncio.sleep(0.25)

    await asyncio.gather(*(drive(t, i) for i, t in enumerate(trainers)), sample())
    elapsed = time.monotonic() - start
    sent_frames = sum(t.sent for t in trainers) - sent_before
    probes = sum(t.acked_probes - b[0] for t, b in zip(trainers, before, strict=True))
    points = sum(t.acked_points - b[1] for t, b in zip(trainers, before, strict=True))
    # Let the backlog drain before the next phase (a slow store makes this the long part).
    drain_start = time.monotonic()
    deadline = drain_start + 60
    while any(t.sent > t.acked for t in trainers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    drain_s = time.monotonic() - drain_start
    # The server's CPU time per frame it committed (drain included): unlike the rates,
    # this does not depend on how much of the shared machine the server was given.
    acked_frames = sum(t.acked for t in trainers) - acked_before
    spent = [
        after - before for after, before in zip(process_cpu_s(server), cpu_before, strict=True)
    ]
    process_ms = [1000 * t / max(1, acked_frames) for t in spent]
    cpu_ms = sum(process_ms)
    target = []
    if probe_rate:
        target.append(f"{probe_rate:.0f} probe/s")
    if metrics_rate:
        target.append(f"{metrics_rate * ROWS * SERIES:,.0f} points/s")
    quarter = max(1, len(lags) // 4)
    return PhaseResult(
        name,
        " + ".join(target) or f"max (window {WINDOW})",
        probes / elapsed,
        points / elapsed,
        int(sum(lags[:quarter]) / quarter),
        int(sum(lags[-quarter:]) / quarter),
        max(lags, default=0),
        sent_frames / elapsed,
        drain_s,
        cpu_ms,
        process_ms,
    )


async def main(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        server, port = start_server(Path(tmp))
        try:
            opened = [await open_trainer(port, f"bench-{i}") for i in range(args.trainers)]
            trainers = [t for t, _ in opened]
            metrics_rate = args.points_rate / (ROWS * SERIES)
            proc = psutil.Process(server.pid)
            results = [
                await run_phase("probe", trainers, args.seconds, args.probe_rate, 0, proc),
                await run_phase("metrics", trainers, args.seconds, 0, metrics_rate, proc),
                await run_phase(
                    "mixed", trainers, args.seconds, args.probe_rate, metrics_rate, proc
                ),
                await run_phase("max", trainers, args.seconds, 0, 0, proc),
            ]
            for trainer, reader in opened:
                if trainer.beat is not None:
                    trainer.beat.cancel()
                await trainer.ws.close()
                reader.cancel()
        finally:
            server.terminate()
            server.wait(30)
    print(
        f"\ningest: {args.trainers} trainers, {args.seconds:g} s per phase, server in its own process"
    )
    print(
        f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"probe frame = {LAYERS} layers x {BINS} bins; metrics frame = {ROWS} rows x {SERIES} series\n"
    )
    header = (
        f"{'phase':<8} {'offered':<28} {'sent frames/s':>14} {'acked probe/s':>14} {'acked points/s':>15} "
        f"{'lag start':>10} {'lag end':>8} {'drain s':>8} {'server CPU ms/frame':>20} {'loop + writer':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<8} {r.target:<28} {r.sent_per_s:>14,.0f} {r.probes_per_s:>14,.0f} "
            f"{r.points_per_s:>15,.0f} {r.lag_start:>10} {r.lag_end:>8} {r.drain_s:>8.1f}"
            f" {r.cpu_ms_per_frame:>20.2f} {' + '.join(f'{t:.2f}' for t in r.process_ms_per_frame):>14}"
        )
    probe_ok = results[0].probes_per_s >= 0.95 * args.probe_rate and results[0].lag_end <= max(
        8, 2 * results[0].lag_start
    )
    points_ok = results[1].points_per_s >= 0.95 * args.points_rate and results[1].lag_end <= max(
        8, 2 * results[1].lag_start
    )
    print(
        f"\nprobe target {args.probe_rate:.0f}/s: {'met' if probe_ok else 'NOT met'}; "
        f"scalar target {args.points_rate:,.0f}/s: {'met' if points_ok else 'NOT met'} "
        "(met = at least 95% of the offered rate acked, lag not growing)"
    )
    probe_cpu, metrics_cpu = results[0].cpu_ms_per_frame, results[1].cpu_ms_per_frame
    loop_ms, writer_ms = (results[0].process_ms_per_frame + [0.0, 0.0])[:2]
    print(
        f"server CPU per frame (both processes): probe {probe_cpu:.2f} ms, metrics {metrics_cpu:.2f} ms"
        f" (~{1000 / metrics_cpu * ROWS * SERIES:,.0f} points/s per core). Per probe frame the"
        f" event loop's process (socket, decode, validation, fan-out) spends {loop_ms:.2f} ms and"
        f" the store's writer process (rows, SQL, commits) {writer_ms:.2f} ms: each on a core of"
        f" its own, that caps ingest near {1000 / max(loop_ms, writer_ms, 1e-9):,.0f} probe frames/s."
        " The rates above depend on what else the machine runs (see the load average)."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--probe-rate", type=float, default=500.0, help="probe frames/s offered, in total"
    )
    parser.add_argument(
        "--points-rate", type=float, default=50_000.0, help="scalar points/s offered, in total"
    )
    asyncio.run(main(parser.parse_args()))
