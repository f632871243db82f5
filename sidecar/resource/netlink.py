"""The resource IP in the kernel's address table: add, delete, list, labels, owner protocol.

Everything here is netlink through pyroute2, synchronous and loop-free, so ``release()`` can
run on any shutdown or demotion path; plus the address-change notifications that wake the
reconciler (reconcile.py).

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
from collections.abc import Iterator
from typing import Any, Final, NamedTuple

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

from .address import IPAddress, VipAddress, mac_bytes
from .errors import VipError, VipPermissionError

log = structlog.get_logger(__name__)

# IFA_PROTO value marking addresses this sidecar added ('v' for vsm). 0-3 are the kernel's own
# (unspec, loopback, router advertisement, link-local); anything else is free for user space.
# Operators can name it: echo "118 vsm-sidecar" > /etc/iproute2/rt_addrprotos.d/vsm.conf
OWNER_PROTO: Final = 0x76
MAX_LABEL: Final = 15  # IFNAMSIZ - 1
INFINITE_LIFETIME: Final = 0xFFFFFFFF


def kernel_label(ifname: str, tag: str) -> str | None:
    """The IPv4 label ``<ifname>:<tag>``, the tag cut to fit the kernel's 15 characters.

    None when the interface name leaves no room for a tag: the kernel then uses the bare
    interface name, and IFA_PROTO alone marks the address as ours.
    """
    room = MAX_LABEL - len(ifname) - 1
    if room < 1 or not tag:
        return None
    return f"{ifname}:{tag[:room]}"


# pyroute2 0.9's IPRoute drives a private asyncio loop in the calling thread and refuses to run
# in a thread whose loop is already running ("Cannot run the event loop while another loop is
# running") -- which is exactly where the node calls release() from. IPRSocket is pyroute2's
# threadless, loop-free netlink socket: it encodes and parses messages, but leaves the
# request/answer bookkeeping (read until DONE or ACK, raise the error) to us; _converse does it.


class Link(NamedTuple):
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


def lookup_link(ifname: str) -> Link:
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
    return Link(int(link["index"]), mac_bytes(link.get_attr("IFLA_ADDRESS") or ""))


def link_addresses(ifindex: int) -> list[tuple[IPAddress, int]]:
    """Every (address, prefix length) on the interface, both families."""
    found = []
    for msg in _converse(ifaddrmsg(), RTM_GETADDR, NLM_F_DUMP):
        if msg["index"] == ifindex:
            # IFA_LOCAL is the local side on point-to-point links; IFA_ADDRESS is then the peer.
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            found.append((ipaddress.ip_address(text), int(msg["prefixlen"])))
    return found


def add_address(ifindex: int, vip: VipAddress, label: str | None) -> bool:
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


def del_address(ifindex: int, ip: IPAddress, prefixlen: int) -> bool:
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
def netlink_errors(action: str) -> Iterator[None]:
    """Turn kernel refusals into VipError lines an operator can act on."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code in (errno.EPERM, errno.EACCES):
            raise VipPermissionError(f"{action}: permission denied (needs CAP_NET_ADMIN)") from None
        raise VipError(f"{action}: {os.strerror(exc.code)}") from None
    except OSError as exc:
        raise VipError(f"{action}: {exc}") from None


class AddressEvents:
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
