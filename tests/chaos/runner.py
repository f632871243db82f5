"""Chaos runner: faults against a local 3-member etcd, two sidecars (TTL 2) and, as root,
their hosts (network namespaces) with the resource IP.

Run ``python -m tests.chaos.runner [--runs N] [--scenario NAME ...] [--out docs]``. It writes
``<out>/RELIABILITY.md`` (one table row per scenario) and ``<out>/chaos/<scenario>.png`` (the
timeline of the first run of each scenario), and exits 1 if any invariant was violated.

Two layouts. **netns** (the default when the runner can create network namespaces, i.e. as
root; required when CI=true): etcd listens on the runner's own leg of a lab bridge, sidecar
``a`` runs in host namespace ``a`` and ``b`` in ``b``, each with ``--vip`` on its ``eth0``
and a name service behind it, and a client host asks through the resource IP. Only this
layout can cut a host off (link down, blackhole routes). **loopback** (``--loopback``, or when
namespaces are not available): everything on 127.0.0.1, no resource IP, and the scenarios
that need hosts are not run.

Four checkers run for the whole session:

* **roles** -- every role report of both sidecars, from their WatchRole streams (a
  :class:`RoleRecorder` each) and from a GetRole poll every 100 ms per node. A PRIMARY report
  with ``lease_time_left`` L is a *claim* on the interval ``[received, sent + L]``: ``received``
  is when the report arrived (monotonic), ``sent`` when the request left (for a stream message,
  which has no request, ``sent`` = ``received``). The node computed L at some instant between
  the two, so over that whole interval it held a lease it believed valid, unless a later report
  of the node (sent after this one arrived) shows it no longer PRIMARY: then the claim ends
  when that report arrived (it had stepped down and released). A **role violation**
  is a pair of claims of *different nodes* whose intervals overlap (whatever their epochs:
  equal epochs on two nodes would be worse still).
* **resource IP** (netns) -- a sampler in each host namespace dumps ``eth0``'s addresses over
  netlink every 20 ms. The address must never be on both hosts at an instant when both
  sidecars run (alive, not stopped, and answering again after a start or a SIGCONT: a killed
  or frozen process cannot release anything). After every heal the client must get the
  primary's name through the resource IP within the recovery bound.
* **sessions** -- a writer thread puts, re-puts and deletes records through whichever node is
  primary (following the ``thinlinc-not-primary-bin`` trailer of FAILED_PRECONDITION, trying the
  other node on UNAVAILABLE or a deadline, and repeating the same operation until it is
  acknowledged). After every fault heals the writer is held between operations and: every
  acknowledged put not later deleted must be in etcd with the same content, every acknowledged
  delete absent (else **lost**); and the standby's ListSessions must equal etcd's sessions range
  within 10 s (else a **standby divergence** violation).
* **recovery** -- after the heal there must be exactly one PRIMARY and one STANDBY that agree on
  leader and epoch within ``RECOVERY_BOUND`` seconds (else a violation).
* **etcd itself** -- after the heal every etcd member's HashKV at one revision must be the same.
  An etcd release that loses committed writes on a killed member (etcd-io/etcd#13766: 3.5.0 to
  3.5.2, the bundled test etcd among them) fails this, and the sessions findings then follow
  from etcd's loss. So the runner runs Debian's etcd (:mod:`tests.debianetcd`) unless
  ``--etcd`` names another.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from etcd3 import etcdrpc

from sidecar import client
from sidecar.api.session_pb2 import (
    DeleteSessionRequest,
    ListSessionsRequest,
    NotPrimary,
    PutSessionRequest,
    Session,
)
from sidecar.api.session_pb2_grpc import SessionServiceStub
from sidecar.lab.etcdmember import EtcdMember
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar, RoleRecorder
from sidecar.lab.netlab import NetnsLab
from sidecar.lab.netns import free_subnet, netns_unavailable
from sidecar.sessions.record import NOT_PRIMARY_METADATA_KEY, decode_session, encode_session

from .. import builders
from ..debianetcd import NoCrashSafeEtcd, crash_safe_etcd, etcd_version
from ..sidecars import NoSplit, wait_split
from ..vip_watch import Lifetimes, Probe, Sampler, held_spans, intersect, start_probe, start_sampler

TTL = 2
RECOVERY_BOUND = 10.0  # s after the heal: exactly one PRIMARY again, else a violation
STANDBY_BOUND = 10.0  # s after the heal for the standby's copy to equal etcd
POLL_INTERVAL = 0.1
WRITE_PAUSE = 0.02  # between two writer operations: keep the load modest on shared machines
RPC_TIMEOUT = 2.0
LIVE_RECORDS = 150  # the writer deletes the oldest live record beyond this many
SAMPLE_PERIOD = 0.02  # resource IP sampler, per host
PROBE_PERIOD = 0.1  # the client asks through the resource IP this often
NAME_PORT = 9000  # each host's name service, reached through the resource IP
Code = grpc.StatusCode


# ---------------------------------------------------------------------------------------------
# Roles


@dataclass(frozen=True)
class Report:
    node: str
    sent: float
    received: float
    role: str  # PRIMARY, STANDBY, ..., or UNREACHABLE (poll only)
    epoch: int
    lease_left: float | None
    source: str  # "watch" or "poll"

    def claim(self) -> tuple[float, float] | None:
        """The interval over which this report proves a PRIMARY lease believed valid."""
        if self.role != "PRIMARY" or self.lease_left is None:
            return None
        end = self.sent + self.lease_left
        return (self.received, end) if end >= self.received else None


def _lease_left(status: dict[str, Any]) -> float | None:
    text = status.get("lease_time_left")
    return float(str(text).rstrip("s")) if text is not None else None


class RolePoller:
    """GetRole on one node every POLL_INTERVAL, in its own thread (a paused node stalls only it)."""

    def __init__(self, node: LocalSidecar) -> None:
        self.node = node
        self.reports: list[Report] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"poll-{node.node_id}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.node.address)
        from sidecar.api import role_pb2, role_pb2_grpc
        stub = role_pb2_grpc.RoleServiceStub(channel)
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                status = client.to_dict(stub.GetRole(role_pb2.GetRoleRequest(), timeout=0.5))
                report = Report(self.node.node_id, sent, time.monotonic(),
                                client.role_name(status), int(status.get("epoch", 0)),
                                _lease_left(status), "poll")
            except grpc.RpcError:
                report = Report(self.node.node_id, sent, time.monotonic(), "UNREACHABLE", 0,
                                None, "poll")
            with self.lock:
                self.reports.append(report)
            self.stop.wait(max(0.0, sent + POLL_INTERVAL - time.monotonic()))
        channel.close()

    def snapshot(self) -> list[Report]:
        with self.lock:
            return list(self.reports)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(3)


def watch_reports(node_id: str, recorder: RoleRecorder) -> list[Report]:
    with recorder._cond:
        observations = list(recorder.observations)
    return [Report(node_id, o.at, o.at, o.role, int(o.status.get("epoch", 0)),
                   _lease_left(o.status), "watch") for o in observations]


Claim = tuple[float, float, Report]


def claims(reports: list[Report]) -> list[Claim]:
    """Every PRIMARY report's claim ``(start, end, report)``, sorted by start.

    A claim ends at ``sent + lease_left``, or earlier at the first later report of the same
    node that shows it no longer PRIMARY (a later report: sent after the claim's report was
    received): that node had stepped down, and rule 4 releases the resource IP and refuses
    writes in the very step that changes the role. Handovers (rule 6) rest on the same
    ordering: the old primary steps down before the key is deleted. A node that cannot report
    (paused, killed) keeps its claim to the end.
    """
    down: dict[str, list[Report]] = {}
    for report in reports:
        if report.role not in ("PRIMARY", "UNREACHABLE"):
            down.setdefault(report.node, []).append(report)
    found: list[Claim] = []
    for report in reports:
        interval = report.claim()
        if interval is None:
            continue
        start, end = interval
        stepped_down = [q.received for q in down.get(report.node, ())
                        if q.sent >= report.received]
        end = min([end, *stepped_down])
        if end >= start:
            found.append((start, end, report))
    return sorted(found, key=lambda c: c[0])


def overlapping_claims(reports: list[Report]) -> list[tuple[Claim, Claim]]:
    """Pairs of PRIMARY claims of different nodes whose intervals overlap."""
    ordered = claims(reports)
    found: list[tuple[Claim, Claim]] = []
    for i, claim in enumerate(ordered):
        for other in ordered[i + 1:]:
            if other[0] > claim[1]:
                break
            if other[2].node != claim[2].node:
                found.append((claim, other))
    return found


# ---------------------------------------------------------------------------------------------
# Sessions


@dataclass
class Op:
    kind: str  # "put" or "delete"
    session_id: str
    session: Session | None
    acked_at: float = 0.0
    node: str = ""


class Writer:
    """Puts, re-puts and deletes records through the primary, keeping what was acknowledged."""

    def __init__(self, addresses: dict[str, str], sockets: dict[str, str]) -> None:
        self.addresses = addresses  # address -> node id
        self.sockets = sockets  # address -> the node's Unix socket, where writes are allowed
        self.expected: dict[str, Session | None] = {}  # acknowledged state; None = deleted
        self.acks: list[tuple[float, str, str]] = []  # (time, kind, node)
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.hold = threading.Event()
        self.idle = threading.Event()
        self.rng = random.Random(7)
        self.thread = threading.Thread(target=self._run, name="chaos-writer", daemon=True)
        self._live: list[str] = []
        self._number = 0

    def start(self) -> None:
        self.thread.start()

    @contextlib.contextmanager
    def held(self, timeout: float = 30.0) -> Iterator[bool]:
        """Hold the writer between operations; yields False if it did not get there in time."""
        self.hold.set()
        try:
            yield self.idle.wait(timeout)
        finally:
            self.idle.clear()
            self.hold.clear()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            puts = sum(1 for a in self.acks if a[1] == "put")
            return puts, len(self.acks) - puts

    def _next_op(self) -> Op:
        if len(self._live) > LIVE_RECORDS or (self._live and self.rng.random() < 0.2):
            return Op("delete", self._live.pop(0), None)
        self._number += 1
        if self._live and self.rng.random() < 0.2:
            session_id = self.rng.choice(self._live)  # an update of a live record
        else:
            session_id = f"chaos-{self._number:06d}"
            self._live.append(session_id)
        session = builders.session(session_id, display=10 + self._number % 50,
                                   attributes={"n": str(self._number)})
        return Op("put", session_id, session)

    def _run(self) -> None:
        channels = {a: grpc.insecure_channel(self.sockets[a]) for a in self.addresses}
        stubs = {a: SessionServiceStub(c) for a, c in channels.items()}
        target = next(iter(self.addresses))
        try:
            while not self.stop.is_set():
                if self.hold.is_set():
                    self.idle.set()
                    time.sleep(0.01)
                    continue
                op = self._next_op()
                target = self._apply(stubs, target, op)
                time.sleep(WRITE_PAUSE)
        except Exception as exc:  # reported, never lost in a thread
            self.errors.append(repr(exc))
        finally:
            for channel in channels.values():
                channel.close()

    def _apply(self, stubs: dict[str, SessionServiceStub], target: str, op: Op) -> str:
        """Repeat ``op`` until it is acknowledged (puts and deletes are idempotent)."""
        while not self.stop.is_set():
            try:
                if op.kind == "put":
                    stubs[target].PutSession(PutSessionRequest(session=op.session),
                                             timeout=RPC_TIMEOUT)
                else:
                    stubs[target].DeleteSession(DeleteSessionRequest(session_id=op.session_id),
                                                timeout=RPC_TIMEOUT)
            except grpc.RpcError as exc:
                code = exc.code()
                if code is Code.INVALID_ARGUMENT:
                    raise
                hint = _not_primary(exc) if code is Code.FAILED_PRECONDITION else None
                if hint is not None and hint.address in stubs:
                    target = hint.address
                else:
                    target = self._other(target)
                time.sleep(0.05)
                continue
            with self.lock:
                self.expected[op.session_id] = op.session
                self.acks.append((time.monotonic(), op.kind, self.addresses[target]))
            return target
        return target

    def _other(self, address: str) -> str:
        return next(a for a in self.addresses if a != address)


def _not_primary(error: grpc.RpcError) -> NotPrimary | None:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == NOT_PRIMARY_METADATA_KEY:
            return NotPrimary.FromString(value)
    return None


def etcd_sessions(etcd_client: Any, prefix: str) -> dict[str, bytes]:
    """id -> canonical record bytes of etcd's sessions range."""
    found: dict[str, bytes] = {}
    for value, meta in etcd_client.get_prefix(prefix):
        session_id = meta.key.decode()[len(prefix):]
        found[session_id] = encode_session(decode_session(value, session_id))
    return found


def canonical(session: Session) -> bytes:
    copy = Session()
    copy.CopyFrom(session)
    copy.revision = 0
    return encode_session(copy)


# ---------------------------------------------------------------------------------------------
# The lab


class Lab:
    """The etcd cluster, the two sidecars, and the checkers running across scenarios.

    With ``netns`` the sidecars run in host namespaces ``a`` and ``b`` of a lab bridge, each
    holding the resource IP when PRIMARY, and etcd on the runner's own leg of the bridge.
    """

    def __init__(self, workdir: Path, etcd_binary: Path, netns: bool = False) -> None:
        self.workdir = workdir
        self.etcd_binary = etcd_binary
        self.cluster_name = f"chaos{uuid.uuid4().hex[:8]}"
        self.prefix = f"/thinlinc-ha/{self.cluster_name}/sessions/"
        self.netns = netns
        self.net: NetnsLab | None = None
        self.vip = ""
        self.etcd_host = "127.0.0.1"
        self.etcd: LocalEtcdCluster | None = None
        self.nodes: dict[str, LocalSidecar] = {}
        self.recorders: dict[str, RoleRecorder] = {}
        self.pollers: dict[str, RolePoller] = {}
        self.samplers: dict[str, Sampler] = {}
        self.probe: Probe | None = None
        self.lives = Lifetimes()  # when each sidecar runs (for the resource IP judgement)
        self.writer: Writer | None = None
        self.rng = random.Random(11)

    @property
    def cluster(self) -> LocalEtcdCluster:
        assert self.etcd is not None
        return self.etcd

    def start(self) -> None:
        if self.netns:
            self.net = NetnsLab(subnet=free_subnet())
            self.net.start()
            self.etcd_host = self.net.attach_root()
            self.vip = f"{self.net.subnet}.50"
            for host in "ab":
                self.net.serve_name(host, host, NAME_PORT)
        self.etcd = LocalEtcdCluster(host=self.etcd_host, workdir=self.workdir / "etcd",
                                     binary=self.etcd_binary)
        self.etcd.start()
        for node_id in "ab":
            node = self._sidecar(node_id)
            self.nodes[node_id] = node
            node.start()
            self.lives.ready(node_id)
            if node_id == "a":
                node.wait_role("PRIMARY", timeout=15)
        for node_id, node in self.nodes.items():
            self.recorders[node_id] = RoleRecorder(node.address)
            self.pollers[node_id] = RolePoller(node)
        if self.net is not None:
            self.samplers = {h: start_sampler(self.net, h, self.vip, SAMPLE_PERIOD) for h in "ab"}
            self.probe = start_probe(self.net, "client", self.vip, NAME_PORT, PROBE_PERIOD)
        self.split(timeout=20)
        self.writer = Writer({n.address: n.node_id for n in self.nodes.values()},
                             {n.address: n.control_address for n in self.nodes.values()})
        self.writer.start()
        time.sleep(3.0)  # some history before the first fault, for the timelines

    def _sidecar(self, node_id: str) -> LocalSidecar:
        if self.net is None:
            return LocalSidecar(node_id, self.cluster_name, self.cluster.endpoints_arg,
                                self.workdir, ttl=TTL)
        # A Unix socket: the runner (root namespace) reaches the sidecar whatever happens to
        # its host's network, as the VSM server beside it would.
        return LocalSidecar(node_id, self.cluster_name, self.cluster.endpoints_arg, self.workdir,
                            ttl=TTL, command_prefix=self.net.exec_prefix(node_id),
                            unix_socket=True,
                            extra_args=["--vip", f"{self.vip}/24", "--vip-interface", "eth0"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.stop.set()
            self.writer.thread.join(5)
        for poller in self.pollers.values():
            poller.close()
        for recorder in self.recorders.values():
            recorder.close()
        for node in self.nodes.values():
            node.close()
        if self.etcd is not None:
            self.etcd.close()
        if self.net is not None:
            self.net.close()  # also ends the samplers, the probe and the name services

    # -- views --------------------------------------------------------------------------------

    def split(self, timeout: float) -> tuple[LocalSidecar, LocalSidecar, int] | None:
        """Exactly one PRIMARY and one STANDBY agreeing on leader and epoch, asked afresh."""
        try:
            return wait_split(list(self.nodes.values()), timeout)
        except NoSplit:
            return None

    def reports(self) -> list[Report]:
        found: list[Report] = []
        for node_id in self.nodes:
            found += self.pollers[node_id].snapshot()
            found += watch_reports(node_id, self.recorders[node_id])
        return found

    def logs(self) -> str:
        return "\n".join(f"--- sidecar {n.node_id}\n{n.log_tail(40)}"
                         for n in self.nodes.values())

    def other(self, node: LocalSidecar) -> LocalSidecar:
        return next(n for n in self.nodes.values() if n is not node)

    def wait_other_primary(self, node: LocalSidecar, since: float) -> None:
        """Until the other node reports PRIMARY after ``since`` (the checkers judge a miss)."""
        with contextlib.suppress(TimeoutError):
            self.recorders[self.other(node).node_id].wait_role("PRIMARY", timeout=TTL + 8,
                                                              after=since)


# ---------------------------------------------------------------------------------------------
# Scenarios: each injects one fault and heals it; it returns (fault start, heal done).


Scenario = Callable[[Lab, LocalSidecar, int], tuple[float, float]]


def kill_primary(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    start = time.monotonic()
    lab.lives.gone(primary.node_id, start)  # from SIGKILL on it cannot release anything
    primary.kill()
    lab.wait_other_primary(primary, start)
    primary.start(timeout=20)  # returns once GetRole answers: in control again
    lab.lives.ready(primary.node_id)
    return start, time.monotonic()


def pause_primary(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    start = time.monotonic()
    lab.lives.gone(primary.node_id, start)
    primary.stop()
    time.sleep(2 * TTL + 1)  # well beyond the TTL: the other node has taken over by then
    primary.cont()
    # Running again once it answers GetRole: every reader checks the lease deadline first and
    # a node past it releases the resource IP synchronously before it answers.
    primary.wait_ready(timeout=20)
    lab.lives.ready(primary.node_id)
    return start, time.monotonic()


def host_death(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    """The primary's host drops off the network (its switch port goes down); the sidecar
    still runs there and must give the resource IP up before the other host claims it."""
    assert lab.net is not None
    start = time.monotonic()
    lab.net.link_down(primary.node_id)
    lab.wait_other_primary(primary, start)
    time.sleep(1.0)
    lab.net.link_up(primary.node_id)
    return start, time.monotonic()


def _blackhole(lab: Lab, host: str, add: bool) -> None:
    assert lab.net is not None
    lab.net.run(host, "ip", "route", "add" if add else "del", "blackhole",
                f"{lab.etcd_host}/32")


def primary_cut_off(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    """A blackhole route to etcd in the primary's host: clients and the other host still
    reach it, etcd does not. It must fence and release; the other node takes over."""
    start = time.monotonic()
    _blackhole(lab, primary.node_id, add=True)
    lab.wait_other_primary(primary, start)
    time.sleep(1.0)
    _blackhole(lab, primary.node_id, add=False)
    return start, time.monotonic()


def standby_cut_off(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    """A blackhole route to etcd in the standby's host for 2 TTL: nothing may change on the
    primary; the standby catches up once the route is gone."""
    standby = lab.other(primary)
    start = time.monotonic()
    _blackhole(lab, standby.node_id, add=True)
    time.sleep(2 * TTL + 1)
    _blackhole(lab, standby.node_id, add=False)
    return start, time.monotonic()


def kill_etcd_leader(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    leader = lab.cluster.leader()
    start = time.monotonic()
    leader.kill()
    time.sleep(2.0)
    leader.start()
    lab.cluster.wait_healthy(30)
    return start, time.monotonic()


def pause_etcd_member(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    # Even runs pause a follower, odd runs the leader. Pausing the leader for longer than the
    # lease TTL trips etcd-io/etcd#15247 in etcd releases without the fix (#16822, backported
    # to 3.4 and 3.5; the bundled etcd 3.5.1 predates it): the stuck old leader, once
    # resumed, still revokes the leases that expired in its stale view, and raft forwards the
    # revoke to the new leader. A lease then ends before "keepalive sent + TTL", which the
    # local-deadline rule relies on, and the chaos checker reports the overlap. The short
    # mode (run 0, in CI) pauses a follower; the long mode shows both.
    leader = lab.cluster.leader()
    followers = [m for m in lab.cluster.members if m is not leader]
    member = leader if run % 2 else followers[(run // 2) % len(followers)]
    start = time.monotonic()
    member.stop()
    time.sleep(3.0)
    member.cont()
    lab.cluster.wait_healthy(30)
    return start, time.monotonic()


def quorum_loss(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    members = lab.cluster.members
    stopped = [m for i, m in enumerate(members) if i != run % len(members)]
    start = time.monotonic()
    for member in stopped:
        member.stop()
    time.sleep(4.0)
    for member in stopped:
        member.cont()
    lab.cluster.wait_healthy(30)
    return start, time.monotonic()


def full_etcd_restart(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    start = time.monotonic()
    for member in lab.cluster.members:
        member.kill()
    for member in lab.cluster.members:
        member.start()
    lab.cluster.wait_healthy(60)
    return start, time.monotonic()


def compact_defrag(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    start = time.monotonic()
    for _ in range(2):
        lab.cluster.compact()
        for member in lab.cluster.members:
            with member.client(timeout=60) as etcd:
                etcd.defragment()
        time.sleep(0.5)
    return start, time.monotonic()


def slow_etcd(lab: Lab, primary: LocalSidecar, run: int) -> tuple[float, float]:
    member = lab.cluster.leader()  # the leader: every write waits on it
    start = time.monotonic()
    member.stop()
    time.sleep(1.0)
    member.cont()
    lab.cluster.wait_healthy(30)
    return start, time.monotonic()


@dataclass(frozen=True)
class Kind:
    function: Scenario
    description: str
    failover: bool  # the primary is expected to change
    hosts: bool = False  # needs the netns layout


SCENARIOS: dict[str, Kind] = {
    "kill-primary": Kind(kill_primary, "kill -9 the primary sidecar, restart it once the other "
                         "node is PRIMARY", True),
    "pause-primary": Kind(pause_primary, f"SIGSTOP the primary sidecar {2 * TTL + 1} s (TTL "
                          f"{TTL} s), then SIGCONT", True),
    "host-death": Kind(host_death, "the primary's host loses its link (switch port down) "
                       "until 1 s after the other node is PRIMARY", True, hosts=True),
    "primary-cut-off": Kind(primary_cut_off, "blackhole route to etcd in the primary's host "
                            "until 1 s after the other node is PRIMARY (clients still reach "
                            "it)", True, hosts=True),
    "standby-cut-off": Kind(standby_cut_off, f"blackhole route to etcd in the standby's host "
                            f"{2 * TTL + 1} s", False, hosts=True),
    "kill-etcd-leader": Kind(kill_etcd_leader, "kill -9 the etcd raft leader, restart it after "
                             "2 s", False),
    "pause-etcd-member": Kind(pause_etcd_member, "SIGSTOP one etcd member (each in turn) 3 s",
                              False),
    "quorum-loss": Kind(quorum_loss, "SIGSTOP two of three etcd members 4 s, then SIGCONT",
                        False),
    "etcd-full-restart": Kind(full_etcd_restart, "kill -9 all three etcd members, restart all",
                              False),
    "compact-defrag": Kind(compact_defrag, "compact + defragment every member, twice, under "
                           "write load", False),
    "slow-etcd": Kind(slow_etcd, "SIGSTOP the etcd raft leader 1 s", False),
}


def scenario_names(netns: bool) -> list[str]:
    """Every scenario the layout can run, in table order."""
    return [name for name, kind in SCENARIOS.items() if netns or not kind.hosts]


# ---------------------------------------------------------------------------------------------
# One run of one scenario


@dataclass
class RunResult:
    scenario: str
    run: int
    window: tuple[float, float]  # (settled before, check done)
    fault: tuple[float, float]
    recovery: float | None  # fault start -> the final PRIMARY/STANDBY split held from then on
    failover: float | None  # fault start -> first report of the new primary (if it changed)
    write_gap: float  # longest time without an acknowledged write in the fault window
    writes: int
    lost: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    client_gap: float | None = None  # longest time the client got no answer (netns)


def run_once(lab: Lab, name: str, run: int) -> RunResult:
    assert lab.writer is not None
    lab.cluster.wait_healthy(60)
    before = lab.split(timeout=RECOVERY_BOUND)
    if before is None:
        raise RuntimeError(f"no PRIMARY/STANDBY split before {name}:\n{lab.logs()}")
    primary, _, epoch_before = before
    settled = time.monotonic() - 1.0
    writes_before = sum(lab.writer.counts())
    function = SCENARIOS[name].function
    fault_start, healed = function(lab, primary, run)
    result = RunResult(name, run, (settled, 0.0), (fault_start, healed), None, None, 0.0, 0)
    after = lab.split(timeout=RECOVERY_BOUND)
    if after is None:
        result.violations.append(f"no single PRIMARY within {RECOVERY_BOUND} s of the heal")
    client_back = None
    if lab.probe is not None and after is not None:
        client_back = wait_client(lab.probe, after[0].node_id, healed)
        if client_back is None:
            result.violations.append(f"the client did not reach the primary {after[0].node_id} "
                                     f"through the resource IP within {RECOVERY_BOUND} s of "
                                     "the heal")
    time.sleep(1.0)  # let the writer carry on through the recovered primary before the check
    with lab.writer.held(timeout=30) as idle:
        if not idle:
            result.violations.append("writer did not complete its operation within 30 s")
        checked = time.monotonic()
        # First: if etcd's own members disagree, etcd lost writes and the findings below
        # follow from it (they compare with whichever member answered).
        if (disagreement := member_disagreement(lab.cluster)) is not None:
            result.violations.append(disagreement)
        result.lost, standby_problem = check_sessions(lab, after)
        if standby_problem:
            result.violations.append(standby_problem)
    result.window = (settled, checked)
    if lab.probe is not None:
        answers = [a for a in lab.probe.snapshot() if fault_start - 1 <= a[0] <= checked]
        answered = [a[1] for a in answers if a[2] is not None]
        result.client_gap = max((b - a for a, b in itertools.pairwise(answered)), default=None)
        if after is not None and client_back is not None:
            strays = [a for a in answers if a[0] >= client_back and a[2] != after[0].node_id]
            if strays:
                result.violations.append(
                    f"after it reached the primary {after[0].node_id}, the client got "
                    f"{strays[0][2] or 'no answer'} through the resource IP "
                    f"({len(strays)} times)")
    result.writes = sum(lab.writer.counts()) - writes_before
    if after is not None:
        new_primary, _, epoch_after = after
        result.recovery = recovery_time(lab.reports(), fault_start, checked, new_primary.node_id,
                                        epoch_after)
        if (new_primary.node_id, epoch_after) != (primary.node_id, epoch_before):
            result.failover = first_primary(lab.reports(), new_primary.node_id, epoch_after,
                                            fault_start)
    with lab.writer.lock:
        acks = [a[0] for a in lab.writer.acks if fault_start - 1 <= a[0] <= checked]
    if len(acks) >= 2:
        result.write_gap = max(b - a for a, b in itertools.pairwise(acks))
    return result


def wait_client(probe: Probe, primary: str, since: float) -> float | None:
    """When a connection the client made through the resource IP after ``since`` was first
    answered by the primary's host (None if not within RECOVERY_BOUND of ``since``)."""
    while True:
        answered = probe.first_answer_from(primary, since)
        if answered is not None:
            return answered
        if time.monotonic() >= since + RECOVERY_BOUND:
            return None
        time.sleep(PROBE_PERIOD)


def check_sessions(lab: Lab, split: tuple[LocalSidecar, LocalSidecar, int] | None,
                   ) -> tuple[list[str], str | None]:
    """Acknowledged writes missing from etcd, and whether the standby's copy differs."""
    assert lab.writer is not None
    with lab.writer.lock:
        expected = dict(lab.writer.expected)
    stored: dict[str, bytes] | None = None
    for _ in range(20):
        try:
            with lab.cluster.client(timeout=5) as etcd:
                stored = etcd_sessions(etcd, lab.prefix)
            break
        except Exception:
            time.sleep(0.5)
    if stored is None:
        return [], "etcd's sessions range could not be read"
    lost = []
    for session_id, session in expected.items():
        if session is None and session_id in stored:
            lost.append(f"{session_id}: acknowledged delete, present in etcd")
        elif session is not None and stored.get(session_id) != canonical(session):
            state = "absent" if session_id not in stored else "different content"
            lost.append(f"{session_id}: acknowledged put, {state} in etcd")
    if split is None:
        return lost, None
    standby = split[1]
    deadline = time.monotonic() + STANDBY_BOUND
    copy: dict[str, bytes] = {}
    with grpc.insecure_channel(standby.address) as channel:
        stub = SessionServiceStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                response = stub.ListSessions(ListSessionsRequest(), timeout=5)
                copy = {s.session_id: canonical(s) for s in response.sessions}
                if copy == stored:
                    return lost, None
            if time.monotonic() >= deadline:
                missing = sorted(set(stored) - set(copy))[:5]
                extra = sorted(set(copy) - set(stored))[:5]
                differ = sorted(k for k in set(copy) & set(stored) if copy[k] != stored[k])[:5]
                return lost, (f"standby {standby.node_id}'s copy differs from etcd after "
                              f"{STANDBY_BOUND} s: missing {missing}, extra {extra}, "
                              f"different {differ}")
            time.sleep(0.1)


def member_disagreement(cluster: LocalEtcdCluster, tries: int = 10) -> str | None:
    """Whether etcd's members hold different data at one revision (None when they agree).

    Every member's HashKV at the lowest revision all of them have reached must be the same:
    they applied the same raft log. An etcd that lost committed transactions on one member
    (etcd-io/etcd#13766: 3.5.0-3.5.2, a member killed under load) fails this; the sidecar
    cannot cause it. A member that cannot answer (yet) is asked again, ``tries`` times."""
    problem = "no member answered HashKV"
    for _ in range(tries):
        try:
            revisions = [member.status().revision for member in cluster.members]
            revision = min(revisions)
            hashes = {member.name: member_hash(member, revision) for member in cluster.members}
        except Exception as exc:  # grpc's error type cannot be named here
            problem = f"HashKV could not be asked: {exc!r}"
            time.sleep(0.5)
            continue
        if len({h for h, _ in hashes.values()}) == 1:
            return None
        compacted = {c for _, c in hashes.values()}
        problem = (f"etcd's members disagree at revision {revision}: HashKV "
                   + ", ".join(f"{name} {h:#010x}" for name, (h, _) in sorted(hashes.items()))
                   + f" (member revisions {sorted(revisions)}): etcd itself lost or "
                   "diverged committed writes")
        if len(compacted) > 1:  # compaction not yet applied everywhere: ask again
            time.sleep(0.5)
            continue
        return problem
    return problem


def member_hash(member: EtcdMember, revision: int) -> tuple[int, int]:
    """One member's (HashKV hash, compact revision) at ``revision``."""
    with member.client(timeout=10) as etcd:
        reply = etcdrpc.MaintenanceStub(etcd.channel).HashKV(
            etcdrpc.HashKVRequest(revision=revision), timeout=10,
            metadata=etcd.metadata, credentials=etcd.call_credentials)
    return int(reply.hash), int(reply.compact_revision)


def recovery_time(reports: list[Report], fault_start: float, checked: float, primary: str,
                  epoch: int) -> float:
    """Fault start -> the instant from which both nodes' polls showed the final split."""
    stable_since = fault_start
    for report in reports:
        if report.source != "poll" or not fault_start <= report.received <= checked:
            continue
        final = ("PRIMARY", epoch) if report.node == primary else ("STANDBY", epoch)
        if (report.role, report.epoch) != final:
            stable_since = max(stable_since, report.received)
    return stable_since - fault_start


def first_primary(reports: list[Report], node: str, epoch: int, after: float) -> float | None:
    times = [r.received for r in reports
             if r.node == node and r.role == "PRIMARY" and r.epoch == epoch and r.received >= after]
    return min(times) - after if times else None


def _owner(results: list[RunResult], at: float) -> RunResult | None:
    """The run whose window holds ``at``, else the nearest one."""
    owner = next((r for r in results if r.window[0] <= at <= r.window[1]), None)
    if owner is None and results:
        owner = min(results, key=lambda r: abs(r.window[0] - at))
    return owner


def resource_ip_violations(lab: Lab, results: list[RunResult], now: float) -> None:
    """Attach every instant at which both hosts held the resource IP while both sidecars ran.

    A host holds the address over [first, last] of each run of consecutive samples that show
    it (nothing is assumed between a 'held' and a 'not held' sample); the judged window is the
    intersection of both sidecars' running intervals (:class:`Lifetimes`)."""
    if not lab.samplers:
        return
    window = intersect(lab.lives.intervals("a", now), lab.lives.intervals("b", now))
    spans = {h: intersect(held_spans(s.snapshot()), window) for h, s in lab.samplers.items()}
    for start, end in intersect(spans["a"], spans["b"]):
        owner = _owner(results, start)
        if owner is not None:
            owner.violations.append(f"resource IP on both hosts while both sidecars ran: "
                                    f"[{start:.3f}, {end:.3f}]")


def role_violations(lab: Lab, results: list[RunResult]) -> None:
    """Attach every incident of overlapping PRIMARY claims to the run whose window holds its
    start. One incident: all overlapping report pairs of the same two (node, epoch) claims,
    reported once with the span during which both claims stood and how many reports showed it.
    """
    incidents: dict[tuple[str, int, str, int], list[tuple[Claim, Claim]]] = {}
    for first, second in overlapping_claims(lab.reports()):
        pair = sorted([(first[2].node, first[2].epoch), (second[2].node, second[2].epoch)])
        incidents.setdefault((*pair[0], *pair[1]), []).append((first, second))
    for (node_1, epoch_1, node_2, epoch_2), pairs in incidents.items():
        start = min(max(f[0], s[0]) for f, s in pairs)
        end = max(min(f[1], s[1]) for f, s in pairs)
        text = (f"PRIMARY claims overlap: {node_1} epoch {epoch_1} and {node_2} epoch "
                f"{epoch_2} both claimed a valid lease over [{start:.3f}, {end:.3f}] "
                f"({(end - start) * 1000:.0f} ms; {len(pairs)} overlapping report pairs)")
        owner = _owner(results, start)
        if owner is not None:
            owner.violations.append(text)


# ---------------------------------------------------------------------------------------------
# Output


ROLE_LEVEL = {"UNREACHABLE": 0, "STARTING": 1, "STOPPING": 1.5, "FENCED": 2, "STANDBY": 3,
              "PRIMARY": 4}


def plot_timeline(lab: Lab, result: RunResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert lab.writer is not None
    t0 = result.fault[0]
    lo, hi = result.window[0] - 1.0, result.window[1] + 0.5
    colours = {"a": "tab:blue", "b": "tab:orange"}
    rows = 3 if lab.samplers else 2
    fig, axes = plt.subplots(rows, 1, sharex=True, figsize=(10, 2.2 + 2.2 * rows),
                             gridspec_kw={"height_ratios": [3, 2, 2][:rows]})
    roles_ax, writes_ax = axes[0], axes[-1]
    reports = sorted(lab.reports(), key=lambda r: r.received)
    for offset, node_id in zip((0.06, -0.06), "ab", strict=True):
        mine = [r for r in reports if r.node == node_id and lo <= r.received <= hi]
        xs = [r.received - t0 for r in mine]
        ys = [ROLE_LEVEL.get(r.role, 1) + offset for r in mine]
        roles_ax.step(xs, ys, where="post", color=colours[node_id], label=f"sidecar {node_id}")
    roles_ax.set_yticks(list(ROLE_LEVEL.values()), list(ROLE_LEVEL))
    roles_ax.set_title(f"{result.scenario} (run {result.run}): roles, resource IP and "
                       "acknowledged writes" if lab.samplers else
                       f"{result.scenario} (run {result.run}): roles and acknowledged writes")
    roles_ax.legend(loc="lower left")
    if lab.samplers:
        _plot_resource_ip(lab, axes[1], t0, lo, hi, colours)
    with lab.writer.lock:
        acks = [a for a in lab.writer.acks if lo <= a[0] <= hi]
    for node_id, colour in colours.items():
        xs = [a[0] - t0 for a in acks if a[2] == node_id]
        ys = [i + 1 for i, a in enumerate(acks) if a[2] == node_id]
        writes_ax.plot(xs, ys, ".", markersize=2, color=colour, label=f"acked via {node_id}")
    writes_ax.set_ylabel("writes acknowledged")
    writes_ax.set_xlabel("seconds since fault start")
    writes_ax.legend(loc="upper left")
    for ax in axes:
        ax.axvspan(0, result.fault[1] - t0, color="red", alpha=0.12)
        ax.set_xlim(lo - t0, hi - t0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_resource_ip(lab: Lab, ax: Any, t0: float, lo: float, hi: float,
                      colours: dict[str, str]) -> None:
    """Bars: when each host held the resource IP. Dots: who answered the client through it."""
    levels = {"a": 2.0, "b": 1.0}
    for host, sampler in lab.samplers.items():
        spans = [(max(s, lo) - t0, min(e, hi) - max(s, lo)) for s, e in
                 held_spans(sampler.snapshot()) if e >= lo and s <= hi]
        ax.broken_barh(spans, (levels[host] - 0.3, 0.6), color=colours[host], alpha=0.6)
    if lab.probe is not None:
        answers = [a for a in lab.probe.snapshot() if lo <= a[0] <= hi]
        for who, level, colour in (("a", 2.0, colours["a"]), ("b", 1.0, colours["b"]),
                                   (None, 0.0, "tab:red")):
            xs = [a[0] - t0 for a in answers if a[2] == who]
            ax.plot(xs, [level] * len(xs), "|", markersize=6, color="black" if who else colour)
    ax.set_yticks([0.0, 1.0, 2.0], ["client: no answer", "held by b", "held by a"])
    ax.set_ylim(-0.6, 2.6)
    ax.set_ylabel("resource IP")


def _seconds(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} / {max(values):.2f}" if values else "-"


def table(results: list[RunResult], names: list[str]) -> str:
    client = any(r.client_gap is not None for r in results)
    head = ("| scenario | runs | recovery s (median / max) | failover s (median / max) | "
            "longest write gap s (median / max) | "
            + ("longest client gap s (median / max) | " if client else "")
            + "violations | writes acked | lost |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        mine = [r for r in results if r.scenario == name]
        recoveries = [r.recovery for r in mine if r.recovery is not None]
        failovers = [r.failover for r in mine if r.failover is not None]
        gaps = [r.client_gap for r in mine if r.client_gap is not None]
        lines.append(
            f"| {name} | {len(mine)} | {_seconds(recoveries)} | "
            f"{_seconds(failovers)} ({len(failovers)} of {len(mine)}) | "
            f"{_seconds([r.write_gap for r in mine])} | "
            + (f"{_seconds(gaps)} | " if client else "")
            + f"{sum(len(r.violations) for r in mine)} | {sum(r.writes for r in mine)} | "
            f"{sum(len(r.lost) for r in mine)} |")
    return "\n".join(lines)


def machine(etcd: Path) -> str:
    try:
        model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    try:
        version = f"etcd Version: {etcd_version(etcd)}"
    except NoCrashSafeEtcd:  # it does not run, or says no version
        version = "etcd version unknown"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({model}), "
            f"Python {platform.python_version()}, {version}, commit {commit}")


def layout_text(lab: Lab) -> str:
    if lab.net is None:
        return ("loopback: a local 3-member etcd cluster on 127.0.0.1, two sidecars `a` and "
                f"`b` (`--ttl {TTL}`), no network namespaces, no resource IP")
    return (f"netns: a local 3-member etcd cluster on the runner's leg of a lab bridge "
            f"({lab.etcd_host}); sidecars `a` and `b` (`--ttl {TTL}`) in host namespaces `a` "
            f"and `b` with the resource IP {lab.vip}/24 on `eth0` and a name service on port "
            f"{NAME_PORT}; a client host connects through the resource IP every "
            f"{PROBE_PERIOD * 1000:.0f} ms (200 ms timeout)")


def sampling_text(lab: Lab) -> str:
    if not lab.samplers:
        return ""
    parts = []
    for host, sampler in sorted(lab.samplers.items()):
        gaps = sampler.gaps()
        if gaps:
            parts.append(f"{host}: {len(gaps) + 1} samples, gap median "
                         f"{statistics.median(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms")
    return ("Resource IP samplers (an overlap shorter than the gap around it could be missed): "
            + "; ".join(parts) + ".")


README_START = "<!-- chaos-summary:start -->"
README_END = "<!-- chaos-summary:end -->"


def update_readme(readme: Path, results: list[RunResult], names: list[str], command: str,
                  layout: str) -> None:
    """Replace the block between the chaos-summary markers with this run's table."""
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END)
    violations = sum(len(r.violations) for r in results)
    lost = sum(len(r.lost) for r in results)
    block = (f"{README_START}\n`{command}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d}, "
             f"{len(results)} faults, {layout.split(':')[0]} layout: {violations} invariant "
             f"violations, {lost} acknowledged writes lost. Details, columns and timelines: "
             f"[docs/RELIABILITY.md](docs/RELIABILITY.md).\n\n{table(results, names)}\n")
    readme.write_text(text[:start] + block + text[end:])


def write_report(out: Path, results: list[RunResult], names: list[str], command: str,
                 elapsed: float, layout: str, sampling: str, etcd: Path) -> Path:
    details = []
    for r in results:
        for text in r.violations:
            details.append(f"- {r.scenario} run {r.run}: {text}")
        for text in r.lost[:10]:
            details.append(f"- {r.scenario} run {r.run}: lost {text}")
    more = f"\n- ... and {len(details) - 40} more" if len(details) > 40 else ""
    scenario_lines = "\n".join(f"| {n} | {SCENARIOS[n].description} |" for n in names)
    images = "\n".join(f"- [{n}](chaos/{n}.png)" for n in names)
    skipped = [n for n in SCENARIOS if n not in names]
    leader_runs = [r for r in results if r.scenario == "pause-etcd-member" and r.run % 2]
    tripped = [r for r in leader_runs if any("claims overlap" in v for v in r.violations)]
    leader_pauses = (f"{len(tripped)} of {len(leader_runs)} leader pauses (runs "
                     f"{', '.join(str(r.run) for r in tripped) or 'none'}) showed an overlap"
                     if leader_runs else "no leader pause was run")
    not_run = (f"\nNot run in this layout: {', '.join(skipped)} (they need network "
               "namespaces, i.e. root).\n" if skipped else "")
    text = f"""# Reliability: chaos suite

Generated by `tests/chaos/runner.py`; do not edit by hand, run it again.

- date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- machine: {machine(etcd)} (shared with other work; times include that noise)
- command: `{command}` ({elapsed / 60:.1f} min)
- layout: {layout}

## Results

{table(results, names)}

{"No violations and no lost writes." if not details else "Findings:"}
{chr(10).join(details[:40])}{more}
{not_run}
{sampling}

Pausing the etcd **leader** for longer than the TTL (odd runs of pause-etcd-member) trips
etcd-io/etcd#15247 in etcd releases without the fix (etcd-io/etcd#16822, in 3.4.31, 3.5.13
and 3.6; Debian 12's 3.4.23 and the bundled 3.5.1 among them): the stuck leader, once
resumed, still revokes the leases that expired in its stale view and raft forwards the revoke
to the new leader, so a lease ends before "keepalive sent + TTL", the bound of the local deadline
([DESIGN.md rule 3](DESIGN.md#rule-3-local-lease-deadline)). On such an
etcd the sidecar guards it: a slow or failed keepalive has the lease checked through another
member, and a takeover after a lost lease waits 1.5 keepalive intervals plus the safety margin,
by when the deposed primary has learned of its loss and stepped down. In the run above:
{leader_pauses}. Without the guard the new primary could report PRIMARY (and announce the
resource IP) a few milliseconds before the old one stepped down.

Columns:

- **recovery**: fault start until the instant from which GetRole polls (every
  {POLL_INTERVAL * 1000:.0f} ms) of both nodes showed, without interruption until the check, the
  final PRIMARY/STANDBY pair with one epoch. 0 means the pair held through the fault.
  A heal that is not followed by exactly one PRIMARY and one STANDBY agreeing on leader and
  epoch within {RECOVERY_BOUND:.0f} s is a violation.
- **failover**: fault start until the first PRIMARY report of the new primary, for the runs in
  which the primary (node or epoch) changed; "n of m" counts those runs.
- **longest write gap**: the longest time without an acknowledged write from 1 s before the
  fault until the check (the writer pauses {WRITE_PAUSE * 1000:.0f} ms between operations).
- **longest client gap** (netns): the longest time between two answers the client got
  through the resource IP, from 1 s before the fault until the check.
- **violations**: overlapping PRIMARY claims, the resource IP on both hosts while both
  sidecars ran, no single primary within the bound, a client that does not reach the
  primary through the resource IP within the bound (or reaches another host after it did), a
  standby copy that differs from etcd {STANDBY_BOUND:.0f} s after the heal, a stuck writer, and
  etcd's own members holding different data at one revision (HashKV): etcd lost committed
  writes itself (etcd-io/etcd#13766 in 3.5.0-3.5.2, when members are killed under load), and the
  lost writes and standby findings of that run follow from it.
- **writes acked**: puts and deletes acknowledged during the runs; **lost**: acknowledged puts
  (not later deleted) absent from etcd or with other content, and acknowledged deletes present.

## Invariants

- **One primary.** Every PRIMARY report with `lease_time_left` L is a claim on the interval
  `[received, sent + L]` (monotonic clock of the runner; `sent` is when the GetRole request
  left, `received` when the answer arrived; for WatchRole stream messages `sent` = `received`).
  The node computed L at some instant between the two, so throughout the interval it believed
  it held a valid lease, until a later report of the same node (sent after this one arrived)
  showed it no longer PRIMARY: the claim ends when that report arrived (rule 4 releases the
  resource IP and refuses writes in the step that changes the role; handovers rest on it). Two
  claims of *different* nodes whose intervals overlap are a violation (different epochs by
  construction: the epoch is the leader key's create revision).
  Reports come from a WatchRole stream per node and a GetRole poll per node.
- **No acknowledged write lost (RPO = 0).** A writer thread puts new records, updates live
  ones and deletes old ones through whichever node is primary, follows the
  `thinlinc-not-primary-bin` trailer of FAILED_PRECONDITION, tries the other node on
  UNAVAILABLE or a deadline, and repeats one operation until it is acknowledged. After each
  heal it is held between two operations and etcd's sessions range is compared with the
  acknowledged state.
- **Standby current.** The standby's ListSessions equals etcd's sessions range within
  {STANDBY_BOUND:.0f} s of the heal.
- **One holder of the resource IP** (netns). A sampler in each host's namespace dumps `eth0`'s
  addresses over netlink every {SAMPLE_PERIOD * 1000:.0f} ms, stamped with CLOCK_MONOTONIC
  (shared by all namespaces). A host holds the address over [first, last] of each run of
  consecutive samples that show it. Judged only while both sidecars *run*: from the moment a
  (re)started or resumed sidecar answers GetRole until SIGKILL or SIGSTOP is sent (a killed
  or frozen process cannot release anything; the dead host of kill-primary keeps the address
  until its sidecar starts again and removes it before campaigning). Any instant at which
  both hosts hold it is a violation.
- **Clients follow** (netns). After each heal the client must get the primary's name
  through the resource IP within {RECOVERY_BOUND:.0f} s, and only the primary's name from
  then until the check (its ARP cache is never flushed: the new holder's gratuitous ARP must
  move it).

## Scenarios

| scenario | fault |
|---|---|
{scenario_lines}

Timelines (first run of each scenario; roles of both nodes from their role reports, writes
acknowledged per node, fault window shaded):

{images}

## Running it

- short (one run per scenario, about 4 minutes; also `pytest tests/chaos`, which asserts 0
  violations and 0 lost writes and, as root, uses the netns layout):
  `python -m tests.chaos.runner --runs 1 --out /tmp/chaos`
- long (hundreds of faults, about an hour; the table above and the README summary):
  `python -m tests.chaos.runner --runs 25 --readme README.md`
- one scenario: `python -m tests.chaos.runner --scenario quorum-loss --runs 20`
- without root: `--loopback` (the host scenarios and the resource IP checks are left out)

matplotlib draws the timelines (Agg backend, no display needed).

## Not covered yet

Packet loss and latency on links (netem), a partition between the two sidecar hosts that
leaves both reaching etcd (harmless by design: they never talk to each other), an etcd member
dying together with a sidecar host (etcd runs outside the host namespaces in the chaos
lab), asymmetric
cuts (one direction only), and clock jumps (the lease deadline uses the monotonic clock).
"""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "RELIABILITY.md"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Main


def run_suite(names: list[str], runs: int, out: Path, command: str,
              log: Callable[[str], None] = print, keep: bool = False, netns: bool = False,
              readme: Path | None = None, etcd: Path | None = None) -> list[RunResult]:
    started = time.monotonic()
    binary = etcd or crash_safe_etcd()
    results: list[RunResult] = []
    tmp = tempfile.mkdtemp(prefix="vsm-chaos-")
    layout, sampling = "", ""
    try:
        if keep:
            log(f"work dir (kept): {tmp}")
        lab = Lab(Path(tmp), binary, netns=netns)
        try:
            lab.start()
            layout = layout_text(lab)
            order = [name for _ in range(runs) for name in names]
            counters: dict[str, int] = {}
            for name in order:
                run = counters.get(name, 0)
                counters[name] = run + 1
                result = run_once(lab, name, run)
                results.append(result)
                log(f"{name} run {run}: recovery {result.recovery} failover {result.failover} "
                    f"client gap {result.client_gap} writes {result.writes} "
                    f"lost {len(result.lost)} violations {result.violations}")
            time.sleep(1.0)
            role_violations(lab, results)
            resource_ip_violations(lab, results, time.monotonic())
            sampling = sampling_text(lab)
            for name in names:
                first = next(r for r in results if r.scenario == name)
                plot_timeline(lab, first, out / "chaos" / f"{name}.png")
            if lab.writer is not None and lab.writer.errors:
                results[-1].violations.append(f"writer errors: {lab.writer.errors}")
            if any(r.violations or r.lost for r in results):
                log(lab.logs())
        finally:
            lab.close()
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    write_report(out, results, names, command, time.monotonic() - started, layout, sampling,
                 binary)
    if readme is not None:
        update_readme(readme, results, names, command, layout)
    return results


def choose_layout(loopback: bool) -> bool:
    """True for the netns layout. Under CI=true namespaces are required, never skipped."""
    if loopback:
        return False
    why = netns_unavailable()
    if why is not None and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise SystemExit(f"CI=true: the chaos suite must run in network namespaces: {why}")
    return why is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="runs of each scenario")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="run only these (repeatable); default all the layout can run")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="where RELIABILITY.md and chaos/*.png go (default docs)")
    parser.add_argument("--loopback", action="store_true",
                        help="no network namespaces even as root (no host scenarios)")
    parser.add_argument("--readme", type=Path,
                        help="also replace the chaos summary block of this README")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (etcd and sidecar logs) for inspection")
    parser.add_argument("--etcd", type=Path,
                        help="the etcd executable (default: Debian's etcd-server, which keeps "
                        "committed writes through a kill; tests/debianetcd.py)")
    args = parser.parse_args(argv)
    netns = choose_layout(args.loopback)
    names = args.scenario or scenario_names(netns)
    if not netns and any(SCENARIOS[n].hosts for n in names):
        parser.error("host scenarios need network namespaces (root, iproute2)")
    # SIGTERM runs the clean-up (kill etcd members and sidecars) like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python -m tests.chaos.runner " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    results = run_suite(names, args.runs, args.out, command.strip(), keep=args.keep,
                        netns=netns, readme=args.readme, etcd=args.etcd)
    print(table(results, names))
    bad = [r for r in results if r.violations or r.lost]
    for r in bad:
        print(f"{r.scenario} run {r.run}: violations {r.violations} lost {r.lost[:10]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
