"""The etcd watches the node waits on: the leader key while following (:func:`follow`) or
while primary (:func:`guard_key`), the switchover key while primary (:func:`wait_request`),
and the pause key always (:func:`watch_pause`). They only wait and tell; the node decides what
follows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from ..etcd.client import Etcd
from ..etcd.election import Election
from ..etcd.errors import EtcdError, EtcdUnavailable
from ..etcd.pause import read_pause
from ..etcd.records import LeaderInfo, PauseRecord, decode_leader
from ..etcd.retry import reconnect_policy
from ..etcd.watch import EventType

log = structlog.get_logger("sidecar.core.node")  # their events are the node's

# A standby re-reads the leader key this often even if its watch reports nothing: a watch alone
# can miss a change (a member cut off from the quorum, a bug), a read cannot.
LEADER_REREAD_SECONDS = 10.0
REQUEST_POLL_SECONDS = 1.0  # a primary looks at its health at least this often
GUARD_RECONNECT_SECONDS = 0.1  # a primary's guard of its key is never long without a watch
PAUSE_REREAD_SECONDS = 10.0  # as LEADER_REREAD_SECONDS, for the pause key
PAUSED_LOG_SECONDS = 60.0  # while paused, say so this often: a forgotten pause is an outage


class Deposed(Exception):
    """The leader key is no longer ours although our lease is alive (deleted by someone)."""


class Tampered(Deposed):
    """Our leader key was overwritten in place (same create revision, so same epoch) by
    someone else: it may no longer be on our lease or say who we are. We never write it twice,
    so any put on it is foreign."""


async def follow(etcd: Etcd, election: Election, revision: int,
                 wait: float = LEADER_REREAD_SECONDS) -> None:
    """Return as soon as the leader key changes, on a watch error, or after ``wait``.

    A changed key is read again by the caller rather than taken from the event: only a
    read shows its lease, which tells a sidecar's key from one written by hand."""
    try:
        async with asyncio.timeout(wait):
            async with etcd.watch(election.keys.leader, start_revision=revision + 1) as watch:
                async for batch in watch:
                    for event in batch.events:
                        if event.type is EventType.DELETE:
                            log.info("leader_key_deleted", decision="campaign")
                        return
    except TimeoutError:
        return
    except EtcdError as exc:
        log.info("leader_watch_ended", error=str(exc), decision="re-read the leader key")


async def wait_request(etcd: Etcd, election: Election, revision: int) -> None:
    """Until the switchover key changes, or a second passes (health is polled)."""
    await _wait_key(etcd, election.keys.switchover, revision, REQUEST_POLL_SECONDS)


async def guard_key(etcd: Etcd, election: Election, epoch: int, revision: int,
                    read_leader: Callable[[], Awaitable[tuple[LeaderInfo | None, int]]]) -> None:
    """Raise :class:`Deposed` when the leader key stops being the one we created.

    A broken watch is opened again by the reconnect policy, after a read that checks the key
    is still ours (a change while no watch was open is seen there)."""
    opened = False
    async for attempt in reconnect_policy("leader guard", wait=GUARD_RECONNECT_SECONDS,
                                          on_retry=_guard_watch_ended):
        if opened:  # (outside the attempt: a failed read is the node's to handle, as ever)
            revision = await _still_ours(election, epoch, read_leader)
        opened = True
        with attempt:
            await _watch_own_key(etcd, election, epoch, revision)


def _guard_watch_ended(exc: BaseException) -> None:
    log.info("leader_guard_watch_ended", error=str(exc))


async def _watch_own_key(etcd: Etcd, election: Election, epoch: int, revision: int) -> None:
    """Raise Deposed or Tampered at the first change of our leader key after ``revision``;
    an EtcdError when the watch breaks (or ends, which it must not)."""
    async with etcd.watch(election.keys.leader, start_revision=revision + 1) as watch:
        async for batch in watch:
            for event in batch.events:
                if event.type is EventType.DELETE or event.create_revision != epoch:
                    raise Deposed("the leader key was deleted or replaced")
                report_overwrite(election, event.value, event.mod_revision)
                raise Tampered("the leader key was overwritten by someone else")
    raise EtcdUnavailable("the leader key's watch ended")


async def _still_ours(election: Election, epoch: int,
                      read_leader: Callable[[], Awaitable[tuple[LeaderInfo | None, int]]]) -> int:
    """The revision our leader key was read at; Deposed or Tampered if it is not ours."""
    leader, revision = await read_leader()
    if leader is None or leader.epoch != epoch:
        raise Deposed("the leader key was deleted or replaced")
    if leader.overwritten:
        if leader.valid:  # (garbage was reported by the read itself)
            report_overwrite(election, b"", leader.revision)
        raise Tampered("the leader key was overwritten by someone else")
    return revision


def report_overwrite(election: Election, value: bytes, revision: int) -> None:
    """Count a put over our own leader key: whatever it holds, no sidecar wrote it."""
    info = decode_leader(value, 0, 0) if value else None
    problem = info.problem if info is not None and not info.valid else \
        "a put over this node's key by someone else"
    election.garbage.report("leader", election.keys.leader, revision, problem, value)


async def watch_pause(etcd: Etcd, election: Election,
                      on_change: Callable[[PauseRecord | None], None]) -> None:
    """Keep the node told of the pause key (maintenance mode), for ever: read it, tell, wait
    for a change (or PAUSE_REREAD_SECONDS), again. While paused, log it once a minute. An etcd
    error keeps what was last read (a pause is not dropped because etcd is unreachable, nor
    invented), and the loop reads again."""
    current: PauseRecord | None = None
    logged = 0.0
    while True:
        try:
            pause, revision = await read_pause(etcd, election.keys, election.garbage)
        except EtcdError as exc:
            log.info("pause_not_read", error=str(exc), decision="keep the last state, retry")
            await asyncio.sleep(1.0)
            continue
        if pause != current:
            if pause is not None:
                log.warning("paused", pause=pause.describe())
            else:
                log.warning("resumed", decision="automatic moves allowed again")
            current, logged = pause, time.monotonic()
            on_change(pause)
        elif pause is not None and time.monotonic() - logged >= PAUSED_LOG_SECONDS:
            log.warning("still_paused", pause=pause.describe(),
                        note="no takeover, failback or health handover until resumed")
            logged = time.monotonic()
        await _wait_key(etcd, election.keys.pause, revision, PAUSE_REREAD_SECONDS)


async def _wait_key(etcd: Etcd, key: bytes, revision: int, wait: float) -> None:
    """Until ``key`` changes after ``revision``, a watch error, or ``wait`` seconds."""
    try:
        async with asyncio.timeout(wait):
            async with etcd.watch(key, start_revision=revision + 1) as watch:
                async for batch in watch:
                    if batch.events:
                        return
    except TimeoutError:
        return
    except EtcdError:
        await asyncio.sleep(0.5)  # read again soon, but never spin against a failing watch
