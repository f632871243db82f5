"""gRPC: RoleService, the standard health service, and server reflection (for grpcurl).

The servicers only ask the node; they never touch etcd. Health has three names: "" (the process
is working), ``thinlinc.ha.v1.RoleService``, and ``thinlinc.ha.v1.Primary``, which is SERVING only
while this node is PRIMARY, so a plain gRPC health probe can find the primary.

With ``grpc_tls_cert``/``grpc_tls_key`` the port speaks TLS only (no plaintext fallback); with
``grpc_client_ca`` as well, every client must present a certificate signed by that CA (mutual
TLS). Reflection and health are served on the same port, so they follow the same rules.

The Unix socket ``grpc_socket`` (plaintext; the kernel decides who connects) serves the same
services. Calls that change something are allowed only to identified callers: see
:mod:`sidecar.endpoints.grpc_access`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ..api import role_pb2, role_pb2_grpc
from ..core.node import Node
from ..core.roles import Role, Status
from ..core.rules import SwitchoverRefused
from ..core.switchover import SwitchoverFailed
from ..etcd.errors import EtcdError
from ..etcd.records import PauseRecord
from ..settings import NAME_PATTERN, ConfigError
from .grpc_access import (
    HANDLER_MAKERS,
    AccessGuard,
    AccessPolicy,
    Behavior,
    Handler,
    WrappingInterceptor,
    prepare_socket,
    secure_socket,
    unix_path,
)

log = structlog.get_logger(__name__)

PRIMARY_HEALTH_SERVICE = "thinlinc.ha.v1.Primary"
ROLE_SERVICE = role_pb2.DESCRIPTOR.services_by_name["RoleService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


ResourceView = Callable[[], tuple[list[str], bool, "float | None"]]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def status_message(status: Status, resource: ResourceView | None = None,
                   node: Node | None = None) -> role_pb2.RoleStatus:
    """Translate the node's status into the API message."""
    message = role_pb2.RoleStatus(
        node_id=status.node_id, cluster=status.cluster, role=status.role.value,
        epoch=status.epoch, reason=status.reason)
    if status.leader is not None:
        message.leader_id = status.leader.node_id
        message.leader_address = status.leader.address
    message.role_since.CopyFrom(_timestamp(status.role_since))
    if resource is not None:
        addresses, held, announced = resource()
        message.resource_ips.extend(addresses)
        message.resource_ip_held = held
        if announced is not None:
            message.last_announcement.CopyFrom(_timestamp(announced))
    left = status.lease_time_left()
    if left is not None:
        message.lease_time_left.CopyFrom(duration_pb2.Duration(
            seconds=int(left), nanos=int((left - int(left)) * 1e9)))
    if node is not None:
        message.preferred_primary = node.settings.preferred_primary
        if node.health_configured:
            health = node.health()
            message.health = "unknown" if health is None else (
                "healthy" if health else "unhealthy")
    if node is not None:
        _thinlinc_fields(message, node)
        message.etcd_alarms.extend(node.etcd_alarms())
    for member in status.members:
        message.members.add(
            node_id=member.node_id, address=member.address or "",
            role=_role_value(member.role), epoch=member.epoch or 0,
            health=member.health or "", applied_revision=member.applied_revision or 0,
            resource_ip_held=member.resource_ip_held is True,
            has_resource_ip=member.resource_ip_held is not None, version=member.version or "")
    if status.pause is not None:
        _pause_field(message, status.pause)
    return message


def _pause_field(message: role_pb2.RoleStatus, pause: PauseRecord) -> None:
    message.pause.CopyFrom(role_pb2.Pause(by=pause.by, reason=pause.reason,
                                          since=_timestamp(pause.since)))
    if pause.until is not None:
        message.pause.until.CopyFrom(_timestamp(pause.until))


def _thinlinc_fields(message: role_pb2.RoleStatus, node: Node) -> None:
    if node.file_report is not None:
        file = node.file_report()
        message.sessions_file.CopyFrom(role_pb2.SessionsFile(
            state=file.state, local_sha256=file.local_sha256, etcd_sha256=file.etcd_sha256,
            etcd_revision=file.etcd_revision, error=file.error,
            upload_failures=file.upload_failures))
        if file.behind_since is not None:
            message.sessions_file.behind_since.CopyFrom(_timestamp(file.behind_since))
    if node.server_report is not None:
        server = node.server_report()
        message.vsm_server.CopyFrom(role_pb2.VsmServer(
            state=server.state, since=_timestamp(server.since), error=server.error,
            start_failures=server.start_failures, stop_failures=server.stop_failures))


def _role_value(name: object) -> int:
    try:
        return role_pb2.Role.Value(str(name))
    except ValueError:
        return role_pb2.ROLE_UNSPECIFIED


class RoleServicer(role_pb2_grpc.RoleServiceServicer):
    def __init__(self, node: Node, resource: ResourceView | None = None) -> None:
        self.node = node
        self.resource = resource

    async def GetRole(self, request: role_pb2.GetRoleRequest,
                      context: grpc.aio.ServicerContext[object, object]) -> role_pb2.RoleStatus:
        return status_message(self.node.status(), self.resource, self.node)

    async def WatchRole(self, request: role_pb2.WatchRoleRequest,
                        context: grpc.aio.ServicerContext[object, object],
                        ) -> AsyncIterator[role_pb2.RoleStatus]:
        async for status in self.node.watch():
            yield status_message(status, self.resource, self.node)

    async def Switchover(self, request: role_pb2.SwitchoverRequest,
                         context: grpc.aio.ServicerContext[object, object],
                         ) -> role_pb2.SwitchoverResponse:
        started = time.monotonic()
        target = request.target_node or None
        if target is not None and not NAME_PATTERN.fullmatch(target):
            # Checked here, not left to "is not a member": that answer echoes the name, and a
            # name of a few kB would not fit in the status trailer (the client sees a broken
            # stream instead of the refusal).
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "target_node: not a node id (1-63 characters of letters, "
                                "digits, '.', '_' or '-', starting with a letter or digit)")
        try:
            primary, epoch = await self.node.switchover(target)
        except SwitchoverRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except SwitchoverFailed as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd: {exc}")
        took = time.monotonic() - started
        log.info("switchover_done", primary=primary, epoch=epoch, seconds=round(took, 4))
        return role_pb2.SwitchoverResponse(
            primary=primary, epoch=epoch,
            took=duration_pb2.Duration(seconds=int(took), nanos=int((took % 1) * 1e9)))


def server_credentials(cert: Path, key: Path,
                       client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials for the port; with ``client_ca``, client certificates are required."""
    root = client_ca.read_bytes() if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=root,
        require_client_auth=root is not None)


class _Undecodable:
    """What a request that does not parse turns into, so the method can refuse it."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return _Undecodable(exc)

    return deserialize


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request: not a valid message: {request.error}")


class RequestGuard(WrappingInterceptor):
    """Answers INVALID_ARGUMENT to a request whose bytes do not parse (corrupt wire format,
    a string that is not UTF-8, a truncated message).

    Left alone, grpc.aio lets the DecodeError escape from the generated deserializer and answers
    UNKNOWN, which tells a client nothing about whose fault it was. The guard swaps in a
    deserializer that returns a marker instead of raising, and a method that refuses the marker
    before the servicer sees it, for every service on the port."""

    def wrap(self, method: str, handler: Handler) -> Handler | None:
        if handler.request_deserializer is None:
            return handler
        for kind, make in HANDLER_MAKERS.items():
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            guarded = _guarded(behavior, handler.request_streaming)
            if guarded is None:
                return handler
            return make(guarded, _tolerant(handler.request_deserializer),
                        handler.response_serializer)
        return handler


def _guarded(behavior: Behavior, request_streaming: bool) -> Behavior | None:
    """``behavior`` with undecodable requests refused before it sees them, in the same form
    (an async generator, or a coroutine such as the health Watch that answers through
    ``context.write``); None for a synchronous one, which this aio server does not have."""

    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request_streaming:
            return _checked_stream(request, context)
        await _refuse_undecodable(request, context)
        return request

    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any],
                         ) -> AsyncIterator[Any]:
            async for response in behavior(await checked(request, context), context):
                yield response

        return stream
    if inspect.iscoroutinefunction(behavior):
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await behavior(await checked(request, context), context)

        return call
    return None


async def _checked_stream(requests: AsyncIterator[Any],
                          context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse_undecodable(request, context)
        yield request


class GrpcServer:
    """The aio server with our services, health and reflection."""

    def __init__(self, node: Node, listen: str, resource: ResourceView | None = None) -> None:
        self.node = node
        self.listen = listen
        self.policy = AccessPolicy.from_settings(node.settings)
        # The access check runs first: an unidentified caller's request is not even parsed.
        self.server = grpc.aio.server(interceptors=[AccessGuard(self.policy), RequestGuard()])
        self.health = health_aio.HealthServicer()
        role_pb2_grpc.add_RoleServiceServicer_to_server(RoleServicer(node, resource),
                                                        self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services = [ROLE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                         reflection.SERVICE_NAME]
        self._follower: asyncio.Task[None] | None = None

    def add_servicer(self, full_name: str, servicer: object,
                     adder: Callable[[Any, grpc.aio.Server], None]) -> None:
        """Serve one more service (call before :meth:`start`); it is listed for reflection.

        ``adder`` is the generated ``add_<Name>Servicer_to_server`` function."""
        adder(servicer, self.server)
        self.services.append(full_name)

    async def start(self) -> None:
        reflection.enable_server_reflection(self.services, self.server)
        settings = self.node.settings
        listen_path = unix_path(self.listen)
        if listen_path is not None:
            prepare_socket(listen_path)
        if settings.grpc_tls_cert is not None and settings.grpc_tls_key is not None:
            credentials = server_credentials(settings.grpc_tls_cert, settings.grpc_tls_key,
                                             settings.grpc_client_ca)
            port = self.server.add_secure_port(self.listen, credentials)
            security = "mtls" if settings.grpc_client_ca is not None else "tls"
        else:
            port = self.server.add_insecure_port(self.listen)
            security = "plaintext"
        if port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        # Unix sockets are bound now and listen at start(): secured in between, since a
        # connection on one is allowed to change things (grpc_access).
        if listen_path is not None:
            secure_socket(listen_path, settings.grpc_socket_group)
        if settings.grpc_socket is not None:
            self._add_socket(settings.grpc_socket, settings.grpc_socket_group)
        await self.server.start()
        await self.health.set("", SERVING)
        await self.health.set(ROLE_SERVICE, SERVING)
        self._follower = asyncio.create_task(self._follow_role(), name="health")
        log.info("grpc_listening", address=self.listen, security=security,
                 socket=str(settings.grpc_socket or "") or None,
                 socket_group=settings.grpc_socket_group,
                 writers=",".join(settings.grpc_writers) or None)
        if settings.allow_unauthenticated_changes:
            log.warning("changes_unauthenticated", address=self.listen,
                        decision="anyone who reaches this address may write sessions and "
                                 "move the primary role (allow_unauthenticated_changes)")

    def _add_socket(self, path: Path, group: str | None) -> None:
        prepare_socket(path)
        try:
            port = self.server.add_insecure_port(f"unix:{path}")
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError("grpc_socket", f"cannot listen on {path}")
        secure_socket(path, group)

    async def _follow_role(self) -> None:
        async for status in self.node.watch():
            primary = status.role is Role.PRIMARY
            await self.health.set(PRIMARY_HEALTH_SERVICE, SERVING if primary else NOT_SERVING)

    async def stop_serving_health(self) -> None:
        """Every health service answers NOT_SERVING from now on (the process is going)."""
        if self._follower is not None:
            self._follower.cancel()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 1.0) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
