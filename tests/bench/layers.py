"""The primary's server side, layer by layer: what each adds to a session write's CPU.

    python -m tests.bench.layers [--seconds 4] [--rounds 3] [--writers 1,32]

Three servers, each in its own process on its own Unix socket, all grpcio's asyncio server as
the sidecar runs it:

* ``echo``: a PutSession that does nothing (tests/bench/echo_server.py's servicer), the floor
  that tests.bench.sessions divides the primary's CPU by;
* ``guards``: the same servicer behind the sidecar's two interceptors (who may change things,
  and the refusal of undecodable requests);
* ``servicer``: the sidecar's own SessionServicer behind both interceptors (the request copied,
  validated and encoded to the record's JSON, the answer built) over a writer that
  acknowledges every write at once, without etcd.

For each number of writers (threads of this process, one channel each, the records of
tests.bench.sessions), every round runs each server for ``--seconds`` in turn; a figure is the
server's CPU per call (from /proc), median of the rounds. What ``servicer`` costs above
``echo`` is the sidecar's server side; the rest of the primary's CPU per write in
tests.bench.sessions is the writer with its etcd transaction and the follower of its own writes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from sidecar.api import session_pb2_grpc
from sidecar.api.session_pb2 import PutSessionRequest
from sidecar.endpoints.grpc_access import AccessGuard, AccessPolicy
from sidecar.endpoints.grpc_role import RequestGuard
from sidecar.endpoints.grpc_sessions import SessionServicer

from .echo_server import Echo
from .sessions import cpu_seconds, machine, session

KINDS = ("echo", "guards", "servicer")


class AtOnce:
    """A writer that acknowledges every write at once, at revision 1."""

    async def put_encoded(self, session_id: str, raw: bytes) -> int:
        return 1


async def serve(kind: str, socket: str) -> None:
    policy = AccessPolicy(socket=Path(socket), group=None, writers=frozenset(),
                          open_to_all=False, user="bench")
    interceptors = [] if kind == "echo" else [AccessGuard(policy), RequestGuard()]
    server = grpc.aio.server(interceptors=interceptors)
    no: Any = None
    servicer = Echo() if kind != "servicer" else SessionServicer(no, no, AtOnce())  # type: ignore[arg-type]
    session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def _write(address: str, tag: str, stop: list[float], barrier: threading.Barrier,
           counts: list[int], index: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        for n in range(3):
            stub.PutSession(PutSessionRequest(session=session(tag, n)), timeout=5)
        barrier.wait()
        barrier.wait()
        n = 3
        while time.monotonic() < stop[0]:
            stub.PutSession(PutSessionRequest(session=session(tag, n)), timeout=5)
            n += 1
        counts[index] = n - 3


def measure(pid: int, address: str, writers: int, seconds: float) -> float:
    """The server's CPU µs per call with ``writers`` writers for ``seconds``."""
    barrier, stop, counts = threading.Barrier(writers + 1), [0.0], [0] * writers
    threads = [threading.Thread(target=_write, args=(address, f"w{i}", stop, barrier, counts, i))
               for i in range(writers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    stop[0] = time.monotonic() + seconds
    before = cpu_seconds(pid)
    barrier.wait()
    for thread in threads:
        thread.join()
    return 1e6 * (cpu_seconds(pid) - before) / max(1, sum(counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", type=lambda text: [int(n) for n in text.split(",")],
                        default=[1, 32])
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "SOCKET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(*args.serve))
        return 0
    note = machine()
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as work:
        servers: dict[str, tuple[subprocess.Popen[str], str]] = {}
        try:
            for kind in KINDS:
                socket = os.path.join(work, f"{kind}.sock")
                process = subprocess.Popen(
                    [sys.executable, "-m", "tests.bench.layers", "--serve", kind, socket],
                    stdout=subprocess.PIPE, text=True)
                assert process.stdout is not None
                process.stdout.readline()
                servers[kind] = process, f"unix:{socket}"
            figures: dict[tuple[str, int], list[float]] = {}
            for writers in args.writers:
                for _ in range(args.rounds):
                    for kind, (process, address) in servers.items():
                        figures.setdefault((kind, writers), []).append(
                            measure(process.pid, address, writers, args.seconds))
        finally:
            for process, _ in servers.values():
                process.kill()
                process.wait()
    print(f"Machine: {note}\n")
    print("| writers | " + " | ".join(f"{kind} µs/call" for kind in KINDS)
          + " | servicer - echo |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for writers in args.writers:
        medians = {kind: statistics.median(figures[kind, writers]) for kind in KINDS}
        runs = {kind: ", ".join(f"{v:.0f}" for v in figures[kind, writers]) for kind in KINDS}
        print(f"| {writers} | " + " | ".join(f"{medians[k]:.0f} ({runs[k]})" for k in KINDS)
              + f" | {medians['servicer'] - medians['echo']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
