"""inserts.insert_many: a list of rows as a few multi-row statements stores exactly what
one INSERT per row stores, conflicts and upsert tails included."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from layerscope.server.inserts import insert_many

UPSERT = "ON CONFLICT (k) DO UPDATE SET n = n + excluded.n, v = excluded.v"


def table(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, n INTEGER, v TEXT)")
    return conn


def test_rows_of_every_batch_size_match_one_insert_per_row(tmp_path: Path) -> None:
    # 341 rows cross every statement size (256 + 64 + 16 + 4 + 1); keys repeat, so later
    # rows must win exactly as they do one at a time.
    rows = [(i % 200, i, f"v{i}") for i in range(341)]
    many, one = table(tmp_path / "many.db"), table(tmp_path / "one.db")
    insert_many(many, "INSERT OR REPLACE INTO t (k, n, v)", 3, rows)
    one.executemany("INSERT OR REPLACE INTO t (k, n, v) VALUES (?, ?, ?)", rows)
    got = many.execute("SELECT * FROM t ORDER BY k").fetchall()
    assert got == one.execute("SELECT * FROM t ORDER BY k").fetchall()
    assert len(got) == 200 and got[0] == (0, 200, "v200")


def test_an_upsert_tail_sees_earlier_rows_of_the_same_statement(tmp_path: Path) -> None:
    rows = [(1, 1, "a"), (2, 5, "b"), (1, 10, "c"), (1, 100, "d")]
    conn = table(tmp_path / "u.db")
    insert_many(conn, "INSERT INTO t (k, n, v)", 3, rows, UPSERT)
    assert conn.execute("SELECT * FROM t ORDER BY k").fetchall() == [(1, 111, "d"), (2, 5, "b")]


def test_no_rows_writes_nothing(tmp_path: Path) -> None:
    conn = table(tmp_path / "e.db")
    insert_many(conn, "INSERT INTO t (k, n, v)", 3, [])
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
