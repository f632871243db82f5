"""Session API benchmark: write latency and throughput, mirror lag, a standby's full re-read.

    python -m tests.bench.sessions [--records 100000] [--seconds 3]

One run, on a local 3-member etcd cluster (stock etcd settings, data on the machine's disk)
with two real sidecar processes, "a" (PRIMARY) and "b" (STANDBY). Records are ~400 bytes of
JSON, shaped like ThinLinc sessions. In order:

1. Write latency, 1 writer: sequential PutSession calls on the primary; ack latency as the
   client sees it.
2. Mirror lag: a WatchSessions stream (from 0) open on the standby; sequential puts on the
   primary; for each id, the time from the primary's ack arriving at the client to the
   standby's PUT event for that id arriving at the client (both on the monotonic clock of this
   process). Negative when the standby's event overtook the primary's answer.
   As a control, the same with no sidecar: a python3-etcd3 put, then the event of a watch read
   as the sidecar's follower reads it (sidecar.etcd.watch.Watch, in this process).
3. Throughput with 1, 8 and 32 concurrent writers (threads, one channel each) for --seconds
   each, beside raw etcd puts (python3-etcd3 ``put``, one client per thread, the same number of
   threads, the same record bytes, the same first endpoint the sidecar uses), run right after
   the sidecar figure at the same concurrency. Ratio = sidecar / raw. For both, the CPU time
   each process used per write (from /proc/<pid>/stat; "client" is this program), and for the
   sidecar the writes per etcd transaction (writes / revisions used). Then the ceiling: the
   same writers against a PutSession that does nothing (tests/bench/echo_server.py, grpcio's
   asyncio server in its own process, asked over a Unix socket as the primary's control socket
   is), the most any sidecar on this gRPC stack could answer on this machine; with 1 writer
   also that exchange and a raw put in series, since a lone writer waits for both. The
   primary's CPU per write over that server's CPU per call is the ratio issue 17 sets goals on,
   net of what each sidecar uses idle (measured over 3 s with no writes before these runs: its
   lease, member record and watches), which the do-nothing server does not have. Its floor
   is printed beside it: the do-nothing server plus this program's CPU for one writer-shaped
   etcd Txn on a grpc.aio channel (measured first, one at a time) divided by the writes per
   transaction of that run. The standby's CPU per applied write is what following a write
   costs (the primary follows its own writes the same way); its floor is the CPU of a process
   that only reads the same watch with the follower's stream code (tests/bench/watch_floor.py).
4. Full re-read: the standby is stopped, the sessions range is cleared and --records records
   are written straight to etcd in 128-put transactions; the standby is started again with an
   empty data dir. Time from its process start to its ``mirror_resynced`` log line (the log
   file is polled every 10 ms), and that line's own ``seconds`` (range read + copy build);
   then its VmRSS and VmHWM (peak) from /proc, once the copy has converted the re-read's JSON
   to its own form (``mirror_converted``, its ``seconds`` shown). Then, on the standby: a
   WatchSessions snapshot batched by 1,000 records an event (the goal's row) and one record an
   event, 100 pages of ListSessions, the same reads from the do-nothing server (the floors),
   and one ListSessions of every record.

The summary table at the end is meant for docs/BENCHMARKS.md as is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from etcd3 import etcdrpc
from google.protobuf.timestamp_pb2 import Timestamp

from sidecar import config
from sidecar.api import session_pb2, session_pb2_grpc
from sidecar.api.session_pb2 import (
    ListSessionsRequest,
    PutSessionRequest,
    Session,
    WatchSessionsRequest,
)
from sidecar.config import Settings
from sidecar.etcd.aiokv import AioKV
from sidecar.etcd.client import Etcd
from sidecar.lab.etcdbinary import find_etcd_binary
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar
from sidecar.sessions.record import encode_session

CLUSTER = "bench"
TTL = 3
TXN_OPS = 128  # etcd's default --max-txn-ops
BIG_MESSAGES = [("grpc.max_receive_message_length", -1)]
SNAPSHOT_BATCH = 1000  # records per SNAPSHOT event in the batched snapshot, as a page of a list


def session(tag: str, n: int) -> Session:
    """A ThinLinc-like record of ~400 bytes of JSON."""
    return Session(
        session_id=f"{tag}-{n:07d}",
        username=f"user{n % 5000:04d}@example.com",
        agent_hostname=f"agent{n % 40:02d}.example.com",
        agent_address=f"10.1.{n % 40}.{n % 250 + 1}",
        display=10 + n % 1000,
        status="running",
        connection_status="connected",
        created_at=Timestamp(seconds=1_700_000_000 + n),
        last_connection_at=Timestamp(seconds=1_700_000_000 + n, nanos=123_000_000),
        last_client_address=f"198.51.100.{n % 254 + 1}",
        terminal_id=f"term-{n:08x}",
        framebuffer_size="1920x1080",
        session_pid=20_000 + n,
        subcluster="default",
    )


def ms(seconds: float) -> float:
    return seconds * 1000.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100.0 * (len(ordered) - 1)))]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Row:
    what: str
    value: str
    goal: str = ""
    met: bool | None = None


class Bench:
    def __init__(self, etcd: LocalEtcdCluster, workdir: Path, args: argparse.Namespace) -> None:
        self.etcd = etcd
        self.workdir = workdir
        self.args = args
        self.rows: list[Row] = []
        self.figures: dict[str, float] = {}  # for --json: the issue-17 ratios, as numbers
        self.idle: dict[str, float] = {}
        self.txn_cpu = 0.0  # client CPU µs of one etcd Txn, one at a time
        self.echo: subprocess.Popen[str] | None = None
        self.watcher: subprocess.Popen[str] | None = None
        self.echo_address = ""
        self.echo_tcp = ""
        self.prefix = f"/thinlinc-ha/{CLUSTER}/sessions/".encode()
        self.primary = LocalSidecar("a", CLUSTER, etcd.endpoints_arg, workdir, ttl=TTL)
        self.standby = LocalSidecar("b", CLUSTER, etcd.endpoints_arg, workdir, ttl=TTL)

    def row(self, what: str, value: str, goal: str = "", met: bool | None = None) -> None:
        self.rows.append(Row(what, value, goal, met))
        say(f"  {what}: {value}")

    # -- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        # Session writes go to the primary's control socket (Unix), so the do-nothing server is
        # asked on a Unix socket too: TCP on loopback costs each side more CPU per call.
        socket = self.workdir / "echo.sock"
        self.echo = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.echo_server", str(socket)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.echo.stdout is not None
        # Its TCP port, once it serves: for the reads, asked over TCP as the standby's are.
        self.echo_tcp = f"127.0.0.1:{self.echo.stdout.readline().strip()}"
        self.echo_address = f"unix:{socket}"
        self.primary.start()
        self.primary.wait_role("PRIMARY", timeout=15)
        self.standby.start()
        self.standby.wait_role("STANDBY", timeout=15)

    def close(self) -> None:
        for node in (self.primary, self.standby):
            node.close()
        for process in (self.echo, self.watcher):
            if process is not None:
                process.kill()
                process.wait()

    # -- 1. latency -------------------------------------------------------------------------------

    def latency(self) -> None:
        count = self.args.latency_count
        say(f"write latency: {count} sequential PutSession on the primary")
        with grpc.insecure_channel(self.primary.control_address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            for n in range(50):  # warm-up: connection, first txns
                stub.PutSession(PutSessionRequest(session=session("warm", n)), timeout=5)
            samples = []
            for n in range(count):
                request = PutSessionRequest(session=session("lat", n))
                started = time.monotonic()
                stub.PutSession(request, timeout=5)
                samples.append(time.monotonic() - started)
        median, p99 = ms(statistics.median(samples)), ms(percentile(samples, 99))
        self.row("write ack latency, 1 writer, median", f"{median:.2f} ms")
        self.row("write ack latency, 1 writer, p99", f"{p99:.2f} ms")

    # -- 2. mirror lag ----------------------------------------------------------------------------

    def mirror_lag(self) -> None:
        count = self.args.lag_count
        say(f"mirror lag: {count} sequential puts on the primary, WatchSessions on the standby")
        arrivals: dict[str, float] = {}
        ready, done = threading.Event(), threading.Event()
        tag = "lag"

        def watch(call: Any) -> None:
            with contextlib.suppress(grpc.RpcError):
                for event in call:
                    if event.type == session_pb2.SESSION_EVENT_TYPE_SNAPSHOT_DONE:
                        ready.set()
                    elif (
                        event.type == session_pb2.SESSION_EVENT_TYPE_PUT
                        and event.session_id.startswith(tag)
                    ):
                        arrivals[event.session_id] = time.monotonic()
                        if len(arrivals) == count:
                            done.set()

        acks: dict[str, float] = {}
        with (
            grpc.insecure_channel(self.standby.address, options=BIG_MESSAGES) as watch_channel,
            grpc.insecure_channel(self.primary.control_address) as put_channel,
        ):
            call = session_pb2_grpc.SessionServiceStub(watch_channel).WatchSessions(
                WatchSessionsRequest(start_revision=0)
            )
            watcher = threading.Thread(target=watch, args=(call,), daemon=True)
            watcher.start()
            if not ready.wait(30):
                raise RuntimeError("the standby's watch sent no SNAPSHOT_DONE")
            stub = session_pb2_grpc.SessionServiceStub(put_channel)
            for n in range(count):
                record = session(tag, n)
                stub.PutSession(PutSessionRequest(session=record), timeout=5)
                acks[record.session_id] = time.monotonic()
            done.wait(30)
            call.cancel()
            watcher.join(5)
        lags = [arrivals[i] - acks[i] for i in acks if i in arrivals]
        if len(lags) < count:
            raise RuntimeError(f"only {len(lags)} of {count} puts reached the standby's watch")
        p99 = ms(percentile(lags, 99))
        self.row(
            "mirror lag (primary ack -> standby watch event), median",
            f"{ms(statistics.median(lags)):.2f} ms",
        )
        slow = sum(1 for lag in lags if lag > 0.05)
        self.row(
            "mirror lag, p99",
            f"{p99:.2f} ms (max {ms(max(lags)):.0f} ms; {slow} of {count} over 50 ms)",
            "<= 50 ms",
            p99 <= 50,
        )
        raw = self._raw_watch_lag(count)
        self.row(
            "control: raw etcd put -> etcd watch event, median / p99",
            f"{ms(statistics.median(raw)):.2f} / {ms(percentile(raw, 99)):.2f} ms "
            f"(max {ms(max(raw)):.0f} ms)",
        )

    def _raw_watch_lag(self, count: int) -> list[float]:
        """The same measure without the sidecars: a plain put, then the event of an etcd watch
        read the way the sidecar's follower reads it (sidecar.etcd.watch.Watch)."""
        return asyncio.run(self._raw_watch_lag_async(count))

    async def _raw_watch_lag_async(self, count: int) -> list[float]:
        prefix = b"/bench-lag-raw/"
        settings = self._client_settings()
        etcd = Etcd(settings, timeout=5.0)
        acks: dict[bytes, float] = {}
        arrivals: dict[bytes, float] = {}

        def put_all() -> None:
            with self.etcd.client() as client:
                for n in range(count):
                    record = session("rawlag", n)
                    key = prefix + record.session_id.encode()
                    client.put(key, encode_session(record))
                    acks[key] = time.monotonic()

        try:
            async with etcd.watch(prefix, prefix=True) as watch:
                await asyncio.sleep(0.5)  # the watch is registered
                putter = asyncio.create_task(asyncio.to_thread(put_all))
                async with asyncio.timeout(60):
                    async for batch in watch:
                        for event in batch.events:
                            arrivals[event.key] = time.monotonic()
                        if len(arrivals) == count:
                            break
                await putter
        finally:
            etcd.close()
        with self.etcd.client() as client:
            client.delete_prefix(prefix)
        return [arrivals[k] - acks[k] for k in acks if k in arrivals]

    # -- 3. throughput ----------------------------------------------------------------------------

    def throughput(self) -> None:
        self.idle = self._idle_cpu()
        self.txn_cpu = self._txn_client_cpu()
        self.row("one etcd Txn as the writer sends it (aio channel, one at a time): client CPU",
                 f"{self.txn_cpu:.0f} µs")
        # The standby's floor, for these runs only: a process that only reads the same watch.
        self.watcher = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.watch_floor", self.etcd.endpoints_arg,
             f"/thinlinc-ha/{CLUSTER}/"], stdout=subprocess.PIPE, text=True,
        )
        assert self.watcher.stdout is not None
        self.watcher.stdout.readline()
        try:
            self._throughput_runs()
        finally:
            self.watcher.kill()
            self.watcher.wait()
            self.watcher = None

    def _throughput_runs(self) -> None:
        for threads in self.args.writers:
            say(f"throughput: {threads} writer(s), {self.args.seconds} s each")
            sidecar, cpu, per_txn = self._measured(threads, self._sidecar_writer)
            raw, raw_cpu, _ = self._measured(threads, self._raw_writer)
            echo, echo_cpu, _ = self._measured(threads, self._echo_writer)
            ratio = sidecar / raw
            goal = {32: 0.7}.get(threads)
            self.figures[f"throughput_ratio_{threads}"] = ratio
            self.row(
                f"throughput, {threads} writer(s): sidecar / raw etcd put",
                f"{sidecar:,.0f} / {raw:,.0f} writes/s = {ratio:.2f}",
                f">= {goal}" if goal else "",
                ratio >= goal if goal else None,
            )
            self._cpu_ratios(threads, cpu, echo_cpu, sidecar, per_txn)
            self.row(
                f"CPU per write, {threads} writer(s): sidecar path (raw etcd put)",
                f"client {cpu['client']:.0f} ({raw_cpu['client']:.0f}), primary "
                f"{cpu['primary']:.0f}, standby {cpu['standby']:.0f}, 3 etcd members "
                f"{cpu['etcd']:.0f} ({raw_cpu['etcd']:.0f}) µs; {per_txn:.1f} writes per txn",
            )
            self._throughput_floor(threads, cpu, raw_cpu, echo_cpu)
            self.row(
                f"ceiling, {threads} writer(s): a PutSession that does nothing (gRPC alone)",
                self._ceiling(threads, raw, echo, echo_cpu),
            )

    def _throughput_floor(self, threads: int, cpu: dict[str, float], raw_cpu: dict[str, float],
                          echo_cpu: dict[str, float]) -> None:
        """On two shared cores the writes are CPU-bound: the throughput ratio is about the raw
        put's CPU per write over the sidecar path's, every process that ran counted (the
        watch-floor process ran in both). Its floor: the same with the primary and the
        standby at their floors (the rows above)."""
        shared = ("client", "etcd", "watcher")
        raw = sum(raw_cpu[name] for name in shared)
        path = sum(cpu[name] for name in (*shared, "primary", "standby"))
        primary_floor = self.figures[f"cpu_ratio_floor_{threads}"] * echo_cpu["echo"]
        least = path - cpu["primary"] - cpu["standby"] + primary_floor + cpu["watcher"]
        self.figures[f"throughput_model_{threads}"] = raw / path
        self.figures[f"throughput_floor_{threads}"] = raw / least
        self.row(
            f"throughput ratio, {threads} writer(s), as CPU per write predicts it: raw put's / "
            "sidecar path's (client, etcd, watch floor, primary, standby)",
            f"{raw:.0f} / {path:.0f} µs = {raw / path:.2f}",
        )
        self.row(
            f"floor of the throughput ratio, {threads} writer(s): the same with the primary "
            f"and the standby at their floors",
            f"{raw:.0f} / {least:.0f} µs = {raw / least:.2f}",
        )

    def _idle_cpu(self, seconds: float = 3.0) -> dict[str, float]:
        """CPU seconds per second each sidecar uses with no writes (keepalives, member
        records, the watches): the share of a write's CPU that is not the write's."""
        pids = {"primary": self.primary.pid, "standby": self.standby.pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        time.sleep(seconds)
        took = time.monotonic() - started
        idle = {name: (cpu_seconds(pid) - before[name]) / took for name, pid in pids.items()}
        self.row("idle CPU with no writes (primary, standby)",
                 f"{idle['primary'] * 1e3:.1f}, {idle['standby'] * 1e3:.1f} ms/s")
        return idle

    def _client_settings(self) -> Settings:
        """Settings for this program's own etcd clients, on the benchmark's cluster."""
        return config.build({"node_id": "bench", "etcd_endpoints": self.etcd.endpoints_arg})

    def _txn_client_cpu(self, count: int = 500) -> float:
        """CPU µs of this process per etcd Txn shaped like the writer's (a compare and a put
        of a record) on a ``grpc.aio`` channel as the writer's, sent one at a time: what a
        transaction costs the primary outside its gRPC server, however little it does."""
        settings = self._client_settings()
        key = b"/bench-txn/sequence"
        request = etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=key, target=etcdrpc.Compare.VERSION,
                                     result=etcdrpc.Compare.GREATER, version=-1)],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
                key=key, value=encode_session(session("txn", 0))))])

        async def measure() -> float:
            kv = AioKV(settings)
            try:
                for _ in range(50):
                    await kv.txn(request, 5, "bench txn")
                before = time.process_time()
                for _ in range(count):
                    await kv.txn(request, 5, "bench txn")
                return 1e6 * (time.process_time() - before) / count
            finally:
                await kv.close()

        try:
            return asyncio.run(measure())
        finally:
            with self.etcd.client() as client:
                client.delete(key)

    def _cpu_ratios(self, threads: int, cpu: dict[str, float], echo_cpu: dict[str, float],
                    rate: float, per_txn: float) -> None:
        """The primary's CPU per write against the do-nothing server's CPU per call, both
        asked over a Unix socket in this run; and the standby's CPU per applied write. The
        ratio is of the CPU net of what the sidecar uses idle over the same time (the do-
        nothing server has no lease to keep), which at 1 writer (~200 writes/s) is most of it;
        the gross figure is shown beside it. Beside them the floor of the ratio: the do-nothing
        server's CPU per call plus the client CPU of one etcd Txn shared by the writes per
        transaction of this run, over the do-nothing server's CPU per call."""
        idle = {name: 1e6 * self.idle[name] / rate for name in self.idle}  # µs per write
        primary, floor = cpu["primary"] - idle["primary"], echo_cpu["echo"]
        standby = cpu["standby"] - idle["standby"]
        goal = {1: 1.5, 32: 1.3}.get(threads)
        self.figures[f"primary_cpu_{threads}"] = primary
        self.figures[f"primary_cpu_gross_{threads}"] = cpu["primary"]
        self.figures[f"echo_cpu_{threads}"] = floor
        self.figures[f"cpu_ratio_{threads}"] = primary / floor
        self.figures[f"cpu_ratio_gross_{threads}"] = cpu["primary"] / floor
        self.figures[f"standby_cpu_{threads}"] = standby
        self.figures[f"standby_cpu_gross_{threads}"] = cpu["standby"]
        self.row(
            f"primary CPU per write (net of idle) / do-nothing server CPU per call, "
            f"{threads} writer(s)",
            f"{primary:.0f} / {floor:.0f} µs = {primary / floor:.2f} (gross {cpu['primary']:.0f}"
            f" µs = {cpu['primary'] / floor:.2f})",
            f"<= {goal}" if goal else "",
            primary / floor <= goal if goal else None,
        )
        least = (floor + self.txn_cpu / per_txn) / floor
        self.figures[f"cpu_ratio_floor_{threads}"] = least
        self.row(
            f"floor of that ratio, {threads} writer(s): (do-nothing server + one Txn's client "
            f"CPU / writes per txn) / do-nothing server",
            f"({floor:.0f} + {self.txn_cpu:.0f} / {per_txn:.1f}) / {floor:.0f} = {least:.2f}",
        )
        self.row(
            f"standby CPU per applied write (net of idle), {threads} writer(s)",
            f"{standby:.0f} µs (gross {cpu['standby']:.0f} µs)",
            "<= 100 µs" if threads == 32 else "",
            standby <= 100 if threads == 32 else None,
        )
        self.figures[f"watch_floor_cpu_{threads}"] = cpu["watcher"]
        self.row(
            f"floor of that, {threads} writer(s): a process that only reads the same watch",
            f"{cpu['watcher']:.0f} µs per write",
        )

    def _measured(
        self, threads: int, writer: Callable[[int, threading.Barrier, list[int]], None]
    ) -> tuple[float, dict[str, float], float]:
        """Writes/s, CPU µs per write of each process group, and writes per etcd revision."""
        groups = {
            "client": [os.getpid()],
            "primary": [self.primary.pid],
            "standby": [self.standby.pid],
            "etcd": [m.pid for m in self.etcd.members if m.pid is not None],
            "echo": [self.echo.pid] if self.echo is not None else [],
            "watcher": [self.watcher.pid] if self.watcher is not None else [],
        }
        before = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}
        first = self._revision()
        started = time.monotonic()
        rate = self._run_writers(threads, writer)
        writes = rate * (time.monotonic() - started)
        revisions = max(1, self._revision() - first)
        used = {
            name: 1e6 * (sum(cpu_seconds(pid) for pid in pids) - before[name]) / writes
            for name, pids in groups.items()
        }
        return rate, used, writes / revisions

    @staticmethod
    def _ceiling(threads: int, raw: float, echo: float, echo_cpu: dict[str, float]) -> str:
        """What the gRPC layer alone allows, as a ratio to raw puts.

        No sidecar on this stack answers faster than a server that does nothing. A single
        writer waits for one gRPC exchange and then one etcd commit per write, one after the
        other, so its ceiling is their serial sum; with many writers the exchanges overlap
        and the do-nothing server's own rate is the bound.
        """
        text = (f"{echo:,.0f} calls/s = {echo / raw:.2f} x raw; its CPU per call: client "
                f"{echo_cpu['client']:.0f}, server {echo_cpu['echo']:.0f} µs")
        if threads == 1:
            serial = 1 / (1 / echo + 1 / raw)
            text += (f"; 1 exchange + 1 raw put in series: {serial:,.0f} writes/s = "
                     f"{serial / raw:.2f} x raw")
        return text

    def _revision(self) -> int:
        with self.etcd.client() as client:
            return int(client.get_response(b"\0").header.revision)

    def _run_writers(
        self, threads: int, writer: Callable[[int, threading.Barrier, list[int]], None]
    ) -> float:
        barrier = threading.Barrier(threads + 1)
        counts = [0] * threads
        workers = [
            threading.Thread(target=writer, args=(t, barrier, counts), daemon=True)
            for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        barrier.wait()  # every writer is connected and warm
        started = time.monotonic()
        self._stop_at = started + self.args.seconds
        barrier.wait()  # go
        for worker in workers:
            worker.join()
        return sum(counts) / (time.monotonic() - started)

    def _records(self, tag: str) -> Iterator[Session]:
        n = 0
        while True:
            yield session(tag, n)
            n += 1

    def _sidecar_writer(self, index: int, barrier: threading.Barrier, counts: list[int]) -> None:
        self._grpc_writer(self.primary.control_address, index, barrier, counts)

    def _echo_writer(self, index: int, barrier: threading.Barrier, counts: list[int]) -> None:
        self._grpc_writer(self.echo_address, index, barrier, counts)

    def _grpc_writer(
        self, address: str, index: int, barrier: threading.Barrier, counts: list[int]
    ) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            records = self._records(f"tp{index}")
            for _ in range(3):
                stub.PutSession(PutSessionRequest(session=next(records)), timeout=5)
            barrier.wait()
            barrier.wait()
            while time.monotonic() < self._stop_at:
                stub.PutSession(PutSessionRequest(session=next(records)), timeout=5)
                counts[index] += 1

    def _raw_writer(self, index: int, barrier: threading.Barrier, counts: list[int]) -> None:
        with self.etcd.client() as client:
            records = (
                (b"/bench-raw/" + r.session_id.encode(), encode_session(r))
                for r in self._records(f"raw{index}")
            )
            for _ in range(3):
                client.put(*next(records))
            barrier.wait()
            barrier.wait()
            while time.monotonic() < self._stop_at:
                client.put(*next(records))
                counts[index] += 1

    # -- 4. full re-read --------------------------------------------------------------------------

    def full_reread(self) -> None:
        total = self.args.records
        say(f"full re-read: {total:,} records written straight to etcd, standby restarted empty")
        self.standby.close()
        with self.etcd.client() as client:
            client.delete_prefix(self.prefix)
            client.delete_prefix(b"/bench-raw/")
        started = time.monotonic()
        self._bulk_load(total)
        say(f"  (bulk load took {time.monotonic() - started:.1f} s)")
        time.sleep(2.0)  # let the primary's follower apply the load before we time the standby
        shutil.rmtree(self.standby.data_dir, ignore_errors=True)
        offset = self.standby.log_path.stat().st_size
        started = time.monotonic()
        self.standby.start(wait=False)
        line = self._wait_log_event("mirror_resynced", offset, timeout=120)
        elapsed = time.monotonic() - started
        if line.get("records") != total:
            raise RuntimeError(f"the standby re-read {line.get('records')} records, not {total}")
        self.row(
            f"standby full re-read of {total:,} records: start -> mirror_resynced",
            f"{elapsed:.2f} s (range read + copy build {line['seconds']:.2f} s)",
            "<= 3 s",
            elapsed <= 3.0,
        )
        # The re-read takes etcd's JSON; the copy converts it to its own form after its first
        # flush. The reads below are measured once that is done (a read meanwhile decodes JSON).
        converted = self._wait_log_event("mirror_converted", offset, timeout=60)
        self.figures["convert_seconds"] = converted["seconds"]
        self.row("standby: the re-read's records converted to the copy's form after it "
                 "(mirror_converted)", f"{converted['seconds']:.2f} s")
        time.sleep(1.0)  # the copy's first snapshot is flushed to disk right after
        rss, hwm = memory(self.standby.pid)
        self.row(
            f"standby resident memory with {total:,} records (VmRSS)",
            f"{rss / 1024:.1f} MB (peak VmHWM {hwm / 1024:.1f} MB)",
            "<= 80 MB",
            rss / 1024 <= 80,
        )
        p_rss, p_hwm = memory(self.primary.pid)
        self.row(
            f"primary resident memory with {total:,} records (VmRSS)",
            f"{p_rss / 1024:.1f} MB (peak VmHWM {p_hwm / 1024:.1f} MB)",
        )
        with grpc.insecure_channel(self.standby.address, options=BIG_MESSAGES) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            self._watch_snapshot(stub, total)
            self._list_pages(stub, total)
            self._read_floors(total)
            asked = time.monotonic()
            listed = stub.ListSessions(ListSessionsRequest(), timeout=120)
            took = time.monotonic() - asked
        if len(listed.sessions) != total:
            raise RuntimeError(f"ListSessions on the standby has {len(listed.sessions)}")
        self.row(f"ListSessions of {total:,} records on the standby", f"{took:.2f} s")
        rss, _ = memory(self.standby.pid)
        self.row("standby VmRSS after that ListSessions", f"{rss / 1024:.1f} MB")

    def _read_floors(self, total: int) -> None:
        """The same two reads from the do-nothing server (ready-made records, no store): what
        gRPC alone costs for that many records, server and client on this machine."""
        with grpc.insecure_channel(self.echo_tcp, options=BIG_MESSAGES) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            for name, read in (
                ("snapshot_floor_seconds", self._snapshot_reader(stub, total, SNAPSHOT_BATCH)),
                ("snapshot_unbatched_floor_seconds", self._snapshot_reader(stub, total)),
                ("list_pages_floor_seconds", self._pages_reader(stub, str(total))),
            ):
                asked = time.monotonic()
                records, _ = read()
                took = time.monotonic() - asked
                if records != total:
                    raise RuntimeError(f"the do-nothing server sent {records} records")
                self.figures[name] = took
                what = {"snapshot_floor_seconds": f"WatchSessions snapshot, {SNAPSHOT_BATCH:,} "
                                                  "an event,",
                        "snapshot_unbatched_floor_seconds": "WatchSessions snapshot, one an event,",
                        }.get(name, "100 pages of ListSessions")
                self.row(f"floor: {what} of {total:,} ready-made records from the do-nothing "
                         "server", f"{took:.2f} s")

    def _watch_snapshot(self, stub: session_pb2_grpc.SessionServiceStub, total: int) -> None:
        """WatchSessions(0) on the standby until SNAPSHOT_DONE, batched (SNAPSHOT_BATCH records
        an event) and one record an event: time and memory after."""
        read = self._snapshot_reader(stub, 0, SNAPSHOT_BATCH)
        self._read_back(f"WatchSessions snapshot of {total:,} records on the standby, "
                        f"{SNAPSHOT_BATCH:,} an event", total, read, goal=3.0,
                        name="snapshot_seconds")
        read = self._snapshot_reader(stub, 0)
        self._read_back(f"WatchSessions snapshot of {total:,} records on the standby, one an "
                        "event", total, read, goal=None, name="snapshot_unbatched_seconds")

    def _snapshot_reader(self, stub: session_pb2_grpc.SessionServiceStub, start: int,
                         batch: int = 0) -> Callable[[], tuple[int, str]]:
        """Reads a WatchSessions(start, batch) until SNAPSHOT_DONE (the do-nothing server takes
        the start revision as the number of records to send)."""

        def read() -> tuple[int, str]:
            done = session_pb2.SESSION_EVENT_TYPE_SNAPSHOT_DONE
            call = stub.WatchSessions(
                WatchSessionsRequest(start_revision=start, snapshot_batch=batch), timeout=120)
            records = 0
            try:
                for event in call:
                    if event.type == done:
                        break
                    records += len(event.sessions) if batch else 1
            finally:
                call.cancel()
            return records, ""

        return read

    def _list_pages(self, stub: session_pb2_grpc.SessionServiceStub, total: int) -> None:
        """ListSessions on the standby page by page (1,000 a page): time and memory after."""
        self._read_back(
            f"ListSessions of {total:,} records on the standby, 1,000 a page", total,
            self._pages_reader(stub), goal=2.0, name="list_pages_seconds",
        )

    @staticmethod
    def _pages_reader(stub: session_pb2_grpc.SessionServiceStub, first: str = ""
                      ) -> Callable[[], tuple[int, str]]:
        """Reads ListSessions 1,000 a page from page token ``first`` (the do-nothing server
        takes it as the number of records to send) to the end."""

        def read() -> tuple[int, str]:
            token, records, pages = first, 0, 0
            while True:
                page = stub.ListSessions(
                    ListSessionsRequest(page_size=1000, page_token=token), timeout=30
                )
                records, pages = records + len(page.sessions), pages + 1
                token = page.next_page_token
                if not token:
                    return records, f" for {pages} pages"

        return read

    def _read_back(self, what: str, total: int, read: Callable[[], tuple[int, str]], *,
                   goal: float | None, name: str) -> None:
        """Time ``read`` (records seen, a note), check it saw every record, and report the
        standby's memory after it."""
        asked = time.monotonic()
        records, note = read()
        took = time.monotonic() - asked
        if records != total:
            raise RuntimeError(f"{what}: {records} records, not {total}")
        rss, _ = memory(self.standby.pid)
        self.figures[name] = took
        self.row(what, f"{took:.2f} s{note}; standby VmRSS after it {rss / 1024:.1f} MB",
                 "" if goal is None else f"<= {goal:g} s",
                 None if goal is None else took <= goal)

    def _bulk_load(self, total: int, threads: int = 4) -> None:
        def load(part: int) -> None:
            with self.etcd.client(timeout=30) as client:
                for first in range(part * TXN_OPS, total, TXN_OPS * threads):
                    ops = []
                    for n in range(first, min(first + TXN_OPS, total)):
                        record = session("bulk", n)
                        ops.append(
                            client.transactions.put(
                                self.prefix + record.session_id.encode(), encode_session(record)
                            )
                        )
                    client.transaction(compare=[], success=ops, failure=[])

        workers = [threading.Thread(target=load, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def _wait_log_event(self, event: str, offset: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.standby.log_path.open("rb") as log:
                log.seek(offset)
                for raw in log.read().splitlines():
                    with contextlib.suppress(ValueError):
                        line = json.loads(raw)
                        if isinstance(line, dict) and line.get("event") == event:
                            return line
            if not self.standby.running:
                raise RuntimeError(f"the standby exited:\n{self.standby.log_tail()}")
            time.sleep(0.01)
        raise TimeoutError(f"no {event} in the standby's log within {timeout} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    etcd = subprocess.run(
        [str(find_etcd_binary()), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python "
        f"{platform.python_version()}, {etcd}, grpcio {grpc.__version__}; "
        f"load average before the run {load}"
    )


def table(rows: list[Row]) -> str:
    lines = ["| measure | result | goal | met |", "|---|---|---|---|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.what} | {row.value} | {row.goal} | {met} |")
    return "\n".join(lines)


PHASES: dict[str, Callable[[Bench], None]] = {
    "latency": Bench.latency,
    "lag": Bench.mirror_lag,
    "throughput": Bench.throughput,
    "reread": Bench.full_reread,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--records", type=int, default=100_000, help="records for the full re-read (default 100000)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="length of each throughput measurement (default 3)",
    )
    parser.add_argument("--latency-count", type=int, default=1000)
    parser.add_argument("--lag-count", type=int, default=1000)
    parser.add_argument(
        "--writers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 8, 32],
        help="concurrent writers of the throughput runs, comma-separated (default 1,8,32)",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: text.split(","),
        default=list(PHASES),
        help=f"which parts to run, comma-separated (default {','.join(PHASES)})",
    )
    parser.add_argument("--json", type=Path, help="also write the rows and figures here")
    args = parser.parse_args(argv)
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}")
    note = machine()
    command = "python -m tests.bench.sessions " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-sessions-") as work,
        LocalEtcdCluster(workdir=Path(work) / "etcd") as etcd,
    ):
        bench = Bench(etcd, Path(work), args)
        try:
            bench.start()
            for phase in args.phases:
                PHASES[phase](bench)
        finally:
            bench.close()
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Measured {today} with `{command.strip()}`\n\nMachine: {note}\n")
    print(table(bench.rows))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "when": today, "machine": note, "load_after": os.getloadavg(),
            "figures": bench.figures, "rows": [vars(row) for row in bench.rows],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
