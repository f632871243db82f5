"""The file adapter end to end: a stock VSM server's session file follows the primary."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.atomicfile import atomic_write
from sidecar.etcd.client import Etcd
from sidecar.etcd.keys import Keys
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar
from sidecar.vsmfile.adapter import DEFAULT_CHUNK_SIZE
from sidecar.vsmfile.etcdcopy import EtcdCopy

from .. import builders
from ..netns_lab import wait_for
from ..sidecars import Pair, eventually, make_pair

pytestmark = [pytest.mark.etcd]

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# In on-primary mode the sidecar runs these on promotion and demotion; "true" stands in for
# systemctl here (the stand-in VSM server tests run a real one).
ON_PRIMARY = ["--vsm-server-mode", "on-primary", "--vsm-server-start", "true",
              "--vsm-server-stop", "true"]


def files(pair: Pair) -> dict[str, Path]:
    paths = {}
    for node_id in ("a", "b"):
        folder = pair.workdir / f"vsm-{node_id}"
        folder.mkdir(exist_ok=True)
        paths[node_id] = folder / "sessions"
    return paths


def start(pair: Pair, paths: dict[str, Path], mode: Sequence[str] = ON_PRIMARY) -> None:
    for node_id in ("a", "b"):
        pair.start_one(node_id, ttl=2, extra_args=[
            "--vsm-sessions-file", str(paths[node_id]), "--vsm-file-check-interval", "0.5",
            *mode])


def content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def test_primary_file_reaches_the_standby_and_flows_back_after_failover(pair: Pair) -> None:
    """A change of the file on the primary appears on the standby's disk (same bytes, written
    atomically with the old file's mode); after kill -9 of the primary the new primary's
    changes reach the restarted old primary."""
    paths = files(pair)
    paths["b"].write_bytes(b"old standby content")
    os.chmod(paths["b"], 0o640)
    start(pair, paths)
    primary, standby = pair.wait_split()
    assert primary.node_id == "a"
    first = b"session database v1\n" * 100
    atomic_write(paths["a"], first)
    wait_for(lambda: content(paths["b"]) == first, timeout=5)
    assert paths["b"].stat().st_mode & 0o777 == 0o640
    primary.kill()
    standby.wait_role("PRIMARY", timeout=6)
    second = b"written by the VSM server on b\n" * 50
    paths["b"].write_bytes(second)  # in place, as a plain write would
    primary.start()
    primary.wait_role("STANDBY")
    wait_for(lambda: content(paths["a"]) == second, timeout=5)


def test_promotion_makes_the_file_current_before_the_role_is_primary(pair: Pair) -> None:
    """Rule 5 for the file: when the standby becomes PRIMARY its file already holds etcd's
    copy, even if its disk had something else (written while its watch was not looking)."""
    paths = files(pair)
    start(pair, paths)
    primary, standby = pair.wait_split()
    data = b"x" * 1_200_000  # three 512 KiB chunks in one transaction
    atomic_write(paths[primary.node_id], data)
    wait_for(lambda: content(paths[standby.node_id]) == data, timeout=5)
    standby.stop()  # paused: it cannot notice the next change
    paths[standby.node_id].write_bytes(b"stale local content")
    standby.cont()
    recorder = pair.recorder(standby)
    sent = time.monotonic()
    primary.terminate()
    recorder.wait_role("PRIMARY", timeout=5, after=sent)
    assert content(paths[standby.node_id]) == data


# -- large files, bounded transactions, and the never-silent copy --------------------------------




def stored(etcd_client: Any, pair: Pair) -> dict[str, Any]:
    """The keys under vsmfile/ (relative), with their metadata."""
    root = f"/thinlinc-ha/{pair.cluster}/vsmfile/"
    return {meta.key.decode()[len(root):]: meta
            for _, meta in etcd_client.get_prefix(root, keys_only=True)}


def manifest(etcd_client: Any, pair: Pair) -> dict[str, Any]:
    value, _ = etcd_client.get(f"/thinlinc-ha/{pair.cluster}/vsmfile/manifest")
    assert value is not None
    doc: dict[str, Any] = json.loads(value)
    return doc


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sessions_file(node: LocalSidecar) -> dict[str, Any]:
    report: dict[str, Any] = node.role(timeout=2).get("sessions_file", {})
    return report


def http(node: LocalSidecar, path: str) -> str:
    with OPENER.open(f"http://127.0.0.1:{node.http_port}{path}", timeout=5) as answer:
        text: str = answer.read().decode()
        return text


def metric(node: LocalSidecar, name: str) -> float:
    for family in text_string_to_metric_families(http(node, "/metrics")):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


@pytest.mark.parametrize("mib", [3, 20])
def test_large_file_mirrors_with_stock_etcd_limits(pair: Pair, etcd_client: Any,
                                                   mib: int) -> None:
    """A file far over etcd's default 1.5 MiB request limit reaches the standby byte for byte:
    its chunks went in several transactions, all before the manifest (the commit point). A
    change of one chunk's worth stores one new chunk and deletes the one it replaced."""
    paths = files(pair)
    start(pair, paths)
    primary, standby = pair.wait_split()
    data = bytearray(random.Random(mib).randbytes(mib * 1024 * 1024))
    atomic_write(paths[primary.node_id], bytes(data))
    wait_for(lambda: content(paths[standby.node_id]) == data, timeout=60, interval=0.1)
    keys = stored(etcd_client, pair)
    doc = manifest(etcd_client, pair)
    assert doc["sha256"] == sha(data)
    assert sorted(keys) == sorted(["manifest", *(f"chunk/{c}" for c in set(doc["chunks"]))])
    chunk_revisions = {keys[f"chunk/{c}"].mod_revision for c in doc["chunks"]}
    assert max(chunk_revisions) < keys["manifest"].mod_revision
    # 2 chunks of 512 KiB per transaction: one transaction could never have carried them.
    assert len(chunk_revisions) == -(-len(doc["chunks"]) // 2)
    middle = len(data) // 2
    data[middle : middle + 10] = b"0123456789"
    atomic_write(paths[primary.node_id], bytes(data))
    wait_for(lambda: content(paths[standby.node_id]) == data, timeout=60, interval=0.1)
    after = stored(etcd_client, pair)
    new_doc = manifest(etcd_client, pair)
    changed = [i for i, (a, b) in enumerate(zip(doc["chunks"], new_doc["chunks"], strict=True))
               if a != b]
    assert changed == [middle // DEFAULT_CHUNK_SIZE]
    assert sorted(after) == sorted(["manifest", *(f"chunk/{c}" for c in set(new_doc["chunks"]))])
    unchanged = doc["chunks"][0]
    assert after[f"chunk/{unchanged}"].mod_revision == keys[f"chunk/{unchanged}"].mod_revision


def test_orphaned_chunks_are_deleted_by_the_next_upload(pair: Pair, etcd_client: Any) -> None:
    """Chunks no manifest names (an upload interrupted before its manifest, the old format's
    generation keys) are removed once the next upload has committed."""
    paths = files(pair)
    start(pair, paths)
    primary, _ = pair.wait_split()
    root = f"/thinlinc-ha/{pair.cluster}/vsmfile/"
    orphan = sha(b"never committed")
    etcd_client.put(f"{root}chunk/{orphan}", b"never committed")
    etcd_client.put(f"{root}chunk/0123abcd/000000", b"the old format")
    atomic_write(paths[primary.node_id], b"v1" * 1000)
    wait_for(lambda: sorted(stored(etcd_client, pair)) == [
        f"chunk/{sha(b'v1' * 1000)}", "manifest"], timeout=10, interval=0.1)


def test_replicated_mode_never_writes_the_live_file(pair: Pair, etcd_client: Any) -> None:
    """replicated (the default): the standby knows which version etcd holds but leaves its own
    file, which ThinLinc's HA sync writes, alone; after a failover the new primary uploads its
    own file, untouched."""
    paths = files(pair)
    own = b"written by b's own VSM server\n"
    paths["b"].write_bytes(own)
    start(pair, paths, mode=[])
    primary, standby = pair.wait_split()
    assert primary.node_id == "a"
    data = b"written by a's VSM server\n" * 100
    atomic_write(paths["a"], data)
    eventually(lambda: _check(sessions_file(standby), state="following",
                              etcd_sha256=sha(data), local_sha256=sha(own)))
    assert paths["b"].read_bytes() == own
    primary.kill()
    standby.wait_role("PRIMARY", timeout=10)
    eventually(lambda: _check(sessions_file(standby), state="current", etcd_sha256=sha(own)))
    assert paths["b"].read_bytes() == own
    assert manifest(etcd_client, pair)["sha256"] == sha(own)
    assert "vsm_file_gate" in standby.log_tail(200)


def _check(report: dict[str, Any], **expected: object) -> None:
    assert {k: report.get(k) for k in expected} == expected


@pytest.fixture
def small_request_etcd() -> Iterator[LocalEtcdCluster]:
    """An etcd that refuses requests over 300 kB: no 512 KiB chunk can be stored."""
    with LocalEtcdCluster(extra_args=["--max-request-bytes=300000"]) as cluster:
        yield cluster


def test_a_file_that_cannot_be_mirrored_is_reported_behind(
        small_request_etcd: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """When etcd refuses the upload, the primary says so on GetRole, /health and /metrics:
    the copy is behind, since when, and why; the standby says which version it follows. Once
    an upload succeeds again, the copy is current."""
    pair = next(make_pair(small_request_etcd, cluster_name, tmp_path, request))
    try:
        paths = files(pair)
        start(pair, paths, mode=[])
        primary, standby = pair.wait_split()
        small = b"a small file\n"
        atomic_write(paths[primary.node_id], small)
        eventually(lambda: _check(sessions_file(primary), state="current",
                                  etcd_sha256=sha(small)))
        before = time.time()
        atomic_write(paths[primary.node_id], os.urandom(DEFAULT_CHUNK_SIZE + 1))
        report = eventually(lambda: _behind(sessions_file(primary)))
        assert report["etcd_sha256"] == sha(small)
        assert "too large" in report["error"]
        since = report["behind_since"]
        stamp = datetime.strptime(since[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        assert before - 1 <= stamp.timestamp() <= time.time() + 1
        assert re.search(r"^sessions_file: behind since \S+Z: etcd holds " + sha(small)[:12],
                         http(primary, "/health"), re.MULTILINE)
        eventually(lambda: _positive(metric(primary, "vsm_sidecar_sessions_file_behind_seconds")))
        assert metric(primary, "vsm_sidecar_sessions_file_upload_failures_total") >= 1
        _check(sessions_file(standby), state="following", etcd_sha256=sha(small))
        host = eventually(lambda: _check_host_fails(pair, primary, paths[primary.node_id]))
        assert f"behind since {report['behind_since'][:19]}" in host
        again = b"small again\n"
        atomic_write(paths[primary.node_id], again)
        eventually(lambda: _check(sessions_file(primary), state="current",
                                  etcd_sha256=sha(again), error=None))
        assert metric(primary, "vsm_sidecar_sessions_file_behind_seconds") == 0
    finally:
        pair.close()


def _behind(report: dict[str, Any]) -> dict[str, Any]:
    assert report.get("state") == "behind", report
    return report


def _positive(value: float) -> None:
    assert value > 0


# -- on-primary: a VSM server that will not start -----------------------------------------------


@pytest.mark.parametrize(("command", "error"), [
    ("sh -c 'echo vsmserver.service not found >&2; exit 5'",
     "exit code 5: vsmserver.service not found"),
    ("sleep 30", "no answer within 1 s (killed)"),
], ids=["fails", "times out"])
def test_a_vsm_server_that_will_not_start_is_reported_and_handed_over(
        pair: Pair, command: str, error: str) -> None:
    """on-primary: b's start command fails (or hangs past the timeout) when b takes over. b
    says so on GetRole, /health and /metrics and keeps the role while no standby could do
    better; once a is back as a healthy standby, b hands over to it, and a serves."""
    args = ["--vsm-server-mode", "on-primary", "--vsm-server-stop", "true",
            "--vsm-server-timeout", "1"]
    a = pair.start_one("a", ttl=2, extra_args=[*args, "--vsm-server-start", "true"])
    b = pair.start_one("b", ttl=2, extra_args=[*args, "--vsm-server-start", command])
    pair.wait_split()
    a.kill()
    b.wait_role("PRIMARY", timeout=10)
    server = eventually(lambda: _failed_start(b.role()))
    assert server["error"] == error
    assert int(server["start_failures"]) >= 1
    assert re.search(r"^vsm_server: start failed since \S+Z: " + re.escape(error),
                     http(b, "/health"), re.MULTILINE)
    assert metric(b, "vsm_sidecar_vsm_server_start_failures_total") >= 1
    assert b.role()["role"] == "ROLE_PRIMARY"  # nobody to hand over to
    a.start()
    a.wait_role("PRIMARY", timeout=20)
    eventually(lambda: _check(a.role()["vsm_server"], state="running"))
    assert "primary unhealthy" in b.log_tail(400)


def _failed_start(status: dict[str, Any]) -> dict[str, Any]:
    server: dict[str, Any] = status["vsm_server"]
    assert server["state"] == "start failed", server
    return server


def _check_host_fails(pair: Pair, node: LocalSidecar, path: Path) -> str:
    """check-host on the node's settings: exit 1 and the FAIL line for the copy."""
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-host", "--node-id", node.node_id,
         "--cluster", pair.cluster, "--etcd-endpoints", pair.etcd.endpoints_arg,
         "--vsm-sessions-file", str(path), "--data-dir", str(pair.workdir)],
        capture_output=True, text=True, timeout=60)
    line = next((x for x in result.stdout.splitlines() if "sessions file is behind" in x), "")
    assert result.returncode == 1
    assert line.startswith("FAIL the etcd copy of the sessions file is behind since"), \
        result.stdout
    return line


def test_on_primary_never_takes_over_with_a_file_it_could_not_write(pair: Pair) -> None:
    """on-primary, rule 5: b's VSM server will not stop, so b must not write its sessions file
    and says why; when a dies, b wins elections but never becomes PRIMARY (its VSM server would
    serve an old file), until the file can be written."""
    paths = files(pair)
    a = pair.start_one("a", ttl=2, extra_args=[
        "--vsm-sessions-file", str(paths["a"]), "--vsm-file-check-interval", "0.3", *ON_PRIMARY])
    b = pair.start_one("b", ttl=2, extra_args=[
        "--vsm-sessions-file", str(paths["b"]), "--vsm-file-check-interval", "0.3",
        "--vsm-server-mode", "on-primary", "--vsm-server-start", "true",
        "--vsm-server-stop", "false"])
    pair.wait_split()
    atomic_write(paths["a"], b"sessions only a has\n")
    eventually(lambda: _check(sessions_file(b), etcd_sha256=sha(b"sessions only a has\n")))
    report = sessions_file(b)
    assert report["error"].startswith("file not written: the local VSM server is stop")
    a.kill()
    deadline = time.monotonic() + 8  # four TTLs: b wins elections meanwhile
    while time.monotonic() < deadline:
        assert b.role(timeout=2)["role"] != "ROLE_PRIMARY"
        time.sleep(0.1)
    assert content(paths["b"]) is None
    assert "vsm_file_not_written" in b.log_tail(300)


@pytest.mark.etcd
def test_a_format_1_copy_of_the_previous_release_is_read(etcd_cluster: LocalEtcdCluster,
                                                         cluster_name: str) -> None:
    """During a rolling upgrade a primary of the previous release still writes format 1
    (chunks under chunk/<generation>/<index>, a manifest that counts them): this release reads
    that copy whole, verified by the file's SHA-256, so an upgraded standby's copy stays
    current and its promotion gate can pass."""
    data = random.Random(7).randbytes(1_300_000)
    chunk_size, generation = 524288, "0123456789abcdef0123456789abcdef"
    root = f"/thinlinc-ha/{cluster_name}/vsmfile/"
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    with etcd_cluster.client() as etcd_client:
        for index, piece in enumerate(pieces):
            etcd_client.put(f"{root}chunk/{generation}/{index:06d}", piece)
        etcd_client.put(f"{root}manifest", json.dumps({
            "v": 1, "generation": generation, "size": len(data), "sha256": sha(data),
            "chunks": len(pieces), "chunk_size": chunk_size}, separators=(",", ":")))
    settings = builders.settings(cluster=cluster_name, etcd=etcd_cluster)

    async def read() -> bytes | None:
        etcd = Etcd(settings)
        try:
            copy = await EtcdCopy(etcd, Keys(settings.prefix)).fetch()
        finally:
            etcd.close()
        return None if copy is None else copy.data

    assert asyncio.run(read()) == data
