"""The VSM server in ``on-primary`` mode: started on promotion, stopped on demotion.

The node decides; this part acts on what it decided, one command at a time, always towards the
role the node has *now* (a start that finds the node demoted is followed by a stop at once):

* Start (``vsm_server_start``) runs once the role is PRIMARY, so after the promotion gates made
  the sessions file current (rule 5).
* Stop (``vsm_server_stop``) runs once the role is anything else, so after the resource IP was
  released (rule 4 runs the release before the new role is published). At start-up the node is
  not PRIMARY, so a VSM server left running is stopped first.
* A start that fails or times out is logged, counted and reported (GetRole, ``/health``,
  metrics); the node then counts as unhealthy, so it hands over when a standby can take over,
  and no switchover or failback chooses it until a start succeeds. Failed commands are retried.
* While the server may run (started, or not yet known stopped), :meth:`may_write_file` says so:
  the file mirror never writes the live sessions file under a running VSM server.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import tempfile
import time
from collections.abc import Awaitable, Callable

import structlog

from ..core.node import Node
from ..core.reports import ServerReport
from ..core.roles import Role
from ..core.tasks import supervise
from .hooks import KILL_GRACE
from .processes import stop_process_group

log = structlog.get_logger(__name__)

RUNNING, STOPPED, STARTING, STOPPING = "running", "stopped", "starting", "stopping"
START_FAILED, STOP_FAILED, UNKNOWN = "start failed", "stop failed", "unknown"
RETRY_SECONDS = 10.0
OUTPUT_TAIL = 500


class VsmServerControl:
    """Keeps the local VSM server running exactly while the node is PRIMARY."""

    def __init__(self, node: Node, start: str, stop: str, timeout: float, *,
                 retry: float = RETRY_SECONDS) -> None:
        self.node = node
        self.start_command = shlex.split(start)
        self.stop_command = shlex.split(stop)
        self.timeout = timeout
        self.retry = retry
        self.state = UNKNOWN
        self.since = time.time()
        self.error = ""
        self.start_failures = 0
        self.stop_failures = 0
        # Awaited after every successful stop (the mirror writes the file it held back).
        self.on_stopped: list[Callable[[], Awaitable[object]]] = []
        self._changed = asyncio.Event()
        self._start_failed = False  # the last start failed: stands until a start succeeds

    # -- what others read -------------------------------------------------------------------

    def report(self) -> ServerReport:
        return ServerReport(self.state, self.since, self.error, self.start_failures,
                            self.stop_failures)

    def healthy(self) -> bool | None:
        """False after a failed start (the node hands over if it can), else no verdict."""
        return False if self._start_failed else None

    def member_health(self) -> str:
        """The members/ record's ``health``: others do not hand the role to a node whose
        VSM server would not start. (A standby's server is stopped by design, so "healthy"
        here means that nothing says it cannot start.)"""
        return "unhealthy" if self._start_failed else "healthy"

    def may_write_file(self) -> str | None:
        """Why the live sessions file must not be written now, or None."""
        return None if self.state == STOPPED else f"the local VSM server is {self.state}"

    # -- acting -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await supervise({"vsm-server-feed": self._feed(), "vsm-server": self._act()})
        except asyncio.CancelledError:
            # Shutting down: the node has handed over (or is gone), so the VSM server stops
            # here too, within the command's timeout, before the process exits.
            if self.state != STOPPED:
                await self._stop()
            raise

    async def _feed(self) -> None:
        async for _ in self.node.watch():
            self._changed.set()

    async def _act(self) -> None:
        while True:
            failed = self.state in (START_FAILED, STOP_FAILED)
            try:
                async with asyncio.timeout(self.retry if failed else None):
                    await self._changed.wait()
            except TimeoutError:
                pass
            # Cleared before acting: a role change while a command runs wakes the next turn at
            # once; a failed command alone waits for the retry.
            self._changed.clear()
            primary = self.node.status().role is Role.PRIMARY
            if primary and self.state != RUNNING:
                await self._start()
            elif not primary and self.state != STOPPED:
                await self._stop()

    async def _start(self) -> None:
        self._set(STARTING)
        error = await self._command(self.start_command)
        self._start_failed = error is not None
        if error is None:
            self._set(RUNNING)
            log.info("vsm_server_started", command=shlex.join(self.start_command))
        else:
            self.start_failures += 1
            self._set(START_FAILED, error)
            log.error("vsm_server_start_failed", command=shlex.join(self.start_command),
                      error=error, decision="hand over if a standby can take over; retry in "
                      f"{self.retry:g} s")
        self.node.mark_member_dirty()

    async def _stop(self) -> None:
        self._set(STOPPING)
        error = await self._command(self.stop_command)
        if error is None:
            self._set(STOPPED)
            log.info("vsm_server_stopped", command=shlex.join(self.stop_command))
            for action in self.on_stopped:
                await action()
        else:
            self.stop_failures += 1
            self._set(STOP_FAILED, error)
            log.error("vsm_server_stop_failed", command=shlex.join(self.stop_command),
                      error=error, decision=f"retry in {self.retry:g} s; the sessions file is "
                      "not written meanwhile")
        self.node.mark_member_dirty()

    def _set(self, state: str, error: str = "") -> None:
        self.state, self.since, self.error = state, time.time(), error

    async def _command(self, argv: list[str]) -> str | None:
        """Run ``argv`` to its end; None on success, else what went wrong."""
        # Output goes to an unlinked file, not a pipe: a daemon the command starts could hold
        # a pipe open for its whole life.
        with tempfile.TemporaryFile(prefix="vsm-sidecar-vsmserver-") as output:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                return f"cannot run {argv[0]}: {exc.strerror or exc}"
            try:
                async with asyncio.timeout(self.timeout):
                    await proc.wait()
            except TimeoutError:
                await stop_process_group(proc, KILL_GRACE)
                return f"no answer within {self.timeout:g} s (killed)"
            if proc.returncode == 0:
                return None
            size = output.seek(0, os.SEEK_END)
            output.seek(max(0, size - OUTPUT_TAIL))
            tail = output.read().decode(errors="replace").strip().splitlines()
            said = f": {tail[-1]}" if tail else ""
            return f"exit code {proc.returncode}{said}"
