"""The spool keeps every frame a run wrote and recovers what it can from a damaged file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from layerscope.trainer.spool import HEADER, SpoolWriter, being_written, read_spool


def _frames(n: int) -> list[str]:
    return [
        json.dumps({"type": "metrics", "seq": i, "rows": [{"step": i, "x": "é" * i}]})
        for i in range(1, n + 1)
    ]


def _write(path: Path, frames: list[str]) -> list[int]:
    writer = SpoolWriter(path)
    offsets = [writer.append(f) for f in frames]
    writer.close()
    return offsets


def test_roundtrip_and_read_at(tmp_path: Path) -> None:
    frames = _frames(50)
    path = tmp_path / "run" / "spool.bin"
    writer = SpoolWriter(path)
    offsets = [writer.append(f) for f in frames]
    # Spilled frames are read back by offset while the writer is still open.
    assert [writer.read_at(o) for o in offsets] == frames
    writer.close()
    assert list(read_spool(path)) == frames


def test_reopened_spool_appends(tmp_path: Path) -> None:
    path = tmp_path / "spool.bin"
    frames = _frames(6)
    _write(path, frames[:3])
    _write(path, frames[3:])
    assert list(read_spool(path)) == frames


def test_truncated_tail_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.bin"
    frames = _frames(10)
    _write(path, frames)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # a crash mid-write tears the last record
    with caplog.at_level(logging.WARNING):
        assert list(read_spool(path)) == frames[:-1]
    assert "torn or damaged tail" in caplog.text


def test_flipped_byte_skips_only_that_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.bin"
    frames = _frames(20)
    offsets = _write(path, frames)
    data = bytearray(path.read_bytes())
    data[offsets[7] + HEADER.size + 5] ^= 0x01  # inside record 8's payload
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        recovered = list(read_spool(path))
    assert recovered == frames[:7] + frames[8:]
    assert "damaged bytes" in caplog.text


def test_corrupt_length_field_resyncs(tmp_path: Path) -> None:
    path = tmp_path / "spool.bin"
    frames = _frames(8)
    offsets = _write(path, frames)
    data = bytearray(path.read_bytes())
    data[offsets[3] : offsets[3] + 4] = b"\xff\xff\xff\xf0"  # an impossible length
    path.write_bytes(bytes(data))
    assert list(read_spool(path)) == frames[:3] + frames[4:]


def test_empty_spool_reads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool.bin"
    path.write_bytes(b"")
    assert list(read_spool(path)) == []


def test_a_spool_tells_a_running_writer_from_a_crashed_one(tmp_path: Path) -> None:
    """`layerscope sync` of a run still training uploaded what was there and said 'synced',
    as for a finished run. The writer holds an advisory lock while the run writes; the OS
    drops it however the process ends, kill -9 included, so a crashed run's spool is not
    taken for a live one."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "spool.bin"
    writer = SpoolWriter(path)
    writer.append('{"type":"hello"}')
    assert being_written(path)
    writer.close()
    assert not being_written(path)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from layerscope.trainer.spool import SpoolWriter\n"
            "w = SpoolWriter(sys.argv[1]); w.append('{}'); print('open', flush=True)\n"
            "time.sleep(60)\n",
            str(tmp_path / "crashed.bin"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
        assert being_written(tmp_path / "crashed.bin")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert not being_written(tmp_path / "crashed.bin")
