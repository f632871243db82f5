"""The shared vocabulary of roles: what a node is (:class:`Role`), what it reports
(:class:`Status`), and why a write is refused (:class:`NotPrimary`).

A leaf: every room that speaks of roles imports it (hooks, endpoints, the mirrors) without
importing the node and what the node imports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type here: a leaf imports nothing of the package at run time
    from ..etcd.election import LeaderInfo


class Role(Enum):
    STARTING = "ROLE_STARTING"
    STANDBY = "ROLE_STANDBY"
    PRIMARY = "ROLE_PRIMARY"
    FENCED = "ROLE_FENCED"
    STOPPING = "ROLE_STOPPING"


@dataclass(frozen=True)
class Status:
    """What a node reports about itself; replaced whole on every change."""

    node_id: str
    cluster: str
    role: Role = Role.STARTING
    reason: str = "starting"
    leader: LeaderInfo | None = None
    epoch: int = 0
    role_since: float = field(default_factory=time.time)
    deadline: float | None = None  # monotonic; PRIMARY only
    members: tuple[dict[str, Any], ...] = ()

    def lease_time_left(self, now: float | None = None) -> float | None:
        if self.role is not Role.PRIMARY or self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.monotonic() if now is None else now))


class NotPrimary(Exception):
    """This node may not write: it is not PRIMARY (or no longer is)."""
