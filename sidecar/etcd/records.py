"""The values under the cluster prefix: the leader key, a switchover request and a member
record, encoded and decoded defensively, and the log of the garbage found instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from ..settings import NAME_PATTERN

log = structlog.get_logger(__name__)

# -- values read from etcd, and what to do with garbage ------------------------------------------
#
# Anyone with write access to the prefix (an operator with etcdctl, a script, a bug) can put
# anything under these keys. Every value is decoded defensively: garbage is logged and counted
# (GarbageLog), and then treated in the way that keeps rule 1 and rule 4: a leader key counts as
# held whatever it holds (never two primaries), a member record or a switchover request that
# cannot be read is left out (it can only hold a move back, never cause one).

GARBAGE_KINDS = ("leader", "member", "switchover", "pause")
# Distinct bad values remembered so that each is logged and counted once, not on every re-read.
GARBAGE_MEMORY = 1024
LOG_VALUE_CHARS = 200
MAX_TEXT = 1024  # characters of a free-text field (address, reason, version ...)
MAX_EPOCH = 2**63 - 1  # etcd revisions are int64, and so is every epoch field of the API


class GarbageLog:
    """Values under the cluster prefix that cannot be used, logged and counted by kind.

    A value is one (key, mod revision): a node that re-reads the same garbage every second logs
    and counts it once. The counts are ``vsm_sidecar_etcd_garbage_total``.
    """

    def __init__(self) -> None:
        self.counts = dict.fromkeys(GARBAGE_KINDS, 0)
        self._seen: dict[bytes, int] = {}

    def known(self, key: bytes, revision: int) -> bool:
        """Whether this very value was already found to be garbage (no need to decode it)."""
        return revision != 0 and self._seen.get(key) == revision

    def report(self, kind: str, key: bytes, revision: int, problem: str, value: bytes) -> None:
        if self.known(key, revision):
            return
        if len(self._seen) >= GARBAGE_MEMORY:
            self._seen.clear()
        self._seen[key] = revision
        self.counts[kind] += 1
        log.warning("etcd_garbage", kind=kind, key=key[:LOG_VALUE_CHARS].decode("latin-1"),
                    revision=revision, problem=problem, size=len(value),
                    value=value[:LOG_VALUE_CHARS].decode("latin-1"),
                    decision=_GARBAGE_DECISIONS[kind])


_GARBAGE_DECISIONS = {
    "leader": "counted as held: nobody campaigns while it exists",
    "member": "skipped: that record is no member",
    "switchover": "ignored: no move is made, nobody is held back",
    "pause": "ignored: the cluster is not paused (nothing is held back)",
}


def load_json(value: bytes) -> Any:
    """``json.loads`` that raises only ValueError (also for empty or too deeply nested input,
    which would otherwise escape as RecursionError and end the task that read it)."""
    if not value:
        raise ValueError("empty value")
    try:
        return json.loads(value)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _text(data: dict[str, Any], name: str, default: str = "") -> str:
    value = data.get(name, default)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{name} must be a string of at most {MAX_TEXT} characters")
    return value


def _node_name(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{name} must be a node name (1-63 letters, digits, '.', '_', '-')")
    return value


@dataclass(frozen=True)
class LeaderInfo:
    """The leader key as read from etcd. ``epoch`` is its create revision."""

    node_id: str
    address: str
    since: str
    epoch: int
    lease: int
    valid: bool = True  # False when the value is not a leader record (garbage written by someone)
    # The key's mod revision: equal to the epoch until someone overwrites the key, as no
    # sidecar ever does (it creates the key once and deletes it). 0 when unknown.
    revision: int = 0
    problem: str = ""  # why the value is garbage, for the log and the role reason

    @property
    def overwritten(self) -> bool:
        return self.revision not in (0, self.epoch)


def encode_leader(node_id: str, address: str) -> bytes:
    since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"node_id": node_id, "address": address, "since": since},
                      sort_keys=True).encode()


def decode_leader(value: bytes, epoch: int, lease: int, revision: int = 0) -> LeaderInfo:
    """Read a leader value. Garbage still counts as a leader (the key exists, so nobody may
    take it) but is marked invalid, with the problem named. Logs nothing: see GarbageLog."""
    try:
        data = load_json(value)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return LeaderInfo(_node_name(data, "node_id"), _text(data, "address"),
                          _text(data, "since"), epoch, lease, revision=revision)
    except ValueError as exc:
        return garbage_leader(epoch, lease, revision, str(exc))


def garbage_leader(epoch: int, lease: int, revision: int, problem: str) -> LeaderInfo:
    return LeaderInfo("", "", "", epoch, lease, valid=False, revision=revision, problem=problem)


# A switchover request lives this long (on a lease of its own): a target that is gone by then
# stops holding the others back from campaigning.
SWITCHOVER_TTL = 5


@dataclass(frozen=True)
class SwitchoverRequest:
    """``switchover`` in etcd: hand the leadership to ``target`` (rule 6, a planned move)."""

    target: str
    requested_by: str
    reason: str  # "operator" or "failback"

    def encode(self) -> bytes:
        since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps({"target": self.target, "requested_by": self.requested_by,
                           "reason": self.reason, "requested_at": since,
                           "ttl": SWITCHOVER_TTL}, sort_keys=True).encode()

    @staticmethod
    def decode(value: bytes, lease: int) -> SwitchoverRequest:
        """The request; raises ValueError for garbage. A request without a lease is garbage
        too: every sidecar writes one under a short lease, and one that never expired would
        hold every other node back from campaigning for ever."""
        data = load_json(value)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        request = SwitchoverRequest(_node_name(data, "target"), _text(data, "requested_by"),
                                    _text(data, "reason"))
        if lease == 0:
            raise ValueError("no lease: not written by a sidecar, and it would never expire")
        return request


# The fields of a members/ record that other nodes judge a node by, and their JSON types.
# type() rather than isinstance(): JSON true must not pass for the integer 1, nor 1 for true.
MEMBER_FIELDS: dict[str, type] = {
    "address": str, "role": str, "epoch": int, "version": str, "role_since": str,
    "health": str, "copy_current": bool, "preferred_primary": bool,
    "applied_revision": int, "resource_ip_held": bool,
}


@dataclass(frozen=True)
class MemberRecord:
    """The record under ``members/<node_id>``: a node's own, to publish, or one read back.

    The fields of MEMBER_FIELDS are None where a record read back has none (a node judging
    another reads a missing ``copy_current`` as not caught up, a missing ``health`` as no
    check configured). Fields this version does not know (a newer version's, and this node's
    ``sessions_file``, read only by ``check-host``) travel in ``extras``.
    """

    node_id: str
    address: str | None = None
    role: str | None = None  # a Role's value, e.g. "ROLE_STANDBY"
    epoch: int | None = None
    version: str | None = None
    role_since: str | None = None  # ISO 8601, UTC, milliseconds
    health: str | None = None
    copy_current: bool | None = None
    preferred_primary: bool | None = None
    # Up to which etcd revision the member's session copy is current, and whether every
    # resource IP it is configured with is on its interface (None: none configured).
    applied_revision: int | None = None
    resource_ip_held: bool | None = None
    extras: Mapping[str, object] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        """As JSON values (the election code stores it with sorted keys); fields that are None
        are left out."""
        known = {name: getattr(self, name) for name in ("node_id", *MEMBER_FIELDS)}
        return {**self.extras, **{k: v for k, v in known.items() if v is not None}}

    def get(self, name: str) -> object:
        """A field's JSON value by its name in the record, None when it has none."""
        return self.encode().get(name)


def member_since(role_since: float) -> str:
    """``role_since`` (a time.time()) as a member record writes it."""
    since = datetime.fromtimestamp(role_since, UTC).isoformat(timespec="milliseconds")
    return since.replace("+00:00", "Z")


def decode_member(name: bytes, value: bytes, lease: int) -> MemberRecord:
    """The record under ``members/<name>``; raises ValueError for garbage.

    Its node_id must be the key's name (a record under another key could otherwise stand in
    for a node), it must live on a lease (every sidecar's does; one without outlives its node),
    and the fields in MEMBER_FIELDS must have their types. Unknown fields (a newer version's)
    are kept.
    """
    data = load_json(value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    node_id = _node_name(data, "node_id")
    if node_id.encode() != name:
        raise ValueError("node_id is not the name in the key")
    for field_name, kind in MEMBER_FIELDS.items():
        if field_name in data and type(data[field_name]) is not kind:
            raise ValueError(f"{field_name} must be {kind.__name__}")
        if kind is str and field_name in data:
            _text(data, field_name)
    for number in ("epoch", "applied_revision"):
        if not 0 <= data.get(number, 0) <= MAX_EPOCH:
            raise ValueError(f"{number} out of range")
    if lease == 0:
        raise ValueError("no lease: not written by a live sidecar")
    extras = {k: v for k, v in data.items() if k != "node_id" and k not in MEMBER_FIELDS}
    return MemberRecord(
        node_id, address=data.get("address"), role=data.get("role"), epoch=data.get("epoch"),
        version=data.get("version"), role_since=data.get("role_since"),
        health=data.get("health"), copy_current=data.get("copy_current"),
        preferred_primary=data.get("preferred_primary"),
        applied_revision=data.get("applied_revision"),
        resource_ip_held=data.get("resource_ip_held"), extras=extras)


# -- maintenance mode --------------------------------------------------------------------------

PAUSE_FORMAT = 1


def _utc_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _utc_seconds(data: dict[str, Any], name: str) -> float:
    text = _text(data, name)
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time") from None
    if stamp.tzinfo is None:
        raise ValueError(f"{name} must name its time zone")
    return stamp.timestamp()


@dataclass(frozen=True)
class PauseRecord:
    """``pause`` in etcd: while it exists nothing moves by itself (``vsm-sidecar pause``).

    ``until`` (wall clock) is what ``--for`` asked for, for people to read: the pause ends when
    the key's lease does, whether or not any sidecar runs; without a lease it lasts until
    ``vsm-sidecar resume``."""

    by: str
    reason: str
    since: float  # time.time()
    until: float | None = None

    def encode(self) -> bytes:
        data: dict[str, Any] = {"v": PAUSE_FORMAT, "by": self.by, "reason": self.reason,
                                "since": _utc_text(self.since)}
        if self.until is not None:
            data["until"] = _utc_text(self.until)
        return json.dumps(data, sort_keys=True).encode()

    @staticmethod
    def decode(value: bytes) -> PauseRecord:
        """The pause; raises ValueError for garbage. A record without ``v`` is format 1 (an
        operator's etcdctl put); unknown fields are ignored; an unknown ``v`` is refused."""
        data = load_json(value)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("v", PAUSE_FORMAT)
        if type(version) is not int or version != PAUSE_FORMAT:
            raise ValueError(f"unknown format v={str(version)[:20]}")
        until = _utc_seconds(data, "until") if "until" in data else None
        since = _utc_seconds(data, "since") if "since" in data else 0.0
        return PauseRecord(_text(data, "by"), _text(data, "reason"), since, until)

    def describe(self) -> str:
        """One line: who, since when, until when, why."""
        text = f"paused by {self.by or '?'} since {_utc_text(self.since)}"
        text += f" until {_utc_text(self.until)}" if self.until is not None else \
            " until resumed"
        return f"{text}: {self.reason}" if self.reason else text
