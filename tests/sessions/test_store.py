"""The standby's durable local copy: persistence, crash safety, full re-reads."""

from __future__ import annotations

import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sidecar.api.session_pb2 import Session
from sidecar.sessions import replacement as replacement_module
from sidecar.sessions.journal import JOURNAL_NAME
from sidecar.sessions.record import check_record, encode_session, kept_form
from sidecar.sessions.replacement import Replacement
from sidecar.sessions.snapshot import SNAPSHOT_NAME
from sidecar.sessions.store import SessionStore, StoreError
from sidecar.sessions.table import RecordTable, StoredRecord

from .. import builders


def record(session_id: str, user: str = "alice") -> bytes:
    """A record in the form the copy keeps it (what the follower gives the store)."""
    raw = encode_session(builders.session(session_id, placed=False, username=user))
    return check_record(raw, session_id)


def open_store(data_dir: Path, **options: int) -> SessionStore:
    store = SessionStore(data_dir, **options)
    store.load()
    return store


def contents(store: SessionStore) -> dict[str, tuple[int, bytes]]:
    return {key: (rec.revision, rec.raw) for key, rec in store.snapshot().items()}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "copy"


def test_missing_directory_loads_empty_without_creating_anything(data_dir: Path) -> None:
    """A first start finds nothing: an empty copy at revision 0, and nothing written yet."""
    store = SessionStore(data_dir)
    report = store.load()
    assert (report.records, report.revision, report.quarantined) == (0, 0, ())
    assert (len(store), store.applied_revision, store.age()) == (0, 0, None)
    assert not data_dir.exists()


def test_records_and_revision_survive_a_restart(data_dir: Path) -> None:
    """What was applied and flushed is there again after a restart, at the same revision."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 5)
        store.apply_put("s2", record("s2"), 6)
        store.flush()  # the first flush writes a snapshot
        store.apply_put("s1", record("s1", "bob"), 7)
        store.apply_delete("s2", 8)
        store.apply_put("s3", record("s3"), 8)  # same revision: one etcd transaction
        store.flush()  # later ones append to the journal
        applied_at = store.last_applied_at
    with open_store(data_dir) as again:
        assert contents(again) == {"s1": (7, record("s1", "bob")), "s3": (8, record("s3"))}
        assert (again.applied_revision, again.durable_revision) == (8, 8)
        assert again.last_applied_at == applied_at
        age = again.age()
        assert age is not None
        assert age >= 0


def test_files_are_private(data_dir: Path) -> None:
    """User names and addresses are readable by the owner only."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for name in (SNAPSHOT_NAME, JOURNAL_NAME):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600


def test_unflushed_changes_are_lost_but_the_copy_stays_consistent(data_dir: Path) -> None:
    """Without a flush nothing new is on disk; the old records come back with the old revision."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 3)
        store.flush()
        store.apply_put("s2", record("s2"), 4)
        store.apply_delete("s1", 4)
        assert store.durable_revision == 3
    with open_store(data_dir) as again:
        assert contents(again) == {"s1": (3, record("s1"))}
        assert again.applied_revision == 3


def test_reads(data_dir: Path) -> None:
    """get, in, len, records(), snapshot() (ordered by id) and sessions() (decoded) agree."""
    with open_store(data_dir) as store:
        for number, name in enumerate(["b", "c", "a"], start=1):
            store.apply_put(name, record(name), number)
        assert store.get("a") == StoredRecord(3, record("a"))
        assert store.get("zz") is None
        assert "a" in store
        assert "zz" not in store
        assert 5 not in store
        assert len(store) == 3
        assert list(store.snapshot()) == ["a", "b", "c"]
        assert sorted(key for key, _ in store.records()) == ["a", "b", "c"]
        sessions = store.sessions()
        assert [(s.session_id, s.revision, s.username) for s in sessions] == [
            ("a", 3, "alice"),
            ("b", 1, "alice"),
            ("c", 2, "alice"),
        ]


def test_a_copy_of_the_earlier_format_is_removed_and_re_read(data_dir: Path) -> None:
    """A data directory written by the version before (format 1: JSON records; a stored
    fixture) loads as an empty copy at revision 0, so the follower re-reads every record from
    etcd, with one warning that says so; its files are gone, none quarantined, and the next
    flush writes a copy of the current format that loads back."""
    shutil.copytree(Path(__file__).parent / "fixtures" / "format1", data_dir)
    with capture_logs() as logs:
        store = SessionStore(data_dir)
        report = store.load()
    assert (report.records, report.revision, report.quarantined) == (0, 0, ())
    assert [(e["event"], e["log_level"]) for e in logs] == [("store_format_old", "warning")]
    assert "re-reading every record from etcd" in logs[0]["consequence"]
    assert sorted(p.name for p in data_dir.iterdir()) == []
    store.apply_put("d", record("d"), 9)
    store.flush()
    store.close()
    with open_store(data_dir) as again:
        assert contents(again) == {"d": (9, record("d"))}


def test_records_of_a_re_read_are_converted_to_the_kept_form_in_place(data_dir: Path) -> None:
    """A re-read may hand the store etcd's JSON; convert(kept_form) re-packs every record in
    the kept form, each read the same message before and after, and the next flush writes the
    converted copy, which loads back."""
    taken = [(f"s{n}", encode_session(builders.session(f"s{n}", placed=False)), n + 1)
             for n in range(40)]
    with open_store(data_dir, buckets=8) as store:
        store.replace_all(taken, 50)
        before = store.sessions()
        assert {record.raw[:1] for record in store.snapshot().values()} == {b"{"}
        assert store.convert(kept_form) == 8
        expected = {i: (revision, check_record(raw, i)) for i, raw, revision in taken}
        assert contents(store) == expected
        assert store.sessions() == before
        assert store.convert(kept_form) == 0
        store.flush()
    with open_store(data_dir) as again:
        assert contents(again) == expected


def test_a_change_made_while_a_bucket_is_converted_is_kept(data_dir: Path) -> None:
    """A record applied while convert() re-packs its bucket is not undone by the conversion:
    that bucket is left as the change left it (its other records still JSON, read the same),
    and the next pass converts them."""
    taken = [(f"s{n}", encode_session(builders.session(f"s{n}", placed=False)), n + 1)
             for n in range(4)]
    with open_store(data_dir, buckets=1) as store:
        store.replace_all(taken, 10)

        def convert_after_a_change(session_id: str, raw: bytes) -> bytes | None:
            if store.applied_revision == 10:
                store.apply_put("s0", record("s0", user="bob"), 11)
            return kept_form(session_id, raw)

        assert store.convert(convert_after_a_change) == 0
        assert store.get("s0") == StoredRecord(11, record("s0", user="bob"))
        assert [s.username for s in store.sessions()] == ["bob", "alice", "alice", "alice"]
        assert store.convert(kept_form) == 1
        assert store.get("s3") == StoredRecord(4, check_record(taken[3][1], "s3"))


def test_delete_tells_whether_the_record_was_held(data_dir: Path) -> None:
    """Deleting is idempotent; the answer says whether there was something to delete."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        assert store.apply_delete("s1", 2) is True
        assert store.apply_delete("s1", 3) is False
        assert store.applied_revision == 3


def test_revisions_never_go_down(data_dir: Path) -> None:
    """A change older than the applied revision is a caller's bug and is refused."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 10)
        with pytest.raises(StoreError):
            store.apply_put("s2", record("s2"), 9)
        with pytest.raises(StoreError):
            store.apply_delete("s1", 9)
        with pytest.raises(StoreError):
            store.advance(9)
        with pytest.raises(ValueError, match="start at 1"):
            SessionStore(data_dir).apply_put("s1", record("s1"), 0)
        assert contents(store) == {"s1": (10, record("s1"))}


def test_bad_ids_are_refused(data_dir: Path) -> None:
    """Only well-formed session ids get in (they are etcd key segments)."""
    with open_store(data_dir) as store, pytest.raises(ValueError, match="session_id"):
        store.apply_put("a/b", record("a"), 1)


def test_advance_moves_the_resume_point_without_changes(data_dir: Path) -> None:
    """A progress notification advances the durable revision, keeping the records."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 2)
        store.flush()
        store.advance(50)
        store.flush()
    with open_store(data_dir) as again:
        assert (again.applied_revision, contents(again)) == (50, {"s1": (2, record("s1"))})


def test_replace_all_replaces_everything(data_dir: Path) -> None:
    """A full re-read drops records it does not include and may move the revision down."""
    with open_store(data_dir) as store:
        store.apply_put("old", record("old"), 90)
        store.flush()
        store.replace_all([("a", record("a"), 40), ("b", record("b"), 45)], 60)
        assert contents(store) == {"a": (40, record("a")), "b": (45, record("b"))}
        assert store.applied_revision == 60
        store.flush()
        store.apply_put("c", record("c"), 61)
        store.flush()
    with open_store(data_dir) as again:
        assert set(contents(again)) == {"a", "b", "c"}
        assert again.applied_revision == 61


def test_replace_all_refuses_records_newer_than_the_read(data_dir: Path) -> None:
    """A record whose mod revision is past the read's revision means the input is inconsistent."""
    with open_store(data_dir) as store, pytest.raises(ValueError, match="mod revision"):
        store.replace_all([("a", record("a"), 70)], 60)


def test_replace_all_without_flush_leaves_the_old_copy_on_disk(data_dir: Path) -> None:
    """A crash between a full re-read and its flush restarts from the old consistent copy."""
    with open_store(data_dir) as store:
        store.apply_put("old", record("old"), 9)
        store.flush()
        store.replace_all([("new", record("new"), 20)], 20)
    with open_store(data_dir) as again:
        assert (contents(again), again.applied_revision) == ({"old": (9, record("old"))}, 9)


def test_replacement_filled_page_by_page_leaves_the_copy_alone_until_replace(
    data_dir: Path,
) -> None:
    """A re-read in progress (records taken into a Replacement) changes nothing in memory or
    on disk; one abandoned half way (a crash, an etcd error) leaves the old copy at its old
    revision; replace() then switches to every new record and the new revision at once."""
    with open_store(data_dir) as store:
        store.apply_put("old", record("old"), 9)
        store.flush()
        with Replacement() as fresh:
            fresh.add("n1", record("n1"), 11)
            assert (contents(store), store.applied_revision) == ({"old": (9, record("old"))}, 9)
        with open_store(data_dir) as meanwhile:
            assert contents(meanwhile) == {"old": (9, record("old"))}
        with Replacement() as fresh:
            for n in range(500):
                fresh.add(f"n{n}", record(f"n{n}"), 10 + n)
            assert len(fresh) == 500
            store.replace(fresh, 600)
        assert store.applied_revision == 600
        assert contents(store) == {f"n{n}": (10 + n, record(f"n{n}")) for n in range(500)}
        store.flush()
    with open_store(data_dir) as again:
        assert (len(again), again.applied_revision) == (500, 600)


def test_replacement_keeps_the_last_record_of_an_id(data_dir: Path) -> None:
    """An id taken twice is held once, with the record taken last, and counted once."""
    with open_store(data_dir, buckets=4) as store, Replacement() as fresh:
        fresh.add("a", record("a", "first"), 3)
        fresh.add("b", record("b"), 4)
        fresh.add("a", record("a", "second"), 5)
        store.replace(fresh, 5)
        assert len(store) == 2
        assert contents(store) == {"a": (5, record("a", "second")), "b": (4, record("b"))}


def test_replacement_spans_several_memory_maps(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records spread over many spill chunks, and one larger than a chunk, all come back."""
    monkeypatch.setattr(replacement_module, "_SPILL_CHUNK", 1024)
    big = encode_session(Session(session_id="big", username="u" * 200,
                                 attributes={f"k{i}": "v" * 100 for i in range(20)}))
    assert len(big) > 1024
    with open_store(data_dir) as store, Replacement() as fresh:
        for n in range(40):
            fresh.add(f"s{n}", record(f"s{n}"), n + 1)
        fresh.add("big", big, 50)
        store.replace(fresh, 50)
        expected = {f"s{n}": (n + 1, record(f"s{n}")) for n in range(40)} | {"big": (50, big)}
        assert contents(store) == expected


@pytest.mark.parametrize("step", [1, 3, 64])
def test_replacement_packed_in_steps_and_threads_holds_every_record_once(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """However the buckets are split into steps and between the compressing threads, each
    record lands in its own bucket, the last taken of an id wins, and the buckets are those
    that packing each one alone gives."""
    monkeypatch.setattr(replacement_module, "_BUILD_STEP", step)
    taken = [(f"s{n % 150}", record(f"s{n % 150}", f"user{n}"), n + 1) for n in range(200)]
    with open_store(data_dir, buckets=16) as store, Replacement() as fresh:
        for session_id, raw, revision in taken:
            fresh.add(session_id, raw, revision)
        store.replace(fresh, 200)
        expected = {session_id: (revision, raw) for session_id, raw, revision in taken}
        assert contents(store) == expected
        assert len(store) == 150
        table = fresh.build(16)
    alone = RecordTable.empty(16)
    alone.update({session_id: StoredRecord(revision, raw) for session_id, raw, revision in taken})
    assert table.bucket_list() == alone.bucket_list()


def test_replacement_refuses_bad_ids_and_revisions() -> None:
    """What a copy may not hold is refused as it is taken."""
    with Replacement() as fresh:
        with pytest.raises(ValueError, match="session_id"):
            fresh.add("a/b", record("a"), 1)
        with pytest.raises(ValueError, match="mod revision"):
            fresh.add("a", record("a"), 0)
        assert len(fresh) == 0


def test_leftover_temporary_file_is_ignored_and_removed(data_dir: Path) -> None:
    """A crash while a snapshot was written leaves a temporary file; the old data is intact."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
    leftover = data_dir / f".{SNAPSHOT_NAME}.x1y2z3.tmp"
    leftover.write_bytes(b"VSMSNAP1 half a snapshot")
    with open_store(data_dir) as again:
        assert contents(again) == {"s1": (1, record("s1"))}
    assert not leftover.exists()


def test_torn_journal_end_is_dropped(data_dir: Path) -> None:
    """A crash in the middle of appending a batch loses that batch only, never more."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
        store.apply_put("s2", record("s2"), 2)
        store.flush()
        journal = data_dir / JOURNAL_NAME
        whole = journal.stat().st_size
        store.apply_put("s3", record("s3"), 3)
        store.apply_put("s4", record("s4"), 3)
        store.flush()
    full = journal.read_bytes()
    # Cut the last batch anywhere: after its first entry (no COMMIT), or inside an entry.
    for cut in (whole + 30, whole + (len(full) - whole) // 2, len(full) - 1):
        journal.write_bytes(full[:cut])
        with open_store(data_dir) as again:
            assert set(contents(again)) == {"s1", "s2"}, cut
            assert again.applied_revision == 2
        assert SessionStore(data_dir).load().dropped_journal_bytes == cut - whole


def test_store_goes_on_after_a_torn_journal(data_dir: Path) -> None:
    """After dropping a torn end the next flush starts clean, and later changes persist."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
        store.apply_put("s2", record("s2"), 2)
        store.flush()
    journal = data_dir / JOURNAL_NAME
    journal.write_bytes(journal.read_bytes()[:-5])
    with open_store(data_dir) as store:
        store.apply_put("s3", record("s3"), 3)
        store.flush()
    with open_store(data_dir) as again:
        assert set(contents(again)) == {"s1", "s3"}
        assert again.load().dropped_journal_bytes == 0


def test_flipped_bit_in_the_journal_drops_from_there(data_dir: Path) -> None:
    """A damaged entry ends the replay at the last intact COMMIT before it."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
        journal = data_dir / JOURNAL_NAME
        first_end = journal.stat().st_size
        store.apply_put("s2", record("s2"), 2)
        store.flush()
        store.apply_put("s3", record("s3"), 3)
        store.flush()
    data = bytearray(journal.read_bytes())
    data[first_end + 20] ^= 0x01  # inside the batch of revision 2
    journal.write_bytes(bytes(data))
    with open_store(data_dir) as again:
        assert set(contents(again)) == {"s1"}
        assert again.applied_revision == 1


def test_journal_of_an_older_snapshot_is_ignored(data_dir: Path) -> None:
    """A crash between writing a snapshot and starting its journal leaves the old journal,
    which the new snapshot already includes; replaying it would bring back stale records."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
        store.apply_put("s2", record("s2"), 2)
        store.flush()
        old_journal = (data_dir / JOURNAL_NAME).read_bytes()
        store.replace_all([("s9", record("s9"), 5)], 5)
        store.flush()  # a new snapshot and a new journal
    (data_dir / JOURNAL_NAME).write_bytes(old_journal)  # as if the crash came before the journal
    with open_store(data_dir) as again:
        assert (contents(again), again.applied_revision) == ({"s9": (5, record("s9"))}, 5)


def test_corrupt_snapshot_is_moved_aside_and_the_copy_starts_empty(data_dir: Path) -> None:
    """A snapshot that does not parse is kept for inspection; the copy is empty at revision 0,
    which makes the caller re-read everything from etcd."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
    snapshot = data_dir / SNAPSHOT_NAME
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    store = SessionStore(data_dir)
    report = store.load()
    assert (report.records, report.revision, len(store), store.applied_revision) == (0, 0, 0, 0)
    names = sorted(path.name for path in report.quarantined)
    assert [name.split(".corrupt-")[0] for name in names] == [JOURNAL_NAME, SNAPSHOT_NAME]
    assert all(path.exists() for path in report.quarantined)
    assert not snapshot.exists()
    store.replace_all([("s1", record("s1"), 7)], 7)
    store.flush()
    store.close()
    with open_store(data_dir) as again:
        assert contents(again) == {"s1": (7, record("s1"))}


@pytest.mark.parametrize(
    "garbage", [b"", b"not a snapshot at all", b"VSMSNAP1", b"VSMSNAP1\x05\x00\x00\x00"]
)
def test_any_unreadable_snapshot_is_quarantined(data_dir: Path, garbage: bytes) -> None:
    """Empty, foreign or truncated snapshot files are quarantined, never half-loaded."""
    data_dir.mkdir()
    (data_dir / SNAPSHOT_NAME).write_bytes(garbage)
    report = SessionStore(data_dir).load()
    assert (report.records, report.revision, len(report.quarantined)) == (0, 0, 1)


def test_corrupt_journal_header_keeps_the_snapshot(data_dir: Path) -> None:
    """A journal that cannot be read at all is moved aside; the snapshot's state remains."""
    with open_store(data_dir) as store:
        store.apply_put("s1", record("s1"), 1)
        store.flush()
        store.apply_put("s2", record("s2"), 2)
        store.flush()
    (data_dir / JOURNAL_NAME).write_bytes(b"garbage")
    with open_store(data_dir) as again:
        assert (contents(again), again.applied_revision) == ({"s1": (1, record("s1"))}, 1)


def test_compaction_rewrites_the_snapshot(data_dir: Path) -> None:
    """Once the journal outgrows the snapshot, a flush writes a new snapshot and journal."""
    with open_store(data_dir, compact_bytes=4096) as store:
        for revision in range(1, 200):
            store.apply_put(
                f"s{revision % 7}", record(f"s{revision % 7}", f"u{revision}"), revision
            )
            store.flush()
            assert (data_dir / JOURNAL_NAME).stat().st_size < 4096 + 1024
        expected = contents(store)
    with open_store(data_dir) as again:
        assert contents(again) == expected
        assert again.applied_revision == 199


def test_small_bucket_count_holds_many_records_per_bucket(data_dir: Path) -> None:
    """Records sharing a bucket are kept apart, changed and deleted one by one."""
    with open_store(data_dir, buckets=2) as store:
        for number in range(50):
            store.apply_put(f"s{number}", record(f"s{number}"), number + 1)
        for number in range(0, 50, 2):
            store.apply_delete(f"s{number}", 100)
        store.flush()
        expected = {f"s{n}": (n + 1, record(f"s{n}")) for n in range(1, 50, 2)}
        assert contents(store) == expected
    with open_store(data_dir, buckets=2) as again:
        assert contents(again) == expected
    with open_store(data_dir) as other_count:  # the snapshot's bucket count wins
        assert contents(other_count) == expected


def test_flush_failure_raises_and_the_next_flush_writes_everything(tmp_path: Path) -> None:
    """A write the disk refuses raises StoreError; nothing is silently dropped."""
    blocker = tmp_path / "copy"
    blocker.write_bytes(b"a file where the directory should be")
    store = SessionStore(blocker)
    store.load()
    store.apply_put("s1", record("s1"), 1)
    with pytest.raises(StoreError):
        store.flush()
    blocker.unlink()
    store.flush()
    store.close()
    with open_store(blocker) as again:
        assert contents(again) == {"s1": (1, record("s1"))}


def test_flush_in_a_thread_while_changes_arrive(data_dir: Path) -> None:
    """flush() may run in a worker thread while the event loop keeps applying changes."""
    store = open_store(data_dir, compact_bytes=16384)
    done = threading.Event()

    def flusher() -> None:
        while not done.is_set():
            store.flush()

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for revision in range(1, 2000):
            store.apply_put(f"s{revision % 50}", record(f"s{revision % 50}"), revision)
            if revision % 3 == 0:
                store.apply_delete(f"s{(revision + 7) % 50}", revision)
    finally:
        done.set()
        thread.join()
    store.flush()
    expected = contents(store)
    store.close()
    with open_store(data_dir) as again:
        assert contents(again) == expected
        assert again.applied_revision == 1999


def test_age_counts_from_the_last_change(data_dir: Path) -> None:
    """age() is None before any change and grows from the last one."""
    with open_store(data_dir) as store:
        assert store.age() is None
        store.apply_put("s1", record("s1"), 1)
        first = store.age()
        time.sleep(0.02)
        second = store.age()
        assert first is not None
        assert second is not None
        assert 0 <= first < second


def test_load_raises_when_the_directory_cannot_be_read(tmp_path: Path) -> None:
    """An unreadable data directory is an error, not an empty copy."""
    data_dir = tmp_path / "copy"
    data_dir.mkdir()
    (data_dir / SNAPSHOT_NAME).mkdir()  # reading it fails with IsADirectoryError
    with pytest.raises(StoreError, match="cannot read"):
        SessionStore(data_dir).load()


@pytest.mark.slow
def test_hundred_thousand_records_timing(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Figures for 100,000 records of ~450 bytes of JSON, printed, not asserted."""
    rng = random.Random(7)
    template = encode_session(
        Session(
            session_id="x" * 20,
            username="u" * 10,
            agent_hostname="agent00.example.org",
            agent_address="A" * 12,
            display=10,
            status="running",
            connection_status="connected",
            last_client_address="C" * 12,
            terminal_id="T" * 17,
            framebuffer_size="1920x1080",
            session_pid=123456,
            subcluster="default",
            attributes={"locale": "en_US.UTF-8", "client": "4.17.0"},
        )
    ).decode()
    records = []
    for number in range(100_000):
        session_id = f"agent{number % 40:02d}.example.org:{number + 10:06d}"
        raw = (
            template.replace("x" * 20, session_id)
            .replace("u" * 10, f"{rng.getrandbits(40):010x}")
            .replace("A" * 12, f"10.1.{rng.randrange(256):03d}.{rng.randrange(256):03d}")
            .replace("C" * 12, f"10.9.{rng.randrange(256):03d}.{rng.randrange(256):03d}")
            .replace("T" * 17, rng.getrandbits(48).to_bytes(6).hex(":"))
        )
        records.append((session_id, raw.encode(), number + 1))
    store = open_store(data_dir)
    started = time.monotonic()
    store.replace_all(records, 100_000)
    replaced = time.monotonic()
    store.flush()
    flushed = time.monotonic()
    for number in range(100):
        store.apply_put(records[number][0], records[number][1], 100_001 + number)
    store.flush()
    batch = time.monotonic()
    store.close()
    again = SessionStore(data_dir)
    again.load()
    loaded = time.monotonic()
    again.close()
    size = (data_dir / SNAPSHOT_NAME).stat().st_size
    assert len(again) == 100_000
    with capsys.disabled():
        print(
            f"\n100k records: replace_all {replaced - started:.2f} s, "
            f"snapshot flush {flushed - replaced:.2f} s ({size / 1e6:.1f} MB), "
            f"100 puts + flush {1000 * (batch - flushed):.1f} ms, load {loaded - batch:.2f} s"
        )


def test_temporary_files_of_other_names_are_left_alone(data_dir: Path) -> None:
    """Only the store's own leftovers are cleaned up."""
    data_dir.mkdir()
    other = data_dir / ".operator-notes.tmp"
    other.write_text("keep me")
    SessionStore(data_dir).load()
    assert other.read_text() == "keep me"


_WRITER = """
import sys
from pathlib import Path
from sidecar.sessions.store import SessionStore
store = SessionStore(Path(sys.argv[1]), compact_bytes=20_000)
store.load()
revision = start = store.applied_revision
while True:
    revision += 1
    key = f"s{revision % 13}"
    if revision % 5 == 0:
        store.apply_delete(key, revision)
    else:
        raw = f'{{"v":1,"session_id":"{key}","username":"u{revision}"}}'.encode()
        store.apply_put(key, raw, revision)
    if revision % 3 == 0:
        store.flush()
    if revision == start + 50:
        print("running", flush=True)
"""


def _model(revision: int) -> dict[str, tuple[int, bytes]]:
    """What the writer above has applied up to ``revision``."""
    state: dict[str, tuple[int, bytes]] = {}
    for number in range(1, revision + 1):
        key = f"s{number % 13}"
        if number % 5 == 0:
            state.pop(key, None)
        else:
            raw = f'{{"v":1,"session_id":"{key}","username":"u{number}"}}'.encode()
            state[key] = (number, raw)
    return state


@pytest.mark.parametrize("run_time", [0.05, 0.2, 0.4])
def test_killed_writer_leaves_a_consistent_copy(data_dir: Path, run_time: float) -> None:
    """A writer killed (SIGKILL) at any moment, mid-append or mid-snapshot, leaves exactly the
    records of some flushed revision on disk, and the copy goes on from there."""
    for _ in range(2):  # the second round starts from what the first one left
        command = [sys.executable, "-c", _WRITER, str(data_dir)]
        with subprocess.Popen(command, stdout=subprocess.PIPE) as writer:
            try:
                assert writer.stdout is not None
                assert writer.stdout.readline() == b"running\n"
                time.sleep(run_time)
            finally:
                writer.kill()
        with open_store(data_dir) as again:
            revision = again.applied_revision
            assert revision >= 48  # at least the flushes before "running"
            assert revision % 3 == 0  # a flush point
            assert contents(again) == _model(revision)
