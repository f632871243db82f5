"""The packed table of records: a change re-packs its bucket by splicing the changed entry into
the bucket's bytes. Checked against a plain dict (what the table holds, its size, the deleted
count, the changes to the set of ids) and against the way buckets were re-packed before
(every entry unpacked into a dict, changed, packed again): the buckets must come out byte for
byte the same, since snapshots store them as they are."""

from __future__ import annotations

import zlib
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.sessions import table as packed
from sidecar.sessions.table import RecordTable, StoredRecord

BUCKETS = 4


def _longer_in_the_same_bucket(session_id: str) -> str:
    """An id that starts with ``session_id`` and lands in its bucket: a search that matched
    an entry by its beginning alone would take one for the other."""
    bucket = zlib.crc32(session_id.encode()) % BUCKETS
    return next(longer for longer in (f"{session_id}{n}" for n in range(100))
                if zlib.crc32(longer.encode()) % BUCKETS == bucket)


_PLAIN = [f"s{n}" for n in range(10)]
IDS = st.sampled_from(_PLAIN + [_longer_in_the_same_bucket(i) for i in _PLAIN[:3]])
# Records that may hold an id's bytes, or look like an entry's header.
RAWS = st.one_of(st.binary(max_size=40), st.sampled_from([b"s1", b"s1x", b"\x02\x00s1"]))
CHANGE = st.tuples(IDS, st.one_of(st.none(), st.tuples(st.integers(1, 10**6), RAWS)))
BATCHES = st.lists(st.lists(CHANGE, min_size=1, max_size=5), max_size=25)


def _before(buckets: list[bytes], changes: dict[str, StoredRecord | None]) -> list[bytes]:
    """The buckets as the table re-packed them before splicing."""
    out = list(buckets)
    by_bucket: defaultdict[int, list[str]] = defaultdict(list)
    for session_id in changes:
        by_bucket[RecordTable(out)._index(session_id)].append(session_id)
    for index, ids in by_bucket.items():
        records = packed._unpack(out[index])
        for session_id in ids:
            if (record := changes[session_id]) is None:
                records.pop(session_id, None)
            else:
                records[session_id] = record
        out[index] = packed._pack(records)
    return out


@settings(max_examples=300, deadline=None)
@given(BATCHES)
def test_a_change_spliced_into_its_bucket_is_what_unpacking_and_packing_gave(
    batches: list[list[tuple[str, tuple[int, bytes] | None]]],
) -> None:
    table = RecordTable.empty(BUCKETS)
    model: dict[str, StoredRecord] = {}
    for batch in batches:
        changes = {i: None if v is None else StoredRecord(*v) for i, v in batch}
        expected = _before(table.bucket_list(), changes)
        held_before, ids_before = set(model), table.id_changes
        deleted = table.update(changes)
        for session_id, record in changes.items():
            if record is None:
                model.pop(session_id, None)
            else:
                model[session_id] = record
        assert table.bucket_list() == expected
        assert deleted == sum(1 for i, r in changes.items() if r is None and i in held_before)
        assert table.id_changes - ids_before == len(held_before ^ set(model))
        assert dict(table.items()) == model
        assert sorted(table.ids()) == sorted(i.encode() for i in model)
        assert len(table) == len(model)
        assert all(table.get(i) == r for i, r in model.items())


def _packed_as_before(records: dict[str, StoredRecord]) -> bytes:
    """A bucket as releases before fixed Huffman codes packed it (dynamic codes): snapshots
    written by them hold such buckets, and a copy loaded from one keeps them until changed."""
    data = b"".join(packed.pack_entry(i.encode(), r.raw, r.revision) for i, r in records.items())
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY,
                               packed._DICTIONARY)
    return packed.COUNT.pack(len(records)) + deflate.compress(data) + deflate.flush()


def test_buckets_packed_by_earlier_releases_are_read_and_changed_alike() -> None:
    """The strategy is no part of the format: a table of dynamic-code buckets (an older
    snapshot) reads every record, and a change re-packs just its bucket, with fixed codes."""
    records = {f"s{n}": StoredRecord(n + 1, b"record %d " % n * 20) for n in range(40)}
    buckets: list[list[str]] = [[] for _ in range(BUCKETS)]
    for session_id in records:
        buckets[zlib.crc32(session_id.encode()) % BUCKETS].append(session_id)
    old = [_packed_as_before({i: records[i] for i in ids}) for ids in buckets]
    table = RecordTable(list(old))
    assert dict(table.items()) == records
    assert sorted(table.ids()) == sorted(i.encode() for i in records)
    assert all(table.get(i) == r for i, r in records.items())
    changed = StoredRecord(99, b"changed")
    table.update({"s3": changed, "s4": None})
    expected = {**records, "s3": changed}
    del expected["s4"]
    assert dict(table.items()) == expected
    touched = {zlib.crc32(i.encode()) % BUCKETS for i in ("s3", "s4")}
    now = table.bucket_list()
    assert [now[b] == old[b] for b in range(BUCKETS)] == [b not in touched
                                                          for b in range(BUCKETS)]
    assert all(now[b] != _packed_as_before(dict(packed._unpack(now[b]))) for b in touched)
