"""Replacing a file atomically (sidecar/atomicfile.py): mode, owner, pieces, failure, readers."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.atomicfile import atomic_write

OTHER_UID = 54321
OTHER_GID = 54322


def test_atomic_write_creates_a_private_file(tmp_path: Path) -> None:
    """A new file holds exactly the data, readable by its owner only unless told otherwise."""
    target = tmp_path / "sessions"
    atomic_write(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(tmp_path / "public", b"x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644


def test_atomic_write_accepts_pieces(tmp_path: Path) -> None:
    """Data may come as an iterable of pieces, written in order."""
    target = tmp_path / "sessions"
    atomic_write(target, (bytes([n]) * 1000 for n in range(10)))
    assert target.read_bytes() == b"".join(bytes([n]) * 1000 for n in range(10))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_atomic_write_keeps_mode_and_owner_of_the_old_file(tmp_path: Path) -> None:
    """The replacement has the old file's owner, group and mode (set-gid bit included)."""
    target = tmp_path / "sessions"
    target.write_bytes(b"old")
    os.chown(target, OTHER_UID, OTHER_GID)
    os.chmod(target, 0o2640)
    old_inode = target.stat().st_ino
    atomic_write(target, b"new")
    st_new = target.stat()
    assert target.read_bytes() == b"new"
    assert st_new.st_ino != old_inode  # replaced, not rewritten in place
    assert (st_new.st_uid, st_new.st_gid) == (OTHER_UID, OTHER_GID)
    assert stat.S_IMODE(st_new.st_mode) == 0o2640


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_atomic_write_takes_mode_and_owner_from_like(tmp_path: Path) -> None:
    """`like` (e.g. the primary's stat of its file) wins over the file being replaced."""
    model = tmp_path / "model"
    model.write_bytes(b"")
    os.chown(model, OTHER_UID, OTHER_GID)
    os.chmod(model, 0o640)
    target = tmp_path / "sessions"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    atomic_write(target, b"new", like=model.stat())
    st_new = target.stat()
    assert (st_new.st_uid, st_new.st_gid, stat.S_IMODE(st_new.st_mode)) == (
        OTHER_UID,
        OTHER_GID,
        0o640,
    )


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """When writing fails half-way, the old content stays and no temporary file is left."""
    target = tmp_path / "sessions"
    target.write_bytes(b"old content")

    def pieces() -> Iterator[bytes]:
        yield b"half of the new"
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        atomic_write(target, pieces())
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions"]


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    """A reader racing many replacements only ever sees one whole version or the other."""
    target = tmp_path / "sessions"
    versions = [bytes([65 + n]) * 300_000 for n in range(2)]
    atomic_write(target, versions[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            seen.add(hashlib.sha256(data).digest())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_number in range(60):
            atomic_write(target, versions[round_number % 2])
    finally:
        stop.set()
        thread.join()
    assert seen <= {hashlib.sha256(v).digest() for v in versions}
    assert len(seen) >= 1
