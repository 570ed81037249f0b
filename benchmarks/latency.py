"""Live latency through a real server in its own process.

* frame latency — a trainer sends frames at --rate frames/s (metrics frames, every
  --probe-every'th one a 50-layer, 64-bin probe frame); --viewers browsers-worth of websocket clients record
  when each frame arrives. Latency = arrival - send, same monotonic clock (one process
  holds the trainer and the viewers; the server is separate).
* command latency — viewers send commands (set_lr_scale); measured to the viewer's
  ``command_result {pending: true}`` reply (the server stored and relayed it) and to the
  trainer's receipt of the ``command`` frame. The trainer applies a command at its next
  step, so a user sees it acknowledged one training step after that.

Target (DESIGN): frame p99 <= 100 ms with 50 viewers at 20 frames/s. Usage::

    .venv/bin/python benchmarks/latency.py [--viewers 50] [--rate 20] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from server_process import start_server
from websockets.asyncio.client import ClientConnection, connect

SEQ = re.compile(r'"seq":(\d+)')


def probe_text(seq: int, step: int) -> str:
    layers = [
        {
            "name": f"layer{i}",
            "mean": 0.0,
            "std": 1.0,
            "min": -3.0,
            "max": 3.0,
            "dead_ratio": 0.1,
            "hist": {"lo": -3.0, "hi": 3.0, "counts": [(i + b) % 50 for b in range(64)]},
        }
        for i in range(50)
    ]
    return json.dumps({"type": "probe", "v": 1, "seq": seq, "step": step, "layers": layers})


def metrics_text(seq: int, step: int) -> str:
    row = {"step": step, "time_s": step * 0.05, "values": {"loss": 1.0 / (step + 1), "acc": 0.5}}
    return json.dumps({"type": "metrics", "v": 1, "seq": seq, "rows": [row]})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server, port = start_server(Path(tmp))
        try:
            await measure(port, args)
        finally:
            server.terminate()
            server.wait(30)


async def measure(port: int, args: argparse.Namespace) -> None:
    base = f"ws://127.0.0.1:{port}"
    trainer = await connect(f"{base}/ws/trainer", max_size=None)
    await trainer.send(
        json.dumps({"type": "hello", "v": 1, "run_id": "latency", "name": "latency"})
    )
    json.loads(await trainer.recv())
    sent_at: dict[int, float] = {}
    frame_latency: list[float] = []
    command_sent: dict[str, float] = {}
    relayed: list[float] = []  # viewer send -> command_result pending
    delivered: list[float] = []  # viewer send -> trainer receives the command frame

    async def read_trainer() -> None:
        async for raw in trainer:
            now = time.monotonic()
            message = json.loads(raw)
            if message["type"] == "command" and message["id"] in command_sent:
                delivered.append(now - command_sent[message["id"]])

    async def read_viewer(ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.monotonic()
            text = raw if isinstance(raw, str) else raw.decode()
            if text.startswith('{"v":1,"type":"command_result"'):
                reply = json.loads(text)
                if reply.get("id") in command_sent:
                    relayed.append(now - command_sent[reply["id"]])
                continue
            match = SEQ.search(text[:200])  # the seq is near the start; no full parse per frame
            if match and int(match.group(1)) in sent_at:
                frame_latency.append(now - sent_at[int(match.group(1))])

    viewers = []
    for _ in range(args.viewers):
        ws = await connect(f"{base}/ws/runs/latency", max_size=None)
        await ws.recv()  # the snapshot
        viewers.append(ws)
    readers = [asyncio.create_task(read_viewer(ws)) for ws in viewers]
    trainer_reader = asyncio.create_task(read_trainer())

    async def heartbeat() -> None:
        while True:
            await trainer.send(json.dumps({"type": "heartbeat", "v": 1, "step": 0}))
            await asyncio.sleep(1.0)

    beating = asyncio.create_task(heartbeat())

    async def send_commands() -> None:
        n = 0
        while True:
            await asyncio.sleep(0.2)
            n += 1
            cmd_id = f"cmd-{n}"
            command = {
                "type": "command",
                "id": cmd_id,
                "name": "set_lr_scale",
                "args": {"value": 0.5},
            }
            command_sent[cmd_id] = time.monotonic()
            await viewers[n % len(viewers)].send(json.dumps(command))

    commanding = asyncio.create_task(send_commands())
    loop_lag: list[float] = []  # the floor: how late this process's own 10 ms timer fires

    async def measure_loop_lag() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            loop_lag.append(time.monotonic() - before - 0.01)

    lagging = asyncio.create_task(measure_loop_lag())
    gap = 1.0 / args.rate
    start = time.monotonic()
    seq = 0
    next_send = start
    while time.monotonic() - start < args.seconds:
        seq += 1
        probe = args.probe_every and seq % args.probe_every == 0
        text = probe_text(seq, seq) if probe else metrics_text(seq, seq)
        sent_at[seq] = time.monotonic()
        await trainer.send(text)
        next_send += gap
        await asyncio.sleep(max(0.0, next_send - time.monotonic()))
    commanding.cancel()
    lagging.cancel()
    await asyncio.sleep(1.0)  # the last frames arrive
    expected = seq * args.viewers
    for task in (*readers, trainer_reader, beating):
        task.cancel()
    for ws in (*viewers, trainer):
        await ws.close()

    def row(name: str, values: list[float], of: int) -> str:
        if not values:
            return f"{name:<44} {'-':>8} {'-':>8} {'-':>8} {0:>7}/{of}"
        ms = [v * 1000 for v in values]
        return (
            f"{name:<44} {statistics.median(ms):>8.1f} {percentile(ms, 99):>8.1f} {max(ms):>8.1f} "
            f"{len(ms):>7}/{of}"
        )

    print(
        f"\nlatency: {args.viewers} viewers, {args.rate:g} frames/s for {args.seconds:g} s, server in its own process"
    )
    mix = (
        f"every {args.probe_every}th frame a probe (50 layers x 64 bins)"
        if args.probe_every
        else "no probes"
    )
    print(f"frames: metrics (1 row), {mix}\n")
    header = f"{'path':<44} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'samples':>15}"
    print(header)
    print("-" * len(header))
    print(row("trainer frame -> every viewer", frame_latency, expected))
    print(row("viewer command -> command_result (relayed)", relayed, len(command_sent)))
    print(row("viewer command -> trainer receives it", delivered, len(command_sent)))
    print(row("floor: this process's 10 ms timer, lateness", loop_lag, len(loop_lag)))
    p99 = percentile([v * 1000 for v in frame_latency], 99) if frame_latency else float("inf")
    print(f"\nframe p99 target 100 ms: {'met' if p99 <= 100 else 'NOT met'} ({p99:.1f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--probe-every", type=int, default=2, help="every Nth frame is a probe frame (0: none)"
    )
    asyncio.run(main(parser.parse_args()))
