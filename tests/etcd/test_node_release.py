"""Rule 4, first line of defence: the release actions (remove the resource IP, refuse writes)
run inside the role change itself, so whoever sees a node leave PRIMARY (a role watcher, the
write path, gRPC) sees the release done. An in-process node against the real etcd; the
resource IP's reconciler, the second line, is not there to hide a missing release."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest

from sidecar.core.collaborators import NodeParts
from sidecar.core.node import Node
from sidecar.core.roles import Role, Status
from sidecar.etcd.client import Etcd
from sidecar.lab.localcluster import LocalEtcdCluster

from .. import builders

pytestmark = [pytest.mark.etcd]


async def _until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10.0
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_every_move_away_from_primary_has_released_first(etcd_cluster: LocalEtcdCluster,
                                                          cluster_name: str) -> None:
    """Deposed (its leader key deleted by hand) and then shut down: each time the node's
    watchers first see it leave PRIMARY, its release actions have already run."""
    released: list[str] = []
    seen: list[tuple[Role, int]] = []  # each status a watcher saw, with the releases by then

    async def body() -> None:
        settings = builders.settings("a", cluster=cluster_name, etcd=etcd_cluster)
        etcd = Etcd(settings)
        node = Node(settings, etcd, parts=NodeParts(release_actions=[released.append]))

        async def watch() -> None:
            status: Status
            async for status in node.watch():
                seen.append((status.role, len(released)))

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch())
        running = asyncio.create_task(node.run(stop))
        try:
            await _until(lambda: node.status().role is Role.PRIMARY)
            with etcd_cluster.client() as client:
                client.delete(f"/thinlinc-ha/{cluster_name}/leader")
            await _until(lambda: bool(_moves_away(seen)))
            await _until(lambda: node.status().role is Role.PRIMARY)  # it won again
            stop.set()
            await asyncio.wait_for(running, 10)
        finally:
            watcher.cancel()
            running.cancel()
            await asyncio.gather(watcher, running, return_exceptions=True)
            etcd.close()

    asyncio.run(body())
    assert released[0].startswith("start-up")
    moves = _moves_away(seen)
    assert len(moves) >= 2, seen  # deposed, then (after winning again) stopped
    assert moves[-1][1][0] is Role.STOPPING
    for releases_while_primary, (role, releases) in moves:
        assert releases > releases_while_primary, (role, seen, released)


def _moves_away(seen: list[tuple[Role, int]]) -> list[tuple[int, tuple[Role, int]]]:
    """Each move away from PRIMARY a watcher saw, with the releases counted while PRIMARY."""
    return [(before[1], now) for before, now in itertools.pairwise(seen)
            if before[0] is Role.PRIMARY and now[0] is not Role.PRIMARY]
