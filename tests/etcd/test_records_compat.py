"""The record compatibility rule of docs/OPERATIONS.md: a sidecar reads the records of the
previous format and ignores fields it does not know, so the two sidecars of a pair may run
different versions during a rolling upgrade.

tests/fixtures/records/ holds one record of each kind exactly as this version writes it to
etcd (format 1): session, leader, member, switchover request, VSM file manifest. They stay as
they are when a later version changes a format: that version must still read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.etcd import records
from sidecar.sessions import record as sessions
from sidecar.vsmfile import adapter as fileadapter

FIXTURES = Path(__file__).parent.parent / "fixtures" / "records"
KINDS = ("session", "leader", "member", "member-ops", "switchover", "manifest", "manifest-v2",
         "pause")
SESSION_ID = "agent1:10"
LEASE = 7587869183741521930


def stored(kind: str) -> bytes:
    return (FIXTURES / f"{kind}.json").read_bytes()


def with_unknown_field(raw: bytes) -> bytes:
    """The record as a later version might write it: one more field, of a type no field of
    today has, placed first and last so no reader can rely on position."""
    doc = json.loads(raw)
    later = {"zz_added_later": {"nested": [1, 2.5, None, True]}, **doc,
             "added_later": "text"}
    return json.dumps(later, separators=(",", ":")).encode()


def decoded(kind: str, raw: bytes) -> Any:
    """What today's reader of that kind makes of ``raw`` (it raises for a record it refuses)."""
    if kind == "session":
        sessions.check_record(raw, SESSION_ID)  # the follower's check before it keeps a record
        return sessions.decode_session(raw, SESSION_ID)
    if kind == "leader":
        info = records.decode_leader(raw, epoch=3, lease=LEASE, revision=3)
        assert info.valid, info.problem
        return info
    if kind.startswith("member"):
        record = records.decode_member(b"vsm-a", raw, LEASE)
        return {name: record.get(name) for name in ("node_id", *records.MEMBER_FIELDS)}
    if kind == "switchover":
        return records.SwitchoverRequest.decode(raw, LEASE)
    if kind == "pause":
        return records.PauseRecord.decode(raw)
    return fileadapter.Manifest.from_json(raw)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_records_of_format_1_decode(kind: str) -> None:
    """Today's code reads every stored record of today's format."""
    decoded(kind, stored(kind))


def test_stored_records_decode_to_their_values() -> None:
    """The stored records mean what they say (a check on the fixtures themselves)."""
    session = decoded("session", stored("session"))
    assert (session.username, session.display, session.attributes["client_os"]) == (
        "alice", 10, "linux")
    assert decoded("leader", stored("leader")).node_id == "vsm-a"
    member = decoded("member", stored("member"))
    assert (member["role"], member["epoch"], member["copy_current"]) == ("ROLE_PRIMARY", 3, True)
    assert decoded("switchover", stored("switchover")).target == "vsm-b"
    assert decoded("manifest", stored("manifest")).size == 1000
    assert decoded("manifest-v2", stored("manifest-v2")).size == 1000
    ops = decoded("member-ops", stored("member-ops"))
    assert (ops["applied_revision"], ops["resource_ip_held"]) == (1234, False)
    assert (member["applied_revision"], member["resource_ip_held"]) == (None, None)
    pause = decoded("pause", stored("pause"))
    assert (pause.by, pause.reason, pause.until - pause.since) == (
        "root@vsm-a", "kernel update on vsm-a", 3600.0)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_fields_are_ignored(kind: str) -> None:
    """A record with fields a later version added decodes to what it decodes to without them."""
    assert decoded(kind, with_unknown_field(stored(kind))) == decoded(kind, stored(kind))


@pytest.mark.parametrize("kind", ["session", "manifest", "pause"])
def test_an_unknown_format_version_is_refused_not_misread(kind: str) -> None:
    """A record whose `v` this version does not know (a change old readers would misread)
    is refused as garbage, which the mirror logs and skips, never guessed at."""
    doc = json.loads(stored(kind))
    doc["v"] = 99
    with pytest.raises((sessions.SessionDecodeError, fileadapter.ChunkError, ValueError)):
        decoded(kind, json.dumps(doc).encode())


def test_todays_encoders_write_the_stored_forms() -> None:
    """Each encoder of this version writes the stored form: when one changes, add a fixture of
    the new form beside the old one (which must keep decoding) and change this test. The file
    manifest changed to format 2 (content-addressed chunks): manifest.json is format 1."""
    session = sessions.decode_session(stored("session"), SESSION_ID)
    assert sessions.encode_session(session) == stored("session")
    manifest = fileadapter.Manifest.from_json(stored("manifest-v2"))
    assert manifest.to_json() == stored("manifest-v2")

    def shape(raw: bytes) -> tuple[list[str], bool]:
        # Field names in order and the separators; the times differ from run to run.
        return list(json.loads(raw)), b'": ' in raw

    leader = records.encode_leader("vsm-a", "10.0.0.11:50051")
    assert shape(leader) == shape(stored("leader"))
    request = records.SwitchoverRequest("vsm-b", "vsm-a", "operator").encode()
    assert shape(request) == shape(stored("switchover"))
    for kind in ("member", "member-ops"):
        member = json.loads(stored(kind))
        assert json.dumps(member, sort_keys=True).encode() == stored(kind)  # put_member's form
    pause = records.PauseRecord.decode(stored("pause"))
    assert pause.encode() == stored("pause")
