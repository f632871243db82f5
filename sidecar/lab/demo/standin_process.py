"""The demo's handle on one stand-in VSM server process (``vsm-sidecar vsm-standin``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from .. import netlab
from ..localnode import LocalSidecar
from ..ports import free_port
from .plan import EXIT_TIMEOUT_S, LAB_HOSTS, PROBE_TIMEOUT_S, RPC_TIMEOUT_S, VIP_PORT, SceneFailed


class StandIn:
    """One stand-in VSM server (``vsm-sidecar vsm-standin``) beside one sidecar.

    It follows its sidecar's WatchRole and serves its TCP port only while that sidecar is
    PRIMARY: a client gets "NAME COUNT", and "new USER" creates a session through the sidecar.
    """

    def __init__(
        self, node: LocalSidecar, workdir: Path, net: netlab.NetnsLab | None = None
    ) -> None:
        self.name = node.node_id
        # Its sidecar's socket, where session writes are allowed.
        self.sidecar = node.control_address
        self.command_prefix: list[str] = []
        if net is None:
            self.host, self.port = "127.0.0.1", free_port("127.0.0.1")
            self.listen = self.address
        else:
            # In the node's host, on every address: its own and the resource IP. The demo
            # reaches it through its own address, over its leg on the lab's bridge.
            lab_host = LAB_HOSTS[node.node_id]
            self.host, self.port = net.hosts[lab_host].ipv4, VIP_PORT
            self.listen = f"0.0.0.0:{VIP_PORT}"
            self.command_prefix = net.exec_prefix(lab_host)
        self.log_path = workdir / f"standin-{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        command = [*self.command_prefix, sys.executable, "-m", "sidecar", "vsm-standin",
                   "--grpc", self.sidecar, "--listen", self.listen,
                   "--name", self.name]  # fmt: skip
        with self.log_path.open("ab") as log:
            # A session of its own, like the sidecars: only the demo's cleanup stops it.
            self.process = subprocess.Popen(command, stdout=log, stderr=log,
                                            start_new_session=True)  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def serving(self) -> bool:
        """Whether its port accepts a connection (only while its sidecar is PRIMARY)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S):
                return True
        except OSError:
            return False

    def new_session(self, user: str) -> int:
        """Create a session for ``user``; the etcd revision the sidecar acknowledged it at."""
        try:
            with socket.create_connection((self.host, self.port), timeout=RPC_TIMEOUT_S) as conn:
                lines = conn.makefile("rw", encoding="utf-8", newline="\n")
                lines.readline()  # the greeting, "NAME COUNT"
                lines.write(f"new {user}\n")
                lines.flush()
                answer = lines.readline().strip()
        except OSError as exc:
            raise SceneFailed(f"{self.name}'s stand-in did not answer: {exc}") from None
        match answer.split():
            case ["ok", _, revision] if revision.isdigit():
                return int(revision)
        raise SceneFailed(f"{self.name}'s stand-in answered {answer!r} to 'new {user}'")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(EXIT_TIMEOUT_S)

    def log_tail(self, lines: int) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
