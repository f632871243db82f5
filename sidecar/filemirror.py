"""The file adapter for a stock ThinLinc VSM server: its session database file, mirrored.

The VSM server keeps its sessions in one file (``/var/lib/vsm/sessions`` by default) whose
format we treat as opaque bytes.

* On the primary, every change of the file (inotify, with a periodic check as a backstop) is
  written to etcd as chunks plus a manifest under ``vsmfile/``, all in one transaction guarded
  by the epoch (rule 2): a deposed primary's file never lands.
* On every other node, each new manifest in etcd is read back with its chunks at one revision,
  verified (size, SHA-256) and written to the file atomically (temporary file, fsync, rename,
  the old file's mode and owner).
* Promotion gate (rule 5): before a node turns PRIMARY, and so before any role hook could start
  its VSM server, the file on disk is made current from etcd.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import structlog
from etcd3 import etcdrpc

from .election import Keys, epoch_guard
from .etcd import Etcd, EtcdError, kv_call, prefix_end, retry_policy
from .fileadapter import (
    DEFAULT_CHUNK_SIZE,
    ChunkError,
    FileState,
    FileWatcher,
    Manifest,
    atomic_write,
    join_chunks,
    read_state,
    split_chunks,
)
from .node import NotPrimary
from .tasks import supervise

log = structlog.get_logger(__name__)


class FileMirror:
    """Mirrors one file through etcd; ``epoch()`` is the node's write guard."""

    def __init__(self, etcd: Etcd, keys: Keys, path: Path, epoch: Any, *,
                 interval: float = 2.0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.etcd = etcd
        self.path = path
        self.epoch = epoch
        self.interval = interval
        self.chunk_size = chunk_size
        self.root = keys.prefix.encode() + b"vsmfile/"
        self.leader_key = keys.leader
        self.manifest_key = self.root + b"manifest"
        self.known_sha: str | None = None  # the content etcd holds, as far as we know
        self.known_generation: str | None = None  # whose chunks to delete at the next upload
        self._synced = asyncio.Event()
        self.uploads = 0
        self.downloads = 0
        self._sync_lock = asyncio.Lock()

    def _chunk_key(self, generation: str, index: int) -> bytes:
        return self.root + f"chunk/{generation}/{index:06d}".encode()

    async def run(self) -> None:
        """Upload local changes while primary; follow etcd's copy otherwise. Forever."""
        await supervise({"file-upload": self._upload_changes(), "file-follow": self._follow()})

    # -- primary: the file into etcd --------------------------------------------------------

    async def _upload_changes(self) -> None:
        await self._synced.wait()  # know etcd's copy (and its chunks) before replacing it
        async with FileWatcher(self.path, interval=self.interval) as watcher:
            async for state in watcher:
                await self._upload(state)

    async def _upload(self, state: FileState) -> None:
        if state.content is None or state.sha256 == self.known_sha:
            return
        try:
            epoch = self.epoch()
        except NotPrimary:
            return  # a standby's file is ours to write, not to upload
        manifest = Manifest.describe(state.content, self.chunk_size)
        chunks = split_chunks(state.content, self.chunk_size)
        try:
            ok = await self.etcd.call(functools.partial(
                self._txn, epoch=epoch, manifest=manifest, chunks=chunks,
                previous=self.known_generation), "upload file")
        except EtcdError as exc:
            log.error("vsm_file_upload_failed", path=str(self.path), error=str(exc))
            return
        if not ok:
            log.warning("vsm_file_upload_refused", reason="the leader key is no longer ours")
            return
        self.known_sha, self.known_generation = manifest.sha256, manifest.generation
        self.uploads += 1
        log.info("vsm_file_uploaded", path=str(self.path), size=manifest.size,
                 chunks=manifest.chunks, sha256=manifest.sha256[:12])

    def _txn(self, client: Any, *, epoch: int, manifest: Manifest, chunks: list[bytes],
             previous: str | None) -> bool:
        compare = epoch_guard(self.leader_key, epoch)
        ops = []
        if previous is not None:
            # Only the old generation's chunks: etcd refuses a transaction whose delete range
            # covers a key it also puts.
            old = self.root + f"chunk/{previous}/".encode()
            ops.append(etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
                key=old, range_end=prefix_end(old))))
        ops += [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
            key=self._chunk_key(manifest.generation, i), value=chunk))
            for i, chunk in enumerate(chunks)]
        ops.append(etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
            key=self.manifest_key, value=manifest.to_json())))
        response = kv_call(client, "Txn", etcdrpc.TxnRequest(compare=[compare], success=ops))
        return bool(response.succeeded)

    # -- every node: etcd's copy onto the disk -----------------------------------------------

    async def _follow(self) -> None:
        while True:
            try:
                revision = await self.sync()
                async with self.etcd.watch(self.manifest_key, start_revision=revision + 1) \
                        as watch:
                    async for batch in watch:
                        if batch.events:
                            await self.sync()
            except EtcdError as exc:
                log.info("vsm_file_watch_ended", error=str(exc))
                await asyncio.sleep(0.2)

    async def sync(self, _revision: int = 0) -> int:
        """Make the file equal to etcd's copy (a promotion gate too); return the revision read.

        On the primary this is a no-op unless the disk differs from etcd, which happens only
        right after promotion: then etcd's copy is the one to keep.
        """
        async with self._sync_lock:
            async for attempt in retry_policy("read file"):
                with attempt:
                    found, revision = await self.etcd.call(self._read, "read file")
            self._synced.set()
            if found is None:
                return revision
            manifest, data = found
            self.known_sha, self.known_generation = manifest.sha256, manifest.generation
            current = await asyncio.to_thread(read_state, self.path)
            if current is None or current.sha256 != manifest.sha256:
                await asyncio.to_thread(self._write, data)
                self.downloads += 1
                log.info("vsm_file_written", path=str(self.path), size=manifest.size,
                         revision=revision, sha256=manifest.sha256[:12])
            return revision

    def _read(self, client: Any) -> tuple[tuple[Manifest, bytes] | None, int]:
        response = kv_call(client, "Range",
                           etcdrpc.RangeRequest(key=self.root, range_end=prefix_end(self.root)))
        values = {kv.key: kv.value for kv in response.kvs}
        revision = response.header.revision
        if self.manifest_key not in values:
            return None, revision
        try:
            manifest = Manifest.from_json(values[self.manifest_key])
            chunks = [values.get(self._chunk_key(manifest.generation, i), b"")
                      for i in range(manifest.chunks)]
            return (manifest, join_chunks(manifest, chunks)), revision
        except ChunkError as exc:  # garbage in etcd: keep the file we have
            log.warning("vsm_file_copy_invalid", error=str(exc), revision=revision)
            return None, revision

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)
