"""Campaign, reading the leader, step-down and resign: the election, with no I/O but etcd.
Its parts: keeping the lease alive (:mod:`sidecar.etcd.keepalive`) and the #15247 takeover
guard (:mod:`sidecar.etcd.takeover`), both reached through :class:`Election`.

Safety rules 1, 3 and 6 of DESIGN.md live here:

1. The leader key is only ever taken by ``create_revision(leader) == 0 -> put(leader, lease)``;
   its create revision is the epoch, a fencing token that grows with every new leader.
3. :class:`~sidecar.etcd.lease.Lease` keeps a deadline on the monotonic clock, renewed here by
   every keepalive that etcd answers (:mod:`sidecar.etcd.keepalive`; see
   :mod:`sidecar.etcd.lease` for why it is safe).
6. :meth:`Election.resign` revokes the lease, which deletes the leader key at once, so the
   successor that watches the key campaigns without waiting for a TTL.

On an etcd without the fix for etcd-io/etcd#15247 rule 3's premise fails: a stalled etcd leader
that resumes after a new one was elected still revokes the leases that expired in its stale
view, and the new leader applies the revoke, so a lease can end at any moment, long before
"keepalive sent + TTL". See :mod:`sidecar.etcd.versions` for how both sides bound that.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from etcd3 import etcdrpc

from ..settings import Settings
from .client import Etcd, kv_call, member_versions
from .errors import EtcdUnavailable, NoSpace, translate
from .keepalive import Keepalive
from .keys import Keys, epoch_guard, prefix_end
from .lease import Lease
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
from .takeover import TakeoverGuard
from .versions import (
    VERSION_RECHECK,
    affected_by_15247,
    takeover_wait,
    upgrade_target,
)

log = structlog.get_logger(__name__)


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
        self.garbage = GarbageLog()
        # etcd-io/etcd#15247: assumed until a member's version says otherwise (the safe side).
        self.etcd_affected = True
        self.etcd_versions: dict[str, str | None] = {}
        self._versions_checked: float | None = None
        self.takeover = TakeoverGuard(etcd, settings, self.keys)
        self.keepalive = Keepalive(etcd, settings, lambda: self.etcd_affected)

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

    @property
    def keepalive_latency(self) -> float:
        return self.keepalive.latency

    async def keepalive_once(self, lease: Lease) -> None:
        """One keepalive (see :mod:`sidecar.etcd.keepalive`)."""
        await self.keepalive.once(lease)

    async def keep_alive(self, lease: Lease) -> None:
        """Renew until the lease is lost; raises LeaseLost (see :mod:`sidecar.etcd.keepalive`)."""
        await self.keepalive.keep_alive(lease)

    async def guard_takeover(self, lease: Lease, leader: LeaderInfo) -> None:
        """The #15247 wait after winning ``leader`` (see :mod:`sidecar.etcd.takeover`)."""
        await self.takeover.guard(lease, leader, self.etcd_affected)

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
        self.takeover.seen(leader, request)
        return leader, request, response.header.revision

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
            self.takeover.campaigning = lease.id
            try:
                leader, revision = await self.read_leader()
            finally:
                self.takeover.campaigning = None
            won = leader is not None and leader.lease == lease.id
            if won and leader is not None:
                self.takeover.won(leader)
            return CampaignResult(won, leader, revision)
        found = response.responses[-1].response_range.kvs
        if not found:  # the key vanished between compare and get: impossible in one txn
            return CampaignResult(False, None, 0)
        info = self.leader_info(found[0])
        # A retry after an ambiguous failure finds the key our first attempt created.
        won = won or found[0].lease == lease.id
        if won:
            self.takeover.won(info)
        else:
            self.takeover.seen(info, None)
        return CampaignResult(won, info, response.header.revision)

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
