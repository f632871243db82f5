"""One sidecar per data directory: an exclusive lock held for the life of the process.

Two sidecars on one ``data_dir`` would write one copy of the session records from two watches
and leave it at whichever revision flushed last. The lock is ``flock`` on a file in the
directory: the kernel drops it when the holder's last descriptor closes, so a crashed or killed
sidecar never leaves a stale lock behind, and whether the lock is held tells, with no guessing
from pids, whether a sidecar is alive on this directory (``vsm-sidecar release`` relies on
that before it cleans up after a dead one). The holder's pid is written into the file for the
messages only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "sidecar.lock"
# held_by() takes a shared lock for an instant to look: a sidecar starting in that instant
# would see the directory busy, so acquire() looks again a few times before it gives up.
ATTEMPTS = 5
ATTEMPT_PAUSE = 0.02


class DataDirInUse(Exception):
    """Another live process holds the lock of the data directory."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"{data_dir} is in use by another sidecar ({holder})")
        self.data_dir = data_dir
        self.pid = pid


class DataLock:
    """The held lock; :meth:`release` (or the end of the process) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def acquire(data_dir: Path) -> DataLock:
    """Create ``data_dir`` if needed (owner only) and take its lock.

    Raises DataDirInUse when a live process holds it, OSError when the directory or the lock
    file cannot be made or opened.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    # Not inherited by child programs (hooks, health checks): O_CLOEXEC, as Python's default.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for attempt in range(ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == ATTEMPTS - 1:
                    raise DataDirInUse(data_dir, _recorded_pid(fd)) from None
                time.sleep(ATTEMPT_PAUSE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return DataLock(path, fd)


@contextlib.contextmanager
def held(data_dir: Path) -> Iterator[DataLock]:
    """``acquire`` for the length of a ``with`` block."""
    lock = acquire(data_dir)
    try:
        yield lock
    finally:
        lock.release()


def held_by(data_dir: Path) -> int | None:
    """The pid of the live process that holds ``data_dir``'s lock (0 if it has not written
    its pid yet), or None when no process holds it. Never creates anything."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _recorded_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _recorded_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
