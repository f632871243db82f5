"""A health check of the local VSM server, to gate candidacy (a node whose server is down
must not take over).

The check is a TCP connect or a command (exit 0 is healthy; it runs without the sidecar's
capabilities, see :mod:`sidecar.host.childcaps`), repeated every ``interval``. Like
haproxy and keepalived, it changes state only after ``rise`` successes or ``fall`` failures in a
row, so that one lost probe does not flap the node's candidacy. The state starts unknown
(``healthy is None``); callers decide what unknown means for them.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .childcaps import without_capabilities
from .hooks import stop_process_group

log = structlog.get_logger(__name__)

VSM_SERVER_PORT = 9000
DEFAULT_HOST = "127.0.0.1"
OUTPUT_TAIL = 300  # characters of a failing command's output kept as the reason
KILL_GRACE = 0.2  # a health command gets little grace: the next probe is due soon


class ProbeFailed(Exception):
    """One probe found the target unhealthy; the message says why."""


@dataclass(frozen=True)
class TcpTarget:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    async def probe(self) -> None:
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
            writer.close()
            await writer.wait_closed()
        except OSError as exc:
            # asyncio words every refusal "Connect call failed (addr)": say what errno says
            errno = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else None
            raise ProbeFailed(f"cannot connect to {self}: "
                              f"{os.strerror(errno) if errno else exc}") from None


@dataclass(frozen=True)
class CommandTarget:
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"exec:{shlex.join(self.argv)}"

    async def probe(self) -> None:
        """Run the command; when cancelled (the caller's timeout), kill its process group."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *without_capabilities(self.argv), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        except OSError as exc:
            raise ProbeFailed(f"cannot run: {exc}") from None
        try:
            output, _ = await proc.communicate()
        except asyncio.CancelledError:
            await asyncio.shield(stop_process_group(proc, KILL_GRACE))
            raise
        if proc.returncode != 0:
            tail = output.decode(errors="replace").strip()[-OUTPUT_TAIL:]
            raise ProbeFailed(f"exit status {proc.returncode}" + (f": {tail}" if tail else ""))


Target = TcpTarget | CommandTarget


def parse_target(text: str) -> Target:
    """``tcp:HOST:PORT``, ``tcp:PORT``, ``tcp:HOST`` (port 9000) or ``exec:COMMAND ARGS...``."""
    kind, sep, rest = text.strip().partition(":")
    if sep and kind == "tcp":
        return _parse_tcp(rest.strip())
    if sep and kind == "exec":
        try:
            argv = tuple(shlex.split(rest))
        except ValueError as exc:
            raise ValueError(f"health check {text!r}: {exc}") from None
        if not argv:
            raise ValueError(f"health check {text!r}: no command after exec:")
        if shutil.which(argv[0]) is None:
            raise ValueError(f"health check {text!r}: {argv[0]} is not an executable command")
        return CommandTarget(argv)
    raise ValueError(f"health check {text!r}: expected tcp:HOST:PORT, tcp:PORT or exec:COMMAND")


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "٣" and "²"."""
    return text.isascii() and text.isdigit()


def _parse_tcp(rest: str) -> TcpTarget:
    if _digits(rest):
        host, port_text = DEFAULT_HOST, rest
    elif rest.startswith("["):  # [IPv6]:PORT or [IPv6]
        host, _, after = rest[1:].partition("]")
        port_text = after.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:  # a bare host name, or a bare IPv6 address
        host, port_text = rest, ""
    host = host or DEFAULT_HOST
    port = int(port_text) if _digits(port_text) else (VSM_SERVER_PORT if not port_text else 0)
    if not 0 < port < 65536:
        raise ValueError(f"health check tcp:{rest}: port must be 1-65535, not {port_text!r}")
    return TcpTarget(host, port)


class HealthCheck:
    """Probes ``target`` every ``interval`` and keeps a rise/fall debounced verdict."""

    def __init__(self, target: Target, interval: float, timeout: float, rise: int,
                 fall: int) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.target = target
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.healthy: bool | None = None
        self.reason = "not checked yet"  # what the last probe found
        self.changed_at = time.monotonic()
        self.on_change: list[Callable[[bool, str], None]] = []
        self._successes = 0
        self._failures = 0
        self._changed = asyncio.Event()

    async def run(self) -> None:
        """Probe forever, one probe every ``interval`` (start to start)."""
        while True:
            started = time.monotonic()
            await self.check_once()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def check_once(self) -> bool | None:
        """Run one probe, update the verdict, and return it."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.target.probe()
        except TimeoutError:
            self._record(False, f"no answer within {self.timeout:g}s")
        except ProbeFailed as exc:
            self._record(False, str(exc))
        else:
            self._record(True, "probe succeeded")
        return self.healthy

    async def wait_change(self) -> bool:
        """Wait for the next change of verdict and return the new one."""
        await self._changed.wait()
        assert self.healthy is not None  # a change always lands on True or False
        return self.healthy

    def _record(self, ok: bool, reason: str) -> None:
        self.reason = reason
        if ok:
            self._successes, self._failures = self._successes + 1, 0
            if self.healthy is not True and self._successes >= self.rise:
                self._change(True, reason)
        else:
            self._successes, self._failures = 0, self._failures + 1
            if self.healthy is not False and self._failures >= self.fall:
                self._change(False, reason)

    def _change(self, healthy: bool, reason: str) -> None:
        old, self.healthy = self.healthy, healthy
        self.changed_at = time.monotonic()
        streak = self.rise if healthy else self.fall
        (log.info if healthy else log.warning)(
            "health_change", target=str(self.target), healthy=healthy, previous=old,
            reason=reason, streak=streak)
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        for callback in self.on_change:
            try:
                callback(healthy, reason)
            except Exception:  # one failing listener must not keep the others from hearing
                log.exception("health_listener_failed",
                              listener=getattr(callback, "__name__", "?"))
