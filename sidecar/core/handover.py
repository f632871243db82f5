"""What ends a primary's term of its own accord (rule 6): a switchover request naming a node
that can take over (an operator's, or the preferred primary's failback), or this primary's own
ill health while a standby can take over. :func:`await_handover` watches the switchover key
and the health and raises :class:`HandOver`; the decision itself is
:func:`rules.handover`. The node then stops serving and deletes its leader key, and the
request in etcd keeps everyone but the target from campaigning.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from ..etcd.client import Etcd
from ..etcd.election import Election
from ..etcd.errors import EtcdError
from ..etcd.records import LeaderInfo, MemberRecord, SwitchoverRequest
from . import rules
from .collaborators import HealthView
from .watches import wait_request

log = structlog.get_logger("sidecar.core.node")  # its events are the node's

ReadState = Callable[[], Awaitable[tuple[LeaderInfo | None, SwitchoverRequest | None, int]]]


class HandOver(Exception):
    """The primary is to hand over to ``target`` (rule 6)."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"handing over to {target} ({reason})")
        self.target = target
        self.reason = reason


async def await_handover(etcd: Etcd, election: Election, me: str, revision: int, *,
                         read_state: ReadState,
                         members: Callable[[], tuple[MemberRecord, ...]],
                         members_read: Callable[[list[MemberRecord]], None],
                         health: HealthView, paused: Callable[[], bool]) -> None:
    """Raise HandOver for an eligible switchover request, or when this primary is unhealthy
    and a standby can take over; clear a request that cannot be served; otherwise serve on.

    ``members`` is the node's last read of the members/ records; they are read again
    (``members_read``) whenever a request names another node, so its eligibility is fresh."""
    unhealthy_logged = False
    while True:
        _, request, revision = await read_state()
        if request is not None and request.target != me:
            members_read(await election.read_members())
        decision = rules.handover(request, me, members(), health(), paused())
        if decision.action == rules.CLEAR:
            if decision.reason:
                log.warning("switchover_ignored", target=decision.target,
                            reason=decision.reason)
            await clear_request(election)
        elif decision.action == rules.HAND_OVER and decision.target is not None:
            raise HandOver(decision.target, decision.reason)
        elif decision.action == rules.ASK_AND_HAND_OVER and decision.target is not None:
            await election.request_switchover(
                SwitchoverRequest(decision.target, me, decision.reason))
            raise HandOver(decision.target, decision.reason)
        elif decision.action == rules.STUCK:
            if not unhealthy_logged:
                log.error("primary_unhealthy_keeps_role", reason=decision.reason)
                unhealthy_logged = True
        else:
            unhealthy_logged = False
        await wait_request(etcd, election, revision)


async def clear_request(election: Election) -> None:
    """Delete the switchover request (served, or not to be served)."""
    try:
        await election.clear_switchover()
    except EtcdError as exc:  # it expires with its short lease anyway
        log.info("switchover_not_cleared", error=str(exc))
