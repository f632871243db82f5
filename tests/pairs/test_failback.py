"""Failback to the preferred primary and operator switchover, on real sidecars and real etcd."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest

from sidecar import client
from sidecar.api import session_pb2, session_pb2_grpc
from sidecar.core import watches
from sidecar.lab.localcluster import LocalEtcdCluster

from .. import builders
from ..sidecars import Pair

pytestmark = [pytest.mark.etcd]

DELAY = 1.5


def preferred_pair(pair: Pair, *, failback: bool = True) -> None:
    """a is the preferred primary (started first, so PRIMARY); b the secondary."""
    flags = ["--preferred-primary", "--failback-delay", str(DELAY)]
    pair.start_one("a", extra_args=flags if failback else [*flags, "--no-failback"])
    pair.start_one("b")
    pair.wait_split()


def put(address: str, session_id: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        session = builders.session(session_id, placed=False)
        return stub.PutSession(session_pb2.PutSessionRequest(session=session),
                               timeout=5).revision


def session_ids(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        listed = stub.ListSessions(session_pb2.ListSessionsRequest(), timeout=5)
        return {s.session_id for s in listed.sessions}


def test_failback_cycle_returns_the_role_to_the_preferred_primary(pair: Pair) -> None:
    """Preferred primary killed: the secondary takes over and accepts writes; restarted, the
    preferred node becomes PRIMARY again after the failback delay, the handover itself takes
    under 0.5 s, and no acknowledged session is lost."""
    preferred_pair(pair)
    a, b = pair.nodes
    put(a.control_address, "before-crash")
    a.kill()
    b.wait_role("PRIMARY", timeout=6)
    for i in range(5):
        put(b.control_address, f"during-outage-{i}")
    recorder_b = pair.recorder(b)
    restarted = time.monotonic()
    a.start()
    recorder_a = pair.recorder(a)
    back = recorder_a.wait_role("PRIMARY", timeout=DELAY + 10, after=restarted)
    assert back.at - restarted >= DELAY  # not before the delay
    gave_up = recorder_b.wait_for(lambda o: o.role != "PRIMARY", timeout=5, after=restarted)
    assert back.at - gave_up.at < 0.5  # the handover itself
    assert session_ids(a.address) >= {"before-crash", *(f"during-outage-{i}" for i in range(5))}
    assert "failback" in a.log_tail(200)


def test_no_failback_keeps_the_secondary_primary(pair: Pair) -> None:
    """--no-failback (keepalived's nopreempt): the restarted preferred node stays STANDBY."""
    preferred_pair(pair, failback=False)
    a, b = pair.nodes
    a.kill()
    b.wait_role("PRIMARY", timeout=6)
    a.start()
    a.wait_role("STANDBY")
    time.sleep(DELAY + 2)
    assert client.role_name(a.role()) == "STANDBY"
    assert client.role_name(b.role()) == "PRIMARY"


def test_switchover_both_ways_with_a_new_epoch_each_time(pair: Pair) -> None:
    """Switchover to the standby and back: each answers with the new primary and a higher
    epoch once it holds the leader key, and takes well under a second."""
    pair.start(ttl=2)
    primary, standby = pair.wait_split()
    pair.wait_member_record(standby, role="ROLE_STANDBY", copy_current=True)
    epoch = int(primary.role()["epoch"])
    new, epoch2, took = client.switchover(primary.control_address, standby.node_id)
    assert (new, client.role_name(standby.role())) == (standby.node_id, "PRIMARY")
    assert epoch2 > epoch
    assert took < 0.5
    pair.wait_member_record(primary, role="ROLE_STANDBY", copy_current=True)
    # Asked on any node: the standby's socket.
    new, epoch3, took = client.switchover(standby.control_address, primary.node_id)
    assert new == primary.node_id
    assert epoch3 > epoch2
    assert took < 0.5
    assert client.role_name(primary.role()) == "PRIMARY"


def test_switchover_refusals_name_the_reason(pair: Pair,
                                              etcd_cluster: LocalEtcdCluster) -> None:
    """Refused with FAILED_PRECONDITION and the reason: a target that is not a member, one
    that is not STANDBY, one that has not caught up, one that is unhealthy; and no standby."""
    a, _ = pair.start(ttl=2, count=1)
    a.wait_role("PRIMARY")
    with pytest.raises(client.Refused, match="no standby can take over"):
        client.switchover(a.control_address, None)
    with pytest.raises(client.Refused, match="ghost is not a member"):
        client.switchover(a.control_address, "ghost")
    # Member records as a node publishes them when its copy is behind, or its VSM server is
    # down: the refusal comes from what the records say.
    prefix = f"/thinlinc-ha/{pair.cluster}/members/"
    records = {
        "lagging": {"role": "ROLE_STANDBY", "copy_current": False},
        "sick": {"role": "ROLE_STANDBY", "copy_current": True, "health": "unhealthy"},
        "booting": {"role": "ROLE_STARTING", "copy_current": True},
    }
    with etcd_cluster.client() as etcd:
        lease = etcd.lease(30)
        for node_id, record in records.items():
            etcd.put(prefix + node_id, json.dumps({"node_id": node_id, **record}), lease=lease)
        try:
            for node_id, reason in (("lagging", "has not caught up"), ("sick", "unhealthy"),
                                    ("booting", "STARTING, not STANDBY")):
                with pytest.raises(client.Refused, match=reason):
                    client.switchover(a.control_address, node_id)
        finally:
            lease.revoke()
    assert client.role_name(a.role()) == "PRIMARY"


def test_switchover_cli(pair: Pair) -> None:
    """`vsm-sidecar switchover --to NODE` moves the role and says so; a refusal exits 1."""
    pair.start(ttl=2)
    primary, standby = pair.wait_split()
    pair.wait_member_record(standby, role="ROLE_STANDBY", copy_current=True)
    ok = subprocess.run([sys.executable, "-m", "sidecar", "switchover", "--grpc",
                         primary.control_address, "--to", standby.node_id],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{standby.node_id} is PRIMARY (epoch ")
    refused = subprocess.run([sys.executable, "-m", "sidecar", "switchover", "--grpc",
                              primary.control_address, "--to", "ghost"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert "ghost is not a member" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "kill"])
def test_after_a_failback_the_secondary_still_takes_over(pair: Pair, stop: str) -> None:
    """The secondary that handed the role back to the preferred primary is still a candidate
    after its standby's leader re-read has timed out (LEADER_REREAD_SECONDS): when the preferred
    primary then stops (SIGTERM or kill -9), the secondary becomes PRIMARY.

    On Python 3.11.2 (Debian 12's own) the handover's task group left the node's task marked
    as cancelled, so the next asyncio.timeout raised CancelledError instead of TimeoutError and
    silently ended the leadership loop: a standby that never took over again."""
    preferred_pair(pair)
    a, b = pair.nodes
    a.kill()
    b.wait_role("PRIMARY", timeout=6)
    restarted = time.monotonic()
    a.start()
    recorder_a = pair.recorder(a)
    recorder_a.wait_role("PRIMARY", timeout=DELAY + 10, after=restarted)
    b.wait_role("STANDBY", timeout=5)
    # Past one leader re-read of the standby: its follow timeout has expired at least once.
    time.sleep(watches.LEADER_REREAD_SECONDS + 2)
    assert client.role_name(b.role()) == "STANDBY"
    if stop == "kill":
        a.kill()
    else:
        a.terminate()
    b.wait_role("PRIMARY", timeout=2 * 2 + 3)
