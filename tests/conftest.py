"""Shared fixtures: real local etcd clusters, a unique key space per test, logs on failure."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

from .debianetcd import crash_safe_etcd
from .processes import running_children
from .sidecars import PAIR_KEY, Pair, make_pair


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Every sidecar, stand-in and etcd member a test starts is stopped by its own clean-up,
    pass or fail: a child still running when the whole session is done is a leak. It is killed,
    and the run fails naming it. (Session-wide, so torn down after every other fixture.)"""
    yield
    left = running_children()
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running by the tests: {left}"


@pytest.fixture
def nodes() -> Iterator[list[LocalSidecar]]:
    """Sidecars a test starts one by one (appending each): closed when it ends."""
    started: list[LocalSidecar] = []
    yield started
    for node in started:
        node.close()


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[LocalEtcdCluster]:
    """A 3-member etcd cluster started once and shared by every test of the session.

    Shared means hands off: never kill, pause or restart its members, compact it, or touch keys
    outside your own ``/thinlinc-ha/<cluster_name>/`` prefix. Tests that inject faults take
    ``fresh_etcd_cluster`` instead.
    """
    with LocalEtcdCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def crash_safe_etcd_binary() -> Path:
    """Debian's etcd, which keeps committed writes when killed (see tests/debianetcd.py): for
    tests that kill members under load and count lost writes, or that need an etcd release no
    check fails on."""
    return crash_safe_etcd()


@pytest.fixture
def fresh_etcd_cluster() -> Iterator[LocalEtcdCluster]:
    """A private 3-member etcd cluster for one test, which may kill or pause its members.

    It is closed (every member killed, work dir removed) after the test, pass or fail.
    """
    with LocalEtcdCluster() as cluster:
        yield cluster


@pytest.fixture
def etcd_client(etcd_cluster: LocalEtcdCluster) -> Iterator[Any]:
    """A failover client on the shared cluster, closed after the test."""
    with etcd_cluster.client() as client:
        yield client


@pytest.fixture
def cluster_name() -> str:
    """A sidecar cluster name unique to this test.

    Keys live under ``/thinlinc-ha/<cluster_name>/``, so tests sharing one etcd never see
    each other's keys.
    """
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of each member's log to the report of a failed test that used etcd."""
    report = yield
    # At "call" time the clusters still run; after teardown a fresh cluster's logs are gone.
    if report.failed and report.when in ("setup", "call"):
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, LocalEtcdCluster):
                report.sections.append((f"etcd member logs ({name})", value.logs_tail()))
        pair = item.stash.get(PAIR_KEY, None)
        if pair is not None:
            report.sections.append(("sidecar logs", pair.logs()))
    return report


@pytest.fixture
def pair(
    etcd_cluster: LocalEtcdCluster,
    cluster_name: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Pair]:
    """Two sidecars (started by the test) on the shared etcd cluster."""
    yield from make_pair(etcd_cluster, cluster_name, tmp_path, request)


@pytest.fixture
def pair_on_fresh_cluster(
    fresh_etcd_cluster: LocalEtcdCluster,
    cluster_name: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Pair]:
    """Two sidecars on a private etcd cluster that the test may fault."""
    yield from make_pair(fresh_etcd_cluster, cluster_name, tmp_path, request)
