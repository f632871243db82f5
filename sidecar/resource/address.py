"""The resource IP setting: its value types, parsing and validation, and MAC address helpers.

A leaf beside errors.py: config.py's validator parses the setting through here without
importing netlink or raw sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TypeAlias

# Re-exported: a caller that parses the setting catches the error from the same module.
from .errors import VipError as VipError

VipAddress: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def describe(addresses: Iterable[VipAddress]) -> str:
    """The addresses as one comma-separated phrase, for log lines and error messages."""
    return ", ".join(str(vip) for vip in addresses)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def format_mac(raw: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in raw)
