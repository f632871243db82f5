"""A SessionService whose PutSession does nothing: the floor under any sidecar on this stack.

    python -m tests.bench.echo_server [UNIX_SOCKET_PATH]

Serves PutSession on 127.0.0.1 (a free port, printed on the first line of stdout), and on a
Unix socket when given a path (the transport of the sidecar's control socket, where session
writes go, so the two are compared like for like), with the same
gRPC server the sidecar uses (grpcio's asyncio server), and answers every request with the
record it got, at revision 1: no validation, no etcd, no copy. What a client measures against
it (calls per second, latency, the server's CPU per call) is what the gRPC layer alone costs
on this machine, which bounds what any sidecar built on it can reach.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from sidecar.api import session_pb2, session_pb2_grpc


class Echo(session_pb2_grpc.SessionServiceServicer):
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
