"""Session records: the limits every record keeps, and the checks of a message against them.

The codec (:mod:`sidecar.sessions.codec`) runs these checks on every record it encodes or
decodes; nothing here touches etcd, JSON or the network.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from collections.abc import Iterable, Mapping
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from sidecar.api.session_pb2 import Session

# -- limits -------------------------------------------------------------------------------------

SCHEMA_VERSION: Final = 1

# The id is the last segment of an etcd key and is repeated in every watch event, log line and
# metric label, so it is kept short; 128 still fits "user@agent.fully.qualified.name:display".
MAX_SESSION_ID_LENGTH: Final = 128
MAX_USERNAME_LENGTH: Final = 256  # POSIX names are short; UPNs ("user@realm") are not
MAX_HOSTNAME_LENGTH: Final = 253  # the longest DNS name
MAX_ADDRESS_LENGTH: Final = 259  # a 253-character DNS name plus ":65535"
MAX_STATUS_LENGTH: Final = 32
MAX_TERMINAL_ID_LENGTH: Final = 256
MAX_SUBCLUSTER_LENGTH: Final = 128
MAX_DISPLAY: Final = 65535  # X display numbers map to TCP ports 6000 + n, so 16 bits at most
MAX_ATTRIBUTES: Final = 64
MAX_ATTRIBUTE_KEY_LENGTH: Final = MAX_SESSION_ID_LENGTH
MAX_ATTRIBUTE_VALUE_LENGTH: Final = 1024
# The whole encoded record. etcd refuses requests over 1.5 MiB by default; 64 KiB keeps a
# grouped transaction of 16 records under 1 MiB, and of 32+ typical (~0.5 KiB) ones far under.
MAX_RECORD_BYTES: Final = 64 * 1024

# Sent by the server, serialised NotPrimary inside, with FAILED_PRECONDITION on a non-primary.
NOT_PRIMARY_METADATA_KEY: Final = "thinlinc-not-primary-bin"

# No "/": ids must not nest in the etcd key space, or a prefix read of sessions/ would mix levels.
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_FRAMEBUFFER_PATTERN: Final = re.compile(r"[0-9]{1,5}x[0-9]{1,5}")
# C0 controls, DEL and C1 controls: NUL and friends break C consumers, terminals and log lines.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# google.protobuf.Timestamp is defined for 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_MIN_SECONDS: Final = -62_135_596_800
_MAX_SECONDS: Final = 253_402_300_799
_MAX_NANOS: Final = 999_999_999
_MAX_INT64: Final = 2**63 - 1

# Plain text fields, in message order, with their maximum length in characters.
_TEXT_FIELDS: Final[Mapping[str, int]] = {
    "username": MAX_USERNAME_LENGTH,
    "agent_hostname": MAX_HOSTNAME_LENGTH,
    "agent_address": MAX_ADDRESS_LENGTH,
    "status": MAX_STATUS_LENGTH,
    "connection_status": MAX_STATUS_LENGTH,
    "last_client_address": MAX_ADDRESS_LENGTH,
    "terminal_id": MAX_TERMINAL_ID_LENGTH,
    "framebuffer_size": len("65535x65535"),
    "subcluster": MAX_SUBCLUSTER_LENGTH,
}
_TEXT_LIMITS: Final = tuple(_TEXT_FIELDS.values())
_TIMESTAMP_FIELDS: Final = ("created_at", "last_connection_at")


# -- errors -------------------------------------------------------------------------------------


class SessionValidationError(ValueError):
    """A session (or id) breaks a rule; ``field`` is the path of the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class SessionDecodeError(ValueError):
    """Stored bytes (or an etcd key) are not a valid session record."""


# -- validation ---------------------------------------------------------------------------------


def validate_session_id(text: str, field: str = "session_id") -> None:
    """Raise SessionValidationError unless ``text`` is a well-formed session id."""
    _check_token(text, field, MAX_SESSION_ID_LENGTH)


def _check_fields(msg: Session) -> None:
    validate_session_id(msg.session_id, "session.session_id")
    texts = [getattr(msg, name) for name in _TEXT_FIELDS]
    if not _texts_fine(texts, _TEXT_LIMITS):  # find and name the first field at fault
        for name, limit in _TEXT_FIELDS.items():
            _check_text(getattr(msg, name), f"session.{name}", limit)
    if not msg.username:
        raise SessionValidationError("session.username", "is required")
    if msg.framebuffer_size and not _FRAMEBUFFER_PATTERN.fullmatch(msg.framebuffer_size):
        raise SessionValidationError("session.framebuffer_size", 'must look like "1920x1080"')
    if not 0 <= msg.display <= MAX_DISPLAY:
        raise SessionValidationError("session.display", f"must be 0..{MAX_DISPLAY}")
    if msg.session_pid < 0:
        raise SessionValidationError("session.session_pid", "must not be negative")
    for name in _TIMESTAMP_FIELDS:
        if msg.HasField(name):
            _check_timestamp(getattr(msg, name), f"session.{name}")
    _check_attributes(msg.attributes)


def _check_token(text: str, field: str, limit: int) -> None:
    problem = _token_problem(text, limit)
    if problem is not None:
        raise SessionValidationError(field, problem)


def _check_text(text: str, field: str, limit: int) -> None:
    problem = _text_problem(text, limit)
    if problem is not None:
        raise SessionValidationError(field, problem)


def _token_problem(text: str, limit: int) -> str | None:
    if not text:
        return "is required"
    if len(text) > limit:
        return f"longer than {limit} characters"
    if not _ID_PATTERN.fullmatch(text):
        return "must start with a letter or digit and contain only A-Z a-z 0-9 . _ : @ -"
    return None


def _texts_fine(texts: list[str], limits: Iterable[int]) -> bool:
    """Whether none of ``texts`` has a problem, checked in one pass over them all: most records
    are fine, and one search and one encode of the whole cost less than one of each per field.
    """
    if any(map(operator.gt, map(len, texts), limits)):
        return False
    joined = " ".join(texts)  # a space is no control character: it cannot make a match
    if _CONTROL.search(joined):
        return False
    try:
        joined.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text_problem(text: str, limit: int) -> str | None:
    if len(text) > limit:
        return f"longer than {limit} characters"
    if _CONTROL.search(text):
        return "contains a control character"
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: protobuf refuses them, plain str does not
        return "is not valid UTF-8 text"
    return None


def _check_timestamp(ts: Timestamp, field: str) -> None:
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        raise SessionValidationError(field, "must lie between years 1 and 9999")
    if not 0 <= ts.nanos <= _MAX_NANOS:
        raise SessionValidationError(field, f"nanos must be 0..{_MAX_NANOS}")


def _check_attributes(attributes: Mapping[str, str]) -> None:
    if len(attributes) > MAX_ATTRIBUTES:
        raise SessionValidationError("session.attributes", f"more than {MAX_ATTRIBUTES} entries")
    if _attributes_fine(attributes):
        return
    for key, value in attributes.items():
        problem = _token_problem(key, MAX_ATTRIBUTE_KEY_LENGTH) or _text_problem(
            value, MAX_ATTRIBUTE_VALUE_LENGTH
        )
        if problem is not None:  # the field path is built only here: most records are fine
            raise SessionValidationError(f"session.attributes[{_quote_key(key)}]", problem)


def _attributes_fine(attributes: Mapping[str, object]) -> bool:
    """Whether every key is a well-formed token and every value fine text (str), in one pass."""
    values = [value for value in attributes.values() if type(value) is str]
    if len(values) != len(attributes):
        return False
    return all(_token_problem(key, MAX_ATTRIBUTE_KEY_LENGTH) is None for key in attributes) and \
        _texts_fine(values, itertools.repeat(MAX_ATTRIBUTE_VALUE_LENGTH, len(values)))


def _quote_key(key: str) -> str:
    # The key goes into an error message: escape it and cut it so a hostile key stays harmless.
    shown = key if len(key) <= 40 else key[:40] + "..."
    return json.dumps(shown)
