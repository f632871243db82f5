"""This node's members/ record: what it says (:func:`member_record`) and keeping it published
(:func:`publish_member`), on the node's lease, with what the others' records say read back.

Other nodes judge this one by it as a handover or failback target (sidecar.core.rules); the
etcd election code only stores and reads it (and leaves out garbage).
"""

from __future__ import annotations

import asyncio
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


def member_record(status: Status, address: str,
                  fields: Mapping[str, Callable[[], object]]) -> MemberRecord:
    """This node's record for ``status`` now, each field others judge it by read once."""
    extras = {name: read() for name, read in fields.items()}
    health = extras.pop("health", None)
    copy_current = extras.pop("copy_current", None)
    preferred_primary = extras.pop("preferred_primary", None)
    return MemberRecord(
        status.node_id, address, status.role.value, status.epoch, __version__,
        member_since(status.role_since),
        health=health if isinstance(health, str) else None,
        copy_current=copy_current if isinstance(copy_current, bool) else None,
        preferred_primary=preferred_primary if isinstance(preferred_primary, bool) else None,
        extras=extras)


async def publish_member(election: Election, lease: Lease, record: Callable[[], MemberRecord],
                         dirty: asyncio.Event,
                         members_read: Callable[[list[MemberRecord]], None]) -> None:
    """Keep members/<node> current (on our lease) and refresh what we know of the others.

    ``dirty`` set means publish again now (a field others judge us by has changed)."""
    published: MemberRecord | None = None
    while True:
        try:
            current = record()
            if dirty.is_set() or current != published:
                dirty.clear()
                await election.put_member(lease, current)
                published = current
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
