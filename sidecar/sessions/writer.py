"""The primary's write path: epoch-guarded writes, committed in groups.

:class:`Writer` is the primary's write path (rule 2): every write is a transaction guarded on
``create_revision(leader) == epoch``; a write whose guard fails is refused, never retried.
Concurrent writes are coalesced into one transaction (group commit) within etcd's limits on
operations per transaction and request size, so throughput grows with concurrency. A write is
acknowledged only after etcd committed it, with the revision it committed at.

The transaction is built from etcd's own request messages rather than through the client's
``transaction()``, which drops the response header and with it the commit revision, and it is
sent on the event loop (:class:`~sidecar.etcd.aiokv.AioKV`), not through a thread.

A write is retried after an attempt that timed out, and the attempt may still land later (a
paused etcd member forwards it when it resumes) — after a newer write of the same key was
acknowledged, which it would undo. So every transaction is also a step of a sequence: it
compares the mod revision of the ``session-writer`` key with the revision of this writer's
last commit and puts a token of its own there. A late attempt finds the key moved on and
changes nothing; a retry whose first attempt did land finds its own token there and is
acknowledged at that revision.

The standby copy that these writes reach is :class:`~sidecar.sessions.follower.Follower`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from etcd3 import etcdrpc

from ..api.session_pb2 import Session
from ..core.roles import NotPrimary
from ..etcd.aiokv import AioKV
from ..etcd.client import Etcd
from ..etcd.errors import EtcdError
from ..etcd.keys import Keys, epoch_guard
from .record import encode_session

log = structlog.get_logger(__name__)

# etcd's defaults: --max-txn-ops 128 and --max-request-bytes 1.5 MiB. Stay inside both.
MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1024 * 1024
# How long a write may wait for etcd (retrying transient errors) before it is failed, and the
# deadline of each attempt. An attempt stuck on a dead or paused member, or a proposal etcd
# dropped in a leader change, must not hold the writes for the data client's long timeout:
# it fails after WRITE_ATTEMPT and the retry goes to another member (the guarded put is safe
# to repeat).
WRITE_DEADLINE = 3.0
WRITE_ATTEMPT = 0.75


class WriteUnavailable(Exception):
    """etcd did not commit the write in time; it may or may not have been applied."""



@dataclass
class _Op:
    key: bytes
    value: bytes | None  # None: delete
    future: asyncio.Future[tuple[int, bool]] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.key) + len(self.value or b"") + 16


class Writer:
    """The primary's guarded, group-committed write path."""

    def __init__(self, etcd: Etcd, keys: Keys, epoch: Callable[[], int]) -> None:
        """``epoch()`` returns the epoch this node holds as PRIMARY or raises NotPrimary."""
        self.keys = keys
        self.epoch = epoch
        self.kv = AioKV(etcd.settings)
        self.sequence_key = keys.prefix.encode() + b"session-writer"
        self._sequence = 0  # mod revision of sequence_key at our last commit (0: absent)
        self._tokens = (f"{os.getpid()}-{os.urandom(4).hex()}-{n}".encode()
                        for n in itertools.count())
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._carry: _Op | None = None
        self.transactions = 0
        self.writes = 0
        self.last_revision = 0  # of the last write this node committed

    async def put(self, session: Session) -> int:
        """Validate, encode and write ``session``; the revision it committed at."""
        return await self.put_encoded(session.session_id, encode_session(session))

    async def put_encoded(self, session_id: str, raw: bytes) -> int:
        """Write a record that :func:`~sidecar.sessions.record.encode_session` made."""
        revision, _ = await self._submit(self.keys.sessions + session_id.encode(), raw)
        return revision

    async def delete(self, session_id: str) -> tuple[int, bool]:
        return await self._submit(self.keys.sessions + session_id.encode(), None)

    async def _submit(self, key: bytes, value: bytes | None) -> tuple[int, bool]:
        self.epoch()  # refuse at once rather than queue behind others
        future: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(key, value, future))
        return await future

    async def run(self) -> None:
        """Commit queued writes, as many per transaction as etcd allows, one at a time."""
        try:
            while True:
                batch = await self._take_batch()
                try:
                    results = await self._commit(batch)
                except BaseException as exc:
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(exc if isinstance(exc, Exception)
                                                    else WriteUnavailable("shutting down"))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for op, result in zip(batch, results, strict=True):
                    if not op.future.done():
                        op.future.set_result(result)
        finally:
            await asyncio.shield(self.kv.close())

    async def _take_batch(self) -> list[_Op]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, keys, size = [first], {first.key}, first.size
        while len(batch) < MAX_TXN_OPS - 1 and not self._queue.empty():
            op = self._queue.get_nowait()
            # etcd refuses a transaction that touches one key twice; and the second write of
            # a key must land after the first, so it starts the next transaction.
            if op.key in keys or size + op.size > MAX_TXN_BYTES:
                self._carry = op
                break
            batch.append(op)
            keys.add(op.key)
            size += op.size
        return [op for op in batch if not op.future.cancelled()] or batch

    async def _commit(self, batch: list[_Op]) -> list[tuple[int, bool]]:
        deadline = time.monotonic() + WRITE_DEADLINE
        token = next(self._tokens)
        while True:
            epoch = self.epoch()  # raises NotPrimary: never write as a node that is not
            request = self.request(batch, epoch, token)
            try:
                response = await self.kv.txn(request, WRITE_ATTEMPT, "write sessions")
            except EtcdError as exc:
                if not exc.transient or time.monotonic() >= deadline:
                    raise WriteUnavailable(str(exc)) from exc
                await asyncio.sleep(0.05)
                continue
            if response.succeeded:
                revision = response.header.revision
                results = [(revision, _deleted(r)) for r in response.responses[1:]]
            elif (revision := self._refused(response, epoch, token)) is not None:
                # An earlier attempt of this very transaction landed; its per-record answers
                # are lost, so a delete reports that it deleted (the record is gone anyway).
                results = [(revision, True) for _ in batch]
            elif time.monotonic() >= deadline:
                raise WriteUnavailable("the writer sequence kept moving on")
            else:
                continue  # the sequence moved on (an abandoned attempt landed): go again
            self._sequence = revision
            self.transactions += 1
            self.writes += len(batch)
            self.last_revision = max(self.last_revision, revision)
            return results

    def request(self, batch: list[_Op], epoch: int, token: bytes) -> Any:
        """The transaction of ``batch``: guarded on ``epoch`` and on the sequence key still
        at this writer's last commit; it moves the sequence key on. When refused, it reads
        the leader key and the sequence key, to tell which guard failed."""
        ops = [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=self.sequence_key,
                                                                value=token))]
        for op in batch:
            if op.value is None:
                ops.append(etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
                    key=op.key)))
            else:
                ops.append(etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=op.key,
                                                                            value=op.value)))
        sequence = etcdrpc.Compare(key=self.sequence_key, target=etcdrpc.Compare.MOD,
                                   result=etcdrpc.Compare.EQUAL, mod_revision=self._sequence)
        reads = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
                 for key in (self.keys.leader, self.sequence_key)]
        return etcdrpc.TxnRequest(compare=[epoch_guard(self.keys.leader, epoch), sequence],
                                  success=ops, failure=reads)

    def _refused(self, response: Any, epoch: int, token: bytes) -> int | None:
        """Why a transaction was refused. Raises NotPrimary when the leader key is not ours;
        returns the revision at which this transaction's own earlier attempt landed; or
        None after taking the sequence key's revision as the one to compare with next."""
        leader, sequence = (r.response_range.kvs for r in response.responses)
        if not leader or leader[0].create_revision != epoch:
            raise NotPrimary(f"the leader key is no longer ours (epoch {epoch})")
        revision = sequence[0].mod_revision if sequence else 0
        if sequence and sequence[0].value == token:
            return int(revision)
        if revision == self._sequence:  # cannot be: the compare would have held
            raise WriteUnavailable("etcd refused the transaction for no reason it shows")
        self._sequence = int(revision)
        return None


def _deleted(response: Any) -> bool:
    if response.WhichOneof("response") == "response_delete_range":
        return bool(response.response_delete_range.deleted)
    return True
