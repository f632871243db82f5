"""The chaos runner's one-primary judgement: PRIMARY claims and when they end."""

from __future__ import annotations

import pytest

from .runner import Report, claims, overlapping_claims


def report(node: str, at: float, role: str = "PRIMARY", lease_left: float | None = 1.5,
           epoch: int = 1) -> Report:
    return Report(node, at, at + 0.01, role, epoch, lease_left if role == "PRIMARY" else None,
                  "poll")


def test_a_claim_runs_to_the_end_of_the_reported_lease() -> None:
    """With no later report (a paused or killed node) a claim lasts sent + lease_time_left,
    so a successor that reports PRIMARY before then overlaps it."""
    reports = [report("a", 0.0), report("b", 1.0, epoch=2)]
    assert [(c[0], c[1]) for c in claims(reports)] == [(0.01, 1.5), (1.01, 2.5)]
    assert len(overlapping_claims(reports)) == 1


def test_a_claim_ends_when_the_node_reports_that_it_stepped_down() -> None:
    """A later STANDBY (or FENCED ...) report of the same node ends its claim when that
    report arrived; the successor's later claim does not overlap it."""
    reports = [report("a", 0.0), report("a", 0.5, "STANDBY"), report("b", 0.6, epoch=2)]
    assert overlapping_claims(reports) == []
    assert claims(reports)[0][1] == pytest.approx(0.51)


def test_only_a_later_report_ends_a_claim() -> None:
    """A STANDBY report sent before the PRIMARY report arrived may have been computed
    first; it ends nothing. Nor does an unreachable poll (it says nothing of the role)."""
    reports = [Report("a", 0.0, 0.3, "STANDBY", 0, None, "poll"), report("a", 0.1),
               report("a", 0.4, "UNREACHABLE"), report("b", 1.0, epoch=2)]
    assert len(overlapping_claims(reports)) == 1


def test_a_step_down_after_the_successor_claimed_still_overlaps() -> None:
    """The #15247 case without the guard: b reports PRIMARY before a reports that it
    stepped down."""
    reports = [report("a", 0.0), report("b", 0.2, epoch=2), report("a", 0.3, "STANDBY")]
    pairs = overlapping_claims(reports)
    assert len(pairs) == 1
    first, second = pairs[0]
    assert (first[2].node, second[2].node) == ("a", "b")
    assert (second[0], first[1]) == pytest.approx((0.21, 0.31))
