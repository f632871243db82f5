"""The standby copy: a followed, durable copy of the session records on every node.

:class:`Follower` keeps the local copy (:class:`~sidecar.sessions.store.SessionStore`) current. It
watches the whole cluster prefix, not only ``sessions/``: etcd delivers a watch's events in
revision order, so once the follower has seen the event of *any* key at revision W, every
session change up to W has been applied. That turns safety rule 5 (a node becomes PRIMARY only
with a copy current to the revision at which it won) into :meth:`Follower.wait_current` of the
leader key's own revision. When etcd has compacted past the copy, the follower re-reads the
whole range at one revision and says so in the log: page by page, each page checked (in a
worker thread) while etcd reads the next, into a
:class:`~sidecar.sessions.replacement.Replacement` that the store swaps in whole at the end, so the
copy never holds part of the new range and the process never holds the whole range as Python
objects.

The primary's write path is :class:`~sidecar.sessions.writer.Writer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from etcd3 import etcdrpc

from ..etcd.aiokv import AioKV
from ..etcd.client import Etcd, kv_call
from ..etcd.errors import Compacted
from ..etcd.keys import Keys, prefix_end
from ..etcd.retry import reconnect_policy, retry_policy
from ..etcd.watch import Event, EventType
from .record import (
    SessionDecodeError,
    check_record,
    kept_form,
    validate_session_id,
    verify_record,
)
from .replacement import Replacement
from .store import SessionStore

log = structlog.get_logger(__name__)

# Records per page of a full re-read (~1.2 MB of ~450-byte records). etcd walks every key
# left in the range to count them on each page, so small pages cost time (500: +1.3 s for
# 100,000 records); big ones cost memory that the C allocator keeps after it was freed
# (5000: +20 MB of resident memory, 2500: +5 MB).
RESYNC_PAGE = 2500
FLUSH_INTERVAL = 0.05


@dataclass(frozen=True)
class Change:
    """One change of the copy: a put (``raw`` set: the record as the copy keeps it, see
    :func:`~sidecar.sessions.recordcheck.check_record`) or a delete, at a revision."""

    session_id: str
    raw: bytes | None
    revision: int


class Follower:
    """Keeps the local copy of ``sessions/`` current and tells who waits for which revision."""

    def __init__(self, etcd: Etcd, keys: Keys, store: SessionStore) -> None:
        self.etcd = etcd
        self.keys = keys
        self.store = store
        # The watch that applies each change runs on the event loop (a thread per stream cost
        # more CPU per change than applying it); the full re-read stays on the client.
        self.kv = AioKV(etcd.settings)
        self.connected = False
        self.garbage = 0
        self.resyncs = 0
        self._seen = asyncio.Condition()
        self._subscribers: set[asyncio.Queue[Change]] = set()
        self._flush_needed = asyncio.Event()
        self._convert_needed = False  # the copy holds records of a re-read still as JSON

    @property
    def revision(self) -> int:
        """Every change under the cluster prefix up to this revision has been applied."""
        return self.store.applied_revision

    async def run(self) -> None:
        """Follow etcd forever: resume from the stored revision, re-read when compacted."""
        flusher = asyncio.create_task(self._flush_loop(), name="store-flush")
        try:
            resync = self.store.applied_revision == 0
            async for attempt in reconnect_policy("follow sessions", on_retry=self._ended):
                with attempt:
                    while True:  # left only by an error: a Watch reports every end
                        try:
                            if resync:
                                await self._resync()
                                resync = False
                            await self._watch()
                        except Compacted as exc:
                            log.warning("mirror_compacted", applied=self.revision,
                                        compacted=exc.compact_revision, decision="full re-read")
                            resync = True
        finally:
            self.connected = False
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await asyncio.to_thread(self.store.flush)
            await asyncio.shield(self.kv.close())

    def _ended(self, exc: BaseException) -> None:
        self.connected = False
        log.info("mirror_watch_ended", error=str(exc), applied=self.revision)

    async def _resync(self) -> None:
        started = time.monotonic()
        with Replacement() as fresh:
            revision = await self._read_all(fresh)
            # ~0.5 s for 100,000 records: in a thread, or the node's deadline watchdog,
            # keepalives and the gRPC server (all on this event loop) would stall behind it.
            await asyncio.to_thread(self.store.replace, fresh, revision)
            records = len(fresh)
        _return_free_memory()
        self.resyncs += 1
        self._convert_needed = True
        self._flush_needed.set()
        log.info("mirror_resynced", records=records, revision=revision,
                 seconds=round(time.monotonic() - started, 3))
        await self._notify_seen()

    async def _read_all(self, fresh: Replacement) -> int:
        """Put every valid record under ``sessions/`` into ``fresh``, read page by page at one
        revision, and return that revision. Each page is checked while the next is read."""
        start, end = self.keys.sessions, prefix_end(self.keys.sessions)
        page = await self._read_page(start, end, 0)
        revision = int(page.header.revision)
        while True:
            following = None
            if page.more and page.kvs:
                following = asyncio.create_task(
                    self._read_page(page.kvs[-1].key + b"\0", end, revision))
            try:
                # ~10 µs a record: in a thread, for the same reason as above.
                await asyncio.to_thread(self._take_valid, page.kvs, fresh)
            except BaseException:
                if following is not None:
                    following.cancel()
                raise
            if following is None:
                return revision
            page = await following

    def _take_valid(self, kvs: Any, fresh: Replacement) -> None:
        """Add the valid records of one page to ``fresh``; skip (and count) the others."""
        for kv in kvs:
            session_id = self._valid_id(kv.key)
            if session_id is None:
                continue
            try:
                verify_record(kv.value, session_id)
            except SessionDecodeError as exc:
                self._skip(kv.key, str(exc))
                continue
            # As JSON, converted after the copy is in place (_flush_loop): a re-read that
            # converted each record took a third longer. Stripped, so it starts with "{".
            fresh.add(session_id, kv.value.lstrip(), kv.mod_revision)

    async def _read_page(self, start: bytes, end: bytes, revision: int) -> Any:
        def read(client: Any) -> Any:
            request = etcdrpc.RangeRequest(key=start, range_end=end, limit=RESYNC_PAGE,
                                           revision=revision)
            return kv_call(client, "Range", request)

        async for attempt in retry_policy("read sessions"):
            with attempt:
                return await self.etcd.call(read, "read sessions")
        raise AssertionError("unreachable")

    async def _watch(self) -> None:
        prefix = self.keys.prefix.encode()
        async with self.kv.watch(prefix, prefix=True,
                                 start_revision=self.revision + 1) as watch:
            self.connected = True
            async for batch in watch:
                for event in batch.events:
                    self._apply(event)
                if batch.events:
                    self._flush_needed.set()
                    await self._notify_seen()

    def _apply(self, event: Event) -> None:
        if not event.key.startswith(self.keys.sessions):
            self.store.advance(event.mod_revision)
            return
        if event.type is EventType.DELETE:
            session_id = self._valid_id(event.key)
            if session_id is None:
                self.store.advance(event.mod_revision)
                return
            if self.store.apply_delete(session_id, event.mod_revision):
                self._publish(Change(session_id, None, event.mod_revision))
            return
        checked = self._valid_id_and_record(event.key, event.value)
        if checked is None:
            # etcd holds no valid record under this key any more, so neither may the copy (a
            # full re-read would not find one either).
            dropped = self._id_of(event.key)
            if dropped is None:
                self.store.advance(event.mod_revision)
            elif self.store.apply_delete(dropped, event.mod_revision):
                self._publish(Change(dropped, None, event.mod_revision))
            return
        session_id, stored = checked
        self.store.apply_put(session_id, stored, event.mod_revision)
        self._publish(Change(session_id, stored, event.mod_revision))

    def _valid_id_and_record(self, key: bytes, value: bytes) -> tuple[str, bytes] | None:
        """The session id of a key and its valid record as the copy keeps it, or None (logged
        and counted)."""
        session_id = self._valid_id(key)
        if session_id is None:
            return None
        try:
            return session_id, check_record(value, session_id)
        except SessionDecodeError as exc:
            self._skip(key, str(exc))
            return None

    def _valid_id(self, key: bytes) -> str | None:
        """The session id of a key, or None (logged and counted)."""
        session_id = key[len(self.keys.sessions):].decode("utf-8", "replace")
        try:
            validate_session_id(session_id)
        except ValueError as exc:
            self._skip(key, str(exc))
            return None
        return session_id

    def _skip(self, key: bytes, error: str) -> None:
        self.garbage += 1
        log.warning("mirror_garbage_skipped", key=key[:200].decode("utf-8", "replace"),
                    error=error)

    def _id_of(self, key: bytes) -> str | None:
        """The session id of a key under ``sessions/``, or None when it is not one."""
        session_id = key[len(self.keys.sessions):].decode("utf-8", "replace")
        try:
            validate_session_id(session_id)
        except ValueError:
            return None
        return session_id

    async def _notify_seen(self) -> None:
        async with self._seen:
            self._seen.notify_all()

    async def wait_current(self, revision: int) -> None:
        """Return once every change up to ``revision`` has been applied (rule 5)."""
        async with self._seen:
            await self._seen.wait_for(lambda: self.revision >= revision)

    async def _flush_loop(self) -> None:
        """Make applied changes durable in a worker thread, coalescing bursts."""
        while True:
            await self._flush_needed.wait()
            self._flush_needed.clear()
            try:
                await asyncio.to_thread(self.store.flush)
            except Exception:  # a full disk must not stop the copy in memory
                log.exception("store_flush_failed")
            if self._convert_needed:
                self._convert_needed = False
                await self._convert()
            await asyncio.sleep(FLUSH_INTERVAL)

    async def _convert(self) -> None:
        """Bring the records of a re-read from etcd's JSON into the form the copy keeps (reads
        meanwhile decode the JSON, as they did before), after the first flush has made the
        re-read durable."""
        started = time.monotonic()
        try:
            buckets = await asyncio.to_thread(self.store.convert, kept_form)
        except Exception:  # only reads lose speed: they decode the JSON left
            log.exception("store_convert_failed")
            return
        self._flush_needed.set()
        log.info("mirror_converted", buckets=buckets,
                 seconds=round(time.monotonic() - started, 3))

    def _publish(self, change: Change) -> None:
        for queue in self._subscribers:
            queue.put_nowait(change)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Change]]:
        """A queue of every change applied from now on (take a snapshot inside the block)."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def age(self) -> float | None:
        return self.store.age()

    async def history(self, start_revision: int) -> AsyncIterator[Change]:
        """Every session change from ``start_revision`` (inclusive), from etcd's history, for
        a client resuming a watch behind the copy; raises Compacted when it is gone."""
        async with self.etcd.watch(self.keys.sessions, prefix=True,
                                   start_revision=start_revision) as watch:
            async for batch in watch:
                for event in batch.events:
                    if event.type is EventType.DELETE:
                        if (session_id := self._valid_id(event.key)) is not None:
                            yield Change(session_id, None, event.mod_revision)
                        continue
                    checked = self._valid_id_and_record(event.key, event.value)
                    if checked is not None:
                        yield Change(checked[0], checked[1], event.mod_revision)
                    elif (dropped := self._id_of(event.key)) is not None:
                        yield Change(dropped, None, event.mod_revision)  # as _apply drops it


def _return_free_memory() -> None:
    """Give the memory the C allocator holds free back to the system (glibc only).

    A re-read passes some 100 MB through short-lived buffers (gRPC messages, their protobuf
    copies) in several threads; glibc keeps what they freed in per-thread heaps, ~5-10 MB more
    resident memory for as long as the process lives. malloc_trim returns every free page.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)

