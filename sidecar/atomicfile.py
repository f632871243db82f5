"""Replacing a file atomically: a reader sees the old content or the new, never a mix.

A leaf: it imports nothing of the package, so any room (the session store's snapshot and
journal, the VSM file mirror's restored copy) can use it without importing another room.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO


def atomic_write(
    path: Path,
    data: bytes | Iterable[bytes],
    like: os.stat_result | None = None,
    *,
    mode: int = 0o600,
) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new, never a mix.

    The new file takes the mode and owner of ``like`` when given, else of the file it replaces,
    else ``mode`` and the caller's owner. ``data`` may be an iterable of pieces, written as they
    come, so a large file never has to be held in memory whole. Raises OSError (the temporary
    file is removed); ``PermissionError`` if the owner cannot be given to the new file.
    """
    path = Path(path)
    target = like if like is not None else _stat_or_none(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb", buffering=1024 * 1024) as f:
            _write_all(f, data)
            f.flush()
            _copy_owner_and_mode(fd, target, mode)
            # The data must be on disk before the rename makes it visible under the real name,
            # or a crash could leave an empty file where the old one was.
            os.fsync(fd)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename (or create, or unlink) in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _write_all(f: BinaryIO, data: bytes | Iterable[bytes]) -> None:
    if isinstance(data, bytes):
        f.write(data)
        return
    for piece in data:
        f.write(piece)


def _copy_owner_and_mode(fd: int, target: os.stat_result | None, default_mode: int) -> None:
    if target is None:
        os.fchmod(fd, default_mode)
        return
    current = os.fstat(fd)
    if (current.st_uid, current.st_gid) != (target.st_uid, target.st_gid):
        os.fchown(fd, target.st_uid, target.st_gid)
    # After fchown: changing the owner clears the set-user-id and set-group-id bits.
    os.fchmod(fd, stat.S_IMODE(target.st_mode))
