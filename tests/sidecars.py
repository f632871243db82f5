"""Pairs of real sidecar processes on a real etcd cluster, closed after each test."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar, RoleRecorder


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
        deadline = time.monotonic() + timeout
        last = []
        while time.monotonic() < deadline:
            try:
                last = [n.role(timeout=0.5) for n in self.nodes]
            except Exception:
                time.sleep(0.05)
                continue
            roles = [s["role"] for s in last]
            if sorted(roles) == ["ROLE_PRIMARY", "ROLE_STANDBY"] and \
                    len({(s.get("leader_id"), s.get("epoch")) for s in last}) == 1:
                primary = self.nodes[roles.index("ROLE_PRIMARY")]
                standby = self.nodes[roles.index("ROLE_STANDBY")]
                return primary, standby
            time.sleep(0.05)
        logs = "\n".join(f"--- {n.node_id}\n{n.log_tail()}" for n in self.nodes)
        raise TimeoutError(f"no PRIMARY/STANDBY split within {timeout}s: {last}\n{logs}")

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


def make_pair(etcd: LocalEtcdCluster, cluster: str, tmp_path: Path,
              request: pytest.FixtureRequest) -> Iterator[Pair]:
    pair = Pair(etcd, cluster, tmp_path)
    request.node.stash[PAIR_KEY] = pair
    try:
        yield pair
    finally:
        pair.close()


PAIR_KEY = pytest.StashKey[Pair]()
