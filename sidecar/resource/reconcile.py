"""The reconcile loop: keep the kernel's addresses in line with the role, whatever changes them.

Woken by netlink address events (netlink.AddressEvents) and by a backstop timer, it claims and
announces a missing address while we should hold it and releases a present one while we should
not (DESIGN.md rule 4, the second enforcement). It acts through the ResourceIP (actuator.py)
that starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final, Protocol

import structlog

from .errors import VipError
from .netlink import AddressEvents, lookup_link, netlink_errors
from .stats import VipStats

log = structlog.get_logger(__name__)

RECONCILE_BACKSTOP: Final = 0.5  # seconds between full checks when no netlink event arrives


class Holder(Protocol):
    """What the loop drives: a ResourceIP (actuator.py), named here so this module need not
    import the module that imports it."""

    interface: str
    stats: VipStats

    def claim(self) -> list[str]: ...

    def release(self) -> list[str]: ...

    async def announce(self) -> int: ...


async def reconcile_loop(
    ip: Holder,
    should_hold: Callable[[], bool],
    on_repair: Callable[[str], None] | None = None,
    *,
    backstop: float = RECONCILE_BACKSTOP,
) -> None:
    """Keep the kernel in line with ``should_hold()`` until cancelled.

    Wakes on every netlink address event of the interface (within a millisecond of the
    change) and every ``backstop`` seconds regardless, in case events were lost. Missing
    while we should hold: claim and announce. Present while we should not: release.
    Failures are logged and retried on the next wake-up rather than ending the loop.
    """
    with netlink_errors(f"looking up {ip.interface}"):
        ifindex = lookup_link(ip.interface).ifindex
    wake = asyncio.Event()
    events = AddressEvents(ifindex, wake)
    try:
        while True:
            wake.clear()  # before the check: a change during it wakes us again at once
            await _reconcile_once(ip, should_hold, on_repair)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backstop):
                    await wake.wait()
    finally:
        events.close()


async def _reconcile_once(
    ip: Holder, should_hold: Callable[[], bool], on_repair: Callable[[str], None] | None
) -> None:
    hold = should_hold()
    try:
        changed = ip.claim() if hold else ip.release()
    except VipError as exc:
        log.error("vip_reconcile_failed", interface=ip.interface, hold=hold, error=str(exc))
        return
    # Report before announcing: the kernel state is already repaired, and the burst may
    # take a while when `interval` is set.
    for address in changed:
        description = f"{'restored' if hold else 'removed'} {address} on {ip.interface}"
        ip.stats.repairs += 1
        log.warning("vip_repaired", address=address, interface=ip.interface, hold=hold)
        if on_repair is not None:
            on_repair(description)
    if changed and hold:
        try:
            await ip.announce()
        except VipError as exc:
            log.error("vip_announce_failed", interface=ip.interface, error=str(exc))

