"""The file adapter for a stock ThinLinc VSM server: its session database file, mirrored.

The VSM server keeps its sessions in one file (``/var/lib/vsm/sessions`` by default) whose
format we treat as opaque bytes. Under ``vsmfile/`` etcd holds ``manifest`` and
``chunk/<sha256>`` keys.

* On the primary, every change of the file (inotify, with a periodic check as a backstop) is
  uploaded in bounded transactions, each guarded by the epoch (rule 2): first the chunks etcd
  does not hold yet, then the manifest alone, which is the commit point; then the chunks no
  manifest names any more are deleted. A reader never sees a manifest before its chunks, a
  deposed primary's manifest never lands, and an unchanged part of the file is never written
  again. An upload that fails is retried and reported (GetRole, ``/health``, metrics,
  ``check-host``) as the etcd copy being behind, and since when: never silent.
* On every other node the mirror follows the manifest. In ``on-primary`` mode it writes etcd's
  copy to the file atomically (temporary file, fsync, rename, the old file's mode and owner),
  unless its own VSM server runs. In ``replicated`` mode ThinLinc's own HA sync owns the file:
  the sidecar never writes it, it only knows which version etcd holds.
* Promotion gate (rule 5): before a node turns PRIMARY, and so before the sidecar or a hook
  starts its VSM server, the file on disk is made current from etcd (``on-primary``), and the
  gate logs which version the node holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from ..atomicfile import atomic_write
from ..core.reports import (
    FILE_BEHIND,
    FILE_CURRENT,
    FILE_FOLLOWING,
    FILE_UNKNOWN,
    ON_PRIMARY,
    REPLICATED,
    FileReport,
    utc,
)
from ..core.roles import NotPrimary
from ..core.tasks import supervise
from ..etcd.client import Etcd
from ..etcd.errors import EtcdError
from ..etcd.keys import Keys
from ..etcd.retry import reconnect_policy, retry_policy
from .adapter import (
    DEFAULT_CHUNK_SIZE,
    MAX_FILE_SIZE,
    ChunkError,
    FileState,
    FileWatcher,
    read_state,
)
from .etcdcopy import EtcdCopy

log = structlog.get_logger(__name__)

# A failed upload is tried again after the check interval, doubling up to this.
MAX_RETRY_SECONDS = 30.0
GATE_POLL = 0.1


class FileMirror:
    """Mirrors one file through etcd; ``epoch()`` is the node's write guard.

    ``may_write()`` says why the file must not be written now (its VSM server runs), or None.
    """

    def __init__(self, etcd: Etcd, keys: Keys, path: Path, epoch: Callable[[], int], *,
                 mode: str = REPLICATED, interval: float = 2.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_size: int = MAX_FILE_SIZE,
                 may_write: Callable[[], str | None] = lambda: None) -> None:
        if mode not in (REPLICATED, ON_PRIMARY):
            raise ValueError(f"unknown mode {mode!r}")
        self.copy = EtcdCopy(etcd, keys)
        self.path = path
        self.epoch = epoch
        self.mode = mode
        self.interval = interval
        self.chunk_size = chunk_size
        self.max_size = max_size
        self.may_write = may_write
        self.uploads = 0
        self.downloads = 0
        self.upload_failures = 0
        self._etcd: tuple[str, int] | None = None  # etcd's copy as far as we know: sha, revision
        self._local: FileState | None = None  # the file as last seen
        self._pending_since: float | None = None  # wall clock: local differs from etcd since
        self._behind = False  # an upload of the local content failed
        self._error = ""
        self._failures_in_row = 0
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._sync_lock = asyncio.Lock()

    @property
    def known_sha(self) -> str | None:
        return self._etcd[0] if self._etcd else None

    async def run(self) -> None:
        """Upload local changes while primary; follow etcd's copy otherwise. Forever."""
        await supervise({"file-watch": self._watch_local(), "file-upload": self._upload_loop(),
                         "file-follow": self._follow()})

    # -- what this node knows ---------------------------------------------------------------

    def is_primary(self) -> bool:
        try:
            self.epoch()
        except NotPrimary:
            return False
        return True

    def report(self) -> FileReport:
        etcd_sha, revision = self._etcd if self._etcd is not None else ("", 0)
        known = FileReport(FILE_UNKNOWN, local_sha256=self._local.sha256 or "" if self._local
                           else "", etcd_sha256=etcd_sha, etcd_revision=revision,
                           upload_failures=self.upload_failures)
        if not self._synced.is_set():
            return known
        if not self.is_primary():
            return replace(known, state=FILE_FOLLOWING, error=self._error)
        if self._behind:
            return replace(known, state=FILE_BEHIND, behind_since=self._pending_since,
                           error=self._error)
        return replace(known, state=FILE_CURRENT)

    def behind_seconds(self) -> float:
        """How long the etcd copy has lagged behind the primary's file (0 when it does not)."""
        if not self._behind or self._pending_since is None or not self.is_primary():
            return 0.0
        return max(0.0, time.time() - self._pending_since)

    # -- primary: the file into etcd --------------------------------------------------------

    async def _watch_local(self) -> None:
        async with FileWatcher(self.path, interval=self.interval) as watcher:
            async for state in watcher:
                self._note_local(state)
                self._changed.set()

    def _note_local(self, state: FileState) -> None:
        if self._local is None or state.sha256 != self._local.sha256:
            self._pending_since = time.time()
            self._behind, self._failures_in_row = False, 0
        self._local = state

    async def _upload_loop(self) -> None:
        await self._synced.wait()  # know etcd's copy before replacing it
        while True:
            try:
                async with asyncio.timeout(self._retry_in()):
                    await self._changed.wait()
            except TimeoutError:
                pass  # also how a fresh primary notices a file its standby days left behind
            self._changed.clear()
            if self._local is not None:
                await self._upload(self._local)

    def _retry_in(self) -> float:
        if not self._behind:
            return self.interval
        return min(self.interval * 2.0 ** min(self._failures_in_row, 8), MAX_RETRY_SECONDS)

    async def _upload(self, state: FileState) -> None:
        if state.content is None or state.sha256 == self.known_sha:
            self._behind = False
            return
        try:
            epoch = self.epoch()
        except NotPrimary:
            return  # a standby's file is followed, not uploaded
        if len(state.content) > self.max_size:
            self._failed(f"the file is {len(state.content)} bytes, over the limit of "
                         f"{self.max_size} bytes that is mirrored")
            return
        try:
            stored = await self.copy.store(epoch, state.content, self.chunk_size)
        except EtcdError as exc:
            self._failed(str(exc))
            return
        if stored is None:
            log.warning("vsm_file_upload_refused", reason="the leader key is no longer ours")
            return
        manifest, revision = stored
        if self._behind:
            log.warning("vsm_file_caught_up", behind_since=utc(self._pending_since),
                        failures=self._failures_in_row)
        self._etcd = (manifest.sha256, revision)
        self._behind, self._error, self._failures_in_row = False, "", 0
        self.uploads += 1
        log.info("vsm_file_uploaded", path=str(self.path), size=manifest.size,
                 chunks=len(manifest.chunks), sha256=manifest.short, revision=revision)

    def _failed(self, error: str) -> None:
        self.upload_failures += 1
        self._failures_in_row += 1
        first = not self._behind
        self._behind, self._error = True, error
        # One error when the copy falls behind, then quieter lines while retrying: the state
        # is on GetRole, /health and the metrics all along.
        (log.error if first else log.warning)(
            "vsm_file_upload_failed", path=str(self.path), error=error,
            behind_since=utc(self._pending_since), retry_in=round(self._retry_in(), 1))

    # -- every node: etcd's copy onto the disk -----------------------------------------------

    async def _follow(self) -> None:
        def ended(exc: BaseException) -> None:
            log.info("vsm_file_watch_ended", error=str(exc))

        async for attempt in reconnect_policy("follow the VSM file", on_retry=ended):
            with attempt:  # left only by an error: a Watch reports every end
                await self.sync()
                revision = self._etcd[1] if self._etcd else 0
                async with self.copy.etcd.watch(self.copy.manifest_key,
                                                start_revision=revision + 1) as watch:
                    async for batch in watch:
                        if batch.events:
                            await self.sync()

    def current(self) -> bool:
        """Whether this node could take over with its file as it is: in on-primary mode the
        file must equal etcd's copy (the VSM server starts on it); in replicated mode ThinLinc
        keeps it, so always."""
        if self.mode == REPLICATED:
            return True
        if not self._synced.is_set() or self._local is None:
            return False
        return self._etcd is None or self._local.sha256 == self._etcd[0]

    async def gate(self, revision: int) -> None:
        """Promotion gate (rule 5): in on-primary mode, wait until the file equals etcd's
        copy, however long (the node's lease deadline bounds it: a node whose file cannot be
        written, say because its VSM server will not stop, never becomes PRIMARY); log the
        version this node takes over with."""
        await self.sync(revision)
        while not self.current():
            await asyncio.sleep(GATE_POLL)
            await self.sync(revision)
        report = self.report()
        log.info("vsm_file_gate", mode=self.mode, etcd_sha256=report.etcd_sha256[:12],
                 etcd_revision=report.etcd_revision, local_sha256=report.local_sha256[:12],
                 same=report.etcd_sha256 == report.local_sha256, note=report.error or None)

    async def sync(self, _revision: int = 0) -> None:
        """Learn etcd's copy and, in ``on-primary`` mode, make the file equal to it.

        On the primary this writes only right after promotion, when the disk differs from
        etcd: then etcd's copy is the one to keep."""
        async with self._sync_lock:
            async for attempt in retry_policy("read file"):
                with attempt:
                    await self._sync()
            self._synced.set()

    async def _sync(self) -> None:
        try:
            manifest, revision = await self.copy.manifest()
        except ChunkError as exc:  # garbage in etcd: keep the file we have
            log.warning("vsm_file_copy_invalid", error=str(exc))
            return
        if manifest is None:
            return
        self._etcd = (manifest.sha256, revision)
        current = await asyncio.to_thread(read_state, self.path)
        if current is not None:
            self._note_local(current)
        if self.mode == REPLICATED or current is None or current.sha256 == manifest.sha256:
            self._error = ""
            return
        if self.is_primary():
            # The primary's file is the VSM server's, newer than any upload of it: a manifest
            # event of our own upload must never write an older version over it.
            return
        held = self.may_write()
        if held is not None:
            self._error = f"file not written: {held}"
            log.warning("vsm_file_not_written", reason=held, etcd_sha256=manifest.short)
            return
        try:
            copy = await self.copy.fetch(reuse=current.content)
        except ChunkError as exc:
            log.warning("vsm_file_copy_invalid", error=str(exc))
            return
        if copy is None:
            return
        await asyncio.to_thread(self._write, copy.data)
        self._etcd = (copy.manifest.sha256, copy.revision)
        self._error = ""
        self.downloads += 1
        log.info("vsm_file_written", path=str(self.path), size=copy.manifest.size,
                 revision=copy.revision, sha256=copy.manifest.short)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)
