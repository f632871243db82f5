"""A stand-in VSM server: it behaves toward its sidecar the way a VSM server does.

It is used by the demo and the tests, and is meant to be read by anyone who integrates a
server with the sidecar's gRPC API. What it does:

* It follows ``RoleService/WatchRole`` of its sidecar, and re-opens the stream whenever it
  breaks (the sidecar restarts, crashes, or the connection drops).
* While its sidecar is PRIMARY it serves a TCP port; the moment the role is anything else, or
  the stream breaks and the role is therefore unknown, it closes the listening socket and every
  open connection. It never serves on a guess.
* On promotion it loads every session from its sidecar (``SessionService/ListSessions``)
  before it starts serving, so it never answers from an out-of-date copy.
* It creates sessions by writing them through its sidecar (``SessionService/PutSession``) and
  answers the client only after the sidecar acknowledged, that is after etcd committed them.

The line protocol on the TCP port (UTF-8, one line per message, ``\\n`` terminated)::

    server:  NAME COUNT                 greeting: its name and the number of sessions it knows
    client:  new USER                   create a session for USER
    server:  ok SESSION_ID REVISION     ... acknowledged by the sidecar, at this etcd revision
    server:  error REASON               ... or not (e.g. the sidecar is no longer PRIMARY)
    client:  list
    server:  ok [SESSION_ID ...]        the ids of the sessions it knows, sorted
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import uuid
from typing import Final

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from .. import logs
from ..api import role_pb2, role_pb2_grpc, session_pb2, session_pb2_grpc
from ..core.tasks import supervise
from ..sessions.record import NOT_PRIMARY_METADATA_KEY

log = structlog.get_logger("standin")

PRIMARY: Final = role_pb2.ROLE_PRIMARY
# A role stream that broke is re-opened after this pause (the channel itself waits for the
# sidecar to come back: see _CHANNEL_OPTIONS).
RECONNECT_DELAY: Final = 0.2
# A promotion whose session load failed is tried again after this pause, while still PRIMARY.
PROMOTION_RETRY_DELAY: Final = 0.5
# Deadline of every unary call to the sidecar.
RPC_TIMEOUT: Final = 5.0
# Sessions per ListSessions page when loading on promotion (~0.5 MB an answer).
LOAD_PAGE: Final = 1000
# gRPC backs off up to 120 s between reconnection attempts by default; a sidecar that restarts
# should be found again within a second.
_CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
FIRST_DISPLAY: Final = 10  # ThinLinc numbers session displays from 10
_NOT_ID_CHARACTER: Final = re.compile(r"[^A-Za-z0-9._:@-]")


class StaleCopy(Exception):
    """The sidecar could not read etcd, so its list of sessions may miss the last writes."""


class StandIn:
    """One stand-in VSM server beside one sidecar."""

    def __init__(self, channel: grpc.aio.Channel, listen: str, name: str) -> None:
        self.name = name
        self.host, self.port = _split_host_port(listen)
        self.roles = role_pb2_grpc.RoleServiceStub(channel)
        self.session_api = session_pb2_grpc.SessionServiceStub(channel)
        # The last status the sidecar reported; None while the role stream is down.
        self.status: role_pb2.RoleStatus | None = None
        self.sessions: dict[str, session_pb2.Session] = {}
        # Session ids are "<name>:<run>.<n>": a counter alone would repeat after a restart, or
        # clash with the ids of another stand-in of the same name after a failover.
        self._id_prefix = f"{_NOT_ID_CHARACTER.sub('-', name)}:{uuid.uuid4().hex[:12]}"
        self._created = 0
        self._server: asyncio.Server | None = None
        self._serving_epoch = 0
        self._clients: set[asyncio.StreamWriter] = set()
        self._role_changed = asyncio.Event()

    # -- following the role -------------------------------------------------------------------

    async def follow_role(self) -> None:
        """Apply every status of the WatchRole stream; re-open the stream when it breaks."""
        while True:
            try:
                # wait_for_ready: while the sidecar is down the call waits for it to come back
                # instead of failing at once, again and again.
                async for status in self.roles.WatchRole(role_pb2.WatchRoleRequest(),
                                                         wait_for_ready=True):
                    self.on_status(status)
                reason = "role stream ended"
            except grpc.aio.AioRpcError as exc:
                reason = f"role stream broken: {exc.code().name}"
            self.on_role_unknown(reason)
            await asyncio.sleep(RECONNECT_DELAY)

    def on_status(self, status: role_pb2.RoleStatus) -> None:
        """A new status: stop serving at once unless it is PRIMARY in the epoch we serve in."""
        self.status = status
        role = role_name(status.role)
        logs.set_status(role=role, epoch=status.epoch)
        log.info("role", role=role, epoch=status.epoch, leader=status.leader_id or None,
                 reason=status.reason)
        if self._server is not None and not self._is_primary_in(self._serving_epoch):
            # A new epoch means someone else may have been PRIMARY in between: load again.
            self.stop_serving(f"role is {role}, epoch {status.epoch}")
        self._role_changed.set()

    def on_role_unknown(self, reason: str) -> None:
        """The stream is gone, so the role is unknown: act as if it were not PRIMARY."""
        self.status = None
        logs.set_status(role="UNKNOWN", epoch=0)
        log.warning("role_unknown", reason=reason)
        self.stop_serving(reason)

    def _is_primary_in(self, epoch: int) -> bool:
        status = self.status
        return status is not None and status.role == PRIMARY and status.epoch == epoch

    # -- promotion ----------------------------------------------------------------------------

    async def serve_while_primary(self) -> None:
        """Start serving whenever the sidecar turns PRIMARY (stopping is done by on_status)."""
        while True:
            await self._role_changed.wait()
            self._role_changed.clear()
            status = self.status
            if status is None or status.role != PRIMARY or self._server is not None:
                continue
            try:
                await self.promote(status.epoch)
            except (grpc.aio.AioRpcError, StaleCopy, OSError) as exc:  # OSError: port in use
                log.warning("promotion_failed", epoch=status.epoch, error=_describe(exc),
                            retry_in=PROMOTION_RETRY_DELAY)
                await asyncio.sleep(PROMOTION_RETRY_DELAY)
                self._role_changed.set()

    async def promote(self, epoch: int) -> None:
        """Load every session, then open the port, if still PRIMARY in ``epoch`` after each step.

        Each await gives the role stream a chance to report a change; a promotion that is
        overtaken by one is dropped rather than finished.
        """
        sessions, revision = await self.load_sessions()
        if not self._is_primary_in(epoch):
            log.info("promotion_dropped", epoch=epoch, reason="role changed while loading")
            return
        self.sessions = sessions
        log.info("sessions_loaded", count=len(sessions), revision=revision)
        server = await asyncio.start_server(self.handle_client, self.host, self.port)
        if not self._is_primary_in(epoch):
            server.close()
            log.info("promotion_dropped", epoch=epoch, reason="role changed while opening")
            return
        self._server, self._serving_epoch = server, epoch
        log.info("serving", listen=f"{self.host}:{self.port}", epoch=epoch,
                 sessions=len(self.sessions))

    async def load_sessions(self) -> tuple[dict[str, session_pb2.Session], int]:
        """Every session the sidecar holds, by id, and the etcd revision of the last page.

        Page by page: one answer with every record would pass gRPC's 4 MiB receive limit at
        some 10,000 sessions. The pages reflect revisions one after the other, which is one
        view here: on promotion this server is the only writer, and it writes nothing yet.
        """
        sessions: dict[str, session_pb2.Session] = {}
        token = ""
        while True:
            response: session_pb2.ListSessionsResponse = await self.session_api.ListSessions(
                session_pb2.ListSessionsRequest(page_size=LOAD_PAGE, page_token=token),
                timeout=RPC_TIMEOUT)
            if response.stale:
                # A copy served while etcd is unreachable may miss the last writes (rule 5).
                raise StaleCopy("etcd is unreachable: the sidecar has only a stale copy")
            sessions.update((s.session_id, s) for s in response.sessions)
            token = response.next_page_token
            if not token:
                return sessions, response.revision

    def stop_serving(self, reason: str) -> None:
        """Close the listening socket and every open connection, now (no await in here)."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for writer in list(self._clients):
            writer.close()
        log.info("stopped_serving", reason=reason, connections_closed=len(self._clients))

    # -- the line protocol --------------------------------------------------------------------

    async def handle_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """Greet the client, then answer one line per request line until it hangs up."""
        self._clients.add(writer)
        try:
            await _send(writer, f"{self.name} {len(self.sessions)}")
            while line := await reader.readline():
                await _send(writer, await self.answer(line.decode(errors="replace").strip()))
        except (ConnectionError, ValueError):  # ValueError: a line longer than the limit
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    async def answer(self, line: str) -> str:
        command, _, argument = line.partition(" ")
        if command == "new" and argument.strip():
            return await self.create_session(argument.strip())
        if command == "list" and not argument:
            return " ".join(["ok", *sorted(self.sessions)])
        return f"error unknown request {line[:80]!r}: expected 'new USER' or 'list'"

    async def create_session(self, username: str) -> str:
        """Write a new session through the sidecar; "ok ID REVISION" once it is in etcd."""
        if self._server is None:
            return "error not primary"
        session = self._new_session(username)
        try:
            response: session_pb2.PutSessionResponse = await self.session_api.PutSession(
                session_pb2.PutSessionRequest(session=session), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            log.warning("session_refused", session_id=session.session_id, user=username,
                        error=_describe(exc))
            return f"error {_describe(exc)}"
        self.sessions[session.session_id] = response.session
        log.info("session_created", session_id=session.session_id, user=username,
                 revision=response.revision)
        return f"ok {session.session_id} {response.revision}"

    def _new_session(self, username: str) -> session_pb2.Session:
        self._created += 1
        created_at = Timestamp()
        created_at.GetCurrentTime()
        hostname = socket.gethostname()
        return session_pb2.Session(
            session_id=f"{self._id_prefix}.{self._created}", username=username,
            agent_hostname=hostname, agent_address=hostname, display=self._free_display(),
            status="running", created_at=created_at)

    def _free_display(self) -> int:
        """The lowest display number no known session uses."""
        used = {s.display for s in self.sessions.values()}
        return next(d for d in range(FIRST_DISPLAY, FIRST_DISPLAY + len(used) + 1)
                    if d not in used)


# -- helpers ----------------------------------------------------------------------------------


def role_name(role: int) -> str:
    return role_pb2.Role.Name(role).removeprefix("ROLE_")


def _describe(exc: BaseException) -> str:
    """One line for an error, naming the primary when the sidecar refused as a standby."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return str(exc)
    text = f"{exc.code().name} {exc.details()}"
    for key, value in exc.trailing_metadata() or ():
        if key == NOT_PRIMARY_METADATA_KEY and isinstance(value, bytes):
            # The sidecar names the primary, so a real server could redirect its client.
            primary = session_pb2.NotPrimary.FromString(value)
            text += f" (primary: {primary.node_id or 'none'} {primary.address})"
    return text


async def _send(writer: asyncio.StreamWriter, line: str) -> None:
    writer.write(f"{line}\n".encode())
    await writer.drain()


def _split_host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- the process --------------------------------------------------------------------------------


async def run(grpc_address: str, listen: str, name: str) -> None:
    """Follow the sidecar and serve while PRIMARY, until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with grpc.aio.insecure_channel(grpc_address, options=_CHANNEL_OPTIONS) as channel:
        standin = StandIn(channel, listen, name)
        log.info("standin_starting", sidecar=grpc_address, listen=listen)
        try:
            await supervise({"follow-role": standin.follow_role(),
                             "serve": standin.serve_while_primary()}, until=stop)
        finally:
            standin.stop_serving("shutting down")
    log.info("standin_stopped")


def main(grpc_address: str, listen: str, name: str | None = None) -> int:
    """Run the stand-in; the process exit code (0 after SIGTERM or SIGINT)."""
    name = name or socket.gethostname()
    logs.configure()
    logs.set_status(node=name, role="UNKNOWN", epoch=0)
    try:
        _split_host_port(listen)
    except ValueError as exc:
        log.error("bad_arguments", error=str(exc))
        return 2
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the handlers are set
        asyncio.run(run(grpc_address, listen, name))
    return 0
