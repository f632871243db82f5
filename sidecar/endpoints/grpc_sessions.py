"""gRPC SessionService: writes through the primary's guarded writer, reads from the local copy.

Writes on a node that is not PRIMARY fail with FAILED_PRECONDITION and carry the leader (node
id, address, epoch) as a serialised ``NotPrimary`` in the ``thinlinc-not-primary-bin`` trailer,
so a client can redirect. Reads answer on every role from the local copy and say the revision
they reflect; while etcd is unreachable they are marked stale, with the copy's age. A read on the
primary first waits until the copy holds this node's own last acknowledged write, so a client
reads what it wrote.

Who may write is decided before a call gets here (:mod:`sidecar.endpoints.grpc_access`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from typing import TypeVar

import grpc
import structlog
from google.protobuf import duration_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError

from ..api import session_pb2, session_pb2_grpc
from ..api.session_pb2 import Session, SessionEvent
from ..core.node import Node
from ..core.roles import NotPrimary, Role
from ..etcd.errors import Compacted, EtcdError
from ..sessions.follower import Change, Follower
from ..sessions.record import (
    NOT_PRIMARY_METADATA_KEY,
    SessionValidationError,
    encode_session,
    merge_kept,
    validate_session_id,
)
from ..sessions.table import StoredRecord
from ..sessions.writer import Writer, WriteUnavailable

log = structlog.get_logger(__name__)
T = TypeVar("T")

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name
# How long a read on the primary waits for the copy to hold our own last write.
READ_YOUR_WRITES_WAIT = 1.0
# A WatchSessions stream that sent nothing for this long gets a PROGRESS event, if the copy's
# revision moved (other keys of the cluster, or changes before the client's start revision).
PROGRESS_INTERVAL = 5.0
# A ListSessions page or a batched SNAPSHOT event ends early rather than pass this many bytes of
# records, well inside the 4 MiB a gRPC client accepts by default (a message is about as large
# as the records' JSON, or smaller).
PAGE_BYTES = 2 * 1024 * 1024

Context = grpc.aio.ServicerContext[object, object]
EventType = session_pb2.SessionEventType


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, node: Node, follower: Follower, writer: Writer) -> None:
        self.node = node
        self.follower = follower
        self.writer = writer

    # -- writes ----------------------------------------------------------------------------

    async def PutSession(self, request: session_pb2.PutSessionRequest,
                         context: Context) -> session_pb2.PutSessionResponse:
        if not request.HasField("session"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session: required")
        session = Session()
        session.CopyFrom(request.session)
        session.revision = 0  # filled by the server, whatever the client sent
        # Fields of a newer schema are not stored (the record is JSON of the known ones), so
        # they must not come back in the answer, which is "the record as stored".
        session.DiscardUnknownFields()
        try:
            raw = encode_session(session)  # validates: one pass, the bytes etcd will hold
        except SessionValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        revision = await self._write(context, self.writer.put_encoded(session.session_id, raw))
        session.revision = revision
        return session_pb2.PutSessionResponse(revision=revision, session=session)

    async def DeleteSession(self, request: session_pb2.DeleteSessionRequest,
                            context: Context) -> session_pb2.DeleteSessionResponse:
        await self._validate(context, validate_session_id, request.session_id)
        revision, deleted = await self._write(context, self.writer.delete(request.session_id))
        return session_pb2.DeleteSessionResponse(revision=revision, deleted=deleted)

    async def _validate(self, context: Context, check: object, value: object) -> None:
        try:
            check(value)  # type: ignore[operator]
        except SessionValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _write(self, context: Context, write: Awaitable[T]) -> T:
        try:
            return await write
        except NotPrimary as exc:
            await self._abort_not_primary(context, str(exc))
        except WriteUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd did not commit: {exc}")
        raise AssertionError("unreachable: abort raises")

    async def _abort_not_primary(self, context: Context, why: str) -> None:
        status = self.node.status()
        leader = session_pb2.NotPrimary(epoch=status.epoch)
        if status.leader is not None and status.leader.node_id != status.node_id:
            leader.node_id, leader.address = status.leader.node_id, status.leader.address
        context.set_trailing_metadata(((NOT_PRIMARY_METADATA_KEY, leader.SerializeToString()),))
        where = f"; the primary is {leader.node_id} at {leader.address}" if leader.node_id \
            else "; no primary is known"
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"not primary: {why}{where}")

    # -- reads -----------------------------------------------------------------------------

    async def _read_your_writes(self) -> None:
        if self.writer.last_revision > self.follower.revision:
            try:
                async with asyncio.timeout(READ_YOUR_WRITES_WAIT):
                    await self.follower.wait_current(self.writer.last_revision)
            except TimeoutError:
                pass  # answer with what the copy has; the revision says how current it is

    async def GetSession(self, request: session_pb2.GetSessionRequest,
                         context: Context) -> session_pb2.GetSessionResponse:
        await self._validate(context, validate_session_id, request.session_id)
        await self._read_your_writes()
        revision = self.follower.revision
        record = self.follower.store.get(request.session_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"session_id: no session {request.session_id!r}")
        assert record is not None
        session = _session(request.session_id, record.raw, record.revision)
        return session_pb2.GetSessionResponse(session=session, revision=revision)

    async def ListSessions(self, request: session_pb2.ListSessionsRequest,
                           context: Context) -> session_pb2.ListSessionsResponse:
        if request.page_size < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "page_size: must be 0 (every record) or a positive number")
        if request.page_token:
            await self._validate(context, _page_token, request.page_token)
        await self._read_your_writes()
        store = self.follower.store
        if request.page_size:
            # One more than asked for tells whether another page follows.
            revision, records = await asyncio.to_thread(
                store.page, request.page_token, request.page_size + 1)
        else:
            revision, everything = await asyncio.to_thread(store.snapshot_at)
            records = [(i, r) for i, r in everything.items() if i > request.page_token]
        response = session_pb2.ListSessionsResponse(revision=revision, stale=self._stale())
        shown = _fit(records, request.page_size) if request.page_size else records
        _fill(response.sessions, shown)
        if len(records) > len(shown):
            response.next_page_token = shown[-1][0]
        age = self.follower.age()
        if response.stale and age is not None:
            response.copy_age.CopyFrom(_duration(age))
        return response

    def _stale(self) -> bool:
        """Whether etcd may be out of reach. A paused or cut-off etcd ends no watch stream, it
        just stops sending; the lease notices within a TTL, so a node without one is stale."""
        role = self.node.status().role
        return not self.follower.connected or role in (Role.STARTING, Role.FENCED)

    async def WatchSessions(self, request: session_pb2.WatchSessionsRequest,
                            context: Context) -> AsyncIterator[SessionEvent]:
        start = request.start_revision
        if start < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "start_revision: must be 0 or a revision")
        if request.snapshot_batch < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "snapshot_batch: must be 0 (one record per event) or a positive "
                                "number")
        async with self.follower.subscribe() as changes:
            if start == 0:
                # Bucket by bucket, in no particular order: sorting by id would hold every
                # record unpacked at once (~60 MB for 100,000), for as long as the stream.
                revision, records = self.follower.store.records_at()
                for event in _snapshot(records, revision, request.snapshot_batch):
                    yield event
                yield SessionEvent(type=EventType.SESSION_EVENT_TYPE_SNAPSHOT_DONE,
                                   revision=revision)
                start = revision + 1
            elif start <= self.follower.revision:
                async for event in self._replay(context, start):
                    yield event
                    start = max(start, event.revision + 1)
            async for event in self._follow(changes, start):
                yield event

    async def _follow(self, changes: asyncio.Queue[Change], start: int,
                      ) -> AsyncIterator[SessionEvent]:
        """Every change from ``start`` on, and PROGRESS on a quiet stream whenever the copy
        has moved on: a client that stores it resumes from there, not from a revision that
        etcd may have compacted meanwhile (which would cost it a new snapshot)."""
        told = start - 1
        while True:
            try:
                async with asyncio.timeout(PROGRESS_INTERVAL):
                    change = await changes.get()
            except TimeoutError:
                # Nothing queued: every change up to the copy's revision has been sent.
                if self.follower.revision > told:
                    told = self.follower.revision
                    yield SessionEvent(type=EventType.SESSION_EVENT_TYPE_PROGRESS, revision=told)
                continue
            if change.revision >= start:
                told = max(told, change.revision)
                yield _event(change)

    async def _replay(self, context: Context, start: int) -> AsyncIterator[SessionEvent]:
        """Changes from etcd's history up to what the copy had when the watch began."""
        until = self.follower.revision
        try:
            async for change in self.follower.history(start):
                # Not `>= until`: several records of one transaction share its revision, and
                # stopping at the first would lose the others. Later ones come from the copy.
                if change.revision > until:
                    return
                yield _event(change)
        except Compacted as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"start_revision: compacted up to {exc.compact_revision}; "
                                "start over with 0")
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd history: {exc}")


def _session(session_id: str, raw: bytes, revision: int) -> Session:
    session = Session(revision=revision)
    _merge(session, session_id, raw)
    return session


def _fill(sessions: RepeatedCompositeFieldContainer[Session],
          records: Iterable[tuple[str, StoredRecord]]) -> None:
    """Add ``records`` to a message's repeated sessions, each parsed from the serialized form
    the copy keeps (~1 µs a record: no JSON to decode, no message to build field by field;
    records of a re-read not yet converted are decoded from JSON, as they were before)."""
    add = sessions.add
    for session_id, record in records:
        _merge(add(revision=record.revision), session_id, record.raw)


def _merge(session: Session, session_id: str, raw: bytes) -> None:
    try:
        merge_kept(session, session_id, raw)  # the kept form leaves the revision out
    except (DecodeError, ValueError, TypeError, KeyError):  # the copy holds checked records
        log.exception("stored_record_invalid", session_id=session_id)
        session.session_id = session_id


def _snapshot(records: Iterable[tuple[str, StoredRecord]], revision: int, batch: int,
              ) -> Iterator[SessionEvent]:
    """The SNAPSHOT events of ``records``: one record each, or up to ``batch`` (and
    PAGE_BYTES) each. Every event's revision is the snapshot's (revisions never decrease along
    a stream); a record's own is its session.revision."""
    snapshot = EventType.SESSION_EVENT_TYPE_SNAPSHOT
    if not batch:
        for session_id, record in records:
            yield SessionEvent(type=snapshot, session_id=session_id, revision=revision,
                               session=_session(session_id, record.raw, record.revision))
        return
    for chunk in _batches(records, batch):
        event = SessionEvent(type=snapshot, revision=revision)
        _fill(event.sessions, chunk)
        yield event


def _batches(records: Iterable[tuple[str, StoredRecord]], batch: int,
             ) -> Iterator[list[tuple[str, StoredRecord]]]:
    """``records`` in lists of ``batch``, or fewer (at least one) to stay within PAGE_BYTES."""
    chunk: list[tuple[str, StoredRecord]] = []
    size = 0
    for item in records:
        if chunk and (len(chunk) == batch or size + len(item[1].raw) > PAGE_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[1].raw)
    if chunk:
        yield chunk


def _event(change: Change) -> SessionEvent:
    if change.raw is None:
        return SessionEvent(type=EventType.SESSION_EVENT_TYPE_DELETE,
                            session_id=change.session_id, revision=change.revision)
    return SessionEvent(type=EventType.SESSION_EVENT_TYPE_PUT, session_id=change.session_id,
                        revision=change.revision,
                        session=_session(change.session_id, change.raw, change.revision))


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def _fit(records: list[tuple[str, StoredRecord]], page_size: int,
         ) -> list[tuple[str, StoredRecord]]:
    """The first ``page_size`` records, or fewer (at least one) to stay within PAGE_BYTES: a
    record may hold up to 64 KiB, so a page counted in records alone could pass the client's
    receive limit."""
    return next(_batches(records, page_size), [])


def _page_token(token: str) -> None:
    """A page token is the last session id of the previous page."""
    validate_session_id(token, "page_token")
