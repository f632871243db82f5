"""The one session builder and the one settings builder the tests share (issue 16)."""

from __future__ import annotations

from typing import Any

from sidecar import config
from sidecar.api.session_pb2 import Session
from sidecar.lab.localcluster import LocalEtcdCluster

AGENT = "agent1.example.com"
AGENT_ADDRESS = "192.0.2.10"
CLUSTER_TTL = 2  # seconds: a failover within a test's patience


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
    raw: dict[str, Any] = {"node_id": node_id}
    if cluster is not None:
        raw |= {"cluster": cluster, "ttl": CLUSTER_TTL}
    if etcd is not None:
        raw["etcd_endpoints"] = etcd if isinstance(etcd, str) else etcd.endpoints_arg
    return config.build(raw | values)
