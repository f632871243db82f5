"""The role state machine: it decides; the election, the resource IP and the mirror act.

One straight line per lease: grant a lease, then keep it alive while following or holding the
leadership, until the lease is lost (FENCED, then a new lease) or the process stops (STOPPING:
hand over). Every decision is one log event saying what was decided and why.

Rule 4 of DESIGN.md is enforced in one place, :meth:`Node._set_role`: any move away from PRIMARY
runs the release actions synchronously, before anything else can run, and none of them may wait
on etcd, a hook or an RPC. Rule 3 is enforced twice: a watchdog task wakes at the local deadline,
and every reader of the role (:meth:`Node.status`, the write path) checks the deadline itself
first, because after a process pause (SIGSTOP, a VM freeze) other callbacks may run before the
watchdog does.

The node holds the role and drives the lease's life; the steps it takes live beside it: may it
campaign (:mod:`.candidacy`), what ends a primary's term of its own accord (:mod:`.handover`),
the preferred primary's failback (:mod:`.failback`), a leader key without a lease
(:mod:`.unowned`), the lease's start and end (:mod:`.lease`), the watches it waits on
(:mod:`.watches`), and the decisions themselves as pure functions (:mod:`.rules`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any

import structlog

from .. import logs
from ..etcd.client import Etcd
from ..etcd.election import Election
from ..etcd.errors import EtcdAccessDenied, EtcdError, LeaseGone
from ..etcd.lease import Lease, LeaseLost
from ..etcd.records import (
    SWITCHOVER_TTL,
    LeaderInfo,
    MemberRecord,
    PauseRecord,
    SwitchoverRequest,
)
from ..etcd.retry import ERROR_PAUSE, retried
from ..settings import Settings
from . import candidacy, rules
from .collaborators import NodeParts
from .failback import ask_for_failback
from .handover import HandOver, await_handover, clear_request
from .lease import (
    ACCESS_NOTE,
    acquire_lease,
    forget_lease,
    pass_gates,
    record_lease,
    resume,
    revoke_previous,
    revoke_stale,
    watch_deadline,
)
from .member import member_record, publish_member
from .roles import NotPrimary, Role, RoleView, Status
from .switchover import request_move
from .tasks import TaskEnded, supervise
from .unowned import UnownedLeader
from .watches import Deposed, Tampered, follow, guard_key, watch_pause

log = structlog.get_logger(__name__)


class Node:
    """One sidecar's role, driven by :meth:`run` until the stop event is set.

    Its collaborators come whole with ``parts``; ``view``, if given, is bound to this node so
    that the parts built before it can ask for the role."""

    def __init__(self, settings: Settings, etcd: Etcd, election: Election | None = None, *,
                 parts: NodeParts | None = None, view: RoleView | None = None) -> None:
        parts = parts or NodeParts()
        self.settings = settings
        self.etcd = etcd
        self.election = election or Election(etcd, settings)
        self._status = Status(settings.node_id, settings.cluster)
        self._lease: Lease | None = None
        self._subscribers: set[asyncio.Queue[Status]] = set()
        self._member_dirty = asyncio.Event()
        # See sidecar.core.collaborators for what each does and may do.
        self.on_release = list(parts.release_actions)
        self.promotion_gates = list(parts.promotion_gates)
        self.on_promote = list(parts.promote_actions)
        self.member_fields = dict(parts.member_fields)
        self.health = parts.health
        self.health_configured = parts.health_configured
        self.file_report = parts.file_report
        self.server_report = parts.server_report
        self.etcd_alarms = parts.etcd_alarms
        self.role_changes = 0
        self.handovers = 0
        self._unowned = UnownedLeader(etcd, self.election, settings.ttl)
        if view is not None:
            view.bind(self._enforced)  # asked on every session write: no deadline copy

    # -- reading the role ------------------------------------------------------------------

    def status(self) -> Status:
        """The current status, after enforcing the lease deadline."""
        self.enforce_deadline()
        return self._snapshot()

    def _enforced(self) -> Status:
        """:meth:`status` without the lease deadline copied in (role and epoch suffice)."""
        self.enforce_deadline()
        return self._status

    def _snapshot(self) -> Status:
        lease = self._lease
        if self._status.role is Role.PRIMARY and lease is not None:
            return replace(self._status, deadline=lease.deadline - lease.margin)
        return self._status

    def is_primary(self) -> bool:
        return self.status().role is Role.PRIMARY

    async def switchover(self, target: str | None) -> tuple[str, int]:
        """Move the leadership (an operator's request, served on any node)."""
        return await request_move(self.election, self.etcd, self.settings.node_id, target)

    def mark_member_dirty(self) -> None:
        """Publish the members/ record again (a field others judge us by has changed)."""
        self._member_dirty.set()

    def primary_epoch(self) -> int:
        """The epoch to guard a write with; raises NotPrimary unless this node is PRIMARY."""
        status = self._enforced()
        if status.role is not Role.PRIMARY:
            raise NotPrimary(f"this node is {status.role.name}")
        return status.epoch

    def enforce_deadline(self) -> None:
        """Give up the primary role now if the local lease deadline has passed (rule 3)."""
        lease = self._lease
        if self._status.role is Role.PRIMARY and (lease is None or lease.expired()):
            self._set_role(Role.FENCED, "lease deadline passed without an answer from etcd")

    async def watch(self) -> AsyncIterator[Status]:
        """The current status, then every change."""
        queue: asyncio.Queue[Status] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield self.status()
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    # -- changing the role ------------------------------------------------------------------

    def _set_role(self, role: Role, reason: str, *, leader: LeaderInfo | None = None,
                  epoch: int | None = None) -> None:
        old = self._status
        if old.role is Role.PRIMARY and role is not Role.PRIMARY:
            self.release(reason)
        if leader is None and role in (Role.FENCED, Role.STARTING, Role.STOPPING):
            leader = old.leader
        new_epoch = epoch if epoch is not None else (leader.epoch if leader else 0)
        changed = (role, new_epoch, leader) != (old.role, old.epoch, old.leader)
        if not changed:
            return
        since = time.time() if role is not old.role else old.role_since
        self._status = replace(old, role=role, reason=reason, leader=leader, epoch=new_epoch,
                               role_since=since)
        logs.set_status(role=role.name, epoch=new_epoch)
        if role is not old.role:
            self.role_changes += 1
            log.info("role_change", old=old.role.name, new=role.name, reason=reason,
                     leader=leader.node_id if leader else None)
        self._publish()

    def release(self, reason: str) -> None:
        """Run the release actions now: on every move away from PRIMARY, and when the process
        must exit at once (a second signal) so that no resource IP is left behind."""
        for action in self.on_release:
            try:
                action(reason)
            except Exception:  # one failing action must not keep the others from running
                log.exception("release_action_failed", action=getattr(action, "__name__", "?"))

    def _publish(self) -> None:
        self._member_dirty.set()
        self._tell_subscribers()

    def _tell_subscribers(self) -> None:
        snapshot = self._snapshot()
        for queue in self._subscribers:
            queue.put_nowait(snapshot)

    @property
    def paused(self) -> bool:
        """Maintenance mode: nothing moves by itself (sidecar.core.rules)."""
        return self._status.pause is not None

    def _pause_changed(self, pause: PauseRecord | None) -> None:
        self._status = replace(self._status, pause=pause)
        self._tell_subscribers()  # WatchRole shows the pause; the role itself did not change

    # -- the lifecycle ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign and serve until ``stop`` is set, then hand over and return."""
        logs.set_status(node=self.settings.node_id, role=Role.STARTING.name, epoch=0)
        self.release("start-up: nothing may be held before the first election")
        life = asyncio.create_task(self._lifecycle(), name="lifecycle")
        stopped = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait({life, stopped}, return_when=asyncio.FIRST_COMPLETED)
            ended_by_itself = life.done()
        finally:
            stopped.cancel()
            await self._shutdown(life)
        if not ended_by_itself:
            return
        # The lifecycle never ends by itself: only a bug, a fatal configuration error (access
        # denied) or a cancellation by someone else gets here, and the caller must hear of it.
        if life.cancelled():
            raise TaskEnded("lifecycle", "was cancelled")
        life.result()
        raise TaskEnded("lifecycle", "returned")

    async def _shutdown(self, life: asyncio.Task[None]) -> None:
        """Rule 6: stop writes, release the IP (both in _set_role), then revoke the lease."""
        self._set_role(Role.STOPPING, "shutting down")
        life.cancel()
        await asyncio.gather(life, return_exceptions=True)
        lease, self._lease = self._lease, None
        if lease is not None and not lease.expired():
            try:
                await self.election.resign(lease)
            except EtcdError as exc:
                log.warning("resign_failed", error=str(exc),
                            note="the lease expires on its own within its TTL")
            else:
                forget_lease(self.settings.data_dir)

    async def _lifecycle(self) -> None:
        await revoke_previous(self.election, self.settings.data_dir, self.settings.ttl)
        stale: Lease | None = None
        while True:
            lease = await resume(self.election, stale) if stale is not None else None
            if lease is None:
                lease = await acquire_lease(self.election, self._unreachable)
                record_lease(self.settings.data_dir, lease)
                if stale is not None:
                    await revoke_stale(self.election, stale)
            self._lease = lease
            try:
                await supervise(self._lease_tasks(lease))
            except LeaseLost as exc:
                self._set_role(Role.FENCED, f"lease lost: {exc}")
                stale = lease
            except LeaseGone as exc:
                # A call used our lease after etcd had expired it (e.g. a campaign right
                # after an etcd outage): the lease is lost, whatever the keepalive has seen.
                self._set_role(Role.FENCED, f"lease lost: {exc}")
                stale = None
            except EtcdAccessDenied as exc:
                # A configuration problem (user, password, role, certificate): say so once,
                # plainly, and stop; retrying cannot mend it.
                log.error("etcd_access_denied", error=str(exc), note=ACCESS_NOTE)
                raise
            except EtcdError as exc:
                # Anything else etcd refuses in a way retrying did not mend: fence and start
                # over with a new lease rather than end the process.
                self._set_role(Role.FENCED, f"etcd error: {exc}")
                stale = lease
                log.error("etcd_error", error=str(exc), decision="fence, retry")
                await asyncio.sleep(ERROR_PAUSE)  # never spin against a refusing etcd

    def _lease_tasks(self, lease: Lease) -> dict[str, Coroutine[Any, Any, None]]:
        """What runs for the life of one lease; none of it ends while the lease lives."""
        tasks = {"keepalive": self.election.keep_alive(lease),
                 "member": publish_member(self.election, lease, self._member_record,
                                          self._member_dirty, self._members_read),
                 "leadership": self._leadership(lease),
                 "pause": watch_pause(self.etcd, self.election, self._pause_changed)}
        if self.settings.preferred_primary and self.settings.failback:
            tasks["failback"] = ask_for_failback(
                self.election, self.settings.node_id, self.settings.failback_delay,
                self.health_configured, self._failback_state)
        return tasks

    async def _leadership(self, lease: Lease) -> None:
        while True:
            leader, request, revision = await self._read_state()
            if leader is not None and leader.lease == lease.id:
                if leader.overwritten:  # someone wrote over our key while we were fenced
                    await self._step_down(leader.epoch, "our leader key was overwritten")
                    continue
                # Our own key under our live lease: a fence ended before etcd expired it.
                await self._serve(lease, leader, revision)
                continue
            if leader is not None and leader.lease == 0:
                await self._unowned.handle(leader, revision, self._hold)
                continue
            if leader is None:
                held_back = await candidacy.held_back(
                    self.election, self.settings.node_id, request,
                    members=lambda: self._status.members, members_read=self._members_read,
                    health_configured=self.health_configured, health=self.health,
                    paused=lambda: self.paused)
                if held_back is not None:
                    self._set_role(Role.STANDBY, held_back)
                    wait = SWITCHOVER_TTL if request and not self.paused else 0.5
                    await follow(self.etcd, self.election, revision, wait)
                    continue
                result = await retried("campaign", lambda: self.election.campaign(lease),
                                       max_wait=0.5)
                if result.won and result.leader is not None:
                    if request is not None and request.target == self.settings.node_id:
                        await clear_request(self.election)
                    await self._serve(lease, result.leader, result.revision)
                    continue
                leader, revision = result.leader, result.revision
                if leader is None:
                    continue
            self._set_role(Role.STANDBY, _following(leader), leader=leader)
            await follow(self.etcd, self.election, revision)

    async def _read_state(self) -> tuple[LeaderInfo | None, SwitchoverRequest | None, int]:
        return await retried("read leader", self.election.read_leader_and_request,
                             max_wait=0.5)

    async def _read_leader(self) -> tuple[LeaderInfo | None, int]:
        return await retried("read leader", self.election.read_leader, max_wait=0.5)

    async def _serve(self, lease: Lease, leader: LeaderInfo, revision: int) -> None:
        """Hold the leadership until the lease is lost or the key is taken from us."""
        await pass_gates(lease, revision, self.promotion_gates)
        await self.election.guard_takeover(lease, leader)  # etcd-io/etcd#15247, affected etcd
        self._set_role(Role.PRIMARY, "won the election", leader=leader, epoch=leader.epoch)
        for action in self.on_promote:
            try:
                await action()
            except Exception:  # the role stands; the reconciler retries what failed
                log.exception("promote_action_failed")
        try:
            guard = guard_key(self.etcd, self.election, leader.epoch, revision,
                              self._read_leader)
            await supervise({"deadline": watch_deadline(lease, self.enforce_deadline),
                             "key-guard": guard, "handover": self._await_handover(revision)})
        except Tampered as exc:
            # Stop serving first (rule 4), then free the election: the key is still the one
            # created at our epoch, so deleting it is ours to do, as in a handover (rule 6).
            # Whoever wins next does so with a new epoch.
            log.error("leader_key_overwritten", epoch=leader.epoch,
                      decision="step down and delete the key; a new election follows")
            await self._step_down(leader.epoch, str(exc))
        except Deposed as exc:
            self._set_role(Role.STANDBY, str(exc))
        except HandOver as exc:
            await self._hand_over(leader.epoch, exc)

    def _await_handover(self, revision: int) -> Coroutine[Any, Any, None]:
        return await_handover(self.etcd, self.election, self.settings.node_id, revision,
                              read_state=self._read_state, members=lambda: self._status.members,
                              members_read=self._members_read, health=self.health,
                              paused=lambda: self.paused)

    async def _hand_over(self, epoch: int, handover: BaseException) -> None:
        """Rule 6: stop writes and release the IP (in _set_role), then delete the leader key;
        the request in etcd keeps everyone but the target from campaigning."""
        self.handovers += 1
        await self._step_down(epoch, str(handover))

    async def _step_down(self, epoch: int, reason: str) -> None:
        self._set_role(Role.STANDBY, reason)
        try:
            await self.election.step_down(epoch)
        except EtcdError as exc:
            log.warning("step_down_failed", error=str(exc),
                        note="the key goes with our lease if the node stops")

    def _hold(self, reason: str, leader: LeaderInfo) -> None:
        self._set_role(Role.STANDBY, reason, leader=leader)

    def _member_record(self) -> MemberRecord:
        return member_record(self._status, self.settings.published_address, self.member_fields)

    def _unreachable(self, reason: str) -> None:
        self._status = replace(self._status, reason=reason)

    def _members_read(self, members: list[MemberRecord]) -> None:
        self._status = replace(self._status, members=tuple(members))

    def _failback_state(self) -> tuple[rules.FailbackState, bool]:
        """What a failback depends on, and whether the cluster is paused (a resume restarts
        the delay as any other change does)."""
        current = self.member_fields.get("copy_current", lambda: True)()
        return rules.failback_state(self._status, self.health(), current), self.paused


def _following(leader: LeaderInfo) -> str:
    if leader.valid:
        return "following the leader"
    return (f"the leader key holds no leader record ({leader.problem}): counted as held until "
            "its lease ends; nobody campaigns")

