"""Bookkeeping for the network lab (:mod:`sidecar.lab.netlab`): whether this process can build
one, the namespaces a killed run left behind, which documentation subnet is free in the root
namespace, and the small process helpers the lab and its tests share.

Every lab namespace is named ``vsmlab-<creating pid>-<random tag>-<host>``: parallel runs never
clash, and :func:`sweep_orphans` can tell the leftovers of a dead run from a lab still in use.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import IO, Final

PREFIX: Final = "vsmlab"


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


@functools.cache
def netns_unavailable() -> str | None:
    """Why this process cannot build a lab (not root, no ``ip``, no namespaces); None if it can.

    Tries once per process: it creates and deletes a throw-away namespace.
    """
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if shutil.which("sysctl") is None:
        return "the sysctl command (procps) is not installed"
    name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-check"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode != 0:
        return f"cannot create a network namespace: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def list_netns() -> set[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def sweep_orphans() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a run killed before atexit)."""
    removed = []
    for name in list_netns():
        parts = name.split("-")
        if parts[0] != PREFIX or len(parts) < 3 or not parts[1].isdigit():
            continue
        if _alive(int(parts[1])):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


TEST_NETS: Final = ("198.51.100", "203.0.113", "192.0.2")  # RFC 5737 documentation ranges


def root_subnets() -> set[str]:
    """The /24 prefixes ("a.b.c") of every IPv4 address or route in the root namespace."""
    shown = check(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
    found = set()
    for route in json.loads(shown or "[]"):
        for key in ("dst", "prefsrc"):
            value = str(route.get(key, ""))
            if value.count(".") == 3:
                found.add(value.split("/")[0].rsplit(".", 1)[0])
    return found


def free_subnet() -> str:
    """A documentation /24 that the root namespace does not use, for a lab joined to it."""
    used = root_subnets()
    for subnet in TEST_NETS:
        if subnet not in used:
            return subnet
    raise LabError(f"every documentation range is in use in the root namespace: {used}")


def check(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def read_line(stream: IO[str] | None, timeout: float) -> str | None:
    """One line from a child's pipe, or None if none arrives in time."""
    if stream is None:
        return None
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().strip() if ready else None


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers, and close the pipes."""
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.005) -> float:
    """Poll ``predicate()`` until true; seconds it took. AssertionError on timeout."""
    start = time.monotonic()
    deadline = start + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start
