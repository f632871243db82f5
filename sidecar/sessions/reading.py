"""The read side of the session copy: :class:`StoreReads`, which
:class:`~sidecar.sessions.store.SessionStore` is made of beside its apply and flush side.

Every read takes the lock only to copy the bucket list (immutable bytes) and the revision, then
unpacks outside it, so a read sees the records at exactly one revision and never holds up the
follower applying the next change.

Nothing here touches etcd, the network or the files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from sidecar.api.session_pb2 import Session
from sidecar.sessions.recordcheck import merge_kept
from sidecar.sessions.table import IdOrder, RecordTable, StoredRecord


class StoreReads:
    """Reads of the copy in memory. The state is the store's, guarded by its ``_lock``."""

    _lock: threading.Lock
    _table: RecordTable
    _revision: int
    _durable_revision: int
    _applied_at: float | None
    _applied_mono: float | None
    # The ids in order for page(), built on demand; for the table and id set of the key.
    _order: IdOrder | None
    _order_key: tuple[int, int]

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
        if order is None:  # the first page since the set of ids changed: ~0.1 s for 100,000
            order = IdOrder(table.ids())
            with self._lock:
                if (self._table.serial, self._table.id_changes) == key:
                    self._order, self._order_key = order, key
        chosen = [(i, table.get(i)) for i in order.after(after.encode(), limit)]
        return revision, [(i, record) for i, record in chosen if record is not None]

    def sessions(self) -> list[Session]:
        """Every record as a message, with its revision, ordered by session id."""
        result = []
        for session_id, record in self.snapshot().items():
            session = Session(revision=record.revision)
            merge_kept(session, session_id, record.raw)
            result.append(session)
        return result
