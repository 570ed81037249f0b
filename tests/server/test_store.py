"""Store: real SQLite files in tmp_path, written through the writer process, read back
through the read connections and, where it matters, through a fresh sqlite3 connection."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sqlite3
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from layerscope.server.checks import RunIdTaken
from layerscope.server.data_lock import DataDirBusy
from layerscope.server.downsample import choose_level
from layerscope.server.schema import DB_NAME, SCHEMA_VERSION, SchemaError
from layerscope.server.store import ExportCutShort, RunNotFound, Store, StoreError
from layerscope.trainer import wire

pytestmark = pytest.mark.anyio

LAYERS = [
    {"name": "fc1", "kind": "Linear", "units": 4},
    {"name": "act1", "kind": "ReLU", "units": 4},
]


def hello(run_id: str = "r1", **extra: Any) -> dict[str, Any]:
    msg = {
        "type": "hello",
        "run_id": run_id,
        "name": f"{run_id} name",
        "config": {"lr": 0.1},
        "layers": LAYERS,
        **extra,
    }
    return wire.validate_hello(msg)


def metrics(seq: int, rows: Sequence[tuple[int, Mapping[str, float | None]]]) -> dict[str, Any]:
    return wire.validate_metrics(
        {"seq": seq, "rows": [{"step": s, "time_s": s * 0.5, "values": v} for s, v in rows]}
    )


def probe(seq: int, step: int, scale: float = 1.0) -> dict[str, Any]:
    return wire.validate_probe(
        {
            "seq": seq,
            "step": step,
            "layers": [
                {
                    "name": "fc1",
                    "mean": 0.1 * scale,
                    "std": 1.0,
                    "dead_ratio": 0.25,
                    "hist": {"lo": -2.0, "hi": 2.0, "counts": [1, 2, 3, 4]},
                },
                {
                    "name": "act1",
                    "mean": 0.5 * scale,
                    "dead_ratio": 0.5 * scale,
                    "nonfinite": 0,
                    "hist": {"lo": 0.0, "hi": 4.0, "counts": [8, 0, 0, 2]},
                },
            ],
        }
    )


def event(seq: int, step: int, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return wire.validate_event({"seq": seq, "step": step, "kind": kind, "data": data})


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "data", commit_interval_s=0.005)
    await s.open()
    yield s
    await s.close()


async def purged(store: Store, timeout_s: float = 30.0) -> None:
    """Until every deleted run's rows are gone (the writer purges them in its spare time)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while store.deletions_pending():
        assert asyncio.get_running_loop().time() < deadline, "deleted rows still there"
        await asyncio.sleep(0.02)


def fresh(tmp_path: Path) -> sqlite3.Connection:
    """A connection that shares nothing with the store: sees only what was committed."""
    return sqlite3.connect(tmp_path / "data" / DB_NAME)


async def test_round_trip_of_metrics_probes_and_events(store: Store) -> None:
    assert await store.hello(hello()) == 0
    rows = [(s, {"loss": 1.0 / (s + 1), "lr": 0.1}) for s in range(10)]
    assert await store.append("r1", [metrics(1, rows)]) == 1
    assert await store.append("r1", [probe(2, 0), probe(3, 10, scale=2.0)]) == 3
    assert await store.append("r1", [event(4, 10, "alert", {"msg": "dead"})]) == 4

    series = store.series("r1", ["loss", "lr", "missing"])
    assert series["loss"] == {
        "steps": list(range(10)),
        "values": [1.0 / (s + 1) for s in range(10)],
    }
    assert series["lr"]["values"] == [0.1] * 10
    assert series["missing"] == {"steps": [], "values": []}
    assert store.series("r1", ["loss"], start=3, end=5)["loss"]["steps"] == [3, 4, 5]

    assert store.probe_series("r1", "act1", ["mean", "dead_ratio"]) == {
        "layer": "act1",
        "steps": [0, 10],
        "mean": [0.5, 1.0],
        "dead_ratio": [0.5, 1.0],
    }
    assert store.probe_matrix("r1", "dead_ratio") == {
        "stat": "dead_ratio",
        "layers": ["fc1", "act1"],
        "steps": [0, 10],
        "z": [[0.25, 0.25], [0.5, 1.0]],
    }
    at = store.histogram_at("r1", 7)
    assert at is not None and at["step"] == 0
    fc1 = at["layers"][0]
    assert (fc1["name"], fc1["lo"], fc1["hi"], fc1["counts"]) == ("fc1", -2.0, 2.0, [1, 2, 3, 4])
    assert fc1["mean"] == 0.1 and fc1["std"] == 1.0 and fc1["grad_norm"] is None
    assert store.histogram_at("r1", 10)["step"] == 10
    assert store.histogram_at("r1", 99999)["step"] == 10
    assert store.probe_steps("r1") == [0, 10]

    # act1: [0,4] in 4 bins -> onto 2 bins over [0,4]: [8+0, 0+2]
    hist = store.histograms("r1", "act1", bins=2)
    assert hist == {
        "layer": "act1",
        "steps": [0, 10],
        "edges": [0.0, 2.0, 4.0],
        "z": [[8.0, 2.0], [8.0, 2.0]],
    }
    (alert,) = store.events("r1", kind="alert")
    assert (alert["seq"], alert["step"], alert["data"]) == (4, 10, {"msg": "dead"})

    run = store.run("r1")
    assert run is not None
    assert run["last_step"] == 10 and run["first_step"] == 0
    assert run["last"] == {"loss": 0.1, "val_loss": None, "acc": None, "val_acc": None}
    assert run["layers"] == LAYERS
    assert run["series_names"] == ["loss", "lr"]
    assert run["status"] == "running" and run["config"] == {"lr": 0.1}
    assert [f["seq"] for f in store.frames_after("r1", 1)] == [2, 3, 4]
    assert store.frames_after("r1", 0, limit=1) == [metrics(1, rows)]


async def test_duplicate_seq_is_a_no_op(store: Store) -> None:
    await store.hello(hello())
    await store.append("r1", [metrics(1, [(0, {"loss": 1.0})])])
    # A resend with different content must not overwrite what was acked.
    assert await store.append("r1", [metrics(1, [(0, {"loss": 9.0})])]) == 1
    assert await store.append("r1", [event(2, 0, "log", {}), event(2, 0, "log", {})]) == 2
    assert store.series("r1", ["loss"])["loss"]["values"] == [1.0]
    assert len(store.events("r1", kind="log")) == 1
    assert len(store.frames_after("r1", 0)) == 2


async def test_acked_seq_is_highest_contiguous(store: Store) -> None:
    await store.hello(hello())
    assert await store.append("r1", [event(1, 0, "log", {}), event(2, 0, "log", {})]) == 2
    assert await store.append("r1", [event(4, 0, "log", {})]) == 2
    assert store.acked_seq("r1") == 2
    assert await store.append("r1", [event(3, 0, "log", {})]) == 4
    assert store.acked_seq("r1") == 4
    assert store.acked_seq("never-seen") == 0


async def test_append_resolves_only_after_commit(store: Store, tmp_path: Path) -> None:
    await store.hello(hello())
    results = await asyncio.gather(
        *(store.append("r1", [metrics(seq, [(seq, {"loss": float(seq)})])]) for seq in range(1, 51))
    )
    assert max(results) == 50
    with fresh(tmp_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 50
        assert conn.execute("SELECT acked_seq FROM runs").fetchone()[0] == 50
    for seq in (51, 52):
        acked = await store.append("r1", [metrics(seq, [(seq, {"loss": 1.0})])])
        with fresh(tmp_path) as conn:
            stored = conn.execute("SELECT MAX(seq) FROM frames").fetchone()[0]
        assert acked == seq == stored


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", commit_interval_s=0.2)
    await store.open()
    try:
        await store.hello(hello())
        before = store.commits
        await asyncio.gather(*(store.append("r1", [event(s, 0, "log", {})]) for s in range(1, 101)))
        assert store.acked_seq("r1") == 100
        assert store.commits - before <= 3
    finally:
        await store.close()


def wide_probe(seq: int, step: int, layers: int, shift: float) -> tuple[dict[str, Any], str]:
    """A validated probe frame of many layers and its wire text."""
    text = json.dumps(
        {
            "type": "probe",
            "v": 1,
            "seq": seq,
            "step": step,
            "layers": [
                {
                    "name": f"l{i}",
                    **{s: shift + i + k / 16 for k, s in enumerate(wire.PROBE_STATS)},
                    "hist": None
                    if i % 5 == 0
                    else {
                        "lo": -1.0 - i,
                        "hi": shift,
                        "counts": [i, seq, 2**16 + step][: 1 + i % 3],
                    },
                }
                for i in range(layers)
            ],
        }
    )
    return wire.parse_trainer_frame(text), text


async def test_one_big_batch_stores_what_frames_one_at_a_time_store(tmp_path: Path) -> None:
    """The writer inserts a batch's rows many per statement: a batch of more rows than one
    statement holds, with a resend of a stored frame, a seq twice in the batch and a
    step probed again, reads back exactly as the same frames appended one by one."""
    early = [wide_probe(1, 0, 70, 0.0), wide_probe(2, 10, 70, 0.5)]
    batch = [
        early[1],  # stored already: acked again, stored once
        *(wide_probe(seq, 10 * seq, 70, seq / 4) for seq in range(3, 9)),
        wide_probe(9, 30, 70, 9.0),  # step 30 again (seq 3 had it): the later frame wins
        wide_probe(4, 999, 70, 4.0),  # seq 4 twice in one batch: the first one counts
    ]
    stores = []
    for name in ("batched", "single"):
        store = Store(tmp_path / name, commit_interval_s=0.005)
        await store.open()
        stores.append(store)
        await store.hello(hello())
        assert await store.append("r1", [f for f, _ in early], validated=True) == 2
    batched, single = stores
    try:
        assert await batched.append("r1", [f for f, _ in batch], validated=True) == 9
        for frame, _text in batch:
            await single.append("r1", [frame])
        assert single.acked_seq("r1") == 9
        for store in stores:
            assert store.probe_steps("r1") == [0, 10, 30, 40, 50, 60, 70, 80]
            assert [f["seq"] for f in store.frames_after("r1", 0)] == list(range(1, 10))
        assert batched.frames_after("r1", 0) == single.frames_after("r1", 0)
        for layer in ("l0", "l1", "l2", "l69"):
            stats = list(wire.PROBE_STATS)
            assert batched.probe_series("r1", layer, stats) == single.probe_series(
                "r1", layer, stats
            )
            assert batched.histograms("r1", layer) == single.histograms("r1", layer)
        for step in (0, 30, 80):
            assert batched.histogram_at("r1", step) == single.histogram_at("r1", step)
        at_30 = batched.histogram_at("r1", 30)
        assert at_30 is not None
        layers = {layer["name"]: layer for layer in at_30["layers"]}
        assert layers["l1"]["mean"] == 9.0 + 1 and layers["l2"]["counts"] == [2, 9, 2**16 + 30]
        assert batched.probe_matrix("r1", "std", None, None, 300) == single.probe_matrix(
            "r1", "std", None, None, 300
        )
    finally:
        for store in stores:
            await store.close()


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    first = Store(tmp_path / "data", commit_interval_s=0.005)
    await first.open()
    await first.hello(hello())
    await first.append("r1", [metrics(1, [(0, {"loss": 2.0}), (1, {"loss": 1.0})]), probe(2, 1)])
    await first.append("r1", [event(4, 1, "log", {})])
    row, _ = await first.add_command(
        "r1", {"id": "c1", "name": "pause", "args": {}, "source": "user"}, origin="api 127.0.0.1"
    )
    await first.close()

    second = Store(tmp_path / "data", commit_interval_s=0.005)
    await second.open()
    try:
        assert second.acked_seq("r1") == 2
        assert second.series("r1", ["loss"])["loss"] == {"steps": [0, 1], "values": [2.0, 1.0]}
        assert second.probe_steps("r1") == [1]
        assert second.commands("r1") == [row]
        # A trainer resuming after the restart: hello returns the preserved ack, the
        # gap-filling frame then advances it past the frame stored before the restart.
        assert await second.hello(hello()) == 2
        assert await second.append("r1", [event(3, 1, "log", {})]) == 4
        row2, dup = await second.add_command(
            "r1", {"id": "c2", "name": "resume", "args": {}, "source": "user"}, origin="api"
        )
        assert (row2["cmd_seq"], dup) == (2, False)
    finally:
        await second.close()


async def test_database_of_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    await store.close()
    with fresh(tmp_path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(SchemaError, match="version 99 was written by a newer layerscope"):
        await Store(tmp_path / "data").open()
    with closing(fresh(tmp_path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(99,)]
    assert not list((tmp_path / "data").glob("*.bak-v*"))


async def test_another_programs_database_is_refused_and_left_byte_for_byte(
    tmp_path: Path,
) -> None:
    """A SQLite file named layerscope.db with tables but no schema_version (another
    program's) is refused by a Store opened directly (without the CLI's check), naming its
    tables, and not written to: no layerscope tables, no switch to WAL (which rewrites the
    header). The store lets go of the data dir, and an empty database is still taken."""
    data = tmp_path / "data"
    data.mkdir()
    db = data / DB_NAME
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes (body) VALUES ('mine')")
        conn.commit()
    before = db.read_bytes()
    with pytest.raises(SchemaError, match=r"not a layerscope one \(its tables: notes\).*untouched"):
        await Store(data).open()
    assert db.read_bytes() == before
    assert not db.with_name(f"{DB_NAME}-wal").exists()
    db.unlink()
    with closing(sqlite3.connect(db)):
        pass  # an empty file: a new database
    store = Store(data)
    await store.open()  # the failed open released the data dir's lock
    try:
        await store.hello(hello())
        assert store.run("r1") is not None
    finally:
        await store.close()


# What each schema version added since version 1, oldest first, as the statement that
# takes it away: running them and setting the version back gives the layout that
# version's layerscope wrote.
ADDED_SINCE_V1 = [
    'ALTER TABLE probes DROP COLUMN "unit_spread"',
    'ALTER TABLE runs DROP COLUMN "instance"',
    "DROP TABLE deleting",
]


def as_version_1(db: Path, keep: int = 0) -> None:
    """Turn a database this version wrote into a version-1 one (``keep``: leave the newest
    ``keep`` additions in place; one that is a column makes a database whose upgrade fails
    at that step)."""
    with closing(sqlite3.connect(db)) as conn:
        for undo in ADDED_SINCE_V1[: len(ADDED_SINCE_V1) - keep]:
            conn.execute(undo)
        conn.execute("UPDATE schema_version SET version = 1")
        conn.commit()


def layout(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's columns (name, type, not null, default, primary key), in order."""
    with closing(sqlite3.connect(db)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [r[1:] for r in conn.execute(f"PRAGMA table_info({t})")] for t in sorted(tables)}


async def test_a_database_of_an_older_schema_is_copied_then_upgraded_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A data dir of the release before unit_spread (schema 1) opens: the database is
    copied to layerscope.db.bak-v1 (the log says so), then upgraded; what it held reads as
    before and new frames store every field."""
    first = Store(tmp_path / "data", commit_interval_s=0.005)
    await first.open()
    await first.hello(hello())
    await first.append("r1", [metrics(1, [(0, {"loss": 2.0}), (1, {"loss": 1.0})]), probe(2, 1)])
    await first.close()
    db = tmp_path / "data" / DB_NAME
    as_version_1(db)
    new_layout = tmp_path / "new"
    made = Store(new_layout)
    await made.open()
    await made.close()

    with caplog.at_level(logging.WARNING):
        second = Store(tmp_path / "data", commit_interval_s=0.005)
        await second.open()
    try:
        copy = db.with_name(f"{DB_NAME}.bak-v1")
        assert f"from schema version 1 to {SCHEMA_VERSION}" in caplog.text
        assert f"first copied to {copy}" in caplog.text
        with closing(sqlite3.connect(copy)) as conn:  # the database as it was
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
            assert conn.execute("SELECT COUNT(*) FROM frames").fetchone() == (2,)
            assert "unit_spread" not in [r[1] for r in conn.execute("PRAGMA table_info(probes)")]
        assert layout(db) == layout(new_layout / DB_NAME)
        assert second.acked_seq("r1") == 2
        assert second.series("r1", ["loss"])["loss"] == {"steps": [0, 1], "values": [2.0, 1.0]}
        spread = wire.validate_probe(
            {"seq": 3, "step": 2, "layers": [{"name": "fc1", "mean": 0.5, "unit_spread": 0.25}]}
        )
        assert await second.append("r1", [spread]) == 3
        got = second.probe_series("r1", "fc1", ["mean", "unit_spread"])
        assert (got["steps"], got["mean"], got["unit_spread"]) == ([1, 2], [0.1, 0.5], [None, 0.25])
    finally:
        await second.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = Store(tmp_path / "data")
        await third.open()  # already current: nothing to copy or upgrade
        await third.close()
    assert "upgraded" not in caplog.text
    assert sorted(p.name for p in db.parent.glob("*.bak-*")) == [copy.name]


async def test_an_upgrade_that_fails_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    """The upgrade is one transaction: a step that fails undoes the steps before it, and
    the server refuses to start, naming the error and the copy."""
    store = Store(tmp_path / "data")
    await store.open()
    await store.hello(hello())
    await store.close()
    db = tmp_path / "data" / DB_NAME
    as_version_1(db, keep=2)  # says version 1 but holds runs.instance (step 2's) already
    before = layout(db)
    with pytest.raises(SchemaError, match=r"failed \(duplicate column name.*it is unchanged"):
        await Store(tmp_path / "data").open()
    assert layout(db) == before  # the steps before the one that failed are undone too
    assert "unit_spread" not in [column[0] for column in before["probes"]]
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        assert conn.execute("SELECT id FROM runs").fetchall() == [("r1",)]


async def test_a_start_tried_again_after_a_failed_upgrade_makes_no_second_copy(
    tmp_path: Path,
) -> None:
    """Each start on a database needing an upgrade copied it first, to a new name when
    the old one was taken: every failed start (an upgrade that fails, a start refused
    after the copy) left one more full copy until the disk filled. One copy per version
    and content now: a retry on the same database keeps the copy it has; a database that
    changed meanwhile (an older layerscope went on writing to it) gets a copy of its own."""
    store = Store(tmp_path / "data")
    await store.open()
    await store.hello(hello())
    await store.close()
    db = tmp_path / "data" / DB_NAME
    as_version_1(db, keep=2)  # an upgrade that fails
    for _attempt in range(2):
        with pytest.raises(SchemaError, match=r"failed .*a copy is at .*bak-v1\)"):
            await Store(tmp_path / "data").open()
    assert sorted(p.name for p in db.parent.glob("*.bak*")) == [f"{DB_NAME}.bak-v1"]
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE runs SET name = 'renamed'")
        conn.commit()
    for _attempt in range(2):
        with pytest.raises(SchemaError, match=r"a copy is at .*bak-v1-2\)"):
            await Store(tmp_path / "data").open()
    copies = sorted(p.name for p in db.parent.glob("*.bak*"))
    assert copies == [f"{DB_NAME}.bak-v1", f"{DB_NAME}.bak-v1-2"]
    for name, held in zip(copies, ["r1 name", "renamed"], strict=True):
        with closing(sqlite3.connect(db.with_name(name))) as conn:
            assert conn.execute("SELECT name FROM runs").fetchall() == [(held,)]


async def test_a_data_dir_is_open_in_one_store_at_a_time(tmp_path: Path) -> None:
    """The lock on the data dir is held from open to close (a second server on it is
    refused, not let in to take the first's runs for a dead server's); a store that fails
    to open lets go of it."""
    first = Store(tmp_path / "data", commit_interval_s=0.005)
    await first.open()
    second = Store(tmp_path / "data")
    try:
        with pytest.raises(
            DataDirBusy,
            match=rf"data dir .*data is in use by another layerscope server \(pid {os.getpid()}\)",
        ):
            await second.open()
        await first.hello(hello())  # the first goes on
        assert await first.append("r1", [metrics(1, [(0, {"loss": 1.0})])]) == 1
    finally:
        await first.close()
    await second.open()
    await second.close()
    with closing(fresh(tmp_path)) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
        conn.commit()
    with pytest.raises(SchemaError):
        await Store(tmp_path / "data").open()
    with closing(fresh(tmp_path)) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.commit()
    third = Store(tmp_path / "data")
    await third.open()
    await third.close()


async def test_long_series_is_downsampled_keeping_spike_first_and_last(store: Store) -> None:
    await store.hello(hello())
    n = 30_000
    values: list[float | None] = [1.0 + (s % 7) * 0.01 for s in range(n)]
    values[14_321] = 1e6
    values[27_777] = -1e6
    for seq, lo in enumerate(range(0, n, wire.MAX_ROWS), start=1):
        await store.append(
            "r1", [metrics(seq, [(s, {"loss": values[s]}) for s in range(lo, lo + wire.MAX_ROWS)])]
        )
    for max_points in (2, 3, 10, 100, 1500, 5000):
        got = store.series("r1", ["loss"], max_points=max_points)["loss"]
        assert len(got["steps"]) <= max_points
        assert got["steps"] == sorted(set(got["steps"]))
        assert got["steps"][0] == 0 and got["steps"][-1] == n - 1
        assert got["values"] == [values[s] for s in got["steps"]]
        if max_points >= 10:
            assert 14_321 in got["steps"] and 27_777 in got["steps"]
    assert len(store.series("r1", ["loss"])["loss"]["steps"]) > 1400
    # A zoomed window cuts through blocks: still first/last of the window and the spike.
    got = store.series("r1", ["loss"], start=10_003, end=20_001, max_points=100)["loss"]
    assert got["steps"][0] == 10_003 and got["steps"][-1] == 20_001 and 14_321 in got["steps"]
    assert len(got["steps"]) <= 100


async def test_relogged_steps_replace_values_and_their_extremes(store: Store) -> None:
    await store.hello(hello())
    await store.append(
        "r1", [metrics(1, [(s, {"loss": 5.0 if s == 3000 else 1.0}) for s in range(6000)])]
    )
    # The trainer resumed from a checkpoint at step 2000 and logs steps 2000.. again.
    await store.append("r1", [metrics(2, [(s, {"loss": 2.0}) for s in range(2000, 4000)])])
    got = store.series("r1", ["loss"], max_points=100)["loss"]
    assert 5.0 not in got["values"] and max(v for v in got["values"] if v is not None) == 2.0
    assert store.run("r1")["last"]["loss"] == 1.0


async def test_nonfinite_values_are_stored_as_null(store: Store, tmp_path: Path) -> None:
    await store.hello(hello())
    frame = {
        "type": "metrics",
        "seq": 1,
        "rows": [
            {"step": 0, "time_s": 0.0, "values": {"loss": float("nan")}},
            {"step": 1, "time_s": float("inf"), "values": {"loss": float("inf")}},
            {"step": 2, "time_s": 0.0, "values": {"loss": 0.5}},
        ],
    }
    await store.append("r1", [frame])
    assert store.series("r1", ["loss"])["loss"]["values"] == [None, None, 0.5]
    with fresh(tmp_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM scalars WHERE value IS NULL").fetchone()[0] == 2
    lines = list(store.export_lines("r1"))
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


async def test_a_run_gone_nan_downsamples_to_nulls_not_to_nothing(store: Store) -> None:
    await store.hello(hello())
    rows = [(s, {"loss": 1.0 if s < 20_000 else None}) for s in range(40_000)]
    await store.append("r1", [metrics(1, rows[:10_000]), metrics(2, rows[10_000:20_000])])
    await store.append("r1", [metrics(3, rows[20_000:30_000]), metrics(4, rows[30_000:])])
    got = store.series("r1", ["loss"], max_points=200)["loss"]
    assert len(got["steps"]) <= 200
    tail = [v for s, v in zip(got["steps"], got["values"], strict=True) if s >= 20_000]
    assert len(tail) >= 45 and set(tail) == {None}  # one per all-NaN bucket, ~half of 99


async def test_values_whose_block_totals_overflow_both_ways_are_stored(store: Store) -> None:
    """1e308 twice then -1e308 twice: a block's running total is +inf, then -inf after
    the next frame; their sum (NaN) must not fail the batch (SQLite stores NaN as NULL in
    a NOT NULL column): every frame is stored."""
    await store.hello(hello())
    up = [(s, {"loss": 1e308}) for s in range(2)]
    down = [(s, {"loss": -1e308}) for s in range(2, 4)]
    assert await store.append("r1", [metrics(1, up)]) == 1
    assert await store.append("r1", [metrics(2, down)]) == 2
    assert store.series("r1", ["loss"])["loss"]["values"] == [1e308, 1e308, -1e308, -1e308]
    assert await store.append("r1", [metrics(3, [(4, {"loss": 1.0})])]) == 3


def test_status_and_command_result_fields_are_checked_for_the_columns_they_fill() -> None:
    """A status reason or a command_result id/cmd_seq/applied_at_step of the wrong type
    would be refused by the store's columns, failing every resend of its batch forever:
    the wire refuses it first, with the field named."""
    for kind, data, field in (
        ("status", {"status": "paused", "reason": ["a"]}, "reason must be str or null"),
        ("command_result", {"id": ["x"], "ok": True}, "id must be str or null"),
        ("command_result", {"cmd_seq": {"a": 1}}, "cmd_seq must be int or null"),
        ("command_result", {"applied_at_step": 2**63}, "applied_at_step must be from 0"),
        ("command_result", {"ok": 1}, "ok must be bool or null"),
    ):
        with pytest.raises(wire.WireError, match=f"{kind} event: data.{field}"):
            event(2, 1, kind, data)
    ok = {"id": "c1", "cmd_seq": 3, "name": "pause", "ok": True, "applied_at_step": 7, "state": {}}
    assert event(2, 1, "command_result", ok)["data"] == ok
    assert event(2, 1, "status", {"status": "failed", "reason": None})["data"]["reason"] is None


def test_a_hello_whose_run_id_is_not_one_url_segment_or_whose_units_overflow_is_refused() -> None:
    """A run id with '/' was stored and listed but no /api/runs/<id> route reached it (it
    could not be viewed, exported or deleted); units past SQLite's integers failed the
    hello's write on every retry. The wire refuses both, as watch() does the run id."""
    for run_id in ("team/exp1", "a\\b", "..", ".", "nul\0"):
        with pytest.raises(wire.WireError, match="'run_id' .* must be a plain name"):
            hello(run_id)
    assert hello("team.exp-1")["run_id"] == "team.exp-1"
    with pytest.raises(wire.WireError, match=r"layers\[0\]\.units must be an integer from 0"):
        hello(layers=[{"name": "fc", "kind": "Linear", "units": 2**63}])


async def test_command_idempotency_and_cmd_seq(store: Store) -> None:
    await store.hello(hello())
    await store.hello(hello("r2"))
    cmd = wire.validate_command({"id": "abc", "name": "set_lr_scale", "args": {"value": 0.5}})
    row, dup = await store.add_command("r1", cmd, origin="viewer 127.0.0.1:5555")
    assert dup is False
    assert row["cmd_seq"] == 1 and row["status"] == "pending" and row["args"] == {"value": 0.5}
    again, dup = await store.add_command("r1", cmd, origin="api")
    assert dup is True and again == row
    second, _ = await store.add_command(
        "r1", wire.validate_command({"name": "pause"}), origin="rule"
    )
    other, _ = await store.add_command(
        "r2", wire.validate_command({"name": "pause"}), origin="rule"
    )
    assert (second["cmd_seq"], other["cmd_seq"]) == (2, 1)
    assert [c["id"] for c in store.commands("r1")] == ["abc", second["id"]]
    assert [c["id"] for c in store.commands("r1", after_cmd_seq=1)] == [second["id"]]
    logged = store.events("r1", kind="command")
    assert [e["data"]["id"] for e in logged] == ["abc", second["id"]]
    assert logged[0]["origin"] == "server" and logged[0]["seq"] is None


async def test_command_result_event_settles_command_and_control(store: Store) -> None:
    await store.hello(hello())
    row, _ = await store.add_command(
        "r1", {"id": "c1", "name": "pause", "args": {}, "source": "user"}, origin="api"
    )
    state = {
        "paused": True,
        "lr_scale": 1.0,
        "weight_decay_enabled": True,
        "frozen": [],
        "stopping": False,
    }
    await store.append(
        "r1",
        [
            event(
                1,
                42,
                "command_result",
                {
                    "id": "c1",
                    "cmd_seq": 1,
                    "name": "pause",
                    "ok": True,
                    "applied_at_step": 42,
                    "state": state,
                },
            )
        ],
    )
    (cmd,) = store.commands("r1")
    assert (cmd["status"], cmd["applied_at_step"], cmd["state"]) == ("applied", 42, state)
    assert store.run("r1")["control"] == state
    await store.add_command(
        "r1", {"id": "c2", "name": "set_frozen", "args": {}, "source": "user"}, origin="api"
    )
    await store.append(
        "r1",
        [
            event(
                2,
                43,
                "command_result",
                {
                    "id": "c2",
                    "cmd_seq": 2,
                    "name": "set_frozen",
                    "ok": False,
                    "applied_at_step": None,
                    "state": state,
                    "error": "no layer x",
                },
            )
        ],
    )
    failed = store.commands("r1")[1]
    assert (failed["status"], failed["error"]) == ("failed", "no layer x")


async def test_status_events_and_set_status(store: Store) -> None:
    await store.hello(hello())
    await store.append("r1", [event(1, 5, "status", {"status": "paused"})])
    assert store.run("r1")["status"] == "paused"
    assert store.runs_with_status({"paused"}) == ["r1"]
    await store.set_status("r1", "lost", reason="trainer silent for 15 s")
    run = store.run("r1")
    assert run is not None and (run["status"], run["status_reason"]) == (
        "lost",
        "trainer silent for 15 s",
    )
    last = store.events("r1", limit=1)[0]
    assert (last["kind"], last["origin"], last["data"]["status"]) == ("status", "server", "lost")
    # A trainer reconnecting after being marked lost is back as it was before: paused (a
    # paused trainer stays paused while its link is down), said so in the log ...
    await store.hello(hello())
    assert store.run("r1")["status"] == "paused"
    last = store.events("r1", limit=1)[0]
    assert (last["origin"], last["data"]) == (
        "server",
        {"status": "paused", "reason": "trainer reconnected"},
    )
    await store.append("r1", [event(2, 6, "status", {"status": "running"})])
    await store.set_status("r1", "lost", reason="trainer silent for 15 s")
    await store.hello(hello())  # ... or running, when it was running
    assert store.run("r1")["status"] == "running"
    # ... but a finished run stays finished.
    await store.append("r1", [event(3, 6, "status", {"status": "finished"})])
    await store.hello(hello())
    assert store.run("r1")["status"] == "finished"
    # ... and so does a failed one (a second `layerscope sync` of its spool sends its hello
    # again, and no trainer is there to mark it lost afterwards)
    await store.set_status("r1", "failed", reason="trainer process exited with code 1")
    await store.hello(hello())
    run = store.run("r1")
    assert run is not None and (run["status"], run["status_reason"]) == (
        "failed",
        "trainer process exited with code 1",
    )
    with pytest.raises(StoreError, match="unknown status 'weird'"):
        await store.set_status("r1", "weird")


async def test_create_run_then_hello_and_the_run_list(store: Store) -> None:
    await store.create_run("launched", "mlp", {"model": "mlp"}, launched=True)
    run = store.run("launched")
    assert run is not None and (run["status"], run["launched"]) == ("starting", True)
    with pytest.raises(StoreError, match="already exists"):
        await store.create_run("launched", "again", {})
    assert await store.hello(hello("launched")) == 0
    await store.hello(hello("newer"))
    await store.append("newer", [metrics(1, [(s, {"loss": 10.0 - s}) for s in range(10)])])
    listed = store.runs()
    assert [r["id"] for r in listed] == ["newer", "launched"]
    assert listed[0]["sparkline"] == [10.0 - s for s in range(10)]
    assert listed[1]["status"] == "running" and listed[1]["sparkline"] == []
    assert len(store.runs()[0]["sparkline"]) <= 50


async def test_a_run_keeps_the_first_trainer_instance_and_refuses_another(
    store: Store, tmp_path: Path
) -> None:
    """A hello's instance names the trainer process: another process under a stored run's
    id is refused (RunIdTaken, nothing of its hello stored); the same one resumes; a hello
    without one (an older trainer or spool) for a run that has one is another process too;
    a run without one (older trainers and databases) takes an older trainer's hello, and
    a newer one's until it has ended; a run gets the first instance a hello brings (a
    launched run's trainer, say)."""
    await store.hello(hello("r1", instance="a1"))
    await store.append("r1", [metrics(1, [(0, {"loss": 1.0})])])
    with pytest.raises(RunIdTaken, match="run id r1 already holds a run recorded by another"):
        await store.hello(hello("r1", instance="b2", name="second", config={"lr": 9.0}))
    with pytest.raises(RunIdTaken):  # an old spool synced under the id: was spliced in
        await store.hello(hello("r1", name="old", config={"lr": 9.0}))
    run = store.run("r1")
    assert run is not None and (run["name"], run["config"]) == ("r1 name", {"lr": 0.1})
    assert await store.hello(hello("r1", instance="a1")) == 1

    await store.hello(hello("old"))  # an older trainer's run: no instance
    await store.append("old", [metrics(1, [(0, {"loss": 1.0})])])
    assert await store.hello(hello("old")) == 1  # that trainer reconnecting
    await store.append("old", [event(2, 1, "status", {"status": "finished"})])
    with pytest.raises(RunIdTaken):  # a newer process reusing its id once it has ended
        await store.hello(hello("old", instance="e5"))
    assert await store.hello(hello("old")) == 2  # the old trainer's own spool, synced again

    await store.create_run("launched", "mlp", {"model": "mlp"}, launched=True)
    assert await store.hello(hello("launched")) == 0  # no instance: adopts none
    assert await store.hello(hello("launched", instance="c3")) == 0
    with pytest.raises(RunIdTaken):
        await store.hello(hello("launched", instance="d4"))
    with closing(fresh(tmp_path)) as conn:
        stored = dict(conn.execute("SELECT id, instance FROM runs").fetchall())
    assert stored == {"r1": "a1", "launched": "c3", "old": None}


async def test_bad_input_raises_clearly_and_loses_nothing(store: Store) -> None:
    await store.hello(hello())
    await store.append("r1", [metrics(1, [(0, {"loss": 1.0})])])
    with pytest.raises(RunNotFound, match="run 'ghost' not found"):
        await store.append("ghost", [metrics(2, [(0, {"loss": 1.0})])])
    # One bad frame in a batch: the batch is refused whole, concurrent writes still land.
    bad = [metrics(2, [(1, {"loss": 2.0})]), {"type": "probe", "seq": 3, "step": 1, "layers": "x"}]
    results = await asyncio.gather(
        store.append("r1", bad),
        store.append("r1", [event(2, 1, "log", {})]),
        return_exceptions=True,
    )
    assert isinstance(results[0], StoreError) and "'layers' must be a list" in str(results[0])
    assert results[1] == 2
    assert store.series("r1", ["loss"])["loss"]["values"] == [1.0]
    with pytest.raises(StoreError, match="seq"):
        await store.append("r1", [{"type": "metrics", "rows": []}])
    with pytest.raises(StoreError, match="heartbeat"):
        await store.append("r1", [{"type": "heartbeat", "seq": 9, "step": 1}])
    with pytest.raises(RunNotFound):
        store.series("ghost", None)
    with pytest.raises(RunNotFound):
        await store.add_command("ghost", wire.validate_command({"name": "pause"}), origin="api")
    assert store.acked_seq("r1") == 2
    assert await store.append("r1", [event(3, 1, "log", {})]) == 3


async def test_delete_run_removes_only_that_run(store: Store, tmp_path: Path) -> None:
    await store.hello(hello("gone"))
    await store.hello(hello("kept"))
    for run_id in ("gone", "kept"):
        await store.append(run_id, [metrics(1, [(0, {"loss": 1.0})]), probe(2, 0)])
    assert await store.delete_run("gone") is True
    assert await store.delete_run("gone") is False
    assert store.run("gone") is None and [r["id"] for r in store.runs()] == ["kept"]
    assert store.series("kept", ["loss"])["loss"]["values"] == [1.0]
    await purged(store)
    with fresh(tmp_path) as conn:
        for table in ("scalars", "scalar_blocks", "probes", "frames", "series", "layers"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] > 0
        assert conn.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 2
    # The id can be used again from scratch.
    assert await store.hello(hello("gone")) == 0


BIG_STEPS = 40_000  # x 3 series: 120k scalar rows, purged over many slices


@pytest.fixture
def short_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Purge slices of one DELETE statement each (LAYERSCOPE_PURGE_SLICE_S=0, read by the
    writer process): how many rows a 20 ms slice removes depends on the machine's speed (a
    fast one purged the whole big run between the delete and the next write); a
    statement's rows do not. Ask for it before the store, which starts the writer."""
    monkeypatch.setenv("LAYERSCOPE_PURGE_SLICE_S", "0")


async def big_run(store: Store, run_id: str) -> None:
    """A run with BIG_STEPS steps of three series and a probe frame every 100 steps."""
    await store.hello(hello(run_id))
    rows = [(s, {"loss": 1.0 / (s + 1), "acc": 0.5, "lr": 0.1}) for s in range(BIG_STEPS)]
    frames = [
        metrics(n + 1, rows[lo : lo + 10_000]) for n, lo in enumerate(range(0, BIG_STEPS, 10_000))
    ]
    frames += [probe(len(frames) + 1 + n, s) for n, s in enumerate(range(0, BIG_STEPS, 100))]
    await store.append(run_id, frames)


def rows_of(conn: sqlite3.Connection) -> dict[str, int]:
    tables = ("scalars", "scalar_blocks", "probes", "probe_hists", "probe_steps", "frames")
    tables += ("events", "commands", "series", "layers", "runs")
    return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}


async def test_a_big_run_is_gone_at_once_and_purged_while_other_runs_commit(
    short_slices: None, store: Store, tmp_path: Path
) -> None:
    """Deleting a run hides it in one small commit (no read finds it, no write reaches it,
    its id is free) and purges its rows in slices between other commits: another run's
    write commits while the purge is still going, not after it (one transaction of 120k
    rows held every other run's acks meanwhile)."""
    await store.hello(hello("kept"))
    await store.append("kept", [metrics(1, [(0, {"loss": 1.0})]), probe(2, 0)])
    with closing(fresh(tmp_path)) as conn:
        kept_only = rows_of(conn)
    await big_run(store, "big")
    await store.add_command("big", wire.validate_command({"name": "pause"}), origin="api")
    assert await store.delete_run("big") is True
    assert store.run("big") is None and [r["id"] for r in store.runs()] == ["kept"]
    with pytest.raises(RunNotFound):
        await store.append("big", [metrics(99, [(0, {"loss": 1.0})])])
    with pytest.raises(RunNotFound):
        await store.add_command("big", wire.validate_command({"name": "resume"}), origin="api")
    assert await store.append("kept", [metrics(3, [(1, {"loss": 0.5})])]) == 3
    assert store.deletions_pending() == 1, "the other run's write waited for the whole purge"
    # A new run under the id starts empty, and the purge of the old one leaves it alone.
    assert await store.hello(hello("big")) == 0
    await store.append("big", [metrics(1, [(0, {"loss": 7.0})])])
    await purged(store)
    assert store.series("big", ["loss"])["loss"] == {"steps": [0], "values": [7.0]}
    assert store.series("kept", ["loss"])["loss"] == {"steps": [0, 1], "values": [1.0, 0.5]}
    assert store.probe_steps("kept") == [0]
    with closing(fresh(tmp_path)) as conn:
        left = rows_of(conn)
    kept_and_new = {**kept_only, "scalars": 3, "scalar_blocks": left["scalar_blocks"]}
    kept_and_new.update(frames=4, series=2, layers=kept_only["layers"] * 2, runs=2)
    assert left == kept_and_new


async def test_a_purge_cut_short_by_a_restart_goes_on_at_the_next_start(
    tmp_path: Path, short_slices: None
) -> None:
    """A server stopped mid-purge leaves the deleted run hidden (never half there) and the
    next server's writer finishes the purge."""
    first = Store(tmp_path / "data", commit_interval_s=0.005)
    await first.open()
    await big_run(first, "big")
    await first.hello(hello("kept"))
    await first.append("kept", [metrics(1, [(0, {"loss": 1.0})])])
    assert await first.delete_run("big") is True
    await first.close()  # at once: most of its rows are still there
    with closing(fresh(tmp_path)) as conn:
        between = rows_of(conn)
        assert conn.execute("SELECT id FROM deleting").fetchall() == [("big",)]
    assert between["runs"] == 1 and between["scalars"] > 1
    second = Store(tmp_path / "data", commit_interval_s=0.005)
    await second.open()
    try:
        assert second.run("big") is None and [r["id"] for r in second.runs()] == ["kept"]
        await purged(second)
        with closing(fresh(tmp_path)) as conn:
            after = rows_of(conn)
        assert (after["scalars"], after["frames"], after["series"], after["runs"]) == (1, 1, 1, 1)
        assert (after["probes"], after["probe_hists"], after["probe_steps"]) == (0, 0, 0)
        assert second.series("kept", ["loss"])["loss"]["values"] == [1.0]
    finally:
        await second.close()


async def test_export_lines_and_snapshot(store: Store) -> None:
    await store.hello(hello())
    frames = [metrics(1, [(0, {"loss": 1.0})]), probe(2, 0), event(3, 0, "log", {"m": "hi"})]
    await store.append("r1", frames)
    lines = list(store.export_lines("r1"))
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    header, *body = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert header["type"] == "hello" and header["run_id"] == "r1" and header["layers"] == LAYERS
    assert header["run"]["status"] == "running"
    assert body == [{"v": 1, **f} for f in frames]
    with pytest.raises(RunNotFound):
        store.export_lines("ghost")

    snap = store.snapshot("r1")
    assert snap["type"] == "snapshot" and snap["last_seq"] == 3
    assert snap["series"] == {"loss": {"steps": [0], "values": [1.0]}}
    assert snap["probes"] == [frames[1]]
    assert [e["kind"] for e in snap["events"]] == ["log"]
    assert snap["run"]["id"] == "r1" and snap["commands"] == [] and snap["control"] is None


async def test_validated_frames_read_back_as_validated(store: Store) -> None:
    """Ingest appends frames it validated (validated=True): the writer stores their JSON
    without checking them again, and every read gives the validated frame (ints as
    floats, 1e999 as null, unknown keys gone); export stays strict JSON."""
    await store.hello(hello())
    texts = [
        '{"type":"probe","v":1,"seq":1,"step":4,"extra":1,"layers":[{"name":"fc1","mean":1,'
        '"std":1e999,"nonfinite":0,"hist":{"lo":-1,"hi":1,"counts":[1,2]}},'
        '{"name":"act1","hist":null,"note":"x"}]}',
        '{"type":"metrics","v":1,"seq":2,"rows":[{"step":5,"values":{"loss":2,"acc":1e999}}]}',
        '{"type":"event","v":1,"seq":3,"step":5,"kind":"log","data":{"m":1e999,"big":'
        + str(2**70)
        + "}}",
    ]
    frames = [wire.parse_trainer_frame(t) for t in texts]
    assert await store.append("r1", frames, validated=True) == 3
    back = store.frames_after("r1", 0)
    assert back == frames
    layer = back[0]["layers"][0]
    assert type(layer["mean"]) is float and layer["std"] is None and "extra" not in back[0]
    assert back[1]["rows"][0]["values"] == {"loss": 2.0, "acc": None}
    assert back[2]["data"] == {"m": None, "big": 2**70}  # past orjson's 64 bits: json's path
    lines = list(store.export_lines("r1"))[1:]
    assert [json.loads(line, parse_constant=pytest.fail) for line in lines] == [
        {"v": 1, **f} for f in frames
    ]
    assert store.snapshot("r1")["probes"] == [frames[0]]
    assert store.probe_series("r1", "fc1", ["mean", "std"])["mean"] == [1.0]


async def test_reads_stay_consistent_while_writing(store: Store) -> None:
    await store.hello(hello())

    async def writer() -> None:
        for seq in range(1, 41):
            await store.append(
                "r1",
                [
                    metrics(
                        seq,
                        [(s, {"loss": 1.0, "lr": 0.1}) for s in range(seq * 100, seq * 100 + 100)],
                    )
                ],
            )

    async def reader() -> None:
        for _ in range(40):
            got = await asyncio.to_thread(store.series, "r1", ["loss", "lr"])
            # Both series come from one read transaction: always the same steps.
            assert got["loss"]["steps"] == got["lr"]["steps"]
            await asyncio.sleep(0)

    await asyncio.gather(writer(), reader())
    assert store.acked_seq("r1") == 40


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.hello(hello())


def block_rule_oracle(
    points: dict[int, float | None], lo_b: int, hi_b: int, max_points: int
) -> dict[int, float | None]:
    """downsample's rule over blocks, from the raw points, the slow obvious way."""
    inside = {s: v for s, v in points.items() if lo_b <= s <= hi_b}
    lo, hi = min(inside), max(inside)
    buckets = (max_points - 2) // 2
    size = choose_level(lo, hi, buckets)
    assert size is not None
    nblocks = hi // size - lo // size + 1
    by_bucket: dict[int, list[int]] = {}
    for s in sorted(inside):
        by_bucket.setdefault((s // size - lo // size) * buckets // nblocks, []).append(s)
    kept = {lo: inside[lo], hi: inside[hi]}
    for steps in by_bucket.values():
        finite = [s for s in steps if inside[s] is not None]
        if not finite:
            kept[steps[0]] = None
            continue
        low = min(finite, key=lambda s: (inside[s], s))
        high = min(finite, key=lambda s: (-inside[s], s))  # type: ignore[operator]
        kept[low], kept[high] = inside[low], inside[high]
    return kept


async def test_long_series_reads_match_the_block_rule_oracle(store: Store) -> None:
    await store.hello(hello())
    rng = random.Random(5)
    steps = sorted(rng.sample(range(60_000), 20_000))
    points: dict[int, float | None] = {
        s: None if rng.random() < 0.03 else round(rng.gauss(0, 1), 1) for s in steps
    }
    batch = [(s, {"x": points[s]}) for s in steps]
    await store.append("r1", [metrics(i + 1, batch[i * 5000 : (i + 1) * 5000]) for i in range(4)])
    # re-log a stretch, as a trainer resumed from a checkpoint would
    for s in steps[7000:7400]:
        points[s] = 3.0 if s % 2 else -3.0
    await store.append("r1", [metrics(5, [(s, {"x": points[s]}) for s in steps[7000:7400]])])
    for lo_b, hi_b, max_points in [(0, 10**9, 1500), (0, 10**9, 60), (1234, 55_555, 300)]:
        got = store.series("r1", ["x"], lo_b, hi_b, max_points)["x"]
        want = block_rule_oracle(points, lo_b, hi_b, max_points)
        assert got == {"steps": sorted(want), "values": [want[s] for s in sorted(want)]}


async def test_frames_an_earlier_version_stored_as_wire_text_still_read(
    store: Store, tmp_path: Path
) -> None:
    """Before the writer became a process, ingest's frames were stored as b"W" + zlib of
    their wire text and validated again when read: such databases still read back."""
    await store.hello(hello())
    text = '{"type":"event","v":1,"seq":1,"step":2,"kind":"log","data":{"m":1e999,"n":3}}'
    frame = wire.parse_trainer_frame(text)
    assert await store.append("r1", [frame], validated=True) == 1
    with fresh(tmp_path) as conn:
        conn.execute(
            "UPDATE frames SET body = ? WHERE seq = 1", (b"W" + zlib.compress(text.encode()),)
        )
    assert store.frames_after("r1", 0) == [frame] and frame["data"] == {"m": None, "n": 3}


async def damaged_store(tmp_path: Path, check_delay_s: float) -> Store:
    """A store on a database with garbage over most of its frames' pages (its schema and
    runs pages intact: it opens), as reviewer's /tmp/h17c/t2_midcorrupt.sh did to a copy."""
    first = Store(tmp_path / "data", commit_interval_s=0.005)
    await first.open()
    await first.hello(hello())
    noise = random.Random(0)
    text = lambda: "".join(noise.choice("abcdefghij") for _ in range(3000))  # noqa: E731
    await first.append("r1", [event(s, s, "log", {"t": text()}) for s in range(1, 301)])
    await first.close()  # its last connection checkpoints the WAL into the file
    db = tmp_path / "data" / DB_NAME
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(size * 4 // 10)
        f.write(b"\xde\xad\xbe\xef" * (size // 8))
    store = Store(tmp_path / "data", commit_interval_s=0.005)
    store.check_delay_s = check_delay_s
    await store.open()
    return store


async def test_a_database_damaged_past_its_schema_is_found_and_gets_no_more_writes(
    tmp_path: Path,
) -> None:
    """Reviewer's /tmp/h17c/t2_midcorrupt.sh: a database whose schema pages read fine but
    whose middle is garbage (PRAGMA quick_check: malformed) was served as healthy and new
    runs were written into it. The background quick_check after open finds it: every
    write is refused from then on, saying why and what to do."""
    store = await damaged_store(tmp_path, check_delay_s=0.0)
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while store.checked is None:
            assert asyncio.get_running_loop().time() < deadline, "no check"
            await asyncio.sleep(0.02)
        problem = store.write_problem
        assert problem is not None and "layerscope.db is damaged (PRAGMA quick_check:" in problem
        assert "restore it from a backup or move it away" in problem
        with pytest.raises(StoreError, match="is damaged"):
            await store.hello(hello("new"))
        assert store.run("new") is None
    finally:
        await store.close()


async def test_a_read_that_meets_damage_refuses_writes_and_an_export_ends_in_an_error(
    tmp_path: Path,
) -> None:
    """Before its check has run (or between checks), a read that meets the damage marks the
    store damaged. An export cut short by it sent a clean-looking truncated file; its last
    line now says why, and it ends in ExportCutShort (the app cuts the transfer off)."""
    store = await damaged_store(tmp_path, check_delay_s=3600.0)
    told: list[tuple[str, dict[str, Any]]] = []
    store.listen(lambda run_id, event: told.append((run_id, event)))
    try:
        assert store.write_problem is None
        lines: list[str] = []
        with pytest.raises(ExportCutShort, match="export of run r1 cut short after seq"):
            lines.extend(store.export_lines("r1"))
        last = json.loads(lines[-1])
        assert last["type"] == "error" and "is damaged (a read: " in last["message"]
        assert store.write_problem is not None and "is damaged (a read: " in store.write_problem
        with pytest.raises(StoreError, match="is damaged"):
            await store.append("r1", [event(301, 301, "log", {})])
        await asyncio.sleep(0)  # the store event is handed on on the loop
        assert [(r, e["kind"], e["data"]["problem"]) for r, e in told] == [
            ("r1", "store", store.write_problem)
        ]
    finally:
        await store.close()
