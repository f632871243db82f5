"""Session records: the JSON codec for etcd (the form is described in
:mod:`sidecar.sessions.record`).

Nothing here touches etcd or the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from sidecar.api.session_pb2 import Session

from .timestamps import format_timestamp, parse_checked_timestamp, parse_timestamp
from .validation import (
    _MAX_INT64,
    _TEXT_FIELDS,
    _TIMESTAMP_FIELDS,
    MAX_RECORD_BYTES,
    SCHEMA_VERSION,
    SessionDecodeError,
    SessionValidationError,
    _check_fields,
    _quote_key,
)


def validate_session(msg: Session) -> None:
    """Raise SessionValidationError naming the first field of ``msg`` that breaks a rule.

    ``msg.revision`` is not checked: it is output only and never stored.
    """
    encode_session(msg)



def encode_session(msg: Session) -> bytes:
    """Validate ``msg`` and return its JSON record (without ``revision``).

    Raises SessionValidationError, so nothing that breaks a rule can reach etcd through here.
    """
    _check_fields(msg)
    raw = json.dumps(_to_document(msg), ensure_ascii=False, separators=(",", ":")).encode()
    if len(raw) > MAX_RECORD_BYTES:
        raise SessionValidationError(
            "session", f"encoded record is {len(raw)} bytes, more than {MAX_RECORD_BYTES}"
        )
    return raw


def _to_document(msg: Session) -> dict[str, object]:
    doc: dict[str, object] = {"v": SCHEMA_VERSION, "session_id": msg.session_id}
    for name in ("username", "agent_hostname", "agent_address"):
        doc[name] = getattr(msg, name)
    doc["display"] = msg.display
    doc["status"] = msg.status
    doc["connection_status"] = msg.connection_status
    for name in _TIMESTAMP_FIELDS:
        doc[name] = format_timestamp(getattr(msg, name)) if msg.HasField(name) else None
    for name in ("last_client_address", "terminal_id", "framebuffer_size"):
        doc[name] = getattr(msg, name)
    doc["session_pid"] = msg.session_pid
    doc["subcluster"] = msg.subcluster
    doc["attributes"] = dict(sorted(msg.attributes.items()))
    return doc


def decode_session(raw: bytes, key_id: str) -> Session:
    """Parse and validate the record stored under the key whose id is ``key_id``.

    Raises SessionDecodeError (and nothing else) when ``raw`` is not a valid record for that key:
    not UTF-8 JSON, a wrong type, an unknown schema version, an id that differs from the key's,
    or a field that breaks a validation rule.
    """
    doc = _load_document(raw)
    msg = _from_document(doc)
    if msg.session_id != key_id:
        raise SessionDecodeError(f"record id {msg.session_id!r} differs from key id {key_id!r}")
    try:
        _check_fields(msg)
        # Re-encoding to measure costs as much as the decoding itself, and is needed only near
        # the limit: the canonical form is never longer than `raw` plus _CANONICAL_GROWTH.
        if len(raw) > MAX_RECORD_BYTES - _CANONICAL_GROWTH:
            encode_session(msg)
    except SessionValidationError as exc:
        raise SessionDecodeError(f"invalid record: {exc}") from exc
    return msg




# How much longer the canonical encoding of a decoded record can be than the JSON it came from:
# the keys that JSON may leave out (filled in with defaults), and 2 digits per timestamp whose
# fraction is widened to 3, 6 or 9 digits. Whitespace, escapes, duplicate keys and key order can
# only make the canonical form shorter or keep its length.
_CANONICAL_GROWTH: Final = len(
    json.dumps(_to_document(Session()), separators=(",", ":"))
) + 2 * len(_TIMESTAMP_FIELDS)


def _load_document(raw: bytes) -> dict[str, object]:
    if len(raw) > MAX_RECORD_BYTES:
        raise SessionDecodeError(f"record is {len(raw)} bytes, more than {MAX_RECORD_BYTES}")
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16 and UTF-32.
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested deep
        raise SessionDecodeError(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SessionDecodeError("not a JSON object")
    version = doc.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise SessionDecodeError(f"unknown schema version {version!r}")
    return doc


def _from_document(doc: dict[str, object]) -> Session:
    msg = Session(session_id=_text(doc, "session_id"))
    for name in _TEXT_FIELDS:
        setattr(msg, name, _text(doc, name))
    msg.display = _integer(doc, "display", 2**31 - 1)
    msg.session_pid = _integer(doc, "session_pid", _MAX_INT64)
    for name in _TIMESTAMP_FIELDS:
        value = doc.get(name)
        if value is not None:
            getattr(msg, name).CopyFrom(_timestamp(value, name))
    msg.attributes.update(_attributes(doc))
    return msg


def _text(doc: Mapping[str, object], name: str, label: str | None = None) -> str:
    value = doc.get(name, "")
    label = label or name
    if type(value) is not str:
        raise SessionDecodeError(f"{label}: expected a string, got {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError:  # JSON can spell lone surrogates ("\ud800"); protobuf refuses them
        raise SessionDecodeError(f"{label}: not valid UTF-8 text") from None
    return value


def _integer(doc: Mapping[str, object], name: str, maximum: int) -> int:
    value = doc.get(name, 0)
    # type() rather than isinstance(): JSON true/false must not pass as 1/0.
    if type(value) is not int:
        raise SessionDecodeError(f"{name}: expected an integer, got {type(value).__name__}")
    if not -maximum - 1 <= value <= maximum:
        raise SessionDecodeError(f"{name}: {value} out of range")
    return value


def _timestamp(value: object, name: str) -> Timestamp:
    if type(value) is not str:
        raise SessionDecodeError(f"{name}: expected an RFC 3339 string or null")
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise SessionDecodeError(f"{name}: {exc}") from None


def _attributes(doc: Mapping[str, object]) -> dict[str, str]:
    value = doc.get("attributes", {})
    if not isinstance(value, dict):
        raise SessionDecodeError("attributes: expected an object")
    for key in value:
        # Keys are str by JSON (but may hold lone surrogates); the values must be str too.
        _text({"key": key}, "key", "attributes key")
        _text(value, key, f"attributes[{_quote_key(key)}]")
    return value


def decode_checked(raw: bytes, session_id: str, revision: int) -> Session:
    """The message of a record that the copy holds, with its revision.

    The copy holds only records that passed :func:`~sidecar.sessions.recordcheck.check_record`
    (the verdict of :func:`decode_session`) when they were applied, so their rules are not
    checked again: this is what a snapshot or a listing sends for every record, and checking
    cost two thirds of decode_session. The result is decode_session's (a test holds them
    equal); bytes that are not such a record raise ValueError, TypeError or KeyError.
    """
    doc = json.loads(raw)
    get = doc.get
    msg = Session(
        session_id=session_id, username=get("username", ""),
        agent_hostname=get("agent_hostname", ""), agent_address=get("agent_address", ""),
        display=get("display", 0), status=get("status", ""),
        connection_status=get("connection_status", ""),
        last_client_address=get("last_client_address", ""), terminal_id=get("terminal_id", ""),
        framebuffer_size=get("framebuffer_size", ""), session_pid=get("session_pid", 0),
        subcluster=get("subcluster", ""), attributes=get("attributes", {}), revision=revision)
    created, connected = get("created_at"), get("last_connection_at")
    if created is not None:
        msg.created_at.seconds, msg.created_at.nanos = parse_checked_timestamp(created)
    if connected is not None:
        seconds, nanos = parse_checked_timestamp(connected)
        msg.last_connection_at.seconds, msg.last_connection_at.nanos = seconds, nanos
    return msg
