"""``vsm-sidecar demo``: watch two sidecars elect, fail over, fail back and switch over.

Nothing to set up: the demo starts a real 3-member etcd cluster (the bundled etcd binary), two
real sidecar processes, ``vsm-a`` (the preferred primary) and ``vsm-b``, and beside each a
stand-in VSM server (``vsm-sidecar vsm-standin``) that serves only while its sidecar is
PRIMARY, all in one temporary work directory. As root, where network namespaces can be made,
the sidecars and their stand-ins run in two hosts of a namespace lab (:mod:`sidecar.lab.netlab`)
with a real resource IP that a third host, the client, reaches; ``VSM_DEMO_NETNS=0`` keeps
them on loopback, without a resource IP. It plays a few scenes (election, sessions, crash
failover, restart and failback, planned switchover, etcd member loss), each with a measured
result, under a live table of what every process reports. Ctrl-C, SIGTERM or a closed terminal
(SIGHUP) at any time kills everything it started and removes the directory and the namespaces.

Times are measured the way a VSM server would see them: from the fault to the arrival of the
survivor's WatchRole message saying PRIMARY (:class:`~sidecar.lab.localnode.RoleRecorder`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import grpc

from .. import client
from ..api import session_pb2, session_pb2_grpc
from ..config import MAX_TTL, MIN_TTL
from . import netlab
from .etcderrors import EtcdClusterError, EtcdMemberUnavailable
from .etcdmember import EtcdMember
from .localcluster import LocalEtcdCluster
from .localnode import LocalSidecar, Observation, RoleRecorder
from .ports import free_port

CLUSTER = "demo"
NODE_IDS = ("vsm-a", "vsm-b")
FAILBACK_DELAY_S = 2
# vsm-a is the node ThinLinc calls primary: it takes the role back after a failover.
NODE_ARGS = {"vsm-a": ("--preferred-primary", "--failback-delay", str(FAILBACK_DELAY_S))}
USERS = ("alice", "bob", "carol", "dave", "erin")  # one session each
HEALTH_REQUEST = '{"service":"thinlinc.ha.v1.Primary"}'
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

REFRESH_S = 0.25  # the live table: about four times a second
# Each etcd probe opens a new connection; once a second is enough to show who leads.
ETCD_REFRESH_S = 1.0
PROBE_TIMEOUT_S = 0.3
PROGRESS_EVERY_S = 5.0  # off a terminal: a progress line when nothing else was printed
LOG_TAIL_LINES = 15

# Generous on purpose: the demo runs on laptops and busy CI machines alike. The measured times
# are what the demo is about; these only decide when to give up.
SETTLE_TIMEOUT_S = 30.0
FAILOVER_SLACK_S = 15.0  # on top of the TTL
EXIT_TIMEOUT_S = 10.0
ETCD_TIMEOUT_S = 30.0
RIDE_OUT_S = 2.0  # after an etcd member loss, watch this much longer than a TTL
# The shortest TTL that outlasts an etcd leader election at stock etcd timing (measured): with
# a shorter one the primary may fence itself, safely, so scene 5 shows that instead of failing.
RIDE_OUT_TTL = 3
# A stand-in that exits this soon after its start is a placeholder: this build has none.
STANDIN_GRACE_S = 1.0
RPC_TIMEOUT_S = 5.0

# The resource IP, where the sidecars run in network namespaces (root only).
NETNS_ENV = "VSM_DEMO_NETNS"  # "0": stay on loopback, without a resource IP
LAB_HOSTS = {"vsm-a": "a", "vsm-b": "b"}  # node id -> lab host
VIP_OCTET = 50  # the resource IP is <lab subnet>.50/24 on eth0
VIP_PORT = 9000  # the stand-ins listen on 0.0.0.0:9000 in their host, so the VIP reaches them
# Each look through the resource IP runs a short Python in the client's namespace: twice a
# second is enough. Who holds it (a quick ``ip addr``) is looked at every refresh.
VIP_ASK_EVERY_S = 0.5
VIP_ASK_TIMEOUT_S = 0.3
VIP_SKIPPED = "resource IP: skipped (needs root and network namespaces)"


class SceneFailed(Exception):
    """A scene's expectation was not met in time; the message says what was seen instead."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, or SIGHUP (the terminal closed): unwinds like Ctrl-C, so one cleanup serves all.

    The children run in sessions of their own and would outlive a demo killed by the default
    action of either signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# The processes


@dataclass(frozen=True)
class Split:
    """One PRIMARY and one STANDBY that agree on the leader and the epoch."""

    primary: LocalSidecar
    standby: LocalSidecar
    epoch: int


class StandIn:
    """One stand-in VSM server (``vsm-sidecar vsm-standin``) beside one sidecar.

    It follows its sidecar's WatchRole and serves its TCP port only while that sidecar is
    PRIMARY: a client gets "NAME COUNT", and "new USER" creates a session through the sidecar.
    """

    def __init__(
        self, node: LocalSidecar, workdir: Path, net: netlab.NetnsLab | None = None
    ) -> None:
        self.name = node.node_id
        # Its sidecar's socket, where session writes are allowed.
        self.sidecar = node.control_address
        self.command_prefix: list[str] = []
        if net is None:
            self.host, self.port = "127.0.0.1", free_port("127.0.0.1")
            self.listen = self.address
        else:
            # In the node's host, on every address: its own and the resource IP. The demo
            # reaches it through its own address, over its leg on the lab's bridge.
            lab_host = LAB_HOSTS[node.node_id]
            self.host, self.port = net.hosts[lab_host].ipv4, VIP_PORT
            self.listen = f"0.0.0.0:{VIP_PORT}"
            self.command_prefix = net.exec_prefix(lab_host)
        self.log_path = workdir / f"standin-{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        command = [*self.command_prefix, sys.executable, "-m", "sidecar", "vsm-standin",
                   "--grpc", self.sidecar, "--listen", self.listen,
                   "--name", self.name]  # fmt: skip
        with self.log_path.open("ab") as log:
            # A session of its own, like the sidecars: only the demo's cleanup stops it.
            self.process = subprocess.Popen(command, stdout=log, stderr=log,
                                            start_new_session=True)  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def serving(self) -> bool:
        """Whether its port accepts a connection (only while its sidecar is PRIMARY)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S):
                return True
        except OSError:
            return False

    def new_session(self, user: str) -> int:
        """Create a session for ``user``; the etcd revision the sidecar acknowledged it at."""
        try:
            with socket.create_connection((self.host, self.port), timeout=RPC_TIMEOUT_S) as conn:
                lines = conn.makefile("rw", encoding="utf-8", newline="\n")
                lines.readline()  # the greeting, "NAME COUNT"
                lines.write(f"new {user}\n")
                lines.flush()
                answer = lines.readline().strip()
        except OSError as exc:
            raise SceneFailed(f"{self.name}'s stand-in did not answer: {exc}") from None
        match answer.split():
            case ["ok", _, revision] if revision.isdigit():
                return int(revision)
        raise SceneFailed(f"{self.name}'s stand-in answered {answer!r} to 'new {user}'")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(EXIT_TIMEOUT_S)

    def log_tail(self, lines: int) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


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
                self.net = netlab.NetnsLab(subnet=netlab.free_subnet())
            except (netlab.LabError, OSError, subprocess.SubprocessError) as exc:
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
            statuses = [(node, _status_or_none(node)) for node in self.nodes]
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
        return netlab.netns_unavailable()
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)


def _status_or_none(node: LocalSidecar) -> dict[str, Any] | None:
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


# ---------------------------------------------------------------------------------------------
# The scenes: each announces what it is about to do, does it, and returns the measured result.

Announce = Callable[[str], None]
Scene = Callable[[Lab, Announce], str]


def election(lab: Lab, announce: Announce) -> str:
    first, second = lab.nodes
    announce(
        f"election: start {first.node_id} (the preferred primary), then {second.node_id}; one "
        f"becomes PRIMARY"
    )
    started = lab.start_node(first)
    won = lab.wait_role(first, "PRIMARY", after=started, timeout=SETTLE_TIMEOUT_S)
    joined = lab.start_node(second)
    lab.wait_role(second, "STANDBY", after=joined, timeout=SETTLE_TIMEOUT_S)
    split = lab.split()
    return (
        f"{split.primary.node_id} became PRIMARY {_took(won.at - started)} after its process "
        f"started (epoch {split.epoch}); {split.standby.node_id} follows it as STANDBY"
    )


def sessions(lab: Lab, announce: Announce) -> str:
    split = lab.split()
    primary = split.primary
    way = f"{primary.node_id}'s stand-in VSM server" if lab.standins else "PutSession"
    way += "" if lab.standins else f" on {primary.node_id}"
    announce(f"create {len(USERS)} sessions through {way}; both sidecars must mirror them")
    started = time.monotonic()
    if lab.standins:
        lab.wait_serving(primary)
        started = time.monotonic()
        revisions = [lab.standins[primary.node_id].new_session(user) for user in USERS]
    else:
        revisions = [_put_session(primary, index, user) for index, user in enumerate(USERS)]
    acked = time.monotonic()
    mirrored = lab.wait_sessions(lab.nodes, len(USERS))
    return (
        f"{len(USERS)} sessions created through {way} in "
        f"{_took(acked - started)} (revisions {min(revisions)}-{max(revisions)}); "
        f"{' and '.join(NODE_IDS)} list all {len(USERS)} {_took(mirrored - acked)} after the "
        f"last acknowledgement"
    )


def crash_failover(lab: Lab, announce: Announce) -> str:
    before = lab.split()
    survivor = before.standby
    announce(f"kill -9 the primary ({before.primary.node_id}): a crash, nothing is handed over")
    killed_at = time.monotonic()
    before.primary.kill()
    lab.down = before.primary
    promoted = lab.wait_role(
        survivor, "PRIMARY", after=killed_at, timeout=lab.ttl + FAILOVER_SLACK_S
    )
    epoch = _grown_epoch(before.epoch, promoted)
    count = lab.session_count(survivor)
    if count != len(USERS):
        raise SceneFailed(f"{survivor.node_id} is PRIMARY with {count} sessions, not {len(USERS)}")
    serving = ""
    if lab.standins:
        served = lab.wait_serving(survivor)
        serving = f"; its stand-in VSM server serves {_took(served - killed_at)} after the kill"
    if lab.standins and lab.vip is not None:
        reached = _wait_client_reaches(lab, survivor, killed_at + lab.ttl + FAILOVER_SLACK_S)
        serving += (
            f"; the client reached {survivor.node_id} through the resource IP {lab.vip} "
            f"{_took(reached - killed_at)} after the kill"
        )
        if lab.holds_vip(before.primary):
            # Nobody released it; the survivor's gratuitous ARP moved the client all the same.
            serving += f" ({before.primary.node_id}'s host still has the address)"
    return (
        f"{survivor.node_id} became PRIMARY {_took(promoted.at - killed_at)} after the kill "
        f"(TTL {lab.ttl} s), epoch {before.epoch} -> {epoch}, with all {count} sessions{serving}"
    )


def _wait_client_reaches(lab: Lab, node: LocalSidecar, deadline: float) -> float:
    """Wait until the client host gets ``node``'s stand-in through the resource IP; the
    monotonic time it did."""
    while True:
        reached = lab.client_reaches(timeout=0.2)
        if reached == node.node_id:
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise SceneFailed(
                f"the client did not reach {node.node_id} through the resource IP {lab.vip} in "
                f"time (last answer: {reached or 'none'})"
            )
        time.sleep(0.02)


def restart_and_failback(lab: Lab, announce: Announce) -> str:
    node, lab.down = lab.down, None
    if node is None:
        raise SceneFailed("no node was killed before this scene")
    survivor = next(other for other in lab.nodes if other is not node)
    announce(
        f"restart the killed node ({node.node_id}): back as STANDBY, then, as the preferred "
        f"primary, it takes the role back after the failback delay ({FAILBACK_DELAY_S} s)"
    )
    epoch = lab.last_epoch(survivor)
    started = lab.start_node(node)
    back = lab.wait_role(node, "STANDBY", after=started, timeout=SETTLE_TIMEOUT_S)
    taken = lab.wait_role(
        node, "PRIMARY", after=back.at, timeout=FAILBACK_DELAY_S + SETTLE_TIMEOUT_S
    )
    left = _first(lab, survivor.node_id, lambda role: role != "PRIMARY", started)
    if left is None or left.at > taken.at:
        raise SceneFailed(f"{node.node_id} became PRIMARY before {survivor.node_id} gave up")
    split = lab.split()
    if split.primary is not node:
        raise SceneFailed(f"the role moved on after the failback: {split}")
    return (
        f"{node.node_id} was STANDBY {_took(back.at - started)} after its restart and PRIMARY "
        f"again {_took(taken.at - started)} after it (failback delay {FAILBACK_DELAY_S} s), "
        f"epoch {epoch} -> {_grown_epoch(epoch, taken)}; the handover, {survivor.node_id} "
        f"leaving PRIMARY to {node.node_id} PRIMARY, took {_took(taken.at - left.at)}"
    )


def switchover(lab: Lab, announce: Announce) -> str:
    before = lab.split()
    primary, standby = before.primary, before.standby
    announce(
        f"planned switchover to {standby.node_id} (RoleService/Switchover), then back to "
        f"{primary.node_id}"
    )
    there = _switch(lab, primary, standby)
    back = _switch(lab, standby, primary)
    return f"{there}; {back}"


def etcd_leader_loss(lab: Lab, announce: Announce) -> str:
    before = lab.split()
    leader = lab.etcd_leader()
    announce(f"kill -9 the etcd raft leader ({leader.name}): the sidecars should ride it out")
    killed_at = time.monotonic()
    leader.kill()
    successor = lab.etcd_leader()
    elected = time.monotonic() - killed_at
    watched = lab.ttl + RIDE_OUT_S
    time.sleep(max(0.0, killed_at + watched - time.monotonic()))
    outcome = _after_member_loss(lab, before, killed_at, watched)
    rejoined = _restart_member(lab, leader)
    return (
        f"{successor.name} led etcd {_took(elected)} after the kill; {outcome}; "
        f"{leader.name} rejoined {_took(rejoined)} after its restart"
    )


SCENES: tuple[Scene, ...] = (
    election,
    sessions,
    crash_failover,
    restart_and_failback,
    switchover,
    etcd_leader_loss,
)


def _grown_epoch(old: int, promoted: Observation) -> int:
    new = int(promoted.status.get("epoch", 0))
    if new <= old:
        raise SceneFailed(f"the new primary's epoch {new} is not above the old one, {old}")
    return new


def _put_session(primary: LocalSidecar, index: int, user: str) -> int:
    """PutSession on the primary's sidecar, as a VSM server would; the commit revision."""
    session = session_pb2.Session(
        session_id=f"demo-{index + 1}", username=user, agent_hostname="agent1.example.com",
        agent_address="192.0.2.10", display=10 + index, status="running",
    )  # fmt: skip
    with grpc.insecure_channel(primary.control_address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        try:
            answer = stub.PutSession(
                session_pb2.PutSessionRequest(session=session), timeout=RPC_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise SceneFailed(f"PutSession on {primary.node_id} failed: {exc}") from None
    return int(answer.revision)


def _switch(lab: Lab, source: LocalSidecar, target: LocalSidecar) -> str:
    """Switch the role from ``source`` to ``target``, retrying while ``target`` is not yet a
    STANDBY that can take it; the measured result."""
    epoch = lab.last_epoch(source)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        asked = time.monotonic()
        try:
            primary, new_epoch, took = client.switchover(source.control_address,
                                                         target.node_id)
            break
        except client.Refused as exc:
            if time.monotonic() >= deadline:
                raise SceneFailed(f"switchover to {target.node_id} refused: {exc}") from None
            time.sleep(0.1)
        except client.Unreachable as exc:
            raise SceneFailed(f"switchover to {target.node_id}: {exc}") from None
    answered = time.monotonic() - asked
    if primary != target.node_id:
        raise SceneFailed(f"switchover to {target.node_id} made {primary} PRIMARY")
    split = lab.split()
    if split.primary is not target:
        raise SceneFailed(f"the role moved on after the switchover to {target.node_id}")
    return (
        f"{target.node_id} took over in {_took(took)} (the RPC answered after "
        f"{_took(answered)}), epoch {epoch} -> {new_epoch}"
    )


def _after_member_loss(lab: Lab, before: Split, since: float, watched: float) -> str:
    primary, standby = before.primary.node_id, before.standby.node_id
    primary_went = _path(["PRIMARY", *lab.recorders[primary].roles_since(since)])
    standby_went = _path(["STANDBY", *lab.recorders[standby].roles_since(since)])
    after = lab.split()
    if (primary_went, standby_went, after.epoch) == (["PRIMARY"], ["STANDBY"], before.epoch):
        return (
            f"for {watched:g} s {primary} stayed PRIMARY and {standby} STANDBY "
            f"(epoch {after.epoch} unchanged)"
        )
    story = f"{primary} went {' -> '.join(primary_went)}, {standby} {' -> '.join(standby_went)}"
    if lab.ttl >= RIDE_OUT_TTL:
        raise SceneFailed(f"{story}, although only one etcd member died")
    # A short TTL may run out during the etcd election. That is safe (rule 3) as long as the
    # primary gave up its role before anyone else took it; it is shown, not hidden.
    _expect_no_overlap(lab, before, since)
    return (
        f"{story}: a lease deadline passed during the etcd election (TTL {lab.ttl} s is too "
        f"short to ride one out: try --ttl {RIDE_OUT_TTL}); never two PRIMARYs, "
        f"{after.primary.node_id} is PRIMARY now, epoch {before.epoch} -> {after.epoch}"
    )


def _path(roles: list[str]) -> list[str]:
    """Roles as a path, without repeats (a new epoch in the same role is another message)."""
    return [role for index, role in enumerate(roles) if index == 0 or role != roles[index - 1]]


def _expect_no_overlap(lab: Lab, before: Split, since: float) -> None:
    primary, standby = before.primary.node_id, before.standby.node_id
    fenced = _first(lab, primary, lambda role: role != "PRIMARY", since)
    promoted = _first(lab, standby, lambda role: role == "PRIMARY", since)
    if promoted is not None and (fenced is None or promoted.at <= fenced.at):
        raise SceneFailed(f"{standby} became PRIMARY before {primary} gave up the role")


def _first(
    lab: Lab, node_id: str, wanted: Callable[[str], bool], since: float
) -> Observation | None:
    try:
        return lab.recorders[node_id].wait_for(lambda o: wanted(o.role), timeout=0, after=since)
    except TimeoutError:
        return None


def _restart_member(lab: Lab, member: EtcdMember) -> float:
    started = time.monotonic()
    member.start()
    try:
        lab.etcd.wait_healthy(ETCD_TIMEOUT_S)
    except EtcdClusterError as exc:
        raise SceneFailed(f"{member.name} did not rejoin: {exc}") from None
    return time.monotonic() - started


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ---------------------------------------------------------------------------------------------
# What the table shows


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    role: str
    epoch: str
    leader: str
    lease_left: str
    sessions: str
    vsm: str
    address: str
    vip: str | None = None  # whether its host holds the resource IP; None: there is none

    @property
    def key(self) -> tuple[str | None, ...]:
        """Everything but the ticking lease: what counts as a change in a log."""
        return (self.node_id, self.role, self.epoch, self.leader, self.sessions, self.vsm,
                self.vip)  # fmt: skip

    def cells(self) -> tuple[str, ...]:
        vip = () if self.vip is None else (self.vip,)
        return (self.node_id, self.role, self.epoch, self.leader, self.lease_left,
                self.sessions, self.vsm, *vip, self.address)  # fmt: skip


NODE_HEADER = (
    "node", "role", "epoch", "leader", "lease left", "sessions mirrored", "VSM", "gRPC address"
)  # fmt: skip
VIP_HEADER = "holds VIP"  # after "VSM", where there is a resource IP
MEMBER_HEADER = ("etcd", "state", "client URL", "pid")


def node_header(lab: Lab) -> tuple[str, ...]:
    if lab.vip is None:
        return NODE_HEADER
    at = NODE_HEADER.index("VSM") + 1
    return (*NODE_HEADER[:at], VIP_HEADER, *NODE_HEADER[at:])


def node_row(lab: Lab, node: LocalSidecar, holders: dict[str, str] | None = None) -> NodeRow:
    vsm = _vsm_state(lab, node)
    vip = None if lab.vip is None else (holders or {}).get(node.node_id, "-")
    if node.process is None:
        return NodeRow(node.node_id, "not started", "-", "-", "-", "-", vsm, node.address, vip)
    if not node.running:
        return NodeRow(node.node_id, "down", "-", "-", "-", "-", vsm, node.address, vip)
    status = _status_or_none(node)
    if status is None:
        return NodeRow(node.node_id, "no answer", "-", "-", "-", "-", vsm, node.address, vip)
    count = lab.session_count(node)
    return NodeRow(
        node.node_id,
        client.role_name(status),
        str(status.get("epoch", "0")),
        str(status.get("leader_id") or "-"),
        _seconds(status.get("lease_time_left")),
        "-" if count is None else str(count),
        vsm,
        node.address,
        vip,
    )


def _vsm_state(lab: Lab, node: LocalSidecar) -> str:
    standin = lab.standins.get(node.node_id)
    return "serving" if standin is not None and standin.serving() else "-"


def _seconds(duration: object) -> str:
    # A protobuf Duration in JSON form, e.g. "1.623s"; absent unless PRIMARY.
    if not isinstance(duration, str):
        return "-"
    return f"{float(duration.rstrip('s')):.2f} s"


class MemberProbe:
    """The etcd members' states: killed is seen at once, who leads at most once a second."""

    def __init__(self, cluster: LocalEtcdCluster) -> None:
        self.cluster = cluster
        # Keyed by pid too: a restarted member must not inherit its old "leader".
        self._probed: dict[tuple[str, int], str] = {}
        self._asked = float("-inf")

    def rows(self) -> list[tuple[str, ...]]:
        members = self.cluster.members
        if time.monotonic() - self._asked >= ETCD_REFRESH_S:
            self._asked = time.monotonic()
            self._probed = {
                (m.name, m.pid): _probe(m) for m in members if m.pid is not None
            }  # fmt: skip
        return [self._row(m) for m in members]

    def _row(self, member: EtcdMember) -> tuple[str, ...]:
        pid = member.pid
        if pid is None:
            return (member.name, "killed", member.client_url, "-")
        state = self._probed.get((member.name, pid), "running")
        return (member.name, state, member.client_url, str(pid))


class VipProbe:
    """Whose host holds the resource IP (every refresh), and whom the client reaches through
    it (at most twice a second: each look starts a process in the client's namespace)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.holders: dict[str, str] = {}
        self.client = "-"
        self._asked = float("-inf")

    def refresh(self) -> None:
        if self.lab.net is None:
            return
        self.holders = {
            node.node_id: "yes" if self.lab.holds_vip(node) else "-" for node in self.lab.nodes
        }
        if time.monotonic() - self._asked >= VIP_ASK_EVERY_S:
            self._asked = time.monotonic()
            self.client = self.lab.client_reaches() or "no answer"

    def line(self, color: bool) -> str | None:
        """``client via resource IP ADDRESS: NAME``; None without a resource IP."""
        if self.lab.vip is None:
            return None
        style = _STYLES.get("no answer") if self.client == "no answer" else "1;32"
        return f"  client via resource IP {self.lab.vip}: {_paint(self.client, style, color)}"


def _probe(member: EtcdMember) -> str:
    try:
        return "leader" if member.status(timeout=PROBE_TIMEOUT_S).is_leader else "running"
    except EtcdMemberUnavailable:
        return "no answer"


_STYLES = {
    "PRIMARY": "1;32",
    "STANDBY": "36",
    "FENCED": "1;31",
    "STARTING": "33",
    "STOPPING": "33",
    "down": "31",
    "killed": "31",
    "no answer": "33",
    "leader": "1;32",
    "serving": "1;32",
    "yes": "1;32",
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _paint(text: str, style: str | None, color: bool) -> str:
    return f"\x1b[{style}m{text}\x1b[0m" if color and style else text


def table(header: Sequence[str], rows: Sequence[Sequence[str]], color: bool) -> list[str]:
    """Aligned columns under a header; on a terminal the states in them (PRIMARY, killed,
    serving...) are coloured."""
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    lines = []
    for index, cells in enumerate([header, *rows]):
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        if index > 0:
            padded = [
                _paint(text, _STYLES.get(cell), color)
                for text, cell in zip(padded, cells, strict=True)
            ]
        lines.append("  " + "  ".join(padded).rstrip())
    return lines


def _rows(line: str, width: int) -> int:
    """Terminal rows a line takes once wrapped."""
    return max(1, -(-len(_ANSI.sub("", line)) // width))


def _newest(lines: Sequence[str], rows: int, width: int) -> list[str]:
    """The newest lines that fit in ``rows`` terminal rows (at least the last three)."""
    kept: list[str] = []
    for line in reversed(lines):
        rows -= _rows(line, width)
        if rows < 0 and len(kept) >= 3:
            break
        kept.append(line)
    return kept[::-1]


def _erase_rest(line: str, width: int) -> str:
    # Clear what an older, longer line left behind. Not after a line that fills its last row
    # exactly: there the cursor waits on the last column and the erase would take that column.
    length = len(_ANSI.sub("", line))
    return line if length and length % width == 0 else line + "\x1b[K"


def _style_event(line: str) -> str:
    if line.startswith("Scene "):
        return _paint(line, "1", True)
    if line.startswith("  => "):
        return _paint(line, "32", True)
    return _paint(line, "1;31", True) if line.startswith("FAILED") else line


# ---------------------------------------------------------------------------------------------
# The live view


class LiveView:
    """Header, live tables and scene log.

    On a terminal the whole screen is redrawn in place. Anywhere else (a CI log, a pipe) lines
    are only appended: the tables when something in them changed, else a progress line now
    and then, so the log stays readable.
    """

    def __init__(self, lab: Lab, tty: bool, started: float) -> None:
        self.lab = lab
        self.tty = tty
        self.started = started
        self.header: list[str] = []
        self.events: list[str] = []
        self.progress = ""
        self._members = MemberProbe(lab.etcd)
        self._vip = VipProbe(lab)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_key: object = None
        self._last_print = float("-inf")

    def add_header(self, *lines: str) -> None:
        self._add(self.header, lines)

    def say(self, line: str) -> None:
        self._add(self.events, [line])

    def _add(self, target: list[str], lines: Sequence[str]) -> None:
        with self._lock:
            target.extend(lines)
            drawn = self.tty and self._thread is not None
            if not drawn:
                _emit("\n".join(lines))
        if drawn:
            self._wake.set()

    def start(self) -> None:
        if self.tty:
            _emit("\x1b[?25l\x1b[2J", end="")  # hide the cursor, clear the screen
        self._thread = threading.Thread(target=self._loop, name="demo-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing; the last screen stays, and later lines are printed below it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(5)
        if self.tty:
            _emit("\x1b[?25h", end="")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._vip.refresh()
                nodes = [node_row(self.lab, node, self._vip.holders) for node in self.lab.nodes]
                members = self._members.rows()
                if self.tty:
                    self._redraw(nodes, members)
                else:
                    self._append(nodes, members)
            except Exception as exc:  # a display glitch must not end the demo
                self.progress = f"(display error: {exc!r})"
            self._wake.wait(REFRESH_S)
            self._wake.clear()

    def _tables(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> list[str]:
        client_line = self._vip.line(self.tty)
        return [
            *table(node_header(self.lab), [row.cells() for row in nodes], self.tty),
            *([] if client_line is None else [client_line]),
            "",
            *table(MEMBER_HEADER, members, self.tty),
        ]

    def _footer(self) -> str:
        return f"[{time.monotonic() - self.started:6.1f} s] {self.progress}"

    def _redraw(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> None:
        width, height = shutil.get_terminal_size()
        with self._lock:
            top = [*self.header, "", *self._tables(nodes, members), ""]
            bottom = ["", self._footer()]
            # Long lines wrap rather than being cut (a cut command cannot be copied), so the
            # budget is in rows; the newest scene lines win when the terminal is too short.
            room = height - 1 - sum(_rows(line, width) for line in top + bottom)
            events = [_style_event(line) for line in _newest(self.events, room, width)]
            screen = "".join(_erase_rest(line, width) + "\n" for line in top + events + bottom)
        # Home, overwrite every line, clear what is left below: no flicker.
        _emit(f"\x1b[H{screen}\x1b[J", end="")

    def _append(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> None:
        key = ([row.key for row in nodes], members, self._vip.client)
        now = time.monotonic()
        if key != self._last_key:
            lines = [self._footer(), *self._tables(nodes, members)]
        elif now - self._last_print >= PROGRESS_EVERY_S:
            lines = [self._footer()]
        else:
            return
        self._last_key, self._last_print = key, now
        with self._lock:
            _emit("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Start, run, clean up


def main(duration: float | None = None, ttl: int = 2) -> int:
    """Run the demo: 0 when every scene met its expectation, 1 if one did not, 130 on Ctrl-C
    (128 + the signal on SIGTERM or SIGHUP). Whatever happens, everything it started is gone
    when it returns."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        print(f"vsm-sidecar demo: --ttl must be {MIN_TTL}-{MAX_TTL}, not {ttl}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    with _sigterm_unwinds():
        lab = Lab(ttl)
        view = LiveView(lab, sys.stdout.isatty(), started)
        try:
            code = _attempt(lab, view, duration)
        finally:
            with _signals_ignored():
                view.stop()
                _close(lab)
    return code


def _attempt(lab: Lab, view: LiveView, duration: float | None) -> int:
    try:
        _run(lab, view, duration)
        return EXIT_OK
    except KeyboardInterrupt as exc:
        view.stop()
        by = f" by {exc}" if isinstance(exc, Terminated) else ""
        _emit(f"\nInterrupted{by}: stopping every process the demo started...")
        return 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    # Also the harness's own errors: no etcd binary, a sidecar that never answered.
    except (SceneFailed, EtcdClusterError, RuntimeError, TimeoutError) as exc:
        view.stop()
        _report_failure(lab, view, exc)
        return EXIT_FAILED


def _run(lab: Lab, view: LiveView, duration: float | None) -> None:
    view.add_header(*_intro(lab))
    view.say("Starting a 3-member etcd cluster...")
    if lab.net is not None:
        view.say("Building the network namespace lab (hosts a, b, client; a bridge)...")
    lab.start_etcd()
    view.add_header(_vip_line(lab), *_commands(lab))
    view.start()
    view.say(_standins_line(lab.start_standins(), lab))
    for number, scene in enumerate(SCENES, start=1):
        _play(number, scene, lab, view)
    view.say(f"All {len(SCENES)} scenes went as expected.")
    _linger(view, duration)


def _play(number: int, scene: Scene, lab: Lab, view: LiveView) -> None:
    def announce(title: str) -> None:
        view.progress = f"scene {number}/{len(SCENES)}: {title}"
        view.say(f"Scene {number}/{len(SCENES)}: {title}...")

    result = scene(lab, announce)
    view.say(f"  => {result}")


def _linger(view: LiveView, duration: float | None) -> None:
    if duration is None:
        view.progress = "scenes done; the cluster keeps running: try the commands. Ctrl-C stops."
        while True:  # until Ctrl-C or SIGTERM raises out of the sleep
            time.sleep(3600)
    left = view.started + duration - time.monotonic()
    if left > 0:
        view.progress = f"scenes done; the demo ends {duration:g} s after its start"
        time.sleep(left)


def _standins_line(available: bool, lab: Lab) -> str:
    if not available:
        return "stand-in VSM servers: not available in this build"
    where = ", ".join(f"{name} on {standin.address}" for name, standin in lab.standins.items())
    return (f"stand-in VSM servers: {where} (only the primary's serves: try "
            f"{_ask_command('HOST', 'PORT')})")


def _vip_line(lab: Lab) -> str:
    if lab.net is None or lab.vip is None:
        reason = "" if lab.net_skipped is None else f": {lab.net_skipped}"
        return f"{VIP_SKIPPED}{reason}"
    a, b = (lab.net.hosts[LAB_HOSTS[node_id]] for node_id in NODE_IDS)
    return (
        f"resource IP: {lab.vip}/24 on {netlab.HOST_IFNAME} of the primary's host; "
        f"{NODE_IDS[0]} runs in host a ({a.ipv4}), {NODE_IDS[1]} in host b ({b.ipv4}), and "
        f"host client asks {lab.vip}:{VIP_PORT} (namespaces {lab.net.tag}-*)"
    )


def _report_failure(lab: Lab, view: LiveView, exc: BaseException) -> None:
    view.say(f"FAILED: {exc}")
    logs: list[LocalSidecar | StandIn] = [*lab.nodes, *lab.standins.values()]
    for proc in logs:
        if proc.process is not None:
            view.say(f"--- last lines of {proc.log_path} ---\n{proc.log_tail(LOG_TAIL_LINES)}")


def _close(lab: Lab) -> None:
    try:
        lab.close()
    except Exception as exc:  # say so, but the caller's exit code stays what it was
        _emit(f"Cleanup problem: {exc}", file=sys.stderr)
        return
    namespaces = "" if lab.net is None else f" and the network namespaces {lab.net.tag}-*"
    _emit(
        f"Stopped etcd, the sidecars and the stand-in VSM servers; removed {lab.workdir}"
        f"{namespaces}."
    )


def _emit(text: str, end: str = "\n", file: TextIO | None = None) -> None:
    """Print and flush; a terminal that is gone (SIGHUP, a closed pipe) must not stop cleanup."""
    with suppress(OSError):
        print(text, end=end, file=file or sys.stdout, flush=True)


def _intro(lab: Lab) -> list[str]:
    return [
        f"vsm-sidecar demo: sidecars {' and '.join(NODE_IDS)} on a local 3-member etcd "
        f"cluster, lease TTL {lab.ttl} s; {NODE_IDS[0]} is the preferred primary (failback "
        f"delay {FAILBACK_DELAY_S} s). As root they run in network namespaces with a resource "
        f"IP; {NETNS_ENV}=0 keeps them on loopback without one.",
        f"Work dir (every process's log): {lab.workdir}",
    ]


def _commands(lab: Lab) -> list[str]:
    address, other = (node.address for node in lab.nodes)
    grpcurl, sidecar = _tool("grpcurl"), _tool("vsm-sidecar")
    # grpcurl takes a Unix socket as a path with -unix.
    target = address.removeprefix("unix:")
    grpcurl += " -unix" if address.startswith("unix:") else ""
    extra: list[str] = []
    if lab.net is not None and lab.vip is not None:
        client_ns = lab.net.netns("client")
        extra.append(f"  ip netns exec {client_ns} {_ask_command(lab.vip, VIP_PORT)}")
    return [
        f"Try these in another terminal while it runs ({NODE_IDS[1]} answers on {other}):",
        f"  {sidecar} status --grpc {address}",
        f"  {sidecar} switchover --to {NODE_IDS[1]} --grpc {lab.nodes[0].control_address}",
        f"  {grpcurl} -plaintext {target} list",
        f"  {grpcurl} -plaintext {target} thinlinc.ha.v1.RoleService/GetRole",
        f"  {grpcurl} -plaintext {target} thinlinc.ha.v1.SessionService/ListSessions",
        f"  {grpcurl} -plaintext -d '{HEALTH_REQUEST}' {target} grpc.health.v1.Health/Check",
        *(f"  curl http://{n.host}:{n.http_port}/primary" for n in lab.nodes if n.http_port),
        *extra,
        f"  {_tool('etcdctl')} --endpoints={lab.etcd.endpoints_arg} get --prefix "
        f"/thinlinc-ha/{CLUSTER}/",
    ]


def _ask_command(host: object, port: object) -> str:
    """A command that prints a stand-in's greeting: nc where installed, else bash alone."""
    if shutil.which("nc"):
        return f"nc {host} {port}"
    return f"bash -c 'exec 3<>/dev/tcp/{host}/{port}; head -1 <&3'"


def _tool(name: str) -> str:
    """``name`` if it is on PATH, else its full path beside this Python (a virtualenv)."""
    if shutil.which(name):
        return name
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def unwind(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = _set_handlers({signal.SIGTERM: unwind, signal.SIGHUP: unwind})
    try:
        yield
    finally:
        _set_handlers(previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Cleanup must run to its end: a second Ctrl-C there would leave etcd running."""
    ignored = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = _set_handlers(dict.fromkeys(ignored, signal.SIG_IGN))
    try:
        yield
    finally:
        _set_handlers(previous)


Handler = Callable[[int, FrameType | None], Any] | int | None


def _set_handlers(handlers: dict[signal.Signals, Handler]) -> dict[signal.Signals, Handler]:
    """Install handlers and return the previous ones; a no-op off the main thread (signals
    can only be handled there, and then the caller handles its own)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
