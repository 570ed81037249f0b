"""schema — the SQLite layout of layerscope.db and how a connection to it is opened.

Owns: the DDL, the schema version check, the forward migrations from each older
version (``MIGRATIONS``), and the pragmas every connection uses (WAL, foreign keys
off, busy timeout). Store is the only caller (its writer process runs ``open_schema``).

Never: reads or writes rows; never migrates a database silently (an older one is first
copied to ``<name>.bak-v<old>``, one copy per version and content (a retry after a
failed start reuses the identical copy), and the upgrade is reported for the log; the upgrade
is one transaction, so a failed one leaves the database as it was); never opens a
version newer than it knows (refused with a message naming both versions); never
writes to a database with tables but no ``schema_version`` (another program's: refused
before the connection switches it to WAL).

Layout: runs carry an integer key ``rk`` so the big tables (scalars, probes) do not
repeat a text run id per row; series and layers get integer ids the same way.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from layerscope.trainer import wire

SCHEMA_VERSION = 4  # 2: probes.unit_spread; 3: runs.instance; 4: the deleting table
DB_NAME = "layerscope.db"
BACKUP_COMPARE_CHUNK = 1 << 20
# A deleted run's rows not purged yet (purge.Purge): its runs row is gone, so nothing
# reads or writes them; the writer deletes them in slices and a restart goes on with it.
DELETING_DDL = (
    "CREATE TABLE IF NOT EXISTS deleting ("
    "rk INTEGER PRIMARY KEY, id TEXT NOT NULL, since REAL NOT NULL)"
)
# MIGRATIONS[v]: the statements that take a version-v database to version v + 1. Each
# only adds (a nullable column, a table, an index), so rows stored before read as they did.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ('ALTER TABLE probes ADD COLUMN "unit_spread" REAL',),
    2: ("ALTER TABLE runs ADD COLUMN instance TEXT",),
    3: (DELETING_DDL,),
}

DDL = (
    """
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
    last_values TEXT NOT NULL DEFAULT '{}',
    -- The trainer process whose hello first carried an instance (wire.py): a hello for
    -- this run from another process is refused.
    instance TEXT
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
    + DELETING_DDL
    + ";\n"
)

FOREIGN_TABLES_NAMED = 5  # how many of another program's tables a refusal names
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
        try:
            refuse_foreign(conn, path)  # before WAL, which rewrites the file's header
        except BaseException:
            conn.close()
            raise
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before its frames are acked, so a trainer may
        # drop them from its spool. Group commit keeps this to ~10 fsyncs a second.
        conn.execute("PRAGMA synchronous = FULL")
    return conn


def refuse_foreign(conn: sqlite3.Connection, path: Path) -> None:
    """SchemaError for a database with tables but no ``schema_version``: another program's
    file named layerscope.db. Only read: it is left byte for byte as it was (its journal
    mode too), also where a program opens a Store without ``data_lock.claim``'s check."""
    tables = sorted(
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    )
    if tables and "schema_version" not in tables:
        raise SchemaError(
            f"{path} is a SQLite database but not a layerscope one (its tables: "
            f"{', '.join(tables[:FOREIGN_TABLES_NAMED])}); layerscope left it untouched; "
            "move it away or give another --data-dir"
        )


def stored_version(conn: sqlite3.Connection) -> int | None:
    """The database's schema version; None for a new (empty) database."""
    known = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if known is None:
        return None
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return None if row is None else int(row[0])


def open_schema(conn: sqlite3.Connection, path: Path) -> str | None:
    """Create the tables on a new database, check an existing one's version and upgrade an
    older one in place. Returns what was done worth a line in the server's log (an
    upgrade: the version it was, where the copy is) or None; SchemaError for a database
    this layerscope cannot use (newer, unknown, or an upgrade that failed)."""
    version = stored_version(conn)
    note = None
    if version is None:
        conn.executescript(DDL)
        if stored_version(conn) is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        return None
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {version} was written by a newer layerscope (this one "
            f"knows versions up to {SCHEMA_VERSION}); use that layerscope or a new --data-dir"
        )
    if version < SCHEMA_VERSION:
        if any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
            raise SchemaError(
                f"database schema version {version} is not supported by this layerscope "
                f"(it uses version {SCHEMA_VERSION} and cannot upgrade from {version}); "
                "use a new --data-dir or a matching layerscope"
            )
        copy = backup(conn, path, version)
        migrate(conn, version, copy)
        note = (
            f"upgraded the database {path} from schema version {version} to {SCHEMA_VERSION};"
            f" the version-{version} database was first copied to {copy}"
        )
    conn.executescript(DDL)  # what this version has that a migration does not add (none yet)
    return note


def backup(conn: sqlite3.Connection, path: Path, version: int) -> Path:
    """A complete copy of the database (what its WAL holds too) beside it, named
    ``<name>.bak-v<version>`` (``-2``, ``-3``, ... when that name is taken: an earlier
    copy is never overwritten). One copy per version and content: the copy is made under
    a temporary name, and where an earlier copy of this version holds the same bytes (a
    start that failed or was refused after copying, tried again on the same database)
    that one is kept and returned instead; each failed start made another full copy."""
    partial = path.with_name(f"{path.name}.bak-v{version}.partial")
    try:
        partial.unlink(missing_ok=True)  # what a start killed mid-copy left
        dest = sqlite3.connect(partial)
        try:
            conn.backup(dest)
        finally:
            dest.close()
        copies = _backups(path, version)
        for earlier in copies:
            if _same_bytes(partial, earlier):
                partial.unlink()
                return earlier
        target = path.with_name(f"{path.name}.bak-v{version}")
        n = 1
        while target in copies or target.exists():
            n += 1
            target = path.with_name(f"{path.name}.bak-v{version}-{n}")
        partial.rename(target)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise SchemaError(
            f"database schema version {version} needs an upgrade to {SCHEMA_VERSION}, but it "
            f"could not be copied to {partial} first ({exc}); nothing was changed"
        ) from None
    return target


def _backups(path: Path, version: int) -> list[Path]:
    """The copies ``backup`` made of this database at ``version``, oldest name first."""
    pattern = re.compile(rf"{re.escape(path.name)}\.bak-v{version}(?:-(\d+))?")
    found = []
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match is not None and candidate.is_file():
            found.append((int(match[1] or 1), candidate))
    return [candidate for _n, candidate in sorted(found)]


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            chunk = fa.read(BACKUP_COMPARE_CHUNK)
            if chunk != fb.read(BACKUP_COMPARE_CHUNK):
                return False
            if not chunk:
                return True


def migrate(conn: sqlite3.Connection, version: int, copy: Path) -> None:
    """Every step from ``version`` to SCHEMA_VERSION in one transaction: all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for v in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[v]:
                conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.execute("ROLLBACK")
        raise SchemaError(
            f"upgrading the database from schema version {version} to {SCHEMA_VERSION} "
            f"failed ({exc}); it is unchanged (a copy is at {copy})"
        ) from None
