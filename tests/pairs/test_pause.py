"""Maintenance mode (`vsm-sidecar pause`/`resume`) and `status --all`, on real sidecar
processes and a real etcd cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from sidecar import client
from sidecar.core.member import MEMBERS_REFRESH_SECONDS
from sidecar.lab.localnode import LocalSidecar
from sidecar.lab.netns import wait_for

from ..builders import takeover_guard
from ..sidecars import Pair
from .test_failback import DELAY, preferred_pair

pytestmark = [pytest.mark.etcd]

TTL = 2


def cli(pair: Pair, *args: str) -> subprocess.CompletedProcess[str]:
    """`vsm-sidecar ARGS` as an operator on a third host would run it: the cluster's etcd
    settings only, no sidecar of its own."""
    etcd = ["--cluster", pair.cluster, "--etcd-endpoints", pair.etcd.endpoints_arg,
            "--node-id", "operator"]
    with_etcd = args[0] in ("pause", "resume") or "--etcd" in args
    return subprocess.run([sys.executable, "-m", "sidecar", *args, *(etcd if with_etcd else [])],
                          capture_output=True, text=True, timeout=30)


def pause(pair: Pair, *args: str) -> str:
    result = cli(pair, "pause", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def resume(pair: Pair) -> str:
    result = cli(pair, "resume")
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_paused(node: LocalSidecar, paused: bool = True, timeout: float = 5.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        status = node.role()
        if ("pause" in status) == paused:
            return status
        assert time.monotonic() < deadline, f"{node.node_id}: pause={paused} not seen: {status}"
        time.sleep(0.05)


def _member_role(node: LocalSidecar, member: str) -> tuple[str, str] | None:
    """The role and epoch ``node`` reports for ``member`` in GetRole's members."""
    for row in node.role().get("members", []):
        if row["node_id"] == member:
            return row.get("role", ""), row.get("epoch", "0")
    return None


def http(node: LocalSidecar, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}{path}", timeout=5) as answer:
        return str(answer.read().decode())


def test_paused_a_dead_primary_is_not_replaced_until_resume(pair: Pair) -> None:
    """Paused, kill -9 of the primary: the standby stays STANDBY for 4 TTLs, saying so in
    GetRole, status, /health (200) and the paused gauge. Resumed, it takes over within
    TTL + 1 s plus the #15247 takeover guard."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    said = pause(pair, "--reason", "kernel update")
    assert f"cluster {pair.cluster} paused by " in said
    assert "kernel update" in said
    status = wait_paused(standby)
    assert status["pause"]["reason"] == "kernel update"  # type: ignore[index]
    assert "until" not in status["pause"]  # type: ignore[operator]
    recorder = pair.recorder(standby)
    killed = time.monotonic()
    primary.kill()
    time.sleep(4 * TTL)
    assert recorder.roles_since(killed).count("PRIMARY") == 0
    assert client.role_name(standby.role()) == "STANDBY"
    health = http(standby, "/health")
    assert health.startswith("STANDBY")
    assert "pause: paused by " in health
    assert "vsm_sidecar_paused 1.0" in http(standby, "/metrics")
    shown = subprocess.run([sys.executable, "-m", "sidecar", "status", "--grpc",
                            standby.address], capture_output=True, text=True, timeout=30)
    assert "PAUSED by " in shown.stdout
    assert "kernel update" in shown.stdout
    resumed = time.monotonic()
    assert f"cluster {pair.cluster} resumed (was paused by " in resume(pair)
    took = recorder.wait_role("PRIMARY", TTL + 1 + takeover_guard(TTL), after=resumed)
    print(f"takeover after resume: {took.at - resumed:.3f} s")
    assert "pause" not in standby.role()
    assert "vsm_sidecar_paused 0.0" in http(standby, "/metrics")
    assert "was not paused" in resume(pair)


def test_paused_an_operator_switchover_still_moves_the_role(pair: Pair) -> None:
    """Switchover works in maintenance mode, both ways, and nothing else moves."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    pause(pair)
    wait_paused(primary)
    wait_paused(standby)
    pair.wait_member_record(standby, role="ROLE_STANDBY", copy_current=True)
    new, _, _ = client.switchover(primary.control_address, standby.node_id)
    assert new == standby.node_id
    assert client.role_name(primary.role()) == "STANDBY"
    pair.wait_member_record(primary, role="ROLE_STANDBY", copy_current=True)
    new, _, _ = client.switchover(standby.control_address, primary.node_id)
    assert new == primary.node_id
    resume(pair)


def test_a_pause_for_a_while_ends_by_itself(pair: Pair) -> None:
    """`pause --for 3s`: the key lives on a 3 s etcd lease; the dead primary is not replaced
    while it lasts, and the standby takes over once it ended, with nobody resuming."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    recorder = pair.recorder(standby)
    paused = time.monotonic()
    assert " until " in pause(pair, "--for", "3s")
    status = wait_paused(standby)
    assert "until" in status["pause"]  # type: ignore[operator]
    primary.kill()
    took = recorder.wait_role("PRIMARY", 3 + TTL + 1 + takeover_guard(TTL) + 1, after=paused)
    print(f"takeover {took.at - paused:.3f} s after a 3 s pause")
    assert "pause" not in took.status  # it took over once the pause had ended, not during it
    assert took.at - paused >= 3.0


def test_paused_no_failback(pair: Pair) -> None:
    """The preferred primary restarted in maintenance mode stays STANDBY well past the
    failback delay; resumed, it takes the role back."""
    preferred_pair(pair)
    a, b = pair.nodes
    a.kill()
    b.wait_role("PRIMARY", timeout=6)
    pause(pair)
    wait_paused(b)
    a.start()
    wait_paused(a)
    a.wait_role("STANDBY")
    time.sleep(DELAY + 2)
    assert (client.role_name(a.role()), client.role_name(b.role())) == ("STANDBY", "PRIMARY")
    resume(pair)
    a.wait_role("PRIMARY", timeout=DELAY + 6)


def test_garbage_in_the_pause_key_is_logged_and_ignored(pair: Pair) -> None:
    """A pause key that is no pause record: logged as garbage, not paused, nobody crashes
    (a dead primary is replaced)."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    with pair.etcd.client() as etcd:
        etcd.put(f"/thinlinc-ha/{pair.cluster}/pause", b'{"v": 1, "since": "yesterday"}')
    time.sleep(1.0)
    assert "pause" not in standby.role()
    primary.kill()
    standby.wait_role("PRIMARY", timeout=TTL + 1 + takeover_guard(TTL) + 1)
    assert '"kind": "pause"' in standby.log_tail(400)
    assert "was paused" not in resume(pair)  # garbage is deleted all the same


def test_status_all_lists_every_member_and_the_pause(pair: Pair) -> None:
    """`status --all` on either node: both members, their roles, the epoch, applied revision
    and lag, the versions; the pause with its reason; `--json` the same as data."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    pair.wait_member_record(standby, role="ROLE_STANDBY", copy_current=True)
    pair.wait_member_record(primary, role="ROLE_PRIMARY")
    pause(pair, "--reason", "upgrade")
    wait_paused(standby)
    epoch = int(primary.role()["epoch"])
    # Each node reads the member records every MEMBERS_REFRESH_SECONDS: the standby's view
    # of the primary's record may still be the one from before it won.
    wait_for(lambda: _member_role(standby, primary.node_id) == ("ROLE_PRIMARY", str(epoch)),
             timeout=5 * MEMBERS_REFRESH_SECONDS)
    shown = cli(pair, "status", "--all", "--grpc", standby.address)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"cluster {pair.cluster} (as seen by {standby.node_id}): "
                               f"primary {primary.node_id}, epoch {epoch}")
    assert lines[1].startswith("paused: PAUSED by ")
    assert lines[1].endswith(": upgrade")
    table = {line.split()[0]: line.split() for line in lines[3:]}
    assert lines[2].split()[:3] == ["MEMBER", "ROLE", "EPOCH"]
    assert table[primary.node_id][1:3] == ["PRIMARY", str(epoch)]
    assert table[standby.node_id][1:3] == ["STANDBY", str(epoch)]
    data = json.loads(cli(pair, "status", "--all", "--json", "--grpc", primary.address).stdout)
    assert data["pause"]["reason"] == "upgrade"
    rows = {row["node_id"]: row for row in data["members"]}
    assert {rows[n]["role"] for n in rows} == {"PRIMARY", "STANDBY"}
    assert all(row["applied_revision"] > 0 and row["lag"] >= 0 for row in rows.values())
    assert all(row["resource_ip"] == "none" for row in rows.values())  # none configured
    resume(pair)


def test_status_from_etcd_needs_no_sidecar(pair: Pair) -> None:
    """`status --etcd` reads the leader, the member records and the pause from etcd with no
    sidecar of its own: the same cluster `status --all` shows through a sidecar, and still an
    answer once every sidecar is gone (no primary, no member)."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    pair.wait_member_record(standby, role="ROLE_STANDBY", copy_current=True)
    pair.wait_member_record(primary, role="ROLE_PRIMARY")
    pause(pair, "--reason", "kernel update")
    epoch = int(primary.role()["epoch"])
    shown = cli(pair, "status", "--etcd")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == (f"cluster {pair.cluster} (as seen by etcd): primary {primary.node_id}, "
                        f"epoch {epoch}; resource IP held by nobody (none configured)")
    assert lines[1].startswith("paused: PAUSED by ")
    assert lines[1].endswith(": kernel update")
    table = {line.split()[0]: line.split() for line in lines[3:]}
    assert table[primary.node_id][1:3] == ["PRIMARY", str(epoch)]
    assert table[standby.node_id][1:3] == ["STANDBY", str(epoch)]
    through = json.loads(cli(pair, "status", "--all", "--json", "--grpc",
                             primary.address).stdout)
    direct = json.loads(cli(pair, "status", "--etcd", "--json").stdout)
    assert {r["node_id"]: r["role"] for r in direct["members"]} == \
        {r["node_id"]: r["role"] for r in through["members"]}
    assert (direct["leader_id"], direct["epoch"]) == (through["leader_id"], through["epoch"])
    resume(pair)
    for node in pair.nodes:
        node.terminate()
        node.wait_exit()
    gone = json.loads(cli(pair, "status", "--etcd", "--json").stdout)
    assert (gone["leader_id"], gone["members"], gone["pause"]) == ("", [], None)
