"""The etcd error family, and the translation of every way an etcd call fails into it.

A leaf: anything that handles etcd errors imports them from here.
"""

from __future__ import annotations

import etcd3.exceptions
import grpc

TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


class EtcdError(Exception):
    """An etcd call failed; ``transient`` says whether retrying can help."""

    transient = True


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time (down, partitioned, no quorum)."""


class EtcdAccessDenied(EtcdError):
    """Authentication or authorisation failed: a configuration problem, not an outage."""

    transient = False


class LeaseGone(EtcdError):
    """etcd no longer has the lease a call used (it expired or was revoked)."""

    transient = False


class Compacted(EtcdError):
    """A watch asked for history that etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


class NoSpace(EtcdError):
    """etcd refused a write because its database reached its quota (the NOSPACE alarm): no
    write, no lease grant, no election succeeds until an operator frees space and disarms."""

    transient = False


# What etcd says when a write hits its quota (RESOURCE_EXHAUSTED).
NO_SPACE_MARK = "database space exceeded"


class ClientClosed(EtcdUnavailable):
    """The client was closed (by another thread) while a call was on its way."""


def translate(exc: BaseException, what: str) -> EtcdError:
    """Map the many shapes of a failed call onto our three kinds."""
    if isinstance(exc, EtcdError):
        return exc
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        # etcd answers a wrong user or password with INVALID_ARGUMENT, not UNAUTHENTICATED.
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or \
                "authentication failed" in (detail or ""):
            return EtcdAccessDenied(f"{what}: {detail}")
        if code in TRANSIENT_CODES:
            return EtcdUnavailable(f"{what}: {code.name if code else '?'} {detail}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and NO_SPACE_MARK in (detail or ""):
            return NoSpace(f"{what}: {code.name} {detail}")
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in (detail or ""):
            return LeaseGone(f"{what}: {detail}")
        error = EtcdError(f"{what}: {code.name if code else '?'} {detail}")
        error.transient = False
        return error
    if isinstance(exc, etcd3.exceptions.Etcd3Exception | TimeoutError | OSError):
        # The client wraps the gRPC error into a bare "connection failed"; its detail (a TLS
        # handshake failure, a refused connection) is what an operator needs to see.
        cause = exc.__context__
        detail = cause.details() if isinstance(cause, grpc.RpcError) and hasattr(
            cause, "details") else ""
        return EtcdUnavailable(f"{what}: {type(exc).__name__} {exc} {detail or ''}".rstrip())
    if isinstance(exc, ValueError) and "closed" in str(exc) and "channel" in str(exc).lower():
        # Another thread dropped the client (after an access error) while this call was on
        # its way: the next attempt gets a fresh client.
        return ClientClosed(f"{what}: the client was closed during the call")
    raise exc
