"""The two interceptors wrap a method's handler once and decide on every call: the access guard
asks who the caller is on each call, whatever an earlier call of the same method got, and the
request guard refuses every undecodable request. A real grpc.aio server with a do-nothing
SessionService, on a TCP port and a Unix socket; no etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.api import session_pb2, session_pb2_grpc
from sidecar.endpoints.grpc_access import AccessGuard, AccessPolicy, Handler
from sidecar.endpoints.grpc_role import RequestGuard

PUT = "/thinlinc.ha.v1.SessionService/PutSession"


class Echo(session_pb2_grpc.SessionServiceServicer):
    async def PutSession(self, request: Any, context: Any) -> Any:
        return session_pb2.PutSessionResponse(revision=1, session=request.session)


class Counting(AccessGuard):
    def __init__(self, policy: AccessPolicy) -> None:
        super().__init__(policy)
        self.wrapped: list[str] = []

    def wrap(self, method: str, handler: Handler) -> Handler | None:
        self.wrapped.append(method)
        return super().wrap(method, handler)


def _policy() -> AccessPolicy:
    return AccessPolicy(socket=None, group=None, writers=frozenset(), open_to_all=False,
                        user="sidecar")


async def _serve(tmp_path: Path, guard: AccessGuard) -> AsyncGenerator[tuple[str, str], None]:
    server = grpc.aio.server(interceptors=[guard, RequestGuard()])
    session_pb2_grpc.add_SessionServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    socket = tmp_path / "ctl.sock"
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", f"unix:{socket}"
    finally:
        await server.stop(None)


async def _put(target: str, raw: bytes | None = None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        if raw is None:
            raw = session_pb2.PutSessionRequest(
                session=session_pb2.Session(session_id="s-1")).SerializeToString()
        put: Any = channel.unary_unary(PUT)
        try:
            await put(raw, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_a_method_is_wrapped_once_and_every_call_is_decided_anew(tmp_path: Path) -> None:
    """Calls from the TCP port are refused and calls on the Unix socket allowed, in any
    order, each time; an undecodable request is refused each time; the guard wrapped
    PutSession's handler once."""
    guard = Counting(_policy())

    async def body() -> list[grpc.StatusCode]:
        serving = _serve(tmp_path, guard)
        tcp, unix = await anext(serving)
        try:
            garbage = b"\x0a\xff"  # field 1, length 255, and nothing after it
            return [await _put(tcp), await _put(unix), await _put(tcp), await _put(unix),
                    await _put(unix, garbage), await _put(unix, garbage)]
        finally:
            await serving.aclose()

    codes = asyncio.run(body())
    denied, ok, invalid = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK,
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert codes == [denied, ok, denied, ok, invalid, invalid]
    assert guard.wrapped == [PUT]


def test_a_handler_served_anew_is_wrapped_anew() -> None:
    """The wrapped handler is kept for the handler it was made from: when the server answers a
    method with another handler, that one is wrapped, not served the old one's wrapper."""
    guard = Counting(_policy())
    first: Handler = grpc.unary_unary_rpc_method_handler(Echo().PutSession)
    second: Handler = grpc.unary_unary_rpc_method_handler(Echo().PutSession)
    details = type("Details", (), {"method": PUT, "invocation_metadata": ()})()

    async def through(handler: Handler) -> Handler | None:
        async def continuation(_: Any) -> Handler:
            return handler
        return await guard.intercept_service(continuation, details)

    async def body() -> list[Any]:
        return [await through(first), await through(first), await through(second)]

    one, again, other = asyncio.run(body())
    assert one is again
    assert other is not one
    assert guard.wrapped == [PUT, PUT]


@pytest.mark.parametrize("method", ["/thinlinc.ha.v1.SessionService/GetSession",
                                    "/grpc.health.v1.Health/Check"])
def test_a_read_is_served_its_own_handler(method: str) -> None:
    """Reads are not wrapped by the access guard: the server's own handler is served."""
    guard = AccessGuard(_policy())
    handler: Handler = grpc.unary_unary_rpc_method_handler(Echo().PutSession)
    details = type("Details", (), {"method": method, "invocation_metadata": ()})()

    async def continuation(_: Any) -> Handler:
        return handler

    assert asyncio.run(guard.intercept_service(continuation, details)) is handler
