"""When a node puts its members/ record again (sidecar.core.member)."""

from __future__ import annotations

from sidecar.core.member import APPLIED_REVISION_REFRESH_SECONDS, _due
from sidecar.etcd.records import MemberRecord

BEFORE = MemberRecord("a", role="ROLE_STANDBY", applied_revision=10)


def test_a_change_of_a_judged_field_is_put_at_once() -> None:
    changed = MemberRecord("a", role="ROLE_PRIMARY", applied_revision=10)
    assert _due(changed, BEFORE, published_at=100.0, now=100.0)


def test_a_change_of_the_applied_revision_alone_waits_for_the_refresh() -> None:
    """Else two nodes would answer each other's puts for ever (each copy follows the other's
    record)."""
    moved = MemberRecord("a", role="ROLE_STANDBY", applied_revision=11)
    assert not _due(moved, BEFORE, published_at=100.0, now=100.0 + 9.9)
    assert _due(moved, BEFORE, published_at=100.0,
                now=100.0 + APPLIED_REVISION_REFRESH_SECONDS)
    assert not _due(BEFORE, BEFORE, published_at=0.0, now=1e9)  # nothing changed


def test_the_first_record_is_put() -> None:
    assert _due(BEFORE, None, published_at=0.0, now=0.0)
