"""Mirroring the VSM server's session file: chunks, and watching for changes.

The atomic writes it relies on are tested in tests/test_atomicfile.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.atomicfile import atomic_write
from sidecar.vsmfile.adapter import (
    DEFAULT_CHUNK_SIZE,
    ChunkError,
    FileState,
    FileWatcher,
    Manifest,
    batches,
    join_chunks,
    split_chunks,
)

T = TypeVar("T")
OTHER_UID = 54321
OTHER_GID = 54322


def run(coroutine: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coroutine()

    return asyncio.run(main())


# -- chunks ---------------------------------------------------------------------------------------


def test_chunks_round_trip_through_the_manifest(tmp_path: Path) -> None:
    """A file cut into chunks, with its manifest as stored JSON, is put back together exactly."""
    data = os.urandom(2_500_000)
    chunks = split_chunks(data, 1_000_000)
    assert [len(c) for c in chunks] == [1_000_000, 1_000_000, 500_000]
    manifest = Manifest.from_json(Manifest.describe(data, 1_000_000).to_json())
    assert (manifest.size, len(manifest.chunks), manifest.chunk_size) == (2_500_000, 3, 1_000_000)
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.chunks == tuple(hashlib.sha256(c).hexdigest() for c in chunks)
    assert join_chunks(manifest, chunks) == data


def test_manifest_is_readable_json_naming_chunks_by_content() -> None:
    """The manifest reads well with etcdctl; equal content gives equal chunk names, so an
    unchanged part of a file is never stored again."""
    first = Manifest.describe(b"abcdef", 2)
    second = Manifest.describe(b"abXXef", 2)
    assert first.chunks[0] == second.chunks[0]
    assert first.chunks[2] == second.chunks[2]
    assert first.chunks[1] != second.chunks[1]
    doc = json.loads(first.to_json())
    assert list(doc) == ["v", "size", "sha256", "chunk_size", "chunks"]
    assert doc["chunks"] == [hashlib.sha256(p).hexdigest() for p in (b"ab", b"cd", b"ef")]


def test_empty_file_has_no_chunks() -> None:
    """An empty file is a manifest with zero chunks, and joins back to empty."""
    manifest = Manifest.describe(b"", 10)
    assert (split_chunks(b"", 10), manifest.chunks) == ([], ())
    assert join_chunks(manifest, []) == b""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda chunks: chunks[:-1], "chunks"),
        (lambda chunks: [*chunks, b"x"], "chunks"),
        (lambda chunks: [chunks[0][:-1], *chunks[1:]], "chunk 0"),
        (lambda chunks: [chunks[0][:-1] + b"?", *chunks[1:]], "chunk 0"),
        (lambda chunks: [chunks[1], chunks[0], chunks[2]], "chunk 0"),
    ],
    ids=["missing chunk", "extra chunk", "short chunk", "flipped byte", "swapped chunks"],
)
def test_join_detects_corruption(
    change: Callable[[list[bytes]], list[bytes]], message: str
) -> None:
    """Missing, extra, short, altered or reordered chunks raise ChunkError."""
    data = os.urandom(25)
    manifest = Manifest.describe(data, 10)
    with pytest.raises(ChunkError, match=message):
        join_chunks(manifest, change(split_chunks(data, 10)))


H = "0" * 64


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"v":3}',
        # The previous format (chunks named by a generation) is not read as this one.
        b'{"v":1,"generation":"g","size":10,"sha256":"x","chunks":2,"chunk_size":5}',
        f'{{"v":2,"size":10,"sha256":"{H}","chunk_size":5}}'.encode(),
        f'{{"v":2,"size":10,"sha256":"{H}","chunks":2,"chunk_size":5}}'.encode(),
        f'{{"v":2,"size":10,"sha256":"{H}","chunks":["{H}"],"chunk_size":5}}'.encode(),
        f'{{"v":2,"size":10,"sha256":"{H}","chunks":["{H}","x"],"chunk_size":5}}'.encode(),
        f'{{"v":2,"size":10,"sha256":"{H}","chunks":["{H}","{H}"],"chunk_size":0}}'.encode(),
        f'{{"v":2,"size":true,"sha256":"{H}","chunks":[],"chunk_size":5}}'.encode(),
        f'{{"v":2,"size":-1,"sha256":"{H}","chunks":[],"chunk_size":5}}'.encode(),
        b'{"v":2,"size":0,"sha256":"nothex","chunks":[],"chunk_size":5}',
        # More chunk names than any file within the limit has: refused before anything else.
        (f'{{"v":2,"size":4097,"sha256":"{H}","chunks":[' + ",".join([f'"{H}"'] * 4097)
         + '],"chunk_size":1}').encode(),
        b"\xff",
    ],
)
def test_bad_manifest_is_refused(raw: bytes) -> None:
    """Anything but a consistent version 2 manifest raises ChunkError."""
    with pytest.raises(ChunkError):
        Manifest.from_json(raw)


@pytest.mark.parametrize(
    ("sizes", "runs"),
    [
        ([], []),
        ([10, 10, 10], [[0, 1, 2]]),
        ([60, 60, 60], [[0], [1], [2]]),  # two would pass max_bytes=100
        ([50, 50, 1], [[0, 1], [2]]),
        ([500, 1], [[0], [1]]),  # larger than the bound: alone
        ([0] * 7, [[0, 1, 2], [3, 4, 5], [6]]),  # max_ops=3
    ],
)
def test_batches_respect_bytes_and_operations(sizes: list[int], runs: list[list[int]]) -> None:
    """Chunks go into transactions of at most max_bytes and max_ops, in order, none left out."""
    assert [list(r) for r in batches(sizes, max_bytes=100, max_ops=3)] == runs


@settings(deadline=None)
@given(st.lists(st.integers(0, 2 * DEFAULT_CHUNK_SIZE), max_size=60))
def test_default_batches_fit_etcds_default_request_limit(sizes: list[int]) -> None:
    """With the default bounds no transaction of chunks (at most DEFAULT_CHUNK_SIZE each)
    exceeds 1 MiB of values or etcd's default 128 operations."""
    sizes = [min(s, DEFAULT_CHUNK_SIZE) for s in sizes]
    runs = batches(sizes)
    assert [i for r in runs for i in r] == list(range(len(sizes)))
    for run in runs:
        assert sum(sizes[i] for i in run) <= 1024 * 1024
        assert len(run) <= 128


def test_chunk_size_must_be_positive() -> None:
    """A zero chunk size is a programming error, not an empty result."""
    with pytest.raises(ValueError, match="positive"):
        split_chunks(b"abc", 0)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000), st.integers(1, 2000))
def test_any_data_round_trips(data: bytes, chunk_size: int) -> None:
    """For any content and chunk size, the chunks join back to the content."""
    manifest = Manifest.from_json(Manifest.describe(data, chunk_size).to_json())
    assert join_chunks(manifest, split_chunks(data, chunk_size)) == data


# -- FileWatcher ----------------------------------------------------------------------------------


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite the start of the file through its existing inode, as an in-place writer does."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def next_state(watcher: FileWatcher, within: float = 3.0) -> FileState:
    async with asyncio.timeout(within):
        return await anext(watcher)


async def no_change(watcher: FileWatcher, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            await anext(watcher)
    except TimeoutError:
        return True
    return False


def test_watcher_sees_every_kind_of_change(tmp_path: Path) -> None:
    """Missing at first, then created, written in place, replaced by rename, deleted and
    created again: each is seen promptly (inotify; the backstop is set far off)."""
    path = tmp_path / "sessions"

    async def scenario() -> None:
        async with FileWatcher(path, interval=60) as watcher:
            first = await next_state(watcher)
            assert (first.exists, first.content, first.sha256) == (False, None, None)

            path.write_bytes(b"v1")
            assert (await next_state(watcher)).content == b"v1"
            # Let the watcher use up the events of each step, so that the next step is seen
            # through its own event and not through a late one of the step before.
            assert await no_change(watcher, 0.1)

            write_in_place(path, b"v2")
            assert (await next_state(watcher)).content == b"v2"
            assert await no_change(watcher, 0.1)

            replacement = tmp_path / ".sessions.new"
            replacement.write_bytes(b"v3 by rename")
            assert await no_change(watcher, 0.1)
            os.rename(replacement, path)
            state = await next_state(watcher)
            assert state.content == b"v3 by rename"
            assert state.sha256 == hashlib.sha256(b"v3 by rename").hexdigest()
            assert await no_change(watcher, 0.1)

            path.unlink()
            assert (await next_state(watcher)).exists is False
            assert await no_change(watcher, 0.1)

            path.write_bytes(b"v4")
            assert (await next_state(watcher)).content == b"v4"

    run(scenario)


def test_watcher_ignores_other_files_and_unchanged_content(tmp_path: Path) -> None:
    """Neighbours changing, or the file rewritten with the same bytes, yield nothing."""
    path = tmp_path / "sessions"
    path.write_bytes(b"same")

    async def scenario() -> None:
        async with FileWatcher(path, interval=0.2) as watcher:
            assert (await next_state(watcher)).content == b"same"
            (tmp_path / "other").write_bytes(b"x")
            path.write_bytes(b"same")
            assert await no_change(watcher, 0.6)
            path.write_bytes(b"different")
            assert (await next_state(watcher)).content == b"different"

    run(scenario)


def test_backstop_alone_sees_changes_within_its_interval(tmp_path: Path) -> None:
    """With no inotify at all, the periodic check finds each change within about one interval."""
    path = tmp_path / "sessions"

    async def scenario() -> None:
        async with FileWatcher(path, interval=0.1, use_inotify=False) as watcher:
            assert (await next_state(watcher)).exists is False
            for content in (b"a", b"bb", b"ccc"):
                atomic_write(path, content)
                assert (await next_state(watcher, within=0.5)).content == content
            path.unlink()
            assert (await next_state(watcher, within=0.5)).exists is False

    run(scenario)


def test_backstop_catches_a_write_inotify_does_not_report(tmp_path: Path) -> None:
    """A writer that keeps the file open sends no close event; the backstop still sees it."""
    path = tmp_path / "sessions"
    path.write_bytes(b"before")

    async def scenario() -> None:
        async with FileWatcher(path, interval=0.3) as watcher:
            assert (await next_state(watcher)).content == b"before"
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"after!")  # in the file, but not closed: no IN_CLOSE_WRITE
                state = await next_state(watcher, within=1.0)
            finally:
                os.close(fd)
            assert state.content == b"after!"

    run(scenario)


def test_watcher_copes_with_a_missing_directory(tmp_path: Path) -> None:
    """The directory may appear later; the watcher then starts watching it."""
    path = tmp_path / "vsm" / "sessions"

    async def scenario() -> None:
        async with FileWatcher(path, interval=0.1) as watcher:
            assert (await next_state(watcher)).exists is False
            path.parent.mkdir()
            path.write_bytes(b"late")
            assert (await next_state(watcher, within=1.0)).content == b"late"
            path.write_bytes(b"later")  # by now through inotify, but either way promptly
            assert (await next_state(watcher, within=1.0)).content == b"later"

    run(scenario)


def test_watcher_must_be_entered(tmp_path: Path) -> None:
    """Iterating without "async with" is refused rather than silently losing inotify."""
    watcher = FileWatcher(tmp_path / "sessions")

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="async with"):
            await anext(watcher)

    run(scenario)


def test_watcher_interval_must_be_positive(tmp_path: Path) -> None:
    """A zero interval would spin; it is refused."""
    with pytest.raises(ValueError, match="interval"):
        FileWatcher(tmp_path / "x", interval=0)
