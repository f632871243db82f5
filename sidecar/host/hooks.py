"""Role-change scripts, in the manner of keepalived's notify scripts.

The node's safety path never waits for a hook: :meth:`HookRunner.notify` only appends to a
queue. :meth:`HookRunner.run` works the queue off one call at a time, in order, so that a
script sees the changes in the order they happened (a slow "promote" is never overtaken by
the "demote" that followed it). Each call runs in its own session, so that on a timeout the
whole process group goes, including anything the script started and left running.

A script gets the new role as ``argv[1]`` and these variables on top of the inherited
environment: ``VSM_SIDECAR_OLD_ROLE``, ``VSM_SIDECAR_NEW_ROLE`` (``PRIMARY``, ``STANDBY``, ...),
``VSM_SIDECAR_EPOCH``, ``VSM_SIDECAR_NODE_ID``, ``VSM_SIDECAR_LEADER`` (empty if none) and
``VSM_SIDECAR_REASON``. It runs as the sidecar's user with none of the sidecar's capabilities
(see :mod:`sidecar.host.childcaps`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import structlog

from ..core.roles import Role, Status
from .childcaps import without_capabilities
from .processes import signal_group, stop_process_group

log = structlog.get_logger(__name__)

KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL to a timed-out hook's process group
OUTPUT_TAIL = 2000  # characters of a hook's output kept for the log


@dataclass(frozen=True)
class RoleChange:
    old: Role
    new: Role
    epoch: int
    leader: str
    reason: str


class Watchable(Protocol):
    def watch(self) -> AsyncIterator[Status]: ...


class HookRunner:
    """Runs ``program`` once per role change, one call at a time, in order."""

    def __init__(self, program: Path | str, timeout: float, node_id: str) -> None:
        self.program = str(program)
        self.timeout = timeout
        self.node_id = node_id
        self._queue: asyncio.Queue[RoleChange] = asyncio.Queue()
        self.runs = 0  # every finished call, whatever its outcome
        self.failures = 0  # calls that exited non-zero, died of a signal or could not start
        self.timeouts = 0  # calls killed at the timeout (not counted in failures)

    @property
    def successes(self) -> int:
        return self.runs - self.failures - self.timeouts

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def notify(self, old: Role, new: Role, epoch: int, leader: str, reason: str) -> None:
        """Queue one call; never blocks, never fails (safe from the node's release path)."""
        self._queue.put_nowait(RoleChange(old, new, epoch, leader, reason))

    async def follow(self, node: Watchable) -> None:
        """Queue a call on every role change the node reports, until cancelled."""
        previous: Role | None = None
        async for status in node.watch():
            if previous is not None and status.role is not previous:
                leader = status.leader.node_id if status.leader is not None else ""
                self.notify(previous, status.role, status.epoch, leader, status.reason)
            previous = status.role

    async def idle(self) -> None:
        """Return once every queued call has finished (e.g. before shutting down)."""
        await self._queue.join()

    async def run(self) -> None:
        """Work the queue off forever; a failing call is logged and counted, never raised."""
        while True:
            change = await self._queue.get()
            try:
                await self._call(change)
            except Exception:  # a bug here must not stop later hooks (or the service)
                self.runs += 1
                self.failures += 1
                log.exception("hook_error", new=change.new.name)
            finally:
                self._queue.task_done()

    def _environment(self, change: RoleChange) -> dict[str, str]:
        return {
            **os.environ,
            "VSM_SIDECAR_OLD_ROLE": change.old.name,
            "VSM_SIDECAR_NEW_ROLE": change.new.name,
            "VSM_SIDECAR_EPOCH": str(change.epoch),
            "VSM_SIDECAR_NODE_ID": self.node_id,
            "VSM_SIDECAR_LEADER": change.leader,
            "VSM_SIDECAR_REASON": change.reason,
        }

    async def _call(self, change: RoleChange) -> None:
        fields = {"program": self.program, "old": change.old.name, "new": change.new.name,
                  "hook_epoch": change.epoch}
        # Output goes to an unlinked file, not a pipe: asyncio's wait() also waits for the
        # pipes to close, and a daemon the hook started (the VSM server) would hold them open.
        with tempfile.TemporaryFile(prefix="vsm-sidecar-hook-") as output:
            started = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *without_capabilities([self.program, change.new.name]),
                    env=self._environment(change),
                    stdin=asyncio.subprocess.DEVNULL, stdout=output,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self.runs += 1
                self.failures += 1
                log.error("hook_failed", **fields, error=f"cannot start: {exc}")
                return
            timed_out = await self._wait(proc)
            duration = time.monotonic() - started
            self._record(fields, proc.returncode, timed_out, duration, _tail(output))

    async def _wait(self, proc: asyncio.subprocess.Process) -> bool:
        """Wait for the hook to exit; kill its process group at the timeout (returns True)."""
        try:
            async with asyncio.timeout(self.timeout):
                await proc.wait()
            return False
        except TimeoutError:
            await stop_process_group(proc, KILL_GRACE)
            return True
        except asyncio.CancelledError:  # shutting down: leave no hook behind
            signal_group(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
            raise

    def _record(self, fields: dict[str, object], code: int | None, timed_out: bool,
                duration: float, output: str) -> None:
        self.runs += 1
        fields = {**fields, "exit_code": code, "duration": round(duration, 3), "output": output}
        if timed_out:
            self.timeouts += 1
            log.error("hook_timeout", **fields, timeout=self.timeout,
                      decision="process group killed")
        elif code != 0:
            self.failures += 1
            log.warning("hook_failed", **fields)
        else:
            log.info("hook_done", **fields)


def _tail(output: IO[bytes]) -> str:
    """The last OUTPUT_TAIL characters written to ``output``."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - 4 * OUTPUT_TAIL))
    return output.read().decode(errors="replace")[-OUTPUT_TAIL:].rstrip()
