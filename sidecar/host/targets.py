"""What a health check probes: the ``health_check`` grammar (``tcp:HOST:PORT``, ``tcp:PORT``,
``exec:COMMAND``) and one probe of each kind.

A leaf below :mod:`sidecar.host.health` (the repeated, debounced check) so that the settings
check (:mod:`sidecar.configcheck`) can parse a target without importing the check's users.
A command runs without the sidecar's capabilities (see :mod:`sidecar.host.childcaps`).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
from dataclasses import dataclass

from .childcaps import without_capabilities
from .processes import stop_process_group

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
