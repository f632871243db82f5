"""``vsm-sidecar demo`` end to end, as CI runs it: stdout is a pipe, not a terminal.

Every scene must print its measured result, and no etcd, sidecar or stand-in VSM server process
the demo started may outlive it, whether it ends on its own or is interrupted. The demo's children
run in sessions of their own, so nothing but the demo's own cleanup stops them.

Where the suite can build network namespaces (root), the demo does too: its sidecars then run in
lab hosts with a resource IP, and no namespace of its lab may outlive it either.
VSM_DEMO_NETNS=0 keeps it on loopback.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.lab.netns import list_netns, netns_unavailable

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIME = r"(\d+(?:\.\d+)?) (ms|s)"
# One result line per scene, in order; each carries a measured time.
SCENE_RESULTS = [
    rf"vsm-a became PRIMARY {TIME} after its process started \(epoch \d+\); "
    r"vsm-b follows it as STANDBY",
    # Through the stand-in VSM server, or through PutSession where this build has none.
    r"5 sessions created through (vsm-a's stand-in VSM server|PutSession on vsm-a) in "
    rf"{TIME} \(revisions \d+-\d+\); vsm-a and vsm-b list all 5 {TIME} after the last "
    r"acknowledgement",
    rf"vsm-b became PRIMARY {TIME} after the kill \(TTL 2 s\), epoch \d+ -> \d+, with all 5 "
    rf"sessions(; its stand-in VSM server serves {TIME} after the kill)?"
    # Where the sidecars run in network namespaces: the client host, through the resource IP.
    r"(?P<vip>; the client reached vsm-b through the resource IP "
    rf"(?P<vip_ip>\d+\.\d+\.\d+\.50) {TIME} after the kill"
    r"( \(vsm-a's host still has the address\))?)?",
    rf"vsm-a was STANDBY {TIME} after its restart and PRIMARY again {TIME} after it "
    rf"\(failback delay 2 s\), epoch \d+ -> \d+; the handover, vsm-b leaving PRIMARY to vsm-a "
    rf"PRIMARY, took {TIME}",
    rf"vsm-b took over in {TIME} \(the RPC answered after {TIME}\), epoch \d+ -> \d+; "
    rf"vsm-a took over in {TIME} \(the RPC answered after {TIME}\), epoch \d+ -> \d+",
    rf"etcd\d led etcd {TIME} after the kill; "
    # At TTL 2 either node may fence itself (safely) while etcd elects a new leader.
    r"(for 4 s vsm-a stayed PRIMARY and vsm-b STANDBY \(epoch \d+ unchanged\)"
    r"|vsm-a went PRIMARY( -> [A-Z]+)*, vsm-b STANDBY( -> [A-Z]+)*: a lease deadline passed "
    r"during the etcd election .*"
    r"never two PRIMARYs, vsm-[ab] is PRIMARY now, epoch \d+ -> \d+); "
    rf"etcd\d rejoined {TIME} after its restart",
]
NO_STANDINS = "stand-in VSM servers: not available in this build"
VIP_SKIPPED = "resource IP: skipped (needs root and network namespaces)"
# The header line naming the lab, and the table's line of whom the client reaches.
VIP_HEADER = r"^resource IP: (\S+)/24 on eth0 .*\(namespaces (vsmlab-\d+-[0-9a-f]+)-\*\)$"
CLIENT_LINE = r"^  client via resource IP (\S+): (vsm-a|vsm-b|no answer)$"


class DemoRun:
    """``python -m sidecar demo`` as a subprocess whose output is collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "demo", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._fresh: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:  # closed at end of output: pytest makes a leak an error
            for line in self.process.stdout:
                self._fresh.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (old or new) that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if found := re.search(pattern, line):
                    return found
            try:
                self.lines.append(self._fresh.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}:\n{self.output}") from None

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)  # the rest of the output
        while not self._fresh.empty():
            self.lines.append(self._fresh.get())
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def workdir(self) -> str:
        return self.wait_for(r"Work dir \(every process's log\): (\S+)", 30).group(1)

    def lab_tag(self) -> str | None:
        """The tag of the demo's namespace lab (every namespace name starts with it); None
        where it said it skips the resource IP."""
        found = self.wait_for(rf"{VIP_HEADER}|^{re.escape(VIP_SKIPPED)}", 60)
        return found.group(2)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.finish(timeout=10)


def namespaces_of(tag: str | None) -> set[str]:
    return set() if tag is None else {name for name in list_netns() if name.startswith(tag)}


def processes_in(workdir: str) -> dict[int, str]:
    """Processes whose command line or stdout names ``workdir`` (etcd members: their data dir;
    sidecars and stand-in VSM servers: their log file), with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stdout = os.readlink(entry / "fd" / "1")
        except OSError:  # gone meanwhile, or a kernel thread without fds
            continue
        if workdir in cmdline or stdout.startswith(workdir):
            found[int(entry.name)] = cmdline
    return found


@pytest.fixture
def demo_runs() -> Iterator[list[DemoRun]]:
    """Demo processes of a test; killed (-9) afterwards if a failed test left one running."""
    runs: list[DemoRun] = []
    yield runs
    for run in runs:
        run.kill()


def test_demo_plays_every_scene_with_a_measured_result_and_leaves_nothing_running(
    demo_runs: list[DemoRun],
) -> None:
    """--duration 1: all six scenes print a measured result, exit 0, no process survives."""
    run = DemoRun("--duration", "1")
    demo_runs.append(run)
    workdir = run.workdir()
    tag = run.lab_tag()
    # As root the demo uses network namespaces wherever the suite could.
    assert (tag is not None) == (netns_unavailable() is None), run.output
    run.wait_for(r"^Scene 1/6: ", timeout=120)
    assert processes_in(workdir), "the demo's processes were not found while it ran"
    if tag is not None:
        assert namespaces_of(tag), "the demo's namespaces were not found while it ran"
    assert run.finish(timeout=240) == 0, run.output
    results = [line.removeprefix("  => ") for line in run.lines if line.startswith("  => ")]
    assert len(results) == len(SCENE_RESULTS), run.output
    for expected, actual in zip(SCENE_RESULTS, results, strict=True):
        assert re.fullmatch(expected, actual), f"{expected!r} != {actual!r}"
    crash = re.fullmatch(SCENE_RESULTS[2], results[2])
    assert crash is not None
    # A kill -9 failover waits for the lease to expire in etcd: not much less than a TTL.
    assert (crash.group(2), float(crash.group(1)) >= 1.0) == ("s", True), results[2]
    # The stand-ins take part wherever this build has them, and then all the way through.
    standins = NO_STANDINS not in run.lines
    assert ("stand-in VSM server" in results[1]) == standins, results[1]
    assert (crash.group(3) is not None) == standins, results[2]
    failback = re.fullmatch(SCENE_RESULTS[3], results[3])
    assert failback is not None
    # The preferred primary waits out its failback delay (2 s) as STANDBY first.
    assert (failback.group(4), float(failback.group(3)) >= 2.0) == ("s", True), results[3]
    # Through the resource IP exactly where the sidecars run in namespaces (with stand-ins).
    assert (crash.group("vip") is not None) == (standins and tag is not None), results[2]
    assert processes_in(workdir) == {}
    assert not Path(workdir).exists()
    assert namespaces_of(tag) == set()
    if tag is not None:
        clients = [m for line in run.lines if (m := re.match(CLIENT_LINE, line))]
        assert clients, run.output
        assert {m.group(1) for m in clients} == {crash.group("vip_ip")}, clients
        # The table showed the client reaching vsm-a through the resource IP at some point.
        assert "vsm-a" in {m.group(2) for m in clients}, clients
        assert re.search(r"^  node .* VSM +holds VIP +gRPC address$", run.output, re.M)


def test_demo_without_namespaces_runs_on_loopback_and_says_it_skips_the_resource_ip(
    demo_runs: list[DemoRun],
) -> None:
    """VSM_DEMO_NETNS=0 (as without root): every scene on loopback, one line saying the
    resource IP is skipped, no resource IP anywhere in the table."""
    run = DemoRun("--duration", "1", env={"VSM_DEMO_NETNS": "0"})
    demo_runs.append(run)
    workdir = run.workdir()
    assert run.lab_tag() is None
    assert run.finish(timeout=240) == 0, run.output
    skipped = [line for line in run.lines if line.startswith(VIP_SKIPPED)]
    assert len(skipped) == 1, run.output
    results = [line.removeprefix("  => ") for line in run.lines if line.startswith("  => ")]
    assert len(results) == len(SCENE_RESULTS), run.output
    for expected, actual in zip(SCENE_RESULTS, results, strict=True):
        assert re.fullmatch(expected, actual), f"{expected!r} != {actual!r}"
    crash = re.fullmatch(SCENE_RESULTS[2], results[2])
    assert crash is not None
    assert crash.group("vip") is None, results[2]
    assert "client via resource IP" not in run.output
    assert "holds VIP" not in run.output
    assert "127.0.0.1:" in run.output  # the sidecars answer on loopback
    assert processes_in(workdir) == {}
    assert not Path(workdir).exists()


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_demo_interrupted_mid_scene_cleans_up_and_exits_128_plus_signal(
    demo_runs: list[DemoRun], signum: signal.Signals, code: int
) -> None:
    """A signal while the crash failover runs: every process killed, work dir removed, and
    exit 130 for Ctrl-C (128 + the signal for SIGTERM and SIGHUP, a closed terminal)."""
    run = DemoRun()  # no duration: it would run until interrupted
    demo_runs.append(run)
    workdir = run.workdir()
    tag = run.lab_tag()
    run.wait_for(r"^Scene 3/6: kill -9 the primary", timeout=120)
    assert processes_in(workdir), "the demo's processes were not found while it ran"
    run.process.send_signal(signum)
    assert run.finish(timeout=60) == code, run.output
    assert "Stopped etcd, the sidecars and the stand-in VSM servers" in run.output
    assert processes_in(workdir) == {}
    assert not Path(workdir).exists()
    assert namespaces_of(tag) == set()  # the lab's namespaces too, where it had one
