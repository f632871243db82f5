"""etcd's alarms, read by every node and never silent (issue 15).

An etcd alarm (NOSPACE: the quota is full; CORRUPT: members disagree on their data) stops writes
cluster-wide: no session record, no lease, no election. The sidecar cannot mend it (an operator
compacts, defragments and disarms: docs/OPERATIONS.md), but it can say why writes fail. Each node
reads the alarm list every POLL_PERIOD, and at once after one of its writes was refused for want
of space; a change is logged once (raised, cleared) and shown by GetRole, ``/health``,
``status`` and the ``vsm_sidecar_etcd_alarm`` gauge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from ..etcd.client import Etcd
from ..etcd.errors import EtcdError
from ..etcd.maintenance import active_alarms

log = structlog.get_logger(__name__)

POLL_PERIOD = 5.0
# How often the refused-write counters are looked at between two reads of the list.
TICK = 0.25
KNOWN_TYPES = ("NOSPACE", "CORRUPT")

Alarm = tuple[str, int]  # (type, member id)


class AlarmMonitor:
    """The alarms active in etcd as last read, through ``etcd``; ``watched`` are the clients
    whose refused writes (no space) make it read again at once."""

    def __init__(self, etcd: Etcd, watched: Sequence[Etcd] = ()) -> None:
        self.etcd = etcd
        self.watched = tuple(watched) or (etcd,)
        self.alarms: tuple[Alarm, ...] = ()
        self.reads = 0
        self.read_failures = 0
        self._failing = False

    def active(self) -> tuple[str, ...]:
        """The alarm types active now, each once, sorted ("CORRUPT", "NOSPACE")."""
        return tuple(sorted({kind for kind, _ in self.alarms}))

    def line(self) -> str:
        """One line for ``/health``: the alarms and the members that raised them."""
        if not self.alarms:
            return "none"
        return ", ".join(f"{kind} (member {member:x})" for kind, member in self.alarms)

    async def run(self) -> None:
        """Read the list now and then for ever (a failed read keeps what was known)."""
        while True:
            await self.read()
            refused = self._refused()
            # The counters grow in the clients' worker threads, which cannot set an asyncio
            # event: they are looked at every TICK instead.
            for _ in range(round(POLL_PERIOD / TICK)):
                await asyncio.sleep(TICK)
                if self._refused() != refused:
                    break

    async def read(self) -> None:
        try:
            found = await self.etcd.call(active_alarms, "alarm list")
        except EtcdError as exc:
            self.read_failures += 1
            if not self._failing:
                log.info("etcd_alarms_not_read", error=str(exc), known=list(self.active()))
            self._failing = True
            return
        self._failing = False
        self.reads += 1
        self._update(found)

    def _update(self, found: tuple[Alarm, ...]) -> None:
        old, new = set(self.alarms), set(found)
        for kind, member in sorted(new - old):
            log.error("etcd_alarm_raised", alarm=kind, member=f"{member:x}",
                      effect="etcd refuses writes: no session record, lease or election",
                      remedy="docs/OPERATIONS.md, Caring for etcd")
        for kind, member in sorted(old - new):
            log.info("etcd_alarm_cleared", alarm=kind, member=f"{member:x}")
        self.alarms = found

    def _refused(self) -> int:
        return sum(etcd.no_space_errors for etcd in self.watched)
