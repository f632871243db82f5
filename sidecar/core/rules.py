"""The node's decisions as pure functions of what it knows: no etcd, no asyncio, no clock
(``now`` is passed in). :class:`~sidecar.core.node.Node` reads the state, calls these, and acts;
``tests/core/test_rules.py`` is their specification.

- may this node campaign (:func:`held_back`; maintenance mode holds every node back but the
  target of a switchover),
- is a failback due (:func:`failback_state`, :func:`failback_due`),
- who may take over a handover (:func:`ineligibility`, :func:`choose_target`),
- what a primary does about a switchover request or its own ill health (:func:`handover`),
- how long a leader key without a lease counts as held (:func:`unowned_leader`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .roles import Role, Status

if TYPE_CHECKING:  # types only: the rules import nothing that does I/O
    from ..etcd.records import MemberRecord, SwitchoverRequest

HEALTH_UNHEALTHY = "unhealthy"
HEALTH_HEALTHY = "healthy"
# A leader key without a lease (no sidecar writes one) counts as held for this many TTLs after a
# node first sees it unchanged, then that node deletes it: by then any node that held the key
# has seen it change, or lost etcd for longer than its lease deadline and fenced itself.
UNOWNED_LEADER_TTLS = 2


class SwitchoverRefused(Exception):
    """The move cannot be made; ``str()`` says why, for FAILED_PRECONDITION."""


# -- campaigning -------------------------------------------------------------------------------

def waits_for(request: SwitchoverRequest | None, me: str) -> str | None:
    """The node a live switchover request makes this one hold back for, or None."""
    if request is not None and request.target != me:
        return request.target
    return None


def held_back(request: SwitchoverRequest | None, me: str, target_known: bool,
              health_configured: bool, health: bool | None,
              paused: bool = False) -> str | None:
    """Why this node must not campaign now, or None.

    Only a live member is waited for (``target_known``): a request naming anyone else (a node
    long gone, a typo) must not keep the cluster without a primary. While ``paused`` no node
    takes the role by itself (no takeover when the primary's lease ends); the target of a
    switchover request still does, since the primary decided that move (handover) and
    stepped down for it. With a health check configured, only a node known to be healthy
    campaigns."""
    if request is not None and waits_for(request, me) is not None and target_known:
        return f"holding back: {request.target} takes over ({request.reason})"
    if paused and (request is None or request.target != me):
        return "paused (maintenance mode): no takeover until `vsm-sidecar resume`"
    if health_configured and health is not True:
        state = "unhealthy" if health is False else "not yet known healthy"
        return f"not campaigning: the local VSM server is {state}"
    return None


# -- failback ----------------------------------------------------------------------------------

FailbackState = tuple[Role, str | None, bool | None, object]


def failback_state(status: Status, health: bool | None, copy_current: object) -> FailbackState:
    """What a failback depends on; any change of it restarts the delay."""
    # Garbage in the leader key is no leader to take the role back from.
    leader = status.leader.node_id if status.leader is not None and status.leader.valid \
        else None
    return (status.role, leader, health, copy_current)


def failback_ready(state: FailbackState, me: str, health_configured: bool,
                   paused: bool = False) -> bool:
    """The preferred primary may ask for the role back: a healthy, caught-up STANDBY of
    someone else, and the cluster is not paused (no failback in maintenance mode). A verdict
    of unhealthy always holds it back, with or without a health check: in ``on-primary``
    mode a VSM server that would not start says so (the primary would refuse the request,
    and the node would ask again every time the delay passed)."""
    role, leader, health, copy_current = state
    healthy = health is True or (health is None and not health_configured)
    return role is Role.STANDBY and leader not in (None, me) and healthy \
        and copy_current is True and not paused


def failback_due(state: FailbackState, me: str, health_configured: bool, stable_since: float,
                 now: float, delay: float, paused: bool = False) -> bool:
    """Ready, and unchanged for ``delay`` seconds (a flapping node never fails back)."""
    return failback_ready(state, me, health_configured, paused) and \
        now - stable_since >= delay


# -- handover targets --------------------------------------------------------------------------

def ineligibility(member: MemberRecord | None, node_id: str) -> str | None:
    """Why ``member`` cannot take the leadership now, or None when it can."""
    if member is None:
        return f"{node_id} is not a member (it holds no lease in etcd)"
    if member.role != "ROLE_STANDBY":
        role = "?" if member.role is None else member.role
        return f"{node_id} is {role.removeprefix('ROLE_')}, not STANDBY"
    health = member.health
    if health == HEALTH_UNHEALTHY:
        return f"{node_id} is unhealthy (its VSM server check fails)"
    if health not in (None, HEALTH_HEALTHY):  # a check is configured, no verdict yet
        return f"{node_id} is not yet known healthy (its VSM server check is {health})"
    if not member.copy_current:
        return f"{node_id} has not caught up with the session records"
    return None


def choose_target(members: Iterable[MemberRecord], leader: str, target: str | None) -> str:
    """The node to hand over to: ``target`` if eligible, else any eligible standby."""
    by_id = {m.node_id: m for m in members}
    if target is not None:
        reason = ineligibility(by_id.get(target), target)
        if reason is not None:
            raise SwitchoverRefused(reason)
        return target
    reasons = []
    for node_id in sorted(by_id):
        if node_id == leader:
            continue
        reason = ineligibility(by_id[node_id], node_id)
        if reason is None:
            return node_id
        reasons.append(reason)
    raise SwitchoverRefused("no standby can take over: " + ("; ".join(reasons) or "none is up"))


def member(members: Iterable[MemberRecord], node_id: str) -> MemberRecord | None:
    return next((m for m in members if m.node_id == node_id), None)


# -- a primary's handover ----------------------------------------------------------------------

KEEP = "keep"  # serve on
CLEAR = "clear"  # delete the request: it names us (already ours), or a node that cannot take over
HAND_OVER = "hand-over"  # step down for ``target``
ASK_AND_HAND_OVER = "ask-and-hand-over"  # unhealthy: write a request for ``target``, step down
STUCK = "stuck"  # unhealthy, and no standby can take over: keep the role


@dataclass(frozen=True)
class Handover:
    """What a primary does about the switchover key and its own health (rule 6)."""

    action: str
    target: str | None = None
    reason: str = ""


OPERATOR = "operator"  # the reason of a request an operator made (Switchover, the CLI)


def handover(request: SwitchoverRequest | None, me: str,
             members: Iterable[MemberRecord], health: bool | None,
             paused: bool = False) -> Handover:
    """The primary's decision: hand over for an eligible switchover request, or when it is
    unhealthy and a standby can take over; otherwise keep serving. ``members`` must be fresh
    when the request names another node. While ``paused`` only an operator's request moves
    the role: a failback request is cleared, ill health does not hand over."""
    if request is not None and request.target == me:
        return Handover(CLEAR)  # a failback that raced a failover: already ours
    if request is not None and paused and request.reason != OPERATOR:
        return Handover(CLEAR, request.target,
                        f"paused (maintenance mode): a {request.reason} request moves nothing")
    if request is not None:
        reason = ineligibility(member(members, request.target), request.target)
        if reason is None:
            return Handover(HAND_OVER, request.target, request.reason)
        return Handover(CLEAR, request.target, reason)
    if health is False and paused:
        return Handover(STUCK, None, "paused (maintenance mode): no handover for ill health")
    if health is False:
        try:
            target = choose_target(members, me, None)
        except SwitchoverRefused as exc:
            return Handover(STUCK, None, str(exc))
        return Handover(ASK_AND_HAND_OVER, target, "primary unhealthy")
    return Handover(KEEP)


# -- a leader key without a lease --------------------------------------------------------------

Unowned = tuple[int, float]  # (the key's mod revision, when this node first saw it)


def unowned_leader(seen: Unowned | None, revision: int, now: float,
                   ttl: float) -> tuple[Unowned, float]:
    """When this node first saw the unowned key at ``revision`` (a change restarts the grace),
    and the seconds it still counts as held (<= 0: delete it, guarded on its revision)."""
    if seen is None or seen[0] != revision:
        seen = (revision, now)
    return seen, seen[1] + unowned_grace(ttl) - now


def unowned_grace(ttl: float) -> float:
    return UNOWNED_LEADER_TTLS * ttl
