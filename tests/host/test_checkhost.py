"""`vsm-sidecar check-host` (one test per check) and `vsm-sidecar restore-sessions-file`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.atomicfile import atomic_write
from sidecar.etcd.client import Etcd
from sidecar.etcd.versions import write_loss
from sidecar.host import checkhost, hiveconf
from sidecar.host.checkhost import FAIL, OK, WARN, Check
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.netns import wait_for

from ..builders import settings
from ..sidecars import Pair

FIXTURES = Path(__file__).parent.parent / "fixtures" / "hiveconf"
VIP = "192.0.2.50"
NAMES = {"tl.example.com": {VIP}, "tl-a.example.com": {"198.51.100.1"},
         "tl-b.example.com": {"198.51.100.2"}, "elsewhere.example.com": {"203.0.113.9"}}


def hive(**changes: str) -> hiveconf.Hive:
    """The fixture files with parameters replaced (path -> value)."""
    parsed = hiveconf.read_dir(FIXTURES)
    for path, value in changes.items():
        parsed.values[path] = hiveconf.Value(value, "test")
    return parsed


def hive_checks(mode: str = "replicated", local: set[str] | None = None,
                vip: tuple[str, ...] = (f"{VIP}/24",), **changes: str) -> list[Check]:
    s = settings(vsm_server_mode=mode, vip=list(vip), vip_interface="lo") if vip else \
        settings(vsm_server_mode=mode)
    return checkhost.check_hiveconf(
        s, hive(**changes), local if local is not None else {"tl-a", "tl-a.example.com"},
        lambda address: address == "198.51.100.1", lambda name: NAMES.get(name, set()))


def by_status(checks: list[Check]) -> list[str]:
    return [c.status for c in checks]


# -- hiveconf ------------------------------------------------------------------------------------


def test_replicated_pair_configured_as_thinlinc_documents_passes() -> None:
    """HA sync on, two nodes including this host, the agents' master on the resource IP."""
    checks = hive_checks()
    assert by_status(checks) == [OK, OK, OK], checks
    assert "this host is tl-a.example.com" in checks[1].what


def test_replicated_mode_with_ha_sync_off_fails_with_the_tl_config_fix() -> None:
    """replicated needs /vsmserver/HA/enabled = 1; the fix is the tl-config command."""
    check = hive_checks(**{"/vsmserver/HA/enabled": "0"})[0]
    assert check.status == FAIL
    assert check.fix == "tl-config /vsmserver/HA/enabled=1 on both nodes"


@pytest.mark.parametrize("nodes", ["tl-a.example.com", "", "a b c"])
def test_ha_nodes_must_be_two_names(nodes: str) -> None:
    """One, none or three names in /vsmserver/HA/nodes: FAIL."""
    check = hive_checks(**{"/vsmserver/HA/nodes": nodes})[1]
    assert check.status == FAIL
    assert "not two" in check.what


def test_ha_nodes_must_name_this_host() -> None:
    """Two names, neither this host's name nor resolving to one of its addresses: FAIL."""
    checks = hive_checks(local={"tl-c"}, **{"/vsmserver/HA/nodes":
                                            "elsewhere.example.com tl-b.example.com"})
    assert checks[1].status == FAIL
    assert "does not name this host" in checks[1].what


def test_this_host_is_found_by_a_name_resolving_to_a_local_address() -> None:
    """A node name that is not this host's name but resolves to a local address counts."""
    checks = hive_checks(local={"some-other-hostname"})
    assert checks[1].status == OK


def test_on_primary_mode_needs_ha_sync_off() -> None:
    """on-primary with ThinLinc's HA sync on: FAIL (two writers of the sessions file); off:
    OK."""
    on = hive_checks("on-primary")[0]
    assert on.status == FAIL
    assert on.fix == "tl-config /vsmserver/HA/enabled=0 on both nodes"
    assert hive_checks("on-primary", **{"/vsmserver/HA/enabled": "0"})[0].status == OK


def test_master_hostname_must_resolve_to_the_resource_ip() -> None:
    """/vsmagent/master_hostname resolving elsewhere, or empty: FAIL; without a configured
    resource IP there is nothing to compare with: WARN."""
    elsewhere = hive_checks(**{"/vsmagent/master_hostname": "elsewhere.example.com"})[-1]
    assert elsewhere.status == FAIL
    assert "203.0.113.9" in elsewhere.what
    assert hive_checks(**{"/vsmagent/master_hostname": ""})[-1].status == FAIL
    assert hive_checks(vip=())[-1].status == WARN


def test_a_host_without_an_agent_skips_the_master_check(tmp_path: Path) -> None:
    """Where vsmagent is not configured, its master is not checked."""
    shutil.copy(FIXTURES / "vsmserver.hconf", tmp_path)
    s = settings(vip=[f"{VIP}/24"], vip_interface="lo")
    checks = checkhost.check_hiveconf(s, hiveconf.read_dir(tmp_path), {"tl-a"},
                                      lambda a: False, lambda n: set())
    assert checks[-1] == Check(OK, "no VSM agent configured on this host")


def test_an_unreadable_ha_flag_fails_naming_its_line() -> None:
    """enabled = maybe: FAIL naming where it is."""
    check = hive_checks(**{"/vsmserver/HA/enabled": "maybe"})[0]
    assert check.status == FAIL
    assert "(test)" in check.what


# -- etcd ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "status", "upgrade"), [
    ("3.5.12", WARN, "3.5.13"), ("3.5.13", OK, None), ("3.5.21", OK, None),
    ("3.4.30", WARN, "3.4.31"), ("3.4.31", OK, None), ("3.6.0", OK, None),
    ("3.3.27", WARN, "3.5.13"), ("3.5.6", WARN, "3.5.13"), ("3.4.22", WARN, "3.4.31"),
    ("3.4.23", WARN, "3.4.31"), ("x.y", WARN, None), ("3.5", WARN, None),
    ("3.5.0-alpha.0", FAIL, "3.5.13"), ("3.5.1", FAIL, "3.5.13"), ("3.5.5", FAIL, "3.5.13"),
    ("3.4.20", FAIL, "3.4.31"), ("3.4.21", FAIL, "3.4.31"),
])
def test_etcd_versions_without_the_15247_fix_warn_naming_the_upgrade(
        version: str, status: str, upgrade: str | None) -> None:
    """Before 3.5.13 on 3.5 and before 3.4.31 on 3.4 (and anything older): WARN, naming the
    release to upgrade to; FAIL instead for the releases etcd's advisories say can lose
    committed writes (3.5.0-3.5.5, 3.4.20-3.4.21)."""
    check = checkhost.version_check(version)
    assert check.status == status
    if upgrade is not None:
        assert upgrade in check.fix
    if status == FAIL:
        assert "can lose writes it acknowledged" in check.what


@pytest.mark.parametrize(("version", "issues"), [
    ("3.5.1", ["etcd-io/etcd#13766", "etcd-io/etcd#14685"]), ("3.5.3", ["etcd-io/etcd#14685"]),
    ("3.5.5", ["etcd-io/etcd#14685", "November 2022"]), ("3.4.21", ["November 2022"]),
    ("3.5.6", []), ("3.4.19", []), ("3.4.22", []), ("3.6.0", []), ("junk", []),
])
def test_each_release_that_can_lose_writes_names_why(version: str, issues: list[str]) -> None:
    """Every advisory whose range holds the release is named; none for the others."""
    loss = write_loss(version)
    if not issues:
        assert loss is None
        return
    assert loss is not None
    assert [issue for issue in issues if issue in loss] == issues
    assert loss.count(";") == len(issues) - 1


@pytest.mark.etcd
def test_etcd_checks_against_a_real_cluster(etcd_cluster: LocalEtcdCluster) -> None:
    """The test cluster answers, has 3 members, a version, and a clock within a second or so
    of ours, which is shown and said not to matter."""
    s = settings(etcd_endpoints=etcd_cluster.endpoints_arg)
    etcd = Etcd(s, timeout=3.0, workers=1)
    try:
        checks = checkhost.check_etcd(s, etcd)
    finally:
        etcd.close()
    assert by_status(checks)[:2] == [OK, OK]
    assert checks[1].what == "etcd has 3 members"
    # The test cluster's etcd (3.5.1) lacks the #15247 fix: the check says so.
    version = checks[2].what.removeprefix("etcd version ").removeprefix("etcd ").split()[0]
    assert checks[2] == checkhost.version_check(version)
    assert version.startswith("3.")
    assert "clocks do not matter for safety" in checks[3].what
    offset = float(checks[3].what.split("clock is ")[1].split(" s")[0])
    assert abs(offset) <= 2


@pytest.mark.etcd
def test_a_single_etcd_member_fails() -> None:
    """One member is no majority that survives a host: FAIL, add the witness."""
    with LocalEtcdCluster(size=1) as single:
        s = settings(etcd_endpoints=single.endpoints_arg)
        etcd = Etcd(s, timeout=3.0, workers=1)
        try:
            checks = checkhost.check_etcd(s, etcd)
        finally:
            etcd.close()
    assert checks[1].status == FAIL
    assert "1 member(s)" in checks[1].what


def test_unreachable_etcd_fails_with_what_to_check() -> None:
    """Nothing listening at the endpoint: one FAIL naming the endpoint and what to check."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    s = settings(etcd_endpoints=f"http://127.0.0.1:{port}")
    etcd = Etcd(s, timeout=0.5, workers=1)
    try:
        checks = checkhost.check_etcd(s, etcd)
    finally:
        etcd.close()
    assert by_status(checks) == [FAIL]
    assert f"127.0.0.1:{port}" in checks[0].what
    assert "firewall" in checks[0].fix


# -- this host -----------------------------------------------------------------------------------


def test_missing_capabilities_and_interface_fail(tmp_path: Path) -> None:
    """With a resource IP: without CAP_NET_ADMIN/CAP_NET_RAW, FAIL naming both; an interface
    that does not exist, FAIL; with both capabilities and lo, OK."""
    s = settings(vip=[f"{VIP}/24"], vip_interface="nope0", data_dir=str(tmp_path))
    checks = checkhost.check_this_host(s, capabilities=0)
    assert checks[0].status == FAIL
    assert "CAP_NET_ADMIN and CAP_NET_RAW" in checks[0].what
    assert checks[1].status == FAIL
    good = settings(vip=[f"{VIP}/24"], vip_interface="lo", data_dir=str(tmp_path))
    both = (1 << checkhost.CAP_NET_ADMIN) | (1 << checkhost.CAP_NET_RAW)
    assert by_status(checkhost.check_this_host(good, capabilities=both)) == [OK, OK, OK]


def test_on_primary_commands_must_exist(tmp_path: Path) -> None:
    """on-primary: a start or stop command that is not found: FAIL; the sessions file's
    folder and the data folder writable: OK."""
    s = settings(vsm_server_mode="on-primary", data_dir=str(tmp_path / "data"),
                 vsm_sessions_file=str(tmp_path / "sessions"),
                 vsm_server_start="/nonexistent/vsmctl start", vsm_server_stop="true")
    checks = checkhost.check_this_host(s)
    assert [(c.status, c.what.split(" ")[0]) for c in checks] == [
        (OK, "data_dir"), (OK, "vsm_sessions_file's"), (FAIL, "vsm_server_start:"),
        (OK, "vsm_server_stop:")]


def run_cli(*args: str, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(user or []), sys.executable, "-m", "sidecar", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder user nobody may enter (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="vsm-checkhost-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_folders_the_sidecars_user_cannot_write_fail(shared_dir: Path) -> None:
    """Run as user nobody (as an admin runs it as the sidecar's user): the data folder and,
    in on-primary mode, the sessions file's folder, owned by root: FAIL, naming the user."""
    data = shared_dir / "data"
    data.mkdir(mode=0o755)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    result = run_cli("check-host", "--node-id", "a", "--data-dir", str(data),
                     "--vsm-server-mode", "on-primary", "--vsm-server-start", "true",
                     "--vsm-server-stop", "true", "--vsm-sessions-file",
                     str(data / "sessions"), "--etcd-endpoints", "http://127.0.0.1:1",
                     "--thinlinc-conf-dir", str(FIXTURES), "--json", user=nobody)
    assert result.returncode == 1, result.stderr
    checks = json.loads(result.stdout)["checks"]
    failed = [c["what"] for c in checks if c["status"] == FAIL]
    assert f"data_dir {data} is not writable by nobody" in failed
    assert f"vsm_sessions_file's folder {data} is not writable by nobody" in failed


# -- the whole command ---------------------------------------------------------------------------


@pytest.fixture
def passing_etcd(crash_safe_etcd_binary: Path) -> Iterator[LocalEtcdCluster]:
    """A cluster of an etcd release that no check fails on (Debian's 3.4.23: a WARN, for
    etcd-io/etcd#15247). The bundled 3.5.1 fails the version check: it can lose writes."""
    with LocalEtcdCluster(binary=crash_safe_etcd_binary) as cluster:
        yield cluster


@pytest.mark.etcd
def test_check_host_exits_0_when_nothing_fails_and_1_otherwise(
        passing_etcd: LocalEtcdCluster, tmp_path: Path) -> None:
    """A host configured for replicated mode exits 0 with one line per check; the same host
    checked for on-primary mode (ThinLinc's sync still on) exits 1; --json says the same."""
    etcd_cluster = passing_etcd
    conf = tmp_path / "conf.d"
    shutil.copytree(FIXTURES, conf)
    server = conf / "vsmserver.hconf"
    server.write_text(server.read_text().replace(
        "nodes=tl-a.example.com", f"nodes={os.uname().nodename}"))
    common = ["--node-id", "a", "--cluster", "checkhost", "--etcd-endpoints",
              etcd_cluster.endpoints_arg, "--thinlinc-conf-dir", str(conf),
              "--data-dir", str(tmp_path / "data")]
    ok = run_cli("check-host", *common)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert all(line.split()[0] in (OK, WARN) for line in lines), lines
    assert any("ThinLinc HA sync is on" in line for line in lines)
    assert any("no sessions file is mirrored" in line for line in lines)
    bad = run_cli("check-host", *common, "--vsm-server-mode", "on-primary",
                  "--vsm-server-start", "true", "--vsm-server-stop", "true", "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert {"status": FAIL, "what": report["checks"][0]["what"],
            "fix": "tl-config /vsmserver/HA/enabled=0 on both nodes"} == report["checks"][0]


# -- restore-sessions-file -----------------------------------------------------------------------


@pytest.mark.etcd
def test_restore_without_a_copy_exits_2_with_one_line(etcd_cluster: LocalEtcdCluster,
                                                      cluster_name: str,
                                                      tmp_path: Path) -> None:
    """No copy in etcd: exit 2 and one line; nothing written."""
    target = tmp_path / "sessions"
    result = run_cli("restore-sessions-file", "--to", str(target), "--cluster", cluster_name,
                     "--etcd-endpoints", etcd_cluster.endpoints_arg,
                     "--health-check", f"tcp:127.0.0.1:{_unused_port()}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "holds no copy" in result.stderr
    assert not target.exists()


@pytest.mark.etcd
def test_restore_writes_etcds_copy_and_refuses_while_the_vsm_server_answers(
        pair: Pair, tmp_path: Path) -> None:
    """With a copy uploaded by the primary: while something answers on the VSM server's
    check, restore refuses (exit 1) and writes nothing; with it gone it writes etcd's bytes
    atomically, keeping the mode and owner of the file it replaces (a new file: 0600);
    --force writes even while the server answers."""
    source = tmp_path / "vsm-a" / "sessions"
    source.parent.mkdir()
    pair.start_one("a", ttl=2, extra_args=["--vsm-sessions-file", str(source),
                                           "--vsm-file-check-interval", "0.3"])
    data = os.urandom(700_000)
    atomic_write(source, data)
    wait_for(lambda: pair.nodes[0].role().get("sessions_file", {}).get("state") == "current"
             and pair.nodes[0].role()["sessions_file"].get("local_sha256") is not None,
             timeout=20, interval=0.1)
    target = tmp_path / "restored" / "sessions"
    target.parent.mkdir()
    target.write_bytes(b"stale")
    os.chown(target, 54321, 54322)
    target.chmod(0o640)
    base = ["restore-sessions-file", "--cluster", pair.cluster,
            "--etcd-endpoints", pair.etcd.endpoints_arg]
    with socket.socket() as vsm_server:
        vsm_server.bind(("127.0.0.1", 0))
        vsm_server.listen()
        check = f"tcp:127.0.0.1:{vsm_server.getsockname()[1]}"
        refused = run_cli(*base, "--to", str(target), "--health-check", check)
        assert refused.returncode == 1
        assert "refusing: the local VSM server answers" in refused.stderr
        assert target.read_bytes() == b"stale"
        forced = run_cli(*base, "--to", str(tmp_path / "forced"), "--health-check", check,
                         "--force")
        assert forced.returncode == 0, forced.stderr
        assert (tmp_path / "forced").read_bytes() == data
    done = run_cli(*base, "--to", str(target), "--health-check", check)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == data
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (54321, 54322, 0o640)
    assert ((tmp_path / "forced").stat().st_mode & 0o777) == 0o600
    assert not [p for p in target.parent.iterdir() if p.name != "sessions"]


def _unused_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port: int = unused.getsockname()[1]
        return port


@pytest.mark.etcd
def test_the_sidecar_logs_an_etcd_without_the_fix_at_start(pair: Pair) -> None:
    """A running sidecar logs etcd's version at start, naming the upgrade: an error for the
    test cluster's 3.5.1, which lacks the fix for etcd-io/etcd#15247 and can lose committed
    writes when a member is killed (etcd-io/etcd#13766)."""
    node = pair.start_one("a", ttl=2)
    wait_for(lambda: "etcd_version_old" in node.log_tail(300), timeout=10, interval=0.1)
    line = next(x for x in node.log_tail(300).splitlines() if "etcd_version_old" in x)
    record = json.loads(line)
    assert (record["level"], record["fix"]) == ("error", "upgrade etcd to 3.5.13 or later")
    assert "etcd-io/etcd#13766" in record["problem"]
