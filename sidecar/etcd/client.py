"""Connecting to etcd: endpoints, TLS, auth, error mapping, the retry policy, and watches.

The ``etcd3`` client (python3-etcd3) is synchronous, so every call runs in a thread of our own
executor and is awaited with a deadline; the event loop never blocks on etcd.

Watches are not taken from the client: its watcher thread calls a name it never imported
(``six``) when a stream breaks, so a broken stream is never reported and the watch hangs.
:class:`Watch` drives the watch RPC itself on the client's channel, with etcd's
``hasleader`` requirement so that a member cut off from its quorum ends the stream instead of
going quiet, and reports every way the stream ends.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3
import etcd3.exceptions
import grpc
import structlog
import tenacity
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from ..config import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# How long an endpoint that failed is skipped before it is tried again.
ENDPOINT_RETRY_SECONDS = 1.0

_TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


class EtcdError(Exception):
    """An etcd call failed; ``transient`` says whether retrying can help."""

    transient = True


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time (down, partitioned, no quorum)."""


class EtcdAccessDenied(EtcdError):
    """Authentication or authorisation failed: a configuration problem, not an outage."""

    transient = False


class LeaseGone(EtcdError):
    """etcd no longer has the lease a call used (it expired or was revoked)."""

    transient = False


class Compacted(EtcdError):
    """A watch asked for history that etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


def retry_policy(what: str, *, max_wait: float = 2.0) -> tenacity.AsyncRetrying:
    """The one retry policy: transient etcd errors, jittered exponential backoff, forever.

    Callers that must give up at a deadline wrap the retrying block in ``asyncio.timeout``.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("etcd_retry", what=what, attempt=state.attempt_number, error=str(exc),
                    retry_in=round(state.upcoming_sleep, 2))

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, EtcdError) and e.transient),
        # 0.1 s, 0.2 s, 0.4 s ... up to max_wait, each plus up to 0.1 s of jitter.
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=max_wait, jitter=0.1),
        before_sleep=before_sleep,
        reraise=True,
    )


def _endpoints(settings: Settings) -> list[etcd3.Endpoint]:
    creds = None
    secure = urlsplit(settings.etcd_endpoints[0]).scheme == "https"
    if secure:
        creds = _tls_credentials(settings)
    result = []
    for url in settings.etcd_endpoints:
        parts = urlsplit(url)
        result.append(etcd3.Endpoint(parts.hostname or "", parts.port or 2379, secure=secure,
                                     creds=creds, time_retry=ENDPOINT_RETRY_SECONDS))
    return result


def _tls_credentials(settings: Settings) -> grpc.ChannelCredentials:
    def read(path: Any) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(
        read(settings.etcd_ca), read(settings.etcd_key), read(settings.etcd_cert))


def _password(settings: Settings) -> str | None:
    if settings.etcd_password_file is None:
        return None
    return settings.etcd_password_file.read_text(encoding="utf-8").rstrip("\r\n")


class ClientClosed(EtcdUnavailable):
    """The client was closed (by another thread) while a call was on its way."""


def _translate(exc: BaseException, what: str) -> EtcdError:
    """Map the many shapes of a failed call onto our three kinds."""
    if isinstance(exc, EtcdError):
        return exc
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        # etcd answers a wrong user or password with INVALID_ARGUMENT, not UNAUTHENTICATED.
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or \
                "authentication failed" in (detail or ""):
            return EtcdAccessDenied(f"{what}: {detail}")
        if code in _TRANSIENT_CODES:
            return EtcdUnavailable(f"{what}: {code.name if code else '?'} {detail}")
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in (detail or ""):
            return LeaseGone(f"{what}: {detail}")
        error = EtcdError(f"{what}: {code.name if code else '?'} {detail}")
        error.transient = False
        return error
    if isinstance(exc, etcd3.exceptions.Etcd3Exception | TimeoutError | OSError):
        # The client wraps the gRPC error into a bare "connection failed"; its detail (a TLS
        # handshake failure, a refused connection) is what an operator needs to see.
        cause = exc.__context__
        detail = cause.details() if isinstance(cause, grpc.RpcError) and hasattr(
            cause, "details") else ""
        return EtcdUnavailable(f"{what}: {type(exc).__name__} {exc} {detail or ''}".rstrip())
    if isinstance(exc, ValueError) and "closed" in str(exc) and "channel" in str(exc).lower():
        # Another thread dropped the client (after an access error) while this call was on
        # its way: the next attempt gets a fresh client.
        return ClientClosed(f"{what}: the client was closed during the call")
    raise exc


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

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = etcd3.MultiEndpointEtcd3Client(
                    endpoints=_endpoints(self.settings), timeout=self.timeout,
                    user=self.settings.etcd_user, password=_password(self.settings),
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
            _revive_if_all_failed(client)
            return fn(client)
        except Exception as exc:
            self.errors += 1
            error = _translate(exc, what)
            if isinstance(exc, grpc.RpcError) and client is not None:
                _fail_over(client, exc)  # the client does this only for its own methods
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


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Event:
    type: EventType
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: its events (possibly none) and the revision etcd was at."""

    revision: int
    events: tuple[Event, ...]


_END = object()


class Watch:
    """A watch on a key or a prefix from a revision, delivered as batches to asyncio.

    Iterate with ``async for batch in watch``; the iteration raises :class:`Compacted` when the
    start revision is gone and :class:`EtcdUnavailable` when the stream breaks for any other
    reason. Closing (or leaving ``async with``) cancels the RPC.
    """

    def __init__(self, etcd: Etcd, key: bytes, *, prefix: bool, start_revision: int) -> None:
        self._etcd = etcd
        self._key = key
        self._range_end = prefix_end(key) if prefix else b""
        self._start_revision = start_revision
        self._queue: asyncio.Queue[WatchBatch | BaseException | object] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._requests: queue.Queue[Any] = queue.Queue()
        self._call: Any = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
        self._thread.start()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchBatch:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, WatchBatch)
        return item

    def close(self) -> None:
        self._closed.set()
        self._requests.put(None)
        call = self._call
        if call is not None:
            call.cancel()

    def _deliver(self, item: WatchBatch | BaseException | object) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _request_stream(self) -> Iterator[Any]:
        create = etcdrpc.WatchCreateRequest(
            key=self._key, range_end=self._range_end, start_revision=self._start_revision)
        yield etcdrpc.WatchRequest(create_request=create)
        # Keep the request side open until closed: ending it would end the watch.
        while self._requests.get() is not None:
            pass

    def _run(self) -> None:
        try:
            client = self._etcd.run_sync(lambda c: c, "watch")
            stub = etcdrpc.WatchStub(client.channel)
            metadata = (*(client.metadata or ()), ("hasleader", "true"))
            self._call = stub.Watch(self._request_stream(), metadata=metadata,
                                    credentials=client.call_credentials)
            if self._closed.is_set():
                self._call.cancel()
            for response in self._call:
                if not self._handle(response):
                    return
            self._deliver(EtcdUnavailable("watch: stream ended"))
        except grpc.RpcError as exc:
            if not self._closed.is_set():
                _fail_over(client, exc)
                self._deliver(_translate(exc, "watch"))
        except EtcdError as exc:
            self._deliver(exc)
        except Exception as exc:  # a bug here must still end the iteration, loudly
            log.exception("watch_failed")
            self._deliver(EtcdUnavailable(f"watch: {exc!r}"))
        finally:
            self._deliver(_END)

    def _handle(self, response: Any) -> bool:
        if response.compact_revision:
            self._deliver(Compacted(response.compact_revision))
            return False
        if response.canceled:
            reason = response.cancel_reason or "canceled by etcd"
            self._deliver(EtcdUnavailable(f"watch: {reason}"))
            return False
        events = tuple(_event(e) for e in response.events)
        self._deliver(WatchBatch(response.header.revision, events))
        return True


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
    raise _translate(last, f"lease check through {len(others)} other member(s)")


def _revive_if_all_failed(client: Any) -> None:
    """Never let every endpoint be "failed" at once.

    The client skips a failed endpoint for ENDPOINT_RETRY_SECONDS and, when all are skipped,
    refuses every call without trying. During an etcd leader election every member times out
    for a moment, so all get marked, and the client would then stay silent for a second after
    etcd is back: a second the primary's lease deadline does not have. The endpoint that failed
    longest ago is tried again instead.
    """
    endpoints = list(client.endpoints.values())
    if endpoints and all(e.is_failed() for e in endpoints):
        min(endpoints, key=lambda e: e.last_failed).last_failed = 0


def _fail_over(client: Any, exc: grpc.RpcError) -> None:
    """Skip this endpoint for a while so the next call or watch goes to another one.

    The next access to ``client.channel`` then picks another endpoint and drops the stubs bound
    to the failed one.
    """
    if hasattr(exc, "code") and exc.code() in _TRANSIENT_CODES:
        endpoint = client.endpoint_in_use
        if endpoint is not None:
            endpoint.fail()


def _event(raw: Any) -> Event:
    kind = EventType.DELETE if raw.type == kv_pb2.Event.DELETE else EventType.PUT
    kv = raw.kv
    return Event(kind, kv.key, kv.value, kv.create_revision, kv.mod_revision)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])
