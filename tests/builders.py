"""The one session builder, the one settings builder and the one in-process election runner
the tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sidecar import config
from sidecar.api.session_pb2 import Session
from sidecar.etcd.client import Etcd
from sidecar.etcd.election import Election
from sidecar.etcd.versions import takeover_wait
from sidecar.lab.localcluster import LocalEtcdCluster

T = TypeVar("T")

AGENT = "agent1.example.com"
AGENT_ADDRESS = "192.0.2.10"
NO_DATA_DIR = "/nonexistent/vsm-sidecar-test-data"
CLUSTER_TTL = 2  # seconds: a failover within a test's patience


def takeover_guard(ttl: float) -> float:
    """The wait a takeover after a lost lease adds on an etcd without the etcd-io/etcd#15247 fix
    (the bundled 3.5.1; tests/etcd/test_etcd_15247.py). Planned moves do not pay it."""
    return takeover_wait(config.build({"node_id": "a", "ttl": int(ttl)}))


def session(session_id: str = f"{AGENT}:10", *, placed: bool = True, **fields: Any) -> Session:
    """alice's session on display 10; ``placed`` adds what a VSM agent reports (its host, its
    address, status running). ``fields`` replace or add fields."""
    base: dict[str, Any] = {"username": "alice", "display": 10}
    if placed:
        base |= {"agent_hostname": AGENT, "agent_address": AGENT_ADDRESS, "status": "running"}
    return Session(session_id=session_id, **(base | fields))


def settings(node_id: str = "a", *, cluster: str | None = None,
             etcd: LocalEtcdCluster | str | None = None, **values: Any) -> config.Settings:
    """Settings as ``config.build`` makes them from a file with these values. With a
    ``cluster``, a TTL of CLUSTER_TTL unless ``ttl`` is given; ``etcd`` (a cluster or an
    endpoints string) sets etcd_endpoints."""
    # A data_dir that does not exist: an in-process node then records its lease nowhere
    # (logged) rather than in this host's /var/lib/vsm-sidecar.
    raw: dict[str, Any] = {"node_id": node_id, "data_dir": NO_DATA_DIR}
    if cluster is not None:
        raw |= {"cluster": cluster, "ttl": CLUSTER_TTL}
    if etcd is not None:
        raw["etcd_endpoints"] = etcd if isinstance(etcd, str) else etcd.endpoints_arg
    return config.build(raw | values)


def run_elections(etcd: LocalEtcdCluster | str, cluster: str,
                  body: Callable[[Callable[[str], Election]], Awaitable[T]],
                  **values: Any) -> T:
    """Run ``body(make_election)`` on a fresh event loop, each election on its own etcd client
    (TTL 2 unless ``values`` say otherwise); every client is closed afterwards."""
    opened: list[Etcd] = []

    def make(node_id: str) -> Election:
        s = settings(node_id, cluster=cluster, etcd=etcd, **values)
        client = Etcd(s)
        opened.append(client)
        return Election(client, s)

    async def main() -> T:
        try:
            return await body(make)
        finally:
            for client in opened:
                client.close()

    return asyncio.run(main())
