"""A whole new copy of the session records, taken record by record during a full re-read of
etcd, and packed into a :class:`~sidecar.sessions.table.RecordTable` that the store swaps in."""

from __future__ import annotations

import itertools
import mmap
import zlib
from array import array
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Self

from sidecar.sessions.record import validate_session_id
from sidecar.sessions.table import COUNT, ENTRY, RecordTable, deflate, pack_entry

# The size of each memory map a Replacement packs records into (~9,000 records of ~450 bytes).
_SPILL_CHUNK: Final = 4 * 1024 * 1024
# Replacement.build packs this many buckets at a time (~6,000 records of ~450 bytes: 3 MB of
# entries held at once), compressing them in this many threads (the machine's 2 cores).
_BUILD_STEP: Final = 1024
_BUILD_THREADS: Final = 2


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
        entry = pack_entry(key, raw, mod_revision)
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

    def build(self, buckets: int) -> RecordTable:
        """The table of every record taken, each bucket packed once.

        Buckets are packed ``_BUILD_STEP`` at a time: their entries gathered in this thread,
        then compressed in ``_BUILD_THREADS`` threads, which zlib lets run at once (it releases
        the GIL while it compresses, two thirds of the work). Gathering and compressing take
        turns rather than overlap: a thread that gathers holds the GIL, and the compressing
        threads, which need it briefly between buckets, would wait up to the interpreter's
        switch interval (5 ms) for it each time.
        """
        blobs = RecordTable.empty(buckets).bucket_list()
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
                    blobs[index] = COUNT.pack(count) + body
        return RecordTable(blobs)

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
    return [deflate(data) for data in buckets]


def _distinct(entries: Iterable[bytes]) -> list[bytes]:
    """Packed entries with one per id, the last of each."""
    by_id = {}
    for entry in entries:
        id_length = ENTRY.unpack_from(entry)[0]
        by_id[entry[ENTRY.size : ENTRY.size + id_length]] = entry
    return list(by_id.values())
