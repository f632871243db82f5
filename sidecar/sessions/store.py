"""The standby's durable local copy of the session records.

The copy is not the source of truth (etcd is): it lets a restarted standby resume its watch from
the revision it had reached instead of re-reading everything, and it answers reads, marked
stale, while etcd is unreachable. So the rule it keeps is *consistency*, not completeness: the
records on disk are always exactly those at the revision stored beside them. Losing the newest
changes in a crash only makes the watch resume a little earlier; etcd replays them.

Files, in the data directory (mode 0700, files 0600: they hold user names and addresses):
``sessions.snapshot`` (:mod:`sidecar.sessions.snapshot`), every record at one revision, and
``sessions.journal`` (:mod:`sidecar.sessions.journal`), the changes since that snapshot, both
made of CRC-checked frames (:mod:`sidecar.sessions.frames`). ``flush()`` writes a new snapshot
(*compaction*) instead of appending when the journal has grown past the snapshot's size (and at
least ``compact_bytes``), after ``replace_all()``, and after a load or a write that found the
files damaged. So the bytes written stay within about twice the bytes changed, and a load reads
about two snapshots at most.

Why a journal rather than a full snapshot on every flush: with 100,000 records a snapshot is
~14 MB and 30-70 ms, against ~0.5 ms for appending a 100-change batch. A snapshot written at
most every N ms by a background flusher would be consistent too, but under steady churn it
would rewrite 14 MB every N ms (disk wear, CPU) and still leave the disk N ms behind.

Memory: the records are held packed in compressed buckets (:mod:`sidecar.sessions.table`); a
full re-read fills a :class:`~sidecar.sessions.replacement.Replacement` swapped in at once.

This module applies changes and writes the files; reading the files back at start-up is
:mod:`sidecar.sessions.loading`, and the reads of the copy in memory (get, records, pages) are
:class:`~sidecar.sessions.reading.StoreReads`, which the store is made of.

Thread safety: the apply and read methods may be called from the event loop while ``flush()``
runs in a worker thread; a lock guards the in-memory state, and ``flush()`` holds it only to take
the pending batch (or a copy of the bucket list for a snapshot), not while writing.

Nothing here touches etcd or the network.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Self

from sidecar.atomicfile import atomic_write
from sidecar.sessions.journal import (
    JOURNAL_NAME,
    Batch,
    commit_frame,
    delete_frame,
    journal_header,
    put_frame,
)
from sidecar.sessions.loading import Loaded, LoadReport, load_copy
from sidecar.sessions.reading import StoreReads
from sidecar.sessions.record import validate_session_id
from sidecar.sessions.replacement import Replacement
from sidecar.sessions.snapshot import SNAPSHOT_NAME, Image, snapshot_pieces
from sidecar.sessions.table import DEFAULT_BUCKETS, RecordTable, StoredRecord, converted

DEFAULT_COMPACT_BYTES: Final = 8 * 1024 * 1024


class StoreError(Exception):
    """The data directory cannot be read or written, or a change is out of order."""



class SessionStore(StoreReads):
    """Records (session id -> record and mod revision) and the etcd revision they reflect.

    The store keeps each record as the bytes it is given; the follower gives it the serialized
    ``Session`` (:func:`~sidecar.sessions.recordcheck.check_record`), not the JSON etcd holds,
    so a listing or a snapshot parses ready wire bytes instead of decoding JSON (~1 µs a record
    against ~25). Files of the earlier form (format 1, JSON records) are not read: see
    :meth:`load`.

    Call ``load()`` once before use. Feed it with ``apply_put`` / ``apply_delete`` (revisions
    never go down; several changes may share one revision) or ``replace`` / ``replace_all``
    (a full re-read), and call
    ``flush()`` after each complete etcd watch response, so that the revision on disk always
    means "every change up to here": the watch can then resume at ``applied_revision + 1``.

    Measured on the development machine (2 shared cores, virtio disk), with the records still
    kept as JSON (format 1; format 2's are about 40% of that size), 100,000 records of
    ~510 bytes of JSON (random names and addresses, 40 agents): the copy takes 14 MB in memory
    (143 bytes a record, tracemalloc); a process with the sidecar's libraries imported is at
    53 MB RSS, 66 MB with the copy loaded, 72 MB after replaying a journal at the compaction
    threshold. Load 0.03 s from a fresh snapshot, 1.7 s with a full journal (~22,000 changes);
    full snapshot (the flush after replace_all, or a compaction) 30-70 ms, 13.7 MB on disk;
    apply_put ~80 µs; flush of a 100-change batch 0.5 ms; replace_all 1.0 s (it may run in a
    worker thread; 0.7 s of it building the copy from a Replacement, which holds the records
    meanwhile in memory maps it gives back: +45 MB at the peak, nothing after); snapshot()
    0.45 s.
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
        self._table = RecordTable.empty(self._bucket_count)
        self._order = None  # see StoreReads
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
        copy starts empty at revision 0; so does a copy of an earlier format, removed with a
        warning (``store_format_old``). That is safe, because an empty copy makes the caller
        re-read everything from etcd, and better than refusing to start, which would leave the
        cluster without a standby until someone repairs the file by hand. A damaged journal is
        moved aside too, leaving the snapshot's state; a torn journal end (a crash in the middle
        of a flush) is dropped. Raises StoreError when the directory cannot be read at all.
        """
        with self._flush_lock, self._lock:
            self._close_journal()
            self._reset()
            try:
                loaded = load_copy(self._dir)
                self._adopt(loaded)
                if not self._needs_snapshot:
                    self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - until close()
            except OSError as exc:
                self._reset()
                raise StoreError(f"cannot read the session copy in {self._dir}: {exc}") from exc
            return loaded.report

    def _adopt(self, loaded: Loaded) -> None:
        if loaded.table is None:
            return  # the empty copy of _reset()
        self._table = loaded.table
        self._revision = self._durable_revision = loaded.revision
        self._applied_at = loaded.applied_at
        self._generation = loaded.generation
        self._snapshot_bytes, self._journal_bytes = loaded.snapshot_bytes, loaded.journal_bytes
        self._needs_snapshot = loaded.needs_snapshot


    # -- applying changes -----------------------------------------------------------------------

    def apply_put(self, session_id: str, raw: bytes, revision: int) -> None:
        """Record that etcd holds the record ``raw`` (in the form the copy keeps, see
        :func:`~sidecar.sessions.recordcheck.check_record`) under ``session_id`` since
        ``revision``."""
        validate_session_id(session_id)
        with self._lock:
            self._check_order(revision)
            self._table.update({session_id: StoredRecord(revision, raw)})
            self._pending.append(put_frame(session_id, revision, raw))
            self._mark_applied(revision)

    def apply_delete(self, session_id: str, revision: int) -> bool:
        """Record that etcd deleted ``session_id`` at ``revision``; tell whether it was held."""
        validate_session_id(session_id)
        with self._lock:
            self._check_order(revision)
            held = self._table.update({session_id: None}) > 0
            self._pending.append(delete_frame(session_id, revision))
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
        """Replace the whole copy with ``(session id, record, mod revision)`` tuples read at
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

    def convert(self, convert: Callable[[str, bytes], bytes | None]) -> int:
        """Re-pack, bucket by bucket, each record that ``convert`` gives another form (the
        same record: after a full re-read, the JSON it took into the form it keeps); return how
        many buckets changed. Blocking (~0.7 s for 100,000 records): call it from a worker
        thread. Applies and reads go on meanwhile; a bucket they changed is left as it is, and
        a copy replaced meanwhile ends the pass. The next flush writes a whole snapshot."""
        with self._lock:
            table = self._table
        changed = 0
        for index in range(table.bucket_count):
            with self._lock:
                if self._table is not table:
                    break
                blob = table.blob(index)
            new = converted(blob, convert)
            if new is not None:
                with self._lock:
                    changed += table.swap(index, blob, new)
        if changed:
            with self._lock:
                self._needs_snapshot = True
        return changed

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

    def _take_work(self) -> Image | Batch | None:
        if self._needs_snapshot or self._journal_full():
            self._needs_snapshot = self._dirty = False
            self._pending = []  # already part of the buckets copied here
            return Image(
                generation=uuid.uuid4().hex,
                revision=self._revision,
                applied_at=self._applied_at,
                records=len(self._table),
                buckets=self._table.bucket_list(),
            )
        if not self._dirty:
            return None
        frames = [*self._pending, commit_frame(self._revision, self._applied_at)]
        self._pending, self._dirty = [], False
        return Batch(frames=frames, revision=self._revision)

    def _journal_full(self) -> bool:
        pending = sum(len(frame) for frame in self._pending)
        return self._journal_bytes + pending > max(self._compact_bytes, self._snapshot_bytes)

    def _write(self, work: Image | Batch) -> None:
        if isinstance(work, Image):
            self._write_snapshot(work)
        else:
            self._append(work.frames)

    def _write_snapshot(self, image: Image) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._close_journal()
        atomic_write(self.snapshot_path, snapshot_pieces(image))
        self._generation = image.generation
        self._snapshot_bytes = self.snapshot_path.stat().st_size
        # A crash here leaves the old journal; it names the old generation, so load ignores it.
        header = journal_header(image.generation)
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
