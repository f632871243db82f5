"""The resource IP as the node's role demands it: glue between core/node.py (decides)
and actuator.py (acts).

* start-up and every move away from PRIMARY: :meth:`ResourceController.release` — synchronous,
  netlink only, no hook, etcd call or RPC (rules 3 and 4). It also stops any announcement burst.
* promotion: probe for a stale holder (logged and counted by probe.py), claim, announce: a burst
  now, another after ``garp_delay``, then every ``garp_refresh`` if set.
* all the time: reconcile — on the primary a missing address comes back and is announced, on a
  non-primary a present one goes, both within a second, woken by netlink events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from ..settings import ConfigError, Settings
from .actuator import ResourceIP
from .address import parse_vip as parse_vip
from .announce import AnnounceSettings
from .errors import VipError, VipPermissionError
from .privileges import check_privileges

log = structlog.get_logger(__name__)


class ResourceController:
    def __init__(self, settings: Settings, is_primary: Callable[[], bool]) -> None:
        self.settings = settings
        self.is_primary = is_primary
        announce = AnnounceSettings(repeat=settings.garp_repeat,
                                    interval=settings.garp_interval,
                                    delay=settings.garp_delay, refresh=settings.garp_refresh)
        self.ip = ResourceIP([parse_vip(v) for v in settings.vip], settings.vip_interface or "",
                             announce=announce, label=settings.vip_label)
        self._announcing: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Check privileges and the interface; a problem is a configuration error (exit 2)."""
        try:
            check_privileges()
        except VipPermissionError as exc:
            raise ConfigError("vip", f"{exc} (needed to move the resource IP)") from None
        try:
            self.ip.open()
        except VipError as exc:
            raise ConfigError("vip_interface", str(exc)) from None

    def close(self) -> None:
        self.ip.close()

    def release(self, reason: str) -> None:
        """Remove the address now; safe from any path, including a second signal."""
        task, self._announcing = self._announcing, None
        if task is not None:
            task.cancel()
        removed = self.ip.release()
        if removed:
            log.info("resource_ip_released", addresses=removed, reason=reason)

    async def claim(self) -> None:
        await self.ip.probe(self.settings.vip_probe_timeout)
        if not self.is_primary():  # the role may have gone while we listened
            return
        self.ip.claim()
        self._start_announcing()

    def _start_announcing(self) -> None:
        if self._announcing is not None:
            self._announcing.cancel()
        self._announcing = asyncio.create_task(self.ip.announce_after_claim(), name="announce")

    async def reconcile(self) -> None:
        await self.ip.reconcile(self.is_primary, self._repaired)

    def _repaired(self, description: str) -> None:
        log.warning("resource_ip_repaired", what=description)

    def view(self) -> tuple[list[str], bool, float | None]:
        """Configured addresses, whether all are held, and the last announcement time."""
        with contextlib.suppress(VipError):
            return list(self.settings.vip), self.ip.held(), self.ip.stats.last_announcement
        return list(self.settings.vip), False, self.ip.stats.last_announcement
