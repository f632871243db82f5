"""The gRPC SessionService of real sidecar processes on a real etcd cluster: writes on the
primary, reads and watches on every node, refusals with the field named, garbage in etcd, and
reads while etcd is unreachable."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.api import session_pb2, session_pb2_grpc
from sidecar.api.session_pb2 import (
    DeleteSessionRequest,
    GetSessionRequest,
    GetSessionResponse,
    ListSessionsRequest,
    ListSessionsResponse,
    NotPrimary,
    PutSessionRequest,
    Session,
    SessionEvent,
    WatchSessionsRequest,
)
from sidecar.endpoints.grpc_sessions import PAGE_BYTES
from sidecar.lab.localnode import LocalSidecar
from sidecar.sessions.record import NOT_PRIMARY_METADATA_KEY, encode_session

from .. import builders
from ..sidecars import Pair

pytestmark = [pytest.mark.etcd]

T = TypeVar("T")
TTL = 2
RPC_TIMEOUT = 5.0
Code = grpc.StatusCode
Stub = session_pb2_grpc.SessionServiceStub
SNAPSHOT = session_pb2.SESSION_EVENT_TYPE_SNAPSHOT
SNAPSHOT_DONE = session_pb2.SESSION_EVENT_TYPE_SNAPSHOT_DONE
PUT = session_pb2.SESSION_EVENT_TYPE_PUT
DELETE = session_pb2.SESSION_EVENT_TYPE_DELETE
PROGRESS = session_pb2.SESSION_EVENT_TYPE_PROGRESS


# -- helpers shared with test_mirror.py ---------------------------------------------------------


record = builders.session  # alice's session on agent1, display 10, running


class Client:
    """A channel and a SessionService stub to one sidecar; close it after use."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = Stub(self.channel)

    def put(self, session: Session, timeout: float = RPC_TIMEOUT) -> int:
        return int(
            self.stub.PutSession(PutSessionRequest(session=session), timeout=timeout).revision
        )

    def get(self, session_id: str) -> Session:
        response: GetSessionResponse = self.stub.GetSession(
            GetSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT
        )
        return response.session

    def list(self) -> ListSessionsResponse:
        response: ListSessionsResponse = self.stub.ListSessions(
            ListSessionsRequest(), timeout=RPC_TIMEOUT
        )
        return response

    def delete(self, session_id: str) -> tuple[int, bool]:
        response = self.stub.DeleteSession(
            DeleteSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT
        )
        return int(response.revision), bool(response.deleted)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def not_primary(error: grpc.RpcError) -> NotPrimary | None:
    """The NotPrimary hint in the trailer of a FAILED_PRECONDITION, if any."""
    trailer: Any = error.trailing_metadata()
    for key, value in trailer or ():
        if key == NOT_PRIMARY_METADATA_KEY:
            return NotPrimary.FromString(value)
    return None


def eventually(check: Callable[[], T], timeout: float = 10.0) -> T:
    """The first result of ``check`` that raises no AssertionError or RpcError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, grpc.RpcError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def session_with(values: dict[str, Any]) -> Session:
    """A Session with these fields set (None leaves a field unset)."""
    session = Session()
    for name, value in values.items():
        if name == "attributes":
            session.attributes.update(value)
        elif isinstance(value, Timestamp):
            getattr(session, name).CopyFrom(value)
        elif value is not None:
            setattr(session, name, value)
    return session


def without_revision(session: Session) -> Session:
    copy = Session()
    copy.CopyFrom(session)
    copy.revision = 0
    return copy


def by_id(response: ListSessionsResponse) -> dict[str, Session]:
    return {s.session_id: s for s in response.sessions}


def wait_current(client: Client, revision: int, timeout: float = 10.0) -> ListSessionsResponse:
    """ListSessions of ``client`` once its copy has reached ``revision``."""

    def check() -> ListSessionsResponse:
        response = client.list()
        assert response.revision >= revision, (response.revision, revision)
        return response

    return eventually(check, timeout)


def split(pair: Pair, **start: Any) -> tuple[LocalSidecar, LocalSidecar]:
    pair.start(ttl=TTL, **start)
    return pair.wait_split()


def sessions_key(pair: Pair, session_id: str) -> bytes:
    return f"/thinlinc-ha/{pair.cluster}/sessions/{session_id}".encode()


# -- reads, writes, refusals --------------------------------------------------------------------


def test_put_on_the_primary_is_readable_on_the_standby_at_the_same_revision(pair: Pair) -> None:
    """PutSession on the primary answers with the commit revision; GetSession and
    ListSessions on the standby then return the same record with that revision, and a read's
    revision is at least the record's; a missing id is NOT_FOUND; a delete reaches the standby
    too and a second delete reports deleted=false."""
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        sent = [record(f"agent1:{10 + i}", display=10 + i) for i in range(3)]
        revisions = [p.put(session) for session in sent]
        assert revisions == sorted(revisions)
        assert p.get(sent[0].session_id).revision == revisions[0]  # read your writes

        listed = wait_current(s, revisions[-1])
        assert [x.session_id for x in listed.sessions] == sorted(x.session_id for x in sent)
        assert listed.revision >= max(revisions)
        for session, revision in zip(sent, revisions, strict=True):
            got = s.stub.GetSession(
                GetSessionRequest(session_id=session.session_id), timeout=RPC_TIMEOUT
            )
            assert got.session.revision == revision
            assert got.revision >= revision
            assert without_revision(got.session) == session
            assert by_id(listed)[session.session_id].revision == revision

        with pytest.raises(grpc.RpcError) as missing:
            s.get("no-such-session")
        assert missing.value.code() is Code.NOT_FOUND
        assert "session_id" in (missing.value.details() or "")

        delete_revision, deleted = p.delete(sent[0].session_id)
        assert deleted
        wait_current(s, delete_revision)
        with pytest.raises(grpc.RpcError) as gone:
            s.get(sent[0].session_id)
        assert gone.value.code() is Code.NOT_FOUND
        assert p.delete(sent[0].session_id)[1] is False


def test_put_on_the_standby_is_refused_naming_the_primary(pair: Pair) -> None:
    """PutSession and DeleteSession on the standby fail with FAILED_PRECONDITION; the trailer
    thinlinc-not-primary-bin decodes to NotPrimary with the primary's node id, address and
    epoch; nothing is written."""
    primary, standby = split(pair)
    epoch = int(primary.role()["epoch"])
    with Client(standby.control_address) as s:
        for call in (lambda: s.put(record("refused")), lambda: s.delete("refused")):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() is Code.FAILED_PRECONDITION
            hint = not_primary(refused.value)
            assert hint is not None
            assert (hint.node_id, hint.address, hint.epoch) == (
                primary.node_id,
                primary.address,
                epoch,
            )
        assert [x.session_id for x in s.list().sessions] == []
    with pair.etcd.client() as etcd:
        assert etcd.get(sessions_key(pair, "refused"))[0] is None


# -- watching -----------------------------------------------------------------------------------


def events(call: Any, count: int) -> list[SessionEvent]:
    return [next(call) for _ in range(count)]


def summary(event: SessionEvent) -> tuple[int, str, int]:
    return event.type, event.session_id, event.revision


def test_watch_sends_a_snapshot_then_changes_and_resumes_from_a_revision(pair: Pair) -> None:
    """WatchSessions(0): one SNAPSHOT per record, SNAPSHOT_DONE at the snapshot's revision,
    then PUT and DELETE for later writes. WatchSessions(N) replays every change from N on,
    including every record of a multi-record transaction at N, then follows live changes."""
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        first = p.put(record("w-1"))
        second = p.put(record("w-2"))
        wait_current(s, second)
        call = s.stub.WatchSessions(WatchSessionsRequest(start_revision=0), timeout=30)
        try:
            snapshot = events(call, 3)
            assert snapshot[2].type == SNAPSHOT_DONE
            at = snapshot[2].revision
            assert at >= second
            # Each SNAPSHOT event is at the snapshot's revision (revisions never decrease
            # along a stream); each record keeps its own in session.revision.
            assert sorted((*summary(e), e.session.revision) for e in snapshot[:2]) == [
                (SNAPSHOT, "w-1", at, first),
                (SNAPSHOT, "w-2", at, second),
            ]
            assert snapshot[0].session.username == "alice"
            # A client that does not know snapshot_batch gets today's shape, nothing in it.
            assert [len(e.sessions) for e in snapshot] == [0, 0, 0]
            third = p.put(record("w-3"))
            deleted, _ = p.delete("w-1")
            live = events(call, 2)
            assert [summary(e) for e in live] == [(PUT, "w-3", third), (DELETE, "w-1", deleted)]
            assert without_revision(live[0].session) == record("w-3")
            assert live[0].session.revision == third
        finally:
            call.cancel()

        # Three records in one etcd transaction, the last change the copy holds: a resume at
        # the revision before it must get all three, then whatever comes next.
        with pair.etcd.client() as etcd:
            ops = [
                etcd.transactions.put(
                    sessions_key(pair, f"t-{i}"), encode_session(record(f"t-{i}"))
                )
                for i in range(3)
            ]
            etcd.transaction(compare=[], success=ops, failure=[])
            together = int(etcd.get(sessions_key(pair, "t-0"))[1].mod_revision)
        wait_current(s, together)
        call = s.stub.WatchSessions(WatchSessionsRequest(start_revision=third), timeout=30)
        try:
            replayed = events(call, 5)
            assert [summary(e) for e in replayed[:2]] == [
                (PUT, "w-3", third),
                (DELETE, "w-1", deleted),
            ]
            assert sorted(summary(e) for e in replayed[2:]) == [
                (PUT, f"t-{i}", together) for i in range(3)
            ]
            later = p.put(record("w-4"))
            assert summary(next(call)) == (PUT, "w-4", later)
        finally:
            call.cancel()


def test_a_batched_snapshot_sends_up_to_n_records_per_event_then_changes(pair: Pair) -> None:
    """WatchSessions(0, snapshot_batch=2) of five records: SNAPSHOT events of two, two and one
    records in `sessions` (no `session`, no `session_id`), each at the snapshot's revision and
    each record with its own, every record once; then SNAPSHOT_DONE and live changes as
    without batching."""
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        written = {f"b-{i}": p.put(record(f"b-{i}")) for i in range(5)}
        wait_current(s, max(written.values()))
        call = s.stub.WatchSessions(WatchSessionsRequest(start_revision=0, snapshot_batch=2),
                                    timeout=30)
        try:
            snapshot = events(call, 4)
            done = snapshot[-1]
            assert done.type == SNAPSHOT_DONE
            assert done.revision >= max(written.values())
            assert [(e.type, len(e.sessions), e.revision) for e in snapshot[:-1]] == [
                (SNAPSHOT, 2, done.revision), (SNAPSHOT, 2, done.revision),
                (SNAPSHOT, 1, done.revision)]
            assert [(e.HasField("session"), e.session_id) for e in snapshot[:-1]] == [
                (False, "")] * 3
            got = {x.session_id: x for e in snapshot[:-1] for x in e.sessions}
            assert {i: x.revision for i, x in got.items()} == written
            assert without_revision(got["b-3"]) == record("b-3")
            later = p.put(record("b-5"))
            assert summary(next(call)) == (PUT, "b-5", later)
        finally:
            call.cancel()


def test_a_quiet_watch_gets_progress_when_the_copy_moves_on(pair: Pair) -> None:
    """No session changes, but etcd's revision moves (another key of the cluster): the stream
    says so with PROGRESS, so a client can resume from there rather than from a revision etcd
    may compact. Revisions never decrease, and a PROGRESS never runs ahead of a change."""
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        written = p.put(record("quiet"))
        wait_current(s, written)
        call = s.stub.WatchSessions(WatchSessionsRequest(start_revision=written + 1), timeout=30)
        try:
            with pair.etcd.client() as etcd:
                etcd.put(f"/thinlinc-ha/{pair.cluster}/unrelated".encode(), b"x")
                moved = int(etcd.get(f"/thinlinc-ha/{pair.cluster}/unrelated".encode())[1]
                            .mod_revision)
            progress = next(call)  # within PROGRESS_INTERVAL (5 s) of the last change
            assert progress.type == PROGRESS
            assert progress.revision >= moved
            later = p.put(record("after-quiet"))
            assert summary(next(call)) == (PUT, "after-quiet", later)
            assert later > moved
        finally:
            call.cancel()


def test_watch_from_a_compacted_revision_is_out_of_range(pair_on_fresh_cluster: Pair) -> None:
    """WatchSessions(N) with N older than etcd's compaction fails with OUT_OF_RANGE (the client
    starts over with 0), and a watch from 0 still works."""
    pair = pair_on_fresh_cluster
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        old = p.put(record("old"))
        newest = p.put(record("new"))
        pair.etcd.compact()
        wait_current(s, newest)
        call = s.stub.WatchSessions(WatchSessionsRequest(start_revision=old), timeout=10)
        with pytest.raises(grpc.RpcError) as compacted:
            next(call)
        assert compacted.value.code() is Code.OUT_OF_RANGE
        assert "start_revision" in (compacted.value.details() or "")
        call = s.stub.WatchSessions(WatchSessionsRequest(start_revision=0), timeout=10)
        try:
            assert {e.session_id for e in events(call, 2)} == {"old", "new"}
            assert next(call).type == SNAPSHOT_DONE
        finally:
            call.cancel()


# -- validation ---------------------------------------------------------------------------------


def invalid_puts() -> Iterator[tuple[str, str, PutSessionRequest]]:
    """(what, field named in the error, request) for PutSession requests that break a rule."""

    def put(**fields: Any) -> PutSessionRequest:
        session_id = fields.pop("session_id", "valid-id")
        return PutSessionRequest(session=record(session_id, **fields))

    yield "id charset", "session.session_id", put(session_id="bad id")
    yield "id with a slash", "session.session_id", put(session_id="a/b")
    yield "id too long", "session.session_id", put(session_id="x" * 129)
    yield "username too long", "session.username", put(username="u" * 257)
    yield "username missing", "session.username", put(username="")
    yield (
        "control character",
        "session.agent_hostname",
        PutSessionRequest(session=Session(session_id="c", username="a", agent_hostname="a\x07b")),
    )
    yield "NUL", "session.username", put(username="al\x00ice")
    yield "display too high", "session.display", put(display=65536)
    yield "display negative", "session.display", put(display=-1)
    yield (
        "too many attributes",
        "session.attributes",
        put(attributes={f"k{i}": "v" for i in range(65)}),
    )
    yield "record over 64 KiB", "session", put(attributes={f"k{i}": "v" * 1024 for i in range(64)})
    yield (
        "timestamp out of range",
        "session.created_at",
        put(created_at=Timestamp(seconds=253_402_300_800)),
    )
    yield "missing session", "session", PutSessionRequest()


def test_list_pages_through_every_record_in_order(pair: Pair) -> None:
    """ListSessions with page_size answers that many records at most, in id order, with the
    last id as next_page_token; following the tokens yields every record exactly once and the
    last page has no token. page_size 0 is every record at once."""
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        sent = sorted(f"page-{i:03d}" for i in range(23))
        revision = 0
        for session_id in sent:
            revision = p.put(record(session_id))
        assert [x.session_id for x in wait_current(s, revision).sessions] == sent
        for client in (p, s):
            pages, token = [], ""
            while True:
                page = client.stub.ListSessions(
                    ListSessionsRequest(page_size=10, page_token=token), timeout=RPC_TIMEOUT)
                pages.append([x.session_id for x in page.sessions])
                token = page.next_page_token
                if not token:
                    break
                assert token == pages[-1][-1]
            assert [len(x) for x in pages] == [10, 10, 3]
            assert [i for page in pages for i in page] == sent
            whole = client.list()
            assert [x.session_id for x in whole.sessions] == sent
            assert whole.next_page_token == ""


def test_a_page_of_large_records_ends_early_within_the_clients_receive_limit(
        pair: Pair) -> None:
    """Records may hold up to 64 KiB: 80 near that size are ~5 MB, past the 4 MiB a gRPC client
    accepts. A page asked for 100 of them stops short, at PAGE_BYTES, and says where to go on;
    following the tokens still yields each record once. A snapshot batched by 100 stops each
    SNAPSHOT event short the same way, and still sends each record once."""
    primary, _ = split(pair)
    big = {f"k{n:02d}": "x" * 1000 for n in range(60)}
    sent = [f"big-{i:02d}" for i in range(80)]
    with Client(primary.control_address) as p:
        for session_id in sent:
            p.put(record(session_id, attributes=big))
        listed, token, sizes = [], "", []
        while True:
            page = p.stub.ListSessions(ListSessionsRequest(page_size=100, page_token=token),
                                       timeout=RPC_TIMEOUT)
            sizes.append(len(page.sessions))
            listed += [x.session_id for x in page.sessions]
            token = page.next_page_token
            if not token:
                break
        assert listed == sent
        assert len(sizes) >= 3, sizes
        assert max(sizes) * 60_000 <= PAGE_BYTES + 64 * 1024, sizes
        call = p.stub.WatchSessions(WatchSessionsRequest(start_revision=0, snapshot_batch=100),
                                    timeout=30)
        try:
            snapshot = list(itertools.takewhile(lambda e: e.type == SNAPSHOT, call))
        finally:
            call.cancel()
        assert sorted(x.session_id for e in snapshot for x in e.sessions) == sent
        batches = [len(e.sessions) for e in snapshot]
        assert len(batches) >= 3, batches
        assert max(batches) * 60_000 <= PAGE_BYTES + 64 * 1024, batches


def test_invalid_requests_get_invalid_argument_naming_the_field(pair: Pair) -> None:
    """Each invalid request gets INVALID_ARGUMENT whose message starts with the offending
    field's path, nothing is written, and the server keeps serving afterwards."""
    primary, _ = split(pair)
    wrong: list[str] = []
    with Client(primary.control_address) as p:
        for what, field, request in invalid_puts():
            try:
                p.stub.PutSession(request, timeout=RPC_TIMEOUT)
                wrong.append(f"{what}: accepted")
            except grpc.RpcError as exc:
                details = exc.details() or ""
                if exc.code() is not Code.INVALID_ARGUMENT or not details.startswith(f"{field}:"):
                    wrong.append(f"{what}: {exc.code().name} {details!r}")
        others: list[tuple[str, str, Any, Message]] = [
            ("get", "session_id", p.stub.GetSession, GetSessionRequest(session_id="a b")),
            ("delete", "session_id", p.stub.DeleteSession, DeleteSessionRequest(session_id="")),
            (
                "watch",
                "start_revision",
                p.stub.WatchSessions,
                WatchSessionsRequest(start_revision=-1),
            ),
            (
                "watch",
                "snapshot_batch",
                p.stub.WatchSessions,
                WatchSessionsRequest(snapshot_batch=-1),
            ),
            ("list", "page_size", p.stub.ListSessions, ListSessionsRequest(page_size=-1)),
            ("list", "page_token", p.stub.ListSessions, ListSessionsRequest(page_token="a b")),
        ]
        for what, field, method, other in others:
            try:
                result = method(other, timeout=RPC_TIMEOUT)
                if what == "watch":
                    next(result)
                wrong.append(f"{what}: accepted")
            except grpc.RpcError as exc:
                details = exc.details() or ""
                if exc.code() is not Code.INVALID_ARGUMENT or not details.startswith(f"{field}:"):
                    wrong.append(f"{what}: {exc.code().name} {details!r}")
        assert wrong == []
        assert [x.session_id for x in p.list().sessions] == []
        revision = p.put(record("still-serving"))
        assert p.get("still-serving").revision == revision


# Each field has a strategy for values within its rules and one for anything at all; a drawn
# session lets a few fields (or none: half of the time) take anything, so that both accepted
# and refused writes are common.
_ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)  # no lone surrogates
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc"]), max_size=24)
_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,30}", fullmatch=True)
_STAMP = st.builds(
    Timestamp,
    seconds=st.integers(-62_135_596_800, 253_402_300_799),
    nanos=st.integers(0, 999_999_999),
)
_ANY_STAMP = st.builds(
    Timestamp, seconds=st.integers(-(2**63), 2**63 - 1), nanos=st.integers(-(2**31), 2**31 - 1)
)
_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "session_id": (_ID, st.text(max_size=140)),
    "username": (_ID | _TEXT.filter(bool), _ANY_TEXT | st.text(min_size=250, max_size=260)),
    "agent_hostname": (_TEXT, _ANY_TEXT),
    "agent_address": (_TEXT, _ANY_TEXT),
    "display": (st.integers(0, 65535), st.integers(-(2**31), 2**31 - 1)),
    "status": (st.sampled_from(["", "running", "disconnected"]), _ANY_TEXT),
    "connection_status": (st.sampled_from(["", "connected", "disconnected"]), _ANY_TEXT),
    "created_at": (st.none() | _STAMP, _ANY_STAMP),
    "last_connection_at": (st.none() | _STAMP, _ANY_STAMP),
    "last_client_address": (_TEXT, _ANY_TEXT),
    "terminal_id": (_TEXT, _ANY_TEXT),
    "framebuffer_size": (
        st.from_regex(r"[0-9]{1,5}x[0-9]{1,5}", fullmatch=True) | st.just(""),
        st.from_regex(r"[0-9]{1,7}x[0-9]{1,7}", fullmatch=True) | _ANY_TEXT,
    ),
    "session_pid": (st.integers(0, 2**63 - 1), st.integers(-(2**63), 2**63 - 1)),
    "subcluster": (_TEXT, _ANY_TEXT),
    "attributes": (
        st.dictionaries(_ID, _TEXT, max_size=4),
        st.dictionaries(_ANY_TEXT, _ANY_TEXT | st.text(min_size=1020, max_size=1030), max_size=4)
        | st.dictionaries(_ID, st.just("v" * 1024), min_size=60, max_size=70),
    ),
}


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    """Sessions within the rules, except for a few fields (or none) that may hold anything."""
    wild = draw(
        st.just(frozenset())
        | st.frozensets(st.sampled_from(sorted(_FIELDS)), min_size=1, max_size=3)
    )
    return session_with({name: draw(anything if name in wild else valid)
                         for name, (valid, anything) in _FIELDS.items()})


@pytest.mark.slow
def test_any_session_gets_an_answer_and_accepted_ones_read_back_unchanged(pair: Pair) -> None:
    """Property: for arbitrary Session messages PutSession answers OK or INVALID_ARGUMENT
    (never UNKNOWN, INTERNAL or a hang), and every record it accepted reads back with the same
    content and the revision of its write."""
    primary = pair.start(ttl=TTL, count=1)[0]
    primary.wait_role("PRIMARY")
    outcomes: dict[str, int] = {}
    with Client(primary.control_address) as p:

        def answer(session: Session) -> tuple[Code, str, int]:
            try:
                return Code.OK, "", p.put(session, timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details() or "", 0

        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(sessions())
        def check(session: Session) -> None:
            code, details, revision = answer(session)
            outcomes[code.name] = outcomes.get(code.name, 0) + 1
            if code is Code.INVALID_ARGUMENT:
                assert details.startswith("session"), details
                return
            assert code is Code.OK, (code, details)
            stored = p.get(session.session_id)
            assert stored.revision == revision
            assert without_revision(stored) == session

        check()
        assert p.put(record("after-the-storm")) > 0
    assert set(outcomes) == {"OK", "INVALID_ARGUMENT"}, outcomes


# -- garbage and outages ------------------------------------------------------------------------


def test_garbage_written_by_someone_else_is_skipped_on_both_nodes(pair: Pair) -> None:
    """Values under sessions/ written past the sidecar (not JSON, a wrong id, a bad key) are
    left out of both nodes' copies; both keep serving, and later writes still reach both."""
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        good = p.put(record("good"))
        with pair.etcd.client() as etcd:
            etcd.put(sessions_key(pair, "junk"), b"\x00\xff not json")
            etcd.put(sessions_key(pair, "wrong"), encode_session(record("other")))
            etcd.put(sessions_key(pair, "bad id"), encode_session(record("x")))
            etcd.put(sessions_key(pair, "deep/er"), b"{}")
            etcd.put(sessions_key(pair, "good"), b'{"v": 2}')  # overwrites a record
        after = p.put(record("after"))
        for client in (p, s):
            listed = wait_current(client, after)
            assert [x.session_id for x in listed.sessions] == ["after"], client.address
            assert good < after
    assert (primary.running, standby.running) == (True, True)


@pytest.mark.slow
def test_copy_stays_readable_marked_stale_while_etcd_is_unreachable(
    pair_on_fresh_cluster: Pair,
) -> None:
    """With every etcd member paused, ListSessions on the standby still answers from its copy,
    with the records, stale=true and the copy's age; after etcd resumes the pair serves
    writes again."""
    pair = pair_on_fresh_cluster
    primary, standby = split(pair)
    with Client(primary.control_address) as p, Client(standby.control_address) as s:
        revision = max(p.put(record(f"kept-{i}")) for i in range(3))
        current = wait_current(s, revision)
        assert not current.stale
        assert not current.HasField("copy_age")
        for member in pair.etcd.members:
            member.stop()
        try:

            def stale() -> ListSessionsResponse:
                response = s.list()
                assert response.stale
                return response

            listed = eventually(stale, timeout=TTL * 3)
            assert [x.session_id for x in listed.sessions] == [f"kept-{i}" for i in range(3)]
            assert listed.revision >= revision
            assert listed.HasField("copy_age")
            assert listed.copy_age.ToTimedelta().total_seconds() > 0
        finally:
            for member in pair.etcd.members:
                member.cont()
        primary, standby = pair.wait_split(timeout=TTL * 4 + 10)
        with Client(primary.control_address) as again:
            written = eventually(lambda: again.put(record("after-outage")), timeout=10)
        with Client(standby.control_address) as s:
            assert not wait_current(s, written).stale
