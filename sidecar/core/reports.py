"""What the ThinLinc side of a node reports beside its role: the sessions file's copy in etcd
and the VSM server this sidecar starts and stops.

A leaf module: the parts that keep these facts (the file mirror, the VSM server control) and
the parts that show them (GetRole, ``/health``, metrics, ``check-host``) all import it, and it
imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

# Modes of the VSM server (the vsm_server_mode setting).
REPLICATED = "replicated"
ON_PRIMARY = "on-primary"
VSM_SERVER_MODES = (REPLICATED, ON_PRIMARY)

# States of the sessions file's copy in etcd, as this node sees it.
FILE_CURRENT = "current"  # etcd holds what is on disk (primary) / what the standby knows of
FILE_BEHIND = "behind"  # primary: the disk changed and the change did not reach etcd
FILE_FOLLOWING = "following"  # not primary: etcd's copy is the one to follow
FILE_UNKNOWN = "unknown"  # etcd's copy not read yet


def utc(seconds: float | None) -> str:
    """A wall-clock time as ISO 8601 UTC, or "-" for none."""
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True, slots=True)
class FileReport:
    """The sessions file's mirror on this node."""

    state: str
    local_sha256: str = ""  # "" when the file does not exist (or was not read yet)
    etcd_sha256: str = ""  # "" when etcd holds no copy
    etcd_revision: int = 0  # mod revision of the manifest in etcd
    behind_since: float | None = None  # wall clock, primary only
    error: str = ""
    upload_failures: int = 0

    def summary(self) -> dict[str, str]:
        """What the members/ record carries (read by ``check-host``)."""
        return {"state": self.state, "behind_since": utc(self.behind_since) if
                self.behind_since is not None and self.state == FILE_BEHIND else "",
                "error": self.error[:200]}

    def line(self) -> str:
        """One line for ``/health`` and ``check-host``."""
        etcd = f"etcd holds {self.etcd_sha256[:12] or 'nothing'}"
        if self.etcd_revision:
            etcd += f" (revision {self.etcd_revision})"
        local = f"the file holds {self.local_sha256[:12] or 'nothing'}"
        if self.state == FILE_BEHIND:
            return (f"behind since {utc(self.behind_since)}: {etcd}, {local}: "
                    f"{self.error or 'not uploaded yet'}")
        text = f"{self.state}: {etcd}, {local}"
        return f"{text}; {self.error}" if self.error else text


@dataclass(frozen=True, slots=True)
class ServerReport:
    """The VSM server as this sidecar runs it (``on-primary`` mode only)."""

    state: str  # "running", "stopped", "starting", "stopping", "start failed", "stop failed"
    since: float
    error: str = ""
    start_failures: int = 0
    stop_failures: int = 0

    def line(self) -> str:
        text = f"{self.state} since {utc(self.since)}"
        return f"{text}: {self.error}" if self.error else text
