"""``vsm-sidecar demo``: watch two sidecars elect, fail over and hand over on a local cluster.

Nothing to set up: the demo starts a real 3-member etcd cluster (the bundled etcd binary) and
two real sidecar processes, ``vsm-a`` and ``vsm-b``, in one temporary work directory. It plays a
few scenes (election, crash failover, restart, planned handover, etcd member loss), each with a
measured result, under a live table of what every process reports. Ctrl-C, SIGTERM or a
closed terminal (SIGHUP) at any time kills everything it started and removes the directory.

Times are measured the way a VSM server would see them: from the fault to the arrival of the
survivor's WatchRole message saying PRIMARY (:class:`~sidecar.localnode.RoleRecorder`).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from . import client
from .config import MAX_TTL, MIN_TTL
from .localcluster import EtcdClusterError, EtcdMember, EtcdMemberUnavailable, LocalEtcdCluster
from .localnode import LocalSidecar, Observation, RoleRecorder

CLUSTER = "demo"
NODE_IDS = ("vsm-a", "vsm-b")
HEALTH_REQUEST = '{"service":"thinlinc.ha.v1.Primary"}'
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

REFRESH_S = 0.25  # the live table: about four times a second
# Each etcd probe opens a new connection; once a second is enough to show who leads.
ETCD_REFRESH_S = 1.0
PROBE_TIMEOUT_S = 0.3
PROGRESS_EVERY_S = 5.0  # off a terminal: a progress line when nothing else was printed
LOG_TAIL_LINES = 15

# Generous on purpose: the demo runs on laptops and busy CI machines alike. The measured times
# are what the demo is about; these only decide when to give up.
SETTLE_TIMEOUT_S = 30.0
FAILOVER_SLACK_S = 15.0  # on top of the TTL
EXIT_TIMEOUT_S = 10.0
ETCD_TIMEOUT_S = 30.0
RIDE_OUT_S = 2.0  # after an etcd member loss, watch this much longer than a TTL
# The shortest TTL that outlasts an etcd leader election at stock etcd timing (measured): with
# a shorter one the primary may fence itself, safely, so scene 5 shows that instead of failing.
RIDE_OUT_TTL = 3


class SceneFailed(Exception):
    """A scene's expectation was not met in time; the message says what was seen instead."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, or SIGHUP (the terminal closed): unwinds like Ctrl-C, so one cleanup serves all.

    The children run in sessions of their own and would outlive a demo killed by the default
    action of either signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# The processes


@dataclass(frozen=True)
class Split:
    """One PRIMARY and one STANDBY that agree on the leader and the epoch."""

    primary: LocalSidecar
    standby: LocalSidecar
    epoch: int


class Lab:
    """The etcd cluster and the two sidecars of one demo run, under one temporary directory."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.workdir = Path(tempfile.mkdtemp(prefix="vsm-demo-"))
        self.etcd = LocalEtcdCluster(workdir=self.workdir / "etcd")
        self.nodes: list[LocalSidecar] = []
        self.recorders: dict[str, RoleRecorder] = {}
        self.down: LocalSidecar | None = None  # killed by one scene, restarted by the next

    def start_etcd(self) -> None:
        self.etcd.start()
        # Ports are chosen now, so the commands to try can be printed before the nodes start.
        self.nodes = [
            LocalSidecar(node_id, CLUSTER, self.etcd.endpoints_arg, self.workdir, ttl=self.ttl)
            for node_id in NODE_IDS
        ]

    def start_node(self, node: LocalSidecar) -> float:
        """Start (or restart) a sidecar without waiting; return the monotonic start time."""
        if node.node_id not in self.recorders:
            # The recorder retries until the gRPC port answers, so it sees the first status.
            self.recorders[node.node_id] = RoleRecorder(node.address)
        started = time.monotonic()
        node.start(wait=False)
        return started

    def wait_role(self, node: LocalSidecar, role: str, after: float, timeout: float) -> Observation:
        """The first ``role`` the node reported since ``after``; fail early if it exits."""
        recorder = self.recorders[node.node_id]
        while True:
            try:
                # Short slices, so a process that died is noticed long before the timeout.
                return recorder.wait_role(role, timeout=0.5, after=after)
            except TimeoutError:
                seen = " -> ".join(recorder.roles_since(after)) or "nothing"
                if node.process is not None and not node.running:
                    raise SceneFailed(
                        f"{node.node_id} exited with code {node.process.returncode} before it "
                        f"reported {role} (it reported: {seen})"
                    ) from None
                if time.monotonic() >= after + timeout:
                    raise SceneFailed(
                        f"{node.node_id} did not report {role} within {timeout:.0f} s "
                        f"(it reported: {seen})"
                    ) from None

    def split(self, timeout: float = SETTLE_TIMEOUT_S) -> Split:
        """Wait until one node is PRIMARY and the other STANDBY, agreeing on the epoch."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = [(node, _status_or_none(node)) for node in self.nodes]
            found = _as_split(statuses)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                seen = ", ".join(f"{n.node_id} {_role_of(s)}" for n, s in statuses)
                raise SceneFailed(f"no PRIMARY with a STANDBY within {timeout:.0f} s ({seen})")
            time.sleep(0.05)

    def restart_as_standby(self, node: LocalSidecar) -> float:
        """Restart a stopped node; return how long it took to report STANDBY."""
        started = self.start_node(node)
        back = self.wait_role(node, "STANDBY", after=started, timeout=SETTLE_TIMEOUT_S)
        if "PRIMARY" in self.recorders[node.node_id].roles_since(started):
            raise SceneFailed(f"{node.node_id} took the leadership back after its restart")
        return back.at - started

    def last_epoch(self, node: LocalSidecar) -> int:
        """The epoch in the node's latest WatchRole message."""
        observations = self.recorders[node.node_id].observations
        return int(observations[-1].status.get("epoch", 0)) if observations else 0

    def etcd_leader(self) -> EtcdMember:
        try:
            return self.etcd.leader(timeout=ETCD_TIMEOUT_S)
        except EtcdClusterError as exc:
            raise SceneFailed(f"etcd has no leader: {exc}") from None

    def close(self) -> None:
        """Kill the sidecars, stop following them, close etcd, remove the work directory."""
        try:
            for node in self.nodes:
                node.close()
            for recorder in self.recorders.values():
                recorder.close()
            self.etcd.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _status_or_none(node: LocalSidecar) -> dict[str, Any] | None:
    if not node.running:
        return None
    try:
        return node.role(timeout=PROBE_TIMEOUT_S)
    except client.Unreachable:
        return None


def _role_of(status: dict[str, Any] | None) -> str:
    return "unreachable" if status is None else client.role_name(status)


def _as_split(statuses: Sequence[tuple[LocalSidecar, dict[str, Any] | None]]) -> Split | None:
    known = [(node, status) for node, status in statuses if status is not None]
    by_role = {client.role_name(status): (node, status) for node, status in known}
    if len(known) != 2 or set(by_role) != {"PRIMARY", "STANDBY"}:
        return None
    (primary, pstatus), (standby, sstatus) = by_role["PRIMARY"], by_role["STANDBY"]
    # Right after a change the standby may not have seen the new leader yet.
    agreed = all(pstatus.get(key) == sstatus.get(key) for key in ("epoch", "leader_id"))
    return Split(primary, standby, int(pstatus.get("epoch", 0))) if agreed else None


# ---------------------------------------------------------------------------------------------
# The scenes: each announces what it is about to do, does it, and returns the measured result.

Announce = Callable[[str], None]
Scene = Callable[[Lab, Announce], str]


def election(lab: Lab, announce: Announce) -> str:
    first, second = lab.nodes
    announce(f"election: start {first.node_id}, then {second.node_id}; one becomes PRIMARY")
    started = lab.start_node(first)
    won = lab.wait_role(first, "PRIMARY", after=started, timeout=SETTLE_TIMEOUT_S)
    joined = lab.start_node(second)
    lab.wait_role(second, "STANDBY", after=joined, timeout=SETTLE_TIMEOUT_S)
    split = lab.split()
    return (
        f"{split.primary.node_id} became PRIMARY {_took(won.at - started)} after its process "
        f"started (epoch {split.epoch}); {split.standby.node_id} follows it as STANDBY"
    )


def crash_failover(lab: Lab, announce: Announce) -> str:
    before = lab.split()
    announce(f"kill -9 the primary ({before.primary.node_id}): a crash, nothing is handed over")
    killed_at = time.monotonic()
    before.primary.kill()
    lab.down = before.primary
    promoted = lab.wait_role(
        before.standby, "PRIMARY", after=killed_at, timeout=lab.ttl + FAILOVER_SLACK_S
    )
    epoch = _grown_epoch(before.epoch, promoted)
    return (
        f"{before.standby.node_id} became PRIMARY {_took(promoted.at - killed_at)} after the "
        f"kill (TTL {lab.ttl} s), epoch {before.epoch} -> {epoch}"
    )


def restart_killed(lab: Lab, announce: Announce) -> str:
    node, lab.down = lab.down, None
    if node is None:
        raise SceneFailed("no node was killed before this scene")
    announce(f"restart the killed node ({node.node_id}): it must come back as STANDBY")
    survivor = next(other for other in lab.nodes if other is not node)
    epoch = lab.last_epoch(survivor)
    took = lab.restart_as_standby(node)
    split = lab.split()
    if (split.primary, split.epoch) != (survivor, epoch):
        raise SceneFailed(f"the leadership moved while {node.node_id} restarted: {split}")
    return (
        f"{node.node_id} is STANDBY {_took(took)} after its restart, following "
        f"{split.primary.node_id} (epoch {split.epoch}, unchanged)"
    )


def handover(lab: Lab, announce: Announce) -> str:
    before = lab.split()
    primary, standby = before.primary, before.standby
    announce(f"planned handover: SIGTERM the primary ({primary.node_id}), then restart it")
    sent_at = time.monotonic()
    primary.terminate()
    promoted = lab.wait_role(standby, "PRIMARY", after=sent_at, timeout=lab.ttl + FAILOVER_SLACK_S)
    took, epoch = promoted.at - sent_at, _grown_epoch(before.epoch, promoted)
    if took >= lab.ttl:
        raise SceneFailed(f"{standby.node_id} waited {_took(took)}, a lease expiry: no handover")
    code = _exit_code(primary)
    back = lab.restart_as_standby(primary)
    return (
        f"{standby.node_id} became PRIMARY {_took(took)} after the SIGTERM (no TTL wait), "
        f"epoch {before.epoch} -> {epoch}; {primary.node_id} exited {code} and is STANDBY "
        f"again {_took(back)} after its restart"
    )


def etcd_leader_loss(lab: Lab, announce: Announce) -> str:
    before = lab.split()
    leader = lab.etcd_leader()
    announce(f"kill -9 the etcd raft leader ({leader.name}): the sidecars should ride it out")
    killed_at = time.monotonic()
    leader.kill()
    successor = lab.etcd_leader()
    elected = time.monotonic() - killed_at
    watched = lab.ttl + RIDE_OUT_S
    time.sleep(max(0.0, killed_at + watched - time.monotonic()))
    outcome = _after_member_loss(lab, before, killed_at, watched)
    rejoined = _restart_member(lab, leader)
    return (
        f"{successor.name} led etcd {_took(elected)} after the kill; {outcome}; "
        f"{leader.name} rejoined {_took(rejoined)} after its restart"
    )


SCENES: tuple[Scene, ...] = (election, crash_failover, restart_killed, handover, etcd_leader_loss)


def _grown_epoch(old: int, promoted: Observation) -> int:
    new = int(promoted.status.get("epoch", 0))
    if new <= old:
        raise SceneFailed(f"the new primary's epoch {new} is not above the old one, {old}")
    return new


def _exit_code(node: LocalSidecar) -> int:
    try:
        code = node.wait_exit(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SceneFailed(f"{node.node_id} did not exit within {EXIT_TIMEOUT_S:g} s") from None
    if code != 0:
        raise SceneFailed(f"{node.node_id} exited with code {code} after SIGTERM, not 0")
    return code


def _after_member_loss(lab: Lab, before: Split, since: float, watched: float) -> str:
    primary, standby = before.primary.node_id, before.standby.node_id
    primary_went = _path(["PRIMARY", *lab.recorders[primary].roles_since(since)])
    standby_went = _path(["STANDBY", *lab.recorders[standby].roles_since(since)])
    after = lab.split()
    if (primary_went, standby_went, after.epoch) == (["PRIMARY"], ["STANDBY"], before.epoch):
        return (
            f"for {watched:g} s {primary} stayed PRIMARY and {standby} STANDBY "
            f"(epoch {after.epoch} unchanged)"
        )
    story = f"{primary} went {' -> '.join(primary_went)}, {standby} {' -> '.join(standby_went)}"
    if lab.ttl >= RIDE_OUT_TTL:
        raise SceneFailed(f"{story}, although only one etcd member died")
    # A short TTL may run out during the etcd election. That is safe (rule 3) as long as the
    # primary gave up its role before anyone else took it; it is shown, not hidden.
    _expect_no_overlap(lab, before, since)
    return (
        f"{story}: a lease deadline passed during the etcd election (TTL {lab.ttl} s is too "
        f"short to ride one out: try --ttl {RIDE_OUT_TTL}); never two PRIMARYs, "
        f"{after.primary.node_id} is PRIMARY now, epoch {before.epoch} -> {after.epoch}"
    )


def _path(roles: list[str]) -> list[str]:
    """Roles as a path, without repeats (a new epoch in the same role is another message)."""
    return [role for index, role in enumerate(roles) if index == 0 or role != roles[index - 1]]


def _expect_no_overlap(lab: Lab, before: Split, since: float) -> None:
    primary, standby = before.primary.node_id, before.standby.node_id
    fenced = _first(lab, primary, lambda role: role != "PRIMARY", since)
    promoted = _first(lab, standby, lambda role: role == "PRIMARY", since)
    if promoted is not None and (fenced is None or promoted.at <= fenced.at):
        raise SceneFailed(f"{standby} became PRIMARY before {primary} gave up the role")


def _first(
    lab: Lab, node_id: str, wanted: Callable[[str], bool], since: float
) -> Observation | None:
    try:
        return lab.recorders[node_id].wait_for(lambda o: wanted(o.role), timeout=0, after=since)
    except TimeoutError:
        return None


def _restart_member(lab: Lab, member: EtcdMember) -> float:
    started = time.monotonic()
    member.start()
    try:
        lab.etcd.wait_healthy(ETCD_TIMEOUT_S)
    except EtcdClusterError as exc:
        raise SceneFailed(f"{member.name} did not rejoin: {exc}") from None
    return time.monotonic() - started


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ---------------------------------------------------------------------------------------------
# What the table shows


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    role: str
    epoch: str
    leader: str
    lease_left: str
    address: str
    pid: str

    @property
    def key(self) -> tuple[str, ...]:
        """Everything but the ticking lease: what counts as a change in a log."""
        return (self.node_id, self.role, self.epoch, self.leader, self.pid)

    def cells(self) -> tuple[str, ...]:
        return (self.node_id, self.role, self.epoch, self.leader, self.lease_left,
                self.address, self.pid)  # fmt: skip


NODE_HEADER = ("node", "role", "epoch", "leader", "lease left", "gRPC address", "pid")
MEMBER_HEADER = ("etcd", "state", "client URL", "pid")


def node_row(node: LocalSidecar) -> NodeRow:
    if node.process is None:
        return NodeRow(node.node_id, "not started", "-", "-", "-", node.address, "-")
    if not node.running:
        return NodeRow(node.node_id, "down", "-", "-", "-", node.address, "-")
    status = _status_or_none(node)
    if status is None:
        return NodeRow(node.node_id, "no answer", "-", "-", "-", node.address, str(node.pid))
    return NodeRow(
        node.node_id,
        client.role_name(status),
        str(status.get("epoch", "0")),
        str(status.get("leader_id") or "-"),
        _seconds(status.get("lease_time_left")),
        node.address,
        str(node.pid),
    )


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
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _paint(text: str, style: str | None, color: bool) -> str:
    return f"\x1b[{style}m{text}\x1b[0m" if color and style else text


def table(header: Sequence[str], rows: Sequence[Sequence[str]], color: bool) -> list[str]:
    """Aligned columns under a header; column 1 (the role or state) is coloured on a terminal."""
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    lines = []
    for index, cells in enumerate([header, *rows]):
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        if index > 0:
            padded[1] = _paint(padded[1], _STYLES.get(cells[1]), color)
        lines.append("  " + "  ".join(padded).rstrip())
    return lines


def _rows(line: str, width: int) -> int:
    """Terminal rows a line takes once wrapped."""
    return max(1, -(-len(_ANSI.sub("", line)) // width))


def _newest(lines: Sequence[str], rows: int, width: int) -> list[str]:
    """The newest lines that fit in ``rows`` terminal rows (at least the last three)."""
    kept: list[str] = []
    for line in reversed(lines):
        rows -= _rows(line, width)
        if rows < 0 and len(kept) >= 3:
            break
        kept.append(line)
    return kept[::-1]


def _erase_rest(line: str, width: int) -> str:
    # Clear what an older, longer line left behind. Not after a line that fills its last row
    # exactly: there the cursor waits on the last column and the erase would take that column.
    length = len(_ANSI.sub("", line))
    return line if length and length % width == 0 else line + "\x1b[K"


def _style_event(line: str) -> str:
    if line.startswith("Scene "):
        return _paint(line, "1", True)
    if line.startswith("  => "):
        return _paint(line, "32", True)
    return _paint(line, "1;31", True) if line.startswith("FAILED") else line


# ---------------------------------------------------------------------------------------------
# The live view


class LiveView:
    """Header, live tables and scene log.

    On a terminal the whole screen is redrawn in place. Anywhere else (a CI log, a pipe) lines
    are only appended: the tables when something in them changed, else a progress line now
    and then, so the log stays readable.
    """

    def __init__(self, lab: Lab, tty: bool, started: float) -> None:
        self.lab = lab
        self.tty = tty
        self.started = started
        self.header: list[str] = []
        self.events: list[str] = []
        self.progress = ""
        self._members = MemberProbe(lab.etcd)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_key: object = None
        self._last_print = float("-inf")

    def add_header(self, *lines: str) -> None:
        self._add(self.header, lines)

    def say(self, line: str) -> None:
        self._add(self.events, [line])

    def _add(self, target: list[str], lines: Sequence[str]) -> None:
        with self._lock:
            target.extend(lines)
            drawn = self.tty and self._thread is not None
            if not drawn:
                _emit("\n".join(lines))
        if drawn:
            self._wake.set()

    def start(self) -> None:
        if self.tty:
            _emit("\x1b[?25l\x1b[2J", end="")  # hide the cursor, clear the screen
        self._thread = threading.Thread(target=self._loop, name="demo-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing; the last screen stays, and later lines are printed below it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(5)
        if self.tty:
            _emit("\x1b[?25h", end="")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                nodes = [node_row(node) for node in self.lab.nodes]
                members = self._members.rows()
                if self.tty:
                    self._redraw(nodes, members)
                else:
                    self._append(nodes, members)
            except Exception as exc:  # a display glitch must not end the demo
                self.progress = f"(display error: {exc!r})"
            self._wake.wait(REFRESH_S)
            self._wake.clear()

    def _tables(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> list[str]:
        return [
            *table(NODE_HEADER, [row.cells() for row in nodes], self.tty),
            "",
            *table(MEMBER_HEADER, members, self.tty),
        ]

    def _footer(self) -> str:
        return f"[{time.monotonic() - self.started:6.1f} s] {self.progress}"

    def _redraw(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> None:
        width, height = shutil.get_terminal_size()
        with self._lock:
            top = [*self.header, "", *self._tables(nodes, members), ""]
            bottom = ["", self._footer()]
            # Long lines wrap rather than being cut (a cut command cannot be copied), so the
            # budget is in rows; the newest scene lines win when the terminal is too short.
            room = height - 1 - sum(_rows(line, width) for line in top + bottom)
            events = [_style_event(line) for line in _newest(self.events, room, width)]
            screen = "".join(_erase_rest(line, width) + "\n" for line in top + events + bottom)
        # Home, overwrite every line, clear what is left below: no flicker.
        _emit(f"\x1b[H{screen}\x1b[J", end="")

    def _append(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> None:
        key = ([row.key for row in nodes], members)
        now = time.monotonic()
        if key != self._last_key:
            lines = [self._footer(), *self._tables(nodes, members)]
        elif now - self._last_print >= PROGRESS_EVERY_S:
            lines = [self._footer()]
        else:
            return
        self._last_key, self._last_print = key, now
        with self._lock:
            _emit("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Start, run, clean up


def main(duration: float | None = None, ttl: int = 2) -> int:
    """Run the demo: 0 when every scene met its expectation, 1 if one did not, 130 on Ctrl-C
    (128 + the signal on SIGTERM or SIGHUP). Whatever happens, everything it started is gone
    when it returns."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        print(f"vsm-sidecar demo: --ttl must be {MIN_TTL}-{MAX_TTL}, not {ttl}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    with _sigterm_unwinds():
        lab = Lab(ttl)
        view = LiveView(lab, sys.stdout.isatty(), started)
        try:
            code = _attempt(lab, view, duration)
        finally:
            with _signals_ignored():
                view.stop()
                _close(lab)
    return code


def _attempt(lab: Lab, view: LiveView, duration: float | None) -> int:
    try:
        _run(lab, view, duration)
        return EXIT_OK
    except KeyboardInterrupt as exc:
        view.stop()
        by = f" by {exc}" if isinstance(exc, Terminated) else ""
        _emit(f"\nInterrupted{by}: stopping every process the demo started...")
        return 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    # Also the harness's own errors: no etcd binary, a sidecar that never answered.
    except (SceneFailed, EtcdClusterError, RuntimeError, TimeoutError) as exc:
        view.stop()
        _report_failure(lab, view, exc)
        return EXIT_FAILED


def _run(lab: Lab, view: LiveView, duration: float | None) -> None:
    view.add_header(*_intro(lab))
    view.say("Starting a 3-member etcd cluster...")
    lab.start_etcd()
    view.add_header(*_commands(lab))
    view.start()
    for number, scene in enumerate(SCENES, start=1):
        _play(number, scene, lab, view)
    view.say(f"All {len(SCENES)} scenes went as expected.")
    _linger(view, duration)


def _play(number: int, scene: Scene, lab: Lab, view: LiveView) -> None:
    def announce(title: str) -> None:
        view.progress = f"scene {number}/{len(SCENES)}: {title}"
        view.say(f"Scene {number}/{len(SCENES)}: {title}...")

    result = scene(lab, announce)
    view.say(f"  => {result}")


def _linger(view: LiveView, duration: float | None) -> None:
    if duration is None:
        view.progress = "scenes done; the cluster keeps running: try the commands. Ctrl-C stops."
        while True:  # until Ctrl-C or SIGTERM raises out of the sleep
            time.sleep(3600)
    left = view.started + duration - time.monotonic()
    if left > 0:
        view.progress = f"scenes done; the demo ends {duration:g} s after its start"
        time.sleep(left)


def _report_failure(lab: Lab, view: LiveView, exc: BaseException) -> None:
    view.say(f"FAILED: {exc}")
    for node in lab.nodes:
        if node.process is not None:
            view.say(f"--- last lines of {node.log_path} ---\n{node.log_tail(LOG_TAIL_LINES)}")


def _close(lab: Lab) -> None:
    try:
        lab.close()
    except Exception as exc:  # say so, but the caller's exit code stays what it was
        _emit(f"Cleanup problem: {exc}", file=sys.stderr)
        return
    _emit(f"Stopped etcd and the sidecars; removed {lab.workdir}.")


def _emit(text: str, end: str = "\n", file: TextIO | None = None) -> None:
    """Print and flush; a terminal that is gone (SIGHUP, a closed pipe) must not stop cleanup."""
    with suppress(OSError):
        print(text, end=end, file=file or sys.stdout, flush=True)


def _intro(lab: Lab) -> list[str]:
    return [
        f"vsm-sidecar demo: sidecars {' and '.join(NODE_IDS)} on a local 3-member etcd "
        f"cluster, lease TTL {lab.ttl} s. Resource IP: not shown in this demo yet.",
        f"Work dir (every process's log): {lab.workdir}",
    ]


def _commands(lab: Lab) -> list[str]:
    address, other = (node.address for node in lab.nodes)
    grpcurl = _tool("grpcurl")
    return [
        f"Try these in another terminal while it runs ({NODE_IDS[1]} answers on {other}):",
        f"  {_tool('vsm-sidecar')} status --grpc {address}",
        f"  {grpcurl} -plaintext {address} list",
        f"  {grpcurl} -plaintext {address} thinlinc.ha.v1.RoleService/GetRole",
        f"  {grpcurl} -plaintext -d '{HEALTH_REQUEST}' {address} grpc.health.v1.Health/Check",
        f"  {_tool('etcdctl')} --endpoints={lab.etcd.endpoints_arg} get --prefix "
        f"/thinlinc-ha/{CLUSTER}/",
    ]


def _tool(name: str) -> str:
    """``name`` if it is on PATH, else its full path beside this Python (a virtualenv)."""
    if shutil.which(name):
        return name
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def unwind(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = _set_handlers({signal.SIGTERM: unwind, signal.SIGHUP: unwind})
    try:
        yield
    finally:
        _set_handlers(previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Cleanup must run to its end: a second Ctrl-C there would leave etcd running."""
    ignored = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = _set_handlers(dict.fromkeys(ignored, signal.SIG_IGN))
    try:
        yield
    finally:
        _set_handlers(previous)


Handler = Callable[[int, FrameType | None], Any] | int | None


def _set_handlers(handlers: dict[signal.Signals, Handler]) -> dict[signal.Signals, Handler]:
    """Install handlers and return the previous ones; a no-op off the main thread (signals
    can only be handled there, and then the caller handles its own)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
