"""The two capabilities the resource IP needs, checked once at start-up.

Reads the effective set rather than testing euid: the container and systemd deployments run as
a non-root user with exactly CAP_NET_ADMIN (netlink.py) and CAP_NET_RAW (frames.py).
"""

from __future__ import annotations

from typing import Final

from .errors import VipError, VipPermissionError

CAP_NET_ADMIN: Final = 12
CAP_NET_RAW: Final = 13


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
