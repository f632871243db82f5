"""Whether the statuses of a local etcd cluster's members make a healthy cluster."""

from __future__ import annotations

from .etcderrors import EtcdMemberUnavailable
from .etcdmember import EtcdMember, MemberStatus


def status_or_error(member: EtcdMember) -> MemberStatus | EtcdMemberUnavailable:
    try:
        return member.status()
    except EtcdMemberUnavailable as exc:
        return exc


def health_problem(statuses: dict[EtcdMember, MemberStatus | EtcdMemberUnavailable]) -> str | None:
    """Why these statuses are not a healthy cluster, or None when they are."""
    if not statuses:
        return "no member is running"
    answers = [s for s in statuses.values() if isinstance(s, MemberStatus)]
    if len(answers) < len(statuses):
        return describe(statuses)
    leaders = {s.leader for s in answers}
    if leaders == {0}:
        return "no leader elected yet"
    if len(leaders) > 1:
        return f"members disagree on the leader: {describe(statuses)}"
    # Followers keep naming a paused or dead leader until their election timeout runs out.
    if not any(s.is_leader for s in answers):
        return f"the leader {leaders.pop():x} is not among the answering members"
    return None


def describe(statuses: dict[EtcdMember, MemberStatus | EtcdMemberUnavailable]) -> str:
    if not statuses:
        return "no member is running"
    parts = []
    for member, status in statuses.items():
        if isinstance(status, MemberStatus):
            parts.append(f"{member.name}: id {status.member_id:x} leader {status.leader:x}")
        else:
            parts.append(str(status))
    return "; ".join(parts)
