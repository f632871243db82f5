"""The takeover guard for an etcd with etcd-io/etcd#15247 (rule (b) of
:mod:`sidecar.etcd.versions`): a node that won the leader key after the last leader lost it
involuntarily waits until that leader has certainly learned its lease ended, before it serves.

A planned move pays nothing: a switchover request named the winner, or the last leader's key was
deleted in a revision of its own while its member record (on the same lease) lived on. Only the
holder deletes its key and keeps its lease (handover, step-down, resign), or `vsm-sidecar
release` for a holder whose death the data_dir lock proved; a lease that ends, early or not,
takes both keys in one revision. The election tells the guard what it reads and wins
(:meth:`TakeoverGuard.seen`, :meth:`TakeoverGuard.won`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from etcd3 import etcdrpc

from ..settings import Settings
from .client import Etcd, kv_call, retrieve_outcome
from .errors import EtcdError, EtcdUnavailable
from .keys import Keys
from .lease import Lease, LeaseLost
from .records import LeaderInfo, SwitchoverRequest
from .versions import takeover_wait
from .watch import Event, EventType

log = structlog.get_logger("sidecar.etcd.election")  # its events are the election's


class TakeoverGuard:
    """What one node saw of the leader key, and the wait its next takeover owes."""

    def __init__(self, etcd: Etcd, settings: Settings, keys: Keys) -> None:
        self.etcd = etcd
        self.settings = settings
        self.keys = keys
        self._last_leader: LeaderInfo | None = None  # the last leader key seen
        self._handover_to_me = False  # a switchover request naming us, seen with no leader
        # The last campaign won: its epoch, when, and the leader key seen before it.
        self._won: tuple[int, float, LeaderInfo | None] | None = None
        self.campaigning: int | None = None  # the lease of a campaign under way

    def seen(self, leader: LeaderInfo | None, request: SwitchoverRequest | None) -> None:
        """Remember what a takeover will be judged by: the last leader key (not the one a
        campaign of ours is creating), and whether a switchover request named us while no key
        existed."""
        if leader is not None:
            if leader.lease != self.campaigning:
                self._last_leader = leader
            self._handover_to_me = False
        else:
            self._handover_to_me = request is not None and \
                request.target == self.settings.node_id

    def won(self, ours: LeaderInfo) -> None:
        """A campaign of ours created ``ours``: the takeover is judged by the key before it."""
        self._won = (ours.epoch, time.monotonic(), self._last_leader)
        self._last_leader = ours

    async def guard(self, lease: Lease, leader: LeaderInfo, affected: bool) -> None:
        """After winning ``leader`` (our new key), wait on an ``affected`` etcd until a deposed
        primary has certainly learned that its lease ended. Returns at once on a fixed etcd,
        for our own key resumed after a fence, and after a planned move."""
        won, self._won = self._won, None
        if won is None or won[0] != leader.epoch or not affected:
            return
        why = await self._involuntary(won[2])
        if why is None:
            return
        wait = won[1] + takeover_wait(self.settings) - time.monotonic()
        log.info("takeover_delayed", seconds=round(max(wait, 0.0), 3), why=why,
                 issue="etcd-io/etcd#15247",
                 note="the deposed primary may still believe its lease; it learns within this")
        if wait > 0:
            await asyncio.sleep(wait)
        if lease.expired():
            raise LeaseLost("the local deadline passed while waiting to take over")

    async def _involuntary(self, before: LeaderInfo | None) -> str | None:
        """Why the last leader's key may have gone without its holder knowing, or None for a
        planned move (see the module's text)."""
        if self._handover_to_me:
            return None
        if before is None:
            return "no earlier leader seen: one may still believe it holds the role"
        if before.node_id == self.settings.node_id or before.lease == 0 or not before.valid:
            # Our own key (we know we gave it up; an earlier process of ours is gone), or no
            # sidecar's (removed as unowned): nobody else can believe it holds the role.
            return None
        try:
            if await self._deleted_alone(before):
                return None
        except EtcdError as exc:
            return f"how {before.node_id}'s key went could not be read: {exc}"
        return f"{before.node_id}'s key went with its lease (expiry or revoke)"

    async def _deleted_alone(self, before: LeaderInfo) -> bool:
        """Whether the leader key ``before`` was deleted while the same holder's member record
        still existed (read from history: the deletion's revision, then the record at it)."""
        first = asyncio.ensure_future(
            self._first_event(self.keys.leader, (before.revision or before.epoch) + 1))
        first.add_done_callback(retrieve_outcome)
        done, _ = await asyncio.wait({first}, timeout=self.etcd.timeout * 2)
        if not done:
            first.cancel()
            raise EtcdUnavailable("the leader key's history did not arrive in time")
        event = first.result()
        if event.type is not EventType.DELETE:
            return False
        member = self.keys.member(before.node_id)

        def read(client: Any) -> Any:
            return kv_call(client, "Range", etcdrpc.RangeRequest(
                key=member, revision=event.mod_revision))

        kvs = (await self.etcd.call(read, "read member at the deletion")).kvs
        return bool(kvs) and kvs[0].lease == before.lease

    async def _first_event(self, key: bytes, start_revision: int) -> Event:
        async with self.etcd.watch(key, start_revision=start_revision) as watch:
            async for batch in watch:
                if batch.events:
                    return batch.events[0]
        raise EtcdUnavailable("the watch ended before the first event")
