"""Campaign, keepalive, the #15247 guard, reading the leader, step-down and resign: the
election, with no I/O but etcd.

Safety rules 1, 3 and 6 of DESIGN.md live here:

1. The leader key is only ever taken by ``create_revision(leader) == 0 -> put(leader, lease)``;
   its create revision is the epoch, a fencing token that grows with every new leader.
3. :class:`~sidecar.etcd.lease.Lease` keeps a deadline on the monotonic clock, renewed here by
   every keepalive that etcd answers (see :mod:`sidecar.etcd.lease` for why it is safe).
6. :meth:`Election.resign` revokes the lease, which deletes the leader key at once, so the
   successor that watches the key campaigns without waiting for a TTL.

On an etcd without the fix for etcd-io/etcd#15247 rule 3's premise fails: a stalled etcd leader
that resumes after a new one was elected still revokes the leases that expired in its stale
view, and the new leader applies the revoke, so a lease can end at any moment, long before
"keepalive sent + TTL". See :mod:`sidecar.etcd.versions` for how both sides bound that.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from etcd3 import etcdrpc

from ..settings import Settings
from .client import Etcd, kv_call, lease_ttl_elsewhere, member_versions
from .errors import EtcdError, EtcdUnavailable, NoSpace, translate
from .keys import Keys, epoch_guard, prefix_end
from .lease import Lease, LeaseLost
from .records import (
    SWITCHOVER_TTL,
    GarbageLog,
    LeaderInfo,
    MemberRecord,
    SwitchoverRequest,
    decode_leader,
    decode_member,
    encode_leader,
    garbage_leader,
)
from .retry import any_etcd_error, retry_policy
from .versions import (
    SLOW_KEEPALIVE,
    VERSION_RECHECK,
    affected_by_15247,
    takeover_wait,
    upgrade_target,
)
from .watch import Event, EventType

log = structlog.get_logger(__name__)

# After a failed keepalive, try again this soon (on another endpoint) rather than a whole
# interval later: an etcd leader election costs 1-2 s and the deadline does not wait.
KEEPALIVE_RETRY = 0.1


@dataclass(frozen=True)
class CampaignResult:
    won: bool
    leader: LeaderInfo | None
    revision: int


class Election:
    """The etcd side of one node's candidacy."""

    def __init__(self, etcd: Etcd, settings: Settings) -> None:
        self.etcd = etcd
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.keepalive_latency = 0.0
        self.garbage = GarbageLog()
        # etcd-io/etcd#15247: assumed until a member's version says otherwise (the safe side).
        self.etcd_affected = True
        self.etcd_versions: dict[str, str | None] = {}
        self._versions_checked: float | None = None
        self._last_leader: LeaderInfo | None = None  # the last leader key seen
        self._handover_to_me = False  # a switchover request naming us, seen with no leader
        # The last campaign won: its epoch, when, and the leader key seen before it.
        self._won: tuple[int, float, LeaderInfo | None] | None = None
        self._campaigning: int | None = None  # the lease of a campaign under way

    async def grant(self) -> Lease:
        sent = time.monotonic()
        lease = await self.etcd.call(lambda c: c.lease(self.settings.ttl), "grant lease")
        granted = Lease(lease.id, lease.ttl, sent + lease.ttl, self.settings.margin)
        log.info("lease_granted", lease=hex(lease.id), ttl=lease.ttl)
        checked = self._versions_checked
        if checked is None or time.monotonic() - checked >= VERSION_RECHECK:
            await self.check_etcd_version()
        return granted

    async def check_etcd_version(self) -> None:
        """Ask every member its version; the #15247 guard is on if any answering member lacks
        the fix (a mixed cluster is as weak as its weakest leader), and stays as it was if
        none answers. Logs a warning naming the release to upgrade to."""
        timeout = min(self.etcd.timeout, 1.0)
        versions = await self.etcd.call(lambda c: member_versions(c, timeout),
                                        "etcd version")
        self._versions_checked = time.monotonic()
        known = {member: v for member, v in versions.items() if v is not None}
        if not known:
            return
        affected = sorted({v for v in known.values() if affected_by_15247(v)})
        changed = versions != self.etcd_versions or self.etcd_affected != bool(affected)
        self.etcd_versions, self.etcd_affected = versions, bool(affected)
        if not changed:
            return
        if affected:
            log.warning("etcd_lacks_lease_fix", versions=affected, issue="etcd-io/etcd#15247",
                        upgrade_to=", ".join(sorted({upgrade_target(v) for v in affected})),
                        guard=f"a takeover after a lost leader waits "
                              f"{takeover_wait(self.settings):.2f} s; slow keepalives are "
                              "checked through another member")
        else:
            log.info("etcd_version", versions=sorted(set(known.values())),
                     issue="etcd-io/etcd#15247 fixed: no takeover wait")

    async def keepalive_once(self, lease: Lease) -> None:
        """One keepalive; renews the local deadline (rule 3) or raises LeaseLost/EtcdError."""
        if self.etcd_affected:
            await self.guarded_keepalive(lease)
            return
        sent = time.monotonic()
        lease.renew(sent, await self._refresh(lease))

    async def _refresh(self, lease: Lease) -> int:
        """One keepalive; the TTL etcd granted. Raises LeaseLost when etcd says it is gone."""
        sent = time.monotonic()
        responses = await self.etcd.call(lambda c: list(c.refresh_lease(lease.id)), "keepalive")
        self.keepalive_latency = time.monotonic() - sent
        ttl = responses[0].TTL if responses else 0
        if ttl <= 0:
            raise LeaseLost(f"etcd says lease {lease.id:x} is gone")
        return int(ttl)

    async def guarded_keepalive(self, lease: Lease) -> None:
        """A keepalive on an etcd with #15247 (rule (a) above): a prompt answer renews as
        usual; a failed or slow one has the lease checked through another member, whose
        answer alone renews the deadline. Raises LeaseLost when that check finds it gone."""
        sent = time.monotonic()
        refresh = asyncio.ensure_future(self._refresh(lease))
        refresh.add_done_callback(_consume)  # it may be abandoned below
        try:
            done, _ = await asyncio.wait({refresh}, timeout=self.settings.keepalive_interval
                                         * SLOW_KEEPALIVE)
            if not done:
                await self.confirm_elsewhere(lease)
                await refresh  # renews the lease in etcd when it arrives; not trusted here
                return
        finally:
            if not refresh.done():
                refresh.cancel()
        try:
            ttl = refresh.result()
        except EtcdError:
            await self.confirm_elsewhere(lease)
            raise
        lease.renew(sent, ttl)

    async def confirm_elsewhere(self, lease: Lease) -> None:
        """Ask etcd's leader, through a member other than the one in use, whether the lease
        lives; renew the deadline from its remaining TTL, or raise LeaseLost."""
        sent = time.monotonic()
        ttl, member = await self.etcd.call(
            lambda c: lease_ttl_elsewhere(c, lease.id, self.etcd.timeout), "lease check")
        if ttl <= 0:
            log.warning("lease_ended_elsewhere", lease=hex(lease.id), member=member,
                        decision="give up the role now")
            raise LeaseLost(f"lease {lease.id:x} ended in etcd (asked through {member})")
        lease.confirm(sent, ttl)

    async def guard_takeover(self, lease: Lease, leader: LeaderInfo) -> None:
        """Rule (b) above: after winning ``leader`` (our new key), wait on an affected etcd
        until a deposed primary has certainly learned that its lease ended. Returns at once
        on a fixed etcd, for our own key resumed after a fence, and after a planned move."""
        won, self._won = self._won, None
        if won is None or won[0] != leader.epoch or not self.etcd_affected:
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
        planned move: a switchover request named us, or the key was deleted in a revision of
        its own while its holder's member record (on the same lease) lived on. Only the
        holder deletes its key and keeps its lease (handover, step-down, resign), or
        `vsm-sidecar release` for a holder whose death the data_dir lock proved; a lease that
        ends, early or not, takes both keys in one revision."""
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
        first.add_done_callback(_consume)
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

    async def keep_alive(self, lease: Lease) -> None:
        """Renew until the lease is lost; raises :class:`LeaseLost` (never returns).

        A failed renewal is retried by the retry policy every KEEPALIVE_RETRY, under an
        ``asyncio.timeout`` at the lease's local deadline (rule 3): a renewal still in flight
        then is abandoned, and the lease counts as lost."""
        interval = self.settings.keepalive_interval
        failure: list[BaseException] = []  # the last error of the renewal being retried

        def failed(exc: BaseException) -> None:
            failure[:] = [exc]
            log.warning("keepalive_failed", error=str(exc), time_left=round(lease.time_left(), 2))

        while True:
            failure.clear()
            try:
                async with asyncio.timeout(max(lease.time_left(), 0.0)):
                    async for attempt in retry_policy(
                            "keepalive", first_wait=KEEPALIVE_RETRY, max_wait=KEEPALIVE_RETRY,
                            jitter=0.0, retry_if=any_etcd_error, on_retry=failed):
                        with attempt:
                            await self.keepalive_once(lease)
            except TimeoutError as exc:
                why = f": {failure[0]}" if failure else ""
                raise LeaseLost(f"local deadline passed{why}") from exc
            if lease.expired():
                raise LeaseLost("local deadline passed")
            await asyncio.sleep(min(interval, max(lease.time_left(), 0.01)))

    async def read_leader(self) -> tuple[LeaderInfo | None, int]:
        """A linearizable read of the leader key and the revision it reflects."""
        leader, _, revision = await self.read_leader_and_request()
        return leader, revision

    async def read_leader_and_request(
            self) -> tuple[LeaderInfo | None, SwitchoverRequest | None, int]:
        """The leader key and any switchover request, read together at one revision."""

        keys = (self.keys.leader, self.keys.switchover)

        def read(client: Any) -> Any:
            get = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
                   for key in keys]
            try:
                return kv_call(client, "Txn", etcdrpc.TxnRequest(success=get))
            except grpc.RpcError as exc:
                if not isinstance(translate(exc, "read leader"), NoSpace):
                    raise
            return read_ranges_at_one_revision(client, keys)

        # Decoded here, on the event loop, where the garbage log lives (not in an etcd thread).
        response = await self.etcd.call(read, "read leader")
        leader_kvs = response.responses[0].response_range.kvs
        request_kvs = response.responses[1].response_range.kvs
        leader = self.leader_info(leader_kvs[0]) if leader_kvs else None
        request = self.switchover_request(request_kvs[0]) if request_kvs else None
        self._seen(leader, request)
        return leader, request, response.header.revision

    def _seen(self, leader: LeaderInfo | None, request: SwitchoverRequest | None) -> None:
        """Remember what a takeover will be judged by (guard_takeover): the last leader key
        (not the one a campaign of ours is creating), and whether a switchover request named
        us while no key existed."""
        if leader is not None:
            if leader.lease != self._campaigning:
                self._last_leader = leader
            self._handover_to_me = False
        else:
            self._handover_to_me = request is not None and \
                request.target == self.settings.node_id

    def leader_info(self, kv: Any) -> LeaderInfo:
        """The leader key from a KeyValue of a read (which, unlike a watch event, carries the
        lease); garbage is reported. So is a key without a lease: no sidecar writes one (each
        puts the key under its own lease), and it would never expire."""
        info = decode_leader(kv.value, kv.create_revision, kv.lease, kv.mod_revision)
        if info.valid and kv.lease == 0:
            info = garbage_leader(kv.create_revision, 0, kv.mod_revision,
                                  "no lease: not written by a sidecar, and it would never "
                                  "expire")
        if not info.valid:
            self.garbage.report("leader", self.keys.leader, kv.mod_revision, info.problem,
                                kv.value)
        return info

    def switchover_request(self, kv: Any) -> SwitchoverRequest | None:
        """The request in a KeyValue of a read, or None for garbage (reported): garbage never
        causes a move and never holds anyone back."""
        if self.garbage.known(self.keys.switchover, kv.mod_revision):
            return None
        try:
            return SwitchoverRequest.decode(kv.value, kv.lease)
        except ValueError as exc:
            self.garbage.report("switchover", self.keys.switchover, kv.mod_revision, str(exc),
                                kv.value)
            return None

    async def request_switchover(self, request: SwitchoverRequest) -> None:
        """Publish a switchover request on a short lease of its own."""

        def put(client: Any) -> None:
            lease = client.lease(SWITCHOVER_TTL)
            client.put(self.keys.switchover, request.encode(), lease=lease.id)

        await self.etcd.call(put, "request switchover")

    async def clear_switchover(self) -> None:
        await self.etcd.call(lambda c: c.delete(self.keys.switchover), "clear switchover")

    async def remove_unowned_leader(self, revision: int) -> bool:
        """Delete a leader key that has no lease, if it is still the value seen at ``revision``
        (its mod revision): a newer value, or a real leader's key, is never touched."""

        def txn(client: Any) -> bool:
            delete = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
                key=self.keys.leader))
            same = etcdrpc.Compare(key=self.keys.leader, target=etcdrpc.Compare.MOD,
                                   result=etcdrpc.Compare.EQUAL, mod_revision=revision)
            request = etcdrpc.TxnRequest(compare=[same], success=[delete])
            return bool(kv_call(client, "Txn", request).succeeded)

        return await self.etcd.call(txn, "remove unowned leader key")

    async def step_down(self, epoch: int) -> bool:
        """Delete the leader key if it is still the one we created (rule 6 handover)."""

        def txn(client: Any) -> bool:
            delete = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
                key=self.keys.leader))
            request = etcdrpc.TxnRequest(compare=[epoch_guard(self.keys.leader, epoch)],
                                         success=[delete])
            return bool(kv_call(client, "Txn", request).succeeded)

        return await self.etcd.call(txn, "step down")

    async def campaign(self, lease: Lease) -> CampaignResult:
        """Take the leader key if nobody holds it (rule 1)."""
        value = encode_leader(self.settings.node_id, self.settings.published_address)
        key = self.keys.leader

        def txn(client: Any) -> tuple[bool, Any]:
            get = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
            put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value,
                                                                   lease=lease.id))
            absent = etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE,
                                     result=etcdrpc.Compare.EQUAL, create_revision=0)
            response = kv_call(client, "Txn", etcdrpc.TxnRequest(
                compare=[absent], success=[put, get], failure=[get]))
            return response.succeeded, response

        try:
            won, response = await self.etcd.call(txn, "campaign")
        except EtcdUnavailable:
            # The outcome is unknown: the put may have been applied after we stopped waiting.
            # The key tells: ours carries our lease.
            self._campaigning = lease.id
            try:
                leader, revision = await self.read_leader()
            finally:
                self._campaigning = None
            won = leader is not None and leader.lease == lease.id
            if won and leader is not None:
                self._note_won(leader)
            return CampaignResult(won, leader, revision)
        found = response.responses[-1].response_range.kvs
        if not found:  # the key vanished between compare and get: impossible in one txn
            return CampaignResult(False, None, 0)
        info = self.leader_info(found[0])
        # A retry after an ambiguous failure finds the key our first attempt created.
        won = won or found[0].lease == lease.id
        if won:
            self._note_won(info)
        else:
            self._seen(info, None)
        return CampaignResult(won, info, response.header.revision)

    def _note_won(self, ours: LeaderInfo) -> None:
        self._won = (ours.epoch, time.monotonic(), self._last_leader)
        self._last_leader = ours

    async def put_member(self, lease: Lease, record: MemberRecord) -> None:
        value = json.dumps(record.encode(), sort_keys=True).encode()
        key = self.keys.member(self.settings.node_id)
        await self.etcd.call(lambda c: c.put(key, value, lease=lease.id), "put member")

    async def read_members(self) -> list[MemberRecord]:
        """The members' records; garbage under members/ is reported and left out."""
        start = self.keys.members

        def read(client: Any) -> Any:
            return kv_call(client, "Range", etcdrpc.RangeRequest(key=start,
                                                                 range_end=prefix_end(start)))

        members: list[MemberRecord] = []
        for kv in (await self.etcd.call(read, "read members")).kvs:
            if self.garbage.known(kv.key, kv.mod_revision):
                continue
            try:
                members.append(decode_member(kv.key[len(start):], kv.value, kv.lease))
            except ValueError as exc:
                self.garbage.report("member", kv.key, kv.mod_revision, str(exc), kv.value)
        return members

    async def resign(self, lease: Lease) -> None:
        """Delete the leader key if it is on our lease, then revoke the lease, which takes our
        member key (rule 6). The key goes in a revision of its own, before the member record:
        that tells a successor this was a planned move, not a lost lease (guard_takeover)."""
        key = self.keys.leader

        def resign(client: Any) -> None:
            ours = etcdrpc.Compare(key=key, target=etcdrpc.Compare.LEASE,
                                   result=etcdrpc.Compare.EQUAL, lease=lease.id)
            delete = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))
            kv_call(client, "Txn", etcdrpc.TxnRequest(compare=[ours], success=[delete]))
            client.revoke_lease(lease.id)

        await self.etcd.call(resign, "revoke lease")
        log.info("lease_revoked", lease=hex(lease.id))


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def read_ranges_at_one_revision(client: Any, keys: tuple[bytes, ...]) -> Any:
    """What a read-only transaction of one range per key answers, read as ranges pinned to the
    first one's revision. etcd 3.5.1 refuses even a read-only transaction while its NOSPACE
    alarm is raised (measured: tests/etcd/test_etcd_care.py), and the leadership loop reads
    the leader key this way: without this, a full etcd fenced a primary that still held its
    lease."""
    first = kv_call(client, "Range", etcdrpc.RangeRequest(key=keys[0]))
    ranges = [first] + [kv_call(client, "Range", etcdrpc.RangeRequest(
        key=key, revision=first.header.revision)) for key in keys[1:]]
    return etcdrpc.TxnResponse(header=first.header, succeeded=True, responses=[
        etcdrpc.ResponseOp(response_range=answer) for answer in ranges])
