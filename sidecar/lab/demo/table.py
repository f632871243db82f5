"""What the demo's live table shows: a row per sidecar, a row per etcd member, who holds the
resource IP, aligned and (on a terminal) coloured."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ... import client
from ..etcderrors import EtcdMemberUnavailable
from ..etcdmember import EtcdMember
from ..localcluster import LocalEtcdCluster
from ..localnode import LocalSidecar
from .lab import Lab, status_or_none
from .plan import PROBE_TIMEOUT_S, VIP_ASK_EVERY_S

# Each etcd probe opens a new connection; once a second is enough to show who leads.
ETCD_REFRESH_S = 1.0


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    role: str
    epoch: str
    leader: str
    lease_left: str
    sessions: str
    vsm: str
    address: str
    vip: str | None = None  # whether its host holds the resource IP; None: there is none

    @property
    def key(self) -> tuple[str | None, ...]:
        """Everything but the ticking lease: what counts as a change in a log."""
        return (self.node_id, self.role, self.epoch, self.leader, self.sessions, self.vsm,
                self.vip)  # fmt: skip

    def cells(self) -> tuple[str, ...]:
        vip = () if self.vip is None else (self.vip,)
        return (self.node_id, self.role, self.epoch, self.leader, self.lease_left,
                self.sessions, self.vsm, *vip, self.address)  # fmt: skip


NODE_HEADER = (
    "node", "role", "epoch", "leader", "lease left", "sessions mirrored", "VSM", "gRPC address"
)  # fmt: skip
VIP_HEADER = "holds VIP"  # after "VSM", where there is a resource IP
MEMBER_HEADER = ("etcd", "state", "client URL", "pid")


def node_header(lab: Lab) -> tuple[str, ...]:
    if lab.vip is None:
        return NODE_HEADER
    at = NODE_HEADER.index("VSM") + 1
    return (*NODE_HEADER[:at], VIP_HEADER, *NODE_HEADER[at:])


def node_row(lab: Lab, node: LocalSidecar, holders: dict[str, str] | None = None) -> NodeRow:
    vsm = _vsm_state(lab, node)
    vip = None if lab.vip is None else (holders or {}).get(node.node_id, "-")
    if node.process is None:
        return NodeRow(node.node_id, "not started", "-", "-", "-", "-", vsm, node.address, vip)
    if not node.running:
        return NodeRow(node.node_id, "down", "-", "-", "-", "-", vsm, node.address, vip)
    status = status_or_none(node)
    if status is None:
        return NodeRow(node.node_id, "no answer", "-", "-", "-", "-", vsm, node.address, vip)
    count = lab.session_count(node)
    return NodeRow(
        node.node_id,
        client.role_name(status),
        str(status.get("epoch", "0")),
        str(status.get("leader_id") or "-"),
        _seconds(status.get("lease_time_left")),
        "-" if count is None else str(count),
        vsm,
        node.address,
        vip,
    )


def _vsm_state(lab: Lab, node: LocalSidecar) -> str:
    standin = lab.standins.get(node.node_id)
    return "serving" if standin is not None and standin.serving() else "-"


def _seconds(duration: object) -> str:
    # A protobuf Duration in JSON form, e.g. "1.623s"; absent unless PRIMARY.
    if not isinstance(duration, str):
        return "-"
    return f"{float(duration.rstrip('s')):.2f} s"


class MemberProbe:
    """The etcd members' states: killed is seen at once, who leads at most once a second."""

    def __init__(self, cluster: LocalEtcdCluster) -> None:
        self.cluster = cluster
        # Keyed by pid too: a restarted member must not inherit its old "leader".
        self._probed: dict[tuple[str, int], str] = {}
        self._asked = float("-inf")

    def rows(self) -> list[tuple[str, ...]]:
        members = self.cluster.members
        if time.monotonic() - self._asked >= ETCD_REFRESH_S:
            self._asked = time.monotonic()
            self._probed = {
                (m.name, m.pid): _probe(m) for m in members if m.pid is not None
            }  # fmt: skip
        return [self._row(m) for m in members]

    def _row(self, member: EtcdMember) -> tuple[str, ...]:
        pid = member.pid
        if pid is None:
            return (member.name, "killed", member.client_url, "-")
        state = self._probed.get((member.name, pid), "running")
        return (member.name, state, member.client_url, str(pid))


class VipProbe:
    """Whose host holds the resource IP (every refresh), and whom the client reaches through
    it (at most twice a second: each look starts a process in the client's namespace)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.holders: dict[str, str] = {}
        self.client = "-"
        self._asked = float("-inf")

    def refresh(self) -> None:
        if self.lab.net is None:
            return
        self.holders = {
            node.node_id: "yes" if self.lab.holds_vip(node) else "-" for node in self.lab.nodes
        }
        if time.monotonic() - self._asked >= VIP_ASK_EVERY_S:
            self._asked = time.monotonic()
            self.client = self.lab.client_reaches() or "no answer"

    def line(self, color: bool) -> str | None:
        """``client via resource IP ADDRESS: NAME``; None without a resource IP."""
        if self.lab.vip is None:
            return None
        style = _STYLES.get("no answer") if self.client == "no answer" else "1;32"
        return f"  client via resource IP {self.lab.vip}: {paint(self.client, style, color)}"


def _probe(member: EtcdMember) -> str:
    try:
        return "leader" if member.status(timeout=PROBE_TIMEOUT_S).is_leader else "running"
    except EtcdMemberUnavailable:
        return "no answer"


_STYLES = {
    "PRIMARY": "1;32",
    "STANDBY": "36",
    "FENCED": "1;31",
    "STARTING": "33",
    "STOPPING": "33",
    "down": "31",
    "killed": "31",
    "no answer": "33",
    "leader": "1;32",
    "serving": "1;32",
    "yes": "1;32",
}


def paint(text: str, style: str | None, color: bool) -> str:
    return f"\x1b[{style}m{text}\x1b[0m" if color and style else text


def table(header: Sequence[str], rows: Sequence[Sequence[str]], color: bool) -> list[str]:
    """Aligned columns under a header; on a terminal the states in them (PRIMARY, killed,
    serving...) are coloured."""
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    lines = []
    for index, cells in enumerate([header, *rows]):
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        if index > 0:
            padded = [
                paint(text, _STYLES.get(cell), color)
                for text, cell in zip(padded, cells, strict=True)
            ]
        lines.append("  " + "  ".join(padded).rstrip())
    return lines
