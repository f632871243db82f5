"""The operator's commands that go to etcd directly: ``pause`` and ``resume`` (maintenance
mode) and ``status --etcd`` (the cluster as etcd holds it).

Straight to etcd rather than through a sidecar's API: a pause is wanted most when the
primary is dead or about to be stopped, and both must work from any node, with or without a
sidecar running there. The nodes watch the pause key (sidecar.core.watches.watch_pause) and
the rules hold every automatic move back while it exists (sidecar.core.rules).
"""

from __future__ import annotations

import asyncio
import getpass
import re
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any

from .client import to_dict
from .etcd.client import Etcd
from .etcd.election import Election
from .etcd.errors import EtcdError
from .etcd.keys import Keys
from .etcd.pause import delete_pause, put_pause, read_pause
from .etcd.records import MAX_TEXT, PauseRecord
from .settings import Settings

MAX_REASON = MAX_TEXT
# About 3 years, well under etcd's longest lease TTL; a longer pause is "until resume".
MAX_PAUSE_SECONDS = 90_000_000
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


def parse_duration(text: str) -> int | None:
    """Whole seconds of ``90``, ``90s``, ``15m``, ``2h``, ``1h30m``; None when it is none, or
    zero, or longer than etcd's longest lease."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    return total if 0 < total <= MAX_PAUSE_SECONDS else None


def who() -> str:
    """user@host of whoever runs the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


async def pause(settings: Settings, seconds: int | None, reason: str) -> str:
    now = time.time()
    record = PauseRecord(who(), reason, now, now + seconds if seconds is not None else None)
    etcd = Etcd(settings, name="etcd-pause")
    try:
        await put_pause(etcd, Keys(settings.prefix), record, seconds)
    finally:
        etcd.close()
    return f"cluster {settings.cluster} {record.describe()}"


async def resume(settings: Settings) -> str:
    etcd = Etcd(settings, name="etcd-pause")
    keys = Keys(settings.prefix)
    try:
        before, _ = await read_pause(etcd, keys)
        removed = await delete_pause(etcd, keys)
    finally:
        etcd.close()
    if not removed:
        return f"cluster {settings.cluster} was not paused: nothing to do"
    was = f" (was {before.describe()})" if before is not None else ""
    return f"cluster {settings.cluster} resumed{was}"


async def cluster_status(settings: Settings) -> dict[str, Any]:
    """The cluster as etcd holds it, in GetRole's shape (for ``status --all``'s view): the
    leader key, every member's record (as each last published it) and the pause, read with
    no sidecar. Garbage in any of them is left out, as a sidecar leaves it out."""
    from .core.roles import Status  # the API's shapes, imported only for this command
    from .endpoints.grpc_role import status_message

    etcd = Etcd(settings, name="etcd-status")
    election = Election(etcd, settings)
    try:
        leader, _, _ = await election.read_leader_and_request()
        members = await election.read_members()
        paused, _ = await read_pause(etcd, election.keys)
    finally:
        etcd.close()
    if leader is not None and not leader.valid:
        leader = None
    status = Status("etcd", settings.cluster, reason="read from etcd", leader=leader,
                    epoch=leader.epoch if leader is not None else 0, members=tuple(members),
                    pause=paused)
    return to_dict(status_message(status))


def run(command: Coroutine[Any, Any, str]) -> int:
    """Run a command and print its one line; exit 1 when etcd did not answer or refused."""
    try:
        print(asyncio.run(command))
    except EtcdError as exc:
        print(f"vsm-sidecar: error: etcd: {exc}", file=sys.stderr)
        return 1
    return 0
