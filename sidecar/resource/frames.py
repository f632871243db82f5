"""Gratuitous ARP and unsolicited neighbour advertisement frames, and the raw socket they leave by.

Hand-written on purpose: neither pyroute2 (it has ARP constants but sends no ARP) nor any small
maintained library builds gratuitous ARP or unsolicited neighbour advertisements; scapy could,
but it is a large dependency for four fixed frame layouts. Everything goes out of one
AF_PACKET socket (:class:`FrameSender`), which needs CAP_NET_RAW only. When they are sent is
announce.py's business; the probes that listen for other holders are probe.py's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Final

import structlog

from .address import VipAddress
from .errors import VipError, VipPermissionError

log = structlog.get_logger(__name__)

ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
ETH_ZLEN: Final = 60  # minimum Ethernet frame without FCS; we pad ARP frames to it
BROADCAST_MAC: Final = b"\xff" * 6
ZERO_MAC: Final = b"\x00" * 6
ARP_REQUEST: Final = 1
ARP_REPLY: Final = 2
ICMPV6: Final = 58
ND_NEIGHBOR_SOLICIT: Final = 135
ND_NEIGHBOR_ADVERT: Final = 136
NA_FLAG_OVERRIDE: Final = 0x20000000
ND_OPT_TARGET_LLADDR: Final = 2
ALL_NODES: Final = ipaddress.IPv6Address("ff02::1")
UNSPECIFIED_V4: Final = ipaddress.IPv4Address("0.0.0.0")
UNSPECIFIED_V6: Final = ipaddress.IPv6Address("::")

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen op sha spa tha tpa
_IPV6 = struct.Struct("!IHBB16s16s")  # version/class/flow, payload length, next, hops, src, dst
_NA = struct.Struct("!BBHI16sBB6s")  # type code checksum flags target, option type/len/mac
_NS = struct.Struct("!BBHI16s")  # type code checksum reserved target


def arp_frame(
    op: int,
    mac: bytes,
    sender_ip: ipaddress.IPv4Address,
    target_mac: bytes,
    target_ip: ipaddress.IPv4Address,
) -> bytes:
    """A broadcast Ethernet ARP frame, padded to the minimum frame size."""
    arp = _ARP.pack(1, ETH_P_IP, 6, 4, op, mac, sender_ip.packed, target_mac, target_ip.packed)
    return (_ETH.pack(BROADCAST_MAC, mac, ETH_P_ARP) + arp).ljust(ETH_ZLEN, b"\0")


def gratuitous_arps(mac: bytes, ip: ipaddress.IPv4Address) -> tuple[bytes, bytes]:
    """The request and the reply form of a gratuitous ARP; some switches honour only one.

    The request leaves the target hardware address zero (RFC 5227 announcement). The reply
    repeats our MAC as target: Linux treats a reply as gratuitous (and lets it override a
    fresh cache entry) only when target and sender hardware addresses are equal.
    """
    request = arp_frame(ARP_REQUEST, mac, ip, ZERO_MAC, ip)
    reply = arp_frame(ARP_REPLY, mac, ip, mac, ip)
    return request, reply


def arp_probe(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """An RFC 5227 probe: sender IP 0.0.0.0, so asking teaches no cache that we hold ``ip``."""
    return arp_frame(ARP_REQUEST, mac, UNSPECIFIED_V4, ZERO_MAC, ip)


def parse_arp_reply(frame: bytes) -> tuple[ipaddress.IPv4Address, bytes] | None:
    """(sender IP, sender MAC) of an Ethernet ARP reply, None for anything else."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    if _ETH.unpack_from(frame)[2] != ETH_P_ARP:
        return None
    _, _, _, _, op, sha, spa, _, _ = _ARP.unpack_from(frame, _ETH.size)
    if op != ARP_REPLY:
        return None
    return ipaddress.IPv4Address(spa), sha


def multicast_mac(group: ipaddress.IPv6Address) -> bytes:
    return b"\x33\x33" + group.packed[-4:]


def solicited_node(ip: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | int(ip) & 0xFFFFFF)


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, as ICMPv6 needs over its pseudo-header."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmpv6_frame(
    mac: bytes,
    dst_mac: bytes,
    src: ipaddress.IPv6Address,
    dst: ipaddress.IPv6Address,
    icmp: bytes,
) -> bytes:
    """Wrap an ICMPv6 message (checksum field zero) in IPv6 and Ethernet, hop limit 255.

    Receivers drop neighbour discovery with any other hop limit (RFC 4861 7.1): it proves the
    packet was not routed.
    """
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(icmp), ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(pseudo + icmp)) + icmp[4:]
    ipv6 = _IPV6.pack(6 << 28, len(icmp), ICMPV6, 255, src.packed, dst.packed)
    return _ETH.pack(dst_mac, mac, ETH_P_IPV6) + ipv6 + icmp


def unsolicited_na(mac: bytes, ip: ipaddress.IPv6Address) -> bytes:
    """Unsolicited neighbour advertisement to all nodes, override flag set, with our MAC."""
    icmp = _NA.pack(
        ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE, ip.packed, ND_OPT_TARGET_LLADDR, 1, mac
    )
    return icmpv6_frame(mac, multicast_mac(ALL_NODES), ip, ALL_NODES, icmp)


def dad_solicitation(mac: bytes, ip: ipaddress.IPv6Address) -> bytes:
    """A duplicate-address-detection style solicitation (source ::) for ``ip``.

    With an unspecified source, whoever holds ``ip`` answers to all nodes, and nobody's cache
    learns us; RFC 4861 forbids the source link-layer option in that case, so there is none.
    """
    group = solicited_node(ip)
    icmp = _NS.pack(ND_NEIGHBOR_SOLICIT, 0, 0, 0, ip.packed)
    return icmpv6_frame(mac, multicast_mac(group), UNSPECIFIED_V6, group, icmp)


def parse_na(frame: bytes) -> tuple[ipaddress.IPv6Address, bytes] | None:
    """(target, Ethernet source) of a neighbour advertisement, None for anything else."""
    if len(frame) < _ETH.size + _IPV6.size + _NS.size:
        return None
    _, src_mac, ethertype = _ETH.unpack_from(frame)
    next_header = _IPV6.unpack_from(frame, _ETH.size)[2]
    if ethertype != ETH_P_IPV6 or next_header != ICMPV6:
        return None
    icmp_type, _, _, _, target = _NS.unpack_from(frame, _ETH.size + _IPV6.size)
    if icmp_type != ND_NEIGHBOR_ADVERT:
        return None
    return ipaddress.IPv6Address(target), src_mac


def announcement_frames(mac: bytes, vip: VipAddress) -> list[tuple[bytes, int]]:
    """(frame, ethertype) pairs of one announcement round for one address."""
    if isinstance(vip, ipaddress.IPv4Interface):
        return [(frame, ETH_P_ARP) for frame in gratuitous_arps(mac, vip.ip)]
    return [(unsolicited_na(mac, vip.ip), ETH_P_IPV6)]


# --------------------------------------------------------------------------- the actuator


# --------------------------------------------------------------------------- raw sockets


def packet_socket(protocol: int) -> socket.socket:
    try:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
    except PermissionError:
        raise VipPermissionError("opening a raw packet socket needs CAP_NET_RAW") from None


class FrameSender:
    """The send-only packet socket of one interface; ResourceIP.open() opens it."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._sender: socket.socket | None = None

    def open(self) -> None:
        if self._sender is None:
            self._sender = packet_socket(0)  # protocol 0: send only, never queues input

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def send(self, frames: list[tuple[bytes, int]]) -> int:
        if self._sender is None:
            raise VipError("ResourceIP is not open: call open() before announcing")
        sent = 0
        failure: OSError | None = None
        for frame, ethertype in frames:
            try:
                self._sender.sendto(frame, (self.interface, ethertype))
            except OSError as exc:
                # A down link (ENETDOWN) must not kill the announcer: the next burst or the
                # reconciler tries again. Missing privileges are a configuration error.
                if exc.errno in (errno.EPERM, errno.EACCES):
                    raise VipPermissionError("sending announcements needs CAP_NET_RAW") from None
                failure = exc
            else:
                sent += 1
        if failure is not None:  # one line per round, not one per frame
            log.warning(
                "vip_send_failed",
                interface=self.interface,
                failed=len(frames) - sent,
                error=str(failure),
            )
        return sent

