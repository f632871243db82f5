"""sd_notify: a real sidecar reports READY, STATUS and WATCHDOG to a socket the test owns."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.host.systemd import Notifier
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

pytestmark = [pytest.mark.etcd]


class NotifyReader:
    """A stand-in for systemd: reads every datagram as it comes, each kept with its arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.messages.append((time.monotonic(), self._sock.recv(4096).decode()))

    def since(self, start: float) -> list[str]:
        return [message for at, message in list(self.messages) if at >= start]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def notify_reader(tmp_path: Path) -> Iterator[NotifyReader]:
    reader = NotifyReader(tmp_path / "notify.sock")
    yield reader
    reader.close()


def test_sidecar_notifies_ready_status_watchdog_and_stopping(
        notify_reader: NotifyReader, etcd_cluster: LocalEtcdCluster,
        cluster_name: str, tmp_path: Path) -> None:
    """Under Type=notify: READY=1 with the role once the API serves, WATCHDOG=1 about every
    WATCHDOG_USEC / 2, a STATUS line on a role change, and STOPPING=1 on SIGTERM."""
    node = LocalSidecar("a", cluster_name, etcd_cluster.endpoints_arg, tmp_path,
                        env={"NOTIFY_SOCKET": str(notify_reader.path), "WATCHDOG_USEC": "200000"})
    try:
        node.start().wait_role("PRIMARY")
        time.sleep(0.3)
        messages = notify_reader.since(0)  # everything since start-up, and a little more
        ready = [m for m in messages if "READY=1" in m]
        assert len(ready) == 1
        statuses = [line for m in messages for line in m.splitlines()
                    if line.startswith("STATUS=")]
        assert any(s.startswith("STATUS=PRIMARY epoch ") for s in statuses), statuses
        # Now a fresh window: pings every 0.1 s, so about 10 in a second; loose bounds for load
        # (none at all, or a flood, would be the bugs).
        window = time.monotonic()
        time.sleep(1.0)
        pings = [m for m in notify_reader.since(window) if m == "WATCHDOG=1"]
        assert 3 <= len(pings) <= 20, pings
        node.terminate()
        assert node.wait_exit(10) == 0
        time.sleep(0.2)
        assert any("STOPPING=1" in m for m in notify_reader.since(window))
    finally:
        node.close()


def test_abstract_socket_names_and_no_socket() -> None:
    """"@name" means the abstract namespace; without NOTIFY_SOCKET nothing is sent."""
    assert Notifier({"NOTIFY_SOCKET": "@sd"}).address == "\0sd"
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.send(ready="1")  # does nothing, raises nothing
    assert Notifier({"WATCHDOG_USEC": "4000000", "NOTIFY_SOCKET": "/x"}).watchdog_interval == 2.0


def test_a_full_notify_queue_drops_the_message_and_never_blocks(tmp_path: Path) -> None:
    """A reader that has stopped reading fills its queue (net.unix.max_dgram_qlen, 10 by
    default): further sends are dropped and counted, never waited on. A blocking send froze the
    whole event loop, role and API included, until the reader came back."""
    path = tmp_path / "stuck.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stuck:
        stuck.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        sender = threading.Thread(target=lambda: [notifier.send(watchdog="1")
                                                  for _ in range(200)], daemon=True)
        sender.start()
        sender.join(5)
        assert not sender.is_alive(), "a send blocked on the full queue"
        assert notifier.dropped > 0
        assert stuck.recv(4096) == b"WATCHDOG=1"  # what fitted was delivered
