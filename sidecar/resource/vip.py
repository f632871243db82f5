"""The resource IP on this host: claim, release, announce, probe, reconcile.

This room acts on the kernel only (netlink through pyroute2, raw packet sockets); it never
decides. The node decides when to call it, following DESIGN.md safety rules 3 and 4:

* only the PRIMARY holds the address, so ``release()`` is synchronous, idempotent and fast
  (two or three netlink round trips, no asyncio, no threads, no locks) and can run on any
  shutdown or demotion path;
* a burst of announcements re-checks before every round that the address is still on the
  interface, so a late burst can never pull traffic back to a host that has released it.

Kernel facts this module relies on (checked on Linux 6.18 with iproute2 6.1):

* IPv4 labels (IFA_LABEL) may be at most 15 characters (IFNAMSIZ - 1, longer ones get ERANGE).
  The kernel (and iproute2 6.1) accept any text, but the convention that ifconfig-era tools and
  older iproute2 enforce is ``<ifname>:<tag>``, so that is what we write.
* Both families also carry an address *protocol* (IFA_PROTO, Linux >= 5.18): a one-byte tag of
  who added the address. IPv6 addresses have no label, so IFA_PROTO is how an IPv6 resource IP
  is marked as ours. Older kernels ignore the attribute; iproute2 6.1 does not display it yet
  (newer releases show ``proto``), pyroute2 does.
* IFA_F_NODAD makes an IPv6 address usable at once instead of 'tentative' for about a second.
* Deleting an IPv4 address that is *primary* in its subnet also deletes the secondaries of that
  subnet unless ``net.ipv4.conf.<if>.promote_secondaries`` is set; the resource IP is normally a
  secondary beside the host's own address, which is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeAlias

import structlog
from pyroute2 import IPRSocket
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
)
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

log = structlog.get_logger(__name__)

VipAddress: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

CAP_NET_ADMIN: Final = 12
CAP_NET_RAW: Final = 13
# IFA_PROTO value marking addresses this sidecar added ('v' for vsm). 0-3 are the kernel's own
# (unspec, loopback, router advertisement, link-local); anything else is free for user space.
# Operators can name it: echo "118 vsm-sidecar" > /etc/iproute2/rt_addrprotos.d/vsm.conf
OWNER_PROTO: Final = 0x76
MAX_LABEL: Final = 15  # IFNAMSIZ - 1
RECONCILE_BACKSTOP: Final = 0.5  # seconds between full checks when no netlink event arrives
INFINITE_LIFETIME: Final = 0xFFFFFFFF


class VipError(Exception):
    """A configuration or kernel problem, worded for one line to an operator."""


class VipPermissionError(VipError):
    """The process lacks CAP_NET_ADMIN or CAP_NET_RAW."""


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


@dataclass
class VipStats:
    """Counters for /metrics and status output."""

    announcements_sent: int = 0
    stale_holders_seen: int = 0
    last_announcement: float | None = None  # wall-clock time, for humans
    repairs: int = 0


# --------------------------------------------------------------------------- configuration


def parse_vip(text: str) -> VipAddress:
    """Parse ``10.0.0.4/24`` or ``2001:db8::4/64``; the prefix length is required.

    The prefix matters: it decides the subnet route and broadcast the kernel installs, and a
    silently assumed /32 would make the address unreachable from its own subnet on some setups.
    """
    spec = text.strip()
    if "/" not in spec:
        raise VipError(
            f"resource IP {text!r} needs a prefix length, e.g. 10.0.0.4/24 or 2001:db8::4/64"
        )
    try:
        vip = ipaddress.ip_interface(spec)
    except ValueError as exc:
        raise VipError(f"resource IP {text!r} is not an IP address with prefix: {exc}") from None
    problem = _unusable_reason(vip)
    if problem:
        raise VipError(f"resource IP {text!r} cannot float between hosts: {problem}")
    return vip


def _unusable_reason(vip: VipAddress) -> str | None:
    ip = vip.ip
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        return "it is an unspecified, multicast or loopback address"
    if ip.is_link_local:
        return "it is link-local (scoped to one link, unusable as a service address)"
    edges = (vip.network.network_address, vip.network.broadcast_address)
    if vip.version == 4 and vip.network.prefixlen < 31 and ip in edges:
        return f"it is the network or broadcast address of {vip.network}"
    return None


def check_privileges(*, status_path: str = "/proc/self/status") -> None:
    """Raise VipPermissionError unless this process has CAP_NET_ADMIN and CAP_NET_RAW.

    Reads the effective set rather than testing euid: the container and systemd deployments
    run as a non-root user with exactly these two capabilities.
    """
    effective = _effective_capabilities(status_path)
    needs = {
        CAP_NET_ADMIN: "CAP_NET_ADMIN (to add and remove the resource IP)",
        CAP_NET_RAW: "CAP_NET_RAW (to send ARP and neighbour advertisements)",
    }
    missing = [why for bit, why in needs.items() if not effective >> bit & 1]
    if missing:
        raise VipPermissionError(
            "missing " + " and ".join(missing) + "; run as root or grant the capabilities"
        )


def _effective_capabilities(status_path: str) -> int:
    try:
        with open(status_path, encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError) as exc:
        raise VipError(f"cannot read capabilities from {status_path}: {exc}") from None
    raise VipError(f"no CapEff line in {status_path}")


def kernel_label(ifname: str, tag: str) -> str | None:
    """The IPv4 label ``<ifname>:<tag>``, the tag cut to fit the kernel's 15 characters.

    None when the interface name leaves no room for a tag: the kernel then uses the bare
    interface name, and IFA_PROTO alone marks the address as ours.
    """
    room = MAX_LABEL - len(ifname) - 1
    if room < 1 or not tag:
        return None
    return f"{ifname}:{tag[:room]}"


# --------------------------------------------------------------------------- netlink
#
# pyroute2 0.9's IPRoute drives a private asyncio loop in the calling thread and refuses to run
# in a thread whose loop is already running ("Cannot run the event loop while another loop is
# running") -- which is exactly where the node calls release() from. IPRSocket is pyroute2's
# threadless, loop-free netlink socket: it encodes and parses messages, but leaves the
# request/answer bookkeeping (read until DONE or ACK, raise the error) to us; _converse does it.


class _Link(NamedTuple):
    ifindex: int
    mac: bytes


def _converse(msg: Any, msg_type: int, flags: int = 0) -> list[Any]:
    """Send one request and collect its answers, raising the kernel's error if any.

    Each conversation uses a fresh socket (about 0.1 ms): release() may interrupt a claim()
    half-way (a signal path), and two conversations on separate sockets can never read each
    other's answers.
    """
    with IPRSocket(groups=0) as sock:
        sock.put(msg, msg_type, msg_flags=NLM_F_REQUEST | flags, msg_seq=1)
        return list(_answers(sock, dump=bool(flags & NLM_F_DUMP)))


def _answers(sock: Any, *, dump: bool) -> Iterator[Any]:
    while True:
        for reply in sock.get():
            header = reply["header"]
            if header["error"] is not None:
                raise header["error"]
            if header["type"] in (NLMSG_DONE, NLMSG_ERROR):  # end of a dump, or a plain ACK
                return
            yield reply
            if not dump:
                return


def _lookup_link(ifname: str) -> _Link:
    request = ifinfmsg()
    request["attrs"] = [("IFLA_IFNAME", ifname)]
    try:
        (link,) = _converse(request, RTM_GETLINK)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            raise VipError(
                f"interface {ifname!r} does not exist in this network namespace"
            ) from None
        raise
    # Interfaces without a link layer (tun, wireguard) have no MAC: fine for netlink work,
    # open() refuses them because nothing can be announced there.
    return _Link(int(link["index"]), mac_bytes(link.get_attr("IFLA_ADDRESS") or ""))


def _link_addresses(ifindex: int) -> list[tuple[IPAddress, int]]:
    """Every (address, prefix length) on the interface, both families."""
    found = []
    for msg in _converse(ifaddrmsg(), RTM_GETADDR, NLM_F_DUMP):
        if msg["index"] == ifindex:
            # IFA_LOCAL is the local side on point-to-point links; IFA_ADDRESS is then the peer.
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            found.append((ipaddress.ip_address(text), int(msg["prefixlen"])))
    return found


def _add_address(ifindex: int, vip: VipAddress, label: str | None) -> bool:
    """Add one address; False when it is already there (a concurrent claim won)."""
    msg = _address_msg(ifindex, vip.ip, vip.network.prefixlen)
    msg["attrs"].append(("IFA_PROTO", OWNER_PROTO))
    if isinstance(vip, ipaddress.IPv4Interface):
        msg["attrs"].append(("IFA_BROADCAST", str(vip.network.broadcast_address)))
        if label:
            msg["attrs"].append(("IFA_LABEL", label))
    else:
        msg["attrs"].append(("IFA_FLAGS", IFA_F_NODAD))
        # Preferred lifetime 0 ('deprecated'): the kernel accepts traffic to the address but
        # never picks it as the source of new outgoing connections, so our own connections
        # (to etcd, say) do not break when the address moves to the other host.
        lifetimes = {"ifa_preferred": 0, "ifa_valid": INFINITE_LIFETIME, "cstamp": 0, "tstamp": 0}
        msg["attrs"].append(("IFA_CACHEINFO", lifetimes))
    try:
        _converse(msg, RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise
    return True


def _del_address(ifindex: int, ip: IPAddress, prefixlen: int) -> bool:
    """Delete one address; False when it was already gone."""
    try:
        _converse(_address_msg(ifindex, ip, prefixlen), RTM_DELADDR, NLM_F_ACK)
    except NetlinkError as exc:
        if exc.code == errno.EADDRNOTAVAIL:
            return False
        raise
    return True


def _address_msg(ifindex: int, ip: IPAddress, prefixlen: int) -> Any:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    msg["prefixlen"] = prefixlen
    msg["index"] = ifindex
    msg["attrs"] = [("IFA_ADDRESS", str(ip))]
    if ip.version == 4:
        msg["attrs"].append(("IFA_LOCAL", str(ip)))
    return msg


@contextlib.contextmanager
def _netlink_errors(action: str) -> Iterator[None]:
    """Turn kernel refusals into VipError lines an operator can act on."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code in (errno.EPERM, errno.EACCES):
            raise VipPermissionError(f"{action}: permission denied (needs CAP_NET_ADMIN)") from None
        raise VipError(f"{action}: {os.strerror(exc.code)}") from None
    except OSError as exc:
        raise VipError(f"{action}: {exc}") from None


class _AddressEvents:
    """Sets an asyncio.Event whenever the kernel reports an address change on one interface.

    The event only wakes the reconciler; it never carries state. What the reconciler acts on is
    always a fresh dump, so a lost or reordered notification cannot mislead it.
    """

    def __init__(self, ifindex: int, wake: asyncio.Event) -> None:
        self._ifindex = ifindex
        self._wake = wake
        self._loop = asyncio.get_running_loop()
        self._sock: Any = IPRSocket(groups=0)
        self._sock.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
        self._sock.socket.setblocking(False)
        self._fd = int(self._sock.socket.fileno())
        self._loop.add_reader(self._fd, self._drain)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._sock.close()

    def _drain(self) -> None:
        try:
            while True:
                if any(msg.get("index") == self._ifindex for msg in self._sock.get()):
                    self._wake.set()
        except BlockingIOError:
            return
        except OSError as exc:
            # ENOBUFS: the kernel dropped notifications. The next full check sees whatever
            # they said; any other error leaves the backstop timer to do the work alone.
            self._wake.set()
            if exc.errno != errno.ENOBUFS:
                log.warning("vip_events_lost", error=str(exc))
                self._loop.remove_reader(self._fd)


# --------------------------------------------------------------------------- frames
#
# Hand-written on purpose: neither pyroute2 (it has ARP constants but sends no ARP) nor any small
# maintained library builds gratuitous ARP or unsolicited neighbour advertisements; scapy could,
# but it is a large dependency for four fixed frame layouts. Everything goes out of one
# AF_PACKET socket, which needs CAP_NET_RAW only.

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


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def format_mac(raw: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in raw)


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
        announce: AnnounceSettings = AnnounceSettings(),
        label: str = "vsm",
    ) -> None:
        if not addresses:
            raise VipError("no resource IP configured")
        self.addresses: tuple[VipAddress, ...] = tuple(dict.fromkeys(addresses))
        self.interface = interface
        self.settings = announce
        self.label = kernel_label(interface, label)
        self.stats = VipStats()
        self._sender: socket.socket | None = None

    def __enter__(self) -> ResourceIP:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Check that the interface exists and open the raw socket for announcements."""
        with _netlink_errors(f"looking up {self.interface}"):
            link = _lookup_link(self.interface)
        if len(link.mac) != 6:
            raise VipError(f"interface {self.interface!r} has no Ethernet address to announce")
        if self._sender is None:
            self._sender = _packet_socket(0)  # protocol 0: send only, never queues input

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    # -- kernel state -----------------------------------------------------------------

    def present(self) -> list[str]:
        """The configured addresses that are on the interface now (any prefix length)."""
        with _netlink_errors(f"reading addresses of {self.interface}"):
            on_link = {ip for ip, _ in _link_addresses(_lookup_link(self.interface).ifindex)}
        return [str(vip) for vip in self.addresses if vip.ip in on_link]

    def held(self) -> bool:
        """Every configured address is on the interface."""
        return len(self.present()) == len(self.addresses)

    def claim(self) -> list[str]:
        """Add the missing addresses; returns those added (empty when all were there)."""
        action = f"claiming {self._names()} on {self.interface}"
        with _netlink_errors(action):
            ifindex = _lookup_link(self.interface).ifindex
            on_link = {ip for ip, _ in _link_addresses(ifindex)}
            added = [
                str(vip)
                for vip in self.addresses
                if vip.ip not in on_link and _add_address(ifindex, vip, self.label)
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
        with _netlink_errors(f"releasing {self._names()} on {self.interface}"):
            try:
                ifindex = _lookup_link(self.interface).ifindex
            except VipError:
                log.warning("vip_interface_missing", interface=self.interface)
                return []
            removed = [
                f"{ip}/{prefixlen}"
                for ip, prefixlen in _link_addresses(ifindex)
                if ip in wanted and _del_address(ifindex, ip, prefixlen)
            ]
        if removed:
            log.info("vip_released", addresses=removed, interface=self.interface)
        return removed

    def _names(self) -> str:
        return ", ".join(str(vip) for vip in self.addresses)

    # -- announcements ----------------------------------------------------------------

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
        with _netlink_errors(f"announcing {self._names()} on {self.interface}"):
            link = _lookup_link(self.interface)
            on_link = {ip for ip, _ in _link_addresses(link.ifindex)}
        frames = [
            frame
            for vip in self.addresses
            if vip.ip in on_link
            for frame in announcement_frames(link.mac, vip)
        ]
        return self._send(frames)

    def _send(self, frames: list[tuple[bytes, int]]) -> int:
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

    # -- probing ----------------------------------------------------------------------

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
        with _netlink_errors(f"looking up {self.interface}"):
            link = _lookup_link(self.interface)
        wanted = {vip.ip for vip in self.addresses}
        families = {vip.version for vip in self.addresses}
        deadline = asyncio.get_running_loop().time() + window
        with contextlib.ExitStack() as stack:
            # Listen before asking: on a LAN the answer comes back within microseconds.
            listeners = {
                version: stack.enter_context(self._listener(version)) for version in families
            }
            self._send(self._probe_frames(link.mac))
            found = await asyncio.gather(
                *(
                    _collect(sock, version, wanted, link.mac, deadline)
                    for version, sock in listeners.items()
                )
            )
        return sorted({holder for holders in found for holder in holders}, key=str)

    def _listener(self, version: int) -> socket.socket:
        sock = _packet_socket(ETH_P_ARP if version == 4 else ETH_P_IPV6)
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

    # -- reconciliation -----------------------------------------------------------------

    async def reconcile(
        self,
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
        with _netlink_errors(f"looking up {self.interface}"):
            ifindex = _lookup_link(self.interface).ifindex
        wake = asyncio.Event()
        events = _AddressEvents(ifindex, wake)
        try:
            while True:
                wake.clear()  # before the check: a change during it wakes us again at once
                await self._reconcile_once(should_hold, on_repair)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backstop):
                        await wake.wait()
        finally:
            events.close()

    async def _reconcile_once(
        self, should_hold: Callable[[], bool], on_repair: Callable[[str], None] | None
    ) -> None:
        hold = should_hold()
        try:
            changed = self.claim() if hold else self.release()
        except VipError as exc:
            log.error("vip_reconcile_failed", interface=self.interface, hold=hold, error=str(exc))
            return
        # Report before announcing: the kernel state is already repaired, and the burst may
        # take a while when `interval` is set.
        for address in changed:
            description = f"{'restored' if hold else 'removed'} {address} on {self.interface}"
            self.stats.repairs += 1
            log.warning("vip_repaired", address=address, interface=self.interface, hold=hold)
            if on_repair is not None:
                on_repair(description)
        if changed and hold:
            try:
                await self.announce()
            except VipError as exc:
                log.error("vip_announce_failed", interface=self.interface, error=str(exc))


def _packet_socket(protocol: int) -> socket.socket:
    try:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
    except PermissionError:
        raise VipPermissionError("opening a raw packet socket needs CAP_NET_RAW") from None


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
