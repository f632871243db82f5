"""The node's decisions, as a specification: one test per rule and edge (sidecar.core.rules).

No etcd, no event loop, no clock: every input is given, ``now`` included.
"""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core import rules
from sidecar.core.roles import Role, Status
from sidecar.etcd.election import LeaderInfo, SwitchoverRequest
from sidecar.etcd.records import MemberRecord

ME = "a"


def member(node_id: str, role: str = "ROLE_STANDBY", **fields: Any) -> MemberRecord:
    return MemberRecord(node_id, role=role, **{"copy_current": True, **fields})


def leader(node_id: str, *, valid: bool = True) -> LeaderInfo:
    return LeaderInfo(node_id, "", "", epoch=7, lease=1, valid=valid)


def request(target: str, reason: str = "operator") -> SwitchoverRequest:
    return SwitchoverRequest(target, "x", reason)


# -- may this node campaign ---------------------------------------------------------------------

def test_no_request_and_no_health_check_campaigns() -> None:
    assert rules.held_back(None, ME, False, False, None) is None


def test_a_request_for_a_live_member_holds_the_others_back() -> None:
    assert rules.waits_for(request("b"), ME) == "b"
    assert rules.held_back(request("b"), ME, True, False, None) == \
        "holding back: b takes over (operator)"


def test_a_request_for_no_member_holds_nobody_back() -> None:
    assert rules.held_back(request("gone"), ME, False, False, None) is None


def test_a_request_naming_this_node_does_not_hold_it_back() -> None:
    assert rules.waits_for(request(ME), ME) is None
    assert rules.held_back(request(ME), ME, False, False, None) is None


def test_with_a_health_check_an_unhealthy_node_does_not_campaign() -> None:
    assert rules.held_back(None, ME, False, True, False) == \
        "not campaigning: the local VSM server is unhealthy"


def test_with_a_health_check_a_node_without_a_verdict_does_not_campaign() -> None:
    assert rules.held_back(None, ME, False, True, None) == \
        "not campaigning: the local VSM server is not yet known healthy"


def test_with_a_health_check_a_healthy_node_campaigns() -> None:
    assert rules.held_back(None, ME, False, True, True) is None


def test_without_a_health_check_its_value_is_ignored() -> None:
    assert rules.held_back(None, ME, False, False, False) is None


# -- failback -------------------------------------------------------------------------------------

def standby_of(leader_id: str | None, *, valid: bool = True, role: Role = Role.STANDBY) -> Status:
    return Status(ME, "c", role=role, leader=leader(leader_id, valid=valid) if leader_id else None)


def test_failback_state_names_a_valid_leader_only() -> None:
    assert rules.failback_state(standby_of("b"), True, True) == (Role.STANDBY, "b", True, True)
    assert rules.failback_state(standby_of("b", valid=False), True, True)[1] is None
    assert rules.failback_state(standby_of(None), None, False) == \
        (Role.STANDBY, None, None, False)


def test_failback_is_ready_for_a_caught_up_standby_of_someone_else() -> None:
    state = rules.failback_state(standby_of("b"), None, True)
    assert rules.failback_ready(state, ME, health_configured=False)


@pytest.mark.parametrize("state", [
    (Role.PRIMARY, "b", None, True),  # not a standby
    (Role.STANDBY, None, None, True),  # no leader (or garbage in the key)
    (Role.STANDBY, ME, None, True),  # its own leader
    (Role.STANDBY, "b", None, False),  # the copy is behind
    (Role.STANDBY, "b", None, None),  # the copy's state is not a plain True
])
def test_failback_is_not_ready(state: rules.FailbackState) -> None:
    assert not rules.failback_ready(state, ME, health_configured=False)


def test_with_a_health_check_only_a_healthy_node_fails_back() -> None:
    assert rules.failback_ready((Role.STANDBY, "b", True, True), ME, health_configured=True)
    assert not rules.failback_ready((Role.STANDBY, "b", None, True), ME, health_configured=True)
    assert not rules.failback_ready((Role.STANDBY, "b", False, True), ME, health_configured=True)


def test_an_unhealthy_verdict_holds_failback_back_even_without_a_health_check() -> None:
    """on-primary: a VSM server that would not start makes the node unhealthy although no
    health check is configured; the primary would refuse it as a target."""
    assert not rules.failback_ready((Role.STANDBY, "b", False, True), ME, health_configured=False)


def test_failback_is_due_once_ready_and_stable_for_the_delay() -> None:
    state = (Role.STANDBY, "b", None, True)
    assert not rules.failback_due(state, ME, False, stable_since=100.0, now=104.9, delay=5.0)
    assert rules.failback_due(state, ME, False, stable_since=100.0, now=105.0, delay=5.0)


def test_failback_is_never_due_when_not_ready() -> None:
    state = (Role.STANDBY, None, None, True)
    assert not rules.failback_due(state, ME, False, stable_since=0.0, now=1e9, delay=0.0)


# -- handover targets -----------------------------------------------------------------------------

def test_a_caught_up_standby_is_eligible() -> None:
    assert rules.ineligibility(member("b"), "b") is None
    assert rules.ineligibility(member("b", health="healthy"), "b") is None


@pytest.mark.parametrize(("record", "reason"), [
    (None, "b is not a member (it holds no lease in etcd)"),
    (member("b", role="ROLE_FENCED"), "b is FENCED, not STANDBY"),
    (MemberRecord("b"), "b is ?, not STANDBY"),
    (member("b", health="unhealthy"), "b is unhealthy (its VSM server check fails)"),
    (member("b", health="unknown"),
     "b is not yet known healthy (its VSM server check is unknown)"),
    (member("b", copy_current=False), "b has not caught up with the session records"),
    (MemberRecord("b", role="ROLE_STANDBY"), "b has not caught up with the session records"),
])
def test_ineligibility(record: MemberRecord | None, reason: str) -> None:
    assert rules.ineligibility(record, "b") == reason


def test_a_named_eligible_target_is_chosen() -> None:
    assert rules.choose_target([member("b"), member("c")], ME, "c") == "c"


def test_a_named_ineligible_target_is_refused_with_its_reason() -> None:
    with pytest.raises(rules.SwitchoverRefused, match="c has not caught up"):
        rules.choose_target([member("c", copy_current=False)], ME, "c")


def test_without_a_name_the_first_eligible_standby_by_name_is_chosen() -> None:
    members = [member(ME, role="ROLE_PRIMARY"), member("c"), member("b", health="unhealthy")]
    assert rules.choose_target(members, ME, None) == "c"


def test_without_an_eligible_standby_the_refusal_lists_every_reason() -> None:
    members = [member(ME, role="ROLE_PRIMARY"), member("b", copy_current=False)]
    with pytest.raises(rules.SwitchoverRefused) as refused:
        rules.choose_target(members, ME, None)
    assert str(refused.value) == \
        "no standby can take over: b has not caught up with the session records"


def test_without_any_other_member_none_is_up() -> None:
    with pytest.raises(rules.SwitchoverRefused, match="none is up"):
        rules.choose_target([member(ME, role="ROLE_PRIMARY")], ME, None)


# -- a primary's handover -------------------------------------------------------------------------

def test_a_healthy_primary_without_a_request_keeps_serving() -> None:
    assert rules.handover(None, ME, [], True) == rules.Handover(rules.KEEP)
    assert rules.handover(None, ME, [], None) == rules.Handover(rules.KEEP)


def test_a_request_naming_the_primary_itself_is_cleared() -> None:
    assert rules.handover(request(ME), ME, [], False) == rules.Handover(rules.CLEAR)


def test_a_request_for_an_eligible_target_is_a_handover() -> None:
    assert rules.handover(request("b", "failback"), ME, [member("b")], True) == \
        rules.Handover(rules.HAND_OVER, "b", "failback")


def test_a_request_for_an_ineligible_target_is_cleared_with_the_reason() -> None:
    decision = rules.handover(request("b"), ME, [member("b", health="unhealthy")], False)
    assert decision == rules.Handover(rules.CLEAR, "b",
                                      "b is unhealthy (its VSM server check fails)")


def test_an_unhealthy_primary_asks_for_a_move_to_an_eligible_standby() -> None:
    assert rules.handover(None, ME, [member(ME, role="ROLE_PRIMARY"), member("b")], False) == \
        rules.Handover(rules.ASK_AND_HAND_OVER, "b", "primary unhealthy")


def test_an_unhealthy_primary_without_an_eligible_standby_keeps_the_role() -> None:
    decision = rules.handover(None, ME, [member("b", copy_current=False)], False)
    assert decision.action == rules.STUCK
    assert decision.reason.startswith("no standby can take over: b has not caught up")


# -- a leader key without a lease -----------------------------------------------------------------

def test_an_unowned_leader_key_counts_as_held_for_two_ttls_from_first_sight() -> None:
    seen, left = rules.unowned_leader(None, 40, now=100.0, ttl=5)
    assert (seen, left) == ((40, 100.0), 10.0)
    assert rules.unowned_leader(seen, 40, now=107.0, ttl=5) == ((40, 100.0), 3.0)


def test_an_unowned_leader_key_is_removed_once_the_grace_has_passed() -> None:
    _, left = rules.unowned_leader((40, 100.0), 40, now=110.0, ttl=5)
    assert left <= 0


def test_a_change_of_the_unowned_key_restarts_its_grace() -> None:
    assert rules.unowned_leader((40, 100.0), 41, now=120.0, ttl=5) == ((41, 120.0), 10.0)


# -- maintenance mode (paused) ------------------------------------------------------------------

PAUSED = "paused (maintenance mode): no takeover until `vsm-sidecar resume`"


def test_paused_no_node_campaigns_by_itself() -> None:
    """No takeover when the primary's lease ends: a node with no request does not campaign."""
    assert rules.held_back(None, ME, False, False, None, paused=True) == PAUSED


def test_paused_the_target_of_a_switchover_still_campaigns() -> None:
    """An operator's switchover works while paused: its target takes the key."""
    assert rules.held_back(request(ME), ME, False, False, None, paused=True) is None


def test_paused_a_request_for_a_node_that_is_gone_still_holds_back() -> None:
    """A request naming someone else never frees a paused node to campaign."""
    assert rules.held_back(request("gone"), ME, False, False, None, paused=True) == PAUSED


def test_paused_the_health_check_still_holds_the_target_back() -> None:
    assert rules.held_back(request(ME), ME, False, True, False, paused=True) == \
        "not campaigning: the local VSM server is unhealthy"


def test_paused_no_failback() -> None:
    state = (Role.STANDBY, "b", None, True)
    assert rules.failback_ready(state, ME, health_configured=False)
    assert not rules.failback_ready(state, ME, health_configured=False, paused=True)
    assert not rules.failback_due(state, ME, False, stable_since=0.0, now=1e9, delay=0.0,
                                  paused=True)


def test_paused_an_operator_switchover_is_handed_over() -> None:
    assert rules.handover(request("b"), ME, [member("b")], True, paused=True) == \
        rules.Handover(rules.HAND_OVER, "b", "operator")


def test_paused_a_failback_request_is_cleared() -> None:
    decision = rules.handover(request("b", "failback"), ME, [member("b")], True, paused=True)
    assert (decision.action, decision.target) == (rules.CLEAR, "b")
    assert decision.reason.startswith("paused")


def test_paused_an_unhealthy_primary_keeps_the_role() -> None:
    """No health-triggered handover while paused, though a standby could take over."""
    decision = rules.handover(None, ME, [member("b")], False, paused=True)
    assert decision == rules.Handover(
        rules.STUCK, None, "paused (maintenance mode): no handover for ill health")
    assert rules.handover(None, ME, [member("b")], False).action == rules.ASK_AND_HAND_OVER
