"""Pairs of real sidecar processes on a real etcd cluster, closed after each test."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar import client
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar, RoleRecorder

T = TypeVar("T")


class Pair:
    """Sidecars "a" and "b" of one test cluster, and recorders of their role streams."""

    def __init__(self, etcd: LocalEtcdCluster, cluster: str, workdir: Path) -> None:
        self.etcd = etcd
        self.cluster = cluster
        self.workdir = workdir
        self.nodes: list[LocalSidecar] = []
        self.recorders: list[RoleRecorder] = []

    def start(self, ttl: int | None = None, count: int = 2,
              extra_args: Sequence[str] = ()) -> list[LocalSidecar]:
        """Start ``count`` sidecars one after the other, so the first one becomes PRIMARY."""
        args = list(extra_args) + (["--ttl", str(ttl)] if ttl is not None else [])
        started = []
        for node_id in "ab"[:count]:
            node = LocalSidecar(node_id, self.cluster, self.etcd.endpoints_arg, self.workdir,
                                ttl=ttl or 3, extra_args=args)
            self.nodes.append(node)
            started.append(node.start())
        return started + [None] * (2 - count)  # type: ignore[list-item]

    def start_one(self, node_id: str, ttl: int = 2,
                  extra_args: Sequence[str] = ()) -> LocalSidecar:
        """Start one named sidecar with its own arguments."""
        node = LocalSidecar(node_id, self.cluster, self.etcd.endpoints_arg, self.workdir,
                            ttl=ttl, extra_args=list(extra_args))
        self.nodes.append(node)
        node.start()
        if node_id == "a":
            node.wait_role("PRIMARY")
        return node

    def wait_split(self, timeout: float = 15.0) -> tuple[LocalSidecar, LocalSidecar]:
        """Wait for exactly one PRIMARY and one STANDBY that agree on leader and epoch."""
        primary, standby, _ = wait_split(self.nodes, timeout)
        return primary, standby

    def wait_member_record(self, node: LocalSidecar, timeout: float = 10.0,
                           **expected: Any) -> dict[str, Any]:
        """Wait until ``node``'s members/ record in etcd holds the ``expected`` fields."""
        return wait_member_record(self.etcd, self.cluster, node.node_id, timeout, **expected)

    def recorder(self, node: LocalSidecar) -> RoleRecorder:
        recorder = RoleRecorder(node.address)
        recorder.wait_for(lambda o: True, timeout=5)  # the stream is open
        self.recorders.append(recorder)
        return recorder

    def close(self) -> None:
        for recorder in self.recorders:
            recorder.close()
        for node in self.nodes:
            node.close()

    def logs(self) -> str:
        return "\n".join(f"--- sidecar {n.node_id}\n{n.log_tail(60)}" for n in self.nodes)


class NoSplit(TimeoutError):
    """No PRIMARY/STANDBY split in time; the message has the last answers and the logs."""


def wait_split(nodes: Sequence[LocalSidecar], timeout: float,
               ) -> tuple[LocalSidecar, LocalSidecar, int]:
    """Wait for exactly one PRIMARY and one STANDBY among ``nodes`` that agree on leader and
    epoch, asked afresh: (primary, standby, epoch). A node that does not answer is asked again."""
    deadline = time.monotonic() + timeout
    last: list[dict[str, Any]] = []
    while True:
        try:
            last = [n.role(timeout=0.5) for n in nodes]
        except client.Unreachable:
            pass
        else:
            roles = [s.get("role") for s in last]
            if sorted(map(str, roles)) == ["ROLE_PRIMARY", "ROLE_STANDBY"] and \
                    len({(s.get("leader_id"), s.get("epoch")) for s in last}) == 1:
                primary = roles.index("ROLE_PRIMARY")
                standby = roles.index("ROLE_STANDBY")
                return nodes[primary], nodes[standby], int(last[primary].get("epoch", 0))
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- {n.node_id}\n{n.log_tail()}" for n in nodes)
            raise NoSplit(f"no PRIMARY/STANDBY split within {timeout}s: {last}\n{logs}")
        time.sleep(0.05)


def wait_member_record(etcd: LocalEtcdCluster, cluster: str, node_id: str, timeout: float,
                       **expected: Any) -> dict[str, Any]:
    """Wait until members/<node_id> (DESIGN.md's key layout) holds the ``expected`` fields,
    e.g. role="ROLE_STANDBY", copy_current=True: what a switchover asks of its target."""
    key = f"/thinlinc-ha/{cluster}/members/{node_id}"
    deadline = time.monotonic() + timeout
    record: Any = None
    with etcd.client() as etcd_client:
        while True:
            raw, _ = etcd_client.get(key)
            try:
                record = json.loads(raw) if raw is not None else None
            except ValueError:
                record = raw
            if isinstance(record, dict) and all(record.get(k) == v for k, v in expected.items()):
                return record
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{key} is not {expected} after {timeout}s: {record}")
            time.sleep(0.05)


def make_pair(etcd: LocalEtcdCluster, cluster: str, tmp_path: Path,
              request: pytest.FixtureRequest) -> Iterator[Pair]:
    pair = Pair(etcd, cluster, tmp_path)
    request.node.stash[PAIR_KEY] = pair
    try:
        yield pair
    finally:
        pair.close()


PAIR_KEY = pytest.StashKey[Pair]()


def eventually(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.1) -> T:
    """The first result of ``check`` that raises no AssertionError (nor a sidecar that does
    not answer or refuses yet); the last such error once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, client.Unreachable, client.Refused):
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)
