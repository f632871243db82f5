"""A health check of the local VSM server, to gate candidacy (a node whose server is down
must not take over).

The check is a TCP connect or a command (exit 0 is healthy; it runs without the sidecar's
capabilities, see :mod:`sidecar.host.childcaps`), repeated every ``interval``. Like
haproxy and keepalived, it changes state only after ``rise`` successes or ``fall`` failures in a
row, so that one lost probe does not flap the node's candidacy. The state starts unknown
(``healthy is None``); callers decide what unknown means for them. The targets and their
grammar are in :mod:`sidecar.host.targets`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from .targets import ProbeFailed, Target

log = structlog.get_logger(__name__)


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
