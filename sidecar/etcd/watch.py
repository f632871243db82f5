"""Watches on a key or a prefix, delivered to asyncio as batches of events.

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
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import grpc
import structlog
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from .connection import fail_over
from .errors import Compacted, EtcdError, EtcdUnavailable, translate
from .keys import prefix_end

log = structlog.get_logger(__name__)


class Runner(Protocol):
    """What a watch needs of :class:`sidecar.etcd.client.Etcd`: a client, errors mapped."""

    def run_sync(self, fn: Callable[[Any], Any], what: str) -> Any: ...


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
    lease: int = 0  # the lease the key was put on (0 for none, and for a delete)


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

    def __init__(self, etcd: Runner, key: bytes, *, prefix: bool, start_revision: int) -> None:
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
                fail_over(client, exc)
                self._deliver(translate(exc, "watch"))
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


def _event(raw: Any) -> Event:
    kind = EventType.DELETE if raw.type == kv_pb2.Event.DELETE else EventType.PUT
    kv = raw.kv
    return Event(kind, kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease)
