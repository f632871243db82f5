"""etcd's KV and Watch services on the event loop: the generated stubs on a ``grpc.aio`` channel.

For the session path, where each write is one etcd transaction and each applied change one
watch event, and the thread hops of the synchronous client (:class:`~sidecar.etcd.client.Etcd`
and :class:`~sidecar.etcd.watch.Watch`, a thread per stream) cost more CPU than the calls
themselves: here a call is awaited on the loop, a transaction with a deadline of its own. The
stubs are the ones python3-etcd3 ships (``etcd3.etcdrpc``), so the messages are the same.

It keeps what the synchronous client does for its calls: the configured endpoints (TLS the
same way), one in use at a time, the next one taken after a transient failure; a user and
password exchanged for a token, asked again after an authentication error (etcd's simple
tokens expire). Errors come out as :mod:`sidecar.etcd.errors`' family.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from ..settings import Settings
from .connection import _tls_credentials, password
from .errors import Compacted, EtcdAccessDenied, EtcdError, EtcdUnavailable, translate
from .keys import prefix_end
from .watch import Event, EventType, WatchBatch


class AioKV:
    """etcd's KV service, called on the running event loop. Create and close it there."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._targets = [urlsplit(url) for url in settings.etcd_endpoints]
        self._secure = self._targets[0].scheme == "https"
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._metadata: tuple[tuple[str, str], ...] | None = None

    @property
    def endpoint(self) -> str:
        target = self._targets[self._index]
        return f"{target.hostname}:{target.port or 2379}"

    async def txn(self, request: Any, seconds: float, what: str) -> Any:
        """One ``Txn`` on the endpoint in use; raises an :class:`EtcdError`. After a
        transient failure the next call goes to the next endpoint."""
        try:
            kv, metadata = await self._connected(seconds)
            return await kv.Txn(request, timeout=seconds, metadata=metadata)
        except (grpc.RpcError, OSError) as exc:
            raise await self.failed(exc, what) from exc

    def watch(self, key: bytes, *, prefix: bool, start_revision: int) -> AioWatch:
        """A watch of ``key`` (or every key under it) from ``start_revision``, as
        :class:`~sidecar.etcd.watch.Watch` delivers it: use ``async with`` and ``async for``."""
        return AioWatch(self, key, prefix=prefix, start_revision=start_revision)

    async def open_stream(self, method: str, metadata: tuple[tuple[str, str], ...]) -> Any:
        """A streaming call of etcd's Watch service on the endpoint in use."""
        try:
            _, token = await self._connected(self.settings.etcd_timeout)
        except (grpc.RpcError, OSError) as exc:
            raise await self.failed(exc, "watch") from exc
        return getattr(etcdrpc.WatchStub(self._channel), method)(metadata=(*token, *metadata))

    async def failed(self, exc: BaseException, what: str) -> EtcdError:
        """The error to raise for ``exc``, after the endpoint or the token was given up."""
        error = translate(exc, f"{what} ({self.endpoint})")
        await self._after(error)
        return error

    async def _connected(self, seconds: float) -> tuple[Any, tuple[tuple[str, str], ...]]:
        if self._channel is None:
            if self._secure:
                self._channel = grpc.aio.secure_channel(
                    self.endpoint, _tls_credentials(self.settings))
            else:
                self._channel = grpc.aio.insecure_channel(self.endpoint)
            self._kv = etcdrpc.KVStub(self._channel)
        if self._metadata is None:
            self._metadata = await self._authenticate(seconds)
        return self._kv, self._metadata

    async def _authenticate(self, seconds: float) -> tuple[tuple[str, str], ...]:
        if self.settings.etcd_user is None:
            return ()
        assert self._channel is not None
        response = await etcdrpc.AuthStub(self._channel).Authenticate(
            etcdrpc.AuthenticateRequest(name=self.settings.etcd_user,
                                        password=password(self.settings) or ""),
            timeout=seconds)
        return (("token", response.token),)

    async def _after(self, error: EtcdError) -> None:
        if isinstance(error, EtcdAccessDenied):
            self._metadata = None  # a token that expired: the next call authenticates anew
        elif error.transient:
            await self._drop()
            self._index = (self._index + 1) % len(self._targets)

    async def _drop(self) -> None:
        channel, self._channel, self._kv, self._metadata = self._channel, None, None, None
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        await self._drop()


class AioWatch:
    """One etcd watch stream on the event loop; iterate it for :class:`WatchBatch` es.

    Raises :class:`Compacted` when the start revision is gone and :class:`EtcdUnavailable`
    (or another :class:`EtcdError`) when the stream ends any other way. With etcd's
    ``hasleader`` requirement, a member cut off from its quorum ends the stream instead of
    going quiet. Leaving ``async with`` cancels the call.
    """

    def __init__(self, kv: AioKV, key: bytes, *, prefix: bool, start_revision: int) -> None:
        self._kv = kv
        self._create = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=key, range_end=prefix_end(key) if prefix else b"",
            start_revision=start_revision))
        self._call: Any = None

    async def __aenter__(self) -> AioWatch:
        self._call = await self._kv.open_stream("Watch", (("hasleader", "true"),))
        try:
            await self._call.write(self._create)
        except (grpc.RpcError, OSError) as exc:
            self._call.cancel()
            raise await self._kv.failed(exc, "watch") from exc
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._call.cancel()

    def __aiter__(self) -> AioWatch:
        return self

    async def __anext__(self) -> WatchBatch:
        try:
            response = await self._call.read()
        except (grpc.RpcError, OSError) as exc:
            raise await self._kv.failed(exc, "watch") from exc
        if response is grpc.aio.EOF:
            raise EtcdUnavailable("watch: stream ended")
        if response.compact_revision:
            raise Compacted(response.compact_revision)
        if response.canceled:
            raise EtcdUnavailable(f"watch: {response.cancel_reason or 'canceled by etcd'}")
        return WatchBatch(response.header.revision, tuple(map(_event, response.events)))


def _event(raw: Any) -> Event:
    kind = EventType.DELETE if raw.type == kv_pb2.Event.DELETE else EventType.PUT
    kv = raw.kv
    return Event(kind, kv.key, kv.value, kv.create_revision, kv.mod_revision)
