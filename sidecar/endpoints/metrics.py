"""Prometheus metrics, read from the parts at scrape time.

Nothing is instrumented: the parts already keep their own counters (``node.role_changes``,
``Etcd.errors``, ``Writer.writes``, ``VipStats`` ...) and :class:`SidecarCollector` turns them
into metric families when ``/metrics`` is scraped. A scrape therefore always shows the state as it
is, and no other room of the code needs to know that Prometheus exists.

The collector is registered on a private :class:`CollectorRegistry`, never on prometheus-client's
global one, so several sidecars in one process (tests, the local demo) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .. import __version__
from ..core.alarms import KNOWN_TYPES, AlarmMonitor
from ..core.compaction import Compactor
from ..core.node import Node
from ..core.roles import Role
from ..etcd.client import Etcd
from ..etcd.election import Election
from ..etcd.records import GarbageLog
from ..host.health import HealthCheck
from ..host.hooks import HookRunner
from ..host.vsmserver import VsmServerControl
from ..resource.controller import ResourceController
from ..sessions.follower import Follower
from ..sessions.writer import Writer
from ..vsmfile.mirror import FileMirror

PREFIX = "vsm_sidecar_"


def _gauge(name: str, help_text: str, value: float | None) -> GaugeMetricFamily:
    """A gauge with one sample, or none when the value is unknown (better absent than a lie)."""
    family = GaugeMetricFamily(PREFIX + name, help_text)
    if value is not None:
        family.add_metric([], value)
    return family


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, help_text, value=value)


class SidecarCollector:
    """Reads the current values of one sidecar's parts on every scrape.

    ``collect()`` runs on the event loop thread (the HTTP server calls ``generate_latest`` there,
    not in a worker thread) because ``node.status()`` may change the role when the lease deadline
    has passed, and the node is not thread-safe.
    """

    def __init__(
        self,
        node: Node,
        election: Election,
        etcds: Sequence[Etcd],
        follower: Follower,
        writer: Writer,
        resource: ResourceController | None = None,
        hooks: HookRunner | None = None,
        health: HealthCheck | None = None,
        garbage: GarbageLog | None = None,
    ) -> None:
        self.node = node
        self.election = election
        self.etcds = tuple(etcds)
        self.follower = follower
        self.writer = writer
        self.resource = resource
        self.hooks = hooks
        self.health = health
        self.garbage = garbage

    def collect(self) -> Iterator[Metric]:
        yield from self._role()
        yield from self._etcd()
        yield from self._sessions()
        if self.garbage is not None:
            yield self._garbage(self.garbage)
        if self.resource is not None:
            yield from self._resource_ip(self.resource)
        if self.hooks is not None:
            yield _counter("hook_runs", "Role hook runs finished.", self.hooks.runs)
            yield _counter("hook_failures", "Role hook runs that failed.", self.hooks.failures)
            yield _counter("hook_timeouts", "Role hook runs killed at the timeout.",
                           self.hooks.timeouts)
        if self.health is not None:
            healthy = self.health.healthy
            yield _gauge("vsm_server_healthy", "1 when the local VSM server check passes, 0 "
                         "when it fails; absent before the first verdict.",
                         None if healthy is None else float(healthy))
        yield _counter("handovers", "Times this node handed the primary role over.",
                       self.node.handovers)

    def _role(self) -> Iterator[Metric]:
        status = self.node.status()
        info = InfoMetricFamily(PREFIX[:-1], "Identity of this sidecar.")
        info.add_metric([], {"node_id": status.node_id, "cluster": status.cluster,
                             "version": __version__})
        yield info
        role = GaugeMetricFamily(PREFIX + "role", "1 for the role this node has now, 0 for the "
                                 "others.", labels=["role"])
        for candidate in Role:
            role.add_metric([candidate.name], 1.0 if candidate is status.role else 0.0)
        yield role
        yield _gauge("epoch", "Epoch (leader key create revision) of the leader this node "
                     "follows or is; 0 when unknown.", status.epoch)
        yield _counter("role_changes", "Role changes since the process started.",
                       self.node.role_changes)
        yield _gauge("lease_time_left_seconds", "Seconds until the local lease deadline while "
                     "PRIMARY; 0 in any other role.", status.lease_time_left() or 0.0)
        yield _gauge("paused", "1 while the cluster is paused (maintenance mode: nothing "
                     "moves by itself), else 0.", 1.0 if status.pause is not None else 0.0)

    def _etcd(self) -> Iterator[Metric]:
        yield _gauge("keepalive_latency_seconds", "Round-trip time of the last successful "
                     "lease keepalive.", self.election.keepalive_latency)
        yield _counter("etcd_errors", "Failed etcd calls, summed over the control and data "
                       "clients.", sum(etcd.errors for etcd in self.etcds))

    def _sessions(self) -> Iterator[Metric]:
        writer, follower = self.writer, self.follower
        yield _counter("session_writes", "Session record writes (puts and deletes) committed "
                       "by this node.", writer.writes)
        yield _counter("session_write_transactions", "etcd transactions that committed session "
                       "writes (several writes may share one).", writer.transactions)
        yield _gauge("mirror_revision", "etcd revision up to which the local session copy is "
                     "current.", follower.revision)
        yield _gauge("mirror_age_seconds", "Seconds since the local session copy was last "
                     "brought up to date; absent if it never was.", follower.age())
        yield _gauge("mirror_connected", "1 while the session watch on etcd is established.",
                     1.0 if follower.connected else 0.0)
        yield _counter("mirror_garbage_records", "Session records in etcd skipped because they "
                       "could not be decoded.", follower.garbage)
        yield _counter("mirror_resyncs", "Full re-reads of the session records (after a "
                       "compaction or a broken watch).", follower.resyncs)

    def _garbage(self, garbage: GarbageLog) -> Metric:
        family = CounterMetricFamily(
            PREFIX + "etcd_garbage", "Values under the cluster prefix in etcd that could not be "
            "used (not written by a sidecar, or corrupt), by key: each distinct value once.",
            labels=["key"])
        for kind, count in garbage.counts.items():
            family.add_metric([kind], count)
        family.add_metric(["session"], self.follower.garbage)
        return family

    def _resource_ip(self, resource: ResourceController) -> Iterator[Metric]:
        # view() reads the interface's addresses over netlink: one short, local, synchronous
        # call, and it reports "not held" rather than raise when the interface is gone.
        _, held, _ = resource.view()
        stats = resource.ip.stats
        yield _gauge("resource_ip_held", "1 while every configured resource IP is on the "
                     "interface.", 1.0 if held else 0.0)
        yield _counter("resource_ip_announcements_sent", "Gratuitous ARP / unsolicited NA "
                       "frames sent.", stats.announcements_sent)
        yield _counter("resource_ip_stale_holders_seen", "Other hosts found answering for the "
                       "resource IP when it was claimed.", stats.stale_holders_seen)
        yield _counter("resource_ip_repairs", "Times the reconciler put back a missing "
                       "address or removed one this node must not hold.", stats.repairs)


class ThinLincCollector:
    """The sessions file's mirror and the VSM server run in on-primary mode."""

    def __init__(self, mirror: FileMirror | None, server: VsmServerControl | None) -> None:
        self.mirror = mirror
        self.server = server

    def collect(self) -> Iterator[Metric]:
        if self.mirror is not None:
            yield _gauge("sessions_file_behind_seconds", "Seconds the etcd copy of the sessions "
                         "file has lagged behind the primary's file because uploads fail; 0 "
                         "when current (and on a standby).", self.mirror.behind_seconds())
            yield _counter("sessions_file_uploads", "Sessions file versions uploaded to etcd.",
                           self.mirror.uploads)
            yield _counter("sessions_file_upload_failures", "Sessions file uploads that "
                           "failed (retried).", self.mirror.upload_failures)
            yield _counter("sessions_file_downloads", "Times etcd's copy was written to the "
                           "local sessions file.", self.mirror.downloads)
        if self.server is not None:
            report = self.server.report()
            yield _gauge("vsm_server_running", "1 while the VSM server this sidecar started "
                         "runs (on-primary mode).", 1.0 if report.state == "running" else 0.0)
            yield _counter("vsm_server_start_failures", "VSM server starts that failed or timed "
                           "out.", report.start_failures)
            yield _counter("vsm_server_stop_failures", "VSM server stops that failed or timed "
                           "out.", report.stop_failures)


class EtcdCareCollector:
    """etcd's alarms as this node reads them, and the primary's compactions."""

    def __init__(self, alarms: AlarmMonitor, compactor: Compactor | None) -> None:
        self.alarms = alarms
        self.compactor = compactor

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(PREFIX + "etcd_alarm", "1 while etcd has an alarm of this "
                                   "type active (it refuses writes), 0 otherwise.",
                                   labels=["type"])
        active = self.alarms.active()
        for kind in sorted({*KNOWN_TYPES, *active}):
            family.add_metric([kind], 1.0 if kind in active else 0.0)
        yield family
        compactor = self.compactor
        if compactor is None:
            return
        yield _counter("etcd_compactions", "etcd history compactions done by this node (as "
                       "primary).", compactor.compactions)
        yield _counter("etcd_compaction_failures", "etcd history compactions that failed "
                       "(tried again).", compactor.failures)
        yield _gauge("etcd_compacted_revision", "The revision this node last compacted etcd's "
                     "history to; 0 before the first.", compactor.compacted_revision)
        db = compactor.db
        yield _gauge("etcd_db_size_bytes", "Size of etcd's database file (what its quota "
                     "counts), as the primary last read it.", db.db_size if db else None)
        yield _gauge("etcd_db_size_in_use_bytes", "Bytes of etcd's database file that hold "
                     "data, as the primary last read it.", db.db_size_in_use if db else None)


def create_registry(collector: SidecarCollector, *, process: bool = True) -> CollectorRegistry:
    """A private registry with ``collector`` (and the standard process_* metrics)."""
    registry = CollectorRegistry()
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry
