"""Reading the store's files back at start-up: the snapshot, then the journal's committed
batches on top of it (:class:`~sidecar.sessions.store.SessionStore` keeps the result).

Whatever is wrong with the files, the result is a consistent copy: a damaged snapshot is moved
aside and the copy is empty; a damaged journal is moved aside and the copy is the snapshot's; a
torn journal end is dropped; a copy of an earlier format is removed. An empty or older copy
only makes the follower re-read from etcd. OSError (the directory cannot be read) is left to
the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from sidecar.sessions.frames import Damaged, OldFormat
from sidecar.sessions.journal import JOURNAL_NAME, read_journal
from sidecar.sessions.snapshot import SNAPSHOT_NAME, read_snapshot
from sidecar.sessions.table import RecordTable

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What ``load()`` found, for the caller to log and count."""

    records: int
    revision: int
    quarantined: tuple[Path, ...] = ()  # damaged files moved aside
    dropped_journal_bytes: int = 0  # the torn end of the journal, ignored


@dataclass(slots=True)
class Loaded:
    """The copy read back, and the state of its files."""

    report: LoadReport
    table: RecordTable | None = None  # None: the copy is empty
    revision: int = 0
    applied_at: float | None = None
    generation: str = ""
    snapshot_bytes: int = 0
    journal_bytes: int = 0
    needs_snapshot: bool = True  # the next flush writes a whole snapshot, not a journal batch


def load_copy(data_dir: Path) -> Loaded:
    """The copy held in ``data_dir``; an empty one when there is none or it is unusable."""
    snapshot_path, journal_path = data_dir / SNAPSHOT_NAME, data_dir / JOURNAL_NAME
    empty = Loaded(LoadReport(records=0, revision=0))
    if not data_dir.is_dir():
        return empty
    _remove_temporary_files(data_dir)
    if not snapshot_path.exists():
        if journal_path.exists():
            # A journal means nothing without its snapshot; the next flush replaces it.
            log.warning("store_journal_without_snapshot", path=str(journal_path))
        return empty
    try:
        snapshot = read_snapshot(snapshot_path)
    except OldFormat as exc:
        _drop_old_format(data_dir, str(exc))
        return empty
    except Damaged as exc:
        moved = _quarantine(str(exc), snapshot_path, journal_path)
        return Loaded(LoadReport(records=0, revision=0, quarantined=moved))
    loaded = Loaded(
        report=empty.report,
        table=snapshot.table,
        revision=snapshot.revision,
        applied_at=snapshot.applied_at,
        generation=snapshot.generation,
        snapshot_bytes=snapshot_path.stat().st_size,
        needs_snapshot=False,
    )
    _replay_journal(journal_path, loaded, snapshot.table)
    return loaded


def _replay_journal(path: Path, loaded: Loaded, table: RecordTable) -> None:
    """Replay the committed batches of the journal at ``path`` into ``table``."""
    try:
        replayed = read_journal(path, loaded.generation, table, loaded.revision,
                                loaded.applied_at)
    except Damaged as exc:
        # The snapshot alone is consistent: carry on from it.
        loaded.needs_snapshot = True
        moved = _quarantine(str(exc), path)
        loaded.report = LoadReport(len(table), loaded.revision, quarantined=moved)
        return
    dropped = 0
    if replayed is None:  # none, or one that the snapshot holds all of
        loaded.needs_snapshot = True
    else:
        loaded.revision, loaded.applied_at = replayed.revision, replayed.applied_at
        loaded.journal_bytes = replayed.end
        dropped = replayed.size - replayed.end
        if dropped:
            loaded.needs_snapshot = True  # start a clean journal rather than append after garbage
            log.warning("store_journal_torn", path=str(path), dropped_bytes=dropped)
    loaded.report = LoadReport(len(table), loaded.revision, dropped_journal_bytes=dropped)


def _drop_old_format(data_dir: Path, reason: str) -> None:
    """Files an earlier version wrote (format 1: JSON records) are removed rather than
    converted: an empty copy makes the follower re-read every record from etcd, ~2.5 s for
    100,000, where converting would need the JSON decoding this format exists to avoid."""
    for name in (SNAPSHOT_NAME, JOURNAL_NAME):
        (data_dir / name).unlink(missing_ok=True)
    log.warning("store_format_old", reason=reason, data_dir=str(data_dir),
                consequence="copy removed; re-reading every record from etcd")


def _remove_temporary_files(data_dir: Path) -> None:
    # Left by a crash in atomic_write; never renamed into place, so never part of the copy.
    for name in (SNAPSHOT_NAME, JOURNAL_NAME):
        for leftover in data_dir.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _quarantine(reason: str, *paths: Path) -> tuple[Path, ...]:
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
