"""``vsm-sidecar release``: clean up after a sidecar that died without doing it itself.

A sidecar killed with -9, by the OOM killer or by a crash leaves its resource IP on the
interface and its lease alive in etcd, and the standby waits a whole TTL. systemd runs this
after any exit of the unit (``ExecStopPost=``): it removes this node's resource IPs and
revokes the lease recorded in ``data_dir`` (core/lease.py writes it at each grant), so the
standby takes over at once.

It must never touch a live sidecar. The witness is the ``data_dir`` lock (datalock.py): the
kernel holds it exactly as long as a sidecar lives. Release takes that lock itself for its
whole length, so a sidecar starting meanwhile finds the directory busy, and reads the
recorded lease only once it holds the lock: a lease read then can belong to no live process.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from ..core.lease import forget_lease, recorded_lease
from ..etcd.client import Etcd
from ..etcd.election import Election
from ..etcd.errors import LeaseGone
from ..etcd.lease import Lease
from ..resource.controller import ResourceController
from ..settings import Settings
from . import datalock

log = structlog.get_logger(__name__)

REASON = "release after the sidecar exited"


class SidecarRunning(Exception):
    """A live sidecar holds the data directory: release changed nothing."""


@dataclass(frozen=True)
class Released:
    addresses: list[str]
    lease: int | None  # the lease revoked (or found already gone), None when none was recorded
    already_gone: bool = False

    def summary(self) -> str:
        if not self.addresses and self.lease is None:
            return "nothing to release"
        parts = [f"removed {', '.join(self.addresses)}"] if self.addresses else []
        if self.lease is not None:
            lease = hex(self.lease)
            parts.append(f"lease {lease} had already expired" if self.already_gone
                         else f"revoked lease {lease}")
        return "; ".join(parts)


async def release(settings: Settings) -> Released:
    """Remove the resource IPs and revoke the recorded lease, holding the data_dir lock.

    Raises SidecarRunning when a live sidecar holds ``data_dir``; ConfigError when the resource
    IP cannot be handled (privileges, interface); ValueError for an unreadable lease record;
    EtcdError when etcd does not answer (the lease then expires on its own within its TTL).
    """
    try:
        lock = datalock.acquire(settings.data_dir)
    except datalock.DataDirInUse as exc:
        raise SidecarRunning(f"a sidecar is running: {exc}; nothing was changed") from None
    try:
        addresses = _remove_addresses(settings)
        # Read only now, under the lock: no live process can hold this lease.
        lease_id = recorded_lease(settings.data_dir)
        if lease_id is None:
            return Released(addresses, None)
        gone = await _revoke(settings, lease_id)
        forget_lease(settings.data_dir)
        return Released(addresses, lease_id, already_gone=gone)
    finally:
        lock.release()


def _remove_addresses(settings: Settings) -> list[str]:
    if not settings.vip:
        return []
    # The same path `run` takes at start-up to remove an address a dead process left behind.
    controller = ResourceController(settings, is_primary=lambda: False)
    controller.open()
    try:
        removed = controller.ip.release()
        if removed:
            log.info("resource_ip_released", addresses=removed, reason=REASON)
        return removed
    finally:
        controller.close()


async def _revoke(settings: Settings, lease_id: int) -> bool:
    """Revoke the lease (and the leader key on it, as a resign does); True if it was gone."""
    etcd = Etcd(settings, name="etcd-release")
    try:
        # Only the id matters to a resign; the deadline is not used.
        lease = Lease(lease_id, settings.ttl, deadline=0.0, margin=0.0)
        try:
            await Election(etcd, settings).resign(lease)
        except LeaseGone:
            log.info("lease_already_gone", lease=hex(lease_id))
            return True
        return False
    finally:
        etcd.close()
