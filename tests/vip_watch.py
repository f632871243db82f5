"""Watching a resource IP from inside a network-namespace lab: who holds it, who answers on it.

* :func:`start_sampler` -- a sampler process in a host's namespace dumps the interface's
  addresses over netlink every ``period`` and stamps each dump with CLOCK_MONOTONIC (shared by
  every namespace, so samples compare with the caller's own clock).
* :func:`start_probe` -- a client process in the client's namespace connects to the resource
  IP every ``period`` and records which host's name service answered (or nothing).
* :func:`held_spans`, :func:`intersect` and :class:`Lifetimes` turn samples into the judgement
  "never on two running sidecars' hosts at once" that the overlap test and the chaos runner
  share.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from sidecar.lab.netlab import NetnsLab
from sidecar.lab.netns import read_line

Interval = tuple[float, float]

# "<monotonic before dump> <monotonic after dump> <1 if the address is on the interface>"
_SAMPLER = r"""
import sys, time
from pyroute2 import IPRoute
address, ifname, period = sys.argv[1], sys.argv[2], float(sys.argv[3])
with IPRoute() as ipr:
    index = ipr.link_lookup(ifname=ifname)[0]
    print("ready", flush=True)
    due = time.monotonic()
    while True:
        before = time.monotonic()
        held = any(m.get_attr("IFA_ADDRESS") == address for m in ipr.get_addr(index=index))
        after = time.monotonic()
        sys.stdout.write(f"{before:.6f} {after:.6f} {int(held)}\n")
        sys.stdout.flush()
        due += period
        time.sleep(max(0.0, due - time.monotonic()))
"""

# "<monotonic before connect> <monotonic after answer> <name or ->"
_PROBE = r"""
import socket, sys, time
address, port = sys.argv[1], int(sys.argv[2])
period, timeout = float(sys.argv[3]), float(sys.argv[4])
print("ready", flush=True)
due = time.monotonic()
while True:
    before = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=timeout) as connection:
            name = connection.recv(256).decode(errors="replace").split("\n")[0] or "-"
    except OSError:
        name = "-"
    after = time.monotonic()
    sys.stdout.write(f"{before:.6f} {after:.6f} {name}\n")
    sys.stdout.flush()
    due = max(due + period, time.monotonic())
    time.sleep(max(0.0, due - time.monotonic()))
"""


class _Lines:
    """Reads a helper process's output lines in a thread, keeping one parsed item per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            item = self.parse(line)
            with self.lock:
                self.items.append(item)

    def parse(self, line: str) -> Any:
        raise NotImplementedError


class Sampler(_Lines):
    """One namespace's sampler: (time, holds) per sample, time the midpoint of the dump."""

    def parse(self, line: str) -> tuple[float, bool]:
        before, after, held = line.split()
        return (float(before) + float(after)) / 2, held == "1"

    def snapshot(self) -> list[tuple[float, bool]]:
        with self.lock:
            return list(self.items)

    def gaps(self) -> list[float]:
        """Times between consecutive samples (how well the sampler kept pace)."""
        samples = self.snapshot()
        return [b[0] - a[0] for a, b in itertools.pairwise(samples)]


def start_sampler(lab: NetnsLab, host: str, address: str, period: float = 0.010,
                  ifname: str = "eth0") -> Sampler:
    # Not isolated (-I -S) like the lab's helpers: pyroute2 lives in the venv's site-packages.
    process = lab.popen(host, sys.executable, "-c", _SAMPLER, address, ifname, str(period),
                        stdout=subprocess.PIPE)
    if read_line(process.stdout, timeout=10) != "ready":
        raise RuntimeError(f"the address sampler in {host} did not start")
    assert process.stdout is not None
    return Sampler(process.stdout)


class Probe(_Lines):
    """The client probe: (asked, answered, name or None) per connection."""

    def parse(self, line: str) -> tuple[float, float, str | None]:
        before, after, name = line.split(maxsplit=2)
        return float(before), float(after), None if name.strip() == "-" else name.strip()

    def snapshot(self) -> list[tuple[float, float, str | None]]:
        with self.lock:
            return list(self.items)

    def first_answer_from(self, name: str, since: float) -> float | None:
        """When the first connection made at or after ``since`` was answered by ``name``."""
        return next((after for before, after, who in self.snapshot()
                     if before >= since and who == name), None)


def start_probe(lab: NetnsLab, host: str, address: str, port: int, period: float = 0.1,
                timeout: float = 0.2) -> Probe:
    process = lab.popen(host, sys.executable, "-I", "-S", "-c", _PROBE, address, str(port),
                        str(period), str(timeout), stdout=subprocess.PIPE)
    if read_line(process.stdout, timeout=10) != "ready":
        raise RuntimeError(f"the client probe in {host} did not start")
    assert process.stdout is not None
    return Probe(process.stdout)


def held_spans(samples: list[tuple[float, bool]]) -> list[Interval]:
    """Maximal runs of consecutive 'held' samples as closed [first, last] time intervals."""
    spans: list[Interval] = []
    start: float | None = None
    last = 0.0
    for at, held in samples:
        if held:
            start = at if start is None else start
            last = at
        elif start is not None:
            spans.append((start, last))
            start = None
    if start is not None:
        spans.append((start, last))
    return spans


def intersect(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    return [(max(x0, y0), min(x1, y1)) for x0, x1 in xs for y0, y1 in ys
            if max(x0, y0) <= min(x1, y1)]


@dataclass
class Lifetimes:
    """Per host, intervals during which its sidecar process runs (alive, not stopped) and is
    past start-up."""

    open_since: dict[str, float | None] = field(default_factory=dict)
    done: dict[str, list[Interval]] = field(default_factory=dict)

    def ready(self, host: str, at: float | None = None) -> None:
        self.open_since[host] = time.monotonic() if at is None else at

    def gone(self, host: str, at: float | None = None) -> None:
        since = self.open_since.pop(host, None)
        if since is not None:
            self.done.setdefault(host, []).append(
                (since, time.monotonic() if at is None else at))

    def intervals(self, host: str, now: float) -> list[Interval]:
        current = self.open_since.get(host)
        return self.done.get(host, []) + ([(current, now)] if current is not None else [])
