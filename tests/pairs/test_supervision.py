"""No half-alive sidecar: a task the node cannot live without never ends silently.

The unit tests pin down :func:`sidecar.core.tasks.supervise`; the etcd tests run a whole sidecar
(``service.Service``) in this process against the real test cluster, end one of its tasks as a
bug would, and watch the process stop serving health and exit non-zero.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import sidecar
from sidecar import config, service
from sidecar.core.roles import Role
from sidecar.core.tasks import TaskEnded, supervise
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.ports import free_port

PACKAGE = Path(sidecar.__file__).parent


async def forever() -> None:
    await asyncio.Event().wait()


async def fail_soon(error: Exception) -> None:
    await asyncio.sleep(0.01)
    raise error


def run(body: Coroutine[Any, Any, None]) -> None:
    asyncio.run(body)


# -- supervise ------------------------------------------------------------------------------


def test_a_failing_task_raises_its_error_and_cancels_the_others() -> None:
    """The first task to raise ends the group: its own exception, the others cancelled."""
    async def body() -> None:
        other = asyncio.Event()

        async def bystander() -> None:
            try:
                await forever()
            finally:
                other.set()

        with pytest.raises(KeyError, match="boom"):
            await supervise({"bystander": bystander(), "bad": fail_soon(KeyError("boom"))})
        assert other.is_set()
    run(body())


def test_after_a_failed_task_the_caller_is_not_left_cancelled() -> None:
    """After a task raised, the calling task carries no cancellation of ours, so a later
    asyncio.timeout still expires as TimeoutError. (asyncio.TaskGroup leaves cancelling() at 1
    here on 3.11, and Python 3.11.2's timeout then raises CancelledError: the bug that kept a
    standby from ever taking over again.)"""
    async def body() -> None:
        me = asyncio.current_task()
        assert me is not None
        with pytest.raises(RuntimeError):
            await supervise({"bad": fail_soon(RuntimeError("x")), "other": forever()})
        assert me.cancelling() == 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await forever()
    run(body())


@pytest.mark.parametrize("ending", ["returns", "is cancelled"])
def test_a_task_that_ends_without_an_error_is_an_error(ending: str) -> None:
    """A task that returns, or that someone else cancels, raises TaskEnded naming it: a
    TaskGroup would carry on without it."""
    async def body() -> None:
        async def quits() -> None:
            await asyncio.sleep(0.01)

        async def victim() -> None:
            await forever()

        async def assassin() -> None:
            await asyncio.sleep(0.01)
            next(t for t in asyncio.all_tasks() if t.get_name() == "victim").cancel()
            await forever()

        coros = {"victim": quits()} if ending == "returns" else \
            {"victim": victim(), "assassin": assassin()}
        with pytest.raises(TaskEnded, match=r"'victim' (returned|was cancelled)"):
            await supervise(coros)
    run(body())


def test_until_set_returns_and_cancels_every_task() -> None:
    """Setting ``until`` is the one normal end: no error, nothing left running."""
    async def body() -> None:
        until = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, until.set)
        before = len(asyncio.all_tasks())
        await supervise({"a": forever(), "b": forever()}, until=until)
        assert len(asyncio.all_tasks()) == before
    run(body())


def test_a_cancelled_caller_cancels_and_awaits_its_tasks() -> None:
    """Cancelling the caller cancels the tasks, waits for them, and propagates."""
    async def body() -> None:
        cleaned = asyncio.Event()

        async def slow_cleanup() -> None:
            try:
                await forever()
            finally:
                await asyncio.sleep(0.02)
                cleaned.set()

        caller = asyncio.create_task(supervise({"slow": slow_cleanup()}))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert cleaned.is_set()
    run(body())


def test_the_package_uses_no_task_group() -> None:
    """asyncio.TaskGroup ignores a child that ends by cancellation and, on 3.11, leaves its
    caller marked cancelled: every group of long-lived tasks goes through supervise()."""
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if re.search(r"\bTaskGroup\b", path.read_text())
                   and path.name != "tasks.py")
    assert users == []


# -- a whole sidecar ------------------------------------------------------------------------


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0  # nothing listens any more


def _grpc_health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError as error:
            return str(error.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


@pytest.mark.etcd
@pytest.mark.parametrize("task_name", ["keepalive", "leadership", "member", "follower",
                                       "writer"])
def test_a_dead_essential_task_stops_health_and_exits_non_zero(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path, task_name: str
) -> None:
    """Any task the node depends on that ends (here: cancelled, as a bug might) makes the
    sidecar stop answering SERVING on gRPC health and 200 on /health, hand over, and return
    exit code 1 within a second; before that, both said healthy."""
    grpc_port, http_port = free_port(), free_port()
    settings = config.build({
        "node_id": "a", "cluster": cluster_name, "ttl": 2,
        "etcd_endpoints": etcd_cluster.endpoints_arg, "data_dir": str(tmp_path / "data"),
        "grpc_listen": f"127.0.0.1:{grpc_port}", "http_listen": f"127.0.0.1:{http_port}"})

    async def body() -> None:
        sidecar_service = service.Service(settings)
        serving = asyncio.create_task(sidecar_service.serve())
        try:
            await kill_and_watch(sidecar_service, serving)
        finally:  # a sidecar that did not exit is stopped, and never outlives the test
            sidecar_service.stop.set()
            await asyncio.wait({serving}, timeout=5)
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    async def kill_and_watch(sidecar_service: service.Service,
                             serving: asyncio.Task[int]) -> None:
        async with asyncio.timeout(20):
            async for status in sidecar_service.node.watch():
                if status.role is Role.PRIMARY:
                    break
        assert await asyncio.to_thread(_health, http_port) == 200
        assert await asyncio.to_thread(_grpc_health, f"127.0.0.1:{grpc_port}") == "SERVING"
        victim = next(t for t in asyncio.all_tasks() if t.get_name() == task_name)
        killed = time.monotonic()
        victim.cancel()
        async with asyncio.timeout(1.0):
            # Polling another server's answer: there is no event to wait on.
            while await asyncio.to_thread(_health, http_port) == 200:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        exit_code = await asyncio.wait_for(serving, timeout=max(0.05, 1.0 - (
            time.monotonic() - killed)))
        assert exit_code == service.EXIT_FAILED
        assert await asyncio.to_thread(_grpc_health, f"127.0.0.1:{grpc_port}") != "SERVING"
        assert not sidecar_service.node.is_primary()
    run(body())
