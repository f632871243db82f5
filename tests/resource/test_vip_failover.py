"""The resource IP moves with the role: real hosts (network namespaces), real etcd, real ARP.

The lab uses a documentation /24 that the machine itself does not route (``free_subnet``), so
joining the test process to the bridge cannot leak onto the real network. Hosts a and b each
run a sidecar and a stand-in VSM service that answers with the host name on
TCP port 9000; the client asks through the resource IP. etcd runs on the test process's own leg
of the lab bridge (.254). Nobody flushes the client's neighbour cache: the successor's
gratuitous ARP must move it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar, RoleRecorder

from ..builders import takeover_guard
from ..netns_lab import NetnsLab, free_subnet, require_netns, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

PORT = 9000
TTL = 2
GUARD = takeover_guard(TTL)


class VipPair:
    def __init__(self, lab: NetnsLab, etcd: LocalEtcdCluster, workdir: Path) -> None:
        self.lab, self.etcd, self.workdir = lab, etcd, workdir
        self.vip = f"{lab.subnet}.50"
        self.nodes: dict[str, LocalSidecar] = {}
        self.recorders: list[RoleRecorder] = []
        self.cleanup: list[Callable[[], None]] = []

    def sidecar(self, host: str, start: bool = True) -> LocalSidecar:
        node = LocalSidecar(host, "vip", self.etcd.endpoints_arg, self.workdir, ttl=TTL,
                            command_prefix=self.lab.exec_prefix(host), unix_socket=True,
                            extra_args=["--vip", f"{self.vip}/24", "--vip-interface", "eth0"])
        self.nodes[host] = node
        return node.start() if start else node

    def recorder(self, host: str) -> RoleRecorder:
        recorder = RoleRecorder(self.nodes[host].address)
        recorder.wait_for(lambda o: True, timeout=5)
        self.recorders.append(recorder)
        return recorder

    def ask(self, timeout: float = 0.3) -> str | None:
        return self.lab.ask("client", self.vip, PORT, timeout=timeout)

    def holds(self, host: str) -> bool:
        return f"{self.vip}/24" in self.lab.addresses(host)

    def close(self) -> None:
        for recorder in self.recorders:
            recorder.close()
        for node in self.nodes.values():
            node.close()
        for action in self.cleanup:
            action()


@pytest.fixture
def vip_pair(tmp_path: Path) -> Iterator[VipPair]:
    require_netns()
    with NetnsLab(subnet=free_subnet()) as lab:
        root = lab.attach_root()
        for host in ("a", "b"):
            lab.serve_name(host, host, PORT)
        with LocalEtcdCluster(host=root) as etcd:
            pair = VipPair(lab, etcd, tmp_path)
            try:
                yield pair
            finally:
                pair.close()


def start_pair(pair: VipPair) -> None:
    pair.sidecar("a").wait_role("PRIMARY")
    pair.sidecar("b").wait_role("STANDBY")
    wait_for(lambda: pair.ask() == "a", timeout=3)


def test_client_reaches_the_primary_through_the_resource_ip(vip_pair: VipPair) -> None:
    """Only the primary holds the resource IP; the client gets the primary's name through it,
    and RoleStatus says the address is held and when it was announced."""
    start_pair(vip_pair)
    assert vip_pair.holds("a")
    assert not vip_pair.holds("b")
    status = vip_pair.nodes["a"].role()
    assert status["resource_ip_held"] is True
    assert status["resource_ips"] == [f"{vip_pair.vip}/24"]
    assert "last_announcement" in status
    assert "resource_ip_held" not in vip_pair.nodes["b"].role()  # False is omitted in JSON


def test_kill9_of_the_primary_moves_the_client_within_ttl_plus_one(vip_pair: VipPair) -> None:
    """kill -9 of the primary sidecar: the client gets b's name through the same resource IP
    within TTL + 1 s (plus the #15247 guard), without anyone flushing its ARP cache. (The dead
    sidecar's host keeps the address; the successor's gratuitous ARP wins the client.)"""
    start_pair(vip_pair)
    killed = time.monotonic()
    vip_pair.nodes["a"].kill()
    elapsed = wait_for(lambda: vip_pair.ask(timeout=0.2) == "b", timeout=TTL + 3)
    assert time.monotonic() - killed <= TTL + 1.0 + GUARD, elapsed


def test_host_death_moves_the_client_within_ttl_plus_one(vip_pair: VipPair) -> None:
    """Host death (a's link down): the client reaches b through the resource IP in TTL + 1 s
    (plus the #15247 guard)."""
    start_pair(vip_pair)
    cut = time.monotonic()
    vip_pair.lab.link_down("a")
    wait_for(lambda: vip_pair.ask(timeout=0.2) == "b", timeout=TTL + 3)
    assert time.monotonic() - cut <= TTL + 1.0 + GUARD


def test_sigterm_of_the_primary_moves_the_client_within_half_a_second(vip_pair: VipPair) -> None:
    """SIGTERM: a releases the address before revoking its lease; the client reaches b through
    the resource IP within 0.5 s, and a no longer holds it."""
    start_pair(vip_pair)
    sent = time.monotonic()
    vip_pair.nodes["a"].terminate()
    wait_for(lambda: vip_pair.ask(timeout=0.1) == "b", timeout=3)
    assert time.monotonic() - sent < 0.5
    assert vip_pair.nodes["a"].wait_exit(10) == 0
    assert not vip_pair.holds("a")


def test_stale_resource_ip_is_removed_at_start_up(vip_pair: VipPair) -> None:
    """A resource IP left on a host (a crash) is removed at start-up, before the node campaigns:
    the node that comes up as STANDBY does not hold it."""
    vip_pair.sidecar("a").wait_role("PRIMARY")
    vip_pair.lab.run("b", "ip", "addr", "add", f"{vip_pair.vip}/24", "dev", "eth0")
    assert vip_pair.holds("b")
    vip_pair.sidecar("b").wait_role("STANDBY")
    assert not vip_pair.holds("b")
    assert "vip_released" in vip_pair.nodes["b"].log_tail(200)


def test_resource_ip_removed_by_hand_on_the_primary_comes_back(vip_pair: VipPair) -> None:
    """Reconcile: removed by hand on the primary, the address is back within 1 s; added by hand
    on the standby, it is gone within 1 s."""
    start_pair(vip_pair)
    vip_pair.lab.run("a", "ip", "addr", "del", f"{vip_pair.vip}/24", "dev", "eth0")
    assert wait_for(lambda: vip_pair.holds("a"), timeout=1.0) <= 1.0
    vip_pair.lab.run("b", "ip", "addr", "add", f"{vip_pair.vip}/24", "dev", "eth0")
    assert wait_for(lambda: not vip_pair.holds("b"), timeout=1.0) <= 1.0


def test_vip_without_capabilities_exits_2_naming_the_setting(tmp_path: Path) -> None:
    """Without CAP_NET_ADMIN and CAP_NET_RAW, a configured resource IP stops start-up with
    exit code 2 and one line naming the setting."""
    require_netns()
    result = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin,-net_raw",
         "--", sys.executable, "-m", "sidecar", "run",
         "--vip", "198.51.100.50/24", "--vip-interface", "lo",
         "--data-dir", str(tmp_path / "d"), "--etcd-endpoints", "http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "setting 'vip'" in result.stderr.strip().splitlines()[-1]
    assert "CAP_NET" in result.stderr


def test_two_capabilities_are_enough_without_root(vip_pair: VipPair) -> None:
    """As user nobody with only CAP_NET_ADMIN and CAP_NET_RAW (ambient), a sidecar claims,
    announces and serves the resource IP: full root is not needed."""
    # pytest's own temporary folders are root's alone; nobody needs one it may enter.
    shared = Path(tempfile.mkdtemp(prefix="vsm-nobody-"))
    shared.chmod(0o777)
    vip_pair.cleanup.append(lambda: shutil.rmtree(shared, ignore_errors=True))
    caps = "+net_admin,+net_raw"
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}", "--"]
    node = LocalSidecar("a", "vip", vip_pair.etcd.endpoints_arg, shared, ttl=TTL,
                        command_prefix=[*vip_pair.lab.exec_prefix("a"), *drop],
                        unix_socket=True,
                        extra_args=["--vip", f"{vip_pair.vip}/24", "--vip-interface", "eth0"])
    vip_pair.nodes["a"] = node
    node.start().wait_role("PRIMARY")
    assert wait_for(lambda: vip_pair.ask() == "a", timeout=3) < 3
    assert vip_pair.holds("a")
    status = Path(f"/proc/{node.pid}/status").read_text()
    assert "Uid:\t65534" in status


def test_a_hanging_role_hook_does_not_delay_the_release(vip_pair: VipPair,
                                                        tmp_path: Path) -> None:
    """A role hook that hangs (60 s) on every change: SIGTERM of the primary still moves the
    client to b through the resource IP within 0.5 s; the hook never sits on the safety path."""
    hook = tmp_path / "hang.sh"
    hook.write_text("#!/bin/sh\nsleep 60\n")
    hook.chmod(0o755)
    node = LocalSidecar("a", "vip", vip_pair.etcd.endpoints_arg, vip_pair.workdir, ttl=TTL,
                        command_prefix=vip_pair.lab.exec_prefix("a"), unix_socket=True,
                        extra_args=["--vip", f"{vip_pair.vip}/24", "--vip-interface", "eth0",
                                    "--on-role-change", str(hook), "--hook-timeout", "120"])
    vip_pair.nodes["a"] = node
    node.start().wait_role("PRIMARY")
    vip_pair.sidecar("b").wait_role("STANDBY")
    wait_for(lambda: vip_pair.ask() == "a", timeout=3)
    sent = time.monotonic()
    node.terminate()
    wait_for(lambda: vip_pair.ask(timeout=0.1) == "b", timeout=3)
    assert time.monotonic() - sent < 0.5
    assert not vip_pair.holds("a")
