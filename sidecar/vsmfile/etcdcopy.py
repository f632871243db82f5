"""etcd's copy of the VSM server's session database file, under ``<prefix>vsmfile/``: a
``manifest`` key (the commit point) and ``chunk/<sha256>`` keys, content-addressed.

:class:`EtcdCopy` reads a verified copy (taking unchanged chunks from the file on disk) and
writes one in bounded transactions, each guarded by the epoch (rule 2): first the chunks etcd
does not hold yet, then the manifest alone, then the chunks no manifest names any more are
deleted. The file format itself is :mod:`sidecar.vsmfile.adapter`'s; following and uploading
it is :mod:`sidecar.vsmfile.mirror`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from etcd3 import etcdrpc

from ..etcd.client import Etcd, kv_call
from ..etcd.errors import EtcdError
from ..etcd.keys import Keys, epoch_guard, prefix_end
from .adapter import (
    TXN_OPS,
    ChunkError,
    Manifest,
    batches,
    chunk_hash,
    join_chunks,
    split_chunks,
)

log = structlog.get_logger("sidecar.vsmfile.mirror")  # its events are the mirror's

# Reads of a copy whose chunks vanish under them (a newer upload's clean-up) start over this
# many times before the copy counts as broken.
READ_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Copy:
    """The file as etcd holds it, verified."""

    manifest: Manifest
    data: bytes
    revision: int  # the manifest's mod revision


class EtcdCopy:
    """Reading and writing the copy of the file under ``<prefix>vsmfile/``."""

    def __init__(self, etcd: Etcd, keys: Keys) -> None:
        self.etcd = etcd
        self.leader_key = keys.leader
        self.root = keys.prefix.encode() + b"vsmfile/"
        self.manifest_key = self.root + b"manifest"

    def chunk_key(self, name: str) -> bytes:
        return self.root + b"chunk/" + name.encode()

    # -- reading ----------------------------------------------------------------------------

    async def manifest(self) -> tuple[Manifest | None, int]:
        """The manifest and its mod revision; (None, 0) when there is none.

        Raises ChunkError for a value that is no manifest."""
        raw, revision = await self.etcd.call(self._get_manifest, "read file manifest")
        return (None, 0) if raw is None else (Manifest.from_json(raw), revision)

    def _get_manifest(self, client: Any) -> tuple[bytes | None, int]:
        response = kv_call(client, "Range", etcdrpc.RangeRequest(key=self.manifest_key))
        if not response.kvs:
            return None, 0
        return response.kvs[0].value, response.kvs[0].mod_revision

    async def fetch(self, reuse: bytes | None = None) -> Copy | None:
        """etcd's copy, verified; None when there is none. Chunks found in ``reuse`` (the
        file on disk) are taken from it instead of etcd. Raises ChunkError for a broken copy.

        Chunks are read one per call (each is far below gRPC's 4 MiB receive limit); one that
        is gone was deleted by a newer upload, so the read starts over from its manifest."""
        for _ in range(READ_ATTEMPTS):
            manifest, revision = await self.manifest()
            if manifest is None:
                return None
            local = {}
            if reuse is not None:
                local = {chunk_hash(c): c for c in split_chunks(reuse, manifest.chunk_size)}
            pieces: list[bytes] = []
            for name in manifest.chunks:
                piece = local.get(name)
                if piece is None:
                    piece = await self.etcd.call(
                        functools.partial(self._get, key=self.chunk_key(name)), "read chunk")
                if piece is None:
                    break
                pieces.append(piece)
            else:
                return Copy(manifest, join_chunks(manifest, pieces), revision)
        raise ChunkError(f"chunks named by the manifest are missing after {READ_ATTEMPTS} reads")

    def _get(self, client: Any, *, key: bytes) -> bytes | None:
        response = kv_call(client, "Range", etcdrpc.RangeRequest(key=key))
        return response.kvs[0].value if response.kvs else None

    # -- writing (primary only; every transaction guarded by the epoch) ---------------------

    async def store(self, epoch: int, data: bytes, chunk_size: int) -> tuple[Manifest, int] | None:
        """Upload ``data``; return its manifest and commit revision, or None when the epoch
        guard failed (this node is no longer the leader) and nothing was committed."""
        manifest = Manifest.describe(data, chunk_size)
        stored = await self.etcd.call(self._keys, "list file chunks")
        missing: dict[bytes, bytes] = {}
        for name, piece in zip(manifest.chunks, split_chunks(data, chunk_size), strict=True):
            key = self.chunk_key(name)
            if key not in stored:
                missing[key] = piece
        puts = list(missing.items())
        for run in batches([len(value) for _, value in puts]):
            if await self._txn(epoch, puts=[puts[i] for i in run]) is None:
                return None
        revision = await self._txn(epoch, puts=[(self.manifest_key, manifest.to_json())])
        if revision is None:
            return None
        wanted = {self.chunk_key(name) for name in manifest.chunks} | {self.manifest_key}
        await self._clean(epoch, sorted(stored - wanted))
        return manifest, revision

    async def _clean(self, epoch: int, orphans: list[bytes]) -> None:
        """Delete chunks no manifest names (an old version's, an interrupted upload's). A
        failure leaves them for the clean-up after the next upload."""
        for run in batches([0] * len(orphans), max_ops=TXN_OPS):
            try:
                await self._txn(epoch, deletes=[orphans[i] for i in run])
            except EtcdError as exc:
                log.info("vsm_file_cleanup_failed", error=str(exc), orphans=len(orphans))
                return

    def _keys(self, client: Any) -> set[bytes]:
        response = kv_call(client, "Range", etcdrpc.RangeRequest(
            key=self.root, range_end=prefix_end(self.root), keys_only=True))
        return {kv.key for kv in response.kvs}

    async def _txn(self, epoch: int, *, puts: Sequence[tuple[bytes, bytes]] = (),
                   deletes: Sequence[bytes] = ()) -> int | None:
        ops = [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k, value=v))
               for k, v in puts]
        ops += [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=k))
                for k in deletes]
        request = etcdrpc.TxnRequest(compare=[epoch_guard(self.leader_key, epoch)], success=ops)
        response = await self.etcd.call(
            lambda client: kv_call(client, "Txn", request), "upload file")
        return int(response.header.revision) if response.succeeded else None
