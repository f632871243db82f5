"""The shared vocabulary of roles: what a node is (:class:`Role`), what it reports
(:class:`Status`), why a write is refused (:class:`NotPrimary`), and a view of the role for
the parts built before the node (:class:`RoleView`).

A leaf: every room that speaks of roles imports it (hooks, endpoints, the mirrors) without
importing the node and what the node imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here: a leaf imports nothing of the package at run time
    from ..etcd.records import LeaderInfo, MemberRecord, PauseRecord


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
    members: tuple[MemberRecord, ...] = ()
    pause: PauseRecord | None = None  # maintenance mode, as last read from etcd

    def lease_time_left(self, now: float | None = None) -> float | None:
        if self.role is not Role.PRIMARY or self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.monotonic() if now is None else now))


class NotPrimary(Exception):
    """This node may not write: it is not PRIMARY (or no longer is)."""


class RoleView:
    """The node's role, for the parts that the node takes as collaborators and that also ask
    it for the role (the resource IP, the session and file writers).

    Either the node or those parts must be built first. This view is: it is given to both,
    the node binds it in its constructor, and the parts ask it only at run time. Unbound, it
    answers as a node that is STARTING.
    """

    def __init__(self) -> None:
        self._status: Callable[[], Status] | None = None

    def bind(self, status: Callable[[], Status]) -> None:
        self._status = status

    def role(self) -> Role:
        return Role.STARTING if self._status is None else self._status().role

    def is_primary(self) -> bool:
        return self.role() is Role.PRIMARY

    def primary_epoch(self) -> int:
        """The epoch to guard a write with; raises NotPrimary unless this node is PRIMARY."""
        if self._status is None:
            raise NotPrimary(f"this node is {Role.STARTING.name}")
        status = self._status()
        if status.role is not Role.PRIMARY:
            raise NotPrimary(f"this node is {status.role.name}")
        return status.epoch
