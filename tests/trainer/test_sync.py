"""sync uploads a spool after the fact: resume-safe, honest about what it cannot confirm.

Against the real-websockets stand-in for /ws/trainer (trainer_server.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from layerscope.trainer.link import Link
from layerscope.trainer.spool import SpoolWriter, read_spool
from layerscope.trainer.sync import Synced, sync_spool, upload_spool
from trainer_server import TrainerServer, make_hello, metrics
from waiting import wait_until

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))  # server_harness: the real server


@pytest.fixture
def server() -> Iterator[TrainerServer]:
    srv = TrainerServer().start()
    yield srv
    srv.close()


def offline_spool(spool: Path, run_id: str, steps: int) -> None:
    """A run recorded with no server: a metrics frame for each of ``steps`` steps."""
    link = Link(make_hello(run_id), spool_path=spool, server=None)
    link.start()
    for step in range(1, steps + 1):
        link.submit(metrics(step))
    link.close()


def test_sync_uploads_a_spool_and_is_resume_safe(server: TrainerServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool.bin"
    offline_spool(spool, "offline", 60)
    assert upload_spool(spool, server.url, timeout_s=20) == Synced(acked=60, sent=60)
    assert sorted(server.frames) == list(range(1, 61))
    assert server.hellos[0]["run_id"] == "offline"
    assert server.hellos[0]["upload"] is True  # the server refuses commands meanwhile
    received = server.received
    assert sync_spool(spool, server.url, timeout_s=20) == 60  # already there: nothing resent
    assert server.received == received
    # and it says so: none sent (the CLI said "acknowledged 60 frames" as if it sent them)
    assert upload_spool(spool, server.url, timeout_s=20) == Synced(acked=60, sent=0)


def test_sync_to_nowhere_says_so(tmp_path: Path) -> None:
    spool = tmp_path / "spool.bin"
    link = Link(make_hello(), spool_path=spool)
    link.start()
    link.submit(metrics(1))
    link.close()
    dead = TrainerServer().start()
    url = dead.url
    dead.close()
    with pytest.raises(ConnectionError, match="cannot upload"):
        sync_spool(spool, url, timeout_s=5)


def _damaged_spool(tmp_path: Path, run_id: str, *, frames: int, damaged: int) -> Path:
    """A spool of ``frames`` metrics frames whose frame ``damaged`` fails its CRC."""
    spool = tmp_path / "spool.bin"
    link = Link(make_hello(run_id), spool_path=spool)
    link.start()
    for step in range(1, frames + 1):
        link.submit(metrics(step))
    link.close()
    data = bytearray(spool.read_bytes())
    at = data.index(b'"seq":%d}' % damaged)
    data[at + 3] ^= 0x20  # a flipped payload byte: the record's CRC no longer matches
    spool.write_bytes(bytes(data))
    return spool


def test_sync_of_a_damaged_spool_uploads_what_survived(
    server: TrainerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = _damaged_spool(tmp_path, "damaged", frames=20, damaged=10)
    assert sync_spool(spool, server.url, timeout_s=20) == 9  # confirmed: the frames before the gap
    assert sorted(server.frames) == [*range(1, 10), *range(11, 21)]  # the rest still sent
    assert "frame 10 is missing" in caplog.text


def test_a_spool_missing_its_first_frame_is_still_uploaded(
    server: TrainerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Frame 1 damaged: the server can confirm nothing (it acks contiguous seqs), but
    every frame that survived is sent, once, and sync says how many were confirmed."""
    spool = _damaged_spool(tmp_path, "gap-at-1", frames=7, damaged=1)
    assert sync_spool(spool, server.url, timeout_s=20) == 0
    assert sorted(server.frames) == list(range(2, 8))
    assert "frame 1 is missing" in caplog.text


def test_sync_refuses_a_file_that_is_not_a_spool_at_once(tmp_path: Path) -> None:
    """A checkpoint or any other file given by mistake is refused from its first bytes,
    not scanned byte by byte for records (minutes for a large file)."""
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(8 << 20))
    started = time.monotonic()
    with pytest.raises(ValueError, match="not a layerscope spool"):
        sync_spool(path, "ws://127.0.0.1:9", timeout_s=5)
    assert time.monotonic() - started < 2.0  # a scan of 8 MiB took ~8 s
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a layerscope spool"):
        sync_spool(empty, "ws://127.0.0.1:9", timeout_s=5)


def test_sync_refuses_a_spool_two_runs_appended_to(tmp_path: Path) -> None:
    """An older layerscope appended a second run to a reused run directory's spool; their
    seqs overlap, so it is refused with both run ids rather than uploaded as the first."""
    spool = tmp_path / "spool.bin"
    again = tmp_path / "again.bin"  # the same run id twice: seqs overlap just the same
    for run_id, path in (("one", spool), ("two", spool), ("same", again), ("same", again)):
        writer = SpoolWriter(path)
        writer.append(json.dumps({"type": "hello", **make_hello(run_id)}))
        writer.append(json.dumps({**metrics(1), "seq": 1}))
        writer.close()
    with pytest.raises(ValueError, match="two runs \\(one and two\\)"):
        sync_spool(spool, "ws://127.0.0.1:9", timeout_s=5)
    with pytest.raises(ValueError, match="two runs \\(same and same\\)"):
        sync_spool(again, "ws://127.0.0.1:9", timeout_s=5)


def test_a_long_upload_that_keeps_moving_does_not_time_out(tmp_path: Path) -> None:
    """The timeout was one deadline for the whole upload: a large offline run (~90k frames
    on this machine) failed its first sync while the server was still acking. It is now the
    time the server may go without acknowledging anything new."""
    spool = tmp_path / "spool.bin"
    offline_spool(spool, "long", 50)
    # 50 acks 0.12 s apart: ~6 s in all, 1.5 times the timeout (1 s, then 2 s timeouts
    # flaked on a loaded two-core machine: pauses over 2 s between two acks at load 10)
    slow = TrainerServer(ack_delay_s=0.12).start()
    try:
        assert sync_spool(spool, slow.url, timeout_s=4.0) == 50
    finally:
        slow.close()
    stalled = TrainerServer(ack=False).start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="then nothing more for 0.5 s"):
            sync_spool(spool, stalled.url, timeout_s=0.5)
        assert time.monotonic() - started < 10
    finally:
        stalled.close()


def test_a_spool_set_aside_under_the_same_run_id_is_uploaded_as_another_run(
    server: TrainerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run id used again sets the old spool aside, but both hellos name the same run: the
    server would splice the two (seqs 1.. of one, the rest of the other). The set-aside
    message says to sync it with --run-id, which uploads it as that run."""
    spool = tmp_path / "spool.bin"
    for steps in (12, 5):
        offline_spool(spool, "again", steps)
    (aside,) = tmp_path.glob("spool-again*.bin")
    assert f"layerscope sync {aside} --run-id NEW" in caplog.text
    assert sync_spool(aside, server.url, timeout_s=20, run_id="again-earlier") == 12
    assert server.hellos[-1]["run_id"] == "again-earlier"
    with pytest.raises(ValueError, match="plain name"):
        sync_spool(aside, server.url, run_id="a/b")
    with pytest.raises(ValueError, match="control character"):
        sync_spool(aside, server.url, run_id="a\x1b[2J")


def test_a_server_that_wants_a_trainer_token_is_named_as_the_reason(tmp_path: Path) -> None:
    """Against a server run with --trainer-token, sync said only 'HTTP 403': the user
    could not tell a missing token from a wrong one, or from the viewer token given by
    mistake. It now says which token it wants, and stores nothing."""
    spool = tmp_path / "spool.bin"
    offline_spool(spool, "guarded", 3)
    guarded = TrainerServer(token="t-secret").start()
    try:
        with pytest.raises(ConnectionError, match="wants a trainer token: set LAYERSCOPE_TRAINER"):
            sync_spool(spool, guarded.url, timeout_s=5)
        with pytest.raises(ConnectionError, match="refused the trainer token"):
            sync_spool(spool, guarded.url, token="viewer-token", timeout_s=5)
        assert not guarded.frames  # refused before the upgrade: nothing stored
        assert sync_spool(spool, guarded.url, token="t-secret", timeout_s=20) == 3
    finally:
        guarded.close()


@pytest.mark.parametrize("timeout_s", [0.0, -3.0, float("nan")])
def test_a_timeout_of_zero_or_less_is_refused_before_connecting(
    tmp_path: Path, timeout_s: float
) -> None:
    """`--timeout 0` (or negative) gave up at once and blamed the server ('server acked 0
    of N frames, then nothing more for 0 s'); it is refused as the bad flag it is."""
    spool = tmp_path / "spool.bin"
    offline_spool(spool, "impatient", 2)
    with pytest.raises(ValueError, match="must be more than 0 seconds"):
        sync_spool(spool, "ws://127.0.0.1:9", timeout_s=timeout_s)


def test_a_refusal_names_the_servers_own_reason(tmp_path: Path) -> None:
    """The real server puts why it refused in the 403's body ({"detail": ...}): a wrong
    Host (sync through a proxy or an SSH tunnel on another port) is a 403 as a bad token
    is, so sync passes on the server's reason rather than guessing at the token; and a
    run page's address as --server (a bare 403: no such socket) is named as such."""
    import asyncio
    import threading
    from http import HTTPStatus

    from websockets.asyncio.server import serve as ws_serve
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    spool = tmp_path / "spool.bin"
    offline_spool(spool, "proxied", 2)
    reason = "Host '127.0.0.1:1' is not this server; use http://127.0.0.1:2/"
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Event] = []

    def refuse(connection: Any, request: Any) -> Response:
        # as the real server: its reason on its trainer path, a bare 403 on a path it lacks
        body = json.dumps({"detail": reason}).encode() if request.path == "/ws/trainer" else b""
        return Response(HTTPStatus.FORBIDDEN, "Forbidden", Headers(), body)

    async def main() -> None:
        stop.append(asyncio.Event())
        async with ws_serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=refuse) as srv:
            port.append(srv.sockets[0].getsockname()[1])
            ready.set()
            await stop[0].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    try:
        assert ready.wait(10)
        with pytest.raises(ConnectionError, match="the server says: Host '127.0.0.1:1' is not"):
            sync_spool(spool, f"ws://127.0.0.1:{port[0]}", timeout_s=5)
        # a page's address given as --server: a bare 403 there, which read as a token
        page = f"http://127.0.0.1:{port[0]}/runs/proxied"
        with pytest.raises(ConnectionError, match="no trainer endpoint at /runs/proxied/ws/tr"):
            sync_spool(spool, page, timeout_s=5)
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()


def test_sync_of_a_spool_its_trainer_still_writes_says_it_is_the_run_so_far(
    server: TrainerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user restarting a lost server and syncing at once, while the trainer still ran:
    sync said 'synced' of the run's first frames as of a finished run. It now says the
    trainer is still writing and this is the run so far; a crashed (closed) one is not."""
    spool = tmp_path / "spool.bin"
    link = Link(make_hello("still-training"), spool_path=spool, server=None)
    link.start()
    for step in range(1, 6):
        link.submit(metrics(step))
    wait_until(lambda: len(list(read_spool(spool))) == 6)
    try:
        assert sync_spool(spool, server.url, timeout_s=20) == 5
        assert "still being written by a running trainer: uploading the 5 frames" in caplog.text
    finally:
        link.close()
    caplog.clear()
    assert sync_spool(spool, server.url, timeout_s=20) == 5
    assert "still being written" not in caplog.text


def _spool_with_an_oversize_event(spool: Path, run_id: str) -> None:
    """Metrics at seqs 1-3 and 5-6, and at seq 4 an event whose data (100 KB) the server
    refuses as over its 64 KiB limit (the link checks only the 2 MiB frame limit)."""
    link = Link(make_hello(run_id), spool_path=spool, server=None)
    link.start()
    for step in range(1, 4):
        link.submit(metrics(step))
    link.submit({"type": "event", "step": 3, "kind": "log", "data": {"message": "x" * 100_000}})
    for step in range(4, 6):
        link.submit(metrics(step))
    link.close()


def test_sync_of_a_spool_holding_a_frame_the_server_refuses_finishes_and_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Against the real server: a frame it refused stopped its acks (the highest contiguous
    seq) for good; sync waited its 60 s and failed blaming 'no heartbeat', uploading nothing
    it could confirm. The server now records the refusal in the frame's place and acks past
    it; sync finishes, and says which frame was refused and that the rest was stored."""
    from server_harness import exported, make_settings, running_server

    spool = tmp_path / "spool.bin"
    _spool_with_an_oversize_event(spool, "refused-one")
    with running_server(make_settings(tmp_path / "data")) as server:
        started = time.monotonic()
        synced = upload_spool(spool, server.ws("/ws/trainer"), timeout_s=20)
        assert time.monotonic() - started < 5
        assert synced == Synced(acked=6, sent=6, refused=(4,))
        frames = exported(server, "refused-one")
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5, 6]
    assert frames[3]["kind"] == "log" and frames[3]["data"]["refused"]["seq"] == 4
    assert (
        "server says: event frame seq 4 not stored: event data exceeds 65536 bytes" in caplog.text
    )
    assert (
        "the server refused 1 of the spool's frames (seq 4; see its messages above): it"
        " recorded each refusal in the run's event log in the frame's place and stored the rest"
    ) in caplog.text


def test_sync_stuck_behind_a_refused_frame_says_so_not_no_heartbeat(tmp_path: Path) -> None:
    """A server that does not record a refusal (one older than this layerscope; stood in
    for by the real server with that step undone) acks nothing past it: sync's timeout
    names the refused frame and why, not the 'no heartbeat' close that followed."""
    from server_harness import make_settings, running_server

    spool = tmp_path / "spool.bin"
    _spool_with_an_oversize_event(spool, "refused-old")
    with running_server(make_settings(tmp_path / "data")) as server:
        ingest = server.app.state.ingest

        async def refuse_only(
            link: Any, committer: Any, payload: Any, exc: Any, acked: int
        ) -> bool:
            msg = json.loads(payload)
            return bool(
                await ingest._answer(link, f"event frame seq {msg['seq']} not stored: {exc}")
            )

        ingest._refuse_frame = refuse_only
        with pytest.raises(TimeoutError) as raised:
            sync_spool(spool, server.ws("/ws/trainer"), timeout_s=1.5)
    assert str(raised.value) == (
        "server acked 3 of 6 frames: it refused frame seq 4 (event frame seq 4 not stored: event"
        " data exceeds 65536 bytes), and acks (the highest contiguous seq it stored) cannot pass"
        " it; a newer layerscope server records such a refusal and acks past it"
    )


def test_a_spool_whose_hello_holds_a_lone_surrogate_is_uploaded_with_it_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool written before watch() escaped them (10ce9a0): its hello's name and config
    hold a lone surrogate (a data file named in Latin-1, os.fsdecode's '\\udce9'), and so
    does a series name in a later frame. Lone surrogates are no text and are refused now,
    so the spool could never be uploaded (its hello refused before anything was sent).
    The name and config are sent escaped, as watch() now sends them; the frame holding
    one is refused and recorded in its place by the server, and the rest is stored."""
    from server_harness import exported, make_settings, run_detail, running_server

    spool = tmp_path / "spool.bin"
    writer = SpoolWriter(spool)  # as the link wrote it then: json's "\udce9" escapes
    hello = {**make_hello("old-surrogate"), "name": "caf\udce9", "last_acked_seq": 0}
    hello["config"] = {"data": "/data/caf\udce9.npz", "lr": 0.1}
    writer.append(json.dumps({"v": 1, "type": "hello", **hello}))
    for seq in range(1, 5):
        frame = {**metrics(seq), "seq": seq}
        if seq == 2:
            frame["rows"][0]["values"] = {"caf\udce9": 1.0}
        writer.append(json.dumps({"v": 1, **frame}))
    writer.close()
    with running_server(make_settings(tmp_path / "data")) as server:
        synced = upload_spool(spool, server.ws("/ws/trainer"), timeout_s=20)
        assert synced == Synced(acked=4, sent=4, refused=(2,))
        run = run_detail(server, "old-surrogate")
        frames = exported(server, "old-surrogate")
    assert run["config"]["data"] == "/data/caf\\xe9.npz" and run["config"]["lr"] == 0.1
    assert run["name"] == "caf\\xe9"
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert frames[1]["kind"] == "log" and frames[1]["data"]["refused"]["seq"] == 2
    assert "metrics frame seq 2 not stored: rows[0].values key 'caf\\udce9' holds U+DCE9" in (
        caplog.text
    )


def test_a_spool_whose_hello_is_damaged_is_rescued_with_a_run_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One flipped bit in a spool's first record (its hello) made a whole offline run
    impossible to upload: "does not start with a hello record", with --run-id no help,
    though every frame after it checked out (review /tmp/h17c, t3_hello_dmg.sh). Without a
    run id sync now says how to rescue it; with one, every intact frame is uploaded as that
    run (no name or config: they were in the hello; layers from the first probe frame)."""
    from server_harness import exported, make_settings, run_detail, running_server

    spool = tmp_path / "spool.bin"
    link = Link(make_hello("lost-hello"), spool_path=spool, server=None)
    link.start()
    for step in range(1, 4):
        link.submit(metrics(step))
    probe = {"type": "probe", "step": 3, "layers": [{"name": "fc1", "mean": 0.5}]}
    link.submit(probe)
    link.close()
    data = bytearray(spool.read_bytes())
    data[data.index(b'"lost-hello"') + 2] ^= 0x01  # one bit of the hello's run id
    spool.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"damaged, but intact records follow it; `layerscope sync"
    ):
        upload_spool(spool, "ws://127.0.0.1:9/ws/trainer", timeout_s=5)
    with running_server(make_settings(tmp_path / "data")) as server:
        synced = upload_spool(spool, server.ws("/ws/trainer"), timeout_s=20, run_id="rescued")
        assert synced == Synced(acked=4, sent=4)
        run = run_detail(server, "rescued")
        frames = exported(server, "rescued")
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert frames[3]["type"] == "probe" and frames[3]["layers"][0]["name"] == "fc1"
    assert run["name"] == "rescued" and run["config"] == {}
    assert "its 4 intact frames are uploaded as run rescued" in caplog.text
