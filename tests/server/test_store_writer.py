"""The store's writer process (store_writer.py) and the server's side of it (writer_link.py):

What a user relies on: every write that was submitted before close is committed, a
writer that dies fails the writes waiting on it with a clear error and keeps what was
committed, Ctrl-C in the terminal does not take the writer down before the server has
stopped it, and a server killed with -9 leaves no writer behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import psutil
import pytest
from layerscope.server.schema import SCHEMA_VERSION
from layerscope.server.store import Store, StoreError
from layerscope.trainer import wire

pytestmark = pytest.mark.anyio


def hello() -> dict[str, Any]:
    return wire.validate_hello({"type": "hello", "v": 1, "run_id": "r1", "name": "r1"})


def log_event(seq: int) -> dict[str, Any]:
    return wire.validate_event({"seq": seq, "step": seq, "kind": "log", "data": {"n": seq}})


def writer_pid(store: Store) -> int:
    pid = store._writes.pid
    assert pid is not None
    return pid


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:\tZ") for line in f)
    except FileNotFoundError:
        return True


async def test_writes_submitted_before_close_are_all_committed(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", commit_interval_s=0.05)
    await store.open()
    await store.hello(hello())
    writes = [asyncio.ensure_future(store.append("r1", [log_event(s)])) for s in range(1, 301)]
    await asyncio.sleep(0)  # every append is submitted, none committed yet
    await store.close()
    assert max(await asyncio.gather(*writes)) == 300
    assert gone(writer_pid(store))
    again = Store(tmp_path / "data")
    await again.open()
    try:
        assert again.acked_seq("r1") == 300
        assert [e["data"]["n"] for e in again.events("r1")][-3:] == [298, 299, 300]
    finally:
        await again.close()


async def test_a_killed_writer_is_replaced_and_what_was_committed_is_kept(
    tmp_path: Path,
) -> None:
    """Killed (the OOM killer, say): the writes it held fail with a clear error (none was
    acknowledged; a trainer resends), another writer takes the next ones. A replacement
    that dies at once is replaced after 1 s, the next after 2 s, ...: meanwhile writes are
    refused, saying why and when (reviewer's /tmp/revE/t2_writer_dead.py: after two deaths
    within 5 s the store refused every write for good), and reads go on."""
    store = Store(tmp_path / "data", commit_interval_s=0.005)
    await store.open()
    try:
        await store.hello(hello())
        assert await store.append("r1", [log_event(1), log_event(2)]) == 2
        first = writer_pid(store)
        os.kill(first, signal.SIGKILL)
        failed = []
        for seq in range(3, 10):
            try:
                await store.append("r1", [log_event(seq)])
            except StoreError as exc:
                failed.append(seq)
                assert "writer process stopped (exit code -9)" in str(exc)
                assert "may not have been stored: send it again" in str(exc)
        for seq in failed:  # resent, as a trainer does after a failed commit
            await store.append("r1", [log_event(seq)])
        assert store.acked_seq("r1") == 9 and store.writer_restarts == 1
        assert writer_pid(store) != first and gone(first)

        for backoff in (1, 2):
            os.kill(writer_pid(store), signal.SIGKILL)  # the replacement, at once
            killed = time.monotonic()
            with pytest.raises(StoreError, match=r"exit code -9\)"):
                for seq in range(10, 1000):
                    await store.append("r1", [log_event(seq)])
            while store.write_problem is None:
                await asyncio.sleep(0.01)
            waiting = f"the store takes no writes until another starts (in {backoff} s)"
            assert waiting in str(store.write_problem)
            with pytest.raises(StoreError, match=re.escape(waiting)):
                await store.append("r1", [log_event(5000)])
            assert store.acked_seq("r1") >= 9  # reads never needed the writer
            while store.write_problem is not None:
                assert time.monotonic() - killed < backoff + 20, store.write_problem
                await asyncio.sleep(0.05)
            assert time.monotonic() - killed >= backoff
            acked = store.acked_seq("r1")
            assert await store.append("r1", [log_event(acked + 1)]) == acked + 1
        assert store.writer_restarts == 3
        os.kill(writer_pid(store), signal.SIGKILL)  # closing while it waits 4 s: at once
        while "(in 4 s)" not in str(store.write_problem):
            await asyncio.sleep(0.01)
        closing = time.monotonic()
    finally:
        await store.close()
    assert time.monotonic() - closing < 3
    again = Store(tmp_path / "data")
    await again.open()
    try:
        acked = again.acked_seq("r1")
        assert acked >= 9
        assert await again.append("r1", [log_event(acked + 1)]) == acked + 1
    finally:
        await again.close()


async def test_a_writer_that_cannot_start_is_tried_again_until_one_can(tmp_path: Path) -> None:
    """The writer dies and its replacement cannot open the database (here: a newer
    layerscope's schema version found there): writes are refused naming why, and another
    is tried after 1 s, 2 s, ... until one starts."""
    store = Store(tmp_path / "data", commit_interval_s=0.005)
    await store.open()
    try:
        await store.hello(hello())
        assert await store.append("r1", [log_event(1)]) == 1
        with closing(sqlite3.connect(tmp_path / "data" / "layerscope.db")) as conn:
            conn.execute("UPDATE schema_version SET version = 99")
            conn.commit()
        os.kill(writer_pid(store), signal.SIGKILL)
        while "could not start" not in str(store.write_problem):
            await asyncio.sleep(0.01)
        assert "version 99 was written by a newer layerscope" in str(store.write_problem)
        with pytest.raises(StoreError, match="another could not start"):
            await store.append("r1", [log_event(2)])
        # a second try after 1 s (on a loaded machine, later), which fails too
        deadline = time.monotonic() + 30
        while store.writer_restarts < 2 or "could not start" not in str(store.write_problem):
            assert time.monotonic() < deadline, (store.writer_restarts, store.write_problem)
            await asyncio.sleep(0.01)
        with closing(sqlite3.connect(tmp_path / "data" / "layerscope.db")) as conn:
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.commit()
        deadline = time.monotonic() + 30
        while store.write_problem is not None:
            assert time.monotonic() < deadline, store.write_problem
            await asyncio.sleep(0.05)
        assert await store.append("r1", [log_event(2)]) == 2
    finally:
        await store.close()


async def test_ctrl_c_in_the_terminal_does_not_stop_the_writer(tmp_path: Path) -> None:
    """The writer runs in its own session (Ctrl-C in the terminal signals the server's
    process group, not it) and ignores a SIGINT sent to it; the server stops it in order."""
    store = Store(tmp_path / "data", commit_interval_s=0.005)
    await store.open()
    try:
        await store.hello(hello())
        pid = writer_pid(store)
        assert os.getpgid(pid) != os.getpgid(0) and os.getsid(pid) == pid
        os.kill(pid, signal.SIGINT)
        await asyncio.sleep(0.3)
        assert not gone(pid)
        assert await store.append("r1", [log_event(1)]) == 1
        assert writer_pid(store) == pid and store.writer_restarts == 0
    finally:
        await store.close()
    assert gone(pid)


async def test_a_server_killed_with_sigkill_leaves_no_writer_behind(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys, time\n"
        "from layerscope.server.store import Store\n"
        "async def main():\n"
        f"    store = Store({str(tmp_path / 'data')!r})\n"
        "    await store.open()\n"
        "    print(store._writes.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        assert not gone(child)
        server.kill()
        server.wait(30)
        deadline = time.monotonic() + 30
        while not gone(child) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gone(child), "the writer process outlived its server"
    finally:
        server.kill()
        server.wait(30)
        if server.stdout is not None:
            server.stdout.close()


async def test_a_database_the_writer_cannot_open_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "layerscope.db").mkdir(parents=True)  # a folder where the file goes
    store = Store(tmp_path / "data")
    with pytest.raises(StoreError, match="could not open .*layerscope.db"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):
        await store.hello(hello())


async def test_close_while_a_replacement_writer_starts_stops_it_and_settles_every_write(
    tmp_path: Path,
) -> None:
    """The writer dies and the server shuts down while its replacement is starting: close
    waits for the replacement, which commits what was queued for it; every write gets an
    answer that matches the database, and no writer is left running."""
    store = Store(tmp_path / "data", commit_interval_s=0.005)
    await store.open()
    await store.hello(hello())
    link = store._writes
    old = link._writer
    assert old is not None
    os.kill(writer_pid(store), signal.SIGKILL)
    while link._writer is old:  # the results thread saw the death and swapped writers
        await asyncio.sleep(0.001)
    replacement = link._writer
    assert replacement is not None
    write = asyncio.ensure_future(store.append("r1", [log_event(1)]))
    await asyncio.sleep(0)
    await store.close()
    assert replacement.proc is not None and replacement.proc.poll() is not None
    assert await write == 1  # queued for the replacement, committed before it stopped
    with sqlite3.connect(tmp_path / "data" / "layerscope.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 1


def limit_file_size(pid: int, size: int | None) -> None:
    """RLIMIT_FSIZE of the writer process: no write of its reaches past ``size`` bytes of a
    file (None: no limit). A real fault: SQLite's writes fail (EFBIG; Python ignores
    SIGXFSZ) as on a full disk."""
    proc = psutil.Process(pid)
    _soft, hard = proc.rlimit(psutil.RLIMIT_FSIZE)
    proc.rlimit(psutil.RLIMIT_FSIZE, (hard if size is None else size, hard))


async def test_commits_that_fail_are_a_store_problem_until_one_commits_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """Reviewer's /tmp/h17c/t2_full.sh: with the data dir's disk full every commit failed
    while the store said it could take writes (/healthz 200) and viewers heard nothing. Now
    write_problem names the cause and the data dir from the first failed commit, each run
    whose write failed gets a store event saying so (and one with null after), its
    snapshot says it, and once writes fit again the resent ones are stored, once."""
    data = tmp_path / "data"
    store = Store(data, commit_interval_s=0.005)
    await store.open()
    told: list[tuple[str, dict[str, Any]]] = []
    store.listen(lambda run_id, event: told.append((run_id, event)))
    try:
        await store.hello(hello())
        assert await store.append("r1", [log_event(1)]) == 1
        limit_file_size(writer_pid(store), 1)  # nothing more reaches the disk
        with pytest.raises(StoreError, match="nothing of this batch was stored"):
            await store.append("r1", [log_event(2), log_event(3)])
        problem = store.write_problem
        assert problem is not None and problem.startswith("cannot store: ")
        assert problem.endswith(f" at {data}")
        assert re.search(r"disk I/O error|database or disk is full", problem), problem
        assert store.snapshot("r1")["store_problem"] == problem
        assert [(r, e["kind"], e["data"]) for r, e in told] == [
            ("r1", "store", {"problem": problem})
        ]
        with pytest.raises(StoreError):  # still failing: no second event for the same run
            await store.append("r1", [log_event(2)])
        assert len(told) == 1

        limit_file_size(writer_pid(store), None)  # space is back
        store._writes.clear_after_s = 0.0
        assert await store.append("r1", [log_event(2), log_event(3)]) == 3
        assert store.write_problem is None
        assert store.snapshot("r1")["store_problem"] is None
        assert [(r, e["data"]) for r, e in told][1:] == [("r1", {"problem": None})]
        assert [e["data"]["n"] for e in store.events("r1") if e["kind"] == "log"] == [1, 2, 3]
    finally:
        limit_file_size(writer_pid(store), None)
        await store.close()


async def test_one_commit_that_fits_on_a_full_disk_does_not_clear_the_problem(
    tmp_path: Path,
) -> None:
    """On a full disk a trainer's small hello fit (WAL space a checkpoint freed) while its
    frames did not: /healthz flapped to 200 at each reconnect. A commit clears the problem
    only once the last failure is clear_after_s old."""
    store = Store(tmp_path / "data", commit_interval_s=0.005)
    await store.open()
    try:
        await store.hello(hello())
        limit_file_size(writer_pid(store), 1)
        with pytest.raises(StoreError):
            await store.append("r1", [log_event(1)])
        limit_file_size(writer_pid(store), None)
        assert await store.append("r1", [log_event(1)]) == 1  # fits, but just after a failure
        assert store.write_problem is not None
        store._writes.clear_after_s = 0.0
        assert await store.append("r1", [log_event(2)]) == 2
        assert store.write_problem is None
    finally:
        limit_file_size(writer_pid(store), None)
        await store.close()
