"""Failover benchmark: crash failovers and planned handovers of two real sidecars.

    python -m tests.bench.failover [--runs 20] [--ttl 2] [--json FILE]

Two sidecar processes on a local 3-member etcd cluster (stock etcd timing). Each run injects a
fault into whichever node is PRIMARY at the time and measures, on the monotonic clock, from
just before the fault to the arrival of the standby's WatchRole message saying PRIMARY: what a
VSM server beside the standby would learn, and when.

- crash failover: kill -9 of the primary. Nothing is handed over; the standby waits for etcd to
  expire the dead primary's lease (TTL), then campaigns.
- planned handover: SIGTERM of the primary. It revokes its lease (DESIGN.md rule 6) and the
  standby, watching the leader key, campaigns at once.

After each fault the stopped node is restarted and must come back as STANDBY, so the roles
alternate between the two nodes run by run. The two kinds are interleaved (crash, handover,
handover, crash, ...) so that load from other work on the machine falls on both alike, and each
kind hits both nodes in turn.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar, RoleRecorder

from ..sidecars import NoSplit, wait_split

# The goals of issue 2, and keepalived as measured there, for comparison.
GOAL_MEDIAN_MS = {"crash": 2500.0, "handover": 100.0}
KEEPALIVED_MS = {"crash": "3000-3600 ms (host death)", "handover": "~600 ms (clean stop)"}
TITLES = {"crash": "crash failover (kill -9)", "handover": "planned handover (SIGTERM)"}

SETTLE_S = 0.5  # after both nodes agree again, before the next fault
RESTART_TIMEOUT_S = 30.0
FAILOVER_SLACK_S = 15.0  # on top of the TTL, before a run counts as failed
LOG_TAIL_LINES = 20


class BenchError(Exception):
    """A run did not end the way every run must (one PRIMARY, one STANDBY)."""


@dataclass(frozen=True)
class Summary:
    runs: int
    median_ms: float
    p95_ms: float
    max_ms: float


def summarize(samples_ms: Sequence[float]) -> Summary:
    """Median, 95th percentile by nearest rank (the smallest sample with at least 95 % of all
    samples at or below it: always a measured value, never interpolated), and maximum."""
    if not samples_ms:
        raise ValueError("no samples")
    ordered = sorted(samples_ms)
    rank = math.ceil(0.95 * len(ordered))
    return Summary(len(ordered), statistics.median(ordered), ordered[rank - 1], ordered[-1])


class Lab:
    """Two sidecars with a role recorder each, on one etcd cluster."""

    def __init__(self, etcd: LocalEtcdCluster, workdir: Path, ttl: int) -> None:
        self.ttl = ttl
        cluster = f"bench-{uuid.uuid4().hex[:8]}"
        self.nodes = [
            LocalSidecar(node_id, cluster, etcd.endpoints_arg, workdir, ttl=ttl)
            for node_id in ("a", "b")
        ]
        self.recorders: dict[str, RoleRecorder] = {}

    def start(self) -> None:
        for node in self.nodes:  # one after the other: "a" becomes the first PRIMARY
            self.recorders[node.node_id] = RoleRecorder(node.address)
            node.start()
        self.split()

    def split(self, timeout: float = RESTART_TIMEOUT_S) -> tuple[LocalSidecar, LocalSidecar]:
        """Wait for one PRIMARY and one STANDBY that agree on the epoch: (primary, standby)."""
        try:
            primary, standby, _ = wait_split(self.nodes, timeout)
        except NoSplit as exc:
            raise BenchError(f"no PRIMARY/STANDBY pair within {timeout:.0f} s") from exc
        return primary, standby

    def promoted_after(self, node: LocalSidecar, fault_at: float) -> float:
        """Seconds from ``fault_at`` to ``node`` reporting PRIMARY."""
        recorder = self.recorders[node.node_id]
        try:
            seen = recorder.wait_role("PRIMARY", self.ttl + FAILOVER_SLACK_S, after=fault_at)
        except TimeoutError as exc:
            raise BenchError(f"{node.node_id} was not promoted: {exc}") from None
        return seen.at - fault_at

    def restart(self, node: LocalSidecar) -> float:
        """Start a stopped node again; seconds until it reports STANDBY."""
        started = time.monotonic()
        node.start(wait=False)
        recorder = self.recorders[node.node_id]
        try:
            back = recorder.wait_role("STANDBY", RESTART_TIMEOUT_S, after=started)
        except TimeoutError as exc:
            raise BenchError(f"{node.node_id} did not come back as STANDBY: {exc}") from None
        return back.at - started

    def logs(self) -> str:
        return "\n".join(f"--- {n.log_path}\n{n.log_tail(LOG_TAIL_LINES)}" for n in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for recorder in self.recorders.values():
            recorder.close()


def crash(lab: Lab, primary: LocalSidecar, standby: LocalSidecar) -> float:
    killed_at = time.monotonic()
    primary.kill()
    return lab.promoted_after(standby, killed_at)


def handover(lab: Lab, primary: LocalSidecar, standby: LocalSidecar) -> float:
    sent_at = time.monotonic()
    primary.terminate()
    took = lab.promoted_after(standby, sent_at)
    code = primary.wait_exit(10)
    if code != 0:
        raise BenchError(f"{primary.node_id} exited {code} after SIGTERM, not 0")
    return took


Fault = Callable[[Lab, LocalSidecar, LocalSidecar], float]
FAULTS: dict[str, Fault] = {"crash": crash, "handover": handover}


def one_run(lab: Lab, kind: str) -> tuple[float, str]:
    """Fault the current primary, restart it; the figure in ms and a line of progress."""
    primary, standby = lab.split()
    time.sleep(SETTLE_S)
    took = FAULTS[kind](lab, primary, standby)
    back = lab.restart(primary)
    line = (
        f"{primary.node_id} -> {standby.node_id} in {took * 1000:7.1f} ms; "
        f"{primary.node_id} restarted, STANDBY after {back:.2f} s"
    )
    return took * 1000, line


def measure(runs: int, ttl: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {kind: [] for kind in FAULTS}
    with tempfile.TemporaryDirectory(prefix="vsm-bench-") as tmp, LocalEtcdCluster() as etcd:
        lab = Lab(etcd, Path(tmp), ttl)
        try:
            lab.start()
            for number in range(1, runs + 1):
                for kind in _round(number):
                    took_ms, line = one_run(lab, kind)
                    samples[kind].append(took_ms)
                    print(f"{kind:<8} {number:>3}/{runs}: {line}", flush=True)
        except BenchError:
            print(lab.logs(), file=sys.stderr)
            raise
        finally:
            lab.close()
    return samples


def _round(number: int) -> list[str]:
    # Each fault moves the leadership to the other node, so a fixed order would always crash
    # one node and always hand over from the other; flipping it every round alternates both.
    kinds = list(FAULTS)
    return kinds if number % 2 else kinds[::-1]


def table(summaries: dict[str, Summary]) -> str:
    """A Markdown table: readable in a terminal and ready for docs/BENCHMARKS.md."""
    lines = [
        "| kind | runs | median | p95 | max | goal (median) | keepalived (issue 2) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for kind, s in summaries.items():
        goal = GOAL_MEDIAN_MS[kind]
        verdict = "met" if s.median_ms <= goal else "MISSED"
        lines.append(
            f"| {TITLES[kind]} | {s.runs} | {s.median_ms:.0f} ms | {s.p95_ms:.0f} ms | "
            f"{s.max_ms:.0f} ms | <= {goal:.0f} ms: {verdict} | {KEEPALIVED_MS[kind]} |"
        )
    return "\n".join(lines)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.failover",
        description="crash failover and planned handover times of two sidecars",
    )
    parser.add_argument("--runs", type=int, default=20, help="runs of each kind [20]")
    parser.add_argument("--ttl", type=int, default=2, help="lease TTL of the sidecars [2]")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write samples here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    command = shlex.join(["python", "-m", "tests.bench.failover", *sys.argv[1:]])
    print(f"{command}: {args.runs} runs of each kind, TTL {args.ttl} s", flush=True)
    try:
        samples = measure(args.runs, args.ttl)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    summaries = {kind: summarize(values) for kind, values in samples.items()}
    print()
    print(table(summaries))
    if args.json is not None:
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command,
            "ttl": args.ttl,
            "samples_ms": samples,
            "summary": {kind: asdict(s) for kind, s in summaries.items()},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
