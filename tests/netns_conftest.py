"""Fixtures for network-namespace tests, for tests/conftest.py to import.

from .netns_conftest import netns_lab  # noqa: F401  (a fixture)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .netns_lab import NetnsLab, require_netns


@pytest.fixture
def netns_lab() -> Iterator[NetnsLab]:
    """A fresh lab (bridge; hosts a, b, client, etcd) for one test, torn down pass or fail.

    Skips when not root or without ``ip netns``; fails instead when CI=true.
    """
    require_netns()
    with NetnsLab() as lab:
        yield lab
