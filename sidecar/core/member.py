"""This node's members/ record: what it says (:class:`MemberRecord`) and keeping it published
(:func:`publish_member`), on the node's lease, with what the others' records say read back.

Other nodes judge this one by it as a handover or failback target (sidecar.core.rules); the
etcd election code only stores and reads it (and leaves out garbage).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from .. import __version__
from ..etcd.election import Election
from ..etcd.errors import EtcdError
from ..etcd.lease import Lease
from .roles import Role, Status

log = structlog.get_logger("sidecar.core.node")  # its events are the node's

MEMBERS_REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class MemberRecord:
    """The record under ``members/<node_id>``."""

    node_id: str
    address: str
    role: Role
    epoch: int
    role_since: float  # time.time()
    version: str = __version__
    # Fields others judge this node by (health, copy_current, preferred_primary, ...).
    extras: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, status: Status, address: str,
           fields: Mapping[str, Callable[[], object]]) -> MemberRecord:
        """The record for ``status`` now, each extra field read once."""
        return cls(status.node_id, address, status.role, status.epoch, status.role_since,
                   extras={name: read() for name, read in fields.items()})

    def encode(self) -> dict[str, Any]:
        """As JSON values (the election code stores it with sorted keys)."""
        since = datetime.fromtimestamp(self.role_since, UTC).isoformat(timespec="milliseconds")
        return {**self.extras, "node_id": self.node_id, "address": self.address,
                "role": self.role.value, "epoch": self.epoch, "version": self.version,
                "role_since": since.replace("+00:00", "Z")}


async def publish_member(election: Election, lease: Lease, record: Callable[[], dict[str, Any]],
                         dirty: asyncio.Event,
                         members_read: Callable[[list[dict[str, Any]]], None]) -> None:
    """Keep members/<node> current (on our lease) and refresh what we know of the others.

    ``dirty`` set means publish again now (a field others judge us by has changed)."""
    published: dict[str, Any] | None = None
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
