"""The session mirror in-process against real etcd: guarded group-commit writes (rule 2), the
follower and its durable copy, and the promotion gate (rule 5)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog

from sidecar.api.session_pb2 import Session
from sidecar.config import Settings
from sidecar.core.node import Node
from sidecar.core.roles import NotPrimary, Role, RoleView
from sidecar.etcd.client import Etcd
from sidecar.etcd.election import Election
from sidecar.etcd.keys import Keys
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.sessions import follower as follower_module
from sidecar.sessions.follower import Follower
from sidecar.sessions.record import decode_session, encode_session, merge_kept
from sidecar.sessions.store import SessionStore
from sidecar.sessions.writer import Writer, _Op

from .. import builders
from ..aio import running

pytestmark = [pytest.mark.etcd]

T = TypeVar("T")
WAIT = 10.0  # generous: the machine is shared, and nothing here should take more than ~1 s


def record(session_id: str, **fields: Any) -> Session:
    return builders.session(session_id, placed=False, agent_hostname=builders.AGENT, **fields)


def etcd_sessions(client: Any, keys: Keys) -> dict[str, tuple[bytes, int]]:
    """What etcd holds under sessions/: id -> (value, mod revision)."""
    return {
        meta.key[len(keys.sessions) :].decode(): (value, meta.mod_revision)
        for value, meta in client.get_prefix(keys.sessions)
    }


def copy_of(store: SessionStore) -> dict[str, tuple[Session, int]]:
    """The copy's records, read as messages (in whichever form it holds them), and revisions."""
    held = {}
    for session_id, r in store.snapshot().items():
        session = Session()
        merge_kept(session, session_id, r.raw)
        held[session_id] = (session, r.revision)
    return held


def kept(held: dict[str, tuple[bytes, int]]) -> dict[str, tuple[Session, int]]:
    """Records as etcd holds them (etcd_sessions), decoded as copy_of reads the copy's."""
    return {i: (decode_session(raw, i), revision) for i, (raw, revision) in held.items()}


def forms(store: SessionStore) -> set[bool]:
    """Whether each record of the copy is still the JSON of a re-read (see kept_form)."""
    return {record.raw[:1] == b"{" for record in store.snapshot().values()}


def current_revision(client: Any) -> int:
    return int(client.get_response(b"\0").header.revision)


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


@contextlib.asynccontextmanager
async def opened(s: Settings) -> AsyncIterator[Etcd]:
    etcd = Etcd(s)
    try:
        yield etcd
    finally:
        etcd.close()


@contextlib.asynccontextmanager
async def primary_writer(s: Settings) -> AsyncIterator[Writer]:
    """Win the election with a fresh lease, then a running Writer guarded on that epoch."""
    async with opened(s) as etcd:
        election = Election(etcd, s)
        won = await election.campaign(await election.grant())
        assert won.leader is not None
        epoch = won.leader.epoch
        writer = Writer(etcd, Keys(s.prefix), lambda: epoch)
        async with running(writer.run(), "writer"):
            yield writer


@contextlib.asynccontextmanager
async def following(s: Settings, data_dir: Path) -> AsyncIterator[Follower]:
    """A loaded store in ``data_dir`` and a running follower on it; both closed afterwards."""
    store = SessionStore(data_dir)
    store.load()
    async with opened(s) as etcd:
        follower = Follower(etcd, Keys(s.prefix), store)
        try:
            async with running(follower.run(), "follower"):
                yield follower
        finally:
            store.close()


# -- the writer ---------------------------------------------------------------------------------


def test_writer_guarded_with_a_replaced_epoch_is_refused_and_writes_nothing(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any
) -> None:
    """Rule 2: A campaigns, resigns, B campaigns. A writer still guarded with A's epoch gets
    NotPrimary for puts, deletes and a concurrent burst, and nothing it sent lands under
    sessions/; the same writes guarded with B's epoch do land."""
    sa, sb = (builders.settings(n, cluster=cluster_name, etcd=etcd_cluster) for n in "ab")
    keys = Keys(sa.prefix)

    async def body() -> None:
        async with opened(sa) as etcd_a, opened(sb) as etcd_b:
            a, b = Election(etcd_a, sa), Election(etcd_b, sb)
            lease_a = await a.grant()
            won_a = await a.campaign(lease_a)
            await a.resign(lease_a)
            won_b = await b.campaign(await b.grant())
            assert (won_a.won, won_b.won) == (True, True)
            assert won_a.leader is not None
            assert won_b.leader is not None
            epoch_a, epoch_b = won_a.leader.epoch, won_b.leader.epoch
            assert epoch_b > epoch_a

            stale = Writer(etcd_a, keys, lambda: epoch_a)
            fresh = Writer(etcd_b, keys, lambda: epoch_b)
            async with running(stale.run(), "stale"), running(fresh.run(), "fresh"):
                with pytest.raises(NotPrimary):
                    await stale.put(record("s-0"))
                burst = await asyncio.gather(
                    *(stale.put(record(f"s-{i}")) for i in range(16)), return_exceptions=True
                )
                assert [type(r) for r in burst] == [NotPrimary] * 16
                assert etcd_sessions(etcd_client, keys) == {}
                assert stale.transactions == 0

                # The control: B's writer lands, and A's writer cannot delete what B wrote.
                revision = await fresh.put(record("kept"))
                with pytest.raises(NotPrimary):
                    await stale.delete("kept")
                held = etcd_sessions(etcd_client, keys)
                assert list(held) == ["kept"]
                assert held["kept"][1] == revision

    run(body)


def test_concurrent_puts_are_group_committed_at_one_revision_in_order(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any
) -> None:
    """64 concurrent puts take far fewer than 64 transactions, and each put is acknowledged
    with the revision of the transaction that committed it; two writes of one key in the same
    burst land in order, so the later value wins."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)

    async def body() -> None:
        async with primary_writer(s) as writer:
            revisions = await asyncio.gather(
                *(writer.put(record(f"g-{i:02d}")) for i in range(64))
            )
            assert writer.writes == 64
            assert writer.transactions <= 8, writer.transactions
            held = etcd_sessions(etcd_client, keys)
            assert sorted(held) == [f"g-{i:02d}" for i in range(64)]
            for i, revision in enumerate(revisions):
                assert held[f"g-{i:02d}"][1] == revision
            assert len(set(revisions)) == writer.transactions

            first, second = await asyncio.gather(
                writer.put(record("twice", username="first")),
                writer.put(record("twice", username="second")),
            )
            assert first < second
            value, mod_revision = etcd_sessions(etcd_client, keys)["twice"]
            assert value == encode_session(record("twice", username="second"))
            assert mod_revision == second

    run(body)


def test_delete_reports_whether_a_record_was_deleted(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any
) -> None:
    """delete() answers deleted=True for a held record (at the revision of the delete) and
    deleted=False for a missing one, also when both are in one transaction."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)

    async def body() -> None:
        async with primary_writer(s) as writer:
            put_here = await writer.put(record("here"))
            (rev_here, here), (_, missing) = await asyncio.gather(
                writer.delete("here"), writer.delete("never-was")
            )
            assert (here, missing) == (True, False)
            # the cluster is shared: other tests' leases may end and move the revision on
            assert put_here < rev_here <= current_revision(etcd_client)
            assert etcd_sessions(etcd_client, keys) == {}
            assert (await writer.delete("here"))[1] is False

    run(body)


# -- the follower -------------------------------------------------------------------------------


def test_a_late_attempt_cannot_undo_a_newer_acknowledged_write(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any
) -> None:
    """A write attempt that reaches etcd late (a paused member forwarding it after the writer
    gave up on it and went on) changes nothing once a newer write was acknowledged: the
    newer record stays. An abandoned attempt that lands before the next write does not
    stop that write, which lands after it. And a retry whose earlier attempt did land is
    acknowledged at that attempt's revision, without writing twice."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)

    def attempt(writer: Writer, epoch: int, username: str, token: bytes) -> Any:
        raw = encode_session(record("k", username=username))
        op = _Op(keys.sessions + b"k", raw, asyncio.get_running_loop().create_future())
        return writer.request([op], epoch, token)

    def send(request: Any) -> Any:
        return etcd_client.kvstub.Txn(request, 5)

    async def body() -> None:
        async with primary_writer(s) as writer:
            epoch = writer.epoch()
            await writer.put(record("k", username="first"))
            late = attempt(writer, epoch, "late", b"late")  # sent now, arrives below
            acknowledged = await writer.put(record("k", username="newer"))
            assert send(late).succeeded is False
            assert etcd_sessions(etcd_client, keys)["k"] == (
                encode_session(record("k", username="newer")), acknowledged)

            landed = send(attempt(writer, epoch, "abandoned", b"abandoned")).header.revision
            after = await writer.put(record("k", username="after"))
            assert after > landed
            assert etcd_sessions(etcd_client, keys)["k"][0] == \
                encode_session(record("k", username="after"))

            first_try = send(attempt(writer, epoch, "retried", b"retried"))
            writer._tokens = iter([b"retried"])  # the retry of that very attempt
            before = writer.transactions
            revision = await writer.put(record("k", username="retried"))
            assert revision == first_try.header.revision
            assert etcd_sessions(etcd_client, keys)["k"][1] == revision  # not written twice
            assert writer.transactions == before + 1

    run(body)


def test_follower_applies_changes_and_skips_garbage(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any, tmp_path: Path
) -> None:
    """The follower applies puts and deletes made in etcd; values under sessions/ that are
    not records (not JSON, a wrong id, an id that is not one) are skipped and counted, and the
    follower carries on; wait_current(rev) returns only once the copy has reached rev."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)

    def put(session_id: str, value: bytes) -> None:
        etcd_client.put(keys.sessions + session_id.encode(), value)

    async def body() -> None:
        async with following(s, tmp_path) as follower:
            await asyncio.to_thread(put, "one", encode_session(record("one")))
            await asyncio.to_thread(put, "two", encode_session(record("two")))
            await asyncio.to_thread(put, "junk", b"not json {")
            await asyncio.to_thread(put, "wrong-id", encode_session(record("someone-else")))
            await asyncio.to_thread(put, "bad id", encode_session(record("ok")))
            await asyncio.to_thread(put, "nested/id", encode_session(record("ok")))
            await asyncio.to_thread(etcd_client.delete, keys.sessions + b"one")
            await asyncio.to_thread(put, "three", encode_session(record("three")))
            revision = current_revision(etcd_client)
            await asyncio.wait_for(follower.wait_current(revision), WAIT)
            assert follower.revision >= revision
            assert follower.garbage == 4
            valid = {
                k: v for k, v in etcd_sessions(etcd_client, keys).items() if k in ("two", "three")
            }
            assert copy_of(follower.store) == kept(valid)

            # wait_current waits for a revision not reached yet, and returns once it is.
            waiting = asyncio.create_task(follower.wait_current(revision + 1))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await asyncio.to_thread(put, "four", encode_session(record("four")))
            await asyncio.wait_for(waiting, WAIT)
            assert "four" in follower.store

    run(body)


def test_record_overwritten_with_garbage_leaves_the_copy(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any, tmp_path: Path
) -> None:
    """A record that someone overwrites with garbage is no longer in the copy, exactly as a
    full re-read would find it, so a copy never holds a record etcd does not hold."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)
    key = keys.sessions + b"victim"

    async def body() -> None:
        async with following(s, tmp_path) as follower:
            await asyncio.to_thread(etcd_client.put, key, encode_session(record("victim")))
            await asyncio.wait_for(follower.wait_current(current_revision(etcd_client)), WAIT)
            assert "victim" in follower.store
            async with follower.subscribe() as changes:
                await asyncio.to_thread(etcd_client.put, key, b"\xff garbage")
                await asyncio.wait_for(follower.wait_current(current_revision(etcd_client)), WAIT)
                assert follower.garbage == 1
                assert "victim" not in follower.store
                change = changes.get_nowait()
                assert (change.session_id, change.raw) == ("victim", None)

    run(body)


def test_restarted_follower_resumes_from_its_stored_revision(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any, tmp_path: Path
) -> None:
    """A follower re-created on the same data dir resumes its watch from the stored revision
    (no full re-read) and then catches up with the puts, replacements and deletes made while
    it was down; its copy equals etcd's sessions/ range."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)

    def put(session_id: str, **fields: Any) -> None:
        etcd_client.put(
            keys.sessions + session_id.encode(), encode_session(record(session_id, **fields))
        )

    async def body() -> None:
        async with following(s, tmp_path) as first:
            for i in range(20):
                await asyncio.to_thread(put, f"r-{i}")
            await asyncio.wait_for(first.wait_current(current_revision(etcd_client)), WAIT)
            stopped_at = first.revision
        for i in range(20, 25):
            put(f"r-{i}")
        put("r-0", username="changed")
        etcd_client.delete(keys.sessions + b"r-1")
        with SessionStore(tmp_path) as stored:
            assert stored.load().revision == stopped_at
        async with following(s, tmp_path) as second:
            assert 0 < second.revision == stopped_at
            await asyncio.wait_for(second.wait_current(current_revision(etcd_client)), WAIT)
            assert second.resyncs == 0
            assert copy_of(second.store) == kept(etcd_sessions(etcd_client, keys))
            assert len(second.store) == 24

    run(body)


def test_follower_behind_a_compaction_re_reads_everything(
    fresh_etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path
) -> None:
    """Changes made while the follower was down, then a compaction past its revision: the
    restarted follower is told Compacted, logs mirror_compacted, re-reads the range once, and
    its copy equals etcd's sessions/ range exactly."""
    s = builders.settings(cluster=cluster_name, etcd=fresh_etcd_cluster)
    keys = Keys(s.prefix)

    async def body(client: Any) -> list[MutableMapping[str, Any]]:
        def put(session_id: str, **fields: Any) -> None:
            client.put(
                keys.sessions + session_id.encode(), encode_session(record(session_id, **fields))
            )

        async with following(s, tmp_path) as first:
            for i in range(10):
                await asyncio.to_thread(put, f"c-{i}")
            await asyncio.wait_for(first.wait_current(current_revision(client)), WAIT)
            stopped_at = first.revision
        for i in range(10, 15):
            put(f"c-{i}")
        put("c-0", username="changed")
        client.delete(keys.sessions + b"c-1")
        assert fresh_etcd_cluster.compact() > stopped_at
        with structlog.testing.capture_logs() as logs:
            async with following(s, tmp_path) as second:
                await asyncio.wait_for(second.wait_current(current_revision(client)), WAIT)
                assert second.resyncs == 1
                assert copy_of(second.store) == kept(etcd_sessions(client, keys))
                assert len(second.store) == 14
                # The re-read's JSON is then converted, after its first flush, to the kept
                # form, without changing a record.
                for _ in range(int(WAIT / 0.05)):
                    if forms(second.store) == {False}:
                        break
                    await asyncio.sleep(0.05)
                assert forms(second.store) == {False}
                assert copy_of(second.store) == kept(etcd_sessions(client, keys))
        return logs

    with fresh_etcd_cluster.client() as client:
        logs = run(lambda: body(client))
    events = [entry["event"] for entry in logs]
    assert "mirror_compacted" in events
    assert "mirror_converted" in events
    assert events.index("mirror_compacted") < events.index("mirror_resynced")


def test_full_re_read_over_many_pages_skips_garbage_and_switches_at_once(
    etcd_cluster: LocalEtcdCluster,
    cluster_name: str,
    etcd_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A re-read of a range spanning many pages (pages of 7 here) takes every valid record once,
    skips and counts the garbage on every page, and the copy moves from its old content to the
    new in one step: while the range is being read it still holds only the old records at the
    old revision, never part of the new ones."""
    monkeypatch.setattr(follower_module, "RESYNC_PAGE", 7)
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)
    for i in range(60):
        value = b"not json" if i % 13 == 5 else encode_session(record(f"p-{i:02d}"))
        etcd_client.put(keys.sessions + f"p-{i:02d}".encode(), value)
    store = SessionStore(tmp_path)
    store.load()
    store.replace_all([("old", encode_session(record("old")), 1)], 1)
    seen: list[tuple[int, list[str]]] = []
    take_valid = Follower._take_valid

    def observed(follower: Follower, kvs: Any, fresh: Any) -> None:
        seen.append((store.applied_revision, [r for r, _ in store.records()]))
        take_valid(follower, kvs, fresh)

    monkeypatch.setattr(Follower, "_take_valid", observed)

    async def body() -> None:
        async with opened(s) as etcd:
            follower = Follower(etcd, keys, store)
            written = current_revision(etcd_client)
            await follower._resync()
            assert follower.garbage == 5
            # the cluster is shared: other tests' leases may end and move the revision on
            assert written <= follower.revision <= current_revision(etcd_client)

    run(body)
    assert len(seen) == 9  # ceil(60 / 7) pages
    assert seen == [(1, ["old"])] * 9
    valid = {k: v for k, v in etcd_sessions(etcd_client, keys).items() if v[0] != b"not json"}
    assert len(valid) == 55
    assert copy_of(store) == kept(valid)
    store.close()


# -- the promotion gate (rule 5) ----------------------------------------------------------------


@pytest.mark.slow
def test_node_becomes_primary_only_once_its_copy_is_current(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, etcd_client: Any, tmp_path: Path
) -> None:
    """Rule 5: a node that wins while its follower is not running does not turn PRIMARY
    (though it holds the leader key); once the follower runs it does, and at that moment the
    copy is current to at least the epoch it won with."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)
    keys = Keys(s.prefix)
    etcd_client.put(keys.sessions + b"before", encode_session(record("before")))

    async def body() -> None:
        store = SessionStore(tmp_path)
        store.load()
        async with opened(s) as control, opened(s) as data:
            follower = Follower(data, keys, store)
            node = Node(s, control)
            at_promotion: list[tuple[int, int]] = []

            async def note(revision: int) -> None:  # runs last, just before the role changes
                at_promotion.append((revision, follower.revision))

            node.promotion_gates.append(follower.wait_current)
            node.promotion_gates.append(note)
            stop = asyncio.Event()
            async with running(node.run(stop), "node") as node_task:
                roles: set[Role] = set()
                held_key = False
                until = time.monotonic() + 2.5  # longer than one lease (TTL 2 s)
                while time.monotonic() < until:
                    roles.add(node.status().role)
                    leader, _ = await Election(control, s).read_leader()
                    held_key = held_key or (leader is not None and leader.node_id == "a")
                    await asyncio.sleep(0.05)
                assert Role.PRIMARY not in roles
                assert held_key, "the node never won: the gate was not what held it back"
                assert at_promotion == []

                async with running(follower.run(), "follower"):
                    deadline = time.monotonic() + WAIT
                    while node.status().role is not Role.PRIMARY:
                        assert time.monotonic() < deadline, node.status()
                        await asyncio.sleep(0.02)
                    epoch = node.status().epoch
                    assert len(at_promotion) == 1
                    revision, copy_revision = at_promotion[0]
                    assert revision >= epoch > 0
                    assert copy_revision >= revision
                    assert "before" in store
                    stop.set()
                    await asyncio.wait_for(node_task, WAIT)
        store.close()

    run(body)


def test_a_write_after_the_lease_deadline_fences_the_node_and_is_refused(
    etcd_cluster: LocalEtcdCluster, cluster_name: str
) -> None:
    """Rule 3 on the write path: the epoch a writer asks for is refused once the local lease
    deadline has passed, even before the node's own watchdog has looked, and the asking turns
    the node FENCED."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)

    async def body() -> None:
        async with opened(s) as control:
            view = RoleView()
            node = Node(s, control, view=view)
            stop = asyncio.Event()
            async with running(node.run(stop), "node") as node_task:
                deadline = time.monotonic() + WAIT
                while node.status().role is not Role.PRIMARY:
                    assert time.monotonic() < deadline, node.status()
                    await asyncio.sleep(0.02)
                epoch = view.primary_epoch()
                assert epoch == node.status().epoch
                lease = node._lease
                assert lease is not None
                lease.deadline = time.monotonic() - 1.0  # no await between this and the ask
                with pytest.raises(NotPrimary):
                    view.primary_epoch()
                assert node.status().role is Role.FENCED
                stop.set()
                await asyncio.wait_for(node_task, WAIT)

    run(body)
