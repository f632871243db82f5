"""A leader key without a lease (no sidecar writes one: a hand-made key, a restored backup).

Such a key would never expire and would block every election. It counts as held (never two
primaries) for ``rules.UNOWNED_LEADER_TTLS`` TTLs after this node first saw it unchanged, and
is then deleted, guarded on its mod revision (:func:`rules.unowned_leader` decides when).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from ..etcd.client import Etcd
from ..etcd.election import Election
from ..etcd.errors import EtcdError
from ..etcd.records import LeaderInfo
from ..etcd.retry import ERROR_PAUSE
from . import rules
from .watches import follow

log = structlog.get_logger("sidecar.core.node")  # its events are the node's



class UnownedLeader:
    """One node's view of an unowned leader key: when it first saw it, at which revision."""

    def __init__(self, etcd: Etcd, election: Election, ttl: float) -> None:
        self.etcd = etcd
        self.election = election
        self.ttl = ttl
        self._seen: rules.Unowned | None = None

    async def handle(self, leader: LeaderInfo, revision: int,
                     hold: Callable[[str, LeaderInfo], None]) -> None:
        """Within the grace, ``hold`` (stay STANDBY of the key, for this reason) and follow
        the key for the time left; after it, delete the key. Returns when the node should look
        again."""
        grace = rules.unowned_grace(self.ttl)
        seen, left = rules.unowned_leader(self._seen, leader.revision, time.monotonic(),
                                          self.ttl)
        if seen != self._seen:
            log.error("leader_key_unowned", problem=leader.problem, revision=leader.revision,
                      decision=f"counted as held; removed after {grace} s unless it changes")
        self._seen = seen
        if left > 0:
            hold(f"the leader key is not a sidecar's ({leader.problem}): counted as held, "
                 f"removed {grace} s after it appeared unless it changes", leader)
            await follow(self.etcd, self.election, revision, left)
            return
        try:
            removed = await self.election.remove_unowned_leader(leader.revision)
        except EtcdError as exc:
            log.warning("leader_key_not_removed", error=str(exc))
            await asyncio.sleep(ERROR_PAUSE)
            return
        log.error("leader_key_removed", revision=leader.revision, removed=removed,
                  decision="campaign" if removed else "it changed: look again")
