"""A sidecar as a real subprocess, for the demo, the benchmarks and the tests.

:class:`LocalSidecar` starts ``python -m sidecar run`` on a free port, and can kill, stop,
continue and terminate it. :class:`RoleRecorder` follows a sidecar's ``WatchRole`` stream in a
thread and keeps every status it reports with the monotonic time it arrived, so a caller can
wait for a role and measure when it came, to the millisecond, without polling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .. import client
from .ports import free_ports


@dataclass(frozen=True)
class Observation:
    at: float  # time.monotonic() when the status arrived
    status: dict[str, Any]

    @property
    def role(self) -> str:
        return client.role_name(self.status)


class LocalSidecar:
    """One ``vsm-sidecar run`` subprocess."""

    def __init__(self, node_id: str, cluster: str, endpoints: str, workdir: Path, *,
                 ttl: int = 2, host: str = "127.0.0.1", extra_args: Sequence[str] = (),
                 command_prefix: Sequence[str] = (), env: dict[str, str] | None = None,
                 unix_socket: bool = False, python: str = sys.executable) -> None:
        self.node_id = node_id
        self.python = python  # another user may not be able to run this process's own
        self.cluster = cluster
        self.endpoints = endpoints
        self.ttl = ttl
        self.host = host
        # A Unix socket is reachable from any network namespace: the way to talk to a
        # sidecar that runs inside one.
        self.unix_socket = workdir / f"grpc-{node_id}.sock" if unix_socket else None
        # The socket where changes are allowed (grpc_socket): writes and Switchover go there.
        self.control_socket = workdir / f"ctl-{node_id}.sock"
        # Both in one call: two calls may be handed the same port, and the sidecar would then
        # fail to start on its own HTTP port.
        self.port, self.http_port = (0, 0) if unix_socket else free_ports(2, host)
        self.extra_args = list(extra_args)
        self.command_prefix = list(command_prefix)
        self.env = env
        self.log_path = workdir / f"sidecar-{node_id}.log"
        self.data_dir = workdir / f"data-{node_id}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        return f"{self.host}:{self.port}"

    @property
    def control_address(self) -> str:
        """The address for calls that change something (open to root and our own user)."""
        return f"unix:{self.control_socket}"

    def command(self, subcommand: str = "run") -> list[str]:
        """``vsm-sidecar run`` as this node runs it; another subcommand (``release``) gets the
        very same settings, as the systemd unit's ExecStopPost does."""
        return [*self.command_prefix, self.python, "-m", "sidecar", subcommand,
                "--node-id", self.node_id, "--cluster", self.cluster,
                "--etcd-endpoints", self.endpoints, "--ttl", str(self.ttl),
                "--grpc-listen", self.address, "--grpc-socket", str(self.control_socket),
                "--log-format", "json",
                "--data-dir", str(self.data_dir),
                "--http-listen", f"{self.host}:{self.http_port}" if self.http_port else "",
                # A test's etcd is often shared by the whole run, and a compaction is
                # cluster-wide: no lab sidecar compacts unless its extra_args say so (the last
                # flag wins).
                "--compaction-interval", "0",
                *self.extra_args]

    def start(self, wait: bool = True, timeout: float = 15.0) -> LocalSidecar:
        env = {**os.environ, **(self.env or {})}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env,
                                            start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the gRPC API answers."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"sidecar {self.node_id} exited with "
                                   f"{self.process.returncode}:\n{self.log_tail()}")
            try:
                client.get_role(self.address, timeout=0.5)
                return
            except client.Unreachable:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sidecar {self.node_id} did not answer:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.05)

    def role(self, timeout: float = 2.0) -> dict[str, Any]:
        return client.get_role(self.address, timeout=timeout)

    def wait_role(self, role: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll GetRole until it reports ``role`` (e.g. "PRIMARY")."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.role(timeout=0.5)
                if client.role_name(last) == role:
                    return last
            except client.Unreachable:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"{self.node_id} is not {role} after {timeout}s: {last}\n"
                           f"{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.running:
            self.cont()
            os.kill(self.pid, signal.SIGKILL)
            assert self.process is not None
            self.process.wait(10)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.process is not None, "not started"
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.running:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class RoleRecorder:
    """Follows one sidecar's WatchRole stream and keeps every status with its arrival time.

    The stream is re-opened when it breaks (the sidecar restarted, or is paused), so a recorder
    can outlive the process it watches.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.observations: list[Observation] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{address}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                with grpc.insecure_channel(self.address) as channel:
                    self._call = client.watch_role(channel)
                    for message in self._call:
                        self._add(Observation(time.monotonic(), client.to_dict(message)))
            except grpc.RpcError:
                pass
            except Exception:  # never let the recorder die silently during a test
                pass
            self._closed.wait(0.05)

    def _add(self, observation: Observation) -> None:
        with self._cond:
            self.observations.append(observation)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Observation], bool], timeout: float,
                 after: float = 0.0) -> Observation:
        """The first observation at or after ``after`` (monotonic) that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for observation in self.observations:
                    if observation.at >= after and predicate(observation):
                        return observation
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(round(o.at - after, 3), o.role) for o in self.observations
                            if o.at >= after]
                    raise TimeoutError(f"{self.address}: condition not seen in {timeout}s; "
                                       f"saw {seen}")
                self._cond.wait(left)

    def wait_role(self, role: str, timeout: float, after: float = 0.0) -> Observation:
        return self.wait_for(lambda o: o.role == role, timeout, after)

    def roles_since(self, after: float) -> list[str]:
        with self._cond:
            return [o.role for o in self.observations if o.at >= after]

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(2)
