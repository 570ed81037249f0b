"""spool — the trainer's local append-only record of a run (DESIGN §6).

Owns: the on-disk framing of frames (``[4-byte length][4-byte CRC32][UTF-8 JSON]``,
big-endian), appending records, reading one record back by offset, recovering
every intact record from a damaged file, and indexing a spool (its hello, and
where each seq lies) for an upload.

Never: numbers, sends or rewrites frames (that is the link's job), holds the
file's contents in memory, or fsyncs per record (one fsync at close; a
per-record fsync would cost a disk round trip per frame).

With no server at all the spool is the whole run: its first record is the
``hello``, then every ``metrics``/``probe``/``event`` frame in seq order, and
``layerscope sync`` uploads it later.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from layerscope.trainer import wire

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

HEADER = struct.Struct(">II")  # payload length, CRC32 of the payload
# A record longer than this is a corrupt length field, not a frame: the wire caps a
# frame at 2 MiB, so 64 MiB leaves room for any future frame without trusting garbage.
MAX_RECORD_BYTES = 64 * 1024 * 1024


class SpoolError(OSError):
    """A record that cannot be read back at the offset the writer reported."""


class SpoolReader:
    """Reads single records back by the offsets the writer reported."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - held open for repeated reads

    def read_at(self, offset: int) -> str:
        """The record at ``offset``; raises SpoolError if it no longer checks out."""
        self._file.seek(offset)
        header = self._file.read(HEADER.size)
        if len(header) != HEADER.size:
            raise SpoolError(f"{self.path}: no record header at offset {offset}")
        length, crc = HEADER.unpack(header)
        if length > MAX_RECORD_BYTES:  # a corrupt length field: not read into memory
            raise SpoolError(f"{self.path}: record at offset {offset} is damaged")
        payload = self._file.read(length)
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise SpoolError(f"{self.path}: record at offset {offset} is damaged")
        return payload.decode("utf-8")

    def close(self) -> None:
        self._file.close()


class SpoolWriter:
    """Appends records to ``path`` (created with its parent folder if missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the run
        # An advisory lock for as long as the run writes, released by the OS however the
        # process ends (kill -9 too): `layerscope sync` tells a live run's spool from a
        # crashed one's by it. Not taken (another writer holds it): the run goes on.
        if sys.platform != "win32":
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.debug("spool %s: another process holds its lock", self.path)
        self._reader = SpoolReader(self.path)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def append(self, frame_text: str) -> int:
        """Append one record; returns its offset for :meth:`read_at`."""
        payload = frame_text.encode("utf-8")
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
        offset = self._file.tell()
        self._file.write(HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        # Flush to the OS on every record so a crashed process keeps everything it wrote.
        self._file.flush()
        return offset

    def read_at(self, offset: int) -> str:
        """The record written at ``offset`` (the file is flushed after every append)."""
        return self._reader.read_at(offset)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:
            log.warning("spool %s: fsync failed at close: %s", self.path, exc)
        self._file.close()
        self._reader.close()


def being_written(path: str | os.PathLike[str]) -> bool:
    """Whether a running process has ``path`` open as its spool (holds the writer's lock).
    False where advisory locks do not exist (Windows) and for a crashed run's spool."""
    if sys.platform == "win32":
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing to tell
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def _valid_at(buf: mmap.mmap, pos: int, size: int) -> int | None:
    """Length of the record at ``pos`` if its header and CRC check out, else None."""
    if pos + HEADER.size > size:
        return None
    length, crc = HEADER.unpack_from(buf, pos)
    end = pos + HEADER.size + length
    if length == 0 or length > MAX_RECORD_BYTES or end > size:
        return None
    # Cheap pre-check before the CRC: every frame is a JSON object.
    if buf[pos + HEADER.size] != ord("{"):
        return None
    if zlib.crc32(buf[pos + HEADER.size : end]) != crc:
        return None
    return length


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """Yield ``(offset, text)`` for every intact record, skipping damage with a warning."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos = 0
            while pos < size:
                length = _valid_at(buf, pos, size)
                if length is not None:
                    start = pos + HEADER.size
                    try:
                        text = buf[start : start + length].decode("utf-8")
                    except UnicodeDecodeError:
                        text = None
                    if text is not None:
                        yield pos, text
                        pos = start + length
                        continue
                # Damaged or torn: scan forward byte by byte for the next record that checks
                # out. Costs O(damaged bytes); intact files never enter this branch.
                bad_at = pos
                pos += 1
                while pos < size and _valid_at(buf, pos, size) is None:
                    pos += 1
                if pos >= size:
                    log.warning(
                        "spool %s: skipped a torn or damaged tail of %d bytes at offset %d",
                        path,
                        size - bad_at,
                        bad_at,
                    )
                else:
                    log.warning(
                        "spool %s: skipped %d damaged bytes at offset %d; resumed at %d",
                        path,
                        pos - bad_at,
                        bad_at,
                        pos,
                    )


def read_spool(path: str | os.PathLike[str]) -> Iterator[str]:
    """Every intact record's text in order; torn tails and corrupt records are skipped."""
    for _, text in iter_records(path):
        yield text


def first_hello(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The hello a spool starts with, read from its first record alone (no scan), or None
    when the file is empty or does not start with an intact hello record."""
    reader = SpoolReader(path)
    try:
        frame = json.loads(reader.read_at(0))
    except (SpoolError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    finally:
        reader.close()
    return frame if isinstance(frame, dict) and frame.get("type") == "hello" else None


def set_aside_other_run(path: Path, run_id: str) -> Path | None:
    """Before a run appends to ``path``: when the file holds something else (another run's
    spool, as when a run directory or a run id is used again, or a file that is not a
    spool) it is renamed to ``spool-<its run id>.bin`` beside it (numbered if taken) and
    the new name returned, so no spool ever mixes two runs. Even a spool of the same run
    id: a new link numbers its frames from 1 again, and the seqs would clash."""
    try:
        if path.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    hello = first_hello(path)
    other = hello.get("run_id") if hello is not None else None
    other = other if isinstance(other, str) else None
    label = "".join(c if c.isalnum() or c in "-_" else "_" for c in other)[:64] if other else ""
    stem = f"{path.stem}-{label or 'unknown'}"
    target = path.with_name(f"{stem}{path.suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{stem}-{n}{path.suffix}")
    path.rename(target)
    how = (
        f"`layerscope sync {target} --run-id NEW --server URL` (this run has its id)"
        if other == run_id
        else f"`layerscope sync {target} --server URL`"
    )
    log.warning(
        "spool %s holds %s; moved to %s so this run (%s) starts its own (upload that one with %s)",
        path,
        f"run {other}" if other else "no layerscope run",
        target,
        run_id,
        how,
    )
    return target


# A spool whose first record is damaged is rescued (index_spool(rescue_run_id=...)) only
# when an intact record starts this close to its start: a file that is not a spool at all
# is refused without a scan of the whole of it.
RESCUE_SCAN_BYTES = 1 << 20


def _intact_record_near_start(path: Path) -> bool:
    """Whether a record that checks out starts within RESCUE_SCAN_BYTES of the file's
    start, after its first byte (the damaged first record's own offset)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return any(
                _valid_at(buf, pos, size) is not None
                for pos in range(1, min(size, RESCUE_SCAN_BYTES))
            )


def index_spool(
    path: Path, *, rescue_run_id: str | None = None
) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """The spool's hello and (seq, offset) of each distinct numbered frame, in seq order.
    A spool starts with its hello (checked first: a file that is not a spool is refused
    without a scan) and holds one run (a spool two runs appended to is refused, naming
    them: their seqs overlap, so no upload could keep them apart).

    ``rescue_run_id``: when the first record (the hello) is damaged but intact records
    follow it, a hello is made for the frames instead (that run id; no name or config;
    the layers the first probe frame names, of unknown kind): one flipped bit in the
    hello made a whole offline run impossible to upload. Without it such a spool is
    refused, saying how to rescue it."""
    hello = first_hello(path)
    rescued = False
    if hello is None:
        damaged = " (or its first record is damaged)"
        if rescue_run_id is not None and _intact_record_near_start(path):
            hello, rescued = {"type": "hello", "run_id": rescue_run_id, "config": {}}, True
        elif rescue_run_id is not None:
            raise ValueError(
                f"{path} does not start with a hello record, and no intact record starts"
                f" in its first {RESCUE_SCAN_BYTES >> 20} MiB; it is not a layerscope spool"
            )
        else:
            if _intact_record_near_start(path):
                damaged = (
                    ": its first record (the run's hello) is damaged, but intact records"
                    " follow it; `layerscope sync SPOOL --run-id ID` uploads them as run ID,"
                    " without the hello's name and config"
                )
            raise ValueError(
                f"{path} does not start with a hello record; it is not a layerscope spool" + damaged
            )
    seen: dict[int, int] = {}
    layers: list[dict[str, Any]] | None = None
    for offset, text in iter_records(path):
        try:
            frame = json.loads(text)
        except json.JSONDecodeError:
            log.warning("spool %s: record at offset %d is not JSON; skipped", path, offset)
            continue
        if not isinstance(frame, dict):
            continue
        if frame.get("type") == "hello":
            if offset == 0:
                continue
            raise ValueError(
                f"{path} holds two runs ({hello.get('run_id')} and {frame.get('run_id')}),"
                " appended to one spool by an older layerscope that reused a run directory"
                " or run id; their frame numbers overlap, so it cannot be uploaded"
            )
        seq = frame.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1:
            seen.setdefault(seq, offset)
        if rescued and layers is None and frame.get("type") == "probe":
            names = [e.get("name") for e in frame.get("layers") or () if isinstance(e, dict)]
            layers = [{"name": n} for n in dict.fromkeys(names) if isinstance(n, str)]
    if rescued:
        hello["layers"] = (layers or [])[: wire.MAX_LAYERS]
        log.warning(
            "spool %s: its first record (the run's hello: its name, config and layer kinds)"
            " is damaged; its %d intact frames are uploaded as run %s without them",
            path,
            len(seen),
            rescue_run_id,
        )
    # A spool written before watch() escaped them (10ce9a0) may hold a lone surrogate in
    # its name or config (a file name that is not UTF-8): sent as text, as watch() now
    # sends them, not refused (it could never be uploaded).
    for field in ("name", "config"):
        if field in hello:
            hello[field] = wire.escape_surrogates(hello[field])
    return wire.validate_hello(hello), sorted(seen.items())
