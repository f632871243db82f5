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
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
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
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339_UTC: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z"
)
_PLAIN_RFC3339_UTC: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?Z"
)

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


def validate_session(msg: Session) -> None:
    """Raise SessionValidationError naming the first field of ``msg`` that breaks a rule.

    ``msg.revision`` is not checked: it is output only and never stored.
    """
    encode_session(msg)


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


# -- codec --------------------------------------------------------------------------------------


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


def check_record(raw: bytes, key_id: str) -> None:
    """Raise SessionDecodeError unless ``raw`` is a valid record for the key whose id is
    ``key_id``: the verdict of :func:`decode_session`, at about a seventh of its cost.

    For the mirror, which must skip garbage but has no use for the message itself. The quick
    checks below accept only what decode_session accepts (they are its rules, applied to the
    raw text or the parsed JSON instead of a built message); anything they do not accept at
    once, such as a record near the size limit, goes to decode_session, which decides and names
    the problem. The first matches the whole text against the form that encode_session writes
    (all that a primary stores), which costs less than parsing it as JSON: ~3 µs a record
    against ~10 µs for the second, which takes the JSON as written by hand or by other tools.
    """
    if not (_canonically_valid(raw, key_id) or _plainly_valid(raw, key_id)):
        decode_session(raw, key_id)


def _canonically_valid(raw: bytes, key_id: str) -> bool:
    if len(raw) > MAX_RECORD_BYTES - _CANONICAL_GROWTH:
        return False
    try:
        match = _CANONICAL_RECORD.fullmatch(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return False
    if match is None:
        return False
    session_id, display, pid, *days = match.group(*_CANONICAL_GROUPS)
    return (
        session_id == key_id
        # Digit strings of one length compare as their numbers do; shorter ones are in range.
        and (len(display) < len(_MAX_DISPLAY_DIGITS) or display <= _MAX_DISPLAY_DIGITS)
        and (len(pid) < len(_MAX_INT64_DIGITS) or pid <= _MAX_INT64_DIGITS)
        and all(day is None or _real_day(day) for day in days)
    )


def _plainly_valid(raw: bytes, key_id: str) -> bool:
    if len(raw) > MAX_RECORD_BYTES - _CANONICAL_GROWTH:
        return False
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    if type(doc) is not dict or doc.get("v") != SCHEMA_VERSION or type(doc["v"]) is not int:
        return False
    session_id = doc.get("session_id", "")
    if session_id != key_id or type(session_id) is not str or \
            _token_problem(session_id, MAX_SESSION_ID_LENGTH) is not None:
        return False
    texts = [doc.get(name, "") for name in _TEXT_FIELDS]
    if {*map(type, texts)} != {str} or not _texts_fine(texts, _TEXT_LIMITS):
        return False
    framebuffer = doc.get("framebuffer_size", "")
    display, pid = doc.get("display", 0), doc.get("session_pid", 0)
    attributes = doc.get("attributes", {})
    return (
        bool(doc.get("username"))
        and (not framebuffer or _FRAMEBUFFER_PATTERN.fullmatch(framebuffer) is not None)
        and type(display) is int and 0 <= display <= MAX_DISPLAY
        and type(pid) is int and 0 <= pid <= _MAX_INT64
        and all(_plain_timestamp(doc.get(name)) for name in _TIMESTAMP_FIELDS)
        and type(attributes) is dict and len(attributes) <= MAX_ATTRIBUTES
        and _attributes_fine(attributes)
    )


def _plain_timestamp(value: object) -> bool:
    """Whether ``value`` is null or a time that :func:`parse_timestamp` reads.

    Every such time lies in years 1..9999 with nanos 0..999,999,999, as the message requires.
    The pattern here is stricter than parse_timestamp's (hours, minutes and seconds in range),
    which leaves only the date to check.
    """
    if value is None:
        return True
    if type(value) is not str or _PLAIN_RFC3339_UTC.fullmatch(value) is None:
        return False
    return _real_day(value[:10])


@functools.lru_cache(maxsize=1024)  # sessions of a cluster start on few distinct days
def _real_day(text: str) -> bool:
    """Whether ``text``, YYYY-MM-DD, names a day that exists."""
    try:
        date.fromisoformat(text)  # year 0, month 13, February 30
    except ValueError:
        return False
    return True


def _canonical_record() -> re.Pattern[str]:
    """The pattern of the records that :func:`encode_session` writes, as far as it can check
    decode_session's rules itself: every field, in the encoder's order, with no whitespace.

    Strings hold no escapes and no control characters (those _CONTROL finds), so their text is
    what json.loads returns, and valid UTF-8 (an escape could spell a lone surrogate); lengths
    count characters, as len() does. Text with a quote or a backslash, which the encoder
    escapes, does not match: such a record goes the slower way. What the pattern leaves to
    _canonically_valid: the id against the key's, the upper bound of the numbers, and the day.
    """

    def text(shortest: int, longest: int) -> str:
        return rf'"[^"\\\x00-\x1f\x7f-\x9f]{{{shortest},{longest}}}"'

    def token(longest: int) -> str:  # _ID_PATTERN, at most `longest` characters
        return rf"[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{longest - 1}}}"

    def number(name: str, maximum: int) -> str:  # JSON has no leading zeros: no "007"
        return rf"(?P<{name}>0|[1-9][0-9]{{0,{len(str(maximum)) - 1}}})"

    def timestamp(name: str) -> str:  # _PLAIN_RFC3339_UTC, its day captured
        day, clock = _PLAIN_RFC3339_UTC.pattern.split("T", 1)
        return rf'(?:null|"(?P<{name}>{day})T{clock}")'

    attribute = f'"{token(MAX_ATTRIBUTE_KEY_LENGTH)}":{text(0, MAX_ATTRIBUTE_VALUE_LENGTH)}'
    values = {
        "v": str(SCHEMA_VERSION),
        "session_id": f'"(?P<session_id>{token(MAX_SESSION_ID_LENGTH)})"',
        **{name: text(0, limit) for name, limit in _TEXT_FIELDS.items()},
        "username": text(1, MAX_USERNAME_LENGTH),
        "display": number("display", MAX_DISPLAY),
        **{name: timestamp(name) for name in _TIMESTAMP_FIELDS},
        "framebuffer_size": f'"(?:{_FRAMEBUFFER_PATTERN.pattern})?"',
        "session_pid": number("session_pid", _MAX_INT64),
        # Counting pairs, not distinct keys: a repeated key only makes the pattern stricter.
        "attributes": rf"\{{(?:{attribute}(?:,{attribute}){{0,{MAX_ATTRIBUTES - 1}}})?\}}",
    }
    fields = [f'"{name}":{values[name]}' for name in _to_document(Session())]
    return re.compile(r"\{" + ",".join(fields) + r"\}")


_CANONICAL_RECORD: Final = _canonical_record()
_CANONICAL_GROUPS: Final = ("session_id", "display", "session_pid", *_TIMESTAMP_FIELDS)
_MAX_DISPLAY_DIGITS: Final = str(MAX_DISPLAY)
_MAX_INT64_DIGITS: Final = str(_MAX_INT64)


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


# -- timestamps ---------------------------------------------------------------------------------


def format_timestamp(ts: Timestamp) -> str:
    """RFC 3339 in UTC with a "Z", with 0, 3, 6 or 9 fraction digits as protobuf's JSON does."""
    dt = _EPOCH + timedelta(seconds=ts.seconds)
    # Not strftime: glibc's %Y does not zero-pad years below 1000.
    text = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )
    return text + _format_nanos(ts.nanos) + "Z"


def _format_nanos(nanos: int) -> str:
    if nanos == 0:
        return ""
    if nanos % 1_000_000 == 0:
        return f".{nanos // 1_000_000:03d}"
    if nanos % 1_000 == 0:
        return f".{nanos // 1_000:06d}"
    return f".{nanos:09d}"


def parse_timestamp(text: str) -> Timestamp:
    """Parse ``YYYY-MM-DDTHH:MM:SS[.fraction]Z``; raise ValueError for anything else."""
    match = _RFC3339_UTC.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ)")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    dt = datetime(year, month, day, hour, minute, second, tzinfo=UTC)  # ValueError if no such day
    fraction = match.group(7) or ""
    return Timestamp(
        seconds=(dt - _EPOCH) // timedelta(seconds=1), nanos=int(fraction.ljust(9, "0"))
    )


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
