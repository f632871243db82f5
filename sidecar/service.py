"""Start-up, run, shut down: one sidecar process in a straight line.

Signals only set an event. The first SIGTERM or SIGINT starts a handover (rule 6) and the
process exits 0 when it is done; a second one exits at once, after the release actions (which
are synchronous and fast) so that even then no resource IP is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from . import logs
from .api import session_pb2_grpc
from .config import ConfigError, Settings
from .core.alarms import AlarmMonitor
from .core.collaborators import HealthView, NodeParts, PromotionGate, no_verdict
from .core.compaction import Compactor
from .core.node import Node
from .core.reports import ON_PRIMARY, ServerReport
from .core.roles import RoleView
from .endpoints.grpc_role import GrpcServer
from .endpoints.grpc_sessions import SERVICE_NAME as SESSION_SERVICE
from .endpoints.grpc_sessions import SessionServicer
from .endpoints.http_api import HttpServer
from .endpoints.metrics import (
    EtcdCareCollector,
    SidecarCollector,
    ThinLincCollector,
    create_registry,
)
from .etcd.client import Etcd
from .etcd.errors import EtcdError
from .etcd.keys import Keys
from .host import datalock, preflight
from .host.checkhost import watch_etcd_version
from .host.health import HealthCheck
from .host.hooks import HookRunner
from .host.systemd import Notifier
from .host.targets import parse_target
from .host.vsmserver import VsmServerControl
from .resource.controller import ResourceController
from .sessions.follower import Follower
from .sessions.store import SessionStore, StoreError
from .sessions.writer import Writer
from .vsmfile.mirror import FileMirror

log = structlog.get_logger(__name__)

EXIT_FORCED = 130
EXIT_FAILED = 1
SHUTDOWN_GRACE = 1.0
# After a part failed, the process must be gone within about a second: a short grace for the
# API, and a bound on the handover (rule 6) that then still runs.
FAILED_GRACE = 0.1
FAILED_HANDOVER = 0.6
# Session data calls (range reads of many records, grouped writes) get their own client and
# threads, so that they can never delay a keepalive on the control client.
DATA_TIMEOUT = 5.0


def _checked_health(check: HealthCheck) -> HealthView:
    return lambda: check.healthy


def _member_health(check: HealthCheck) -> Callable[[], str]:
    return lambda: ("unknown" if check.healthy is None else
                    "healthy" if check.healthy else "unhealthy")


def _health_check(settings: Settings) -> HealthCheck | None:
    if settings.health_check is None:
        return None
    return HealthCheck(parse_target(settings.health_check), settings.health_interval,
                       settings.health_timeout, settings.health_rise, settings.health_fall)


class Service:
    """The parts of one sidecar, wired together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        logs.set_status(node=settings.node_id, role="STARTING", epoch=0)
        self.etcd = Etcd(settings, name="etcd-control")
        self.data_etcd = Etcd(settings, timeout=DATA_TIMEOUT, name="etcd-data")
        # The writers and the resource IP ask for the role, and the node takes them as its
        # collaborators: they are built first, with this view, which the node binds.
        self.role = RoleView()
        keys = Keys(settings.prefix)
        self.store = SessionStore(settings.data_dir)
        self.follower = Follower(self.data_etcd, keys, self.store)
        self.writer = Writer(self.data_etcd, keys, self.role.primary_epoch)
        self.vsm_server: VsmServerControl | None = None
        self.file_mirror = self._file_mirror(keys)
        self.resource = ResourceController(settings, self.role.is_primary) if settings.vip \
            else None
        self.health = _health_check(settings)
        self.alarms = AlarmMonitor(self.etcd, [self.etcd, self.data_etcd])
        self.compactor = Compactor(self.etcd, settings, self.role.is_primary) \
            if settings.compaction_interval else None
        self.node = Node(settings, self.etcd, parts=self._node_parts(), view=self.role)
        self.vsm_server = self._vsm_server()
        if self.health is not None:
            self.health.on_change.append(lambda healthy, reason: self.node.mark_member_dirty())
        self.hooks = HookRunner(settings.on_role_change, settings.hook_timeout,
                                settings.node_id) if settings.on_role_change is not None else None
        self.grpc = self._grpc()
        self.http = self._http()
        self.systemd = Notifier()
        self.stop = asyncio.Event()

    def _file_mirror(self, keys: Keys) -> FileMirror | None:
        settings = self.settings
        if settings.vsm_sessions_file is None:
            return None
        # The VSM server is built after the node (it watches the node's role): bound late,
        # asked only once the mirror runs.
        return FileMirror(
            self.data_etcd, keys, settings.vsm_sessions_file, self.role.primary_epoch,
            mode=settings.vsm_server_mode, interval=settings.vsm_file_check_interval,
            may_write=lambda: self.vsm_server.may_write_file() if self.vsm_server else None)

    def _vsm_server(self) -> VsmServerControl | None:
        settings = self.settings
        if settings.vsm_server_mode != ON_PRIMARY:
            return None
        server = VsmServerControl(self.node, settings.vsm_server_start,
                                  settings.vsm_server_stop, settings.vsm_server_timeout)
        if self.file_mirror is not None:
            server.on_stopped.append(self.file_mirror.sync)
        return server

    # The node's view of the VSM server. These are bound late: the server control needs the
    # node (it watches its role), so it is built just after it, and the node asks these only
    # once it runs.
    def _vsm(self) -> VsmServerControl:
        assert self.vsm_server is not None, "asked before the VSM server control was built"
        return self.vsm_server

    def _vsm_healthy(self) -> bool | None:
        return self._vsm().healthy()

    def _vsm_member_health(self) -> str:
        return self._vsm().member_health()

    def _vsm_report(self) -> ServerReport:
        return self._vsm().report()

    def _node_parts(self) -> NodeParts:
        """The node's collaborators (see sidecar.core.collaborators)."""
        settings, follower, mirror = self.settings, self.follower, self.file_mirror
        gates: list[PromotionGate] = [follower.wait_current]
        # Others judge us as a handover target by these (sidecar.core.rules.ineligibility).
        fields: dict[str, Callable[[], object]] = {
            "copy_current": lambda: follower.connected,
            "preferred_primary": lambda: settings.preferred_primary,
            # Shown by `status --all` (not judged by the rules).
            "applied_revision": lambda: follower.revision}
        health: HealthView = no_verdict
        server_report = None
        if settings.vsm_server_mode == ON_PRIMARY:
            # A failed start makes the node unhealthy: it hands over when it can.
            health, server_report = self._vsm_healthy, self._vsm_report
            fields["health"] = self._vsm_member_health
        if mirror is not None:
            # The file is current before the role turns PRIMARY, so before the VSM server
            # (or a hook) starts on it.
            gates.append(mirror.gate)
            # check-host reads it from etcd: whether this node's copy is behind, since when.
            fields["sessions_file"] = lambda: mirror.report().summary()
            # No failback or switchover to a node whose VSM server would start on an old file.
            fields["copy_current"] = lambda: follower.connected and mirror.current()
        if self.health is not None:
            health = _checked_health(self.health)
            fields["health"] = _member_health(self.health)
        resource = self.resource
        if resource is not None:
            fields["resource_ip_held"] = lambda: resource.view()[1]
        return NodeParts(
            promotion_gates=gates, member_fields=fields, health=health,
            health_configured=self.health is not None,
            release_actions=[resource.release] if resource else [],
            promote_actions=[resource.claim] if resource else [],
            file_report=mirror.report if mirror else None, server_report=server_report,
            etcd_alarms=self.alarms.active)

    def _grpc(self) -> GrpcServer:
        grpc = GrpcServer(self.node, self.settings.grpc_listen,
                          self.resource.view if self.resource else None)
        grpc.add_servicer(
            SESSION_SERVICE, SessionServicer(self.node, self.follower, self.writer),
            session_pb2_grpc.add_SessionServiceServicer_to_server)
        return grpc

    def _http(self) -> HttpServer | None:
        if not self.settings.http_listen:
            return None
        collector = SidecarCollector(self.node, self.node.election,
                                     [self.etcd, self.data_etcd], self.follower,
                                     self.writer, self.resource, self.hooks,
                                     self.health, self.node.election.garbage)
        registry = create_registry(collector)
        registry.register(ThinLincCollector(self.file_mirror, self.vsm_server))
        registry.register(EtcdCareCollector(self.alarms, self.compactor))
        return HttpServer(self.node, registry, self.settings.http_listen)

    def _on_signal(self, signum: int) -> None:
        if not self.stop.is_set():
            log.info("signal", signal=signal.Signals(signum).name, decision="hand over and exit")
            self.stop.set()
            return
        log.warning("signal", signal=signal.Signals(signum).name, decision="exit at once")
        self.node.release("second signal: exit at once")
        os._exit(EXIT_FORCED)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        await self._start()
        background = [asyncio.create_task(coro, name=name)
                      for name, coro in self._background().items()]
        node = asyncio.create_task(self.node.run(self.stop), name="node")
        failed = False
        try:
            failed = await self._supervise(node, background)
        finally:
            await self._stop(failed, [node, *background])
        log.info("stopped", exit_code=EXIT_FAILED if failed else 0)
        fatal = None if node.cancelled() else node.exception()
        if isinstance(fatal, EtcdError):
            raise fatal  # a refusal retrying cannot mend (access denied): the CLI says which
        return EXIT_FAILED if failed else 0

    def _background(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The tasks that run beside the node for the life of the process, by name."""
        tasks: dict[str, Coroutine[Any, Any, None]] = {
            "follower": self.follower.run(), "writer": self.writer.run()}
        if self.resource is not None:
            tasks["reconcile"] = self.resource.reconcile()
        if self.file_mirror is not None:
            tasks["file-mirror"] = self.file_mirror.run()
        if self.vsm_server is not None:
            tasks["vsm-server"] = self.vsm_server.run()
        tasks["etcd-version"] = watch_etcd_version(self.etcd)
        tasks["etcd-alarms"] = self.alarms.run()
        if self.compactor is not None:
            tasks["compaction"] = self.compactor.run()
        if self.hooks is not None:
            tasks["hooks"] = self.hooks.run()
            tasks["hook-feed"] = self.hooks.follow(self.node)
        if self.health is not None:
            tasks["health"] = self.health.run()
        if self.systemd.enabled:
            tasks["sd-watchdog"] = self.systemd.watchdog()
            tasks["sd-status"] = self._report_to_systemd()
        return tasks

    async def _stop(self, failed: bool, tasks: list[asyncio.Task[None]]) -> None:
        """Stop serving, end every task, close what was opened (the IP released last)."""
        self.systemd.send(stopping="1", status="stopping: handing over")
        await self.grpc.stop(FAILED_GRACE if failed else SHUTDOWN_GRACE)
        if self.http is not None:
            await self.http.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()
        if self.resource is not None:
            self.resource.release("stopped")
            self.resource.close()
        self.etcd.close()
        self.data_etcd.close()

    async def _supervise(self, node: asyncio.Task[None],
                         background: list[asyncio.Task[None]]) -> bool:
        """Until the node has handed over after a stop; True when anything ended on its own.

        Every task here runs for the life of the process. One that ends by itself (an error, a
        return, a cancellation by someone else) is a bug: the process stops serving health at
        once, hands over and exits non-zero, rather than go on half alive (a dead follower
        blocks every promotion; a dead leadership loop never takes over)."""
        done, _ = await asyncio.wait({node, *background}, return_when=asyncio.FIRST_COMPLETED)
        failures = [task for task in done if task is not node or not self.stop.is_set()]
        for task in failures:
            error = None if task.cancelled() else task.exception()
            log.error("component_failed", component=task.get_name(),
                      error="cancelled" if task.cancelled() else repr(error),
                      decision="stop serving, hand over and exit")
        if failures:
            await self.grpc.stop_serving_health()
            self.stop.set()
        if not node.done():
            try:
                async with asyncio.timeout(FAILED_HANDOVER if failures else None):
                    await asyncio.wait({node})
            except TimeoutError:
                log.error("handover_timed_out", decision="exit; the lease ends within its TTL")
        return bool(failures) or (node.done() and not node.cancelled()
                                  and node.exception() is not None)

    async def _start(self) -> None:
        """Everything before the first etcd call. A problem is a ConfigError, and what was
        started is stopped again, so that the error is the only line the process prints (a
        gRPC server left running would complain from its finaliser once the loop is closed)."""
        preflight.check_listen("grpc_listen", self.settings.grpc_listen)
        if self.settings.http_listen:
            preflight.check_listen("http_listen", self.settings.http_listen)
        try:
            if self.resource is not None:
                self.resource.open()
            await self._open_store()
            try:
                await self.grpc.start()
            except (OSError, RuntimeError) as exc:  # taken since the check: a race
                raise ConfigError("grpc_listen", f"cannot listen on "
                                                 f"{self.settings.grpc_listen}: {exc}") from None
            if self.http is not None:
                try:
                    await self.http.start()
                except OSError as exc:
                    raise ConfigError("http_listen", f"cannot listen on "
                                                     f"{self.settings.http_listen}: "
                                                     f"{exc.strerror or exc}") from None
        except BaseException:
            await self.grpc.stop(0)
            if self.http is not None:
                await self.http.stop()
            self.store.close()
            if self.resource is not None:
                self.resource.close()
            raise

    async def _report_to_systemd(self) -> None:
        """READY once the API serves; then one STATUS line per role change."""
        ready = False
        async for status in self.node.watch():
            leader = status.leader.node_id if status.leader else "-"
            line = f"{status.role.name} epoch {status.epoch}, leader {leader}: {status.reason}"
            if ready:
                self.systemd.send(status=line)
            else:
                self.systemd.send(ready="1", status=line)
                ready = True

    async def _open_store(self) -> None:
        try:
            report = await asyncio.to_thread(self.store.load)
        except (OSError, StoreError) as exc:
            raise ConfigError("data_dir", f"cannot use {self.settings.data_dir}: {exc}") from None
        log.info("session_copy_loaded", revision=self.store.applied_revision,
                 records=report.records, quarantined=[str(p) for p in report.quarantined])


# glibc's mallopt parameter M_ARENA_MAX, and the arenas the sidecar allows itself.
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=2 would; glibc only, else nothing).

    glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core,
    and keeps what they freed: with the etcd worker threads and gRPC's own that is ~7 MB more
    resident memory for nothing, since the sidecar's threads mostly wait on the network.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)


async def run(settings: Settings) -> int:
    limit_malloc_arenas()
    try:
        lock = datalock.acquire(settings.data_dir)
    except datalock.DataDirInUse as exc:
        raise ConfigError("data_dir", str(exc)) from None
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot use {settings.data_dir}: "
                                      f"{exc.strerror or exc}") from None
    try:  # held until the process ends: one sidecar per copy of the session records
        return await Service(settings).serve()
    finally:
        lock.release()
