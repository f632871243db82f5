"""Calls to etcd's Auth service for a local cluster's users and roles."""

from __future__ import annotations

import contextlib
from typing import Any

from etcd3 import etcdrpc

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


def enable_root(etcd: Any, root_password: str) -> None:
    """Create user root with role root (the role may exist) and turn authentication on."""
    with contextlib.suppress(AlreadyExists):
        auth_call(etcd, "RoleAdd", etcdrpc.AuthRoleAddRequest(name="root"))
    auth_call(etcd, "UserAdd", etcdrpc.AuthUserAddRequest(name="root", password=root_password))
    auth_call(etcd, "UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"))
    auth_call(etcd, "AuthEnable", etcdrpc.AuthEnableRequest())


def add_prefix_user(etcd: Any, name: str, password: str, prefix: str | None) -> None:
    """User ``name`` with a role of its own name that may read and write the keys under
    ``prefix`` (nothing with None)."""
    auth_call(etcd, "RoleAdd", etcdrpc.AuthRoleAddRequest(name=name))
    if prefix is not None:
        key = prefix.encode()
        permission = etcdrpc.auth_pb2.Permission(
            permType=etcdrpc.auth_pb2.Permission.READWRITE, key=key, range_end=prefix_end(key))
        auth_call(etcd, "RoleGrantPermission",
                  etcdrpc.AuthRoleGrantPermissionRequest(name=name, perm=permission))
    auth_call(etcd, "UserAdd", etcdrpc.AuthUserAddRequest(name=name, password=password))
    auth_call(etcd, "UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=name, role=name))
