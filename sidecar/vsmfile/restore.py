"""``vsm-sidecar restore-sessions-file --to PATH``: the catastrophic-recovery step, from etcd.

ThinLinc's HA guide has the administrator copy ``/var/lib/vsm/sessions`` from the surviving node
before starting vsmserver. This writes etcd's copy instead (verified against its manifest),
atomically, keeping the mode and owner of the file it replaces (a new file gets its folder's
owner and mode 0600). It refuses while the local VSM server answers its health check (it would
go on with, and later write back, its own sessions) unless ``--force``.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

from ..atomicfile import atomic_write
from ..etcd.client import Etcd
from ..etcd.errors import EtcdError
from ..etcd.keys import Keys
from ..host.targets import ProbeFailed, parse_target
from ..settings import Settings
from .adapter import ChunkError
from .etcdcopy import Copy, EtcdCopy

EXIT_REFUSED = 1
EXIT_NO_COPY = 2
# What "the local VSM server runs" means when no health_check is set: its port answers.
DEFAULT_CHECK = "tcp:127.0.0.1:9000"
PROBE_TIMEOUT = 2.0


def restore(settings: Settings, to: Path, *, force: bool) -> int:
    check = settings.health_check or DEFAULT_CHECK
    if not force and asyncio.run(_answers(check)):
        return _say(EXIT_REFUSED, f"refusing: the local VSM server answers ({check}); stop it "
                                  "first (systemctl stop vsmserver.service) or pass --force")
    try:
        copy = asyncio.run(_fetch(settings))
    except (EtcdError, ChunkError) as exc:
        return _say(EXIT_REFUSED, f"cannot read the copy in etcd: {exc}")
    if copy is None:
        return _say(EXIT_NO_COPY, f"etcd holds no copy of the sessions file (cluster "
                                  f"{settings.cluster!r})")
    try:
        atomic_write(to, copy.data, like=_new_file_like(to))
    except OSError as exc:
        return _say(EXIT_REFUSED, f"cannot write {to}: {exc.strerror or exc}")
    print(f"wrote {to}: {copy.manifest.size} bytes, sha256 {copy.manifest.short}, etcd "
          f"revision {copy.revision}")
    return 0


async def _answers(check: str) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await parse_target(check).probe()
    except (ProbeFailed, TimeoutError, OSError):
        return False
    return True


async def _fetch(settings: Settings) -> Copy | None:
    etcd = Etcd(settings, timeout=5.0, workers=1, name="restore")
    try:
        return await EtcdCopy(etcd, Keys(settings.prefix)).fetch()
    finally:
        etcd.close()


def _new_file_like(path: Path) -> os.stat_result | None:
    """None to keep the replaced file's mode and owner; for a new file, its folder's owner
    with mode 0600 (the session database is the VSM server's alone)."""
    if path.exists():
        return None
    folder = os.stat(path.parent)
    return os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, folder.st_uid, folder.st_gid,
                           0, 0, 0, 0))


def _say(code: int, line: str) -> int:
    print(f"vsm-sidecar: {line}", file=sys.stderr)
    return code
