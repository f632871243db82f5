"""Calls to etcd's Auth service for a local cluster's users and roles."""

from __future__ import annotations

from typing import Any

from .etcderrors import EtcdClusterError, rpc_reason


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


class AlreadyExists(EtcdClusterError):
    """An auth object to be created exists already."""


def auth_call(etcd: Any, method: str, request: Any) -> Any:
    # The raw stubs send no token unless given the client's call credentials; without one,
    # a member with --client-cert-auth takes the client certificate's CN for the user name.
    try:
        return getattr(etcd.authstub, method)(
            request, etcd.timeout, metadata=etcd.metadata)
    except Exception as exc:  # grpc's error type cannot be named; see EtcdMember.status()
        if "already exists" in rpc_reason(exc):
            raise AlreadyExists(rpc_reason(exc)) from exc
        raise
