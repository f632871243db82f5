"""The chaos suite's short mode: every scenario once, no violation and no lost write."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .runner import SCENARIOS, run_suite

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


@pytest.mark.timeout(400)
def test_every_scenario_once_without_violations_or_lost_writes(tmp_path: Path) -> None:
    started = time.monotonic()
    results = run_suite(list(SCENARIOS), 1, tmp_path, "pytest tests/chaos", log=lambda _: None)
    elapsed = time.monotonic() - started
    assert sorted(r.scenario for r in results) == sorted(SCENARIOS)
    assert [(r.scenario, r.violations) for r in results if r.violations] == []
    assert [(r.scenario, r.lost) for r in results if r.lost] == []
    assert all(r.recovery is not None for r in results)
    assert (tmp_path / "RELIABILITY.md").is_file()
    assert sorted(p.stem for p in (tmp_path / "chaos").glob("*.png")) == sorted(SCENARIOS)
    assert elapsed < 180, f"the short mode took {elapsed:.0f} s"
