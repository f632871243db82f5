"""The resource IP on this host: the one object the controller drives (claim, release, announce,
probe, reconcile).

This room acts on the kernel only (netlink through pyroute2, raw packet sockets); it never
decides. The node decides when to call it, following DESIGN.md safety rules 3 and 4:

* only the PRIMARY holds the address, so ``release()`` is synchronous, idempotent and fast
  (two or three netlink round trips, no asyncio, no threads, no locks) and can run on any
  shutdown or demotion path;
* a burst of announcements re-checks before every round that the address is still on the
  interface, so a late burst can never pull traffic back to a host that has released it.

Where the work is done: address.py parses the setting, netlink.py adds, deletes and lists the
addresses, frames.py builds and sends ARP/NA frames, announce.py schedules the bursts,
probe.py looks for other holders and reconcile.py keeps the kernel in line with the role.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import structlog

from .address import VipAddress, describe
from .announce import Announcer, AnnounceSettings
from .errors import VipError
from .frames import FrameSender
from .netlink import (
    add_address,
    del_address,
    kernel_label,
    link_addresses,
    lookup_link,
    netlink_errors,
)
from .probe import Prober
from .reconcile import RECONCILE_BACKSTOP, reconcile_loop
from .stats import VipStats

log = structlog.get_logger(__name__)

DEFAULT_ANNOUNCE: Final = AnnounceSettings()  # frozen, so one shared default is safe


class ResourceIP:
    """The floating address(es) on one interface of this host.

    Netlink calls need no ``open()``: each resolves the interface by name, so a re-created
    interface is found again and ``release()`` works before ``open()`` and after ``close()``.
    ``open()`` checks the interface and opens the raw socket for announcements, so a missing
    interface or CAP_NET_RAW shows up at start-up rather than at the first failover.
    """

    def __init__(
        self,
        addresses: Sequence[VipAddress],
        interface: str,
        announce: AnnounceSettings = DEFAULT_ANNOUNCE,
        label: str = "vsm",
    ) -> None:
        if not addresses:
            raise VipError("no resource IP configured")
        self.addresses: tuple[VipAddress, ...] = tuple(dict.fromkeys(addresses))
        self.interface = interface
        self.settings = announce
        self.label = kernel_label(interface, label)
        self.stats = VipStats()
        self._sender = FrameSender(interface)
        self._announcer = Announcer(self.addresses, interface, announce, self._sender, self.stats)
        self._prober = Prober(self.addresses, interface, self._sender, self.stats)

    def __enter__(self) -> ResourceIP:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Check that the interface exists and open the raw socket for announcements."""
        with netlink_errors(f"looking up {self.interface}"):
            link = lookup_link(self.interface)
        if len(link.mac) != 6:
            raise VipError(f"interface {self.interface!r} has no Ethernet address to announce")
        self._sender.open()

    def close(self) -> None:
        self._sender.close()

    # -- kernel state -----------------------------------------------------------------

    def present(self) -> list[str]:
        """The configured addresses that are on the interface now (any prefix length)."""
        with netlink_errors(f"reading addresses of {self.interface}"):
            on_link = {ip for ip, _ in link_addresses(lookup_link(self.interface).ifindex)}
        return [str(vip) for vip in self.addresses if vip.ip in on_link]

    def held(self) -> bool:
        """Every configured address is on the interface."""
        return len(self.present()) == len(self.addresses)

    def claim(self) -> list[str]:
        """Add the missing addresses; returns those added (empty when all were there)."""
        action = f"claiming {describe(self.addresses)} on {self.interface}"
        with netlink_errors(action):
            ifindex = lookup_link(self.interface).ifindex
            on_link = {ip for ip, _ in link_addresses(ifindex)}
            added = [
                str(vip)
                for vip in self.addresses
                if vip.ip not in on_link and add_address(ifindex, vip, self.label)
            ]
        if added:
            log.info("vip_claimed", addresses=added, interface=self.interface)
        return added

    def release(self) -> list[str]:
        """Remove every copy of the addresses, whatever its prefix; returns what it removed.

        Synchronous and fast (a lookup, a dump and one delete per address: about a millisecond),
        with no asyncio, thread or lock, so it is safe on any shutdown or demotion path.
        Absent addresses are not an error, nor is a vanished interface (its addresses went with
        it); a kernel refusal (no CAP_NET_ADMIN) is.
        """
        wanted = {vip.ip for vip in self.addresses}
        with netlink_errors(f"releasing {describe(self.addresses)} on {self.interface}"):
            try:
                ifindex = lookup_link(self.interface).ifindex
            except VipError:
                log.warning("vip_interface_missing", interface=self.interface)
                return []
            removed = [
                f"{ip}/{prefixlen}"
                for ip, prefixlen in link_addresses(ifindex)
                if ip in wanted and del_address(ifindex, ip, prefixlen)
            ]
        if removed:
            log.info("vip_released", addresses=removed, interface=self.interface)
        return removed

    # -- announcements (announce.py) ---------------------------------------------------

    async def announce(self) -> int:
        """One burst: ``repeat`` rounds ``interval`` apart; returns the messages sent."""
        return await self._announcer.announce()

    async def announce_after_claim(self) -> None:
        """First burst now, a second after ``delay``, then one every ``refresh`` seconds.

        Runs until cancelled; the caller cancels it when it releases the address.
        """
        await self._announcer.announce_after_claim()

    # -- probing (probe.py) --------------------------------------------------------------

    # The timeout is the listening window, the substance of the call, not a cancellation
    # deadline a caller could impose with asyncio.timeout instead.
    async def probe(self, timeout: float = 0.05) -> list[str]:  # noqa: ASYNC109
        """Who else answers for the addresses: ``"<address> is at <mac>"`` per other host."""
        return await self._prober.probe(timeout)

    # -- reconciliation (reconcile.py) ---------------------------------------------------

    async def reconcile(
        self,
        should_hold: Callable[[], bool],
        on_repair: Callable[[str], None] | None = None,
        *,
        backstop: float = RECONCILE_BACKSTOP,
    ) -> None:
        """Keep the kernel in line with ``should_hold()`` until cancelled."""
        await reconcile_loop(self, should_hold, on_repair, backstop=backstop)
