"""Session records: validation, the JSON codec stored in etcd, and key helpers."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.api.session_pb2 import Session
from sidecar.sessions import codec, recordcheck, validation
from sidecar.sessions.record import (
    MAX_ATTRIBUTE_VALUE_LENGTH,
    MAX_ATTRIBUTES,
    MAX_RECORD_BYTES,
    MAX_SESSION_ID_LENGTH,
    SessionDecodeError,
    SessionValidationError,
    check_record,
    decode_checked,
    decode_session,
    encode_session,
    format_timestamp,
    parse_timestamp,
    session_id_from_key,
    session_key,
    sessions_prefix,
    validate_session,
    validate_session_id,
)

from .. import builders

PREFIX = "/thinlinc-ha/prod/"


def make_session(**fields: object) -> Session:
    """A complete, valid session; keyword arguments replace fields."""
    session = builders.session(
        connection_status="connected",
        last_client_address="198.51.100.7",
        terminal_id="00:16:3e:12:34:56",
        framebuffer_size="1920x1080",
        session_pid=4242,
        subcluster="default",
        attributes={"locale": "sv_SE.UTF-8", "client": "4.17.0"},
    )
    session.created_at.FromSeconds(1_714_550_400)
    session.last_connection_at.FromMilliseconds(1_714_560_000_123)
    for name, value in fields.items():
        if name == "attributes":
            session.attributes.clear()
            session.attributes.update(value)  # type: ignore[call-overload]
        else:
            setattr(session, name, value)
    return session


def _set_seconds(field: str, seconds: int, nanos: int = 0) -> Callable[[Session], None]:
    def change(session: Session) -> None:
        getattr(session, field).CopyFrom(Timestamp(seconds=seconds, nanos=nanos))

    return change


def _set(**fields: object) -> Callable[[Session], None]:
    def change(session: Session) -> None:
        fresh = make_session(**fields)
        session.CopyFrom(fresh)

    return change


# (change to a valid session, the field the error must name)
INVALID: dict[str, tuple[Callable[[Session], None], str]] = {
    "empty id": (_set(session_id=""), "session.session_id"),
    "id with slash": (_set(session_id="agent1/10"), "session.session_id"),
    "id starting with dash": (_set(session_id="-x"), "session.session_id"),
    "id with space": (_set(session_id="a b"), "session.session_id"),
    "id with non-ASCII": (_set(session_id="sessiön"), "session.session_id"),
    "id too long": (_set(session_id="x" * 129), "session.session_id"),
    "no user": (_set(username=""), "session.username"),
    "NUL in user": (_set(username="al\x00ice"), "session.username"),
    "user too long": (_set(username="u" * 257), "session.username"),
    "host name too long": (_set(agent_hostname="h" * 254), "session.agent_hostname"),
    "newline in address": (_set(agent_address="10.0.0.1\n"), "session.agent_address"),
    "status too long": (_set(status="s" * 33), "session.status"),
    "DEL in connection status": (_set(connection_status="up\x7f"), "session.connection_status"),
    "C1 control in client": (_set(last_client_address="\x85"), "session.last_client_address"),
    "terminal id too long": (_set(terminal_id="t" * 257), "session.terminal_id"),
    "framebuffer not WxH": (_set(framebuffer_size="big"), "session.framebuffer_size"),
    "framebuffer with depth": (_set(framebuffer_size="1920x1080x24"), "session.framebuffer_size"),
    "tab in subcluster": (_set(subcluster="a\tb"), "session.subcluster"),
    "negative display": (_set(display=-1), "session.display"),
    "display too large": (_set(display=65536), "session.display"),
    "negative pid": (_set(session_pid=-1), "session.session_pid"),
    "created after 9999": (_set_seconds("created_at", 253_402_300_800), "session.created_at"),
    "created before year 1": (_set_seconds("created_at", -62_135_596_801), "session.created_at"),
    "negative nanos": (_set_seconds("last_connection_at", 0, -1), "session.last_connection_at"),
    "nanos overflow": (
        _set_seconds("last_connection_at", 0, 1_000_000_000),
        "session.last_connection_at",
    ),
    "too many attributes": (
        _set(attributes={f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)}),
        "session.attributes",
    ),
    "attribute key with space": (
        _set(attributes={"bad key": "v"}),
        'session.attributes["bad key"]',
    ),
    "empty attribute key": (_set(attributes={"": "v"}), 'session.attributes[""]'),
    "NUL in attribute value": (_set(attributes={"k": "a\x00"}), 'session.attributes["k"]'),
    "attribute value too long": (
        _set(attributes={"k": "v" * (MAX_ATTRIBUTE_VALUE_LENGTH + 1)}),
        'session.attributes["k"]',
    ),
    "record too large": (
        _set(attributes={f"k{i}": "v" * MAX_ATTRIBUTE_VALUE_LENGTH for i in range(MAX_ATTRIBUTES)}),
        "session",
    ),
}


@pytest.mark.parametrize(("change", "field"), INVALID.values(), ids=INVALID.keys())
def test_invalid_session_names_the_field(change: Callable[[Session], None], field: str) -> None:
    """Each broken rule is refused with SessionValidationError naming the offending field."""
    session = make_session()
    change(session)
    with pytest.raises(SessionValidationError) as caught:
        validate_session(session)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    with pytest.raises(SessionValidationError):
        encode_session(session)  # nothing invalid can be encoded for etcd either


def test_long_attribute_key_is_cut_in_the_field_path() -> None:
    """A hostile long key does not make the error message long."""
    session = make_session(attributes={"k" * 1000: "v"})
    with pytest.raises(SessionValidationError) as caught:
        validate_session(session)
    assert caught.value.field == 'session.attributes["' + "k" * 40 + '..."]'


def test_limits_are_inclusive() -> None:
    """Values exactly at each limit are accepted, and a minimal session is valid."""
    validate_session(make_session(session_id="a" * MAX_SESSION_ID_LENGTH, display=65535))
    validate_session(make_session(display=0, session_pid=0, framebuffer_size=""))
    validate_session(make_session(session_id="A9._:@-z", username="ålice@EXAMPLE.COM"))
    validate_session(Session(session_id="s1", username="bob"))
    validate_session(make_session(attributes={f"k{i}": "v" for i in range(MAX_ATTRIBUTES)}))


def test_validate_session_id_uses_the_given_field() -> None:
    """The id check names whatever field the caller says the id came from."""
    validate_session_id("agent1:10")
    with pytest.raises(SessionValidationError) as caught:
        validate_session_id("a/b", field="session_id")
    assert caught.value.field == "session_id"
    with pytest.raises(SessionValidationError) as caught:
        validate_session_id("", field="request.session_id")
    assert caught.value.field == "request.session_id"


# -- the JSON record ------------------------------------------------------------------------------


def test_encoding_is_readable_json_in_a_fixed_order() -> None:
    """The record is compact JSON, "v" first, fields in message order, UTC timestamps."""
    session = make_session(attributes={"zeta": "1", "alpha": "2"})
    session.revision = 99
    doc = json.loads(encode_session(session))
    assert list(doc) == [
        "v",
        "session_id",
        "username",
        "agent_hostname",
        "agent_address",
        "display",
        "status",
        "connection_status",
        "created_at",
        "last_connection_at",
        "last_client_address",
        "terminal_id",
        "framebuffer_size",
        "session_pid",
        "subcluster",
        "attributes",
    ]
    assert doc["v"] == 1
    assert doc["created_at"] == "2024-05-01T08:00:00Z"
    assert doc["last_connection_at"] == "2024-05-01T10:40:00.123Z"
    assert list(doc["attributes"]) == ["alpha", "zeta"]
    assert "revision" not in doc


def test_equal_records_encode_to_equal_bytes() -> None:
    """Attribute insertion order does not change the bytes (so unchanged records compare equal)."""
    first = make_session(attributes={"a": "1", "b": "2"})
    second = make_session(attributes={"b": "2", "a": "1"})
    assert encode_session(first) == encode_session(second)


def test_unset_timestamps_are_null_and_stay_unset() -> None:
    """An unset timestamp is stored as null and decodes as unset (not as the epoch)."""
    session = Session(session_id="s1", username="bob")
    raw = encode_session(session)
    assert json.loads(raw)["created_at"] is None
    decoded = decode_session(raw, "s1")
    assert not decoded.HasField("created_at")
    assert decoded == session


def test_non_ascii_text_is_stored_as_utf8() -> None:
    """Names stay readable with etcdctl: UTF-8, not \\u escapes."""
    raw = encode_session(make_session(username="Åsa Öberg"))
    assert "Åsa Öberg".encode() in raw


def _doc(**changes: object) -> bytes:
    doc = json.loads(encode_session(make_session()))
    for name, value in changes.items():
        if value is _DROP:
            del doc[name]
        else:
            doc[name] = value
    return json.dumps(doc).encode()


_DROP = object()
KEY_ID = "agent1.example.com:10"

GARBAGE: dict[str, bytes] = {
    "empty": b"",
    "not JSON": b"hello",
    "not UTF-8": b'{"v":1,"username":"\xff"}',
    "UTF-16 JSON": json.dumps({"v": 1}).encode("utf-16"),
    "array": b"[1,2]",
    "string": b'"x"',
    "deep nesting": b"[" * 50_000,  # under the size limit, so the parser meets it
    "huge integer": b'{"v":1,"display":' + b"9" * 5000 + b"}",
    "too large": b" " * (MAX_RECORD_BYTES + 1),
    "no version": _doc(v=_DROP),
    "version 2": _doc(v=2),
    "version true": _doc(v=True),
    "version as text": _doc(v="1"),
    "id differs from key": _doc(session_id="other:11"),
    "no id": _doc(session_id=_DROP),
    "display as text": _doc(display="10"),
    "display as bool": _doc(display=True),
    "display as float": _doc(display=10.0),
    "display beyond int32": _doc(display=2**40),
    "display out of range": _doc(display=70000),
    "pid beyond int64": _doc(session_pid=2**64),
    "user as number": _doc(username=5),
    "user null": _doc(username=None),
    "user with NUL": _doc(username="a\x00"),
    "user a lone surrogate": b'{"v":1,"session_id":"agent1.example.com:10","username":"\\ud800"}',
    "attributes as list": _doc(attributes=["a"]),
    "attribute value as number": _doc(attributes={"k": 1}),
    "attribute key a lone surrogate": b'{"v":1,"session_id":"agent1.example.com:10",'
    b'"username":"a","attributes":{"\\udc00":"x"}}',
    "timestamp with a space": _doc(created_at="2024-05-01 08:00:00Z"),
    "timestamp with an offset": _doc(created_at="2024-05-01T08:00:00+02:00"),
    "timestamp February 30": _doc(created_at="2024-02-30T08:00:00Z"),
    "timestamp year 0": _doc(created_at="0000-01-01T00:00:00Z"),
    "timestamp 10 fraction digits": _doc(created_at="2024-05-01T08:00:00.1234567890Z"),
    "timestamp as number": _doc(created_at=1714550400),
    "timestamp leap second": _doc(created_at="2016-12-31T23:59:60Z"),
}


@pytest.mark.parametrize("raw", GARBAGE.values(), ids=GARBAGE.keys())
def test_decode_refuses_garbage_with_session_decode_error(raw: bytes) -> None:
    """Whatever is wrong with stored bytes, decoding raises SessionDecodeError (a ValueError)."""
    with pytest.raises(SessionDecodeError):
        decode_session(raw, KEY_ID)


@pytest.mark.parametrize("raw", GARBAGE.values(), ids=GARBAGE.keys())
def test_check_record_refuses_the_same_garbage(raw: bytes) -> None:
    """The mirror's cheaper check refuses every record that decoding refuses."""
    with pytest.raises(SessionDecodeError):
        check_record(raw, KEY_ID)


def _verdict(
    check: Callable[[bytes, str], object], raw: bytes, key_id: str = KEY_ID
) -> str | None:
    try:
        check(raw, key_id)
    except SessionDecodeError as exc:
        return str(exc)
    return None


_QUICK_PATH_CASES: dict[str, dict[str, object]] = {
    "hour 24": {"created_at": "2024-05-01T24:00:00Z"},
    "minute 60": {"last_connection_at": "2024-05-01T08:60:00Z"},
    "second 60": {"created_at": "2024-05-01T08:00:60Z"},
    "day 0": {"created_at": "2024-05-00T08:00:00Z"},
    "not a leap year": {"created_at": "2023-02-29T08:00:00Z"},
    "a leap year": {"created_at": "2024-02-29T08:00:00Z"},
    "year 1": {"created_at": "0001-01-01T00:00:00Z"},
    "year 9999": {"last_connection_at": "9999-12-31T23:59:59.999999999Z"},
    "display 65535": {"display": 65535},
    "display -1": {"display": -1},
    "pid 2**63 - 1": {"session_pid": 2**63 - 1},
    "pid -1": {"session_pid": -1},
    "empty user": {"username": ""},
    "framebuffer 1x": {"framebuffer_size": "1x"},
    "C1 control in a value": {"attributes": {"k": "a\x85"}},
    "DEL in a text": {"terminal_id": "a\x7f"},
    "non-ASCII text": {"username": "ålice", "attributes": {"k": "ü"}},
    "attribute key with a slash": {"attributes": {"a/b": "x"}},
    "65 attributes": {"attributes": {f"k{i}": "v" for i in range(65)}},
    "64 attributes": {"attributes": {f"k{i}": "v" for i in range(64)}},
    "long hostname": {"agent_hostname": "h" * 254},
    "longest hostname": {"agent_hostname": "h" * 253},
    "version 1.0": {"v": 1.0},
}


@pytest.mark.parametrize("changes", _QUICK_PATH_CASES.values(), ids=_QUICK_PATH_CASES.keys())
def test_check_record_agrees_with_decode_at_the_edges(changes: dict[str, object]) -> None:
    """At each rule's edge, the check accepts exactly what decoding accepts, and refuses the
    rest with the same message."""
    doc = json.loads(encode_session(make_session()))
    doc.update(changes)
    raw = json.dumps(doc, ensure_ascii=False).encode()
    assert _verdict(check_record, raw) == _verdict(decode_session, raw)


def _compact(doc: dict[str, object]) -> bytes:
    """A document written as encode_session writes it: no whitespace, text as is."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


# Edges of the rules that the check matches on the text of a record in the encoder's form.
_TEXT_PATH_CASES: dict[str, dict[str, object]] = {
    **_QUICK_PATH_CASES,
    "display 0": {"display": 0},
    "display 65536": {"display": 65536},
    "display 99999": {"display": 99999},
    "display 100000": {"display": 100000},
    "display 2**31": {"display": 2**31},
    "pid 0": {"session_pid": 0},
    "pid 2**63": {"session_pid": 2**63},
    "pid 19 nines": {"session_pid": 10**19 - 1},
    "pid 10**19": {"session_pid": 10**19},
    "pid as float": {"session_pid": 1.5},
    "display with exponent": {"display": 1e3},
    "longest user": {"username": "u" * 256},
    "user too long": {"username": "u" * 257},
    "longest non-ASCII user": {"username": "å" * 256},
    "non-ASCII user too long": {"username": "å" * 257},
    "longest status": {"status": "s" * 32},
    "status too long": {"connection_status": "s" * 33},
    "user with a quote": {"username": 'a"b'},
    "user with a backslash": {"username": "a\\b"},
    "user with a newline": {"username": "a\nb"},
    "user with NBSP": {"username": "a\xa0b"},
    "user with U+2028": {"username": "a\u2028b"},
    "user with U+009F": {"username": "a\x9fb"},
    "user null": {"username": None},
    "no timestamps": {"created_at": None, "last_connection_at": None},
    "timestamp year 0": {"created_at": "0000-01-01T00:00:00Z"},
    "timestamp month 13": {"created_at": "2024-13-01T00:00:00Z"},
    "timestamp month 0": {"last_connection_at": "2024-00-10T00:00:00Z"},
    "timestamp April 31": {"created_at": "2024-04-31T00:00:00Z"},
    "timestamp December 31": {"created_at": "2024-12-31T23:59:59Z"},
    "timestamp 9 fraction digits": {"created_at": "2024-05-01T08:00:00.123456789Z"},
    "timestamp 10 fraction digits": {"created_at": "2024-05-01T08:00:00.1234567890Z"},
    "timestamp lower-case z": {"created_at": "2024-05-01T08:00:00z"},
    "framebuffer empty": {"framebuffer_size": ""},
    "framebuffer 6 digits": {"framebuffer_size": "123456x1"},
    "framebuffer x only": {"framebuffer_size": "x"},
    "longest attribute key": {"attributes": {"k" * 128: "v"}},
    "attribute key too long": {"attributes": {"k" * 129: "v"}},
    "empty attribute key": {"attributes": {"": "v"}},
    "attribute key with a dash first": {"attributes": {"-k": "v"}},
    "longest attribute value": {"attributes": {"k": "v" * 1024}},
    "attribute value too long": {"attributes": {"k": "v" * 1025}},
    "attribute value null": {"attributes": {"k": None}},
    "attributes null": {"attributes": None},
    "version 2": {"v": 2},
    "version true": {"v": True},
}


@pytest.mark.parametrize("changes", _TEXT_PATH_CASES.values(), ids=_TEXT_PATH_CASES.keys())
def test_check_record_agrees_with_decode_at_the_edges_in_the_encoders_form(
    changes: dict[str, object],
) -> None:
    """Written compactly with the fields in the encoder's order, as a primary writes them, the
    records at each rule's edge get the verdict and message of decoding too."""
    doc = json.loads(encode_session(make_session()))
    doc.update(changes)
    raw = _compact(doc)
    assert _verdict(check_record, raw) == _verdict(decode_session, raw)


@pytest.mark.parametrize("length", [1, 127, 128, 129])
def test_check_record_agrees_with_decode_on_long_ids(length: int) -> None:
    """An id at and past the length limit, equal to the key's, gets decoding's verdict."""
    key_id = "a" * length
    raw = encode_session(make_session(session_id="x")).replace(b'"x"', f'"{key_id}"'.encode())
    verdict = _verdict(check_record, raw, key_id)
    assert verdict == _verdict(decode_session, raw, key_id)
    assert (verdict is None) == (length <= MAX_SESSION_ID_LENGTH)


def test_the_encoders_records_are_checked_as_text() -> None:
    """A record as encode_session writes it is accepted by matching its text, without parsing
    it as JSON; the same record pretty-printed is not matched, and left to the other checks."""
    raw = encode_session(make_session())
    assert recordcheck._canonical_match(raw, KEY_ID) is not None
    assert recordcheck._canonical_match(raw, "other:11") is None
    pretty = json.dumps(json.loads(raw), indent=1).encode()
    assert recordcheck._canonical_match(pretty, KEY_ID) is None
    assert _verdict(check_record, pretty) is None


def test_the_texts_pattern_refuses_the_control_characters_of_the_rules() -> None:
    """The characters that a string matched as text may hold are exactly those the validation
    allows in text, less the quote and the backslash (which JSON escapes)."""
    username = recordcheck._CANONICAL_RECORD.pattern.split('"username":"', 1)[1]
    allowed = username.removeprefix("(?P<username>").split("{", 1)[0]
    for code in [*range(0x300), 0x2028, 0xFEFF, 0x10FFFF]:
        char = chr(code)
        expected = char not in '"\\' and validation._CONTROL.search(char) is None
        assert (re.fullmatch(allowed, char) is not None) == expected, hex(code)


def test_decode_ignores_unknown_keys_and_fills_missing_ones() -> None:
    """A newer writer's extra field is ignored; fields an older writer left out are empty."""
    raw = json.dumps(
        {"v": 1, "session_id": KEY_ID, "username": "alice", "future_field": {"x": [1]}}
    ).encode()
    assert decode_session(raw, KEY_ID) == Session(session_id=KEY_ID, username="alice")


def test_decode_accepts_what_an_operator_may_write() -> None:
    """Pretty-printed JSON, escapes and 1..9 fraction digits are read into the same record."""
    session = make_session()
    pretty = json.dumps(json.loads(encode_session(session)), indent=4, ensure_ascii=True)
    assert decode_session(pretty.encode(), KEY_ID) == session
    raw = _doc(created_at="2024-05-01T08:00:00.5Z")
    assert decode_session(raw, KEY_ID).created_at == Timestamp(
        seconds=1_714_550_400, nanos=5 * 10**8
    )


# -- timestamps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos", "text"),
    [
        (0, 0, "1970-01-01T00:00:00Z"),
        (-1, 0, "1969-12-31T23:59:59Z"),
        (-62_135_596_800, 0, "0001-01-01T00:00:00Z"),
        (253_402_300_799, 999_999_999, "9999-12-31T23:59:59.999999999Z"),
        (1_714_550_400, 120_000_000, "2024-05-01T08:00:00.120Z"),
        (1_714_550_400, 1_000, "2024-05-01T08:00:00.000001Z"),
        (1_714_550_400, 1, "2024-05-01T08:00:00.000000001Z"),
    ],
)
def test_timestamps_are_rfc3339_utc(seconds: int, nanos: int, text: str) -> None:
    """Timestamps print as protobuf's JSON does and parse back to the same instant."""
    ts = Timestamp(seconds=seconds, nanos=nanos)
    assert format_timestamp(ts) == text
    assert parse_timestamp(text) == ts


# -- keys -----------------------------------------------------------------------------------------


def test_session_keys_round_trip() -> None:
    """An id becomes <prefix>sessions/<id> and comes back out of the key (str or bytes)."""
    key = session_key(PREFIX, "agent1:10")
    assert key == "/thinlinc-ha/prod/sessions/agent1:10"
    assert session_key("/thinlinc-ha/prod", "agent1:10") == key  # missing slash added
    assert sessions_prefix(PREFIX) == "/thinlinc-ha/prod/sessions/"
    assert session_id_from_key(PREFIX, key) == "agent1:10"
    assert session_id_from_key(PREFIX, key.encode()) == "agent1:10"


@pytest.mark.parametrize(
    "key",
    [
        b"/thinlinc-ha/other/sessions/agent1:10",
        b"/thinlinc-ha/prod/members/node1",
        b"/thinlinc-ha/prod/sessions/",
        b"/thinlinc-ha/prod/sessions/a/b",
        b"/thinlinc-ha/prod/sessions/\xff",
    ],
)
def test_foreign_keys_are_refused(key: bytes) -> None:
    """A key that is not a record's under this prefix raises SessionDecodeError."""
    with pytest.raises(SessionDecodeError):
        session_id_from_key(PREFIX, key)


def test_session_key_refuses_a_bad_id() -> None:
    """No key is made for an id that could escape the sessions/ level."""
    with pytest.raises(SessionValidationError):
        session_key(PREFIX, "../leader")


# -- properties -----------------------------------------------------------------------------------

# Timing is not under test: no per-example deadline (a loaded CI machine), and no "too slow"
# health check (the first text strategy of a fresh checkout builds Hypothesis's Unicode tables).
properties = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ID_ALPHABET),
    st.text(alphabet=_ID_ALPHABET + "._:@-", max_size=MAX_SESSION_ID_LENGTH - 1),
)


def text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=max_size)


timestamps = st.builds(
    Timestamp,
    seconds=st.integers(-62_135_596_800, 253_402_300_799),
    nanos=st.integers(0, 999_999_999),
)
framebuffers = st.one_of(
    st.just(""), st.builds("{}x{}".format, st.integers(0, 99999), st.integers(0, 99999))
)


@st.composite
def valid_sessions(draw: st.DrawFn) -> Session:
    """Any session that meets every rule (sizes kept so the record stays under 64 KiB)."""
    session = Session(
        session_id=draw(ids),
        username=draw(text(256).filter(bool)),
        agent_hostname=draw(text(253)),
        agent_address=draw(text(259)),
        display=draw(st.integers(0, 65535)),
        status=draw(text(32)),
        connection_status=draw(text(32)),
        last_client_address=draw(text(259)),
        terminal_id=draw(text(256)),
        framebuffer_size=draw(framebuffers),
        session_pid=draw(st.integers(0, 2**63 - 1)),
        subcluster=draw(text(128)),
        attributes=draw(st.dictionaries(ids, text(200), max_size=16)),
    )
    for name in ("created_at", "last_connection_at"):
        ts = draw(st.none() | timestamps)
        if ts is not None:
            getattr(session, name).CopyFrom(ts)
    return session


@properties
@given(valid_sessions())
def test_valid_sessions_are_accepted(session: Session) -> None:
    """Validation accepts every session the strategy of valid sessions produces."""
    validate_session(session)


@properties
@given(valid_sessions())
def test_encode_decode_round_trip(session: Session) -> None:
    """Decoding an encoded session gives the same session back, and encodes to the same bytes."""
    raw = encode_session(session)
    decoded = decode_session(raw, session.session_id)
    assert decoded == session
    assert encode_session(decoded) == raw


@properties
@given(st.binary(max_size=2048))
def test_decode_raises_only_decode_errors_on_bytes(raw: bytes) -> None:
    """Arbitrary bytes either decode or raise SessionDecodeError, never anything else."""
    with contextlib.suppress(SessionDecodeError):
        decode_session(raw, KEY_ID)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [*json.loads(encode_session(make_session()))]


@settings(properties, max_examples=300)
@given(st.dictionaries(st.sampled_from(_FIELDS), json_values, max_size=4))
def test_decode_raises_only_decode_errors_on_mangled_records(changes: dict[str, object]) -> None:
    """A valid record with any fields replaced by any JSON decodes or raises SessionDecodeError;
    whatever it accepts is itself valid and re-encodes."""
    doc = json.loads(encode_session(make_session()))
    doc.update(changes)
    raw = json.dumps(doc, allow_nan=True).encode()
    try:
        session = decode_session(raw, KEY_ID)
    except SessionDecodeError:
        return
    validate_session(session)
    assert decode_session(encode_session(session), KEY_ID) == session


@settings(properties, max_examples=300)
@given(st.dictionaries(st.sampled_from(_FIELDS), json_values, max_size=4))
def test_check_record_agrees_with_decode_on_mangled_records(changes: dict[str, object]) -> None:
    """For a valid record with any fields replaced by any JSON, the mirror's check gives the
    verdict of decoding: both accept, or both refuse with the same message."""
    doc = json.loads(encode_session(make_session()))
    doc.update(changes)
    raw = json.dumps(doc, allow_nan=True).encode()
    assert _verdict(check_record, raw) == _verdict(decode_session, raw)


@settings(properties, max_examples=300)
@given(st.dictionaries(st.sampled_from(_FIELDS), json_values, max_size=4))
def test_check_record_agrees_with_decode_on_mangled_records_in_the_encoders_form(
    changes: dict[str, object],
) -> None:
    """The same, with the records written compactly with the fields in the encoder's order,
    which the check matches as text."""
    doc = json.loads(encode_session(make_session()))
    doc.update(changes)
    raw = _compact(doc)
    assert _verdict(check_record, raw) == _verdict(decode_session, raw)


# Bytes that matter to the form of a record: digits, JSON punctuation, the bounds of the
# character rules, and the first byte of a two-byte UTF-8 sequence.
_EDIT_BYTES = st.sampled_from(list(b'019-:T.Zxnul"\\{},[] \t\x00\x1f\x7f\xc2\x85\xa0'))


@settings(properties, max_examples=500)
@given(st.data())
def test_check_record_agrees_with_decode_on_edited_records(data: st.DataObject) -> None:
    """A record as a primary writes it with a few bytes replaced, inserted or removed gets the
    verdict of decoding."""
    raw = bytearray(encode_session(make_session()))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        edit = data.draw(st.sampled_from(["replace", "insert", "remove"]))
        if edit == "remove":
            del raw[at]
        else:
            byte = data.draw(_EDIT_BYTES | st.integers(0, 255))
            raw[at : at + (edit == "replace")] = bytes([byte])
    assert _verdict(check_record, bytes(raw)) == _verdict(decode_session, bytes(raw))


@properties
@given(valid_sessions())
def test_check_record_accepts_every_valid_session(session: Session) -> None:
    """Whatever a primary may write, the mirror's check accepts."""
    check_record(encode_session(session), session.session_id)


@properties
@given(valid_sessions())
def test_valid_sessions_are_checked_as_text_unless_escaped(session: Session) -> None:
    """Every valid record the encoder writes is matched as text, save those whose text holds a
    quote or a backslash (escaped in JSON): the quick way is the common one."""
    raw = encode_session(session)
    escaped = b"\\" in raw
    assert (recordcheck._canonical_match(raw, session.session_id) is not None) is not escaped


def test_canonical_growth_bound_holds_at_the_limit() -> None:
    """A record that omits default keys and sits just under the size limit is still checked
    against the limit in its canonical (longer) form."""
    base = {"v": 1, "session_id": KEY_ID, "username": "a"}
    filler = "v" * MAX_ATTRIBUTE_VALUE_LENGTH
    attributes = {f"k{i:02d}": filler for i in range(63)}
    doc = {**base, "attributes": attributes}
    size = len(json.dumps(doc, separators=(",", ":")).encode())
    attributes["last"] = "v" * (MAX_RECORD_BYTES - size - len(',"last":""'))
    raw = json.dumps(doc, separators=(",", ":")).encode()
    assert len(raw) == MAX_RECORD_BYTES
    with pytest.raises(SessionDecodeError, match="more than"):
        decode_session(raw, KEY_ID)  # canonical form adds the missing keys: over the limit
    assert codec._CANONICAL_GROWTH > 0


def _checked_decodes(raw: bytes, key_id: str = KEY_ID) -> None:
    """A record the mirror's check accepts decodes the same through decode_checked and through
    the form the check returns (the serialized Session the copy keeps, which a snapshot or a
    listing sends) as through decode_session."""
    try:
        kept = check_record(raw, key_id)
    except SessionDecodeError:
        return
    expected = decode_session(raw, key_id)
    assert Session.FromString(kept) == expected
    expected.revision = 42
    assert decode_checked(raw, key_id, 42) == expected


@properties
@given(valid_sessions())
def test_checked_decoding_equals_decoding_for_every_valid_session(session: Session) -> None:
    """Every record a primary may write decodes through decode_checked as decode_session
    decodes it, timestamps and attributes included."""
    _checked_decodes(encode_session(session), session.session_id)


@settings(properties, max_examples=300)
@given(st.dictionaries(st.sampled_from(_FIELDS), json_values, max_size=4))
def test_checked_decoding_equals_decoding_on_mangled_records(changes: dict[str, object]) -> None:
    """For a valid record with any fields replaced by any JSON that the check still accepts
    (missing keys, other spellings of a time, unknown keys), decode_checked gives the message
    that decode_session gives."""
    doc = json.loads(encode_session(make_session()))
    doc.update(changes)
    _checked_decodes(json.dumps(doc, allow_nan=True).encode())


_CHECKED_CASES: dict[str, dict[str, object]] = {
    **_QUICK_PATH_CASES,
    "one fraction digit": {"created_at": "2024-05-01T08:00:00.5Z"},
    "seven fraction digits": {"last_connection_at": "1999-12-31T23:59:59.1234567Z"},
    "before 1970": {"created_at": "1969-07-20T20:17:40Z"},
    "unknown key": {"shoe_size": 44},
    "null time": {"last_connection_at": None},
}


@pytest.mark.parametrize("changes", _CHECKED_CASES.values(), ids=_CHECKED_CASES.keys())
def test_checked_decoding_equals_decoding_at_the_edges(changes: dict[str, object]) -> None:
    """At each rule's edge (years 1 and 9999, fractions of any length, before 1970, leap
    days, unknown keys), the same."""
    doc = json.loads(encode_session(make_session()))
    doc.update(changes)
    _checked_decodes(json.dumps(doc, ensure_ascii=False).encode())


def test_checked_decoding_fills_missing_keys_as_decoding_does() -> None:
    """A hand-written record without the optional keys decodes to the same message."""
    _checked_decodes(json.dumps({"v": 1, "session_id": KEY_ID, "username": "u"}).encode())
