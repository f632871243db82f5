"""Keeping a lease alive: renewals that move the local deadline (rule 3 of DESIGN.md), retried
every KEEPALIVE_RETRY on failure, under an ``asyncio.timeout`` at that deadline.

On an etcd with etcd-io/etcd#15247 (:mod:`sidecar.etcd.versions`) a keepalive that fails or is
slow is not taken at its word: the lease is checked through another member, whose answer alone
renews the deadline (rule (a) there), so a lease revoked by a stale etcd leader is noticed at
once rather than at the deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from ..settings import Settings
from .client import Etcd, lease_ttl_elsewhere, retrieve_outcome
from .errors import EtcdError
from .lease import Lease, LeaseLost
from .retry import any_etcd_error, retry_policy
from .versions import SLOW_KEEPALIVE

log = structlog.get_logger("sidecar.etcd.election")  # its events are the election's

# After a failed keepalive, try again this soon (on another endpoint) rather than a whole
# interval later: an etcd leader election costs 1-2 s and the deadline does not wait.
KEEPALIVE_RETRY = 0.1


class Keepalive:
    """Renews one node's leases; ``affected()`` says whether etcd lacks the #15247 fix."""

    def __init__(self, etcd: Etcd, settings: Settings, affected: Callable[[], bool]) -> None:
        self.etcd = etcd
        self.settings = settings
        self.affected = affected
        self.latency = 0.0  # of the last answered keepalive, in seconds

    async def once(self, lease: Lease) -> None:
        """One keepalive; renews the local deadline (rule 3) or raises LeaseLost/EtcdError."""
        if self.affected():
            await self.guarded(lease)
            return
        sent = time.monotonic()
        lease.renew(sent, await self._refresh(lease))

    async def _refresh(self, lease: Lease) -> int:
        """One keepalive; the TTL etcd granted. Raises LeaseLost when etcd says it is gone."""
        sent = time.monotonic()
        responses = await self.etcd.call(lambda c: list(c.refresh_lease(lease.id)), "keepalive")
        self.latency = time.monotonic() - sent
        ttl = responses[0].TTL if responses else 0
        if ttl <= 0:
            raise LeaseLost(f"etcd says lease {lease.id:x} is gone")
        return int(ttl)

    async def guarded(self, lease: Lease) -> None:
        """A keepalive on an etcd with #15247: a prompt answer renews as usual; a failed or
        slow one has the lease checked through another member, whose answer alone renews the
        deadline. Raises LeaseLost when that check finds it gone."""
        sent = time.monotonic()
        refresh = asyncio.ensure_future(self._refresh(lease))
        refresh.add_done_callback(retrieve_outcome)  # it may be abandoned below
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
                            await self.once(lease)
            except TimeoutError as exc:
                why = f": {failure[0]}" if failure else ""
                raise LeaseLost(f"local deadline passed{why}") from exc
            if lease.expired():
                raise LeaseLost("local deadline passed")
            await asyncio.sleep(min(interval, max(lease.time_left(), 0.01)))
