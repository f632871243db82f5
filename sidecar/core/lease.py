"""The node's lease: getting one, resuming one after a fence, freeing a stale one, and the two
things bounded by its local deadline (rule 3): the promotion gates, and the role itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from ..atomicfile import atomic_write, fsync_dir
from ..etcd.election import Election
from ..etcd.errors import EtcdAccessDenied, EtcdError
from ..etcd.lease import Lease, LeaseLost
from ..etcd.retry import retry_policy
from .collaborators import PromotionGate

log = structlog.get_logger("sidecar.core.node")  # its events are the node's

# The lease this node holds, recorded in data_dir so that `vsm-sidecar release` can revoke it
# after the process died without revoking it itself.
LEASE_FILE = "lease"

ACCESS_NOTE = ("check etcd_user, the password file, the client certificate and the user's role "
               "(it needs read and write on the cluster's prefix)")


async def acquire_lease(election: Election, unreachable: Callable[[str], None]) -> Lease:
    """A new lease, retried for ever; ``unreachable`` hears why each attempt failed."""
    async for attempt in retry_policy("grant lease"):
        with attempt:
            try:
                return await election.grant()
            except EtcdAccessDenied as exc:
                log.error("etcd_access_denied", error=str(exc), note=ACCESS_NOTE)
                raise
            except EtcdError as exc:
                unreachable(f"etcd unreachable: {exc}")
                raise
    raise AssertionError("unreachable: the retry policy retries forever")


def record_lease(data_dir: Path, lease: Lease) -> None:
    """Write the lease's id to data_dir before it can protect anything. A failure is logged,
    not raised: without the record a crash only costs the standby a TTL."""
    granted = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        atomic_write(data_dir / LEASE_FILE,
                     json.dumps({"lease": lease.id, "granted": granted}).encode())
    except OSError as exc:
        log.warning("lease_not_recorded", lease=hex(lease.id), error=str(exc))


def forget_lease(data_dir: Path) -> None:
    """Remove the record once the lease is revoked (a clean shutdown, or a release)."""
    try:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / LEASE_FILE).unlink()
            fsync_dir(data_dir)
    except OSError as exc:
        log.warning("lease_record_not_removed", error=str(exc))


def recorded_lease(data_dir: Path) -> int | None:
    """The recorded lease id, or None when there is none. Raises ValueError for a record that
    is not one (it was not written by this program)."""
    try:
        text = (data_dir / LEASE_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(text)["lease"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{data_dir / LEASE_FILE}: not a lease record ({exc})") from None
    if not isinstance(lease, int) or isinstance(lease, bool) or lease <= 0:
        raise ValueError(f"{data_dir / LEASE_FILE}: not a lease id: {lease!r}")
    return lease


async def resume(election: Election, lease: Lease) -> Lease | None:
    """After a fence, keep the old lease if etcd still holds it (it only stopped answering
    for a while): then nobody else can hold our leader key, and the leadership resumes under
    the same epoch instead of moving. Returns None when the lease is gone or etcd is mute."""
    try:
        await election.keepalive_once(lease)
    except (EtcdError, LeaseLost) as exc:
        log.info("lease_not_resumed", lease=hex(lease.id), error=str(exc))
        return None
    if lease.expired():
        return None
    log.info("lease_resumed", lease=hex(lease.id), time_left=round(lease.time_left(), 2))
    return lease


async def revoke_stale(election: Election, lease: Lease) -> None:
    """A fenced node's old lease may still be alive in etcd (its leader key with it): free
    it now rather than make the cluster wait for its TTL. We hold nothing under it."""
    try:
        await election.resign(lease)
    except EtcdError as exc:
        log.info("stale_lease_not_revoked", error=str(exc))


async def revoke_previous(election: Election, data_dir: Path, ttl: int) -> None:
    """At start-up: a lease still recorded in data_dir is a dead predecessor's (the caller
    holds data_dir's lock, which no live process does): revoke it, as `vsm-sidecar release`
    would, so nobody waits for its TTL. Its resource IP went at start-up already (rule 4)."""
    try:
        previous = recorded_lease(data_dir)
    except ValueError as exc:
        log.warning("lease_record_unreadable", error=str(exc), decision="leave it to its TTL")
        return
    if previous is None:
        return
    log.info("previous_lease_found", lease=hex(previous),
             decision="revoke it: the process that held it is gone")
    # Only the id matters to a resign; the deadline is not used.
    await revoke_stale(election, Lease(previous, ttl, deadline=0.0, margin=0.0))


async def pass_gates(lease: Lease, revision: int, gates: Sequence[PromotionGate]) -> None:
    """Await every promotion gate within the lease's time left (rule 5, then rule 3)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(max(lease.time_left(), 0)):
            for gate in gates:
                await gate(revision)
    except TimeoutError:
        raise LeaseLost("won the election but could not catch up before the deadline"
                        ) from None
    if lease.expired():
        raise LeaseLost("won the election after the local deadline")
    log.info("promotion_gates_passed", revision=revision,
             seconds=round(time.monotonic() - started, 4))


async def watch_deadline(lease: Lease, enforce: Callable[[], None]) -> None:
    """Rule 3: wake at the local deadline and give up the role without asking etcd."""
    while True:
        left = lease.time_left()
        if left <= 0:
            enforce()
            raise LeaseLost("local deadline passed")
        await asyncio.sleep(left)
