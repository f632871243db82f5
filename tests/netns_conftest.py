"""Fixtures for network-namespace tests, for tests/conftest.py to import.

from .netns_conftest import netns_lab  # noqa: F401  (a fixture)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .netns_lab import NetnsLab, require_netns, root_sysctls


@pytest.fixture
def netns_lab(request: pytest.FixtureRequest) -> Iterator[NetnsLab]:
    """A fresh lab (bridge; hosts a, b, client, etcd) for one test, torn down pass or fail.

    Parametrized indirectly with a mapping of root-namespace sysctls, it builds and runs the
    lab while the root has them (e.g. ``{"net.ipv4.ip_forward": "1"}``, as on a Docker host)
    and restores them afterwards. Skips when not root or without ``ip netns``; fails instead
    when CI=true.
    """
    require_netns()
    with root_sysctls(getattr(request, "param", {})), NetnsLab() as lab:
        yield lab
