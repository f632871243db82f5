"""Child programs of the sidecar: whether a configured program can run, and how a timed-out
one is stopped with everything it started (its process group).

A leaf: the settings check (:mod:`sidecar.configcheck`), the role hooks, the health check and
the VSM server control all use it, so it imports nothing of the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path


def check_program(path: Path | str) -> None:
    """Raise ValueError with a one-line reason unless ``path`` is an executable file."""
    program = Path(path)
    if not program.exists():
        raise ValueError(f"no such file: {program}")
    if not program.is_file():
        raise ValueError(f"not a regular file: {program}")
    if not os.access(program, os.X_OK):
        raise ValueError(f"not executable: {program}")


async def stop_process_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group of ``proc`` (a session leader), SIGKILL it after ``grace``.

    The SIGKILL goes to the group even when the leader exits in time: a child that ignores
    SIGTERM must not outlive the timed-out call.
    """
    signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await proc.wait()
    signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()


def signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
