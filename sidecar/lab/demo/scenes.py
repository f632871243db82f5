"""The demo's six scenes: each announces what it is about to do, does it, and returns the
measured result."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from ... import client
from ...api import session_pb2, session_pb2_grpc
from ..etcderrors import EtcdClusterError
from ..etcdmember import EtcdMember
from ..localnode import LocalSidecar, Observation
from .lab import Lab, Split
from .plan import (
    ETCD_TIMEOUT_S,
    FAILBACK_DELAY_S,
    FAILOVER_SLACK_S,
    NODE_IDS,
    RIDE_OUT_S,
    RIDE_OUT_TTL,
    RPC_TIMEOUT_S,
    SETTLE_TIMEOUT_S,
    SceneFailed,
)

USERS = ("alice", "bob", "carol", "dave", "erin")  # one session each

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

