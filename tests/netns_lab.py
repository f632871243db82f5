"""Real hosts for network tests: the lab lives in :mod:`sidecar.lab.netlab` and its bookkeeping
in :mod:`sidecar.lab.netns` (the demo uses both); this module re-exports them and adds the
pytest side, :func:`require_netns`.

See :mod:`sidecar.lab.netlab` for the topology, the addresses and the clean-up rules.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from sidecar.lab.netlab import (
    BRIDGE,
    HOST_IFNAME,
    HOST_SYSCTLS,
    HOSTS,
    ROOT_OCTET,
    ROOT_PORT,
    SWITCH_SYSCTLS,
    Host,
    Neighbour,
    NetnsLab,
)
from sidecar.lab.netns import (
    PREFIX,
    TEST_NETS,
    LabError,
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
    "HOST_SYSCTLS",
    "PREFIX",
    "ROOT_OCTET",
    "ROOT_PORT",
    "SWITCH_SYSCTLS",
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
    "root_sysctls",
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


@contextlib.contextmanager
def root_sysctls(settings: Mapping[str, str]) -> Iterator[None]:
    """Set sysctls of the root namespace (as a Docker host has them) for the ``with`` body,
    then put every old value back, pass or fail. Root only."""
    old: dict[Path, str] = {}
    try:
        for key, value in settings.items():
            path = Path("/proc/sys", *key.split("."))
            old[path] = path.read_text()
            path.write_text(value)
        yield
    finally:
        for path, value in old.items():
            path.write_text(value)
