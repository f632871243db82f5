"""Reading the local copy one page at a time (ListSessions with a page_size)."""

from __future__ import annotations

import random
from pathlib import Path

from sidecar.sessions.record import encode_session
from sidecar.sessions.store import SessionStore

from .. import builders


def record(session_id: str) -> bytes:
    return encode_session(builders.session(session_id, placed=False))


def filled(tmp_path: Path, ids: list[str]) -> SessionStore:
    # Few buckets, so that ids in id order lie in many different buckets and in each bucket
    # out of order: a page must be put together across all of them.
    store = SessionStore(tmp_path / "copy", buckets=4)
    store.load()
    for revision, session_id in enumerate(ids, start=1):
        store.apply_put(session_id, record(session_id), revision)
    return store


def test_pages_give_every_record_once_in_id_order(tmp_path: Path) -> None:
    ids = [f"s{n:03d}" for n in range(200)]
    shuffled = random.Random(4).sample(ids, len(ids))
    store = filled(tmp_path, shuffled)
    seen: list[str] = []
    after = ""
    while True:
        revision, page = store.page(after, 7)
        assert revision == 200
        assert [session_id for session_id, _ in page] == sorted(ids)[len(seen):len(seen) + 7]
        seen += [session_id for session_id, _ in page]
        if len(page) < 7:
            break
        after = page[-1][0]
    assert seen == sorted(ids)
    assert store.page(seen[-1], 7) == (200, [])


def test_a_page_carries_each_record_and_its_revision(tmp_path: Path) -> None:
    store = filled(tmp_path, ["b", "a", "c"])
    revision, page = store.page("a", 10)
    assert revision == 3
    assert [(i, r.raw, r.revision) for i, r in page] == [
        ("b", record("b"), 1), ("c", record("c"), 3)]


def test_a_page_skips_deleted_records_and_sees_later_puts(tmp_path: Path) -> None:
    store = filled(tmp_path, ["a", "b", "c"])
    store.apply_delete("b", 4)
    store.apply_put("ab", record("ab"), 5)
    assert [i for i, _ in store.page("", 10)[1]] == ["a", "ab", "c"]
    assert store.page("", 10)[0] == 5


def test_the_order_follows_new_and_deleted_ids_but_survives_updates(tmp_path: Path) -> None:
    """The ids in order are kept between pages; a new id or a deleted one is seen at once,
    also after a full re-read, and an update of a held record keeps the order it had."""
    store = filled(tmp_path, ["b", "d"])
    assert [i for i, _ in store.page("", 10)[1]] == ["b", "d"]
    kept = store._order
    store.apply_put("b", record("b"), 3)  # same ids
    assert [(i, r.revision) for i, r in store.page("", 10)[1]] == [("b", 3), ("d", 2)]
    assert store._order is kept
    store.apply_put("c", record("c"), 4)
    assert [i for i, _ in store.page("", 10)[1]] == ["b", "c", "d"]
    store.apply_delete("b", 5)
    assert [i for i, _ in store.page("", 10)[1]] == ["c", "d"]
    store.replace_all([("a", record("a"), 6)], 6)
    assert store.page("", 10) == (6, [("a", store.get("a"))])
