"""`vsm-sidecar release` in the network lab: after kill -9 of the primary's sidecar, release
(run in that host's namespace with the same settings, as the unit's ExecStopPost runs it)
removes the resource IP from the host's interface at once, and the standby takes over without
waiting for the dead process's lease; the client reaches it through the resource IP.

Same lab as ``test_vip_failover`` (the ``vip_pair`` fixture is reused), with a TTL of 5 s here:
long enough that a takeover through the lease's expiry, or one held by the #15247 guard
(2 s at TTL 5), cannot pass for one that release brought about.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from sidecar.lab.localnode import LocalSidecar

from ..builders import takeover_guard
from ..netns_lab import wait_for
from .test_vip_failover import VipPair, vip_pair

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

__all__ = ["vip_pair"]  # the fixture must live in this module's namespace to be used

TTL = 5
GUARD = takeover_guard(TTL)


def sidecar(pair: VipPair, host: str) -> LocalSidecar:
    node = LocalSidecar(host, "vip", pair.etcd.endpoints_arg, pair.workdir, ttl=TTL,
                        command_prefix=pair.lab.exec_prefix(host), unix_socket=True,
                        extra_args=["--vip", f"{pair.vip}/24", "--vip-interface", "eth0"])
    pair.nodes[host] = node
    return node.start()


def start_pair(pair: VipPair) -> tuple[LocalSidecar, LocalSidecar]:
    a = sidecar(pair, "a")
    a.wait_role("PRIMARY")
    b = sidecar(pair, "b")
    b.wait_role("STANDBY")
    wait_for(lambda: pair.ask() == "a", timeout=3)
    return a, b


def release(node: LocalSidecar) -> subprocess.CompletedProcess[str]:
    """`vsm-sidecar release` in the node's namespace with the settings it runs with."""
    return subprocess.run(node.command("release"), capture_output=True, text=True, timeout=30)


def test_release_after_kill9_removes_the_address_and_the_standby_takes_over(
        vip_pair: VipPair) -> None:
    """kill -9 leaves the resource IP on a's interface; release removes it before it exits,
    revokes the dead process's lease, and b takes over on the leader key's deletion: no
    #15247 wait (the holder is proved dead), no TTL. The client reaches b through the resource
    IP, without anyone flushing its ARP cache."""
    a, b = start_pair(vip_pair)
    a.kill()
    assert vip_pair.holds("a"), "kill -9 itself removed the address: nothing left to test"
    done = release(a)
    released = time.monotonic()
    assert done.returncode == 0, done.stderr
    assert f"removed {vip_pair.vip}/24" in done.stdout
    # Revoked, not found expired: the lease ended by release, long before its TTL (no time
    # bound from the kill: a loaded machine's interpreter start is not the release's doing).
    assert "revoked lease" in done.stdout
    assert not vip_pair.holds("a")
    wait_for(lambda: vip_pair.ask(timeout=0.2) == "b", timeout=TTL)
    reached = time.monotonic()
    # Had the release looked like a lost lease, b would have waited the #15247 guard from its
    # win (which comes before release exits, so the time alone cannot always tell).
    assert "takeover_delayed" not in b.log_tail(400), "the release looked involuntary"
    assert reached - released < GUARD
    assert b.role()["role"] == "ROLE_PRIMARY"
    assert vip_pair.holds("b")


def test_release_while_the_sidecar_runs_keeps_its_address_and_role(vip_pair: VipPair) -> None:
    """Release beside a live primary: exit 1 with one line, and nothing changes: a keeps the
    resource IP and its epoch, the client still reaches a, b stays STANDBY."""
    a, b = start_pair(vip_pair)
    epoch = a.role()["epoch"]
    done = release(a)
    assert done.returncode == 1
    assert "a sidecar is running" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert vip_pair.holds("a")
    time.sleep(1.0)  # a revoked lease or a removed address would show within this
    assert vip_pair.holds("a")
    assert vip_pair.ask() == "a"
    assert a.role()["epoch"] == epoch
    assert a.role()["role"] == "ROLE_PRIMARY"
    assert b.role()["role"] == "ROLE_STANDBY"
    assert not vip_pair.holds("b")
