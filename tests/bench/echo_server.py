"""A SessionService whose PutSession does nothing: the floor under any sidecar on this stack.

    python -m tests.bench.echo_server [UNIX_SOCKET_PATH]

Serves PutSession on 127.0.0.1 (a free port, printed on the first line of stdout), and on a
Unix socket when given a path (the transport of the sidecar's control socket, where session
writes go, so the two are compared like for like), with the same
gRPC server the sidecar uses (grpcio's asyncio server), and answers every request with the
record it got, at revision 1: no validation, no etcd, no copy. What a client measures against
it (calls per second, latency, the server's CPU per call) is what the gRPC layer alone costs
on this machine, which bounds what any sidecar built on it can reach.

The same for the reads: WatchSessions(start_revision=N) streams N SNAPSHOT events of one
ready-made record (with snapshot_batch=B: N records, B an event) and SNAPSHOT_DONE;
ListSessions(page_size=N, page_token=T) answers N ready-made records (fewer when fewer than N
of T are left) and T - N as the next page token. The time a client takes to read them is the
floor under a snapshot or a paged listing of that many records.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from sidecar.api import session_pb2, session_pb2_grpc


def _record() -> session_pb2.Session:
    # The shape of tests.bench.sessions.session() (that module imports the lab; this stays small).
    record = session_pb2.Session(
        session_id="bulk-0012345", username="user2345@example.com",
        agent_hostname="agent05.example.com", agent_address="10.1.5.96", display=355,
        status="running", connection_status="connected", last_client_address="198.51.100.154",
        terminal_id="term-00003039", framebuffer_size="1920x1080", session_pid=32345,
        subcluster="default", revision=7)
    record.created_at.FromSeconds(1_700_012_345)
    record.last_connection_at.FromNanoseconds(1_700_012_345_123_000_000)
    return record


class Echo(session_pb2_grpc.SessionServiceServicer):
    def __init__(self) -> None:
        self.record = _record()

    async def WatchSessions(
        self,
        request: session_pb2.WatchSessionsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[session_pb2.SessionEvent]:
        snapshot, left = session_pb2.SESSION_EVENT_TYPE_SNAPSHOT, request.start_revision
        event = session_pb2.SessionEvent(
            type=snapshot, session_id=self.record.session_id, revision=9, session=self.record)
        while left > 0:
            if request.snapshot_batch:
                count = min(left, request.snapshot_batch)
                yield session_pb2.SessionEvent(type=snapshot, revision=9,
                                               sessions=[self.record] * count)
            else:
                count = 1
                yield event
            left -= count
        yield session_pb2.SessionEvent(type=session_pb2.SESSION_EVENT_TYPE_SNAPSHOT_DONE,
                                       revision=9)

    async def ListSessions(
        self,
        request: session_pb2.ListSessionsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> session_pb2.ListSessionsResponse:
        left = int(request.page_token or 0)
        response = session_pb2.ListSessionsResponse(revision=9)
        response.sessions.extend([self.record] * min(left, request.page_size))
        if left > request.page_size:
            response.next_page_token = str(left - request.page_size)
        return response

    async def PutSession(
        self,
        request: session_pb2.PutSessionRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> session_pb2.PutSessionResponse:
        return session_pb2.PutSessionResponse(revision=1, session=request.session)


async def serve(unix_socket: str | None) -> None:
    server = grpc.aio.server()
    session_pb2_grpc.add_SessionServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if unix_socket:
        server.add_insecure_port(f"unix:{unix_socket}")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else None))
