"""Session records: validation, the JSON codec for etcd, and key helpers.

A session record lives in etcd under ``<prefix>sessions/<session id>`` as one JSON document that an
operator can read with ``etcdctl get --prefix``::

    {"v":1,"session_id":"agent1:10","username":"alice",...,"attributes":{"k":"v"}}

The document always carries every field, in the order of the ``Session`` message (after ``"v"``,
the schema version), with attributes sorted by key, so equal records encode to equal bytes;
timestamps are RFC 3339 in UTC (``2024-05-01T12:00:00Z``) or ``null`` when unset. The etcd mod
revision is not stored in the document: etcd keeps it beside the value.

Decoding ignores keys it does not know and takes missing ones as empty, so a later version can
add a field without a new schema version; a change that old readers would misread bumps ``"v"``.

Nothing here touches etcd or the network.

The parts: the limits and checks (:mod:`sidecar.sessions.validation`), the codec
(:mod:`sidecar.sessions.codec`), the mirror's quick check of a stored record
(:mod:`sidecar.sessions.recordcheck`) and timestamps (:mod:`sidecar.sessions.timestamps`);
this module names them all, with the etcd key helpers.
"""

from __future__ import annotations

from .codec import decode_checked, decode_session, encode_session, validate_session
from .recordcheck import check_record, kept_form, merge_kept, verify_record
from .timestamps import format_timestamp, parse_timestamp
from .validation import (
    MAX_ADDRESS_LENGTH,
    MAX_ATTRIBUTE_KEY_LENGTH,
    MAX_ATTRIBUTE_VALUE_LENGTH,
    MAX_ATTRIBUTES,
    MAX_DISPLAY,
    MAX_HOSTNAME_LENGTH,
    MAX_RECORD_BYTES,
    MAX_SESSION_ID_LENGTH,
    MAX_STATUS_LENGTH,
    MAX_SUBCLUSTER_LENGTH,
    MAX_TERMINAL_ID_LENGTH,
    MAX_USERNAME_LENGTH,
    NOT_PRIMARY_METADATA_KEY,
    SCHEMA_VERSION,
    SessionDecodeError,
    SessionValidationError,
    validate_session_id,
)

__all__ = [
    "MAX_ADDRESS_LENGTH",
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY_LENGTH",
    "MAX_ATTRIBUTE_VALUE_LENGTH",
    "MAX_DISPLAY",
    "MAX_HOSTNAME_LENGTH",
    "MAX_RECORD_BYTES",
    "MAX_SESSION_ID_LENGTH",
    "MAX_STATUS_LENGTH",
    "MAX_SUBCLUSTER_LENGTH",
    "MAX_TERMINAL_ID_LENGTH",
    "MAX_USERNAME_LENGTH",
    "NOT_PRIMARY_METADATA_KEY",
    "SCHEMA_VERSION",
    "SessionDecodeError",
    "SessionValidationError",
    "check_record",
    "decode_checked",
    "decode_session",
    "encode_session",
    "format_timestamp",
    "kept_form",
    "merge_kept",
    "parse_timestamp",
    "session_id_from_key",
    "session_key",
    "sessions_prefix",
    "validate_session",
    "validate_session_id",
    "verify_record",
]


# -- etcd keys ----------------------------------------------------------------------------------


def sessions_prefix(prefix: str) -> str:
    """The key prefix under which every record lives: ``<prefix>sessions/``.

    ``prefix`` is the cluster prefix (``/thinlinc-ha/<cluster>/``); a missing final "/" is added.
    """
    return (prefix if prefix.endswith("/") else prefix + "/") + "sessions/"


def session_key(prefix: str, session_id: str) -> str:
    """The etcd key of one record; raises SessionValidationError for a malformed id."""
    validate_session_id(session_id)
    return sessions_prefix(prefix) + session_id


def session_id_from_key(prefix: str, key: bytes | str) -> str:
    """The session id in an etcd key; raises SessionDecodeError when the key is not a record's."""
    text = _key_text(key)
    head = sessions_prefix(prefix)
    if not text.startswith(head):
        raise SessionDecodeError(f"key {text!r} is not under {head!r}")
    session_id = text[len(head) :]
    try:
        validate_session_id(session_id)
    except SessionValidationError as exc:
        raise SessionDecodeError(f"key {text!r}: {exc.reason}") from exc
    return session_id


def _key_text(key: bytes | str) -> str:
    if isinstance(key, str):
        return key
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise SessionDecodeError(f"key {key!r} is not UTF-8") from None
