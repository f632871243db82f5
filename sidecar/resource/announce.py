"""When the segment hears that we hold the resource IP: the gratuitous ARP / NA schedule.

A burst is ``repeat`` rounds ``interval`` apart (keepalived's garp_master_repeat and
garp_interval); after a claim comes a burst now, a second one ``delay`` later
(garp_master_delay) and then one every ``refresh`` seconds (garp_master_refresh). Every round
re-checks that the address is still on the interface (DESIGN.md safety rule 4), so a late burst
can never pull traffic back to a host that has released it. The frames are frames.py's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .address import VipAddress, describe
from .errors import VipError
from .frames import FrameSender, announcement_frames
from .netlink import link_addresses, lookup_link, netlink_errors
from .stats import VipStats


@dataclass(frozen=True)
class AnnounceSettings:
    """How loudly to tell the segment we hold the address (keepalived's garp_* knobs)."""

    repeat: int = 5  # garp_master_repeat: rounds per burst
    interval: float = 0.0  # garp_interval: seconds between rounds of a burst
    delay: float = 5.0  # garp_master_delay: second burst this long after the first; 0 = none
    refresh: float = 0.0  # garp_master_refresh: periodic burst while held; 0 = off

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise VipError(f"announce repeat must be at least 1, not {self.repeat}")
        for name in ("interval", "delay", "refresh"):
            if getattr(self, name) < 0:
                raise VipError(f"announce {name} must not be negative")


class Announcer:
    """Announces the addresses of one interface that are on it, through a FrameSender."""

    def __init__(
        self,
        addresses: Sequence[VipAddress],
        interface: str,
        settings: AnnounceSettings,
        sender: FrameSender,
        stats: VipStats,
    ) -> None:
        self.addresses = tuple(addresses)
        self.interface = interface
        self.settings = settings
        self.sender = sender
        self.stats = stats

    async def announce(self) -> int:
        """One burst: ``repeat`` rounds ``interval`` apart; returns the messages sent.

        A round covers only the addresses still on the interface at that moment, so a burst
        that outlives a release goes quiet instead of pulling traffic back to us.
        """
        sent = 0
        for round_no in range(self.settings.repeat):
            if round_no and self.settings.interval:
                await asyncio.sleep(self.settings.interval)
            in_round = self._announce_round()
            # Counted per round so that a burst cancelled half-way is still accounted for.
            if in_round:
                self.stats.announcements_sent += in_round
                self.stats.last_announcement = time.time()
            sent += in_round
        return sent

    async def announce_after_claim(self) -> None:
        """First burst now, a second after ``delay``, then one every ``refresh`` seconds.

        Runs until cancelled; the caller cancels it when it releases the address.
        """
        await self.announce()
        if self.settings.delay > 0:
            await asyncio.sleep(self.settings.delay)
            await self.announce()
        while self.settings.refresh > 0:
            await asyncio.sleep(self.settings.refresh)
            await self.announce()

    def _announce_round(self) -> int:
        with netlink_errors(f"announcing {describe(self.addresses)} on {self.interface}"):
            link = lookup_link(self.interface)
            on_link = {ip for ip, _ in link_addresses(link.ifindex)}
        frames = [
            frame
            for vip in self.addresses
            if vip.ip in on_link
            for frame in announcement_frames(link.mac, vip)
        ]
        return self.sender.send(frames)

