"""A lease and its local deadline (rule 3 of DESIGN.md).

:class:`Lease` keeps a deadline on the monotonic clock: the *send* time of the last keepalive
that etcd answered plus the TTL it granted. etcd received that keepalive after we sent it, so
it cannot expire the lease before the deadline; a node that acts on its deadline (minus a
margin) never overlaps with a successor, whatever etcd or the network do. On an etcd without
the fix for etcd-io/etcd#15247 that premise fails: see :mod:`sidecar.etcd.versions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class LeaseLost(Exception):
    """The lease expired in etcd, or its local deadline passed without an answer."""


@dataclass
class Lease:
    """A granted lease and its local deadline (monotonic seconds)."""

    id: int
    ttl: int
    deadline: float
    margin: float
    renewed_at: float = field(default_factory=time.monotonic)

    def renew(self, sent_at: float, granted_ttl: int) -> None:
        # Only ever move forward: a late answer to an older keepalive must not shorten it.
        self.deadline = max(self.deadline, sent_at + granted_ttl)
        self.ttl = granted_ttl
        self.renewed_at = time.monotonic()

    def confirm(self, sent_at: float, remaining: int) -> None:
        """A check through another member found the lease alive with ``remaining`` whole
        seconds (etcd rounds down) as seen at or after ``sent_at``."""
        self.deadline = max(self.deadline, sent_at + remaining)
        self.renewed_at = time.monotonic()

    def time_left(self, now: float | None = None) -> float:
        """Seconds before this node must have given up what the lease protects."""
        now = time.monotonic() if now is None else now
        return self.deadline - self.margin - now

    def expired(self, now: float | None = None) -> bool:
        return self.time_left(now) <= 0
