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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Self

import structlog

from sidecar.api.session_pb2 import Session
from sidecar.atomicfile import atomic_write
from sidecar.sessions.frames import Damaged, OldFormat
from sidecar.sessions.journal import (
    JOURNAL_NAME,
    Batch,
    commit_frame,
    delete_frame,
    journal_header,
    put_frame,
    read_journal,
)
from sidecar.sessions.record import validate_session_id
from sidecar.sessions.replacement import Replacement
from sidecar.sessions.snapshot import SNAPSHOT_NAME, Image, read_snapshot, snapshot_pieces
from sidecar.sessions.table import DEFAULT_BUCKETS, IdOrder, RecordTable, StoredRecord

log = structlog.get_logger(__name__)

DEFAULT_COMPACT_BYTES: Final = 8 * 1024 * 1024


class StoreError(Exception):
    """The data directory cannot be read or written, or a change is out of order."""



@dataclass(frozen=True, slots=True)
class LoadReport:
    """What ``load()`` found, for the caller to log and count."""

    records: int
    revision: int
    quarantined: tuple[Path, ...] = ()  # damaged files moved aside
    dropped_journal_bytes: int = 0  # the torn end of the journal, ignored



class SessionStore:
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
        # The ids in order for page(), built on demand; for the table and id set of the key.
        self._order: IdOrder | None = None
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
        except OldFormat as exc:
            self._reset()
            self._drop_old_format(str(exc))
            return LoadReport(records=0, revision=0)
        except Damaged as exc:
            self._reset()
            moved = self._quarantine(str(exc), self.snapshot_path, self.journal_path)
            return LoadReport(records=0, revision=0, quarantined=moved)
        return self._load_journal()

    def _drop_old_format(self, reason: str) -> None:
        """Files an earlier version wrote (format 1: JSON records) are removed rather than
        converted: an empty copy makes the follower re-read every record from etcd, ~2.5 s for
        100,000, where converting would need the JSON decoding this format exists to avoid."""
        for path in (self.snapshot_path, self.journal_path):
            path.unlink(missing_ok=True)
        log.warning("store_format_old", reason=reason, data_dir=str(self._dir),
                    consequence="copy removed; re-reading every record from etcd")

    def _load_journal(self) -> LoadReport:
        try:
            dropped = self._read_journal()
        except Damaged as exc:
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
        snapshot = read_snapshot(self.snapshot_path)
        self._table = snapshot.table
        self._revision = self._durable_revision = snapshot.revision
        self._applied_at = snapshot.applied_at
        self._generation = snapshot.generation
        self._snapshot_bytes = self.snapshot_path.stat().st_size
        self._needs_snapshot = False

    def _read_journal(self) -> int:
        """Replay the committed batches of the journal; return how many bytes were torn off."""
        replayed = read_journal(
            self.journal_path, self._generation, self._table, self._revision, self._applied_at
        )
        if replayed is None:  # none, or one that the snapshot holds all of
            self._needs_snapshot = True
            return 0
        self._revision, self._applied_at = replayed.revision, replayed.applied_at
        self._durable_revision = self._revision
        self._journal_bytes = replayed.end
        if replayed.end < replayed.size:
            self._needs_snapshot = True  # start a clean journal rather than append after garbage
        return replayed.size - replayed.end

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
            revision, table = self._revision, RecordTable(self._table.bucket_list())
        return revision, table.items()

    def snapshot(self) -> dict[str, StoredRecord]:
        """Every record, ordered by session id. Holds them all unpacked: ~60 MB for 100,000."""
        return self.snapshot_at()[1]

    def snapshot_at(self) -> tuple[int, dict[str, StoredRecord]]:
        """The applied revision and every record at exactly that revision, ordered by id."""
        with self._lock:
            revision, table = self._revision, RecordTable(self._table.bucket_list())
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
            revision, table = self._revision, RecordTable(live.bucket_list())
            key = (live.serial, live.id_changes)
            order = self._order if self._order_key == key else None
        if order is None:  # the first page since the set of ids changed: ~0.2 s for 100,000
            order = IdOrder(session_id.encode() for session_id, _ in table.items())
            with self._lock:
                if (self._table.serial, self._table.id_changes) == key:
                    self._order, self._order_key = order, key
        chosen = [(i, table.get(i)) for i in order.after(after.encode(), limit)]
        return revision, [(i, record) for i, record in chosen if record is not None]

    def sessions(self) -> list[Session]:
        """Every record as a message, with its revision, ordered by session id."""
        result = []
        for record in self.snapshot().values():
            session = Session.FromString(record.raw)
            session.revision = record.revision
            result.append(session)
        return result
