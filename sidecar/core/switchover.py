"""Planned moves of the leadership (rule 6): asking for one and waiting until it is made
(who may take it over is decided in :mod:`sidecar.core.rules`). The node's room, not etcd's:
it asks the rules, and the etcd room never imports the node's.

A move is asked for by writing a :class:`~sidecar.etcd.records.SwitchoverRequest` to etcd: by an
operator (``Switchover`` over gRPC or ``vsm-sidecar switchover``), by the preferred primary when
it wants the role back (failback), or by an unhealthy primary. The primary hands over when the
target is eligible; every other node holds back from campaigning while a live request names
someone else, so the target wins without anyone waiting for a TTL.
"""

from __future__ import annotations

import asyncio

from ..etcd.client import Etcd
from ..etcd.election import Election
from ..etcd.records import SWITCHOVER_TTL, SwitchoverRequest, decode_leader, decode_member
from ..etcd.watch import Event, EventType
from .rules import OPERATOR, SwitchoverRefused, choose_target


class SwitchoverFailed(Exception):
    """The request was made but the target did not take over in time."""


async def request_move(election: Election, etcd: Etcd, requester: str,
                       target: str | None) -> tuple[str, int]:
    """Ask for a move to ``target`` (or any eligible standby) and wait until it holds the
    leader key; return the new primary and its epoch."""
    leader, _, revision = await election.read_leader_and_request()
    if leader is None:
        raise SwitchoverRefused("there is no primary to move from")
    if not leader.valid:
        raise SwitchoverRefused(f"the leader key holds no leader record ({leader.problem}); "
                                "there is no primary to move from")
    if target == leader.node_id:
        return leader.node_id, leader.epoch  # already there: nothing to move
    chosen = choose_target(await election.read_members(), leader.node_id, target)
    # Done when the target serves: it holds the leader key and its members/ record says
    # PRIMARY under that key's epoch. One watch over the cluster prefix sees both in order.
    prefix = election.keys.prefix.encode()
    member_key = election.keys.member(chosen)
    async with etcd.watch(prefix, prefix=True, start_revision=revision + 1) as watch:
        await election.request_switchover(SwitchoverRequest(chosen, requester, OPERATOR))
        epoch = 0
        try:
            async with asyncio.timeout(SWITCHOVER_TTL + 1):
                async for batch in watch:
                    for event in batch.events:
                        if event.type is not EventType.PUT:
                            continue
                        if event.key == election.keys.leader:
                            new = decode_leader(event.value, event.create_revision, 0,
                                                event.mod_revision)
                            epoch = new.epoch if new.node_id == chosen else 0
                        elif event.key == member_key and epoch and _serving(event, epoch):
                            return chosen, epoch
        except TimeoutError:
            pass
    raise SwitchoverFailed(f"{chosen} did not take over within {SWITCHOVER_TTL + 1} s")


def _serving(event: Event, epoch: int) -> bool:
    """Whether a put of the chosen node's member record says it serves as PRIMARY at
    ``epoch`` (a record that does not decode says nothing)."""
    try:
        member = decode_member(event.key.rpartition(b"/")[2], event.value, event.lease)
    except ValueError:
        return False
    return member.role == "ROLE_PRIMARY" and member.epoch == epoch
