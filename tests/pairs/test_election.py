"""Election and failover of real sidecar processes on a real 3-member etcd cluster.

Safety rules covered here (DESIGN.md): 1 (create-if-absent campaign, epoch), 3 (local lease
deadline), 4 (a resumed primary never reports PRIMARY with its old epoch) and 6 (handover on
SIGTERM without waiting for a TTL).
"""

from __future__ import annotations

import json
import time

import pytest

from sidecar.etcd.records import GarbageLog, SwitchoverRequest, decode_leader, decode_member
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import RoleRecorder

from ..builders import takeover_guard
from ..sidecars import Pair

pytestmark = [pytest.mark.etcd]

TTL = 2
GUARD = takeover_guard(TTL)


def test_two_sidecars_elect_exactly_one_primary(pair: Pair) -> None:
    """Two sidecars: one PRIMARY, one STANDBY, and both name the same leader and epoch."""
    _a, _b = pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    pstatus, sstatus = primary.role(), standby.role()
    assert {pstatus["role"], sstatus["role"]} == {"ROLE_PRIMARY", "ROLE_STANDBY"}
    assert sstatus["leader_id"] == pstatus["node_id"] == pstatus["leader_id"]
    assert sstatus["epoch"] == pstatus["epoch"]
    assert int(pstatus["epoch"]) > 0
    assert sstatus["leader_address"] == primary.address


def test_leader_key_holds_json_with_node_address_since_and_epoch(
        pair: Pair, etcd_cluster: LocalEtcdCluster) -> None:
    """The leader key is JSON an operator can read; its create revision is the epoch."""
    pair.start(ttl=TTL)
    primary, _ = pair.wait_split()
    with etcd_cluster.client() as etcd:
        value, meta = etcd.get(f"/thinlinc-ha/{pair.cluster}/leader")
    record = json.loads(value)
    assert record["node_id"] == primary.node_id
    assert record["address"] == primary.address
    assert record["since"].endswith("Z")
    assert meta.create_revision == int(primary.role()["epoch"])


def test_kill9_of_primary_fails_over_within_ttl_plus_one_second(pair: Pair) -> None:
    """kill -9 of the primary: the standby is PRIMARY within TTL + 1 s (plus the #15247
    takeover wait on the bundled etcd), with a higher epoch."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    old_epoch = int(primary.role()["epoch"])
    recorder = pair.recorder(standby)
    killed_at = time.monotonic()
    primary.kill()
    promoted = recorder.wait_role("PRIMARY", timeout=TTL + 3 + GUARD, after=killed_at)
    assert promoted.at - killed_at <= TTL + 1.0 + GUARD
    assert int(promoted.status["epoch"]) > old_epoch


def test_sigterm_of_primary_hands_over_within_half_a_second(pair: Pair) -> None:
    """SIGTERM: the primary revokes its lease and exits 0; the standby is PRIMARY in < 0.5 s."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    recorder = pair.recorder(standby)
    sent_at = time.monotonic()
    primary.terminate()
    promoted = recorder.wait_role("PRIMARY", timeout=TTL + 3, after=sent_at)
    assert promoted.at - sent_at < 0.5
    assert primary.wait_exit(10) == 0


def test_campaign_never_overwrites_an_existing_leader_key(
        pair: Pair, etcd_cluster: LocalEtcdCluster) -> None:
    """Rule 1: a leader key held by someone else (another lease) is never taken over."""
    key = f"/thinlinc-ha/{pair.cluster}/leader"
    foreign = json.dumps({"node_id": "intruder", "address": "192.0.2.9:1", "since": "x"})
    with etcd_cluster.client() as etcd:
        lease = etcd.lease(30)
        etcd.put(key, foreign, lease=lease)
        a, _ = pair.start(ttl=TTL, count=1)
        status = a.wait_role("STANDBY")
        time.sleep(TTL)  # several keepalive rounds and leader re-reads
        value, _ = etcd.get(key)
        assert json.loads(value)["node_id"] == "intruder"
        assert a.role()["role"] == "ROLE_STANDBY"
        assert status["leader_id"] == "intruder"
        recorder = pair.recorder(a)
        revoked_at = time.monotonic()
        lease.revoke()
        recorder.wait_role("PRIMARY", timeout=2, after=revoked_at)


def test_killing_the_etcd_raft_leader_changes_no_role(pair_on_fresh_cluster: Pair) -> None:
    """An etcd leader election (its leader killed) is ridden out: no demotion, no role change."""
    pair = pair_on_fresh_cluster
    pair.start()  # the default TTL, which is chosen to ride this out
    primary, standby = pair.wait_split()
    recorders = [pair.recorder(primary), pair.recorder(standby)]
    time.sleep(0.5)
    killed_at = time.monotonic()
    pair.etcd.leader().kill()
    pair.etcd.leader(timeout=15)  # a new etcd leader was elected
    time.sleep(4.0)  # longer than the default TTL: a lost lease would have shown by now
    for recorder in recorders:
        assert set(recorder.roles_since(killed_at)) <= {"PRIMARY", "STANDBY"}
    assert primary.role()["role"] == "ROLE_PRIMARY"
    assert standby.role()["role"] == "ROLE_STANDBY"
    assert "PRIMARY" not in recorders[1].roles_since(killed_at)


def test_primary_fences_itself_before_its_lease_can_expire_when_etcd_stops(
        pair_on_fresh_cluster: Pair) -> None:
    """Rule 3: with every etcd member paused, the primary reports FENCED before the deadline
    it computed (last answered keepalive's send time + TTL), without hearing from etcd; when
    etcd resumes, there is exactly one PRIMARY again."""
    pair = pair_on_fresh_cluster
    pair.start(ttl=TTL)
    primary, _standby = pair.wait_split()
    recorder = pair.recorder(primary)
    for member in pair.etcd.members:
        member.stop()
    stopped_at = time.monotonic()
    # The last deadline the primary reported while still PRIMARY: GetRole's time left is the
    # deadline minus the safety margin, read now.
    deadline = None
    while time.monotonic() < stopped_at + TTL + 2:
        asked = time.monotonic()
        status = primary.role()
        if status["role"] != "ROLE_PRIMARY":
            break
        left = float(status["lease_time_left"].rstrip("s"))
        deadline = asked + left
        time.sleep(0.02)
    assert deadline is not None, "the primary was never seen as PRIMARY after etcd stopped"
    fenced = recorder.wait_role("FENCED", timeout=TTL + 1, after=stopped_at)
    margin = max(0.25, TTL / 10)
    # Fenced no later than its own deadline (small slack for the event loop), and so strictly
    # before etcd could have expired the lease (deadline + margin at the earliest).
    assert fenced.at <= deadline + 0.1
    assert fenced.at < deadline + margin
    for member in pair.etcd.members:
        member.cont()
    pair.wait_split(timeout=TTL * 4 + 5)


def test_paused_primary_resumes_as_standby_never_primary_with_its_old_epoch(pair: Pair) -> None:
    """Rule 4: SIGSTOP of the primary for 2 x TTL; the other node becomes PRIMARY; after
    SIGCONT the resumed node reports STANDBY and never PRIMARY with the old epoch."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    old_epoch = primary.role()["epoch"]
    standby_recorder = pair.recorder(standby)
    stopped_at = time.monotonic()
    primary.stop()
    standby_recorder.wait_role("PRIMARY", timeout=TTL + 3, after=stopped_at)
    time.sleep(max(0.0, stopped_at + 2 * TTL - time.monotonic()))
    resumed_at = time.monotonic()
    primary.cont()
    first = primary.role()  # the very first answer after the pause
    assert not (first["role"] == "ROLE_PRIMARY" and first["epoch"] == old_epoch)
    recorder = pair.recorder(primary)
    recorder.wait_role("STANDBY", timeout=TTL + 3, after=resumed_at)
    for observation in recorder.observations:
        assert not (observation.role == "PRIMARY" and observation.status["epoch"] == old_epoch)
    assert standby.role()["role"] == "ROLE_PRIMARY"
    assert primary.role()["leader_id"] == standby.node_id


def test_role_watch_sends_current_status_then_each_change(pair: Pair) -> None:
    """WatchRole: the current status first, then one message per change."""
    a, _ = pair.start(ttl=TTL, count=1)
    a.wait_role("PRIMARY")
    recorder = RoleRecorder(a.address)
    try:
        first = recorder.wait_for(lambda o: True, timeout=5)
        assert first.role == "PRIMARY"
        sent = time.monotonic()
        a.terminate()
        stopping = recorder.wait_role("STOPPING", timeout=5, after=sent)
        assert stopping.status["node_id"] == a.node_id
    finally:
        recorder.close()


def test_sidecar_reports_starting_while_etcd_is_unreachable_then_joins(
        pair_on_fresh_cluster: Pair) -> None:
    """etcd unreachable at start: the sidecar reports STARTING with the reason, keeps retrying
    with backoff, and becomes PRIMARY once etcd answers."""
    pair = pair_on_fresh_cluster
    for member in pair.etcd.members:
        member.kill()
    a, _ = pair.start(ttl=TTL, count=1)
    time.sleep(1.0)
    status = a.role()
    assert status["role"] == "ROLE_STARTING"
    assert "etcd unreachable" in status["reason"]
    for member in pair.etcd.members:
        member.restart()
    a.wait_role("PRIMARY", timeout=20)


def test_fenced_primary_resumes_with_the_same_epoch_when_etcd_kept_its_lease(
        pair_on_fresh_cluster: Pair) -> None:
    """A fence that ends before etcd expired the lease does not move the leadership: the old
    primary finds its lease alive, resumes it, and is PRIMARY again with the same epoch; the
    standby is never PRIMARY meanwhile. (etcd expires the lease at the earliest at the
    keepalive's send time + TTL, the primary fences at that + margin earlier: with TTL 5 the
    margin is 0.5 s, the window in which etcd is resumed here.)"""
    pair = pair_on_fresh_cluster
    pair.start(ttl=5)
    primary, standby = pair.wait_split()
    epoch = primary.role()["epoch"]
    recorders = {primary.node_id: pair.recorder(primary), standby.node_id: pair.recorder(standby)}
    for member in pair.etcd.members:
        member.stop()
    stopped_at = time.monotonic()
    recorders[primary.node_id].wait_role("FENCED", timeout=7, after=stopped_at)
    for member in pair.etcd.members:
        member.cont()
    back = recorders[primary.node_id].wait_role("PRIMARY", timeout=10, after=stopped_at)
    assert back.status["epoch"] == epoch
    assert "PRIMARY" not in recorders[standby.node_id].roles_since(stopped_at)
    assert "lease_resumed" in primary.log_tail(100)


@pytest.mark.parametrize("value", [
    b"", b"\xff\xfe", b"[]", b"null", b'"a"', b"[" * 100_000, b'{"node_id": 5}',
    b'{"node_id": "a b"}', b'{"node_id": "a", "address": 1e999}',
    json.dumps({"node_id": "a", "since": "x" * 2000}).encode(),
])
def test_garbage_leader_values_decode_as_held_but_invalid(value: bytes) -> None:
    """Whatever the leader key holds, decoding never raises: garbage is a leader that is
    marked invalid, with the problem named (it still counts as held)."""
    info = decode_leader(value, epoch=7, lease=9, revision=8)
    assert (info.valid, info.node_id, info.epoch, info.lease) == (False, "", 7, 9)
    assert info.problem
    assert info.overwritten


def test_member_records_must_match_their_key_have_a_lease_and_typed_fields() -> None:
    """decode_member keeps a good record (unknown fields too) and refuses the rest."""
    good = {"node_id": "b", "role": "ROLE_STANDBY", "epoch": 3, "copy_current": True,
            "newer_field": [1]}
    assert decode_member(b"b", json.dumps(good).encode(), lease=1).encode() == good
    bad = [(b"c", good, 1), (b"b", good, 0), (b"b", {**good, "copy_current": "yes"}, 1),
           (b"b", {**good, "epoch": True}, 1), (b"b", {**good, "epoch": 2**63}, 1),
           (b"b", {**good, "epoch": -1}, 1), (b"b", {**good, "address": "x" * 5000}, 1)]
    for name, record, lease in bad:
        with pytest.raises(ValueError, match=r"\w"):
            decode_member(name, json.dumps(record).encode(), lease)


def test_switchover_request_needs_a_lease_and_a_node_name() -> None:
    good = SwitchoverRequest("b", "a", "operator")
    assert SwitchoverRequest.decode(good.encode(), lease=5) == good
    for value, lease in [(good.encode(), 0), (b'{"target": 5}', 5), (b"[" * 100_000, 5)]:
        with pytest.raises(ValueError, match=r"\w"):
            SwitchoverRequest.decode(value, lease)


def test_garbage_log_counts_each_value_once() -> None:
    """The same bad value re-read (same key, same mod revision) is counted once; a new one
    is counted again."""
    garbage = GarbageLog()
    for revision in (5, 5, 5, 6):
        garbage.report("member", b"/p/members/x", revision, "bad", b"x")
    assert garbage.counts == {"leader": 0, "member": 2, "pause": 0, "switchover": 0}
