"""`vsm-sidecar release` after a sidecar died: real sidecar processes on a real etcd cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.lab.localnode import LocalSidecar

from ..sidecars import Pair

pytestmark = [pytest.mark.etcd]

TTL = 5


def release(node: LocalSidecar, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`vsm-sidecar release` with the settings ``node`` runs with."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "release", "--node-id", node.node_id,
         "--cluster", node.cluster, "--etcd-endpoints", node.endpoints, "--ttl", str(node.ttl),
         "--data-dir", str(data_dir or node.data_dir)],
        capture_output=True, text=True, timeout=30)


def recorded_lease(node: LocalSidecar) -> int:
    return int(json.loads((node.data_dir / "lease").read_text())["lease"])


def start_pair(pair: Pair) -> tuple[LocalSidecar, LocalSidecar, int]:
    a = pair.start_one("a", ttl=TTL)
    b = pair.start_one("b", ttl=TTL)
    primary, _ = pair.wait_split()
    assert primary is a
    return a, b, int(a.role()["epoch"])


def test_release_after_kill_hands_over_at_once(pair: Pair) -> None:
    """kill -9 of the primary, then release with its settings: exit 0, the recorded lease is
    revoked and the standby is PRIMARY at once rather than after the TTL."""
    a, b, _ = start_pair(pair)
    assert recorded_lease(a) > 0
    a.kill()
    killed = time.monotonic()
    done = release(a)
    assert done.returncode == 0, done.stderr
    assert "revoked lease" in done.stdout
    b.wait_role("PRIMARY", timeout=TTL)  # (the bound below is what counts)
    assert time.monotonic() - killed < TTL - 1, "took the TTL: the lease was not revoked"
    assert not (a.data_dir / "lease").exists()
    # Run again (systemd may run it after a release already did): nothing is left to do.
    again = release(a)
    assert again.returncode == 0, again.stderr
    assert "nothing to release" in again.stdout


def test_release_refuses_while_a_sidecar_runs(pair: Pair) -> None:
    """With the sidecar alive, release exits 1 saying why and changes nothing: the sidecar
    stays PRIMARY under the same epoch and its lease record stays."""
    a, b, epoch = start_pair(pair)
    lease = recorded_lease(a)
    done = release(a)
    assert done.returncode == 1
    assert "a sidecar is running" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    time.sleep(1.5)  # a revoked lease would show within this: a fenced, b PRIMARY
    primary, _ = pair.wait_split()
    assert primary is a
    assert int(a.role()["epoch"]) == epoch
    assert recorded_lease(a) == lease
    assert b.role()["role"] == "ROLE_STANDBY"


def test_a_clean_stop_leaves_nothing_to_release(pair: Pair) -> None:
    """The lease record is removed once a clean shutdown has revoked the lease; release then
    exits 0 with nothing to release."""
    a = pair.start_one("a", ttl=TTL)
    assert recorded_lease(a) > 0
    a.terminate()
    assert a.wait_exit() == 0
    assert not (a.data_dir / "lease").exists()
    done = release(a)
    assert done.returncode == 0, done.stderr
    assert "nothing to release" in done.stdout


def test_release_with_no_record_does_nothing(pair: Pair, tmp_path: Path) -> None:
    """A data directory with no lease record (the sidecar never got one): exit 0, nothing to
    release, and no etcd call is needed."""
    node = LocalSidecar("a", pair.cluster, "http://127.0.0.1:1", tmp_path)
    done = release(node, tmp_path / "never-used")
    assert done.returncode == 0, done.stderr
    assert "nothing to release" in done.stdout


def test_a_bad_setting_is_one_line_and_exit_2(pair: Pair, tmp_path: Path) -> None:
    """A bad setting: exit code 2 and one line naming it."""
    node = LocalSidecar("a", pair.cluster, pair.etcd.endpoints_arg, tmp_path, ttl=0)
    done = release(node)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "ttl" in done.stderr


def test_a_restart_after_a_crash_revokes_the_dead_process_lease(pair: Pair) -> None:
    """No release ran (a container restarted by its runtime, `--network host`): the new process
    finds its dead predecessor's lease recorded in data_dir (it holds the lock, so that process
    is gone) and revokes it at start-up, so a new primary (either node: both campaign then)
    serves at once, not after the TTL."""
    a, _b, epoch = start_pair(pair)
    dead_lease = recorded_lease(a)
    a.kill()
    killed = time.monotonic()
    a.start()
    primary, _ = pair.wait_split(timeout=TTL)
    assert time.monotonic() - killed < TTL - 1, "took the TTL: the dead lease was not revoked"
    assert int(primary.role()["epoch"]) > epoch
    assert "previous_lease_found" in a.log_tail(200)
    assert recorded_lease(a) != dead_lease  # the new process's own lease
