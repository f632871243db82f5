"""A crashed sidecar cleaned up by ``vsm-sidecar release``, beside host death, in the network lab.

    python -m tests.bench.crash_release [--runs 10] [--ttl 2]

Same lab as tests/resource/test_vip_failover.py (network namespaces, etcd on the test process's
leg of the bridge, a name service on port 9000 in hosts a and b, a prober in the client host
that connects to VIP:9000 every ~20 ms; see tests/bench/client_failover.py). Two faults of
whichever node is PRIMARY, interleaved round by round:

- kill -9 + release: the primary's sidecar is killed with SIGKILL and reaped, then
  ``vsm-sidecar release`` runs in that host's namespace with the same settings, at once, as
  systemd runs ``ExecStopPost=`` after the main process exited. It removes the resource IP and
  revokes the dead process's lease (deleting its leader key first, which marks a planned move:
  no #15247 wait).
- kill -9 + warm release: the same, but the release's interpreter was started and had
  imported the program before the kill (not a way to deploy it): what release costs beyond
  starting Python and importing its libraries, which dominate the cold figure.
- host death: the primary's switch port goes down; the standby waits for the lease to expire
  (a TTL) and, on the bundled etcd 3.5.1, for the #15247 guard.

Each run gives up to three figures from just before the fault (monotonic clock): the standby's
WatchRole message saying PRIMARY, the client's first answer from it through the resource IP,
and for release, the release process's own wall time (interpreter start included). After each
run the old primary's sidecar is restarted (its link brought back first) and must come back as
STANDBY.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar, RoleRecorder

from ..netns_lab import NetnsLab, free_subnet, read_line, require_netns, wait_for
from .client_failover import PORT, Prober

GOAL_MEDIAN_S = 0.5  # kill -9 + release, to the standby PRIMARY and to the client
RELEASE = "kill -9 + release"
WARM = "kill -9 + warm release"
HOST_DEATH = "host death"
KINDS = (RELEASE, WARM, HOST_DEATH)
SETTLE_S = 0.3

# The warm release: the same `vsm-sidecar release`, in an interpreter that started and
# imported the program before the kill and runs it when told. Not a way to deploy it: it shows
# what release costs beyond starting Python and importing its libraries.
_WARM = r"""
import sys
import sidecar.cli, sidecar.host.release
print("ready", flush=True)
if sys.stdin.readline() != "go\n":  # the bench ended without a fault: release nothing
    sys.exit(3)
sys.exit(sidecar.cli.main(sys.argv[1:]))
"""


class BenchError(Exception):
    """A run did not end the way every run must."""


class Lab:
    def __init__(self, lab: NetnsLab, endpoints: str, workdir: Path, ttl: int,
                 release_program: str | None = None) -> None:
        self.lab, self.ttl = lab, ttl
        # The cold release as installed (`vsm-sidecar` of a venv with the package installed,
        # not editable), run from "/": no source tree on its path. None: `python -m sidecar`.
        self.release_program = release_program
        self.vip = f"{lab.subnet}.50"
        self.nodes = {host: LocalSidecar(host, "crash", endpoints, workdir, ttl=ttl,
                                         command_prefix=lab.exec_prefix(host), unix_socket=True,
                                         extra_args=["--vip", f"{self.vip}/24",
                                                     "--vip-interface", "eth0"])
                      for host in ("a", "b")}
        self.recorders: dict[str, RoleRecorder] = {}
        self.primary = "a"
        self.late = 0  # releases that found the lease already expired

    @property
    def standby(self) -> str:
        return "b" if self.primary == "a" else "a"

    def start(self) -> None:
        for host, role in (("a", "PRIMARY"), ("b", "STANDBY")):
            self.nodes[host].start().wait_role(role, timeout=15)
            self.recorders[host] = RoleRecorder(self.nodes[host].address)

    def holds(self, host: str) -> bool:
        return f"{self.vip}/24" in self.lab.addresses(host)

    def warm_release(self) -> subprocess.Popen[str]:
        """A release in the primary's host, its interpreter started and its imports done."""
        command = self.nodes[self.primary].command("release")
        at = command.index("-m")
        command[at:at + 2] = ["-c", _WARM]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        if read_line(process.stdout, timeout=30) != "ready":
            process.kill()
            raise BenchError(f"the warm release did not start: {process.communicate()}")
        return process

    def fault(self, kind: str, warm: subprocess.Popen[str] | None) -> float | None:
        """Inject ``kind`` into the primary; the release's wall time for a release."""
        if kind == HOST_DEATH:
            self.lab.link_down(self.primary)
            return None
        node = self.nodes[self.primary]
        node.kill()
        started = time.monotonic()
        if warm is None:
            command = node.command("release")
            if self.release_program is not None:
                at = command.index("-m")
                command[at - 1:at + 2] = [self.release_program]
            done = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                  cwd="/" if self.release_program else None)
        else:
            out, err = warm.communicate("go\n", timeout=30)
            done = subprocess.CompletedProcess(warm.args, warm.returncode, out, err)
        took = time.monotonic() - started
        if done.returncode != 0 or "lease" not in done.stdout:
            raise BenchError(f"release exited {done.returncode}: {done.stdout}{done.stderr}")
        if self.holds(self.primary):
            raise BenchError("the resource IP is still on the dead sidecar's host")
        if "had already expired" in done.stdout:
            # Release came later than the TTL (a loaded machine): the figure is the TTL's.
            self.late += 1
        return took

    def promoted(self, after: float) -> float:
        recorder = self.recorders[self.standby]
        try:
            return recorder.wait_role("PRIMARY", self.ttl + 10, after=after).at - after
        except TimeoutError as exc:
            raise BenchError(f"{self.standby} was not promoted: {exc}") from None

    def recover(self, kind: str) -> None:
        old = self.primary
        if kind == HOST_DEATH:
            self.lab.link_up(old)
        self.nodes[old].kill()
        self.nodes[old].start().wait_role("STANDBY", timeout=15)
        self.primary = self.standby

    def logs(self) -> str:
        return "\n".join(f"--- {n.log_path}\n{n.log_tail(20)}" for n in self.nodes.values())

    def close(self) -> None:
        for recorder in self.recorders.values():
            recorder.close()
        for node in self.nodes.values():
            node.close()


def one_run(lab: Lab, prober: Prober, kind: str) -> dict[str, float]:
    wait_for(lambda: bool(prober.answers) and prober.answers[-1][1] == lab.primary, timeout=10)
    time.sleep(SETTLE_S)
    new = lab.standby
    warm = lab.warm_release() if kind == WARM else None
    at = time.monotonic()
    try:
        release = lab.fault(kind, warm)
    finally:
        if warm is not None and warm.poll() is None:
            warm.kill()
            warm.wait()
    figures = {"primary": lab.promoted(at)}
    try:
        figures["client"] = prober.first(new, after=at, timeout=lab.ttl + 10) - at
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None
    if release is not None:
        figures["release"] = release
    lab.recover(kind)
    return figures


def measure(runs: int, ttl: int, release_program: str | None = None,
            ) -> tuple[dict[str, list[dict[str, float]]], str, int]:
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="vsm-bench-") as tmp, \
            NetnsLab(subnet=free_subnet()) as netns:
        root = netns.attach_root()
        for host in ("a", "b"):
            netns.serve_name(host, host, PORT)
        with LocalEtcdCluster(host=root) as etcd:
            with etcd.client() as client:
                version = client.status().version
            lab = Lab(netns, etcd.endpoints_arg, Path(tmp), ttl, release_program)
            prober = Prober(netns, lab.vip, 0.05)
            try:
                lab.start()
                for number in range(1, runs + 1):
                    # Three faults a round move the role three times: each kind hits the
                    # other host in the next round. Rotating the order spreads the load left
                    # by a restart over the kinds alike.
                    turn = number % len(KINDS)
                    for kind in KINDS[turn:] + KINDS[:turn]:
                        old, new = lab.primary, lab.standby
                        figures = one_run(lab, prober, kind)
                        samples[kind].append(figures)
                        print(f"{kind:<22} {number:>3}/{runs}: {old} -> {new} "
                              + ", ".join(f"{k} {v * 1000:6.0f} ms"
                                          for k, v in figures.items()), flush=True)
            except BenchError:
                print(lab.logs(), file=sys.stderr)
                raise
            finally:
                prober.process.kill()
                prober.process.wait()
                lab.close()
    return samples, version, lab.late


def median_ms(runs: list[dict[str, float]], figure: str) -> str:
    values = [run[figure] * 1000 for run in runs if figure in run]
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ms ({min(values):.0f}-{max(values):.0f})"


def table(samples: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| fault | runs | to standby PRIMARY, median (range) | to the client through the "
             "resource IP, median (range) | release's own time, median (range) | goal |",
             "|---|---:|---|---|---|---|"]
    for kind, runs in samples.items():
        goal = "-"
        if kind in (RELEASE, WARM):
            met = all(statistics.median(r[f] for r in runs) <= GOAL_MEDIAN_S
                      for f in ("primary", "client"))
            goal = f"median <= {GOAL_MEDIAN_S * 1000:.0f} ms: {'met' if met else 'MISSED'}"
        lines.append(f"| {kind} | {len(runs)} | {median_ms(runs, 'primary')} | "
                     f"{median_ms(runs, 'client')} | {median_ms(runs, 'release')} | {goal} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.crash_release",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="rounds (one of each fault) [10]")
    parser.add_argument("--ttl", type=int, default=2, help="lease TTL of the sidecars [2]")
    parser.add_argument("--release-program", metavar="PATH",
                        help="the cold release runs this installed vsm-sidecar (e.g. "
                             "/opt/vsm-sidecar/bin/vsm-sidecar) from / instead of "
                             "`python -m sidecar` from the source tree")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    require_netns()
    print(f"{args.runs} rounds, TTL {args.ttl} s, cold release: "
          f"{args.release_program or 'python -m sidecar'}", flush=True)
    try:
        samples, version, late = measure(args.runs, args.ttl, args.release_program)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"etcd {version}, TTL {args.ttl} s, {args.runs} rounds; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(table(samples))
    print(f"releases that found the lease already expired (came after the TTL): {late}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
