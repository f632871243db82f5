"""Real hosts for network tests: the lab lives in :mod:`sidecar.netlab` (the demo uses it too);
this module re-exports it and adds the pytest side, :func:`require_netns`.

See :mod:`sidecar.netlab` for the topology, the addresses and the clean-up rules.
"""

from __future__ import annotations

import os

import pytest

from sidecar.netlab import (
    BRIDGE,
    HOST_IFNAME,
    HOSTS,
    PREFIX,
    ROOT_OCTET,
    ROOT_PORT,
    TEST_NETS,
    Host,
    LabError,
    Neighbour,
    NetnsLab,
    free_subnet,
    list_netns,
    netns_unavailable,
    read_line,
    root_subnets,
    sweep_orphans,
    wait_for,
)

__all__ = [
    "BRIDGE",
    "HOSTS",
    "HOST_IFNAME",
    "PREFIX",
    "ROOT_OCTET",
    "ROOT_PORT",
    "TEST_NETS",
    "Host",
    "LabError",
    "Neighbour",
    "NetnsLab",
    "free_subnet",
    "list_netns",
    "netns_unavailable",
    "read_line",
    "require_netns",
    "root_subnets",
    "sweep_orphans",
    "wait_for",
]

# Looked up at call time, so a test can monkeypatch it on this module.
_netns_unavailable = netns_unavailable


def require_netns() -> None:
    """Skip the test unless it can build namespaces; under CI=true, fail instead.

    CI runs as root on purpose, so a skipped network test there would hide a broken setup.
    """
    reason = _netns_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, where network namespace tests must run)", pytrace=False)
    pytest.skip(reason)
