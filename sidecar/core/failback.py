"""The preferred primary's failback: it asks for the role back once it has been a healthy,
caught-up STANDBY of someone else for ``failback_delay`` (:func:`rules.failback_due`). Any
change of what that depends on restarts the delay, so a flapping node never causes repeated
failbacks. The request itself is a switchover request naming this node; the primary hands over
for it as for an operator's (:mod:`sidecar.core.handover`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from ..etcd.election import Election
from ..etcd.errors import EtcdError
from ..etcd.records import SWITCHOVER_TTL, SwitchoverRequest
from . import rules

log = structlog.get_logger("sidecar.core.node")  # its events are the node's

FAILBACK_POLL = 0.2

# What a failback depends on now, and whether the cluster is paused (a resume restarts the delay
# as any other change does).
FailbackView = Callable[[], tuple[rules.FailbackState, bool]]


async def ask_for_failback(election: Election, me: str, delay: float, health_configured: bool,
                           state_now: FailbackView) -> None:
    """Poll ``state_now`` and write a failback request whenever one is due; never returns."""
    state, since = state_now(), time.monotonic()
    while True:
        await asyncio.sleep(FAILBACK_POLL)
        now, current = time.monotonic(), state_now()
        if current != state:
            state, since = current, now
            continue
        if rules.failback_due(state[0], me, health_configured, since, now, delay,
                              paused=state[1]):
            log.info("failback", decision="ask for the leadership back", leader=state[0][1],
                     stable_for=round(now - since, 1))
            try:
                await election.request_switchover(SwitchoverRequest(me, me, "failback"))
            except EtcdError as exc:
                log.warning("failback_request_failed", error=str(exc))
            since = now + SWITCHOVER_TTL  # let this request run its course first
