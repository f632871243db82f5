"""This node's members/ record: what it says (:func:`member_record`) and keeping it published
(:func:`publish_member`), on the node's lease, with what the others' records say read back.

Other nodes judge this one by it as a handover or failback target (sidecar.core.rules); the
etcd election code only stores and reads it (and leaves out garbage).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping

import structlog

from .. import __version__
from ..etcd.election import Election
from ..etcd.errors import EtcdError
from ..etcd.lease import Lease
from ..etcd.records import MemberRecord, member_since
from .roles import Status

log = structlog.get_logger("sidecar.core.node")  # its events are the node's

MEMBERS_REFRESH_SECONDS = 1.0
# A change of the applied revision alone is published at most this often (Patroni's loop_wait):
# every node's copy follows the whole cluster prefix, member records included, so publishing
# each change at once would have two nodes answer each other's puts for ever.
APPLIED_REVISION_REFRESH_SECONDS = 10.0


def member_record(status: Status, address: str,
                  fields: Mapping[str, Callable[[], object]]) -> MemberRecord:
    """This node's record for ``status`` now, each field others judge it by read once."""
    extras = {name: read() for name, read in fields.items()}
    health = extras.pop("health", None)
    copy_current = extras.pop("copy_current", None)
    preferred_primary = extras.pop("preferred_primary", None)
    applied = extras.pop("applied_revision", None)
    ip_held = extras.pop("resource_ip_held", None)
    return MemberRecord(
        status.node_id, address, status.role.value, status.epoch, __version__,
        member_since(status.role_since),
        health=health if isinstance(health, str) else None,
        copy_current=copy_current if isinstance(copy_current, bool) else None,
        preferred_primary=preferred_primary if isinstance(preferred_primary, bool) else None,
        applied_revision=applied if type(applied) is int else None,
        resource_ip_held=ip_held if isinstance(ip_held, bool) else None,
        extras=extras)


def _due(current: MemberRecord, published: MemberRecord | None, published_at: float,
         now: float) -> bool:
    """Whether ``current`` must be put: a field others judge us by changed, or only the
    applied revision did and the last put is APPLIED_REVISION_REFRESH_SECONDS old."""
    if published is None:
        return True
    if dataclasses.replace(current, applied_revision=published.applied_revision) != published:
        return True
    return current.applied_revision != published.applied_revision and \
        now - published_at >= APPLIED_REVISION_REFRESH_SECONDS


async def publish_member(election: Election, lease: Lease, record: Callable[[], MemberRecord],
                         dirty: asyncio.Event,
                         members_read: Callable[[list[MemberRecord]], None]) -> None:
    """Keep members/<node> current (on our lease) and refresh what we know of the others.

    ``dirty`` set means publish again now (a field others judge us by has changed)."""
    published: MemberRecord | None = None
    published_at = 0.0
    while True:
        try:
            current = record()
            if dirty.is_set() or _due(current, published, published_at, time.monotonic()):
                dirty.clear()
                await election.put_member(lease, current)
                published, published_at = current, time.monotonic()
            members = await election.read_members()
            members_read(members)
            if published is not None and published not in members:
                # Our record was overwritten or deleted by someone (or went with a lease
                # that just expired): put it back, or the others stop counting us as a
                # member (no switchover, no failback to us). Garbage is logged as such.
                log.info("member_record_restored", decision="publish it again")
                dirty.set()
        except EtcdError as exc:
            log.debug("member_update_failed", error=str(exc))
            dirty.set()
        try:
            async with asyncio.timeout(MEMBERS_REFRESH_SECONDS):
                await dirty.wait()
        except TimeoutError:
            pass
        if dirty.is_set():
            await asyncio.sleep(0.01)  # coalesce a burst of changes into one put
