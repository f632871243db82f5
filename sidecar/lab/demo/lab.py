"""The demo's lab: the etcd cluster, the two sidecars and their stand-in VSM servers of one run,
under one temporary directory, in a network namespace lab where one can be made."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ... import client
from ...api import session_pb2, session_pb2_grpc
from .. import netlab, netns
from ..etcderrors import EtcdClusterError
from ..etcdmember import EtcdMember
from ..localcluster import LocalEtcdCluster
from ..localnode import LocalSidecar, Observation, RoleRecorder
from .plan import (
    CLUSTER,
    ETCD_TIMEOUT_S,
    LAB_HOSTS,
    NETNS_ENV,
    NODE_ARGS,
    NODE_IDS,
    PROBE_TIMEOUT_S,
    SETTLE_TIMEOUT_S,
    STANDIN_GRACE_S,
    VIP_ASK_TIMEOUT_S,
    VIP_OCTET,
    VIP_PORT,
    SceneFailed,
)
from .standin_process import StandIn


@dataclass(frozen=True)
class Split:
    """One PRIMARY and one STANDBY that agree on the leader and the epoch."""

    primary: LocalSidecar
    standby: LocalSidecar
    epoch: int


class Lab:
    """The etcd cluster, the two sidecars and their stand-in VSM servers of one demo run, under
    one temporary directory."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.workdir = Path(tempfile.mkdtemp(prefix="vsm-demo-"))
        # The namespace lab is only planned here (the subnet and the addresses); start_etcd
        # builds it, inside the demo's cleanup.
        self.net: netlab.NetnsLab | None = None
        self.net_skipped = _netns_skipped()
        etcd_host = "127.0.0.1"
        if self.net_skipped is None:
            try:
                self.net = netlab.NetnsLab(subnet=netns.free_subnet())
            except (netns.LabError, OSError, subprocess.SubprocessError) as exc:
                self.net_skipped = str(exc)
            else:
                etcd_host = f"{self.net.subnet}.{netlab.ROOT_OCTET}"  # the demo's own leg
        self.vip = None if self.net is None else f"{self.net.subnet}.{VIP_OCTET}"
        self.etcd = LocalEtcdCluster(host=etcd_host, workdir=self.workdir / "etcd")
        self.nodes: list[LocalSidecar] = []
        self.standins: dict[str, StandIn] = {}  # by node id; empty when this build has none
        self.recorders: dict[str, RoleRecorder] = {}
        self.down: LocalSidecar | None = None  # killed by one scene, restarted by the next

    def start_etcd(self) -> None:
        """Build the namespace lab (if any), start etcd, and plan the sidecars and stand-ins."""
        if self.net is not None:
            self.net.start()
            self.net.attach_root()
        self.etcd.start()
        # Ports are chosen now, so the commands to try can be printed before the nodes start.
        self.nodes = [self._sidecar(node_id) for node_id in NODE_IDS]
        self.standins = {node.node_id: StandIn(node, self.workdir, self.net) for node in self.nodes}

    def _sidecar(self, node_id: str) -> LocalSidecar:
        args = NODE_ARGS.get(node_id, ())
        if self.net is None:
            return LocalSidecar(node_id, CLUSTER, self.etcd.endpoints_arg, self.workdir,
                                ttl=self.ttl, extra_args=args)  # fmt: skip
        # In its host; the demo talks to it over a Unix socket, reachable from any namespace.
        return LocalSidecar(
            node_id, CLUSTER, self.etcd.endpoints_arg, self.workdir, ttl=self.ttl,
            command_prefix=self.net.exec_prefix(LAB_HOSTS[node_id]), unix_socket=True,
            extra_args=[*args, "--vip", f"{self.vip}/24", "--vip-interface", netlab.HOST_IFNAME],
        )  # fmt: skip

    def holds_vip(self, node: LocalSidecar) -> bool:
        """Whether the node's host has the resource IP on its eth0."""
        if self.net is None:
            return False
        return f"{self.vip}/24" in self.net.addresses(LAB_HOSTS[node.node_id])

    def client_reaches(self, timeout: float = VIP_ASK_TIMEOUT_S) -> str | None:
        """Who answers the client host through the resource IP: the name in the stand-in's
        greeting; None if nobody does (or there is no resource IP)."""
        if self.net is None or self.vip is None:
            return None
        answer = self.net.ask("client", self.vip, VIP_PORT, timeout=timeout)
        return answer.split()[0] if answer and answer.split() else None

    def start_standins(self) -> bool:
        """Start a stand-in beside each sidecar (they wait for it); False, with none kept, if
        this build has none: its placeholder exits at once."""
        for standin in self.standins.values():
            standin.start()
        deadline = time.monotonic() + STANDIN_GRACE_S
        while time.monotonic() < deadline:
            if not all(standin.running for standin in self.standins.values()):
                for standin in self.standins.values():
                    standin.close()
                self.standins = {}
                return False
            time.sleep(0.05)
        return True

    def session_count(self, node: LocalSidecar) -> int | None:
        """How many sessions the node's copy holds (ListSessions); None if it did not answer."""
        if not node.running:
            return None
        with grpc.insecure_channel(node.address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            try:
                answer = stub.ListSessions(
                    session_pb2.ListSessionsRequest(), timeout=PROBE_TIMEOUT_S
                )
            except grpc.RpcError:
                return None
        return len(answer.sessions)

    def wait_sessions(self, nodes: Sequence[LocalSidecar], count: int) -> float:
        """Wait until every node lists ``count`` sessions; the monotonic time they did."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            counts = {node.node_id: self.session_count(node) for node in nodes}
            if all(seen == count for seen in counts.values()):
                return time.monotonic()
            if time.monotonic() >= deadline:
                raise SceneFailed(f"not every node lists {count} sessions: {counts}")
            time.sleep(0.02)

    def wait_serving(self, node: LocalSidecar) -> float:
        """Wait until the node's stand-in serves; the monotonic time it did."""
        standin = self.standins[node.node_id]
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not standin.serving():
            if not standin.running or time.monotonic() >= deadline:
                state = "exited" if not standin.running else "did not serve in time"
                raise SceneFailed(f"{node.node_id}'s stand-in VSM server {state}")
            time.sleep(0.02)
        return time.monotonic()

    def start_node(self, node: LocalSidecar) -> float:
        """Start (or restart) a sidecar without waiting; return the monotonic start time."""
        if node.node_id not in self.recorders:
            # The recorder retries until the gRPC port answers, so it sees the first status.
            self.recorders[node.node_id] = RoleRecorder(node.address)
        started = time.monotonic()
        node.start(wait=False)
        return started

    def wait_role(self, node: LocalSidecar, role: str, after: float, timeout: float) -> Observation:
        """The first ``role`` the node reported since ``after``; fail early if it exits."""
        recorder = self.recorders[node.node_id]
        while True:
            try:
                # Short slices, so a process that died is noticed long before the timeout.
                return recorder.wait_role(role, timeout=0.5, after=after)
            except TimeoutError:
                seen = " -> ".join(recorder.roles_since(after)) or "nothing"
                if node.process is not None and not node.running:
                    raise SceneFailed(
                        f"{node.node_id} exited with code {node.process.returncode} before it "
                        f"reported {role} (it reported: {seen})"
                    ) from None
                if time.monotonic() >= after + timeout:
                    raise SceneFailed(
                        f"{node.node_id} did not report {role} within {timeout:.0f} s "
                        f"(it reported: {seen})"
                    ) from None

    def split(self, timeout: float = SETTLE_TIMEOUT_S) -> Split:
        """Wait until one node is PRIMARY and the other STANDBY, agreeing on the epoch."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = [(node, status_or_none(node)) for node in self.nodes]
            found = _as_split(statuses)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                seen = ", ".join(f"{n.node_id} {_role_of(s)}" for n, s in statuses)
                raise SceneFailed(f"no PRIMARY with a STANDBY within {timeout:.0f} s ({seen})")
            time.sleep(0.05)

    def last_epoch(self, node: LocalSidecar) -> int:
        """The epoch in the node's latest WatchRole message."""
        observations = self.recorders[node.node_id].observations
        return int(observations[-1].status.get("epoch", 0)) if observations else 0

    def etcd_leader(self) -> EtcdMember:
        try:
            return self.etcd.leader(timeout=ETCD_TIMEOUT_S)
        except EtcdClusterError as exc:
            raise SceneFailed(f"etcd has no leader: {exc}") from None

    def close(self) -> None:
        """Kill the stand-ins and the sidecars, stop following them, close etcd, remove the
        work directory and the network namespaces."""
        try:
            for standin in self.standins.values():
                standin.close()
            for node in self.nodes:
                node.close()
            for recorder in self.recorders.values():
                recorder.close()
            self.etcd.close()
        finally:
            try:
                if self.net is not None:
                    self.net.close()  # deletes every namespace it made, and the veths with them
            finally:
                shutil.rmtree(self.workdir, ignore_errors=True)


def _netns_skipped() -> str | None:
    """Why the demo stays on loopback, without a resource IP; None if it can use namespaces."""
    if os.environ.get(NETNS_ENV, "").strip() == "0":
        return f"{NETNS_ENV}=0"
    try:
        return netns.netns_unavailable()
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)


def status_or_none(node: LocalSidecar) -> dict[str, Any] | None:
    if not node.running:
        return None
    try:
        return node.role(timeout=PROBE_TIMEOUT_S)
    except client.Unreachable:
        return None


def _role_of(status: dict[str, Any] | None) -> str:
    return "unreachable" if status is None else client.role_name(status)


def _as_split(statuses: Sequence[tuple[LocalSidecar, dict[str, Any] | None]]) -> Split | None:
    known = [(node, status) for node, status in statuses if status is not None]
    by_role = {client.role_name(status): (node, status) for node, status in known}
    if len(known) != 2 or set(by_role) != {"PRIMARY", "STANDBY"}:
        return None
    (primary, pstatus), (standby, sstatus) = by_role["PRIMARY"], by_role["STANDBY"]
    # Right after a change the standby may not have seen the new leader yet.
    agreed = all(pstatus.get(key) == sstatus.get(key) for key in ("epoch", "leader_id"))
    return Split(primary, standby, int(pstatus.get("epoch", 0))) if agreed else None

