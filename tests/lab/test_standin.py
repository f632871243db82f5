"""The stand-in VSM server beside real sidecars on a real etcd cluster: it serves only while its
sidecar is PRIMARY, writes sessions through it, and takes over with every session after a
failover."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sidecar import client
from sidecar.api.session_pb2 import GetSessionRequest, Session
from sidecar.api.session_pb2_grpc import SessionServiceStub
from sidecar.lab.localnode import LocalSidecar
from sidecar.lab.ports import free_port
from sidecar.lab.standin import LOAD_PAGE
from sidecar.sessions.record import encode_session

from ..builders import takeover_guard
from ..sidecars import Pair

pytestmark = [pytest.mark.etcd]

TTL = 2
GUARD = takeover_guard(TTL)
HOST = "127.0.0.1"


class StandInProcess:
    """One ``vsm-sidecar vsm-standin`` subprocess beside one sidecar."""

    def __init__(self, sidecar: LocalSidecar, workdir: Path) -> None:
        self.name = sidecar.node_id
        self.port = free_port(HOST)
        self.log_path = workdir / f"standin-{self.name}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "vsm-standin", "--grpc", sidecar.control_address,
                 "--listen", f"{HOST}:{self.port}", "--name", self.name],
                stdout=log, stderr=log, start_new_session=True)

    def connect(self, timeout: float = 2.0) -> socket.socket:
        return socket.create_connection((HOST, self.port), timeout=timeout)

    def serving(self) -> bool:
        """Whether the port accepts a connection and greets it."""
        try:
            with self.connect() as conn, conn.makefile("r") as lines:
                return bool(lines.readline())
        except OSError:
            return False

    def wait_serving(self, expected: bool, timeout: float) -> float:
        """Poll until serving() is ``expected``; the monotonic time it became so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serving() == expected:
                return time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"stand-in {self.name}: serving is not {expected} after "
                             f"{timeout}s\n{self.log_tail()}")

    def talk(self, *requests: str) -> list[str]:
        """The greeting, then one answer per request line, on one connection."""
        with self.connect(timeout=10) as conn, conn.makefile("rw") as stream:
            answers = [stream.readline()]
            for request in requests:
                stream.write(f"{request}\n")
                stream.flush()
                answers.append(stream.readline())
        assert all(a.endswith("\n") for a in answers), (answers, self.log_tail())
        return [a.rstrip("\n") for a in answers]

    def events(self, event: str) -> list[dict[str, object]]:
        """The JSON log lines with this event name."""
        found = []
        for line in self.log_path.read_text().splitlines():
            with_event = json.loads(line) if line.startswith("{") else {}
            if with_event.get("event") == event:
                found.append(with_event)
        return found

    def wait_event(self, event: str, timeout: float = 10.0, **fields: object) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(fields.items() <= e.items() for e in self.events(event)):
                return
            time.sleep(0.05)
        raise AssertionError(f"stand-in {self.name}: no {event} {fields}\n{self.log_tail()}")

    def terminate(self, timeout: float = 10.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def standins(tmp_path: Path) -> Iterator[dict[str, StandInProcess]]:
    """Stand-ins by sidecar node id, started by the test, every one killed after it."""
    started: dict[str, StandInProcess] = {}
    yield started
    for standin in started.values():
        standin.close()


def start_standins(pair: Pair, standins: dict[str, StandInProcess], tmp_path: Path) -> None:
    for node in pair.nodes:
        standins[node.node_id] = StandInProcess(node, tmp_path)


def get_session(address: str, session_id: str) -> tuple[str, int]:
    """The user name and revision of a record, read through a sidecar's SessionService."""
    with grpc.insecure_channel(address) as channel:
        response = SessionServiceStub(channel).GetSession(
            GetSessionRequest(session_id=session_id), timeout=5)
    return response.session.username, response.session.revision


def test_only_the_primarys_standin_serves_and_its_sessions_reach_etcd(
        pair: Pair, standins: dict[str, StandInProcess], tmp_path: Path) -> None:
    """Only the primary's stand-in accepts connections; "new alice" answers ok only once the
    record is committed: the standby's sidecar reads it at the acknowledged revision."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    start_standins(pair, standins, tmp_path)
    active, idle = standins[primary.node_id], standins[standby.node_id]

    active.wait_serving(True, timeout=10)
    idle.wait_event("role", role="STANDBY")  # it knows its role, and still does not serve
    assert not idle.serving()

    greeting, created, listed = active.talk("new alice", "list")
    assert greeting == f"{primary.node_id} 0"
    word, session_id, revision = created.split(" ")
    assert word == "ok"
    assert session_id.startswith(f"{primary.node_id}:")
    assert listed == f"ok {session_id}"
    assert get_session(standby.address, session_id) == ("alice", int(revision))
    assert active.talk("bogus") == [f"{primary.node_id} 1",
                                     "error unknown request 'bogus': expected 'new USER' or "
                                     "'list'"]

    assert [active.terminate(), idle.terminate()] == [0, 0]


def test_standin_takes_over_with_every_session_after_the_primary_sidecar_is_killed(
        pair: Pair, standins: dict[str, StandInProcess], tmp_path: Path) -> None:
    """kill -9 of the primary's sidecar: its stand-in stops serving (and drops its clients) at
    once; the other stand-in serves within TTL + 1 s (plus the #15247 guard on the bundled
    etcd) with the sessions written before, and
    writes new ones through its own sidecar. Both exit 0 on SIGTERM."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    start_standins(pair, standins, tmp_path)
    old, new = standins[primary.node_id], standins[standby.node_id]
    old.wait_serving(True, timeout=10)
    new.wait_event("role", role="STANDBY")
    _, created = old.talk("new alice")
    alice = created.split(" ")[1]

    with old.connect() as held, held.makefile("r") as held_lines:
        assert held_lines.readline() == f"{primary.node_id} 1\n"
        killed_at = time.monotonic()
        primary.kill()
        old_stopped_at = old.wait_serving(False, timeout=TTL + 1)
        held.settimeout(TTL + 1)
        assert held_lines.readline() == "", "a client of the old primary stays connected"
    new_serving_at = new.wait_serving(True, timeout=TTL + 1 + GUARD)

    assert old_stopped_at - killed_at < 1.0
    assert new_serving_at - killed_at < TTL + 1 + GUARD
    greeting, listed, created_bob = new.talk("list", "new bob")
    assert greeting == f"{standby.node_id} 1"
    assert listed == f"ok {alice}"
    word, bob, revision = created_bob.split(" ")
    assert (word, bob.startswith(f"{standby.node_id}:")) == ("ok", True)
    assert get_session(standby.address, bob) == ("bob", int(revision))
    new.wait_event("sessions_loaded", count=1)
    assert not old.serving()

    assert [old.terminate(), new.terminate()] == [0, 0]


def test_standin_follows_its_sidecar_through_a_restart(
        pair: Pair, standins: dict[str, StandInProcess], tmp_path: Path) -> None:
    """The stand-in of a killed sidecar re-opens the role stream when the sidecar is back; a
    switchover to it makes it serve again, with the sessions written while it was away."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    start_standins(pair, standins, tmp_path)
    old, new = standins[primary.node_id], standins[standby.node_id]
    old.wait_serving(True, timeout=10)
    primary.kill()
    new.wait_serving(True, timeout=TTL + 1 + GUARD)
    _, created = new.talk("new carol")
    carol = created.split(" ")[1]

    primary.start()
    old.wait_event("role", role="STANDBY")  # the stream is open again, on the new process
    client.switchover(standby.control_address, primary.node_id)
    old.wait_serving(True, timeout=5)
    new.wait_serving(False, timeout=1)

    assert old.talk("list") == [f"{primary.node_id} 1", f"ok {carol}"]
    assert [old.terminate(), new.terminate()] == [0, 0]


def test_standin_loads_a_database_larger_than_one_page(
        pair: Pair, standins: dict[str, StandInProcess], tmp_path: Path) -> None:
    """On promotion the stand-in pages through ListSessions: more records than one page (and,
    at scale, than one gRPC answer may carry) all arrive, each once."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    count = 2 * LOAD_PAGE + 345
    prefix = f"/thinlinc-ha/{pair.cluster}/sessions/"
    with pair.etcd.client() as etcd:
        for first in range(0, count, 128):  # etcd's default limit of operations per txn
            puts = [etcd.transactions.put(f"{prefix}bulk-{n:05d}", encode_session(
                Session(session_id=f"bulk-{n:05d}", username=f"user{n}")))
                for n in range(first, min(first + 128, count))]
            etcd.transaction(compare=[], success=puts, failure=[])
    start_standins(pair, standins, tmp_path)
    new = standins[standby.node_id]
    new.wait_event("role", role="STANDBY")
    primary.kill()
    new.wait_event("sessions_loaded", count=count, timeout=TTL + 10)
    greeting, listed = new.talk("list")
    assert greeting == f"{standby.node_id} {count}"
    assert listed.split(" ")[1:] == [f"bulk-{n:05d}" for n in range(count)]
