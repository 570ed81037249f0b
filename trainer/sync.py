"""sync — uploading a spool after the fact (``layerscope sync SPOOL --server URL``).

Owns: reading a spool's hello and frames, sending it as an upload (``upload: true``:
the server refuses commands to the run meanwhile), sending only what the server's welcome says
it lacks, waiting for acks up to the first gap a damaged record left, and
reconnecting with the link's backoff if the connection drops mid-upload.

Never: rewrites the spool (it stays the run's record whatever the server acks), or
claims frames past a gap as confirmed: the server acks the highest contiguous seq, or
keeps quiet about a frame the server refused (it says which, and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from layerscope.trainer import wire
from layerscope.trainer.link import (
    BACKOFF_CAP_S,
    BACKOFF_FIRST_S,
    OPEN_TIMEOUT_S,
    TRAINER_PATH,
    WELCOME_TIMEOUT_S,
    LinkError,
    auth_headers,
    trainer_url,
)
from layerscope.trainer.spool import SpoolReader, being_written, index_spool
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

log = logging.getLogger(__name__)

GAP_QUIET_S = 0.5  # past a damaged record: how long the server must be quiet before closing


# A server's error naming a frame it refused: "<type> frame seq N not stored: <why>".
_REFUSED = re.compile(r"\S+ frame seq (\d+) not stored: ")


@dataclass(frozen=True)
class Synced:
    """What an upload did: ``acked`` of the spool's frames the server confirmed, ``sent``
    how many were sent this time (0: the server already had them all), ``refused`` the
    seqs of those the server refused for their content on this upload: it stored a
    record of each refusal in its place (``refused_seq`` in its error frame) and acked
    past it, so they count in ``acked`` without their content."""

    acked: int
    sent: int
    refused: tuple[int, ...] = ()
    # seqs below the spool's last that it does not hold (damaged records): the server
    # stores the frames after the first of them but cannot confirm them (acks are the
    # highest contiguous seq), and the run lacks them for good
    missing: tuple[int, ...] = ()


def sync_spool(
    path: str | Path,
    server: str,
    token: str | None = None,
    timeout_s: float = 60,
    run_id: str | None = None,
) -> int:
    """Upload a spool to ``server``; returns how many of its frames the server acked
    (``upload_spool`` also says how many were sent)."""
    return upload_spool(path, server, token, timeout_s, run_id).acked


def upload_spool(
    path: str | Path,
    server: str,
    token: str | None = None,
    timeout_s: float = 60,
    run_id: str | None = None,
) -> Synced:
    """Upload a spool to ``server``: how many of its frames the server acked, and how many
    were sent this time.

    Resume-safe: the server's welcome says what it already holds and only the rest is
    sent; it dedupes by (run_id, seq) anyway. ``run_id`` uploads it as that run instead
    of the one its hello names (a spool set aside when its run id was used again holds
    the same id as the newer run: under it, the server would take the two for one run).
    Raises ConnectionError if the server cannot be reached at all and TimeoutError if it
    acks nothing new for ``timeout_s`` (a long upload that keeps moving never times out).
    """
    path = Path(path)
    if not timeout_s > 0:  # also NaN: 0 or less gave up at once, blaming the server
        raise ValueError(f"timeout {timeout_s:g} s must be more than 0 seconds")
    hello, frames = index_spool(path, rescue_run_id=run_id or None)
    if being_written(path):
        # Its trainer is still running: it sends its frames itself once it reaches a
        # server, and one connected to this server loses its connection to this upload
        # (the server keeps one per run) until it reconnects. What is uploaded is the run
        # so far; "synced" would read as the whole run.
        log.warning(
            "spool %s is still being written by a running trainer: uploading the %d frames"
            " it holds so far (the trainer sends the rest itself once it reaches the server;"
            " run sync again after the run ends if it cannot)",
            path,
            len(frames),
        )
    if run_id is not None:
        problem = wire.run_id_problem(run_id) if run_id else "must not be empty"
        if problem is not None:
            raise ValueError(f"run id {run_id!r} {problem}")
        hello = {**hello, "run_id": run_id}
    if not frames:
        return Synced(0, 0)
    # The server acks the highest contiguous seq, so a seq lost to spool damage caps
    # what it can confirm: wait for acks up to just before the first gap.
    target = 0
    for seq, _ in frames:
        if seq != target + 1:
            log.warning(
                "spool %s: frame %d is missing; frames after it are sent but cannot be confirmed",
                path,
                target + 1,
            )
            break
        target = seq
    synced = asyncio.run(
        _upload(path, hello, frames, target, trainer_url(server), token, timeout_s)
    )
    if target < frames[-1][0]:
        held = {seq for seq, _ in frames}
        missing = tuple(seq for seq in range(target + 1, frames[-1][0]) if seq not in held)
        synced = replace(synced, missing=missing)
    return synced


def _refusal_hint(exc: Exception, token: str | None, url: str) -> str:
    """Why a server answered the upload's handshake with 401/403: the reason it gives in
    its body (a wrong Host, as through a proxy, is refused with 403 too), else a guess:
    a path that is not the trainer endpoint (a page's address given as --server is
    refused with a bare 403), or the token."""
    if not isinstance(exc, InvalidStatus) or exc.response.status_code not in (401, 403):
        return ""
    detail = None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        said = json.loads(bytes(exc.response.body or b"")).get("detail")
        detail = said.strip()[:300] if isinstance(said, str) and said.strip() else None
    path = urlsplit(url).path
    if path.rstrip("/") != TRAINER_PATH and (detail is None or "viewer token" in detail):
        # A page's path: a bare 403, or under tokens one naming the viewer token (the
        # server takes any other path for a browser's), neither any help to an upload.
        return (
            f" (the server has no trainer endpoint at {path}: --server takes its address,"
            " ws://HOST:PORT)"
        )
    if detail is not None:
        return f" (the server says: {detail})"
    if token is None:
        return (
            " (the server wants a trainer token: set LAYERSCOPE_TRAINER_TOKEN to its"
            " --trainer-token)"
        )
    return (
        " (the server refused the trainer token: LAYERSCOPE_TRAINER_TOKEN must be its"
        " --trainer-token, not the viewer --token)"
    )


async def _upload(
    path: Path,
    hello: dict[str, Any],
    frames: list[tuple[int, int]],
    target: int,
    url: str,
    token: str | None,
    timeout_s: float,
) -> Synced:
    deadline = time.monotonic() + timeout_s
    acked = 0
    sent: set[int] = set()  # seqs sent (a reconnect may send one again)
    connected_once = False
    backoff = BACKOFF_FIRST_S
    last_error = ""
    last_heard = time.monotonic()
    gap = target < frames[-1][0]
    refused: dict[int, str] = {}  # seq -> the server's error: recorded in its place, acked
    blocked: dict[int, str] = {}  # seq -> the error of a refusal not recorded (an older server)
    reader = SpoolReader(path)

    async def receive_acks(ws: ClientConnection, done: asyncio.Event) -> None:
        # Read acks while sending: a client that only sends stops draining the socket,
        # and a server blocked on sending acks may stop reading frames.
        nonlocal acked, last_heard, deadline
        async for raw in ws:
            last_heard = time.monotonic()
            msg = wire.decode(raw)
            seq = msg.get("seq")
            if msg["type"] == "ack" and isinstance(seq, int) and not isinstance(seq, bool):
                if seq > acked:  # progress: the upload is alive, whatever its length
                    deadline = time.monotonic() + timeout_s
                acked = max(acked, seq)
                if acked >= target:
                    done.set()
            elif msg["type"] == "error":
                said = str(msg.get("message"))
                log.warning("server says: %s", said)
                named = _REFUSED.match(said)
                refused_seq = msg.get("refused_seq")
                if type(refused_seq) is int:
                    refused[refused_seq] = said
                elif named is not None:
                    blocked[int(named.group(1))] = said

    delivered = False  # past a gap: every frame sent once and the server gone quiet

    def unfinished() -> bool:
        return acked < target or (gap and not delivered)

    try:
        while unfinished() and time.monotonic() < deadline:
            try:
                async with connect(
                    url,
                    additional_headers=auth_headers(token),
                    open_timeout=OPEN_TIMEOUT_S,
                    close_timeout=2.0,
                    max_size=wire.MAX_FRAME_BYTES,
                ) as ws:
                    # upload: the server shows the run as uploading, not as having a
                    # trainer, and refuses commands to it (nothing here applies them).
                    await ws.send(wire.encode(dict(hello, last_acked_seq=acked, upload=True)))
                    welcome = wire.decode(await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT_S))
                    if welcome["type"] != "welcome":
                        raise LinkError(f"server refused the upload: {welcome.get('message')}")
                    connected_once = True
                    acked = max(acked, int(welcome.get("acked_seq", 0)))
                    if acked >= target and not gap:
                        break
                    done = asyncio.Event()
                    if acked >= target:  # a gap at seq 1: no ack can come, send and listen
                        done.set()
                    receiver = asyncio.create_task(receive_acks(ws, done))
                    try:
                        for seq, offset in frames:
                            if seq > acked:
                                await ws.send(reader.read_at(offset))
                                sent.add(seq)
                        last_heard = time.monotonic()  # quiet is counted from the last send
                        waiter = asyncio.create_task(done.wait())
                        await asyncio.wait(
                            [receiver, waiter],
                            timeout=max(0.0, deadline - time.monotonic()),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        waiter.cancel()
                        # Past a gap no ack can confirm the frames, so leave only once the
                        # server has gone quiet: it has read and committed what it got.
                        while gap and acked >= target and time.monotonic() < deadline:
                            if time.monotonic() - last_heard >= GAP_QUIET_S:
                                delivered = True
                                break
                            await asyncio.sleep(0.05)
                    finally:
                        receiver.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await receiver
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                if not connected_once:
                    raise ConnectionError(
                        f"cannot upload to {url}: {last_error}{_refusal_hint(exc, token, url)}"
                    ) from exc
            if unfinished():
                await asyncio.sleep(random.uniform(0.5, 1.0) * backoff)
                backoff = min(BACKOFF_CAP_S, backoff * 2)
    finally:
        reader.close()
    if unfinished():
        stuck = blocked.get(acked + 1)
        if stuck is not None:
            # The reason acks stopped; the close that followed ("no heartbeat") is not it.
            raise TimeoutError(
                f"server acked {acked} of {target} frames: it refused frame seq {acked + 1}"
                f" ({stuck}), and acks (the highest contiguous seq it stored) cannot pass it;"
                " a newer layerscope server records such a refusal and acks past it"
            )
        raise TimeoutError(
            f"server acked {acked} of {target} frames, then nothing more for {timeout_s:g} s"
            + (f" (last error: {last_error})" if last_error else "")
        )
    if refused:
        seqs = sorted(refused)
        shown = ", ".join(map(str, seqs[:10])) + (
            f" and {len(seqs) - 10} more" if len(seqs) > 10 else ""
        )
        log.warning(
            "the server refused %d of the spool's frames (seq %s; see its messages above):"
            " it recorded each refusal in the run's event log in the frame's place and"
            " stored the rest; the spool %s still holds them",
            len(seqs),
            shown,
            path,
        )
    return Synced(sum(1 for seq, _ in frames if seq <= acked), len(sent), tuple(sorted(refused)))
