"""etcd's KV service on the event loop: the generated stubs on a ``grpc.aio`` channel.

For the session write path, where each write is one etcd transaction and the thread hop of the
synchronous client (:class:`~sidecar.etcd.client.Etcd`) cost more CPU than the call itself:
here a call is awaited on the loop, with a deadline of its own. The stubs are the ones
python3-etcd3 ships (``etcd3.etcdrpc``), so the messages are the same.

It keeps what the synchronous client does for its calls: the configured endpoints (TLS the
same way), one in use at a time, the next one taken after a transient failure; a user and
password exchanged for a token, asked again after an authentication error (etcd's simple
tokens expire). Errors come out as :mod:`sidecar.etcd.errors`' family.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import grpc
from etcd3 import etcdrpc

from ..config import Settings
from .connection import _tls_credentials, password
from .errors import EtcdAccessDenied, EtcdError, translate


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
            error = translate(exc, f"{what} ({self.endpoint})")
            await self._after(error)
            raise error from exc

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
