"""Connecting to etcd: one client whose calls run off the event loop, and the raw calls that
the client library lacks.

The ``etcd3`` client (python3-etcd3) is synchronous, so every call runs in a thread of our own
executor and is awaited with a deadline; the event loop never blocks on etcd. Errors are mapped
onto :mod:`sidecar.etcd.errors`, endpoints are chosen by :mod:`sidecar.etcd.connection`, retries
follow :mod:`sidecar.etcd.retry` and watches are :mod:`sidecar.etcd.watch`'s.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import etcd3
import grpc
from etcd3 import etcdrpc

from ..settings import Settings
from .connection import endpoints, fail_over, password, revive_if_all_failed
from .errors import ClientClosed, EtcdAccessDenied, EtcdUnavailable, NoSpace, translate
from .watch import Watch

T = TypeVar("T")


class Etcd:
    """One etcd client (a set of endpoints) whose calls run off the event loop.

    The client is created lazily because creating it authenticates against etcd, which may be
    down at start-up; it is created again after an authentication error, since etcd's simple
    tokens expire and the client library never renews its token.
    """

    def __init__(self, settings: Settings, *, timeout: float | None = None,
                 workers: int = 8, name: str = "etcd") -> None:
        self.settings = settings
        self.timeout = timeout if timeout is not None else settings.etcd_timeout
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._client: Any = None
        self._lock = threading.Lock()
        self.errors = 0
        # Writes etcd refused for want of space: the alarm monitor reads the alarms at once.
        self.no_space_errors = 0

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = etcd3.MultiEndpointEtcd3Client(
                    endpoints=endpoints(self.settings), timeout=self.timeout,
                    user=self.settings.etcd_user, password=password(self.settings),
                    failover=True)
            return self._client

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _forget(self, client: Any) -> None:
        """Stop handing out ``client`` (closed under a call) if it is still the current one."""
        with self._lock:
            if self._client is client:
                self._client = None

    def run_sync(self, fn: Callable[[Any], T], what: str) -> T:
        """Run ``fn(client)`` in the calling thread, mapping errors to :class:`EtcdError`."""
        client = None
        try:
            client = self._get_client()
            revive_if_all_failed(client)
            return fn(client)
        except Exception as exc:
            self.errors += 1
            error = translate(exc, what)
            if isinstance(error, NoSpace):
                self.no_space_errors += 1
            if isinstance(exc, grpc.RpcError) and client is not None:
                fail_over(client, exc)  # the client does this only for its own methods
            if isinstance(error, EtcdAccessDenied):
                self._drop_client()  # a fresh client authenticates anew
            elif isinstance(error, ClientClosed):
                self._forget(client)
            raise error from exc

    async def call(self, fn: Callable[[Any], T], what: str) -> T:
        """Run ``fn(client)`` in the executor and wait for it with a deadline."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self.run_sync, fn, what)
        try:
            # The client's own per-call timeout normally ends the call first; this bounds
            # the wait for a free executor thread and any call the client does not time out.
            async with asyncio.timeout(self.timeout * 2 + 0.5):
                return await future
        except TimeoutError:
            self.errors += 1
            raise EtcdUnavailable(f"{what}: no answer within {self.timeout * 2 + 0.5:.1f}s"
                                  ) from None

    def watch(self, key: bytes, *, prefix: bool = False, start_revision: int = 0) -> Watch:
        return Watch(self, key, prefix=prefix, start_revision=start_revision)

    def close(self) -> None:
        self._drop_client()
        self._executor.shutdown(wait=False, cancel_futures=True)


def kv_call(client: Any, method: str, request: Any, timeout: float | None = None) -> Any:
    """Call etcd's KV service directly (``Range`` or ``Txn``) on the client's current endpoint.

    For what the client's own methods lose: a transaction's response header (its commit
    revision) and a range's ``more`` flag for paging; and for a deadline of its own.
    """
    client.channel  # noqa: B018 - a property: selects a live endpoint, drops stale stubs
    return getattr(client.kvstub, method)(request, timeout or client.timeout,
                                          credentials=client.call_credentials,
                                          metadata=client.metadata)


def member_versions(client: Any, timeout: float) -> dict[str, str | None]:
    """Each configured member's etcd version (its Status RPC), or None where it did not answer.

    Asked member by member on each endpoint's own channel: the client's methods only ever ask
    the endpoint in use, and one member's version says nothing of the others (a rolling
    upgrade runs mixed versions for a while).
    """
    found: dict[str, str | None] = {}
    for label, endpoint in client.endpoints.items():
        stub = etcdrpc.MaintenanceStub(endpoint.channel)
        try:
            found[label] = stub.Status(etcdrpc.StatusRequest(), timeout,
                                       credentials=client.call_credentials,
                                       metadata=client.metadata).version
        except grpc.RpcError:
            found[label] = None
    return found


def lease_ttl_elsewhere(client: Any, lease_id: int, timeout: float) -> tuple[int, str]:
    """The lease's remaining TTL as etcd's leader sees it, asked through a member other than
    the endpoint in use (that one may be the stalled member whose answers are in question):
    a follower forwards TimeToLive to the raft leader. Returns (TTL, member); TTL -1 when the
    lease is gone (etcd answers TTL -1 for an unknown lease). With one endpoint only, that one
    is asked."""
    current = client.endpoint_in_use
    others = [e for e in client.endpoints.values() if e is not current] or [current]
    others.sort(key=lambda e: e.is_failed())  # members that failed lately last
    last: grpc.RpcError | None = None
    for endpoint in others:
        stub = etcdrpc.LeaseStub(endpoint.channel)
        try:
            response = stub.LeaseTimeToLive(etcdrpc.LeaseTimeToLiveRequest(ID=lease_id),
                                            timeout, credentials=client.call_credentials,
                                            metadata=client.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return -1, endpoint.netloc
            last = exc
            continue
        return int(response.TTL), endpoint.netloc
    assert last is not None
    # Translated here: run_sync would take a raw RpcError for a failure of the endpoint in use.
    raise translate(last, f"lease check through {len(others)} other member(s)")


def retrieve_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
