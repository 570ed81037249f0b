"""schema — the SQLite layout of layerscope.db and how a connection to it is opened.

Owns: the DDL, the schema version check, and the pragmas every connection uses
(WAL, foreign keys off, busy timeout). Store is the only caller.

Never: reads or writes rows; never migrates a database silently (a version it does
not know is refused with a message naming both versions).

Layout: runs carry an integer key ``rk`` so the big tables (scalars, probes) do not
repeat a text run id per row; series and layers get integer ids the same way.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from layerscope.trainer import wire

SCHEMA_VERSION = 2  # 2: probes.unit_spread
DB_NAME = "layerscope.db"

DDL = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    rk INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT,
    launched INTEGER NOT NULL DEFAULT 0,
    device TEXT NOT NULL DEFAULT '',
    world_size INTEGER NOT NULL DEFAULT 1,
    control TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    first_step INTEGER,
    last_step INTEGER,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    max_seq INTEGER NOT NULL DEFAULT 0,
    cmd_seq INTEGER NOT NULL DEFAULT 0,
    last_values TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS series (
    sid INTEGER PRIMARY KEY,
    rk INTEGER NOT NULL,
    name TEXT NOT NULL,
    UNIQUE (rk, name)
);
-- The covering primary key makes a range read of one series an index walk.
CREATE TABLE IF NOT EXISTS scalars (
    sid INTEGER NOT NULL,
    step INTEGER NOT NULL,
    value REAL,
    time_s REAL,
    PRIMARY KEY (sid, step)
) WITHOUT ROWID;
-- Min/max summaries of aligned blocks of `level` steps (downsample.BLOCK_LEVELS),
-- kept by the writer, so a chart of a long series reads ~B rows, not every step.
CREATE TABLE IF NOT EXISTS scalar_blocks (
    sid INTEGER NOT NULL,
    level INTEGER NOT NULL,
    block INTEGER NOT NULL,
    n INTEGER NOT NULL,
    first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    min_step INTEGER,
    min_value REAL,
    max_step INTEGER,
    max_value REAL,
    null_step INTEGER,
    finite INTEGER NOT NULL,
    total REAL NOT NULL,
    PRIMARY KEY (sid, level, block)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layers (
    lid INTEGER PRIMARY KEY,
    rk INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'module',
    units INTEGER,
    ord INTEGER NOT NULL,
    UNIQUE (rk, name)
);
-- Stats clustered by (layer, step): one layer's stats over time are one contiguous
-- range. Histograms live apart, so a stats read never pages through blobs.
CREATE TABLE IF NOT EXISTS probes (
    lid INTEGER NOT NULL,
    step INTEGER NOT NULL,
    "mean" REAL, "std" REAL, "min" REAL, "max" REAL, "zero_frac" REAL, "nonfinite" REAL,
    "dead_ratio" REAL, "saturated_frac" REAL, "saturated_ratio" REAL, "grad_norm" REAL,
    "weight_norm" REAL, "update_ratio" REAL, "unit_spread" REAL,
    PRIMARY KEY (lid, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS probe_hists (
    lid INTEGER NOT NULL,
    step INTEGER NOT NULL,
    lo REAL,
    hi REAL,
    counts BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS probe_hists_by_layer ON probe_hists (lid, step);
CREATE TABLE IF NOT EXISTS probe_steps (
    rk INTEGER NOT NULL,
    step INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (rk, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS frames (
    rk INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS frames_by_seq ON frames (rk, seq);
CREATE TABLE IF NOT EXISTS events (
    eid INTEGER PRIMARY KEY,
    rk INTEGER NOT NULL,
    seq INTEGER,
    step INTEGER,
    kind TEXT NOT NULL,
    origin TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (rk, kind, eid);
CREATE TABLE IF NOT EXISTS commands (
    rk INTEGER NOT NULL,
    id TEXT NOT NULL,
    cmd_seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    source TEXT NOT NULL,
    origin TEXT NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    applied_at_step INTEGER,
    state TEXT,
    error TEXT,
    PRIMARY KEY (rk, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS commands_by_seq ON commands (rk, cmd_seq);
"""

PROBE_COLUMNS = wire.PROBE_STATS  # one REAL column per probe statistic, in wire order


class SchemaError(RuntimeError):
    """The database on disk is not one this version of layerscope can use."""


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit BEGIN/COMMIT).

    check_same_thread is off because Store closes every connection from the thread
    that calls close(); each connection is still used by one thread at a time.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before its frames are acked, so a trainer may
        # drop them from its spool. Group commit keeps this to ~10 fsyncs a second.
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def create_or_check(conn: sqlite3.Connection) -> None:
    """Create the tables on a new database; refuse a database of another version."""
    conn.executescript(DDL)
    rows = conn.execute("SELECT version FROM schema_version").fetchall()
    if not rows:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif rows[0][0] != SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {rows[0][0]} is not supported by this layerscope "
            f"(it uses version {SCHEMA_VERSION}); use a new --data-dir or a matching layerscope"
        )
