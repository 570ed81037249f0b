"""sync uploads a spool after the fact: resume-safe, honest about what it cannot confirm.

Against the real-websockets stand-in for /ws/trainer (trainer_server.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from layerscope.trainer.link import Link
from layerscope.trainer.sync import sync_spool
from trainer_server import TrainerServer, make_hello, metrics


@pytest.fixture
def server() -> Iterator[TrainerServer]:
    srv = TrainerServer().start()
    yield srv
    srv.close()


def test_sync_uploads_a_spool_and_is_resume_safe(server: TrainerServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool.bin"
    link = Link(make_hello("offline"), spool_path=spool, server=None)
    link.start()
    for step in range(1, 61):
        link.submit(metrics(step))
    link.close()
    assert sync_spool(spool, server.url, timeout_s=20) == 60
    assert sorted(server.frames) == list(range(1, 61))
    assert server.hellos[0]["run_id"] == "offline"
    received = server.received
    assert sync_spool(spool, server.url, timeout_s=20) == 60  # already there: nothing resent
    assert server.received == received


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


def test_sync_of_a_damaged_spool_uploads_what_survived(
    server: TrainerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool.bin"
    link = Link(make_hello("damaged"), spool_path=spool)
    link.start()
    for step in range(1, 21):
        link.submit(metrics(step))
    link.close()
    data = bytearray(spool.read_bytes())
    at = data.index(b'"seq":10}')
    data[at + 3] ^= 0x20  # corrupt frame 10's payload: its CRC no longer matches
    spool.write_bytes(bytes(data))
    assert sync_spool(spool, server.url, timeout_s=20) == 9  # confirmed: the frames before the gap
    assert sorted(server.frames) == [*range(1, 10), *range(11, 21)]  # the rest still sent
    assert "frame 10 is missing" in caplog.text
