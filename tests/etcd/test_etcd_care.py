"""etcd for years (issue 15): the primary's compaction keeps a small etcd quota from filling
under a large sessions file, and etcd's alarms are reported everywhere and clear after the
operator's recovery. Real etcd members started with a small --quota-backend-bytes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import client
from sidecar.atomicfile import atomic_write
from sidecar.etcd.maintenance import active_alarms, db_status, disarm
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

from ..sidecars import Pair, eventually, make_pair

pytestmark = [pytest.mark.etcd]

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
MB = 1_000_000
MIB = 1 << 20
QUOTA = 64 * MB
CHANGES = 150
# Short settings for a test: compact every 5 s, or at once when 8 MiB (1/8 of the quota) more
# of the database is in use than after the last compaction.
COMPACTION = ["--compaction-interval", "5", "--compaction-keep", "10",
              "--compaction-max-bytes", str(8 * MIB)]




def http(node: LocalSidecar, path: str) -> tuple[int, str]:
    try:
        with OPENER.open(f"http://127.0.0.1:{node.http_port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def alarm_gauge(node: LocalSidecar, kind: str) -> float:
    for family in text_string_to_metric_families(http(node, "/metrics")[1]):
        for sample in family.samples:
            if sample.name == "vsm_sidecar_etcd_alarm" and sample.labels == {"type": kind}:
                return float(sample.value)
    raise AssertionError("no vsm_sidecar_etcd_alarm sample")


def metric(node: LocalSidecar, name: str) -> float:
    for family in text_string_to_metric_families(http(node, "/metrics")[1]):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


def largest_db(cluster: LocalEtcdCluster) -> tuple[int, int, tuple[tuple[str, int], ...]]:
    """The largest database file and size in use over the members, and the alarms."""
    sizes = []
    for member in cluster.members:
        with member.client(timeout=5) as etcd:
            status = db_status(etcd)
            alarms = active_alarms(etcd)
        sizes.append((status.db_size, status.db_size_in_use))
    return max(s[0] for s in sizes), max(s[1] for s in sizes), alarms


@pytest.fixture
def quota_etcd() -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(extra_args=[f"--quota-backend-bytes={QUOTA}"]) as cluster:
        yield cluster


@pytest.fixture
def quota_pair(quota_etcd: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Two sidecars on the 64 MB etcd, stopped when the test ends (pass or fail)."""
    yield from make_pair(quota_etcd, cluster_name, tmp_path, request)


@pytest.fixture
def tiny_pair(tiny_etcd: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
              request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Two sidecars on the tiny etcd, stopped when the test ends (pass or fail)."""
    yield from make_pair(tiny_etcd, cluster_name, tmp_path, request)


def test_compaction_keeps_a_64mb_quota_from_filling_under_a_1mib_sessions_file(
        quota_etcd: LocalEtcdCluster, quota_pair: Pair) -> None:
    """A 1 MiB sessions file changed 150 times by the primary (each change uploaded, ~1 MB of
    etcd history each: without compaction NOSPACE comes after ~60) never raises NOSPACE against
    a 64 MB quota; the primary's compactions are counted, and a failover afterwards works."""
    pair, tmp_path = quota_pair, quota_pair.workdir
    paths = {}
    for node_id in ("a", "b"):
        (tmp_path / f"vsm-{node_id}").mkdir()
        paths[node_id] = tmp_path / f"vsm-{node_id}" / "sessions"
        pair.start_one(node_id, ttl=2, extra_args=[
            "--vsm-sessions-file", str(paths[node_id]), "--vsm-file-check-interval", "0.2",
            *COMPACTION])
    primary, standby = pair.wait_split()
    samples = []
    for change in range(CHANGES):
        content = os.urandom(MIB)
        atomic_write(paths[primary.node_id], content)
        digest = hashlib.sha256(content).hexdigest()
        eventually(lambda d=digest: _uploaded(primary, d), timeout=20)  # type: ignore[misc]
        if change % 10 == 9:
            size, in_use, alarms = largest_db(quota_etcd)
            samples.append((change + 1, size, in_use))
            assert alarms == (), f"after {change + 1} changes: {alarms}"
    size, in_use, alarms = largest_db(quota_etcd)
    assert alarms == ()
    report = ", ".join(f"{n}: {s / MB:.1f}/{u / MB:.1f}" for n, s, u in samples)
    print(f"\netcd db file/in use (MB) after N changes: {report}")
    print(f"largest db file {max(s for _, s, _ in samples) / MB:.1f} MB of {QUOTA / MB:.0f} MB; "
          f"compactions {metric(primary, 'vsm_sidecar_etcd_compactions_total'):.0f}")
    assert max(s for _, s, _ in samples) < QUOTA * 0.75
    assert metric(primary, "vsm_sidecar_etcd_compactions_total") >= 2
    assert metric(primary, "vsm_sidecar_etcd_compacted_revision") > 0
    assert "vsm_sidecar_etcd_compactions_total" not in http(standby, "/metrics")[1] or \
        metric(standby, "vsm_sidecar_etcd_compactions_total") == 0
    primary.kill()
    standby.wait_role("PRIMARY", timeout=15)


def _uploaded(node: LocalSidecar, digest: str) -> None:
    report = node.role(timeout=2).get("sessions_file", {})
    assert report.get("state") == "current", report
    assert report.get("etcd_sha256") == digest, report


@pytest.fixture
def tiny_etcd() -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(extra_args=[f"--quota-backend-bytes={16 * MB}"]) as cluster:
        yield cluster


def test_nospace_is_reported_everywhere_and_clears_after_compact_defrag_disarm(
        tiny_etcd: LocalEtcdCluster, tiny_pair: Pair) -> None:
    """etcd filled until NOSPACE (junk written directly): the pair keeps its roles, and GetRole,
    /health (still 200), `status` and the vsm_sidecar_etcd_alarm gauge say NOSPACE on both
    nodes; after the operator's compact, defrag of each member and alarm disarm, the alarm
    clears everywhere and writes work again (a switchover, which writes, succeeds)."""
    pair = tiny_pair
    # The sidecar's own compaction is off: here the operator recovers, as the guide says.
    pair.start(ttl=2, extra_args=["--compaction-interval", "0"])
    primary, standby = pair.wait_split()
    epoch = primary.role()["epoch"]
    with tiny_etcd.client(timeout=10) as etcd:
        refused = _fill(etcd)
        assert "database space exceeded" in refused
        for node in (primary, standby):
            eventually(lambda n=node: _alarmed(n), timeout=15)  # type: ignore[misc]
        time.sleep(3)  # longer than the TTL: the lease is kept alive through the alarm
        assert client.role_name(primary.role()) == "PRIMARY"
        assert client.role_name(standby.role()) == "STANDBY"
        assert primary.role()["epoch"] == epoch
        for node in (primary, standby):
            code, body = http(node, "/health")
            assert code == 200
            assert "etcd_alarms: NOSPACE" in body, body
            assert alarm_gauge(node, "NOSPACE") == 1
            assert alarm_gauge(node, "CORRUPT") == 0
            shown = subprocess.run(
                [sys.executable, "-m", "sidecar", "status", "--grpc", node.address],
                capture_output=True, text=True, timeout=30, check=True).stdout
            assert "etcd alarms NOSPACE" in shown, shown
        # The operator's recovery (docs/OPERATIONS.md): compact, defragment, disarm.
        tiny_etcd.compact()
        for member in tiny_etcd.members:
            with member.client(timeout=30) as one:
                one.defragment()
        disarm(etcd, active_alarms(etcd))
        etcd.put(f"/{pair.cluster}-after", b"writes work")
    for node in (primary, standby):
        eventually(lambda n=node: _clear(n), timeout=15)  # type: ignore[misc]
    moved = client.switchover(primary.control_address, standby.node_id)
    assert moved[0] == standby.node_id


def _fill(etcd: Any) -> str:
    """Write 1 MiB values to one key until etcd refuses; return its refusal."""
    junk = os.urandom(MIB)
    for _ in range(100):
        try:
            etcd.put("/junk", junk)
        except Exception as exc:  # grpc's error type cannot be named
            details = getattr(exc, "details", None)
            return str(details() if callable(details) else exc)
    raise AssertionError("etcd never refused a write")


def _alarmed(node: LocalSidecar) -> None:
    assert node.role(timeout=2).get("etcd_alarms") == ["NOSPACE"]


def _clear(node: LocalSidecar) -> None:
    assert "etcd_alarms" not in node.role(timeout=2)
    assert "etcd_alarms" not in http(node, "/health")[1]
    assert alarm_gauge(node, "NOSPACE") == 0
