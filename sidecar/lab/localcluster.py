"""A real, local etcd cluster: for the test suite, the benchmarks, the demo and the network lab.

Each member is an ordinary ``etcd`` process with its own data directory and log file inside one
work directory. Ports are chosen free at start (never fixed), so several clusters can run side
by side. Fault helpers (kill, pause, resume, restart) act on the real processes, because a test
that claims failover works must survive a real member loss, not a mock of one. One member is a
:class:`~sidecar.lab.etcdmember.EtcdMember`; TLS for the client URLs is
:class:`~sidecar.lab.tlsfiles.TlsFiles`; free ports come from :mod:`sidecar.lab.ports`.

Typical use::

    with LocalEtcdCluster() as cluster:
        with cluster.client() as etcd:
            etcd.put("/k", "v")
        cluster.leader().kill()
        cluster.leader()  # a different member, once the others have voted
"""

from __future__ import annotations

import atexit
import concurrent.futures
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import etcd3
import structlog

from .etcdauth import add_prefix_user, enable_root
from .etcdbinary import find_etcd_binary
from .etcderrors import EtcdClusterError, EtcdMemberUnavailable, EtcdStartError, rpc_reason
from .etcdhealth import describe, health_problem, status_or_error
from .etcdmember import EtcdMember, Launch, MemberStatus, netloc_host, url
from .ports import free_ports
from .tlsfiles import TlsFiles

log = structlog.get_logger(__name__)

_START_ATTEMPTS = 3
_POLL_INTERVAL_S = 0.1
_COMPACTED_MARK = "required revision has been compacted"


class _PortTaken(EtcdStartError):
    """A member lost one of its ports to another process between choice and bind."""


# Clusters not yet closed; the atexit hook closes them so no etcd outlives the interpreter.
_OPEN_CLUSTERS: set[LocalEtcdCluster] = set()


class LocalEtcdCluster:
    """A local etcd cluster of ``size`` members on ``host``, each on free ports."""

    def __init__(
        self,
        size: int = 3,
        host: str = "127.0.0.1",
        workdir: Path | None = None,
        command_prefix: Sequence[str] = (),
        heartbeat_ms: int | None = None,
        election_ms: int | None = None,
        extra_args: Sequence[str] = (),
        keep: bool = False,
        tls: TlsFiles | None = None,
        binary: Path | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        if heartbeat_ms is not None and election_ms is not None and election_ms < 5 * heartbeat_ms:
            # etcd itself refuses this, but only after the processes were started.
            raise ValueError("election_ms must be at least 5 * heartbeat_ms")
        self.size = size
        self.host = host
        self.command_prefix = tuple(command_prefix)
        self.keep = keep
        self.tls = tls
        self.binary = binary  # the etcd executable; None: find_etcd_binary() at start
        # (user, password) the cluster's own clients use once enable_auth() ran.
        self._root: tuple[str, str] | None = None
        self._member_args = _timing_args(heartbeat_ms, election_ms) + tuple(extra_args)
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="vsm-etcd-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._members: list[EtcdMember] = []
        self._closed = False
        _OPEN_CLUSTERS.add(self)

    def __repr__(self) -> str:
        return f"LocalEtcdCluster({self.endpoints_arg or 'not started'}, workdir={self.workdir})"

    def __enter__(self) -> Self:
        if not self._members:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def members(self) -> list[EtcdMember]:
        return list(self._members)

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of all members, e.g. ``http://127.0.0.1:23791`` (``https://`` with
        TLS); empty before start."""
        return [member.client_url for member in self._members]

    @property
    def endpoints_arg(self) -> str:
        """The endpoints comma-joined, as ``--endpoints`` of etcdctl and the sidecar take them."""
        return ",".join(self.endpoints)

    def start(self, timeout: float = 30.0) -> None:
        """Start every member and wait until all answer and agree on a leader.

        A port taken by someone else between choice and bind makes the whole start happen
        again on new ports, a couple of times. Any other failure raises with the member logs.
        """
        if self._closed:
            raise EtcdClusterError("this cluster is closed; make a new one")
        if self._members:
            raise EtcdClusterError(
                "this cluster was started before (maybe in vain); make a new one"
            )
        binary = self.binary or find_etcd_binary()
        deadline = time.monotonic() + timeout
        for attempt in range(1, _START_ATTEMPTS + 1):
            # Assigned before any process starts, so close() finds them after a partial start.
            self._members = self._plan_members(binary)
            try:
                self._start_members(deadline)
                return
            except _PortTaken:
                if attempt == _START_ATTEMPTS:
                    self._kill_members()
                    raise
                self._remove_members()
                log.info("etcd port taken at start, retrying on new ports", attempt=attempt)
            except BaseException:
                # Keep the members (and their logs) for the caller's close(), but not running.
                self._kill_members()
                raise

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running, unpaused member answers and all agree on one leader."""
        self._wait_healthy(time.monotonic() + timeout, starting=False)

    def leader(self, timeout: float = 10.0) -> EtcdMember:
        """The member that is raft leader now, waiting up to ``timeout`` for one to exist."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = self._statuses()
            claims = [
                (s, m) for m, s in statuses.items() if isinstance(s, MemberStatus) and s.is_leader
            ]
            if claims:
                # A leader cut off from the others may still believe it leads; the newest term wins.
                return max(claims, key=lambda claim: claim[0].raft_term)[1]
            if time.monotonic() >= deadline:
                raise EtcdClusterError(f"no leader within {timeout} s: {describe(statuses)}")
            time.sleep(_POLL_INTERVAL_S)

    def client(
        self, timeout: float = 5.0, time_retry: float = 1.0, **kwargs: Any
    ) -> etcd3.MultiEndpointEtcd3Client:
        """A ``MultiEndpointEtcd3Client`` on all endpoints with failover; close it after use.

        With failover a call to a dead member still fails once (the client marks that endpoint
        failed); the caller's retry then goes to another member. ``time_retry`` is how long a
        failed endpoint is shunned: etcd3's default of 300 s would outlast a restarted member.
        Other keyword arguments (user, password) go to the client; without them, once
        :meth:`enable_auth` ran, it authenticates as root. With TLS it presents the cluster's
        client certificate, if it has one.
        """
        creds = self.tls.channel_credentials() if self.tls is not None else None
        endpoints = [
            etcd3.Endpoint(
                netloc_host(m.host), m.client_port, secure=self.tls is not None, creds=creds,
                time_retry=time_retry,
            )
            for m in self._members
        ]
        if self._root is not None and "user" not in kwargs and "password" not in kwargs:
            kwargs = {**kwargs, "user": self._root[0], "password": self._root[1]}
        return etcd3.MultiEndpointEtcd3Client(
            endpoints=endpoints, timeout=timeout, failover=True, **kwargs
        )

    # -- authentication -------------------------------------------------------------------------

    def enable_auth(self, root_password: str) -> None:
        """Create user root with role root and turn etcd's authentication on.

        From then on the cluster's own clients (probes, :meth:`client`, :meth:`compact`)
        authenticate as root.
        """
        with self.client() as etcd:
            enable_root(etcd, root_password)
        self._root = ("root", root_password)
        for member in self._members:
            member.credentials = self._root

    def add_user(self, name: str, password: str, prefix: str | None) -> None:
        """Create user ``name`` with its own role (also ``name``) that may read and write the
        keys under ``prefix`` and nothing else; with ``prefix`` None the role grants nothing.
        """
        with self.client() as etcd:
            add_prefix_user(etcd, name, password, prefix)

    def compact(self, revision: int | None = None) -> int:
        """Compact history up to ``revision`` (default: the current one) and return it.

        Compacting to a revision that is already compacted counts as done.
        """
        with self.leader().client() as etcd:
            target = revision if revision is not None else _current_revision(etcd)
            try:
                # physical: return only once the member has dropped the history, so a caller
                # that reads old revisions next sees them gone.
                etcd.compact(target, physical=True)
            except Exception as exc:  # grpc's error type cannot be named; see EtcdMember.status()
                if _COMPACTED_MARK not in rpc_reason(exc):
                    raise
        return target

    def logs_tail(self, lines: int = 40) -> str:
        """The last lines of every member's log, each under a header naming the member."""
        return "\n".join(
            f"=== {m.name} {m.client_url} ({m.log_path}) ===\n{m.log_tail(lines)}"
            for m in self._members
        )

    def close(self) -> None:
        """Kill every member, wait for them, and remove the work dir (unless ``keep``).

        Idempotent; safe after a failed or partial start; already dead members are fine.
        """
        if self._closed:
            return
        self._closed = True
        _OPEN_CLUSTERS.discard(self)
        try:
            self._kill_members()
        finally:
            self._remove_workdir()

    # -- start-up -------------------------------------------------------------------------------

    def _plan_members(self, binary: Path) -> list[EtcdMember]:
        ports = self._pick_ports(2 * self.size)
        names = [f"etcd{i}" for i in range(1, self.size + 1)]
        client_ports, peer_ports = ports[: self.size], ports[self.size :]
        launch = Launch(
            binary=binary,
            command_prefix=self.command_prefix,
            initial_cluster=",".join(
                f"{name}={url(self.host, port)}"
                for name, port in zip(names, peer_ports, strict=True)
            ),
            # Unique per start, so members of another cluster can never be mistaken for ours.
            token=f"vsm-{uuid.uuid4().hex[:12]}",
            extra_args=self._member_args,
            tls=self.tls,
        )
        members = [
            EtcdMember(name, self.host, client, peer, self.workdir, launch)
            for name, client, peer in zip(names, client_ports, peer_ports, strict=True)
        ]
        for member in members:
            member.credentials = self._root
        return members

    def _pick_ports(self, count: int) -> list[int]:
        if not self.command_prefix:
            return free_ports(count, self.host)
        # Members may run in another network namespace, where ``host`` exists and ports are
        # free or not independently of ours: ask there, through the same prefix.
        script = (
            "import sys; from sidecar.lab.ports import free_ports; "
            "print(*free_ports(int(sys.argv[1]), sys.argv[2]))"
        )
        command = [*self.command_prefix, sys.executable, "-c", script, str(count), self.host]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            raise EtcdStartError(f"cannot pick ports via {command}: {result.stderr.strip()}")
        return [int(port) for port in result.stdout.split()]

    def _start_members(self, deadline: float) -> None:
        # Data left by an earlier attempt belongs to other ports and another token.
        self._remove_member_files()
        for member in self._members:
            member.start()
        self._wait_healthy(deadline, starting=True)

    def _raise_if_member_exited(self) -> None:
        exited = [m for m in self._members if not m.running]
        if not exited:
            return
        if any(m.exited_for_port() for m in exited):
            raise _PortTaken(f"a port was taken:\n{self.logs_tail()}")
        names = ", ".join(m.name for m in exited)
        raise EtcdStartError(f"etcd member(s) {names} exited at start:\n{self.logs_tail()}")

    # -- health ---------------------------------------------------------------------------------

    def _wait_healthy(self, deadline: float, *, starting: bool) -> None:
        while True:
            if starting:
                self._raise_if_member_exited()
            statuses = self._statuses()
            problem = health_problem(statuses)
            if problem is None:
                return
            if time.monotonic() >= deadline:
                logs = f"\n{self.logs_tail()}" if starting else ""
                raise EtcdClusterError(f"etcd cluster not healthy: {problem}{logs}")
            time.sleep(_POLL_INTERVAL_S)

    def _statuses(self) -> dict[EtcdMember, MemberStatus | EtcdMemberUnavailable]:
        """Status of every running, unpaused member, asked in parallel.

        In parallel because a member that has not finished joining accepts the connection but
        does not answer until the probe times out; one at a time, each round would take seconds.
        """
        live = [m for m in self._members if m.running and not m.stopped]
        if not live:
            return {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(live)) as pool:
            futures = {m: pool.submit(status_or_error, m) for m in live}
            return {m: future.result() for m, future in futures.items()}

    # -- shutdown -------------------------------------------------------------------------------

    def _kill_members(self) -> None:
        for member in self._members:
            member.cont()
        errors: list[Exception] = []
        for member in self._members:
            try:
                member.kill()
            except subprocess.TimeoutExpired as exc:
                errors.append(exc)
        if errors:
            raise EtcdClusterError(f"etcd member(s) did not die: {errors}")

    def _remove_members(self) -> None:
        self._kill_members()
        self._remove_member_files()
        self._members = []

    def _remove_member_files(self) -> None:
        for member in self._members:
            shutil.rmtree(member.data_dir, ignore_errors=True)

    def _remove_workdir(self) -> None:
        if self.keep:
            return
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        # The caller's directory may hold other things: remove only what the members made.
        for member in self._members:
            shutil.rmtree(member.data_dir, ignore_errors=True)
            member.log_path.unlink(missing_ok=True)


def _timing_args(heartbeat_ms: int | None, election_ms: int | None) -> tuple[str, ...]:
    args: list[str] = []
    if heartbeat_ms is not None:
        args.append(f"--heartbeat-interval={heartbeat_ms}")
    if election_ms is not None:
        args.append(f"--election-timeout={election_ms}")
    return tuple(args)


def _current_revision(etcd: Any) -> int:
    # Any linearizable read carries the store's current revision in its header.
    return int(etcd.get_response(b"\0").header.revision)


@atexit.register
def _close_open_clusters() -> None:
    for cluster in list(_OPEN_CLUSTERS):
        cluster.close()
