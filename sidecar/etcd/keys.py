"""The key layout under the cluster prefix, and the compare that fences a primary's writes."""

from __future__ import annotations

from typing import Any

from etcd3 import etcdrpc


class Keys:
    """The etcd layout under ``/thinlinc-ha/<cluster>/`` (DESIGN.md)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.leader = f"{prefix}leader".encode()
        self.members = f"{prefix}members/".encode()
        self.sessions = f"{prefix}sessions/".encode()
        self.switchover = f"{prefix}switchover".encode()
        self.pause = f"{prefix}pause".encode()  # maintenance mode (`vsm-sidecar pause`)

    def member(self, node_id: str) -> bytes:
        return self.members + node_id.encode()


def epoch_guard(leader_key: bytes, epoch: int) -> Any:
    """The compare that guards every write of a primary (rule 2): the leader key is still the
    one created at ``epoch``. A deposed primary's transaction fails it and changes nothing."""
    return etcdrpc.Compare(key=leader_key, target=etcdrpc.Compare.CREATE,
                           result=etcdrpc.Compare.EQUAL, create_revision=epoch)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])
