"""The chaos suite tells etcd's own losses from the sidecar's, and runs an etcd without them.

etcd 3.5.0-3.5.2 can lose committed writes on a member killed under load
(etcd-io/etcd#13766); the chaos suite's etcd-full-restart does exactly that kill. Here, on real
etcd members: the runner's member check finds members that hold different data, and the suite's
etcd is one that etcd's advisories do not name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.etcd.versions import write_loss
from sidecar.lab.etcdbinary import find_etcd_binary
from sidecar.lab.etcdmember import EtcdMember
from sidecar.lab.localcluster import LocalEtcdCluster

from ..debianetcd import ENV, NoCrashSafeEtcd, crash_safe_etcd, etcd_version
from .runner import member_disagreement

pytestmark = pytest.mark.etcd


@dataclass
class Members:
    """Members as :func:`member_disagreement` sees a cluster: here drawn from two clusters, as a
    member that skipped committed transactions would look beside the others."""

    members: list[EtcdMember]


def _write(cluster: LocalEtcdCluster, values: list[str]) -> None:
    with cluster.client() as etcd:
        for number, value in enumerate(values):
            etcd.put(f"/thinlinc-ha/check/sessions/s{number}", value)


def test_members_holding_other_data_at_one_revision_are_found() -> None:
    """Members that applied the same writes agree; a member whose writes differ (the same
    number of them, so the revisions match) is named with its hash."""
    with LocalEtcdCluster() as one, LocalEtcdCluster(size=1) as other:
        _write(one, ["a", "b", "c"])
        _write(other, ["a", "B", "c"])
        assert member_disagreement(one) is None
        mixed = Members([*one.members, *other.members])
        found = member_disagreement(mixed, tries=2)  # type: ignore[arg-type]
        assert found is not None
        assert found.startswith("etcd's members disagree at revision ")
        assert all(m.name in found for m in mixed.members)


def test_the_suite_runs_an_etcd_that_keeps_committed_writes() -> None:
    """The chaos suite's etcd is not a release etcd's advisories name; the bundled one is."""
    assert write_loss(etcd_version(crash_safe_etcd())) is None
    assert write_loss(etcd_version(find_etcd_binary())) is not None  # 3.5.1: why this exists


def test_a_release_that_loses_writes_is_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """Naming the bundled 3.5.1 (or anything that is no etcd) is an error that says why."""
    monkeypatch.setenv(ENV, str(find_etcd_binary()))
    with pytest.raises(NoCrashSafeEtcd, match=r"can lose committed writes .*#13766"):
        crash_safe_etcd()
    monkeypatch.setenv(ENV, str(tmp_path / "nothing"))
    with pytest.raises(NoCrashSafeEtcd, match="does not run as etcd"):
        crash_safe_etcd()
