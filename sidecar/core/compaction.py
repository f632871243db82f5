"""The primary compacts etcd's history, so that etcd's quota never fills (issue 15).

etcd keeps every revision of every key until it is compacted. The sessions file alone adds a
whole copy of the file per change, so an uncompacted etcd reaches its quota in days, and a full
etcd refuses the very transactions an election needs (NOSPACE: no lease, no campaign, no
failover).

Two triggers, checked every CHECK_PERIOD while this node is PRIMARY (:func:`plan`):

* the interval (``compaction_interval``): compact to ``compaction_keep`` revisions behind the
  current one, so a standby that was away a while resumes its watch instead of re-reading;
* the bytes (``compaction_max_bytes``): when the database *in use* has grown that much since
  the last compaction, compact at once up to the revision seen at the previous check (about a
  second of history kept, so live watches are never cut). Revisions alone cannot bound the
  bytes: 10,000 revisions of a 1 MiB file are 10 GB.

etcd's quota counts the size of its bbolt *file*, not the part in use; a compaction frees pages
inside the file for reuse but never shrinks it (only a defragmentation does, and it stalls the
member, so it is left to the operator). What keeps the file under the quota is therefore that
the data in use never grows by more than ``compaction_max_bytes`` (plus one check's writes)
above what it held after the last compaction: the file stays near its peak in-use size.

Only the primary compacts: one node is enough, and a deposed primary that compacts once more
does no harm (compaction removes old revisions only, never a current value).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ..etcd.client import Etcd
from ..etcd.errors import EtcdError
from ..etcd.maintenance import DbStatus, compact, db_status
from ..settings import Settings

log = structlog.get_logger(__name__)

CHECK_PERIOD = 1.0
INTERVAL = "interval"
BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class Plan:
    """Compact up to ``revision`` because of ``reason`` (INTERVAL or BYTES)."""

    revision: int
    reason: str


def plan(status: DbStatus, previous_revision: int, baseline: int, compacted: int,
         since_last: float, settings: Settings) -> Plan | None:
    """Whether to compact now, and to which revision (a pure function of what was measured).

    ``previous_revision``: the revision at the previous check; ``baseline``: the lowest size in
    use seen since the last compaction; ``compacted``: the revision last compacted to (0 when
    unknown); ``since_last``: seconds since the last compaction (or the promotion)."""
    kept_behind = status.revision - settings.compaction_keep
    if status.db_size_in_use - baseline >= settings.compaction_max_bytes:
        target = max(previous_revision, kept_behind)
        return Plan(target, BYTES) if target > compacted else None
    if since_last >= settings.compaction_interval:
        return Plan(kept_behind, INTERVAL) if kept_behind > compacted else None
    return None


class Compactor:
    """Compacts etcd while ``is_primary()`` says so; counts and remembers what it did."""

    def __init__(self, etcd: Etcd, settings: Settings, is_primary: Callable[[], bool]) -> None:
        self.etcd = etcd
        self.settings = settings
        self.is_primary = is_primary
        self.compactions = 0
        self.failures = 0
        self.compacted_revision = 0  # the last revision this node compacted to
        self.db: DbStatus | None = None  # the last Status read (PRIMARY only)

    async def run(self) -> None:
        """Check every CHECK_PERIOD; never ends (a failed call is logged and tried again)."""
        was_primary = False
        previous, baseline, last = 0, 0, time.monotonic()
        while True:
            await asyncio.sleep(CHECK_PERIOD)
            primary = self.is_primary()
            if not primary:
                was_primary = False
                continue
            try:
                status = await self.etcd.call(db_status, "etcd status")
            except EtcdError as exc:
                log.info("etcd_status_failed", error=str(exc))
                continue
            self.db = status
            if not was_primary:  # a new term: measure from here
                was_primary, previous, baseline, last = True, status.revision, \
                    status.db_size_in_use, time.monotonic()
                continue
            baseline = min(baseline, status.db_size_in_use)  # etcd frees in the background
            decided = plan(status, previous, baseline, self.compacted_revision,
                           time.monotonic() - last, self.settings)
            previous = status.revision
            if decided is None:
                if time.monotonic() - last >= self.settings.compaction_interval:
                    last = time.monotonic()  # nothing to compact yet: wait a whole interval
                continue
            if await self._compact(decided, status):
                baseline, last = status.db_size_in_use, time.monotonic()

    async def _compact(self, decided: Plan, status: DbStatus) -> bool:
        started = time.monotonic()
        try:
            done = await self.etcd.call(lambda client: compact(client, decided.revision),
                                        "compact")
        except EtcdError as exc:
            self.failures += 1
            log.warning("etcd_compaction_failed", revision=decided.revision, error=str(exc),
                        decision="try again at the next check")
            return False
        self.compacted_revision = decided.revision
        if not done:
            log.info("etcd_compaction_skipped", revision=decided.revision,
                     reason="etcd had compacted past it already")
            return True
        self.compactions += 1
        log.info("etcd_compacted", revision=decided.revision, reason=decided.reason,
                 kept=status.revision - decided.revision, db_size=status.db_size,
                 db_size_in_use=status.db_size_in_use,
                 seconds=round(time.monotonic() - started, 4))
        return True
