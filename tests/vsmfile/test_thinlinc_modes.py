"""The two ways to run the VSM server, end to end: real hosts (network namespaces), real etcd,
the resource IP, and the stand-in VSM server playing vsmserver.

* ``replicated``: a stand-in runs on both hosts all the time (as vsmserver does with ThinLinc's
  HA sync on); the sidecars move only the resource IP and never write the live sessions file.
* ``on-primary``: the sidecar's start and stop commands start and stop the stand-in; it runs on
  the primary only, and starts on a sessions file already current.

Each goes through a failover (kill -9 of the primary's sidecar) and a failback (the preferred
primary, restarted, takes the role back). The client asks through the resource IP only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.atomicfile import atomic_write
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

from ..netns_lab import NetnsLab, free_subnet, require_netns, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

PORT = 9000
TTL = 2
WAIT = 20.0

# The "VSM server" unit for on-primary mode: start notes what the sessions file holds (rule 5:
# it must already be current) and runs a stand-in in the background; stop ends it and waits.
START = """#!/bin/sh
dir=$1 grpc=$2 name=$3
(sha256sum "$dir/sessions" 2>/dev/null || echo "none -") | cut -d' ' -f1 >> "$dir/started-with"
setsid {python} -m sidecar vsm-standin --grpc "$grpc" --listen 0.0.0.0:{port} --name "$name" \
    >> "$dir/standin.log" 2>&1 < /dev/null &
echo $! > "$dir/standin.pid"
echo $! >> "$dir/standin.pids"
"""
STOP = """#!/bin/sh
dir=$1
pid=$(cat "$dir/standin.pid" 2>/dev/null) || exit 0
kill "$pid" 2>/dev/null
while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
rm -f "$dir/standin.pid"
"""


class Hosts:
    def __init__(self, lab: NetnsLab, etcd: LocalEtcdCluster, workdir: Path) -> None:
        self.lab, self.etcd, self.workdir = lab, etcd, workdir
        self.vip = f"{lab.subnet}.50"
        self.nodes: dict[str, LocalSidecar] = {}
        self.pids: list[int] = []
        for host in ("a", "b"):
            self.dir(host).mkdir()

    def dir(self, host: str) -> Path:
        return self.workdir / f"host-{host}"

    def sessions(self, host: str) -> Path:
        return self.dir(host) / "sessions"

    def sidecar(self, host: str, mode: str, extra: list[str] | None = None) -> LocalSidecar:
        args = ["--vip", f"{self.vip}/24", "--vip-interface", "eth0",
                "--vsm-sessions-file", str(self.sessions(host)),
                "--vsm-file-check-interval", "0.3", "--vsm-server-mode", mode,
                "--failback-delay", "1", *(extra or [])]
        if host == "a":
            args.append("--preferred-primary")
        node = LocalSidecar(host, "modes", self.etcd.endpoints_arg, self.workdir, ttl=TTL,
                            command_prefix=self.lab.exec_prefix(host), unix_socket=True,
                            extra_args=args)
        if mode == "on-primary":
            node.extra_args += self.commands(host, node.address)
        self.nodes[host] = node
        return node.start()

    def commands(self, host: str, grpc: str) -> list[str]:
        start, stop = self.workdir / "start.sh", self.workdir / "stop.sh"
        if not start.exists():
            start.write_text(START.format(python=sys.executable, port=PORT))
            stop.write_text(STOP)
            start.chmod(0o755)
            stop.chmod(0o755)
        folder = self.dir(host)
        return ["--vsm-server-start", f"{start} {folder} {grpc} {host}",
                "--vsm-server-stop", f"{stop} {folder}", "--vsm-server-timeout", "10"]

    def standin_running(self, host: str) -> bool:
        try:
            pid = int((self.dir(host) / "standin.pid").read_text())
        except (FileNotFoundError, ValueError):
            return False
        self.pids.append(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def started_with(self, host: str) -> list[str]:
        try:
            return (self.dir(host) / "started-with").read_text().split()
        except FileNotFoundError:
            return []

    def ask(self) -> str | None:
        """The name of the stand-in serving on the resource IP (its greeting is NAME COUNT)."""
        answer = self.lab.ask("client", self.vip, PORT, timeout=0.3)
        return answer.split()[0] if answer else None

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        for host in ("a", "b"):
            # Every stand-in a start command ever ran: a sidecar killed -9 leaves its own.
            with contextlib.suppress(FileNotFoundError):
                self.pids += [int(p) for p in (self.dir(host) / "standin.pids").read_text().split()]
        for pid in set(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    require_netns()
    with NetnsLab(subnet=free_subnet()) as lab:
        root = lab.attach_root()
        with LocalEtcdCluster(host=root) as etcd:
            pair = Hosts(lab, etcd, tmp_path)
            try:
                yield pair
            finally:
                pair.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_on_primary_runs_the_vsm_server_on_the_primary_only(hosts: Hosts) -> None:
    """on-primary: the VSM server runs only beside the primary and starts on a sessions file
    that is already current; after kill -9 of a's sidecar b starts its own (with a's last file)
    and the client reaches it through the resource IP; a, restarted, stops its orphaned VSM
    server at start-up, takes the role back (failback), b's VSM server stops, a's starts on
    the file b wrote meanwhile."""
    hosts.sidecar("a", "on-primary").wait_role("PRIMARY")
    hosts.sidecar("b", "on-primary").wait_role("STANDBY")
    wait_for(lambda: hosts.ask() == "a", timeout=WAIT)
    assert hosts.standin_running("a")
    assert not hosts.standin_running("b")
    first = b"sessions written by a's VSM server\n" * 20
    atomic_write(hosts.sessions("a"), first)
    wait_for(lambda: hosts.sessions("b").exists() and
             hosts.sessions("b").read_bytes() == first, timeout=WAIT)

    hosts.nodes["a"].kill()  # failover
    wait_for(lambda: hosts.ask() == "b", timeout=WAIT)
    assert hosts.started_with("b") == [sha(first)]
    second = b"sessions written by b's VSM server\n" * 30
    atomic_write(hosts.sessions("b"), second)
    wait_for(lambda: hosts.nodes["b"].role().get("sessions_file", {}).get("etcd_sha256")
             == sha(second), timeout=WAIT)

    hosts.nodes["a"].start()  # failback
    wait_for(lambda: hosts.ask() == "a", timeout=WAIT)
    hosts.nodes["a"].wait_role("PRIMARY")
    wait_for(lambda: not hosts.standin_running("b"), timeout=WAIT)
    assert hosts.standin_running("a")
    # a's first start found no file at all; its second, the one b wrote.
    assert hosts.started_with("a") == ["none", sha(second)]
    assert hosts.sessions("a").read_bytes() == second
    status = hosts.nodes["a"].role()
    assert status["vsm_server"]["state"] == "running"
    wait_for(lambda: hosts.nodes["b"].role()["vsm_server"]["state"] == "stopped", timeout=WAIT)


def test_replicated_mode_moves_only_the_resource_ip(hosts: Hosts) -> None:
    """replicated: both stand-ins run all the time; the client reaches the primary's through
    the resource IP across a failover and a failback; neither sidecar ever writes its live
    sessions file (ThinLinc's own sync does), while the primary uploads its own to etcd."""
    synced = b"sessions, kept equal on both nodes by ThinLinc's HA sync\n" * 10
    for host in ("a", "b"):
        hosts.sessions(host).write_bytes(synced)
    inodes = {h: hosts.sessions(h).stat() for h in ("a", "b")}
    a = hosts.sidecar("a", "replicated")
    a.wait_role("PRIMARY")
    b = hosts.sidecar("b", "replicated")
    b.wait_role("STANDBY")
    for host in ("a", "b"):
        hosts.lab.popen(host, sys.executable, "-m", "sidecar", "vsm-standin", "--grpc",
                        hosts.nodes[host].address, "--listen", f"0.0.0.0:{PORT}",
                        "--name", host)
    wait_for(lambda: hosts.ask() == "a", timeout=WAIT)
    wait_for(lambda: b.role().get("sessions_file", {}).get("etcd_sha256") == sha(synced),
             timeout=WAIT)
    changed_on_a = b"a newer file on a only (the sync has not run yet)\n"
    hosts.sessions("a").write_bytes(changed_on_a)
    wait_for(lambda: b.role()["sessions_file"].get("etcd_sha256") == sha(changed_on_a),
             timeout=WAIT)

    a.kill()  # failover
    wait_for(lambda: hosts.ask() == "b", timeout=WAIT)
    a.start()  # failback
    wait_for(lambda: hosts.ask() == "a", timeout=WAIT)
    a.wait_role("PRIMARY")
    assert hosts.sessions("b").read_bytes() == synced
    after = hosts.sessions("b").stat()
    assert (after.st_ino, after.st_mtime_ns) == (inodes["b"].st_ino, inodes["b"].st_mtime_ns)
    assert hosts.sessions("a").read_bytes() == changed_on_a
    assert "vsm_server" not in a.role()
