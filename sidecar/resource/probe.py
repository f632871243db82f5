"""Who else answers for the resource IP: an ARP probe or DAD solicitation, then listen.

Run before a claim (ResourceController.claim): a stale holder is logged and counted, never
fought. Neither question teaches any neighbour cache that we hold the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Sequence

import structlog

from .address import IPAddress, VipAddress, format_mac
from .errors import VipError
from .frames import (
    ETH_P_ARP,
    ETH_P_IPV6,
    FrameSender,
    arp_probe,
    dad_solicitation,
    packet_socket,
    parse_arp_reply,
    parse_na,
)
from .netlink import lookup_link, netlink_errors
from .stats import VipStats

log = structlog.get_logger(__name__)


class Prober:
    """Probes for other holders of the addresses on one interface."""

    def __init__(
        self,
        addresses: Sequence[VipAddress],
        interface: str,
        sender: FrameSender,
        stats: VipStats,
    ) -> None:
        self.addresses = tuple(addresses)
        self.interface = interface
        self.sender = sender
        self.stats = stats

    # The timeout is the listening window, the substance of the call, not a cancellation
    # deadline a caller could impose with asyncio.timeout instead.
    async def probe(self, timeout: float = 0.05) -> list[str]:  # noqa: ASYNC109
        """Who else answers for the addresses: ``"<address> is at <mac>"`` per other host.

        Asks with an ARP probe (IPv4) or a duplicate-address-detection solicitation (IPv6),
        neither of which teaches anyone that we hold the address. Listens for ``timeout``
        seconds. Never raises for network errors: it logs them and returns [].
        """
        try:
            holders = await self._probe(window=timeout)
        except (OSError, VipError) as exc:
            log.warning("vip_probe_failed", interface=self.interface, error=str(exc))
            return []
        for ip, mac in holders:
            log.warning("vip_stale_holder", address=str(ip), mac=mac, interface=self.interface)
        self.stats.stale_holders_seen += len(holders)
        return [f"{ip} is at {mac}" for ip, mac in holders]

    async def _probe(self, window: float) -> list[tuple[IPAddress, str]]:
        with netlink_errors(f"looking up {self.interface}"):
            link = lookup_link(self.interface)
        wanted = {vip.ip for vip in self.addresses}
        families = {vip.version for vip in self.addresses}
        deadline = asyncio.get_running_loop().time() + window
        with contextlib.ExitStack() as stack:
            # Listen before asking: on a LAN the answer comes back within microseconds.
            listeners = {
                version: stack.enter_context(self._listener(version)) for version in families
            }
            self.sender.send(self._probe_frames(link.mac))
            found = await asyncio.gather(
                *(
                    _collect(sock, version, wanted, link.mac, deadline)
                    for version, sock in listeners.items()
                )
            )
        return sorted({holder for holders in found for holder in holders}, key=str)

    def _listener(self, version: int) -> socket.socket:
        sock = packet_socket(ETH_P_ARP if version == 4 else ETH_P_IPV6)
        try:
            sock.bind((self.interface, ETH_P_ARP if version == 4 else ETH_P_IPV6))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _probe_frames(self, mac: bytes) -> list[tuple[bytes, int]]:
        frames = []
        for vip in self.addresses:
            if isinstance(vip, ipaddress.IPv4Interface):
                frames.append((arp_probe(mac, vip.ip), ETH_P_ARP))
            else:
                frames.append((dad_solicitation(mac, vip.ip), ETH_P_IPV6))
        return frames



async def _collect(
    sock: socket.socket,
    version: int,
    wanted: set[IPAddress],
    own_mac: bytes,
    deadline: float,
) -> set[tuple[IPAddress, str]]:
    """Answers for ``wanted`` from hosts other than us until the loop-clock ``deadline``."""
    parse = parse_arp_reply if version == 4 else parse_na
    loop = asyncio.get_running_loop()
    found: set[tuple[IPAddress, str]] = set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            while True:
                answer = parse(await loop.sock_recv(sock, 2048))
                if answer and answer[0] in wanted and answer[1] != own_mac:
                    found.add((answer[0], format_mac(answer[1])))
    return found
