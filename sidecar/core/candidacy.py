"""Whether a node may campaign now (:func:`rules.held_back` decides): it holds back for a live
switchover request naming another member, while the cluster is paused, and while its own VSM
server is not known healthy. Only the membership of the request's target needs etcd, read
again when the node's last read of the members/ records does not know it.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from ..etcd.election import Election
from ..etcd.errors import EtcdError
from ..etcd.records import MemberRecord, SwitchoverRequest
from . import rules
from .collaborators import HealthView

log = structlog.get_logger("sidecar.core.node")  # its events are the node's


async def held_back(election: Election, me: str, request: SwitchoverRequest | None, *,
                    members: Callable[[], tuple[MemberRecord, ...]],
                    members_read: Callable[[list[MemberRecord]], None],
                    health_configured: bool, health: HealthView,
                    paused: Callable[[], bool]) -> str | None:
    """Why this node must not campaign now, or None (health and pause read last)."""
    target = rules.waits_for(request, me)
    known = target is not None and await _is_member(election, target, members, members_read)
    if target is not None and not known:
        log.warning("switchover_target_unknown", target=target,
                    decision="not held back: it is no member")
    return rules.held_back(request, me, known, health_configured, health(), paused())


async def _is_member(election: Election, node_id: str,
                     members: Callable[[], tuple[MemberRecord, ...]],
                     members_read: Callable[[list[MemberRecord]], None]) -> bool:
    """Whether ``node_id`` has a members/ record, read again if we do not know it yet."""
    if rules.member(members(), node_id) is not None:
        return True
    try:
        fresh = await election.read_members()
    except EtcdError as exc:
        log.info("members_not_read", error=str(exc))
        return True  # cannot tell: wait, as for a member
    members_read(fresh)
    return rules.member(fresh, node_id) is not None
