"""Benchmark: planned moves of the primary role (not a test; prints figures).

    python -m tests.bench.switchover [--runs 20] [--ttl 2] [--failback-delay 1]

A local 3-member etcd cluster and two sidecars: "a" is the preferred primary. Each run makes
one operator switchover (a -> b, through RoleService.Switchover) and then lets the failback
bring the role back (b -> a, asked for by a after the delay). Both are timed from the request
appearing in etcd (the ``switchover`` key) to the new primary serving (its members/ record says
PRIMARY under the new leader key's epoch), all seen by one etcd watch in this process, so both
ends of each interval come from the same clock and the same path. The switchover is also timed
from the client's side (the RPC returns once the target serves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sidecar import client, config
from sidecar.etcd.client import Etcd
from sidecar.etcd.watch import EventType
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

from ..sidecars import wait_member_record

CLUSTER = "bench"


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a measured sample, not an interpolation."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))]


class Timeline:
    """Every PUT under the cluster prefix, with its arrival time, from one etcd watch.

    The watch is the sidecar's own (sidecar.etcd.watch.Watch) on an event loop in a thread: the
    client library's watcher crashes when its stream ends (it calls an undefined ``six``).
    """

    def __init__(self, etcd: LocalEtcdCluster) -> None:
        self.settings = config.build({"node_id": "bench", "cluster": CLUSTER,
                                      "etcd_endpoints": etcd.endpoints_arg})
        self.prefix = self.settings.prefix
        self.events: queue.Queue[tuple[float, str, Any]] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        ready = threading.Event()
        self.task = asyncio.run_coroutine_threadsafe(self._follow(ready), self.loop)
        ready.wait(10)

    async def _follow(self, ready: threading.Event) -> None:
        gateway = Etcd(self.settings)
        try:
            async with gateway.watch(self.prefix.encode(), prefix=True) as watch:
                ready.set()
                async for batch in watch:
                    now = time.monotonic()
                    for event in batch.events:
                        if event.type is EventType.PUT:
                            self._add(now, event.key.decode(), event.value,
                                      event.create_revision)
        finally:
            gateway.close()

    def _add(self, now: float, key: str, raw: bytes, create_revision: int) -> None:
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        self.events.put((now, key[len(self.prefix):], (value, create_revision)))

    def wait_move(self, target: str, timeout: float = 15.0) -> float:
        """Seconds from the next switchover request to ``target`` serving as PRIMARY."""
        requested, epoch = None, 0
        deadline = time.monotonic() + timeout
        while True:
            at, key, (value, create_revision) = self.events.get(
                timeout=max(0.01, deadline - time.monotonic()))
            if key == "switchover" and value and value.get("target") == target:
                requested = requested or at
            elif key == "leader" and value and value.get("node_id") == target:
                epoch = create_revision
            elif (key == f"members/{target}" and requested and epoch and value
                  and value.get("role") == "ROLE_PRIMARY" and value.get("epoch") == epoch):
                return at - requested

    def close(self) -> None:
        self.task.cancel()
        time.sleep(0.1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def run(runs: int, ttl: int, delay: float) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"switchover (etcd view)": [],
                                       "switchover (client RPC)": [],
                                       "failback": []}
    work = Path(tempfile.mkdtemp(prefix="vsm-bench-"))
    with LocalEtcdCluster() as etcd:
        a = LocalSidecar("a", CLUSTER, etcd.endpoints_arg, work, ttl=ttl,
                         extra_args=["--preferred-primary", "--failback-delay", str(delay)])
        b = LocalSidecar("b", CLUSTER, etcd.endpoints_arg, work, ttl=ttl)
        timeline = Timeline(etcd)
        try:
            a.start().wait_role("PRIMARY")
            b.start().wait_role("STANDBY")
            for i in range(1, runs + 1):
                # b is a switchover target again once its members/ record says so.
                wait_member_record(etcd, CLUSTER, "b", 15.0, role="ROLE_STANDBY",
                                   copy_current=True)
                waiter = _background(timeline.wait_move, "b")
                started = time.monotonic()
                client.switchover(a.control_address, "b")
                rpc = time.monotonic() - started
                etcd_view = waiter()
                fail_back = timeline.wait_move("a", timeout=delay + 15)
                results["switchover (client RPC)"].append(rpc)
                results["switchover (etcd view)"].append(etcd_view)
                results["failback"].append(fail_back)
                print(f"run {i:2}/{runs}: switchover a->b {etcd_view * 1000:6.1f} ms "
                      f"(RPC {rpc * 1000:6.1f} ms), failback b->a {fail_back * 1000:6.1f} ms",
                      flush=True)
        finally:
            timeline.close()
            a.close()
            b.close()
    return results


def _background(fn: Any, *args: Any) -> Any:
    """Run fn(*args) in a thread now; the returned callable joins it and gives its result."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(30)
        return box[0]

    return join


def table(results: dict[str, list[float]]) -> str:
    rows = ["| move | runs | median | p95 | max | goal (median) |",
            "|---|---:|---:|---:|---:|---|"]
    for name, samples in results.items():
        median = statistics.median(samples) * 1000
        goal = "<= 100 ms: " + ("met" if median <= 100 else "missed")
        rows.append(f"| {name} | {len(samples)} | {median:.1f} ms | "
                    f"{percentile(samples, 0.95) * 1000:.1f} ms | "
                    f"{max(samples) * 1000:.1f} ms | {goal} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=2)
    parser.add_argument("--failback-delay", type=float, default=1.0)
    args = parser.parse_args()
    print(table(run(args.runs, args.ttl, args.failback_delay)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
