"""sd_notify: a real sidecar reports READY, STATUS and WATCHDOG to a socket the test owns."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.host.systemd import Notifier
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

pytestmark = [pytest.mark.etcd]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.2)
        yield sock, path


def received(sock: socket.socket, seconds: float) -> list[str]:
    messages = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            messages.append(sock.recv(4096).decode())
    return messages


def test_sidecar_notifies_ready_status_watchdog_and_stopping(
        notify_socket: tuple[socket.socket, Path], etcd_cluster: LocalEtcdCluster,
        cluster_name: str, tmp_path: Path) -> None:
    """Under Type=notify: READY=1 with the role once the API serves, WATCHDOG=1 about every
    WATCHDOG_USEC / 2, a STATUS line on a role change, and STOPPING=1 on SIGTERM."""
    sock, path = notify_socket
    node = LocalSidecar("a", cluster_name, etcd_cluster.endpoints_arg, tmp_path,
                        env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    try:
        node.start().wait_role("PRIMARY")
        messages = received(sock, 0.3)  # everything since start-up, and a little more
        ready = [m for m in messages if "READY=1" in m]
        assert len(ready) == 1
        statuses = [line for m in messages for line in m.splitlines()
                    if line.startswith("STATUS=")]
        assert any(s.startswith("STATUS=PRIMARY epoch ") for s in statuses), statuses
        # Now a fresh window: pings every 0.1 s, so about 10 in a second; loose bounds for load
        # (none at all, or a flood, would be the bugs).
        pings = [m for m in received(sock, 1.0) if m == "WATCHDOG=1"]
        assert 3 <= len(pings) <= 20, pings
        node.terminate()
        assert node.wait_exit(10) == 0
        assert any("STOPPING=1" in m for m in received(sock, 0.5))
    finally:
        node.close()


def test_abstract_socket_names_and_no_socket() -> None:
    """"@name" means the abstract namespace; without NOTIFY_SOCKET nothing is sent."""
    assert Notifier({"NOTIFY_SOCKET": "@sd"}).address == "\0sd"
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.send(ready="1")  # does nothing, raises nothing
    assert Notifier({"WATCHDOG_USEC": "4000000", "NOTIFY_SOCKET": "/x"}).watchdog_interval == 2.0
