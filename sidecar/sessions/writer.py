"""The primary's write path: epoch-guarded writes, committed in groups.

:class:`Writer` is the primary's write path (rule 2): every write is a transaction guarded on
``create_revision(leader) == epoch``; a write whose guard fails is refused, never retried.
Concurrent writes are coalesced into one transaction (group commit) within etcd's limits on
operations per transaction and request size, so throughput grows with concurrency. A write is
acknowledged only after etcd committed it, with the revision it committed at.

The transaction is built from etcd's own request messages rather than through the client's
``transaction()``, which drops the response header and with it the commit revision.

The standby copy that these writes reach is :class:`~sidecar.sessions.follower.Follower`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from etcd3 import etcdrpc

from ..api.session_pb2 import Session
from ..core.roles import NotPrimary
from ..etcd.client import Etcd, kv_call
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
        self.etcd = etcd
        self.keys = keys
        self.epoch = epoch
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
        await self._queue.put(_Op(key, value, future))
        return await future

    async def run(self) -> None:
        """Commit queued writes, as many per transaction as etcd allows, one at a time."""
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

    async def _take_batch(self) -> list[_Op]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, keys, size = [first], {first.key}, first.size
        while len(batch) < MAX_TXN_OPS and not self._queue.empty():
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
        while True:
            epoch = self.epoch()  # raises NotPrimary: never write as a node that is not
            try:
                succeeded, response = await self.etcd.call(
                    functools.partial(_txn, leader=self.keys.leader, epoch=epoch, batch=batch,
                                      timeout=WRITE_ATTEMPT),
                    "write sessions")
            except EtcdError as exc:
                if not exc.transient or time.monotonic() >= deadline:
                    raise WriteUnavailable(str(exc)) from exc
                await asyncio.sleep(0.05)
                continue
            if not succeeded:
                raise NotPrimary(f"the leader key is no longer ours (epoch {epoch})")
            self.transactions += 1
            self.writes += len(batch)
            revision = response.header.revision
            self.last_revision = max(self.last_revision, revision)
            return [(revision, _deleted(r)) for r in response.responses]


def _txn(client: Any, leader: bytes, epoch: int, batch: list[_Op],
         timeout: float | None = None) -> tuple[bool, Any]:
    compare = epoch_guard(leader, epoch)
    ops = []
    for op in batch:
        if op.value is None:
            ops.append(etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
                key=op.key)))
        else:
            ops.append(etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=op.key,
                                                                        value=op.value)))
    request = etcdrpc.TxnRequest(compare=[compare], success=ops)
    response = kv_call(client, "Txn", request, timeout)
    return response.succeeded, response


def _deleted(response: Any) -> bool:
    if response.WhichOneof("response") == "response_delete_range":
        return bool(response.response_delete_range.deleted)
    return True
