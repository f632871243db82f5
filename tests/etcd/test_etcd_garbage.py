"""Hostile input: garbage in etcd under every key a sidecar reads, on real sidecar processes.

The keys are those of DESIGN.md's layout: ``leader``, ``members/<node>``, ``switchover`` (and
``sessions/``, covered in test_grpc_sessions.py). Whatever is written there by hand, a sidecar
stays up, logs a warning, counts the value in ``vsm_sidecar_etcd_garbage_total{key=...}`` and
keeps a safe role:

- a leader key holding garbage counts as held: nobody campaigns while it exists, so there are
  never two primaries; one under a lease goes with that lease;
- a leader key without a lease (no sidecar writes one) would block every election for ever: it
  is counted as held for two TTLs after a node first sees it, then that node deletes it;
- the primary whose own key is overwritten in place (same create revision) steps down, deletes
  the key, and a new election follows with a new epoch;
- garbage member records are left out: they neither block nor steer failback and handover;
- a garbage switchover request (or one without a lease) is ignored and blocks no later one.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import client
from sidecar.etcd.records import SWITCHOVER_TTL
from sidecar.lab.localnode import LocalSidecar

from ..sidecars import Pair, eventually

pytestmark = [pytest.mark.etcd]

TTL = 2
WAIT = 20.0  # generous: the machine is shared
FAILBACK_DELAY = 4.0
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
RANDOM = random.Random(20240601).randbytes(64)

# Values no sidecar could have written, for any of the keys.
JUNK: dict[str, bytes] = {
    "empty": b"",
    "random bytes": RANDOM,
    "invalid utf-8": b'{"node_id": "\xff\xfe"}',
    "json list": b"[1, 2, 3]",
    "json string": b'"a"',
    "deeply nested, 1 MB": b"[" * 1_000_000,
}


# -- helpers ------------------------------------------------------------------------------------




def garbage_counts(node: LocalSidecar) -> dict[str, float]:
    """``vsm_sidecar_etcd_garbage_total`` of one sidecar, by key, read over HTTP /metrics."""
    url = f"http://127.0.0.1:{node.http_port}/metrics"
    with OPENER.open(url, timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "vsm_sidecar_etcd_garbage":
            return {s.labels["key"]: s.value for s in family.samples
                    if s.name.endswith("_total")}
    raise AssertionError("vsm_sidecar_etcd_garbage is not exported")


def wait_count(node: LocalSidecar, key: str, at_least: float) -> float:
    def check() -> float:
        count = garbage_counts(node)[key]
        assert count >= at_least, (node.node_id, key, count)
        return count

    return eventually(check)


def warnings(node: LocalSidecar, event: str) -> list[dict[str, Any]]:
    """The log lines of ``event`` (the sidecars log JSON lines)."""
    found = []
    for line in node.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def key(pair: Pair, name: str) -> str:
    return f"/thinlinc-ha/{pair.cluster}/{name}"


@contextmanager
def etcd(pair: Pair) -> Iterator[Any]:
    with pair.etcd.client() as etcd_client:
        yield etcd_client


def alive(*nodes: LocalSidecar) -> None:
    for node in nodes:
        assert node.running, f"{node.node_id} exited:\n{node.log_tail()}"
        node.role()  # and it answers


# -- the leader key ---------------------------------------------------------------------------


LEADER_OVERWRITES = {
    **JUNK,
    "wrong types": b'{"node_id": 7, "address": ["x"], "since": null}',
    "huge number": b'{"node_id": "a", "address": 1e999, "epoch": -99999999999999999999999}',
    "1 MB record": json.dumps({"node_id": "a" * 1_000_000}).encode(),
    # Well formed, but written over the primary's key by someone else: the create revision
    # (the epoch) is the primary's, the lease is not, and it names the other node.
    "other node, no lease": b'{"node_id": "b", "address": "127.0.0.1:1", "since": "x"}',
}


def test_primary_whose_leader_key_is_overwritten_steps_down_and_a_new_election_follows(
        pair: Pair) -> None:
    """Garbage put over the primary's own leader key (same create revision, no lease): the
    primary notices, logs and counts it, stops being PRIMARY and deletes the key; a new leader
    is elected with a higher epoch, under a lease, and both processes stay up. For every kind
    of garbage in turn."""
    pair.start(ttl=TTL)
    seen = {"a": 0, "b": 0}
    for name, value in LEADER_OVERWRITES.items():
        primary, standby = pair.wait_split(timeout=WAIT)
        seen[primary.node_id] += 1
        epoch = int(primary.role()["epoch"])
        recorder = pair.recorder(primary)
        written = time.monotonic()
        with etcd(pair) as etcd_client:
            etcd_client.put(key(pair, "leader"), value)  # no lease: detached from the primary's
        stepped = recorder.wait_for(lambda o: o.role != "PRIMARY", timeout=WAIT, after=written)
        # At once, on the watch event: not when the standby removes the unowned key later.
        assert stepped.at - written < TTL, name

        def new_leader(epoch: int = epoch) -> tuple[LocalSidecar, LocalSidecar]:
            split = pair.wait_split(timeout=1)
            assert int(split[0].role()["epoch"]) > epoch
            return split

        eventually(new_leader)
        with etcd(pair) as etcd_client:
            raw, meta = etcd_client.get(key(pair, "leader"))
        assert meta.lease_id != 0, name
        assert json.loads(raw)["node_id"] in ("a", "b")
        assert meta.create_revision > epoch
        wait_count(primary, "leader", seen[primary.node_id])
        alive(primary, standby)
    a, b = pair.nodes
    assert {r["kind"] for r in warnings(a, "etcd_garbage") + warnings(b, "etcd_garbage")} == \
        {"leader"}
    stepped_down = warnings(a, "leader_key_overwritten") + warnings(b, "leader_key_overwritten")
    assert len(stepped_down) == len(LEADER_OVERWRITES)


def test_garbage_leader_key_under_a_lease_counts_as_held_until_the_lease_ends(
        pair: Pair) -> None:
    """A leader key holding garbage under someone's live lease: neither sidecar becomes
    PRIMARY (it counts as held), both say why in GetRole, log and count each value; once the
    lease ends, one of them is elected."""
    with etcd(pair) as etcd_client:
        lease = etcd_client.lease(60)
        etcd_client.put(key(pair, "leader"), b"\x00garbage", lease=lease)
        a, b = pair.start(ttl=TTL)
        recorders = [pair.recorder(a), pair.recorder(b)]
        started = time.monotonic()
        values = [b"\x00garbage", *JUNK.values(), b'{"node_id": "a", "address": {"x": 1}}']
        for number, value in enumerate(values, start=1):
            if number > 1:
                etcd_client.put(key(pair, "leader"), value, lease=lease)
            for node in (a, b):
                wait_count(node, "leader", number)

                def held(node: LocalSidecar = node) -> None:
                    status = node.role()
                    assert client.role_name(status) == "STANDBY"
                    assert "leader key holds no leader record" in status["reason"]
                    assert "leader_id" not in status

                eventually(held)
        alive(a, b)
        for recorder in recorders:
            assert "PRIMARY" not in recorder.roles_since(started)
        assert warnings(a, "etcd_garbage")
        assert warnings(b, "etcd_garbage")
        lease.revoke()
    pair.wait_split(timeout=TTL + WAIT)


@pytest.mark.parametrize("value", [
    pytest.param(RANDOM, id="garbage"),
    pytest.param(b'{"node_id": "a", "address": "127.0.0.1:1", "since": "x"}',
                 id="a leader record without a lease"),
])
def test_leader_key_without_a_lease_is_removed_after_two_ttls(pair: Pair, value: bytes) -> None:
    """A leader key with no lease (which no sidecar writes, and which would never expire):
    both sidecars stay STANDBY and say so, log an error, and after two TTLs one deletes it
    and an election follows."""
    with etcd(pair) as etcd_client:
        etcd_client.put(key(pair, "leader"), value)
        _, garbage = etcd_client.get(key(pair, "leader"))
    started = time.monotonic()
    a, b = pair.start(ttl=TTL)
    recorders = [pair.recorder(a), pair.recorder(b)]

    def held() -> None:
        for node in (a, b):
            status = node.role()
            assert client.role_name(status) == "STANDBY", status
            assert "not a sidecar's" in status["reason"], status

    eventually(held, timeout=2 * TTL)
    primary, _ = pair.wait_split(timeout=2 * TTL + WAIT)
    elected = recorders[pair.nodes.index(primary)].wait_role("PRIMARY", timeout=1).at
    assert elected - started >= 2 * TTL  # held for the grace, not taken at once
    assert int(primary.role()["epoch"]) > garbage.mod_revision
    assert warnings(a, "leader_key_unowned") or warnings(b, "leader_key_unowned")
    assert warnings(a, "leader_key_removed") or warnings(b, "leader_key_removed")
    assert garbage_counts(a)["leader"] == garbage_counts(b)["leader"] == 1
    alive(a, b)


def test_switchover_is_refused_while_the_leader_key_holds_garbage(pair: Pair) -> None:
    """With garbage in the leader key there is no primary to move from: Switchover is refused
    with the reason, rather than asking some node to take over."""
    with etcd(pair) as etcd_client:
        lease = etcd_client.lease(60)
        etcd_client.put(key(pair, "leader"), b"[]", lease=lease)
        a, b = pair.start(ttl=TTL)
        wait_count(a, "leader", 1)
        with pytest.raises(client.Refused, match="holds no leader record"):
            client.switchover(a.control_address, "b")
        lease.revoke()
    pair.wait_split()
    alive(a, b)


# -- member records ---------------------------------------------------------------------------


def member_garbage(lease: Any) -> dict[str, tuple[bytes, Any]]:
    """Values under members/<name>, and the lease to write each with (None: no lease)."""

    def record(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    return {
        "junk": (RANDOM, lease),
        "empty": (b"", lease),
        "utf": (b'{"node_id": "utf\xff"}', lease),
        "list": (b"[]", lease),
        "nested": (b"[" * 1_000_000, lease),
        # Sorts before "a": without the key check it would stand in for a, as FENCED.
        "0a": (record(node_id="a", role="ROLE_FENCED", copy_current=False), lease),
        "types": (record(node_id="types", role="ROLE_STANDBY", copy_current="yes",
                         epoch="1"), lease),
        "huge": (record(node_id="huge", role="ROLE_STANDBY", epoch=10**30), lease),
        "neg": (record(node_id="neg", role="ROLE_STANDBY", epoch=-5), lease),
        "big": (record(node_id="big", address="x" * 1_000_000), lease),
        "ghost": (record(node_id="ghost", role="ROLE_STANDBY", copy_current=True), None),
    }


def test_garbage_member_records_are_skipped_and_failback_still_happens(pair: Pair) -> None:
    """Garbage under members/ (including a's own record overwritten, and a record under
    another key claiming to be a): both nodes log and count each, GetRole lists only the two
    real members, and the preferred primary a still gets the role back."""
    # A delay long enough for the garbage to be in place before a asks for the role back.
    flags = ["--preferred-primary", "--failback-delay", str(FAILBACK_DELAY)]
    a = pair.start_one("a", ttl=TTL, extra_args=flags)
    b = pair.start_one("b", ttl=TTL)
    pair.wait_split()
    a.kill()
    b.wait_role("PRIMARY", timeout=TTL + 5)
    a.start()
    a.wait_role("STANDBY")

    def a_listed() -> None:
        assert {m["node_id"]: m["role"] for m in b.role().get("members", [])}.get("a") == \
            "ROLE_STANDBY"

    eventually(a_listed)
    with etcd(pair) as etcd_client:
        lease = etcd_client.lease(60)
        recorder = pair.recorder(a)
        written = time.monotonic()
        garbage = member_garbage(lease)
        for name, (value, on) in garbage.items():
            etcd_client.put(key(pair, f"members/{name}"), value, lease=on)
        etcd_client.put(key(pair, "members/a"), b"\x01 overwritten")  # a's own record
        # b may not read a's overwritten record before a has put it back; a always does.
        wait_count(a, "member", len(garbage) + 1)
        wait_count(b, "member", len(garbage))
        recorder.wait_role("PRIMARY", timeout=FAILBACK_DELAY + SWITCHOVER_TTL + WAIT,
                           after=written)
        for node in (a, b):
            members = eventually(lambda node=node: _members(node, {"a", "b"}))
            assert members == {"a", "b"}
        lease.revoke()
    pair.wait_split()
    assert client.role_name(a.role()) == "PRIMARY"
    assert {r["kind"] for r in warnings(b, "etcd_garbage")} == {"member"}
    assert warnings(a, "member_record_restored")
    alive(a, b)


def _members(node: LocalSidecar, expected: set[str]) -> set[str]:
    found = {m["node_id"] for m in node.role().get("members", [])}
    assert found == expected, found
    return found


def test_garbage_member_records_do_not_steer_an_unhealthy_primarys_handover(
        pair: Pair, tmp_path: Path) -> None:
    """Health gate with garbage member records that look like eligible standbys sorted before
    the real one (wrong types, no lease): when the primary's VSM server fails, the role goes
    to the real healthy standby within a few health checks, not to a ghost."""
    flags = {}
    for node_id in "ab":
        marker = tmp_path / f"healthy-{node_id}"
        marker.touch()
        flags[node_id] = ["--health-check", f"exec:test -e {marker}", "--health-interval", "0.2",
                          "--health-timeout", "0.2", "--health-rise", "1", "--health-fall", "2"]
    a = pair.start_one("a", ttl=TTL, extra_args=flags["a"])
    b = pair.start_one("b", ttl=TTL, extra_args=flags["b"])
    pair.wait_split()
    ghost = {"role": "ROLE_STANDBY", "health": "healthy", "copy_current": True}
    with etcd(pair) as etcd_client:
        lease = etcd_client.lease(60)
        etcd_client.put(key(pair, "members/0ghost"),
                        json.dumps({"node_id": "0ghost", **ghost, "copy_current": "yes"}),
                        lease=lease)
        etcd_client.put(key(pair, "members/0nolease"),
                        json.dumps({"node_id": "0nolease", **ghost}))
        etcd_client.put(key(pair, "members/0float"),
                        json.dumps({"node_id": "0float", **ghost, "epoch": 1.5}), lease=lease)
        wait_count(a, "member", 3)

        def b_eligible() -> None:
            raw, _ = etcd_client.get(key(pair, "members/b"))
            record = json.loads(raw)
            assert (record["health"], record["copy_current"]) == ("healthy", True), record

        eventually(b_eligible)
        recorder = pair.recorder(b)
        failed = time.monotonic()
        (tmp_path / "healthy-a").unlink()
        promoted = recorder.wait_role("PRIMARY", timeout=WAIT, after=failed)
        assert promoted.at - failed < 3.0  # a handover to b, not a wait for a ghost's request
        lease.revoke()
    reasons = [r["reason"] for r in warnings(a, "role_change")]
    assert "handing over to b (primary unhealthy)" in reasons
    alive(a, b)


# -- the switchover request ---------------------------------------------------------------------


def test_garbage_switchover_requests_are_ignored_and_a_valid_one_still_works(
        pair: Pair) -> None:
    """Garbage under switchover (and a well-formed request without a lease, which no sidecar
    writes): the primary logs and counts each, no move is made, the epoch stays; a real
    switchover afterwards goes through."""
    pair.start(ttl=TTL)
    primary, standby = pair.wait_split()
    epoch = primary.role()["epoch"]
    recorder = pair.recorder(primary)
    started = time.monotonic()
    values = [
        *JUNK.values(),
        b'{"target": 5, "reason": "operator"}',
        json.dumps({"target": "b" * 1_000_000}).encode(),
        json.dumps({"target": standby.node_id, "reason": ["x"]}).encode(),
        # Well formed, but without a lease: honoured, it would hold every other node back for
        # ever whenever its target cannot take over.
        json.dumps({"target": standby.node_id, "requested_by": "x", "reason": "operator"}
                   ).encode(),
    ]
    with etcd(pair) as etcd_client:
        lease = etcd_client.lease(60)
        for number, value in enumerate(values, start=1):
            etcd_client.put(key(pair, "switchover"), value,
                            lease=None if number == len(values) else lease)
            wait_count(primary, "switchover", number)
        assert primary.role()["epoch"] == standby.role()["epoch"] == epoch
        assert set(recorder.roles_since(started)) <= {"PRIMARY"}
        assert client.role_name(standby.role()) == "STANDBY"
        alive(primary, standby)
        lease.revoke()
    new, new_epoch, _ = eventually(
        lambda: client.switchover(primary.control_address, standby.node_id))
    assert new == standby.node_id
    assert new_epoch > int(epoch)
    assert {r["kind"] for r in warnings(primary, "etcd_garbage")} == {"switchover"}


def test_switchover_request_naming_no_member_holds_nobody_back(pair: Pair) -> None:
    """A well-formed request under a long lease that names a node which is no member (gone,
    or a typo): with no primary, the sidecars do not wait for it (the lease could outlive
    every patience); one is elected at once."""
    with etcd(pair) as etcd_client:
        lease = etcd_client.lease(60)
        request = {"target": "ghost", "requested_by": "x", "reason": "operator"}
        etcd_client.put(key(pair, "switchover"), json.dumps(request), lease=lease)
        started = time.monotonic()
        pair.start(ttl=TTL)
        pair.wait_split(timeout=WAIT)
        assert time.monotonic() - started < WAIT  # not the request's 60 s
        assert any(warnings(n, "switchover_target_unknown") for n in pair.nodes)
        lease.revoke()
