"""Who may change things through the gRPC API.

Reads (role, sessions, health, reflection) are open to whoever reaches a listener. Every other
method of our services changes something (PutSession, DeleteSession, Switchover today) and is
allowed only to a caller the sidecar can identify:

* a peer on one of the sidecar's Unix sockets (``grpc_socket``, or ``grpc_listen`` when it is
  ``unix:PATH``). gRPC tells a server nothing about such a peer (its peer string is ``unix:``,
  its auth context empty, even with local credentials), so the identification is the kernel's
  check at connect(2): the sidecar owns the socket, gives it to ``grpc_socket_group`` and sets
  mode 0600 or 0660 before it listens, so only root, the sidecar's user and members of that
  group get a connection at all. A TCP peer's string can never start with ``unix:``;
  an abstract socket's is ``unix-abstract:``, and the sidecar never listens on one.
* a peer whose client certificate, verified by gRPC against ``grpc_client_ca``, has a common
  name listed in ``grpc_writers``.

``allow_unauthenticated_changes`` lifts the rule. The check fails closed: a method is guarded
unless it is listed in :data:`READS`, so a new method that changes something (pause, resume)
is guarded the day it is added, and a new read is opened with one line here.
"""

from __future__ import annotations

import inspect
import os
import pwd
import socket
import stat
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import structlog

from ..host.accounts import group_id
from ..settings import ConfigError, Settings

log = structlog.get_logger(__name__)

# The methods of our services that change nothing.
READS = frozenset({
    "/thinlinc.ha.v1.RoleService/GetRole",
    "/thinlinc.ha.v1.RoleService/WatchRole",
    "/thinlinc.ha.v1.SessionService/GetSession",
    "/thinlinc.ha.v1.SessionService/ListSessions",
    "/thinlinc.ha.v1.SessionService/WatchSessions",
})
# Standard services that only read: health checks and reflection (grpcurl).
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def is_change(method: str) -> bool:
    """Whether a full method name ("/package.Service/Method") needs an identified caller."""
    return method not in READS and not method.startswith(OPEN_SERVICES)


def on_unix_socket(peer: str) -> bool:
    """Whether a gRPC peer string is a connection on a Unix socket (path, not abstract)."""
    return peer.startswith("unix:")


def peer_common_names(auth: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The verified client certificate's common name(s) from a gRPC auth context (empty
    without mutual TLS: gRPC only fills them in for a certificate it verified)."""
    return [value.decode("utf-8", "replace") for value in auth.get("x509_common_name", ())]


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


@dataclass(frozen=True)
class AccessPolicy:
    """The decision for one guarded call, and the refusal that says how to get access."""

    socket: Path | None
    group: str | None
    writers: frozenset[str]
    open_to_all: bool
    user: str

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(socket=settings.grpc_socket, group=settings.grpc_socket_group,
                   writers=frozenset(settings.grpc_writers),
                   open_to_all=settings.allow_unauthenticated_changes, user=_user_name())

    def allows(self, peer: str, common_names: Collection[str]) -> bool:
        if self.open_to_all or on_unix_socket(peer):
            return True
        return any(name in self.writers for name in common_names)

    def refusal(self, method: str, peer: str, common_names: Sequence[str]) -> str:
        who = f"{peer} with certificate CN {', '.join(common_names)}" if common_names \
            else f"{peer} without a client certificate"
        if self.socket is None:
            local = "the Unix socket, which is off (grpc_socket)"
        elif self.group is None:
            local = (f"the Unix socket {self.socket} (root and user {self.user} may connect; "
                     "grpc_socket_group adds a group)")
        else:
            local = (f"the Unix socket {self.socket} (root, user {self.user} and members of "
                     f"group {self.group} may connect)")
        return (f"{method.rpartition('/')[2]} changes state, so it needs an identified "
                f"caller: {local}, or mutual TLS with a client certificate named in "
                f"grpc_writers; {who} is neither")


# A handler's behaviour, and how to build a handler of each kind around a new one (the two
# interceptors here and in grpc_role.py wrap the behaviour and rebuild the handler).
Behavior = Callable[..., Any]
HANDLER_MAKERS: dict[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
Check = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps a method's handler once, the first time the method is called,
    and answers every later call of it with the same wrapped handler. grpc.aio asks the
    interceptors for every call; rebuilding the handler each time cost each session write
    ~5% of the primary's CPU."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler | None]] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[Handler | None]],
            handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:  # a handler served anew: wrap it anew
            known = self._wrapped[method] = (handler, self.wrap(method, handler))
        return known[1]

    def wrap(self, method: str, handler: Handler) -> Handler | None:
        """The handler that serves ``method`` instead of ``handler``."""
        raise NotImplementedError


class AccessGuard(WrappingInterceptor):
    """Answers PERMISSION_DENIED, before the servicer runs, to a call that changes something
    from a caller the policy does not allow."""

    def __init__(self, policy: AccessPolicy) -> None:
        super().__init__()
        self.policy = policy

    def wrap(self, method: str, handler: Handler) -> Handler | None:
        if not is_change(method) or self.policy.open_to_all:
            return handler

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            peer = context.peer()
            names = peer_common_names(context.auth_context())
            if not self.policy.allows(peer, names):
                log.warning("change_denied", method=method, peer=peer, common_names=names)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    self.policy.refusal(method, peer, names))

        for kind, make in HANDLER_MAKERS.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return make(_checked(behavior, check), handler.request_deserializer,
                            handler.response_serializer)
        return None  # a handler without a behaviour serves nothing: UNIMPLEMENTED


def _checked(behavior: Behavior, check: Check) -> Behavior:
    """``behavior`` run only after ``check`` passed, in the same form (async generator or
    coroutine)."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any],
                         ) -> AsyncIterator[Any]:
            await check(context)
            async for response in behavior(request, context):
                yield response

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await check(context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return call


# -- the socket ------------------------------------------------------------------------------


def prepare_socket(path: Path) -> None:
    """Make the socket's folder if it is missing, and refuse a path another process serves
    (gRPC would silently replace that socket with ours) or that is not a socket."""
    try:
        path.parent.mkdir(mode=0o755, exist_ok=True)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError("grpc_socket", f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError("grpc_socket", f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket of an earlier run: gRPC replaces it
    raise ConfigError("grpc_socket", f"{path} is in use by another process")


def secure_socket(path: Path, group: str | None) -> None:
    """Give the socket to ``group`` and set its mode; called after bind and before listen, so
    no connection is ever accepted under a looser mode."""
    if group is not None:
        try:
            os.chown(path, -1, group_id(group))
        except PermissionError:
            raise ConfigError("grpc_socket_group", f"cannot give {path} to group {group}: "
                                                   f"user {_user_name()} is not a member "
                                                   "(systemd: SupplementaryGroups=)") from None
    os.chmod(path, 0o660 if group is not None else 0o600)


def unix_path(address: str) -> Path | None:
    """The socket path of a ``unix:PATH`` address, else None."""
    return Path(address[len("unix:"):]) if address.startswith("unix:") else None
