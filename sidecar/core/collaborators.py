"""What the node works with besides etcd, given whole to its constructor (:class:`NodeParts`).

The node decides; these act (release and claim the resource IP, catch the session copies up)
or tell it what it cannot see itself (the local health, the ThinLinc side's reports, the
fields of its members/ record that others judge it by).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .reports import FileReport, ServerReport


class PromotionGate(Protocol):
    """Awaited with the winning revision before the node turns PRIMARY (rule 5: the session
    copy must be current to it), within the lease's time left."""

    def __call__(self, revision: int, /) -> Awaitable[object]: ...


class ReleaseAction(Protocol):
    """Run synchronously whenever the node stops being PRIMARY (release the resource IP,
    refuse writes): fast, and waiting on nothing (rule 4)."""

    def __call__(self, reason: str, /) -> None: ...


class PromoteAction(Protocol):
    """Run once the node is PRIMARY (claim and announce the resource IP). Each must check
    is_primary() again after any await of its own before it takes anything."""

    def __call__(self) -> Awaitable[None]: ...


class HealthView(Protocol):
    """The local health: True, False, or None for no verdict (yet)."""

    def __call__(self) -> bool | None: ...


def no_verdict() -> bool | None:
    return None


@dataclass(frozen=True)
class NodeParts:
    """The node's collaborators; the defaults are a bare node (no IP, no checks, no files)."""

    promotion_gates: Sequence[PromotionGate] = ()
    release_actions: Sequence[ReleaseAction] = ()
    promote_actions: Sequence[PromoteAction] = ()
    # Extra fields of the members/ record that others use to judge this node as a handover
    # target (health, copy_current, ...), each read when the record is published.
    member_fields: Mapping[str, Callable[[], object]] = field(default_factory=dict)
    health: HealthView = no_verdict
    # Whether a health check is configured: only then may the node not campaign (or fail back)
    # without a verdict of healthy. (A VSM server run on-primary gives a health without it.)
    health_configured: bool = False
    # The ThinLinc side's reports (the sessions file's copy in etcd, the VSM server run in
    # on-primary mode), shown by GetRole and /health.
    file_report: Callable[[], FileReport] | None = None
    server_report: Callable[[], ServerReport] | None = None
    # The etcd alarms active now ("NOSPACE", "CORRUPT"), shown by GetRole.
    etcd_alarms: Callable[[], tuple[str, ...]] = tuple
