"""Pieces for mirroring a stock VSM server's session database file (opaque bytes).

On the primary, FileWatcher notices when the file changes and hands over its content, which the
mirror stores in etcd as content-addressed chunks (``split_chunks``, named by their SHA-256) and a
manifest listing them (``Manifest``); ``batches`` cuts the chunks into transactions that stay
within etcd's default request limit. On the standby, ``join_chunks`` reassembles and verifies the
content and :func:`sidecar.atomicfile.atomic_write` puts it on disk so that the VSM server,
started on takeover, reads either the old or the new file and never a mix.

Nothing here touches etcd or the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeVar

from asyncinotify import Event, Inotify, Mask, Watch

DEFAULT_SESSIONS_FILE: Final = Path("/var/lib/vsm/sessions")
# One chunk is one etcd value. etcd refuses a request over 1.5 MiB (--max-request-bytes) and a
# transaction of more than 128 operations (--max-txn-ops) by default: chunks go in transactions
# of at most TXN_BYTES of values and TXN_OPS operations, and the manifest in one of its own.
DEFAULT_CHUNK_SIZE: Final = 512 * 1024
TXN_BYTES: Final = 1024 * 1024
TXN_OPS: Final = 64
# The largest file mirrored (the documented limit): 128 chunks. A ThinLinc session takes well
# under a kilobyte of the file, so this is room for tens of thousands of sessions; a larger file
# is reported as not mirrored, never cut.
MAX_FILE_SIZE: Final = 64 * 1024 * 1024
# More chunks than any file within the limit needs at the smallest sensible chunk size: a
# manifest claiming more is garbage, refused before anything is sized after it.
MAX_CHUNKS: Final = 4096
DEFAULT_INTERVAL: Final = 2.0
MANIFEST_VERSION: Final = 2
# The format before content-addressed chunks: chunks at chunk/<generation>/<index>. Still read
# (a primary of the previous release writes it during a rolling upgrade); never written.
MANIFEST_V1: Final = 1
_GENERATION_LEN = 32
_HEX64 = frozenset("0123456789abcdef")

_T = TypeVar("_T")

# -- chunks and manifest --------------------------------------------------------------------------


class ChunkError(ValueError):
    """A manifest or its chunks do not add up to the file it describes."""


def chunk_hash(chunk: bytes) -> str:
    """The name of a chunk: its SHA-256 in hex. Equal content, equal key: an unchanged part
    of the file is never written to etcd again (nor into its history)."""
    return hashlib.sha256(chunk).hexdigest()


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a reader needs to reassemble and verify a file stored as several etcd values.

    ``chunks`` names the chunks in order by their SHA-256. Written last, in a transaction of its
    own: the manifest is the commit point of an upload, and it only ever names chunks that are
    already stored.
    """

    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]
    # False for a format 1 manifest, whose chunks are named by generation and index: only the
    # whole file's SHA-256 verifies them.
    named_by_hash: bool = True

    @classmethod
    def describe(cls, data: bytes, chunk_size: int) -> Manifest:
        """The manifest of ``data`` cut into ``chunk_size`` pieces."""
        return cls(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   chunk_size=chunk_size,
                   chunks=tuple(chunk_hash(c) for c in split_chunks(data, chunk_size)))

    @property
    def short(self) -> str:
        """How logs and reports name this version of the file."""
        return self.sha256[:12]

    def to_json(self) -> bytes:
        """Readable JSON with a fixed key order (an operator may read it with etcdctl)."""
        doc = {"v": MANIFEST_VERSION, "size": self.size, "sha256": self.sha256,
               "chunk_size": self.chunk_size, "chunks": list(self.chunks)}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse a manifest; raise ChunkError for anything that is not one."""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ChunkError(f"manifest is not UTF-8 JSON: {exc}") from None
        if isinstance(doc, dict) and doc.get("v") == MANIFEST_V1:
            return cls._from_v1(doc)
        if not isinstance(doc, dict) or doc.get("v") != MANIFEST_VERSION:
            raise ChunkError(f"not a version {MANIFEST_V1} or {MANIFEST_VERSION} manifest")
        chunks = _field(doc, "chunks", list)
        if len(chunks) > MAX_CHUNKS:
            raise ChunkError(f"manifest: {len(chunks)} chunks (at most {MAX_CHUNKS})")
        if not all(isinstance(c, str) and _is_sha256(c) for c in chunks):
            raise ChunkError("manifest: chunks must be SHA-256 hex digests")
        manifest = cls(size=_field(doc, "size", int), sha256=_field(doc, "sha256", str),
                       chunk_size=_field(doc, "chunk_size", int), chunks=tuple(chunks))
        manifest._check_shape()
        return manifest

    @classmethod
    def _from_v1(cls, doc: dict[str, object]) -> Manifest:
        generation, count = _field(doc, "generation", str), _field(doc, "chunks", int)
        if len(generation) != _GENERATION_LEN or not set(generation) <= _HEX64:
            raise ChunkError("manifest: generation must be 32 hex digits")
        if not 0 <= count <= MAX_CHUNKS:
            raise ChunkError(f"manifest: {count} chunks (at most {MAX_CHUNKS})")
        manifest = cls(size=_field(doc, "size", int), sha256=_field(doc, "sha256", str),
                       chunk_size=_field(doc, "chunk_size", int),
                       chunks=tuple(f"{generation}/{i:06d}" for i in range(count)),
                       named_by_hash=False)
        manifest._check_shape()
        return manifest

    def _check_shape(self) -> None:
        if self.chunk_size <= 0 or self.size < 0:
            raise ChunkError("manifest: size and chunk_size must be positive")
        if len(self.chunks) != -(-self.size // self.chunk_size):
            raise ChunkError(f"manifest: {len(self.chunks)} chunks cannot hold {self.size} bytes")
        if not _is_sha256(self.sha256):
            raise ChunkError("manifest: sha256 must be a SHA-256 hex digest")


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and set(text) <= _HEX64


def _field(doc: dict[str, object], name: str, kind: type[_T]) -> _T:
    value = doc.get(name)
    # type() rather than isinstance(): JSON true/false must not pass as integers.
    if type(value) is not kind:
        raise ChunkError(f"manifest: {name} must be {kind.__name__}")
    return value


def split_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Cut ``data`` into pieces of ``chunk_size`` bytes (the last may be shorter; none if empty)."""
    _check_chunk_size(chunk_size)
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def join_chunks(manifest: Manifest, chunks: Sequence[bytes]) -> bytes:
    """Reassemble the file; raise ChunkError unless it matches ``manifest`` exactly."""
    if len(chunks) != len(manifest.chunks):
        raise ChunkError(f"expected {len(manifest.chunks)} chunks, got {len(chunks)}")
    for index, (name, chunk) in enumerate(zip(manifest.chunks, chunks, strict=True)):
        if manifest.named_by_hash and chunk_hash(chunk) != name:
            raise ChunkError(f"chunk {index}: sha256 differs from its name {name[:12]}")
    data = b"".join(chunks)
    if len(data) != manifest.size:
        raise ChunkError(f"expected {manifest.size} bytes, got {len(data)}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise ChunkError(f"sha256 {digest} differs from the manifest's {manifest.sha256}")
    return data


def batches(sizes: Sequence[int], max_bytes: int = TXN_BYTES,
            max_ops: int = TXN_OPS) -> list[range]:
    """Cut items of the given sizes into consecutive runs of at most ``max_ops`` items and
    ``max_bytes`` bytes (an item larger than ``max_bytes`` goes alone)."""
    runs: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (total + size > max_bytes or index - start >= max_ops):
            runs.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


# -- watching -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileState:
    """The file's content at one moment; ``content`` is None when the file does not exist."""

    content: bytes | None
    sha256: str | None
    stat: os.stat_result | None

    @property
    def exists(self) -> bool:
        return self.content is not None


_MISSING: Final = FileState(content=None, sha256=None, stat=None)

# Every way the file can get new content or vanish: written in place and closed, renamed into
# place (editors, and writers that replace atomically), created (also by link(2)), deleted or
# renamed away. Not MODIFY: it fires on every write(), mostly mid-way through one.
_NAME_EVENTS: Final = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM
# The directory itself went away or moved: the watch no longer tells anything about the path.
_LOST_WATCH: Final = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED | Mask.UNMOUNT


class FileWatcher:
    """Tell each time the content of ``path`` changes (or the file appears or vanishes).

    Use as ``async with FileWatcher(path) as watcher: async for state in watcher: ...``. The first
    state is the current one; each later one differs in content from the one before.

    inotify on the parent directory (not the file: a file replaced by rename would take a file
    watch with it) gives prompt notice; a stat check every ``interval`` seconds is the backstop
    for whatever inotify misses: a writer that never closes the file, an overflowed event queue,
    a directory that did not exist yet. ``use_inotify=False`` leaves only the backstop.

    A file written in place can be caught mid-write, as by any reader; the close that ends the
    write brings the complete content right after.
    """

    def __init__(
        self,
        path: Path,
        *,
        interval: float = DEFAULT_INTERVAL,
        settle: float = 0.02,
        use_inotify: bool = True,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._path = Path(path)
        self._interval = interval
        self._settle = settle  # lets a burst of events (create, write, close) end before reading
        self._use_inotify = use_inotify
        self._inotify: Inotify | None = None
        self._watch: Watch | None = None
        self._last: FileState | None = None  # None until the first state was handed out
        self._last_key: tuple[int, ...] | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def __aenter__(self) -> Self:
        if self._use_inotify:
            self._inotify = Inotify()
            self._ensure_watch()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
        self._inotify = None
        self._watch = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FileState:
        if self._use_inotify and self._inotify is None:
            # Iterating outside "async with" would quietly fall back to the backstop alone.
            raise RuntimeError("use FileWatcher in 'async with' (or pass use_inotify=False)")
        noticed = self._last is None  # the first call reads at once
        while True:
            if not noticed:
                noticed = await self._wait()
            state = await self._probe(full=noticed)
            noticed = False
            if state is not None and (self._last is None or state.sha256 != self._last.sha256):
                self._last = state
                return state

    async def _wait(self) -> bool:
        """Wait for an event about the file (True) or for the backstop's turn (False)."""
        deadline = time.monotonic() + self._interval
        while (left := deadline - time.monotonic()) > 0:
            if self._inotify is None or not self._ensure_watch():
                await asyncio.sleep(left)
                return False
            try:
                async with asyncio.timeout(left):
                    event = await self._inotify.get()
            except TimeoutError:
                return False
            if self._concerns_path(event):
                await asyncio.sleep(self._settle)
                return True
        return False

    def _ensure_watch(self) -> bool:
        """Watch the parent directory if not yet done and possible; tell whether watching."""
        if self._watch is None and self._inotify is not None:
            # A missing (or replaced) directory is retried at every turn of the backstop.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self._watch = self._inotify.add_watch(
                    self._path.parent, _NAME_EVENTS | _LOST_WATCH | Mask.ONLYDIR
                )
        return self._watch is not None

    def _concerns_path(self, event: Event) -> bool:
        if event.mask & Mask.Q_OVERFLOW:
            return True  # events were dropped: ours may be among them
        if event.mask & _LOST_WATCH:
            self._drop_watch()
            return True
        return event.name is not None and event.name.name == self._path.name

    def _drop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and self._inotify is not None:
            # The kernel may have removed it already (IGNORED): nothing to undo then.
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(watch)

    async def _probe(self, *, full: bool) -> FileState | None:
        """The file's state, or None while it keeps changing under the reader.

        ``full=False`` (a backstop turn): stat only, and read only if the stat changed.
        """
        key = _stat_key(self._path)
        if not full and key == self._last_key and self._last is not None:
            return self._last
        state = await asyncio.to_thread(read_state, self._path)
        if state is not None:
            # The key of the inode that was read: if the path was replaced since, the next turn
            # of the backstop sees a different key and reads again.
            self._last_key = _key_of(state.stat) if state.stat is not None else None
        return state


def read_state(path: Path) -> FileState | None:
    """Read ``path`` whole; None if it changed while being read (read again later)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return _MISSING
    with open(fd, "rb") as f:
        before = os.fstat(fd)
        content = f.read()
        after = os.fstat(fd)
    if _key_of(before) != _key_of(after):
        return None
    return FileState(content=content, sha256=hashlib.sha256(content).hexdigest(), stat=after)


def _stat_key(path: Path) -> tuple[int, ...] | None:
    try:
        return _key_of(os.stat(path))
    except FileNotFoundError:
        return None


def _key_of(st: os.stat_result) -> tuple[int, ...]:
    # ctime changes with every write and cannot be set back by utime(), unlike mtime.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
