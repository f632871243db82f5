"""Lease, campaign, keepalive, local deadline and resign: the election, with no I/O but etcd.

Safety rules 1, 3 and 6 of DESIGN.md live here:

1. The leader key is only ever taken by ``create_revision(leader) == 0 -> put(leader, lease)``;
   its create revision is the epoch, a fencing token that grows with every new leader.
3. :class:`Lease` keeps a deadline on the monotonic clock: the *send* time of the last keepalive
   that etcd answered plus the TTL it granted. etcd received that keepalive after we sent it, so
   it cannot expire the lease before the deadline; a node that acts on its deadline (minus a
   margin) never overlaps with a successor, whatever etcd or the network do.
6. :meth:`Election.resign` revokes the lease, which deletes the leader key at once, so the
   successor that watches the key campaigns without waiting for a TTL.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from etcd3 import etcdrpc

from .config import Settings
from .etcd import Etcd, EtcdError, EtcdUnavailable, kv_call

log = structlog.get_logger(__name__)

# After a failed keepalive, try again this soon (on another endpoint) rather than a whole
# interval later: an etcd leader election costs 1-2 s and the deadline does not wait.
KEEPALIVE_RETRY = 0.1


class LeaseLost(Exception):
    """The lease expired in etcd, or its local deadline passed without an answer."""


class Keys:
    """The etcd layout under ``/thinlinc-ha/<cluster>/`` (DESIGN.md)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.leader = f"{prefix}leader".encode()
        self.members = f"{prefix}members/".encode()
        self.sessions = f"{prefix}sessions/".encode()
        self.switchover = f"{prefix}switchover".encode()

    def member(self, node_id: str) -> bytes:
        return self.members + node_id.encode()


def epoch_guard(leader_key: bytes, epoch: int) -> Any:
    """The compare that guards every write of a primary (rule 2): the leader key is still the
    one created at ``epoch``. A deposed primary's transaction fails it and changes nothing."""
    return etcdrpc.Compare(key=leader_key, target=etcdrpc.Compare.CREATE,
                           result=etcdrpc.Compare.EQUAL, create_revision=epoch)


@dataclass(frozen=True)
class LeaderInfo:
    """The leader key as read from etcd. ``epoch`` is its create revision."""

    node_id: str
    address: str
    since: str
    epoch: int
    lease: int
    valid: bool = True  # False when the value is not ours to read (garbage written by someone)


def encode_leader(node_id: str, address: str) -> bytes:
    since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"node_id": node_id, "address": address, "since": since},
                      sort_keys=True).encode()


def decode_leader(value: bytes, epoch: int, lease: int) -> LeaderInfo:
    """Read a leader value; garbage still counts as a leader (the key exists) but is marked."""
    try:
        data = json.loads(value)
        node_id, address = data["node_id"], data.get("address", "")
        if not isinstance(node_id, str) or not node_id or not isinstance(address, str):
            raise ValueError("node_id and address must be strings")
        return LeaderInfo(node_id, address, str(data.get("since", "")), epoch, lease)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("leader_value_invalid", error=str(exc), value=value[:200].decode("latin-1"),
                    epoch=epoch)
        return LeaderInfo("", "", "", epoch, lease, valid=False)


# A switchover request lives this long (on a lease of its own): a target that is gone by then
# stops holding the others back from campaigning.
SWITCHOVER_TTL = 5


@dataclass(frozen=True)
class SwitchoverRequest:
    """``switchover`` in etcd: hand the leadership to ``target`` (rule 6, a planned move)."""

    target: str
    requested_by: str
    reason: str  # "operator" or "failback"

    def encode(self) -> bytes:
        since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps({"target": self.target, "requested_by": self.requested_by,
                           "reason": self.reason, "requested_at": since,
                           "ttl": SWITCHOVER_TTL}, sort_keys=True).encode()

    @staticmethod
    def decode(value: bytes) -> SwitchoverRequest | None:
        """The request, or None for garbage (logged): garbage never holds anyone back."""
        try:
            data = json.loads(value)
            fields = [data["target"], data.get("requested_by", ""), data.get("reason", "")]
            if not all(isinstance(f, str) for f in fields) or not fields[0]:
                raise ValueError("target, requested_by and reason must be strings")
            return SwitchoverRequest(*fields)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("switchover_value_invalid", error=str(exc),
                        value=value[:200].decode("latin-1"))
            return None


@dataclass
class Lease:
    """A granted lease and its local deadline (monotonic seconds)."""

    id: int
    ttl: int
    deadline: float
    margin: float
    renewed_at: float = field(default_factory=time.monotonic)

    def renew(self, sent_at: float, granted_ttl: int) -> None:
        # Only ever move forward: a late answer to an older keepalive must not shorten it.
        self.deadline = max(self.deadline, sent_at + granted_ttl)
        self.ttl = granted_ttl
        self.renewed_at = time.monotonic()

    def time_left(self, now: float | None = None) -> float:
        """Seconds before this node must have given up what the lease protects."""
        now = time.monotonic() if now is None else now
        return self.deadline - self.margin - now

    def expired(self, now: float | None = None) -> bool:
        return self.time_left(now) <= 0


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

    async def grant(self) -> Lease:
        sent = time.monotonic()
        lease = await self.etcd.call(lambda c: c.lease(self.settings.ttl), "grant lease")
        granted = Lease(lease.id, lease.ttl, sent + lease.ttl, self.settings.margin)
        log.info("lease_granted", lease=hex(lease.id), ttl=lease.ttl)
        return granted

    async def keepalive_once(self, lease: Lease) -> None:
        sent = time.monotonic()
        responses = await self.etcd.call(lambda c: list(c.refresh_lease(lease.id)), "keepalive")
        self.keepalive_latency = time.monotonic() - sent
        ttl = responses[0].TTL if responses else 0
        if ttl <= 0:
            raise LeaseLost(f"etcd says lease {lease.id:x} is gone")
        lease.renew(sent, ttl)

    async def keep_alive(self, lease: Lease) -> None:
        """Renew until the lease is lost; raises :class:`LeaseLost` (never returns)."""
        interval = self.settings.keepalive_interval
        while True:
            try:
                await self.keepalive_once(lease)
                wait = interval
            except EtcdError as exc:
                if lease.expired():
                    raise LeaseLost(f"local deadline passed: {exc}") from exc
                log.warning("keepalive_failed", error=str(exc),
                            time_left=round(lease.time_left(), 2))
                wait = KEEPALIVE_RETRY
            if lease.expired():
                raise LeaseLost("local deadline passed")
            await asyncio.sleep(min(wait, max(lease.time_left(), 0.01)))

    async def read_leader(self) -> tuple[LeaderInfo | None, int]:
        """A linearizable read of the leader key and the revision it reflects."""
        leader, _, revision = await self.read_leader_and_request()
        return leader, revision

    async def read_leader_and_request(
            self) -> tuple[LeaderInfo | None, SwitchoverRequest | None, int]:
        """The leader key and any switchover request, read together at one revision."""

        def read(client: Any) -> tuple[LeaderInfo | None, SwitchoverRequest | None, int]:
            get = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
                   for key in (self.keys.leader, self.keys.switchover)]
            response = kv_call(client, "Txn", etcdrpc.TxnRequest(success=get))
            leader_kvs = response.responses[0].response_range.kvs
            request_kvs = response.responses[1].response_range.kvs
            leader = (decode_leader(leader_kvs[0].value, leader_kvs[0].create_revision,
                                    leader_kvs[0].lease) if leader_kvs else None)
            request = SwitchoverRequest.decode(request_kvs[0].value) if request_kvs else None
            return leader, request, response.header.revision

        return await self.etcd.call(read, "read leader")

    async def request_switchover(self, request: SwitchoverRequest) -> None:
        """Publish a switchover request on a short lease of its own."""

        def put(client: Any) -> None:
            lease = client.lease(SWITCHOVER_TTL)
            client.put(self.keys.switchover, request.encode(), lease=lease.id)

        await self.etcd.call(put, "request switchover")

    async def clear_switchover(self) -> None:
        await self.etcd.call(lambda c: c.delete(self.keys.switchover), "clear switchover")

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

        def txn(client: Any) -> CampaignResult:
            t = client.transactions
            won, responses = client.transaction(
                compare=[t.create(key) == 0],
                success=[t.put(key, value, lease=lease.id), t.get(key)],
                failure=[t.get(key)])
            found = responses[-1]
            if not found:  # the key vanished between compare and get: impossible in one txn
                return CampaignResult(False, None, 0)
            raw, meta = found[0]
            info = decode_leader(raw, meta.create_revision, meta.lease_id)
            # A retry after an ambiguous failure finds the key our first attempt created.
            won = won or meta.lease_id == lease.id
            return CampaignResult(won, info, meta.response_header.revision)

        try:
            return await self.etcd.call(txn, "campaign")
        except EtcdUnavailable:
            # The outcome is unknown: the put may have been applied after we stopped waiting.
            # The key tells: ours carries our lease.
            leader, revision = await self.read_leader()
            won = leader is not None and leader.lease == lease.id
            return CampaignResult(won, leader, revision)

    async def put_member(self, lease: Lease, record: dict[str, Any]) -> None:
        value = json.dumps(record, sort_keys=True).encode()
        key = self.keys.member(self.settings.node_id)
        await self.etcd.call(lambda c: c.put(key, value, lease=lease.id), "put member")

    async def read_members(self) -> list[dict[str, Any]]:
        def read(client: Any) -> list[dict[str, Any]]:
            return [_member(raw) for raw, _ in client.get_prefix(self.keys.members)]

        return [m for m in await self.etcd.call(read, "read members") if m]

    async def resign(self, lease: Lease) -> None:
        """Revoke the lease: the leader key (if ours) and our member key go at once (rule 6)."""
        await self.etcd.call(lambda c: c.revoke_lease(lease.id), "revoke lease")
        log.info("lease_revoked", lease=hex(lease.id))


def _member(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and isinstance(data.get("node_id"), str):
            return data
        raise ValueError("not a member record")
    except ValueError as exc:
        log.warning("member_value_invalid", error=str(exc), value=raw[:200].decode("latin-1"))
        return {}
