"""Resource IP failover as the client sees it: fault -> first good TCP exchange via the VIP.

    python -m tests.bench.client_failover [--runs 20]

Same lab as tests/resource/test_vip_failover.py (network namespaces, etcd on the test
process's leg of the bridge, a name service on port 9000 in hosts a and b). A prober in the
client namespace connects to VIP:9000 every ~20 ms (50 ms connect timeout) and prints the
monotonic time and the name it got. The figure per run is from the moment just before the
fault is injected to the
first exchange that returns the new primary's name. Faults: host death (the primary's switch
port down; brought back and its sidecar restarted between runs), kill -9, SIGTERM. With
keepalived installed, two VRRP instances (advert_int 1) are measured for host death and clean
stop in the same harness.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

from ..netns_lab import NetnsLab, free_subnet, read_line, require_netns, wait_for

PORT = 9000
TTL = 2

_PROBER = r"""
import socket, sys, time
host, port, period, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print("ready", flush=True)
while True:
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as c:
            name = c.recv(64).decode() or "-"
    except OSError:
        name = "-"
    sys.stdout.write(f"{time.monotonic():.6f} {name}\n")
    sys.stdout.flush()
    time.sleep(max(0.0, period - (time.monotonic() - started)))
"""


class Prober:
    def __init__(self, lab: NetnsLab, vip: str, connect_timeout: float) -> None:
        self.process = lab.popen(
            "client",
            sys.executable,
            "-I",
            "-S",
            "-c",
            _PROBER,
            vip,
            str(PORT),
            "0.02",
            str(connect_timeout),
            stdout=subprocess.PIPE,
        )
        assert read_line(self.process.stdout, timeout=5) == "ready"
        self.answers: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            at, name = line.split()
            with self._cond:
                self.answers.append((float(at), name))
                self._cond.notify_all()

    def first(self, name: str, after: float, timeout: float = 15.0) -> float:
        """Monotonic time of the first answer ``name`` after ``after``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [at for at, got in self.answers if at > after and got == name]
                if hits:
                    return hits[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"client never reached {name}")
                self._cond.wait(left)


class SidecarPair:
    name = "vsm-sidecar"

    def __init__(
        self, lab: NetnsLab, endpoints: str, workdir: Path, vip: str, extra: list[str]
    ) -> None:
        self.lab, self.endpoints, self.workdir, self.vip = lab, endpoints, workdir, vip
        self.extra = extra
        self.nodes: dict[str, LocalSidecar] = {}
        self.primary = "a"

    def start(self, host: str, role: str) -> None:
        node = LocalSidecar(
            host,
            "bench",
            self.endpoints,
            self.workdir,
            ttl=TTL,
            command_prefix=self.lab.exec_prefix(host),
            unix_socket=True,
            extra_args=["--vip", f"{self.vip}/24", "--vip-interface", "eth0", *self.extra],
        )
        self.nodes[host] = node
        node.start().wait_role(role, timeout=15)

    def setup(self) -> None:
        self.start("a", "PRIMARY")
        self.start("b", "STANDBY")

    @property
    def standby(self) -> str:
        return "b" if self.primary == "a" else "a"

    def fault(self, kind: str) -> None:
        node = self.nodes[self.primary]
        if kind == "host death":
            self.lab.link_down(self.primary)
        elif kind == "kill -9":
            node.signal(signal.SIGKILL)
        else:
            node.terminate()

    def recover(self, kind: str) -> None:
        old = self.primary
        self.nodes[self.standby].wait_role("PRIMARY", timeout=10)
        if kind == "host death":
            self.lab.link_up(old)
        self.nodes[old].kill()
        self.start(old, "STANDBY")
        self.primary = self.standby

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


KEEPALIVED_CONF = """\
global_defs {{
    router_id {host}
    script_user root
}}
vrrp_instance VSM {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int 1
    virtual_ipaddress {{
        {vip}/24 dev eth0
    }}
}}
"""


class KeepalivedPair:
    """a (priority 150) is master; b (100) backs it up. Restarted fresh before every run."""

    name = "keepalived"
    primary, standby = "a", "b"

    def __init__(self, lab: NetnsLab, workdir: Path, vip: str) -> None:
        self.lab, self.workdir, self.vip = lab, workdir, vip
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def start(self, host: str, priority: int) -> None:
        conf = self.workdir / f"keepalived-{host}.conf"
        conf.write_text(KEEPALIVED_CONF.format(host=host, priority=priority, vip=self.vip))
        log = (self.workdir / f"keepalived-{host}.log").open("a")
        self.processes[host] = self.lab.popen(
            host,
            "keepalived",
            "--dont-fork",
            "--log-console",
            "--vrrp",
            "--use-file",
            str(conf),
            "--pid",
            str(self.workdir / f"ka-{host}.pid"),
            "--vrrp_pid",
            str(self.workdir / f"ka-vrrp-{host}.pid"),
            stdout=log,
            stderr=log,
        )

    def holds(self, host: str) -> bool:
        return f"{self.vip}/24" in self.lab.addresses(host)

    def setup(self) -> None:
        self.start("a", 150)
        self.start("b", 100)
        wait_for(lambda: self.holds("a") and not self.holds("b"), timeout=15)
        time.sleep(1.5)  # b has seen a's adverts and settled as backup

    def fault(self, kind: str) -> None:
        if kind == "host death":
            self.lab.link_down("a")
        else:
            self.processes["a"].send_signal(signal.SIGTERM)

    def recover(self, kind: str) -> None:
        if kind == "host death":
            self.lab.link_up("a")
        self.close()
        self.setup()

    def close(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            if process.poll() is None:
                process.kill()
                process.wait(5)
        self.processes.clear()
        for host in ("a", "b"):  # a process killed hard may leave the address
            self.lab.run(host, "ip", "addr", "del", f"{self.vip}/24", "dev", "eth0", check=False)


def measure(pair, prober: Prober, kind: str, runs: int, log: Callable[[str], None]) -> list[float]:
    figures = []
    for n in range(runs):
        new = pair.standby
        wait_for(lambda p=pair.primary: prober.answers[-1][1] == p, timeout=10)
        time.sleep(0.2)
        fault = time.monotonic()
        pair.fault(kind)
        figures.append(prober.first(new, after=fault) - fault)
        log(f"  {pair.name:12} {kind:10} run {n + 1:2}: {figures[-1] * 1000:7.1f} ms")
        pair.recover(kind)
    return figures


def row(name: str, kind: str, figures: list[float]) -> str:
    ms = sorted(f * 1000 for f in figures)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return (
        f"| {name} | {kind} | {len(ms)} | {statistics.median(ms):.0f} | {p95:.0f} | {ms[-1]:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-keepalived", action="store_true")
    parser.add_argument(
        "--faults",
        default="host death,kill -9,SIGTERM",
        help="comma separated subset of the sidecar faults",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=0.05, help="the prober's connect timeout, seconds"
    )
    parser.add_argument(
        "--vip-probe-timeout",
        type=float,
        default=None,
        help="pass --vip-probe-timeout to the sidecars (default: theirs)",
    )
    args = parser.parse_args()
    require_netns()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp, NetnsLab(subnet=free_subnet()) as lab:
        workdir = Path(tmp)
        root = lab.attach_root()
        for host in ("a", "b"):
            lab.serve_name(host, host, PORT)
        vip = f"{lab.subnet}.50"
        prober = Prober(lab, vip, args.connect_timeout)
        extra = []
        if args.vip_probe_timeout is not None:
            extra = ["--vip-probe-timeout", str(args.vip_probe_timeout)]
        with LocalEtcdCluster(host=root) as etcd:
            pair = SidecarPair(lab, etcd.endpoints_arg, workdir, vip, extra)
            try:
                pair.setup()
                for kind in args.faults.split(","):
                    rows.append(row(pair.name, kind, measure(pair, prober, kind, args.runs, log)))
            finally:
                pair.close()
        if shutil.which("keepalived") and not args.no_keepalived:
            ka = KeepalivedPair(lab, workdir, vip)
            try:
                ka.setup()
                for kind in ("host death", "SIGTERM"):
                    rows.append(row(ka.name, kind, measure(ka, prober, kind, args.runs, log)))
            finally:
                ka.close()
        else:
            log("keepalived not installed or --no-keepalived: only the sidecar was measured")
    print(f"connect timeout {args.connect_timeout * 1000:.0f} ms; sidecar extra args {extra}")
    print(f"TTL {TTL} s; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print("| system | fault | runs | median ms | p95 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
