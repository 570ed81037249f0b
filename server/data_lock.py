"""data_lock — one server per data directory: an exclusive lock on ``<data_dir>/layerscope.lock``.

Owns: taking the lock when the store opens and holding it until the store has closed
(``DataDirLock``), refusing a second server at once with a message naming the data
directory and the pid that holds it (``DataDirBusy``), and what ``layerscope serve``
checks before it starts anything (``claim``): the data directory is a directory it can
write, no other server holds it (the lock is taken then, and handed to the store that
the server opens, so two servers started at the same instant cannot both pass), and a
database already there is a layerscope database this version can open (read only: a
file that is not one is left as it is).

Why: a second server on one data directory took the first's live runs for runs left
behind by a dead server (marked them lost after the reconnect grace), and could delete a
run the first was still storing. A check that only looked (``holder_message``) let two
servers started together both pass it; the loser then failed inside uvicorn's startup
with a page of traceback.

Never: blocks waiting for the lock; is inherited by a child process (the descriptor is
close-on-exec and children are started with close_fds: the store's writer process and
launched trainers never hold it, so a server killed with SIGKILL frees its data
directory at once, whatever it started); removes the lock file (a process that opened it
just before the unlink would lock a file no one else can see).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

from layerscope.server.checks import StoreError
from layerscope.server.schema import DB_NAME, MIGRATIONS, SCHEMA_VERSION

LOCK_NAME = "layerscope.lock"

# Locks this process took before its store opened (``claim``), by lock file path, for the
# store's DataDirLock to take over.
_handed: dict[str, int] = {}
_handed_guard = threading.Lock()


def _key(path: Path) -> str:
    return os.path.realpath(path)


class DataDirBusy(StoreError):
    """Another server holds this data directory."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        who = f" (pid {holder})" if holder else ""
        super().__init__(
            f"data dir {data_dir} is in use by another layerscope server{who}; stop that "
            "server or give this one another --data-dir"
        )


HOLDER_WAIT_S = 0.2  # a holder that has just taken the lock writes its pid right after


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file ('' when unreadable). Read again for a
    moment while empty: a server started at the same instant as this one may hold the lock
    and not have written its pid yet."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        text = ""
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            return text
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.01)


class DataDirLock:
    """The exclusive lock on one data directory, held from ``acquire`` to ``release``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now, or raise DataDirBusy (another server has it) or StoreError
        (the lock file cannot be created: a read-only directory, say)."""
        if self._fd is not None:
            return
        with _handed_guard:
            self._fd = _handed.pop(_key(self.path), None)
        if self._fd is not None:  # claimed by this process before its store opened
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DataDirBusy(self.data_dir, holder) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc}") from None
        with contextlib.suppress(OSError):  # who holds it, for the next server's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Closing the descriptor releases the lock (as the process's death does)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def hand_over(self) -> None:
        """Keep holding the lock in this process for the next DataDirLock on this data
        directory (the store's, as the server's app starts) to take over."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _handed_guard:
            earlier = _handed.pop(_key(self.path), None)
            _handed[_key(self.path)] = fd
        if earlier is not None:
            os.close(earlier)


def drop_claim(data_dir: Path) -> None:
    """Release a lock ``claim`` took that no store took over (the server never started)."""
    with _handed_guard:
        fd = _handed.pop(_key(Path(data_dir) / LOCK_NAME), None)
    if fd is not None:
        os.close(fd)


def database_problem(data_dir: Path) -> str | None:
    """Why the database in ``data_dir`` is not one this layerscope can open, or None (none
    there yet, or a layerscope database it can use or upgrade). Opened read only: a file
    that is not a layerscope database is never written to."""
    path = Path(data_dir) / DB_NAME
    if not path.exists():
        return None
    if not path.is_file():
        return f"{path} is not a file; move it away or give another --data-dir"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user; fix its permissions"
    leave = "layerscope left it untouched; move it away or give another --data-dir"
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        return f"cannot open {path} ({exc}); {leave}"
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            return None  # an empty database: the store creates the tables
        if "schema_version" not in tables:
            names = ", ".join(sorted(tables)[:5])
            return (
                f"{path} is a SQLite database but not a layerscope one (its tables: {names});"
                f" {leave}"
            )
        row = conn.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.Error as exc:
        return f"{path} is not a usable SQLite database ({exc}); {leave}"
    finally:
        conn.close()
    version = None if row is None else row[0]
    if version is None:
        return None  # created, not yet stamped: the store finishes it
    if (
        not isinstance(version, int)
        or version > SCHEMA_VERSION
        or any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION))
    ):
        return (
            f"{path} has schema version {version}, which this layerscope (version "
            f"{SCHEMA_VERSION}) cannot use: a newer layerscope wrote it, or it is not one "
            f"this version can upgrade; {leave}"
        )
    return None


def claim(data_dir: Path) -> str | None:
    """Before a server starts: why it cannot have ``data_dir`` (one line), or None, and
    then this process holds its lock until the server's store takes it over (or
    ``drop_claim``). Creates the directory (and its parents) when it does not exist, the
    directory itself owner-only (0700: runs' configs, logs, checkpoints and the database
    are no other local user's to read); an existing one keeps its mode."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        return f"--data-dir {data_dir} is not a directory"
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create --data-dir {data_dir}: {exc.strerror or exc}"
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return f"--data-dir {data_dir} is not writable by this user"
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except StoreError as exc:  # DataDirBusy too
        return str(exc)
    problem = database_problem(data_dir)
    if problem is not None:
        lock.release()
        return problem
    lock.hand_over()
    return None


def holder_message(data_dir: Path) -> str | None:
    """Why a server cannot have ``data_dir`` now (another holds it), or None. A check, not
    a reservation (``claim`` is one); None for a data directory this process claimed."""
    path = Path(data_dir) / LOCK_NAME
    with _handed_guard:
        if _key(path) in _handed:
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file yet (or none readable): the store's own attempt says why
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return str(DataDirBusy(Path(data_dir), _holder(fd)))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None
