"""Session records across failover, with real sidecar processes on a real etcd cluster: no
acknowledged write is lost (RPO = 0), a deposed primary's late write is refused (rule 2), and a
restarted standby resumes its copy instead of re-reading it."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from sidecar.api.session_pb2 import GetSessionRequest, Session

from ..endpoints.test_grpc_sessions import (
    Client,
    by_id,
    eventually,
    not_primary,
    record,
    sessions_key,
    split,
    wait_current,
    without_revision,
)
from ..sidecars import Pair

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

TTL = 2
Code = grpc.StatusCode


@dataclass
class Ack:
    session: Session
    revision: int
    address: str


@dataclass
class SteadyWriter:
    """Puts sessions one after the other through whichever node is primary, as a VSM server
    would: it follows the NotPrimary hint of FAILED_PRECONDITION, and retries the same record
    on UNAVAILABLE or a deadline (the write may or may not have landed: a put is idempotent).
    Nodes are known by their published (TCP) address, the one the hint names; writes go to
    each node's Unix socket, where they are allowed."""

    addresses: list[str]
    sockets: dict[str, str]
    acked: dict[str, Ack] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="steady-writer", daemon=True)

    def count(self, address: str | None = None) -> int:
        with self.lock:
            return sum(1 for a in self.acked.values() if address in (None, a.address))

    def _run(self) -> None:
        clients = {address: Client(self.sockets[address]) for address in self.addresses}
        target = self.addresses[0]
        try:
            number = 0
            while not self.stop.is_set():
                session = record(f"steady-{number:05d}", attributes={"n": str(number)})
                target = self._put(clients, target, session)
                number += 1
        except Exception as exc:  # reported by the test, not lost in a thread
            self.errors.append(repr(exc))
        finally:
            for client in clients.values():
                client.close()

    def _put(self, clients: dict[str, Client], target: str, session: Session) -> str:
        while not self.stop.is_set():
            try:
                revision = clients[target].put(session, timeout=1.0)
            except grpc.RpcError as exc:
                hint = not_primary(exc) if exc.code() is Code.FAILED_PRECONDITION else None
                if exc.code() is Code.FAILED_PRECONDITION:
                    if hint is not None and hint.address in clients:
                        target = hint.address
                elif exc.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                    target = self._other(target)
                else:
                    raise
                time.sleep(0.02)
                continue
            with self.lock:
                self.acked[session.session_id] = Ack(session, revision, target)
            return target
        return target

    def _other(self, address: str) -> str:
        return next(a for a in self.addresses if a != address)


def test_no_acknowledged_write_is_lost_when_the_primary_is_killed(pair: Pair) -> None:
    """RPO = 0: while a client writes continuously, kill -9 the primary; once the standby is
    PRIMARY every write that was acknowledged is on it with the same content and revision, and
    the client carries on writing there."""
    primary, standby = split(pair)
    writer = SteadyWriter([primary.address, standby.address],
                          {n.address: n.control_address for n in (primary, standby)})
    writer.thread.start()
    try:
        eventually(lambda: _at_least(writer.count(primary.address), 50), timeout=10)
        killed_at = time.monotonic()
        primary.kill()
        pair.recorder(standby).wait_role("PRIMARY", timeout=TTL + 5, after=killed_at)
        eventually(lambda: _at_least(writer.count(standby.address), 50), timeout=10)
    finally:
        writer.stop.set()
        writer.thread.join(10)
    assert writer.errors == []
    with Client(standby.control_address) as new_primary:
        held = by_id(new_primary.list())
    with writer.lock:
        acked = dict(writer.acked)
    missing = sorted(set(acked) - set(held))
    assert missing == []
    for session_id, ack in acked.items():
        assert without_revision(held[session_id]) == ack.session, session_id
        assert held[session_id].revision == ack.revision, session_id
    assert {a.address for a in acked.values()} == {primary.address, standby.address}


def _at_least(value: int, least: int) -> None:
    assert value >= least, (value, least)


def test_a_paused_primary_cannot_write_after_it_was_replaced(pair: Pair) -> None:
    """Fencing: SIGSTOP the primary and send it a PutSession (it waits in the kernel's socket
    buffer); once the other node is PRIMARY and 2 x TTL have passed, SIGCONT. The late write
    fails with FAILED_PRECONDITION, and is neither in etcd nor on the new primary."""
    primary, standby = split(pair)
    late = record("late-write")
    outcome: list[grpc.RpcError | int] = []
    with Client(primary.control_address) as old:
        old.put(record("before-the-pause"))  # the connection is up before the pause
        recorder = pair.recorder(standby)
        stopped_at = time.monotonic()
        primary.stop()

        def send() -> None:
            try:
                outcome.append(old.put(late, timeout=30))
            except grpc.RpcError as exc:
                outcome.append(exc)

        sender = threading.Thread(target=send, name="late-writer", daemon=True)
        sender.start()
        recorder.wait_role("PRIMARY", timeout=TTL + 5, after=stopped_at)
        time.sleep(max(0.0, stopped_at + 2 * TTL - time.monotonic()))
        assert outcome == []  # still waiting on the paused process
        primary.cont()
        sender.join(30)
    assert len(outcome) == 1
    error = outcome[0]
    assert isinstance(error, grpc.RpcError), f"the late write was acknowledged at {error}"
    assert error.code() is Code.FAILED_PRECONDITION
    with pair.etcd.client() as etcd:
        assert etcd.get(sessions_key(pair, "late-write"))[0] is None
    with Client(standby.control_address) as new_primary:
        assert "late-write" not in by_id(new_primary.list())
        with pytest.raises(grpc.RpcError) as missing:
            new_primary.stub.GetSession(GetSessionRequest(session_id="late-write"), timeout=5)
        assert missing.value.code() is Code.NOT_FOUND


def log_events(path: str, offset: int) -> list[dict[str, Any]]:
    """The JSON log lines of a sidecar written after byte ``offset`` of its log."""
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def test_restarted_standby_resumes_from_its_copy_and_catches_up(pair: Pair) -> None:
    """kill -9 the standby, write more on the primary, restart the standby on its data dir:
    it loads its copy (revision > 0), resumes its watch from there without a full re-read,
    and its copy then equals the primary's."""
    primary, standby = split(pair)
    with Client(primary.control_address) as p:
        before = max(p.put(record(f"early-{i}")) for i in range(20))
        with Client(standby.control_address) as s:
            wait_current(s, before)
        time.sleep(0.3)  # the copy on disk is flushed every 50 ms
        standby.kill()
        for i in range(10):
            p.put(record(f"late-{i}"))
        p.put(record("early-0", username="changed"))
        last, _ = p.delete("early-1")
        offset = standby.log_path.stat().st_size
        standby.start()
        with Client(standby.control_address) as s:
            copy = wait_current(s, last)
        reference = p.list()
    events = log_events(str(standby.log_path), offset)
    loaded = [e for e in events if e.get("event") == "session_copy_loaded"]
    assert len(loaded) == 1
    assert before <= loaded[0]["revision"] < last
    assert loaded[0]["records"] == 20
    assert [e for e in events if e.get("event") in ("mirror_resynced", "mirror_compacted")] == []
    assert list(copy.sessions) == list(reference.sessions)
    assert len(copy.sessions) == 29
    assert by_id(copy)["early-0"].username == "changed"
