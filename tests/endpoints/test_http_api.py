"""The HTTP endpoints (/primary /standby /health /metrics) served by a real Node, and the
server's handling of bad clients: garbage, oversized headers, silence."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings
from sidecar.core.node import Node
from sidecar.core.roles import Role
from sidecar.endpoints.http_api import HttpServer
from sidecar.endpoints.metrics import SidecarCollector, create_registry
from sidecar.etcd.client import Etcd
from sidecar.etcd.keys import Keys
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.resource.controller import ResourceController
from sidecar.sessions.follower import Follower
from sidecar.sessions.store import SessionStore
from sidecar.sessions.writer import Writer

from .. import builders
from ..aio import running

T = TypeVar("T")
WAIT = 10.0  # generous: the machine is shared
# No proxy from the environment may stand between the test and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ROLE_METRICS = {
    "vsm_sidecar_info", "vsm_sidecar_role", "vsm_sidecar_epoch", "vsm_sidecar_role_changes",
    "vsm_sidecar_lease_time_left_seconds", "vsm_sidecar_keepalive_latency_seconds",
    "vsm_sidecar_etcd_errors", "vsm_sidecar_session_writes",
    "vsm_sidecar_session_write_transactions", "vsm_sidecar_mirror_revision",
    "vsm_sidecar_mirror_age_seconds", "vsm_sidecar_mirror_connected",
    "vsm_sidecar_mirror_garbage_records", "vsm_sidecar_mirror_resyncs", "vsm_sidecar_handovers",
    "vsm_sidecar_paused",
}
RESOURCE_METRICS = {
    "vsm_sidecar_resource_ip_held", "vsm_sidecar_resource_ip_announcements_sent",
    "vsm_sidecar_resource_ip_stale_holders_seen", "vsm_sidecar_resource_ip_repairs",
}


def run(body: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(body)


# A cluster's settings whose etcd nobody answers at, unless a test names one.
NO_ETCD = "http://127.0.0.1:1"


def _fetch(port: int, path: str, method: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with OPENER.open(request, timeout=WAIT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


async def fetch(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one request made with urllib (in a thread)."""
    return await asyncio.to_thread(_fetch, port, path, method)


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` as is and return everything the server answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def metrics(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family name -> {sorted labels: value} for the vsm_sidecar_* samples."""
    result: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name.startswith("vsm_sidecar"):
            samples = result.setdefault(family.name, {})
            for sample in family.samples:
                samples[tuple(sorted(sample.labels.items()))] = sample.value
    return result


@contextlib.asynccontextmanager
async def serving(node: Node, collector: SidecarCollector, **options: Any,
                  ) -> AsyncIterator[HttpServer]:
    server = HttpServer(node, create_registry(collector), "127.0.0.1:0", **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def parts(s: Settings, data_dir: Path,
                ) -> AsyncIterator[tuple[Node, Follower, Writer, SidecarCollector]]:
    """A node, follower and writer wired as service.py does (none started), and a collector."""
    control, data = Etcd(s, name="control"), Etcd(s, name="data")
    store = SessionStore(data_dir)
    store.load()
    try:
        node = Node(s, control)
        keys = Keys(s.prefix)
        follower = Follower(data, keys, store)
        writer = Writer(data, keys, node.primary_epoch)
        yield node, follower, writer, SidecarCollector(node, node.election, [control, data],
                                                       follower, writer)
    finally:
        store.close()
        control.close()
        data.close()


@pytest.mark.etcd
def test_endpoints_of_a_primary_node(
    etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path
) -> None:
    """A node alone in its cluster becomes PRIMARY: /primary answers 200 and /standby 503,
    both naming the role, node and epoch; /health is 200; HEAD gives the headers only;
    /metrics reports role PRIMARY = 1 (others 0), the node's epoch and a lease time left; an
    unknown path is 404, POST is 405 with Allow, a garbage request line is 400 and the server
    answers normally afterwards. Once the node has handed over (STOPPING), /health is 503."""
    s = builders.settings(cluster=cluster_name, etcd=etcd_cluster)

    async def body() -> None:
        async with parts(s, tmp_path) as (node, follower, writer, collector):
            stop = asyncio.Event()
            async with running(follower.run(), "follower"), running(writer.run(), "writer"), \
                    running(node.run(stop), "node") as node_task, \
                    serving(node, collector) as server:
                deadline = time.monotonic() + WAIT
                while node.status().role is not Role.PRIMARY:
                    assert time.monotonic() < deadline, node.status()
                    await asyncio.sleep(0.02)
                status = node.status()
                described = f"PRIMARY node=a epoch={status.epoch}\n".encode()
                port = server.port

                code, _, text = await fetch(port, "/primary")
                assert (code, text) == (200, described)
                code, _, text = await fetch(port, "/standby")
                assert (code, text) == (503, described)
                code, _, text = await fetch(port, "/health")
                assert (code, text) == (200, described)
                code, headers, text = await fetch(port, "/primary?from=haproxy", "HEAD")
                assert (code, headers["Content-Length"], text) == (200, str(len(described)), b"")

                code, headers, text = await fetch(port, "/metrics")
                assert code == 200
                assert headers["Content-Type"].startswith("text/plain; version=")
                found = metrics(text)
                assert set(found) == ROLE_METRICS
                assert found["vsm_sidecar_role"] == {
                    (("role", role.name),): 1.0 if role is Role.PRIMARY else 0.0
                    for role in Role}
                assert found["vsm_sidecar_epoch"] == {(): float(status.epoch)}
                assert status.epoch > 0
                assert 0 < found["vsm_sidecar_lease_time_left_seconds"][()] <= s.ttl
                assert found["vsm_sidecar_role_changes"][()] == node.role_changes >= 1

                assert (await fetch(port, "/nope"))[0] == 404
                code, headers, _ = await fetch(port, "/primary", "POST")
                assert (code, headers["Allow"]) == (405, "GET, HEAD")
                answer = await raw(port, b"\x16\x03\x01 garbage\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
                assert (await fetch(port, "/primary"))[0] == 200
                stop.set()  # hand over as in production: resign, so no lease is left behind
                async with asyncio.timeout(WAIT):
                    await node_task
                stopping = f"STOPPING node=a epoch={status.epoch}\n".encode()
                for path in ("/health", "/primary"):
                    code, _, text = await fetch(port, path)
                    assert (path, code, text) == (path, 503, stopping)

    run(body())


def test_a_starting_node_is_healthy_but_neither_primary_nor_standby(
    cluster_name: str, tmp_path: Path
) -> None:
    """Before the first election (no etcd reachable, node not run): /health 200 STARTING,
    /primary and /standby 503, and no resource IP metrics when none is configured."""

    async def body() -> None:
        async with parts(builders.settings(cluster=cluster_name, etcd=NO_ETCD),
                         tmp_path) as (node, _, _, collector), \
                serving(node, collector) as server:
            for path, expected in (("/health", 200), ("/primary", 503), ("/standby", 503)):
                code, _, text = await fetch(server.port, path)
                assert (path, code, text) == (path, expected, b"STARTING node=a epoch=0\n")
            found = metrics((await fetch(server.port, "/metrics"))[2])
            assert set(found) == ROLE_METRICS
            assert found["vsm_sidecar_lease_time_left_seconds"] == {(): 0.0}
            assert found["vsm_sidecar_mirror_connected"] == {(): 0.0}

    run(body())


def test_resource_ip_metrics_appear_when_one_is_configured(
    cluster_name: str, tmp_path: Path
) -> None:
    """With a resource IP configured (on lo, where a TEST-NET address is never held) the four
    resource IP metrics are reported, held = 0 and the counters at their current values."""
    s = builders.settings(cluster=cluster_name, etcd=NO_ETCD, vip="192.0.2.77/32",
                          vip_interface="lo")

    async def body() -> None:
        async with parts(s, tmp_path) as (node, follower, writer, base):
            resource = ResourceController(s, node.is_primary)
            resource.ip.stats.repairs = 3
            collector = SidecarCollector(node, node.election, base.etcds, follower, writer,
                                         resource)
            async with serving(node, collector) as server:
                found = metrics((await fetch(server.port, "/metrics"))[2])
        assert set(found) == ROLE_METRICS | RESOURCE_METRICS
        assert found["vsm_sidecar_resource_ip_held"] == {(): 0.0}
        assert found["vsm_sidecar_resource_ip_repairs"] == {(): 3.0}
        assert found["vsm_sidecar_resource_ip_announcements_sent"] == {(): 0.0}

    run(body())


def test_bad_clients_get_an_error_and_never_block_others(
    cluster_name: str, tmp_path: Path
) -> None:
    """A client that sends half a request and goes silent gets 408 after the read timeout,
    and meanwhile other clients are answered; oversized headers get 431; a bad HTTP version
    and a header line without a colon get 400; after all of it the server still answers."""

    async def body() -> None:
        async with parts(builders.settings(cluster=cluster_name, etcd=NO_ETCD),
                         tmp_path) as (node, _, _, collector), \
                serving(node, collector, read_timeout=1.0) as server:
            port = server.port
            silent = asyncio.create_task(raw(port, b"GET /health HTTP/1.1\r\n"))
            started = time.monotonic()
            assert (await fetch(port, "/health"))[0] == 200
            assert not silent.done()
            answer = await silent
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert 0.9 < time.monotonic() - started < WAIT

            huge = b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"x" * 10_000 + b"\r\n\r\n"
            assert (await raw(port, huge)).startswith(b"HTTP/1.1 431 ")
            many = b"GET /health HTTP/1.1\r\n" + b"A: b\r\n" * 100  # short, but too many
            assert (await raw(port, many + b"\r\n")).startswith(b"HTTP/1.1 431 ")
            for bad in (b"GET /health HTTP/2.0\r\n\r\n", b"GET /health HTTP/1.1\r\nnocolon\r\n\r\n",
                        b"GET health HTTP/1.1\r\n\r\n", b"\r\n\r\n"):
                assert (await raw(port, bad)).startswith(b"HTTP/1.1 400 "), bad
            answer = await raw(port, b"GET /health HTTP/1.0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\nConnection: close\r\n" in answer

    run(body())
