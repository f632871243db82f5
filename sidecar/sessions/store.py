"""The standby's durable local copy of the session records.

The copy is not the source of truth (etcd is): it lets a restarted standby resume its watch from
the revision it had reached instead of re-reading everything, and it answers reads, marked
stale, while etcd is unreachable. So the rule it keeps is *consistency*, not completeness: the
records on disk are always exactly those at the revision stored beside them. Losing the newest
changes in a crash only makes the watch resume a little earlier; etcd replays them.

Files, in the data directory (mode 0700, files 0600: they hold user names and addresses):

``sessions.snapshot``
    Every record at one revision, written whole to a temporary file, fsynced and renamed over
    the old one (then the directory is fsynced), so a crash leaves the old or the new, never a
    mix. Carries a random *generation* id.
``sessions.journal``
    The changes since that snapshot, appended by ``flush()``: a batch of PUT / DELETE frames and
    a COMMIT frame with the revision, then one fdatasync. Only committed batches count on load,
    so a batch torn by a crash is dropped whole. It names its snapshot's generation; a journal of
    another generation (a crash between writing a snapshot and starting its journal) is ignored.

Every frame carries a CRC-32. ``flush()`` writes a new snapshot (*compaction*) instead of
appending when the journal has grown past the snapshot's size (and at least ``compact_bytes``),
after ``replace_all()``, and after a load or a write that found the files damaged. So the bytes
written stay within about twice the bytes changed, and a load reads about two snapshots at most.

Why a journal rather than a full snapshot on every flush: with 100,000 records a snapshot is
~14 MB and 30-70 ms, against ~0.5 ms for appending a 100-change batch. A snapshot written at
most every N ms by a background flusher would be consistent too, but under steady churn it
would rewrite 14 MB every N ms (disk wear, CPU) and still leave the disk N ms behind.

Memory: records are packed into ``buckets`` (default 16,384) chosen by a CRC of the session id;
each bucket is one bytes object, its records deflate-compressed together with a preset
dictionary (a template of the record's JSON), and unpacked only to read or change one of them.
One bytes object per record, keyed by a str, would cost ~300 bytes a record even compressed
(the key, the dict entry and the object headers), ~30 MB for 100,000; the sidecar's libraries
alone take ~53 MB of the 80 MB budget. A bucket of ~6 records compresses better too, since
records in one cluster share agent names, addresses and attribute keys. The price is a
re-pack of one bucket (~6 records) per change, ~80 µs. The snapshot stores the buckets as they
are, so a load decompresses nothing. (Figures: see ``SessionStore``.)

Thread safety: the apply and read methods may be called from the event loop while ``flush()``
runs in a worker thread; a lock guards the in-memory state, and ``flush()`` holds it only to take
the pending batch (or a copy of the bucket list for a snapshot), not while writing.

Nothing here touches etcd or the network.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import mmap
import os
import struct
import threading
import time
import uuid
import zlib
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Self

import structlog

from sidecar.api.session_pb2 import Session
from sidecar.sessions.record import decode_session, validate_session_id
from sidecar.vsmfile.adapter import atomic_write

log = structlog.get_logger(__name__)

SNAPSHOT_NAME: Final = "sessions.snapshot"
JOURNAL_NAME: Final = "sessions.journal"
FORMAT_VERSION: Final = 1
DEFAULT_COMPACT_BYTES: Final = 8 * 1024 * 1024
DEFAULT_BUCKETS: Final = 16384  # ~6 records a bucket at 100,000; a power of two

_SNAPSHOT_MAGIC: Final = b"VSMSNAP1"
_JOURNAL_MAGIC: Final = b"VSMJRNL1"
_FRAME: Final = struct.Struct("<II")  # payload length, CRC-32 of the payload
_REVISION: Final = struct.Struct("<q")
_ID_LENGTH: Final = struct.Struct("<H")
_COMMIT: Final = struct.Struct("<qd")  # revision, wall time of the last apply (NaN: none)
_INDEX: Final = struct.Struct("<I")  # a bucket's number, in the snapshot
_COUNT: Final = struct.Struct("<I")  # records in a bucket, ahead of its compressed entries
_ENTRY: Final = struct.Struct("<HIq")  # id length, JSON length, mod revision
# Larger than any frame written here (records are at most 64 KiB): a bigger length is garbage,
# and must not make the reader try to allocate it.
_MAX_FRAME: Final = 64 * 1024 * 1024
# Journal changes are gathered and applied this many at a time: each bucket they touch is
# re-packed once per chunk rather than once per change, while the raw JSON held meanwhile stays
# a few MB (a whole journal's would be as large as the snapshot again).
_REPLAY_CHUNK: Final = 4096
# The size of each memory map a Replacement packs records into (~9,000 records of ~450 bytes).
_SPILL_CHUNK: Final = 4 * 1024 * 1024
# Replacement.build packs this many buckets at a time (~6,000 records of ~450 bytes: 3 MB of
# entries held at once), compressing them in this many threads (the machine's 2 cores).
_BUILD_STEP: Final = 1024
_BUILD_THREADS: Final = 2
_PUT: Final = b"P"
_DELETE: Final = b"D"
_COMMIT_OP: Final = b"C"

# Raw deflate, 32 KiB window, with a preset dictionary that gives the first record of a bucket
# something to match. Part of the file format: changing it needs a new FORMAT_VERSION.
_WBITS: Final = -15
_DICTIONARY: Final = (
    b'example.com","connected","disconnected","1280x1024","2560x1440","3840x2160",'
    b'{"v":1,"session_id":"","username":"","agent_hostname":"","agent_address":"",'
    b'"display":1,"status":"running","connection_status":"connected",'
    b'"created_at":"2025-01-01T00:00:00Z","last_connection_at":"2025-01-01T00:00:00.000Z",'
    b'"last_client_address":"","terminal_id":"","framebuffer_size":"1920x1080",'
    b'"session_pid":1,"subcluster":"","attributes":{}}'
)


class StoreError(Exception):
    """The data directory cannot be read or written, or a change is out of order."""


class _Damaged(Exception):
    """A file does not parse."""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as etcd held it: its mod revision and the JSON value."""

    revision: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What ``load()`` found, for the caller to log and count."""

    records: int
    revision: int
    quarantined: tuple[Path, ...] = ()  # damaged files moved aside
    dropped_journal_bytes: int = 0  # the torn end of the journal, ignored


# -- the in-memory table --------------------------------------------------------------------------


# Numbers the tables, so that a cached order of ids names the table it was made from.
_TABLE_SERIALS = itertools.count()


class _RecordTable:
    """Records packed into a fixed number of compressed buckets, chosen by a CRC of the id."""

    def __init__(self, buckets: list[bytes]) -> None:
        self._buckets = buckets
        self._mask = len(buckets) - 1
        self._size = sum(_bucket_size(blob) for blob in buckets)
        # Which set of ids this table holds: (its own serial, a count of changes to the set).
        self.serial = next(_TABLE_SERIALS)
        self.id_changes = 0

    @classmethod
    def empty(cls, buckets: int) -> _RecordTable:
        if buckets <= 0 or buckets & (buckets - 1):
            raise ValueError(f"the bucket count must be a power of two, got {buckets}")
        return cls([b""] * buckets)

    def __len__(self) -> int:
        return self._size

    def bucket_list(self) -> list[bytes]:
        """A copy of the buckets (immutable bytes): a consistent image for a snapshot."""
        return list(self._buckets)

    def get(self, session_id: str) -> StoredRecord | None:
        return _unpack(self._buckets[self._index(session_id)]).get(session_id)

    def update(self, changes: Mapping[str, StoredRecord | None]) -> int:
        """Put records and delete ids (None), re-packing each touched bucket once.

        Returns how many of the deleted ids were held.
        """
        by_bucket: defaultdict[int, list[str]] = defaultdict(list)
        for session_id in changes:
            by_bucket[self._index(session_id)].append(session_id)
        deleted = 0
        for index, ids in by_bucket.items():
            records = _unpack(self._buckets[index])
            before = len(records)
            for session_id in ids:
                record = changes[session_id]
                if record is not None:
                    if session_id not in records:
                        self.id_changes += 1
                    records[session_id] = record
                elif records.pop(session_id, None) is not None:
                    deleted += 1
                    self.id_changes += 1
            self._buckets[index] = _pack(records)
            self._size += len(records) - before
        return deleted

    def items(self) -> Iterator[tuple[str, StoredRecord]]:
        """Every record, bucket by bucket (no particular order)."""
        for blob in self._buckets:
            yield from _unpack(blob).items()

    def _index(self, session_id: str) -> int:
        # CRC-32, not hash(): the bucket must not change between runs (PYTHONHASHSEED).
        return zlib.crc32(session_id.encode()) & self._mask


class _IdOrder:
    """Every id of a table in order, packed (~15 bytes an id): a page is found by bisection
    instead of by unpacking every record. Ids are ASCII, so their bytes sort as they do."""

    def __init__(self, ids: Iterable[bytes]) -> None:
        ordered = sorted(ids)
        self._blob = b"".join(ordered)
        self._ends = array("I", itertools.accumulate(map(len, ordered)))

    def __len__(self) -> int:
        return len(self._ends)

    def _id(self, number: int) -> bytes:
        start = self._ends[number - 1] if number else 0
        return self._blob[start : self._ends[number]]

    def after(self, key: bytes, limit: int) -> list[str]:
        """Up to ``limit`` ids that sort after ``key``, in order."""
        first = bisect.bisect_right(range(len(self)), key, key=self._id)
        return [self._id(n).decode() for n in range(first, min(first + limit, len(self)))]


def _pack(records: dict[str, StoredRecord]) -> bytes:
    return _compress([_entry(session_id.encode(), record.raw, record.revision)
                      for session_id, record in records.items()])


def _entry(key: bytes, raw: bytes, revision: int) -> bytes:
    return _ENTRY.pack(len(key), len(raw), revision) + key + raw


def _compress(entries: list[bytes]) -> bytes:
    """A bucket of these packed entries (each id distinct)."""
    if not entries:
        return b""
    return _COUNT.pack(len(entries)) + _deflate(b"".join(entries))


def _deflate(data: bytes) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, _WBITS, 8, zlib.Z_DEFAULT_STRATEGY, _DICTIONARY)
    return deflate.compress(data) + deflate.flush()


def _unpack(blob: bytes) -> dict[str, StoredRecord]:
    if not blob:
        return {}
    inflate = zlib.decompressobj(_WBITS, _DICTIONARY)
    data = inflate.decompress(memoryview(blob)[_COUNT.size :]) + inflate.flush()
    records = {}
    offset = 0
    while offset < len(data):
        id_length, raw_length, revision = _ENTRY.unpack_from(data, offset)
        offset += _ENTRY.size
        session_id = data[offset : offset + id_length].decode()
        offset += id_length
        records[session_id] = StoredRecord(revision, data[offset : offset + raw_length])
        offset += raw_length
    return records


def _bucket_size(blob: bytes) -> int:
    return _COUNT.unpack_from(blob)[0] if blob else 0


class Replacement:
    """A whole new copy, filled record by record (a full re-read, page by page) while the store
    goes on with the old one, and swapped in at once by :meth:`SessionStore.replace`.

    Records wait here as their packed entries, back to back in anonymous memory maps of
    ``_SPILL_CHUNK`` bytes, not as Python objects: ~450 bytes a record instead of ~600, and
    the maps go back to the system once the copy is built. 100,000 records as Python objects
    (an id, a value and a revision each) left the process ~40 MB larger after they were freed,
    their memory spread over the allocator's arenas with live objects in between.

    Not thread safe: fill it from one thread at a time. Close it (or use ``with``) after use.
    """

    def __init__(self) -> None:
        self._chunks: list[mmap.mmap] = []
        self._used = 0  # bytes written to the last chunk
        self._offsets = array("Q")  # of each entry: chunk number << 32 | offset in the chunk
        self._sizes = array("I")
        self._hashes = array("I")  # CRC-32 of each id, which chooses its bucket
        self.max_revision = 0

    def __len__(self) -> int:
        return len(self._offsets)

    def add(self, session_id: str, raw: bytes, mod_revision: int) -> None:
        """Take the record etcd holds under ``session_id`` (a later add of an id wins)."""
        validate_session_id(session_id)
        if mod_revision < 1:
            raise ValueError(f"{session_id}: mod revision {mod_revision} is not a revision")
        key = session_id.encode()
        entry = _entry(key, raw, mod_revision)
        if not self._chunks or self._used + len(entry) > len(self._chunks[-1]):
            size = max(_SPILL_CHUNK, len(entry))
            self._chunks.append(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
            self._used = 0
        chunk = self._chunks[-1]
        chunk[self._used : self._used + len(entry)] = entry
        self._offsets.append((len(self._chunks) - 1) << 32 | self._used)
        self._sizes.append(len(entry))
        self._hashes.append(zlib.crc32(key))
        self._used += len(entry)
        self.max_revision = max(self.max_revision, mod_revision)

    def build(self, buckets: int) -> _RecordTable:
        """The table of every record taken, each bucket packed once.

        Buckets are packed ``_BUILD_STEP`` at a time: their entries gathered in this thread,
        then compressed in ``_BUILD_THREADS`` threads, which zlib lets run at once (it releases
        the GIL while it compresses, two thirds of the work). Gathering and compressing take
        turns rather than overlap: a thread that gathers holds the GIL, and the compressing
        threads, which need it briefly between buckets, would wait up to the interpreter's
        switch interval (5 ms) for it each time.
        """
        blobs = _RecordTable.empty(buckets).bucket_list()
        bucket_of = [crc & (buckets - 1) for crc in self._hashes]
        # A stable sort: within a bucket, entries stay in the order they were added.
        order = sorted(range(len(self)), key=bucket_of.__getitem__)
        groups = itertools.groupby(order, key=bucket_of.__getitem__)
        with ThreadPoolExecutor(_BUILD_THREADS, thread_name_prefix="store-build") as pool:
            while step := [self._gather(index, group)
                           for index, group in itertools.islice(groups, _BUILD_STEP)]:
                share = -(-len(step) // _BUILD_THREADS)  # rounded up
                parts = [[data for _, _, data in step[at : at + share]]
                         for at in range(0, len(step), share)]
                bodies = itertools.chain.from_iterable(pool.map(_deflate_each, parts))
                for (index, count, _), body in zip(step, bodies, strict=True):
                    blobs[index] = _COUNT.pack(count) + body
        return _RecordTable(blobs)

    def _gather(self, index: int, numbers: Iterable[int]) -> tuple[int, int, bytes]:
        """A bucket's number, and the count and joined bytes of its distinct entries.

        Joined at once: the entries (~450 bytes) come from the small-object allocator, whose
        memory the system gets back only in whole arenas. Held for a whole step among the
        buckets already packed, they left the process 6 MB larger; a joined bucket (~3 KB)
        comes from malloc, and malloc_trim gives it back.
        """
        entries = _distinct(map(self._entry_bytes, numbers))
        return index, len(entries), b"".join(entries)

    def _entry_bytes(self, number: int) -> bytes:
        where = self._offsets[number]
        start = where & 0xFFFFFFFF
        return self._chunks[where >> 32][start : start + self._sizes[number]]

    def close(self) -> None:
        for chunk in self._chunks:
            chunk.close()
        self._chunks = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _deflate_each(buckets: list[bytes]) -> list[bytes]:
    return [_deflate(data) for data in buckets]


def _distinct(entries: Iterable[bytes]) -> list[bytes]:
    """Packed entries with one per id, the last of each."""
    by_id = {}
    for entry in entries:
        id_length = _ENTRY.unpack_from(entry)[0]
        by_id[entry[_ENTRY.size : _ENTRY.size + id_length]] = entry
    return list(by_id.values())


# -- the store ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Image:
    """Everything a snapshot file holds, taken under the lock."""

    generation: str
    revision: int
    applied_at: float | None
    records: int
    buckets: list[bytes]


@dataclass(frozen=True, slots=True)
class _Batch:
    """Journal frames to append, ending with a COMMIT at ``revision``."""

    frames: list[bytes]
    revision: int


class SessionStore:
    """Records (session id -> JSON value and mod revision) and the etcd revision they reflect.

    Call ``load()`` once before use. Feed it with ``apply_put`` / ``apply_delete`` (revisions
    never go down; several changes may share one revision) or ``replace`` / ``replace_all``
    (a full re-read), and call
    ``flush()`` after each complete etcd watch response, so that the revision on disk always
    means "every change up to here": the watch can then resume at ``applied_revision + 1``.

    Measured on the development machine (2 shared cores, virtio disk) with 100,000 records of
    ~510 bytes of JSON (random names and addresses, 40 agents): the copy takes 14 MB in memory
    (143 bytes a record, tracemalloc); a process with the sidecar's libraries imported is at
    53 MB RSS, 66 MB with the copy loaded, 72 MB after replaying a journal at the compaction
    threshold. Load 0.03 s from a fresh snapshot, 1.7 s with a full journal (~22,000 changes);
    full snapshot (the flush after replace_all, or a compaction) 30-70 ms, 13.7 MB on disk;
    apply_put ~80 µs; flush of a 100-change batch 0.5 ms; replace_all 1.0 s (it may run in a
    worker thread; 0.7 s of it building the copy from a Replacement, which holds the records
    meanwhile in memory maps it gives back: +45 MB at the peak, nothing after); snapshot()
    0.45 s; sessions() ~4 s (decoding and validating each record).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
        buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        self._dir = Path(data_dir)
        self._compact_bytes = compact_bytes
        self._bucket_count = buckets
        self._lock = threading.Lock()  # the in-memory state below
        self._flush_lock = threading.Lock()  # the files, and the fields only flush() changes
        self._journal: BinaryIO | None = None
        self._reset()

    def _reset(self) -> None:
        # In-memory state, guarded by _lock.
        self._table = _RecordTable.empty(self._bucket_count)
        # The ids in order for page(), built on demand; for the table and id set of the key.
        self._order: _IdOrder | None = None
        self._order_key = (-1, -1)
        self._revision = 0
        self._applied_at: float | None = None  # wall clock: it must survive a restart
        self._applied_mono: float | None = None  # monotonic, for age() within this process
        self._pending: list[bytes] = []
        self._dirty = False
        self._needs_snapshot = True
        # File state, guarded by _flush_lock.
        self._generation = ""
        self._durable_revision = 0
        self._snapshot_bytes = 0
        self._journal_bytes = 0

    @property
    def data_dir(self) -> Path:
        return self._dir

    @property
    def snapshot_path(self) -> Path:
        return self._dir / SNAPSHOT_NAME

    @property
    def journal_path(self) -> Path:
        return self._dir / JOURNAL_NAME

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> LoadReport:
        """Read the copy from the data directory; an absent one is empty at revision 0.

        A damaged snapshot is moved aside (``*.corrupt-<time>``) with an error logged, and the
        copy starts empty at revision 0. That is safe, because an empty copy makes the caller
        re-read everything from etcd, and better than refusing to start, which would leave the
        cluster without a standby until someone repairs the file by hand. A damaged journal is
        moved aside too, leaving the snapshot's state; a torn journal end (a crash in the middle
        of a flush) is dropped. Raises StoreError when the directory cannot be read at all.
        """
        with self._flush_lock, self._lock:
            self._close_journal()
            self._reset()
            try:
                return self._load()
            except OSError as exc:
                self._reset()
                raise StoreError(f"cannot read the session copy in {self._dir}: {exc}") from exc

    def _load(self) -> LoadReport:
        if not self._dir.is_dir():
            return LoadReport(records=0, revision=0)
        self._remove_temporary_files()
        if not self.snapshot_path.exists():
            if self.journal_path.exists():
                # A journal means nothing without its snapshot; the next flush replaces it.
                log.warning("store_journal_without_snapshot", path=str(self.journal_path))
            return LoadReport(records=0, revision=0)
        try:
            self._read_snapshot()
        except _Damaged as exc:
            self._reset()
            moved = self._quarantine(str(exc), self.snapshot_path, self.journal_path)
            return LoadReport(records=0, revision=0, quarantined=moved)
        return self._load_journal()

    def _load_journal(self) -> LoadReport:
        try:
            dropped = self._read_journal()
        except _Damaged as exc:
            # The snapshot alone is consistent: carry on from it.
            self._needs_snapshot = True
            moved = self._quarantine(str(exc), self.journal_path)
            return LoadReport(len(self._table), self._revision, quarantined=moved)
        if dropped:
            log.warning("store_journal_torn", path=str(self.journal_path), dropped_bytes=dropped)
        if not self._needs_snapshot:
            self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - kept open until close()
        return LoadReport(len(self._table), self._revision, dropped_journal_bytes=dropped)

    def _read_snapshot(self) -> None:
        with open(self.snapshot_path, "rb", buffering=1024 * 1024) as f:
            if f.read(len(_SNAPSHOT_MAGIC)) != _SNAPSHOT_MAGIC:
                raise _Damaged(f"{self.snapshot_path} is not a session snapshot")
            frames = _read_frames(f, len(_SNAPSHOT_MAGIC))
            header = _parse_header(_next_frame(frames), ("generation", "revision", "records"))
            buckets = _header_int(header, "buckets")
            table = _RecordTable(_read_buckets(frames, buckets))
        if len(table) != header["records"]:
            raise _Damaged(f"{self.snapshot_path} holds {len(table)} records, not as announced")
        self._table = table
        self._revision = self._durable_revision = _header_int(header, "revision")
        self._applied_at = _optional_float(header.get("applied_at"))
        self._generation = str(header["generation"])
        self._snapshot_bytes = self.snapshot_path.stat().st_size
        self._needs_snapshot = False

    def _read_journal(self) -> int:
        """Replay the committed batches of the journal; return how many bytes were torn off."""
        if not self.journal_path.exists():
            self._needs_snapshot = True
            return 0
        with open(self.journal_path, "rb", buffering=1024 * 1024) as f:
            if f.read(len(_JOURNAL_MAGIC)) != _JOURNAL_MAGIC:
                raise _Damaged(f"{self.journal_path} is not a session journal")
            frames = _read_frames(f, len(_JOURNAL_MAGIC))
            header = _parse_header(_next_frame(frames), ("generation",))
            if header["generation"] != self._generation:
                # Written before the snapshot, which therefore holds all of it.
                self._needs_snapshot = True
                return 0
            end = self._replay(frames, f.tell())
        size = self.journal_path.stat().st_size
        self._journal_bytes = end
        if end < size:
            self._needs_snapshot = True  # start a clean journal rather than append after garbage
        return size - end

    def _replay(self, frames: Iterator[tuple[int, bytes]], start: int) -> int:
        """Apply every committed batch; return the offset where the last one ends."""
        changes: dict[str, StoredRecord | None] = {}
        batch: list[bytes] = []
        end = start
        try:
            for offset, payload in frames:
                if payload[:1] != _COMMIT_OP:
                    batch.append(payload)
                    continue
                # Parse the whole batch before taking any of it: a batch counts whole or not.
                commit = _parse_commit(payload)
                parsed = [_parse_change(entry) for entry in batch]
                changes.update(parsed)
                self._revision, self._applied_at = commit
                batch, end = [], offset
                if len(changes) >= _REPLAY_CHUNK:
                    self._table.update(changes)
                    changes.clear()
        except _Damaged:
            pass  # a torn end: whatever follows the last COMMIT is dropped
        self._table.update(changes)
        self._durable_revision = self._revision
        return end

    def _remove_temporary_files(self) -> None:
        # Left by a crash in atomic_write; never renamed into place, so never part of the copy.
        for name in (SNAPSHOT_NAME, JOURNAL_NAME):
            for leftover in self._dir.glob(f".{name}.*.tmp"):
                leftover.unlink(missing_ok=True)

    def _quarantine(self, reason: str, *paths: Path) -> tuple[Path, ...]:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = []
        for path in paths:
            if path.exists():
                target = path.with_name(f"{path.name}.corrupt-{stamp}")
                path.rename(target)
                moved.append(target)
        log.error(
            "store_damaged",
            reason=reason,
            moved_aside=[str(p) for p in moved],
            consequence="carrying on from the intact part; etcd fills in the rest",
        )
        return tuple(moved)

    # -- applying changes -----------------------------------------------------------------------

    def apply_put(self, session_id: str, raw: bytes, revision: int) -> None:
        """Record that etcd holds ``raw`` under ``session_id`` since ``revision``."""
        validate_session_id(session_id)
        with self._lock:
            self._check_order(revision)
            self._table.update({session_id: StoredRecord(revision, raw)})
            self._pending.append(_frame(_put_payload(session_id, revision, raw)))
            self._mark_applied(revision)

    def apply_delete(self, session_id: str, revision: int) -> bool:
        """Record that etcd deleted ``session_id`` at ``revision``; tell whether it was held."""
        validate_session_id(session_id)
        with self._lock:
            self._check_order(revision)
            held = self._table.update({session_id: None}) > 0
            self._pending.append(_frame(_DELETE + _REVISION.pack(revision) + session_id.encode()))
            self._mark_applied(revision)
            return held

    def advance(self, revision: int) -> None:
        """Record that nothing changed up to ``revision`` (an etcd progress notification).

        Keeps the resume point ahead of etcd's compaction while no session changes.
        """
        with self._lock:
            self._check_order(revision)
            self._mark_applied(revision)

    def replace_all(self, records: Iterable[tuple[str, bytes, int]], revision: int) -> None:
        """Replace the whole copy with ``(session id, raw JSON, mod revision)`` tuples read at
        ``revision`` (a full re-read, e.g. after etcd compacted past ``applied_revision``).

        The revision may be lower than before: etcd may have been restored from a backup.
        """
        with Replacement() as fresh:
            for session_id, raw, mod_revision in records:
                fresh.add(session_id, raw, mod_revision)
            self.replace(fresh, revision)

    def replace(self, fresh: Replacement, revision: int) -> None:
        """Replace the whole copy with the records of ``fresh``, read at ``revision``.

        The copy in memory changes in one step, under the lock; the copy on disk changes at the
        next flush, as a whole new snapshot. Until then a crash leaves the old copy at its old
        revision, never a mix of old and new claimed at the new one. Blocking for a second or
        so with 100,000 records: call it from a worker thread.
        """
        if fresh.max_revision > revision:
            raise ValueError(f"a record has mod revision {fresh.max_revision}, after the "
                             f"revision {revision} of the read")
        table = fresh.build(self._bucket_count)  # outside the lock
        with self._lock:
            self._table, self._revision = table, revision
            self._pending = []
            self._needs_snapshot = True
            self._mark_applied(revision)

    def _check_order(self, revision: int) -> None:
        if revision < 1:
            raise ValueError(f"etcd revisions start at 1, got {revision}")
        if revision < self._revision:
            raise StoreError(f"revision {revision} is older than the applied {self._revision}")

    def _mark_applied(self, revision: int) -> None:
        self._revision = revision
        self._applied_at = time.time()
        self._applied_mono = time.monotonic()
        self._dirty = True

    # -- flushing -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every change applied so far durable; a no-op when there is none.

        Blocking (disk writes and fsync): call it from a worker thread, not the event loop.
        Raises StoreError when the disk refuses; the next flush then writes a whole snapshot.
        """
        with self._flush_lock:
            with self._lock:
                work = self._take_work()
            if work is None:
                return
            try:
                self._write(work)
            except OSError as exc:
                with self._lock:
                    self._needs_snapshot = True  # the journal may now end in a partial batch
                raise StoreError(f"cannot write the session copy in {self._dir}: {exc}") from exc
            self._durable_revision = work.revision

    def _take_work(self) -> _Image | _Batch | None:
        if self._needs_snapshot or self._journal_full():
            self._needs_snapshot = self._dirty = False
            self._pending = []  # already part of the buckets copied here
            return _Image(
                generation=uuid.uuid4().hex,
                revision=self._revision,
                applied_at=self._applied_at,
                records=len(self._table),
                buckets=self._table.bucket_list(),
            )
        if not self._dirty:
            return None
        applied_at = math.nan if self._applied_at is None else self._applied_at
        frames = [*self._pending, _frame(_COMMIT_OP + _COMMIT.pack(self._revision, applied_at))]
        self._pending, self._dirty = [], False
        return _Batch(frames=frames, revision=self._revision)

    def _journal_full(self) -> bool:
        pending = sum(len(frame) for frame in self._pending)
        return self._journal_bytes + pending > max(self._compact_bytes, self._snapshot_bytes)

    def _write(self, work: _Image | _Batch) -> None:
        if isinstance(work, _Image):
            self._write_snapshot(work)
        else:
            self._append(work.frames)

    def _write_snapshot(self, image: _Image) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._close_journal()
        atomic_write(self.snapshot_path, _snapshot_pieces(image))
        self._generation = image.generation
        self._snapshot_bytes = self.snapshot_path.stat().st_size
        # A crash here leaves the old journal; it names the old generation, so load ignores it.
        header = _JOURNAL_MAGIC + _frame(_header({"generation": image.generation}))
        atomic_write(self.journal_path, header)
        self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - kept open until close()
        self._journal_bytes = len(header)

    def _append(self, frames: list[bytes]) -> None:
        if self._journal is None:
            raise OSError("the journal is not open")  # cannot happen: a snapshot would be due
        data = b"".join(frames)
        self._journal.write(data)
        self._journal.flush()
        os.fdatasync(self._journal.fileno())
        self._journal_bytes += len(data)

    def close(self) -> None:
        """Close the journal; changes not flushed are not written."""
        with self._flush_lock:
            self._close_journal()

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    @property
    def applied_revision(self) -> int:
        """Every change up to this etcd revision has been applied (in memory)."""
        with self._lock:
            return self._revision

    @property
    def durable_revision(self) -> int:
        """The revision of the copy on disk, as of the last successful flush (or load)."""
        return self._durable_revision

    @property
    def last_applied_at(self) -> float | None:
        """Wall-clock time (seconds since the epoch) of the last change applied; None if none."""
        with self._lock:
            return self._applied_at

    def age(self) -> float | None:
        """Seconds since the copy was last brought up to date; None if it never was."""
        with self._lock:
            if self._applied_mono is not None:
                return time.monotonic() - self._applied_mono
            if self._applied_at is not None:
                # Only the wall clock links this process to the one that applied the change.
                return max(0.0, time.time() - self._applied_at)
            return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)

    def __contains__(self, session_id: object) -> bool:
        return isinstance(session_id, str) and self.get(session_id) is not None

    def get(self, session_id: str) -> StoredRecord | None:
        with self._lock:
            return self._table.get(session_id)

    def records(self) -> Iterator[tuple[str, StoredRecord]]:
        """Every record, in no particular order, unpacked one bucket at a time (so the whole
        set is never in memory at once) from a consistent copy taken at the call."""
        return self.records_at()[1]

    def records_at(self) -> tuple[int, Iterator[tuple[str, StoredRecord]]]:
        """The applied revision and, as :meth:`records`, every record at exactly it."""
        with self._lock:
            revision, table = self._revision, _RecordTable(self._table.bucket_list())
        return revision, table.items()

    def snapshot(self) -> dict[str, StoredRecord]:
        """Every record, ordered by session id. Holds them all unpacked: ~60 MB for 100,000."""
        return self.snapshot_at()[1]

    def snapshot_at(self) -> tuple[int, dict[str, StoredRecord]]:
        """The applied revision and every record at exactly that revision, ordered by id."""
        with self._lock:
            revision, table = self._revision, _RecordTable(self._table.bucket_list())
        records = dict(table.items())
        return revision, {key: records[key] for key in sorted(records)}

    def page(self, after: str, limit: int) -> tuple[int, list[tuple[str, StoredRecord]]]:
        """The applied revision and, at exactly that revision, the first ``limit`` records
        whose id sorts after ``after`` ("" for the first page), in id order.

        The ids in order are kept packed (~1.5 MB for 100,000) from the first page on, until
        the set of ids changes; a page then costs a bisection and one bucket unpacked per
        record (~10 ms for 1,000), where :meth:`snapshot_at` unpacks and sorts every record
        (~0.4 s and ~60 MB for 100,000). Changes to records already held keep the order.
        """
        with self._lock:
            live = self._table
            revision, table = self._revision, _RecordTable(live.bucket_list())
            key = (live.serial, live.id_changes)
            order = self._order if self._order_key == key else None
        if order is None:  # the first page since the set of ids changed: ~0.2 s for 100,000
            order = _IdOrder(session_id.encode() for session_id, _ in table.items())
            with self._lock:
                if (self._table.serial, self._table.id_changes) == key:
                    self._order, self._order_key = order, key
        chosen = [(i, table.get(i)) for i in order.after(after.encode(), limit)]
        return revision, [(i, record) for i, record in chosen if record is not None]

    def sessions(self) -> list[Session]:
        """Every record decoded, with its revision, ordered by session id.

        Raises SessionDecodeError for a record that is not valid, which the mirror never applies.
        """
        result = []
        for session_id, record in self.snapshot().items():
            session = decode_session(record.raw, session_id)
            session.revision = record.revision
            result.append(session)
        return result


# -- file format helpers --------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _read_frames(f: BinaryIO, offset: int) -> Iterator[tuple[int, bytes]]:
    """Yield (offset after the frame, payload); raise _Damaged at the first frame that is not
    whole and intact. Reads as it goes: a snapshot is never held in memory twice."""
    while head := f.read(_FRAME.size):
        if len(head) < _FRAME.size:
            raise _Damaged(f"truncated frame header at byte {offset}")
        length, crc = _FRAME.unpack(head)
        payload = f.read(length) if length <= _MAX_FRAME else b""
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise _Damaged(f"damaged frame at byte {offset}")
        offset += _FRAME.size + length
        yield offset, payload


def _next_frame(frames: Iterator[tuple[int, bytes]]) -> bytes:
    for _, payload in frames:
        return payload
    raise _Damaged("file ends before its header")


def _header(fields: dict[str, object]) -> bytes:
    return json.dumps({"format": FORMAT_VERSION, **fields}, separators=(",", ":")).encode()


def _parse_header(payload: bytes, required: tuple[str, ...]) -> dict[str, object]:
    try:
        header = json.loads(payload)
    except (ValueError, RecursionError):
        raise _Damaged("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise _Damaged(f"unknown format {header!r:.100}")
    missing = [name for name in required if name not in header]
    if missing:
        raise _Damaged(f"header lacks {missing}")
    return header


def _header_int(header: dict[str, object], name: str) -> int:
    value = header.get(name)
    if type(value) is not int or value < 0:
        raise _Damaged(f"header {name} is not a count")
    return value


def _optional_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _read_buckets(frames: Iterator[tuple[int, bytes]], count: int) -> list[bytes]:
    if count <= 0 or count & (count - 1):
        raise _Damaged(f"bucket count {count} is not a power of two")
    buckets = [b""] * count
    for _, payload in frames:
        if len(payload) <= _INDEX.size + _COUNT.size:
            raise _Damaged("bucket entry too short")
        (index,) = _INDEX.unpack_from(payload)
        if index >= count or buckets[index]:
            raise _Damaged(f"bucket entry {index} out of place")
        buckets[index] = payload[_INDEX.size :]
    return buckets


def _put_payload(session_id: str, revision: int, raw: bytes) -> bytes:
    key = session_id.encode()
    return _PUT + _REVISION.pack(revision) + _ID_LENGTH.pack(len(key)) + key + raw


def _parse_change(payload: bytes) -> tuple[str, StoredRecord | None]:
    """A journal entry as (session id, record), or (session id, None) for a delete."""
    head = 1 + _REVISION.size
    if len(payload) <= head or payload[:1] not in (_PUT, _DELETE):
        raise _Damaged(f"malformed journal entry {payload[:1]!r}")
    (revision,) = _REVISION.unpack_from(payload, 1)
    try:
        if payload[:1] == _DELETE:
            return payload[head:].decode(), None
        (length,) = _ID_LENGTH.unpack_from(payload, head)
        start = head + _ID_LENGTH.size
        session_id = payload[start : start + length].decode()
    except (UnicodeDecodeError, struct.error):
        raise _Damaged("malformed journal entry") from None
    return session_id, StoredRecord(revision, payload[start + length :])


def _parse_commit(payload: bytes) -> tuple[int, float | None]:
    if len(payload) != 1 + _COMMIT.size:
        raise _Damaged("malformed commit entry")
    revision, applied_at = _COMMIT.unpack_from(payload, 1)
    return revision, None if math.isnan(applied_at) else applied_at


def _snapshot_pieces(image: _Image) -> Iterator[bytes]:
    yield _SNAPSHOT_MAGIC
    header = {
        "generation": image.generation,
        "revision": image.revision,
        "applied_at": image.applied_at,
        "records": image.records,
        "buckets": len(image.buckets),
    }
    yield _frame(_header(header))
    for index, blob in enumerate(image.buckets):
        if blob:
            yield _frame(_INDEX.pack(index) + blob)
