"""One etcd process of a local cluster (:mod:`sidecar.lab.localcluster`), with fault helpers
(kill, pause, resume, restart) that act on the real process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import etcd3
from etcd3 import etcdrpc

from .etcderrors import EtcdClusterError, EtcdMemberUnavailable, rpc_reason
from .tlsfiles import TlsFiles

_PROBE_TIMEOUT_S = 1.0
_TERM_GRACE_S = 5.0
# SIGKILL cannot be caught; a process that outlives this is stuck in the kernel, and saying so
# beats hanging the test run.
_REAP_TIMEOUT_S = 10.0
_PORT_TAKEN_MARK = "address already in use"


def url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://{netloc_host(host)}:{port}"


def netloc_host(host: str) -> str:
    # gRPC targets and URLs need IPv6 literals in brackets.
    return f"[{host}]" if ":" in host else host


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
class Launch:
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
        self, name: str, host: str, client_port: int, peer_port: int, workdir: Path, launch: Launch
    ) -> None:
        self.name = name
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.client_url = url(host, client_port, "https" if launch.tls else "http")
        self.peer_url = url(host, peer_port)
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
                f"{self.name} ({self.client_url}) did not answer: {rpc_reason(exc)}"
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
            netloc_host(self.host), self.client_port, secure=tls is not None,
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
