"""The in-memory copy of the session records: packed into compressed buckets, and the ids in
order for paging.

Records are packed into ``buckets`` (default 16,384) chosen by a CRC of the session id;
each bucket is one bytes object, its records (serialized ``Session`` messages, see
:func:`~sidecar.sessions.recordcheck.check_record`) deflate-compressed together with a preset
dictionary, and unpacked only to read or change one of them.
One bytes object per record, keyed by a str, would cost ~300 bytes a record even compressed
(the key, the dict entry and the object headers), ~30 MB for 100,000; the sidecar's libraries
alone take ~53 MB of the 80 MB budget. A bucket of ~6 records compresses better too, since
records in one cluster share agent names, addresses and attribute keys. The price is a
re-pack of one bucket (~6 records) per change, ~20 µs, and an inflate of one bucket per record
read by id, ~4 µs (deflate level 1 with fixed Huffman codes: see :func:`deflate`). The snapshot
(:mod:`sidecar.sessions.snapshot`) stores the buckets as they are, so a load decompresses
nothing. (Figures: see :class:`~sidecar.sessions.store.SessionStore`.)

Not thread safe: :class:`~sidecar.sessions.store.SessionStore` guards its table with a lock.
"""

from __future__ import annotations

import bisect
import itertools
import struct
import zlib
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

DEFAULT_BUCKETS: Final = 16384  # ~6 records a bucket at 100,000; a power of two

COUNT: Final = struct.Struct("<I")  # records in a bucket, ahead of its compressed entries
ENTRY: Final = struct.Struct("<HIq")  # id length, record length, mod revision

# Raw deflate, 32 KiB window, with a preset dictionary that gives the first record of a bucket
# something to match: a serialized Session of common values. Part of the file format: changing
# it needs a new FORMAT_VERSION. (The level and strategy are not: any deflate stream inflates.)
_WBITS: Final = -15
_LEVEL: Final = 1
_STRATEGY: Final = zlib.Z_FIXED
_DICTIONARY: Final = (
    b'2\x07running:\tconnectedb\t2560x14403840x2160'
    b'\x12\x0c@example.com\x1a\x0c.example.com"\x0810.0.0.1(\n'
    b'2\x07running:\x0cdisconnectedB\x06\x08\x80\xe2\xcf\xaa\x06J\x08\x08\x80\xe2\xcf\xaa\x06\x10'
    b'\x01R\x0b192.168.0.1b\t1920x1080h\x01r\x07default'
)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record: its mod revision and the serialized ``Session`` (revision left out) of the
    JSON value etcd holds."""

    revision: int
    raw: bytes


# Numbers the tables, so that a cached order of ids names the table it was made from.
_TABLE_SERIALS = itertools.count()


class RecordTable:
    """Records packed into a fixed number of compressed buckets, chosen by a CRC of the id."""

    def __init__(self, buckets: list[bytes]) -> None:
        self._buckets = buckets
        self._mask = len(buckets) - 1
        # Counted when first asked: a read's copy of the table (store.records_at, page) never
        # asks, and counting 16,384 buckets cost ~20 ms, more than a page of 1,000 records.
        self._size: int | None = None
        # Which set of ids this table holds: (its own serial, a count of changes to the set).
        self.serial = next(_TABLE_SERIALS)
        self.id_changes = 0

    @classmethod
    def empty(cls, buckets: int) -> RecordTable:
        if buckets <= 0 or buckets & (buckets - 1):
            raise ValueError(f"the bucket count must be a power of two, got {buckets}")
        return cls([b""] * buckets)

    def __len__(self) -> int:
        if self._size is None:
            self._size = sum(_bucket_size(blob) for blob in self._buckets)
        return self._size

    @property
    def bucket_count(self) -> int:
        return len(self._buckets)

    def bucket_list(self) -> list[bytes]:
        """A copy of the buckets (immutable bytes): a consistent image for a snapshot."""
        return list(self._buckets)

    def get(self, session_id: str) -> StoredRecord | None:
        return _find(self._buckets[self._index(session_id)], session_id.encode())

    def update(self, changes: Mapping[str, StoredRecord | None]) -> int:
        """Put records and delete ids (None), re-packing each touched bucket once.

        Returns how many of the deleted ids were held.
        """
        by_bucket: defaultdict[int, list[str]] = defaultdict(list)
        for session_id in changes:
            by_bucket[self._index(session_id)].append(session_id)
        deleted = 0
        len(self)  # counted before the change, so the change can be added to it
        for index, ids in by_bucket.items():
            blob = self._buckets[index]
            data, count = (_inflate(blob), _bucket_size(blob)) if blob else (b"", 0)
            before = count
            for session_id in ids:
                record = changes[session_id]
                entry = None if record is None else \
                    pack_entry(session_id.encode(), record.raw, record.revision)
                data, change = _spliced(data, session_id.encode(), entry)
                count += change
                if change:
                    self.id_changes += 1
                    deleted += change < 0
            self._buckets[index] = COUNT.pack(count) + deflate(data) if count else b""
            assert self._size is not None
            self._size += count - before
        return deleted

    def blob(self, index: int) -> bytes:
        """Bucket ``index`` as it is packed now."""
        return self._buckets[index]

    def swap(self, index: int, old: bytes, new: bytes) -> bool:
        """Put ``new`` in place of bucket ``index`` if it is still ``old`` (the same object):
        for a bucket re-packed with the same records in another form, which must not undo a
        change made meanwhile. Tells whether it did."""
        if self._buckets[index] is not old:
            return False
        self._buckets[index] = new
        return True

    def items(self) -> Iterator[tuple[str, StoredRecord]]:
        """Every record, bucket by bucket (no particular order)."""
        for blob in self._buckets:
            yield from _unpack(blob).items()

    def ids(self) -> Iterator[bytes]:
        """Every id, bucket by bucket (no particular order): only the entries' headers are
        read, no record is taken out (half the time of :meth:`items` for the ids)."""
        for blob in self._buckets:
            if blob:
                yield from _ids(_inflate(blob))

    def _index(self, session_id: str) -> int:
        # CRC-32, not hash(): the bucket must not change between runs (PYTHONHASHSEED).
        return zlib.crc32(session_id.encode()) & self._mask


class IdOrder:
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


def converted(blob: bytes, convert: Callable[[str, bytes], bytes | None]) -> bytes | None:
    """The bucket ``blob`` with each record that ``convert`` gives another form (the same
    record) in that form; None when none has one."""
    records = _unpack(blob)
    changed = False
    for session_id, record in records.items():
        if (new := convert(session_id, record.raw)) is not None:
            records[session_id] = StoredRecord(record.revision, new)
            changed = True
    return _pack(records) if changed else None


def _pack(records: dict[str, StoredRecord]) -> bytes:
    return _compress([pack_entry(session_id.encode(), record.raw, record.revision)
                      for session_id, record in records.items()])


def pack_entry(key: bytes, raw: bytes, revision: int) -> bytes:
    return ENTRY.pack(len(key), len(raw), revision) + key + raw


def _compress(entries: list[bytes]) -> bytes:
    """A bucket of these packed entries (each id distinct)."""
    if not entries:
        return b""
    return COUNT.pack(len(entries)) + deflate(b"".join(entries))


def deflate(data: bytes) -> bytes:
    # Level 1: every change re-packs its bucket, on the standby and on the primary (which
    # follows its own writes), and level 6 took ~48 µs a bucket against ~15 µs, for buckets
    # ~10% smaller (the copy of 100,000 records: ~1.5 MB). Fixed Huffman codes: a bucket is
    # ~1.3 KB, too little for codes of its own to pay for the code tables that each inflate
    # then reads and builds. With 100,000 records, per bucket: inflate ~4 µs against ~8 (a
    # page of ListSessions inflates one bucket per record), deflate ~20 µs against ~24, and
    # the buckets 7.4 MB against 7.0. Any level and strategy inflate the same way.
    deflate = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, 8, _STRATEGY, _DICTIONARY)
    return deflate.compress(data) + deflate.flush()


def _inflate(blob: bytes) -> bytes:
    inflate = zlib.decompressobj(_WBITS, _DICTIONARY)
    return inflate.decompress(memoryview(blob)[COUNT.size :]) + inflate.flush()


def _locate(data: bytes, key: bytes) -> tuple[int, int, int] | None:
    """Where the entry of ``key`` lies in inflated bucket ``data`` (its start, the start of
    its record, its end), or None."""
    offset, end = 0, len(data)
    while offset < end:
        id_length, raw_length, _ = ENTRY.unpack_from(data, offset)
        record = offset + ENTRY.size + id_length
        if id_length == len(key) and data.startswith(key, offset + ENTRY.size):
            return offset, record, record + raw_length
        offset = record + raw_length
    return None


def _spliced(data: bytes, key: bytes, entry: bytes | None) -> tuple[bytes, int]:
    """Inflated bucket ``data`` with the entry of ``key`` replaced by ``entry`` in its place,
    or removed (None), or ``entry`` added at the end when ``key`` has none; and the change in
    the number of entries. The same bytes as unpacking the entries into a dict, changing it
    and packing it again, without taking every entry out."""
    if (found := _locate(data, key)) is not None:
        start, _, end = found
        return data[:start] + (entry or b"") + data[end:], 0 if entry else -1
    return (data, 0) if entry is None else (data + entry, 1)


def _find(blob: bytes, key: bytes) -> StoredRecord | None:
    """The record of one id in a bucket: only its entry is taken out (a page of 1,000 asks a
    thousand buckets for one record each)."""
    if not blob:
        return None
    data = _inflate(blob)
    if (found := _locate(data, key)) is None:
        return None
    start, record, end = found
    return StoredRecord(ENTRY.unpack_from(data, start)[2], data[record:end])


def _ids(data: bytes) -> Iterator[bytes]:
    """The ids of inflated bucket ``data``, in their order there."""
    offset, end = 0, len(data)
    while offset < end:
        id_length, raw_length, _ = ENTRY.unpack_from(data, offset)
        start = offset + ENTRY.size
        yield data[start : start + id_length]
        offset = start + id_length + raw_length


def _unpack(blob: bytes) -> dict[str, StoredRecord]:
    if not blob:
        return {}
    data = _inflate(blob)
    records = {}
    offset = 0
    while offset < len(data):
        id_length, raw_length, revision = ENTRY.unpack_from(data, offset)
        offset += ENTRY.size
        session_id = data[offset : offset + id_length].decode()
        offset += id_length
        records[session_id] = StoredRecord(revision, data[offset : offset + raw_length])
        offset += raw_length
    return records


def _bucket_size(blob: bytes) -> int:
    return COUNT.unpack_from(blob)[0] if blob else 0
