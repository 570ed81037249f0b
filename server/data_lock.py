"""data_lock — one server per data directory: an exclusive lock on ``<data_dir>/layerscope.lock``.

Owns: taking the lock when the store opens and holding it until the store has closed
(``DataDirLock``), refusing a second server at once with a message naming the data
directory and the pid that holds it (``DataDirBusy``), and the check ``layerscope
serve`` makes before it starts anything (``holder_message``).

Why: a second server on one data directory took the first's live runs for runs left
behind by a dead server (marked them lost after the reconnect grace), and could delete a
run the first was still storing.

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
from pathlib import Path

from layerscope.server.checks import StoreError

LOCK_NAME = "layerscope.lock"


class DataDirBusy(StoreError):
    """Another server holds this data directory."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        who = f" (pid {holder})" if holder else ""
        super().__init__(
            f"data dir {data_dir} is in use by another layerscope server{who}; stop that "
            "server or give this one another --data-dir"
        )


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file ('' when unreadable)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 32, 0).decode().strip()
        return text if text.isdigit() else ""
    return ""


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
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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


def holder_message(data_dir: Path) -> str | None:
    """Why a server cannot have ``data_dir`` now (another holds it), or None. A check, not
    a reservation: the store takes the lock when it opens."""
    path = Path(data_dir) / LOCK_NAME
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
