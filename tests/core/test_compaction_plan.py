"""When the primary compacts etcd, and to which revision (sidecar.core.compaction.plan)."""

from __future__ import annotations

from sidecar import config
from sidecar.core.compaction import BYTES, INTERVAL, Plan, plan
from sidecar.etcd.maintenance import DbStatus

MIB = 1 << 20
SETTINGS = config.build({"node_id": "a", "compaction_interval": 300, "compaction_keep": 100,
                         "compaction_max_bytes": 8 * MIB})


def status(revision: int, in_use: int) -> DbStatus:
    return DbStatus(revision, 0, in_use + MIB, in_use)


def test_nothing_before_the_interval_or_the_bytes() -> None:
    """Under both bounds: no compaction."""
    assert plan(status(5000, 20 * MIB), 4990, 13 * MIB, 0, 299.0, SETTINGS) is None


def test_the_interval_keeps_compaction_keep_revisions() -> None:
    """After the interval: compact to current - keep."""
    assert plan(status(5000, 20 * MIB), 4990, 19 * MIB, 0, 300.0, SETTINGS) == \
        Plan(4900, INTERVAL)


def test_the_interval_does_nothing_when_the_history_is_short() -> None:
    """Fewer revisions than keep since the last compaction: nothing to compact."""
    assert plan(status(5000, 20 * MIB), 4990, 19 * MIB, 4900, 300.0, SETTINGS) is None


def test_bytes_compact_at_once_up_to_the_previous_check() -> None:
    """max_bytes more in use than after the last compaction: compact now, before the interval,
    up to the revision of the previous check (whatever compaction_keep says: 100 revisions of
    a 1 MiB file would not fit)."""
    assert plan(status(5000, 21 * MIB), 4950, 13 * MIB, 4000, 10.0, SETTINGS) == \
        Plan(4950, BYTES)


def test_bytes_keep_no_more_than_compaction_keep() -> None:
    """When keep is the nearer bound, the bytes trigger compacts to current - keep."""
    assert plan(status(5000, 21 * MIB), 10, 13 * MIB, 0, 10.0, SETTINGS) == Plan(4900, BYTES)
