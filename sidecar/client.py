"""A small client of a sidecar's gRPC API, for the CLI, the demo and the tests.

Plaintext unless TLS material is given: ``ca`` (the CA that signed the sidecar's
``grpc_tls_cert``; default: the system's trust store) and, for mutual TLS, ``cert`` and ``key``
(a client certificate signed by the sidecar's ``grpc_client_ca``). Any of the three turns TLS on.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from .api import role_pb2, role_pb2_grpc


class Unreachable(Exception):
    """The sidecar did not answer."""


class Refused(Exception):
    """The sidecar answered, and said no (the reason is the message); or the kernel would not
    let this user connect to the sidecar's Unix socket."""


def to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def channel(address: str, *, ca: str | Path | None = None, cert: str | Path | None = None,
            key: str | Path | None = None) -> grpc.Channel:
    """A channel to ``address``: TLS when any of ``ca``, ``cert``, ``key`` is given."""
    if ca is None and cert is None and key is None:
        return grpc.insecure_channel(address)
    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert))
    return grpc.secure_channel(address, credentials)


def get_role(address: str, timeout: float = 3.0, *, ca: str | Path | None = None,
             cert: str | Path | None = None, key: str | Path | None = None,
             ) -> dict[str, Any]:
    """GetRole as a dict (the shape ``grpcurl`` prints)."""
    with channel(address, ca=ca, cert=cert, key=key) as chan:
        stub = role_pb2_grpc.RoleServiceStub(chan)
        try:
            return to_dict(stub.GetRole(role_pb2.GetRoleRequest(), timeout=timeout))
        except grpc.RpcError as exc:
            # One kind of failure for callers that wait for a sidecar to answer; the message
            # still says when the socket is closed to this user.
            raise Unreachable(str(_failure(address, exc))) from None


def _unreachable(address: str, exc: grpc.RpcError) -> Unreachable:
    """One line for an operator. gRPC's own text for a failed connection runs to a few
    hundred characters of resolver and socket detail; the sidecar's UNAVAILABLE answers
    (etcd is unreachable) start with "etcd" and are passed on as they are."""
    details = exc.details() or ""
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unreachable(f"no sidecar answers at {address} (no answer in time)")
    if exc.code() is grpc.StatusCode.UNAVAILABLE and not details.startswith("etcd"):
        if "handshake" in details.lower():
            return Unreachable(f"the TLS handshake with {address} failed (check --grpc-ca, "
                               "--grpc-cert and --grpc-key)")
        if "socket closed" in details.lower():  # it listens, but refused the handshake
            return Unreachable(f"{address} closed the connection (a sidecar with TLS? check "
                               "--grpc-ca, --grpc-cert and --grpc-key)")
        return Unreachable(f"no sidecar answers at {address}")
    return Unreachable(f"no answer from {address}: {exc.code().name} {details}")


def switchover(address: str, target: str | None, timeout: float = 15.0, *,
               ca: str | Path | None = None, cert: str | Path | None = None,
               key: str | Path | None = None) -> tuple[str, int, float]:
    """Switchover: the new primary, its epoch and how long the move took."""
    with channel(address, ca=ca, cert=cert, key=key) as chan:
        stub = role_pb2_grpc.RoleServiceStub(chan)
        request = role_pb2.SwitchoverRequest(target_node=target or "")
        try:
            answer = stub.Switchover(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.PERMISSION_DENIED):
                raise Refused(exc.details()) from None
            raise _failure(address, exc) from None
    return answer.primary, answer.epoch, answer.took.ToTimedelta().total_seconds()


def _failure(address: str, exc: grpc.RpcError) -> Exception:
    """What a failed call means: no answer, or a socket this user may not connect to (gRPC
    reports that as UNAVAILABLE, like a sidecar that is down)."""
    path = Path(address[len("unix:"):]) if address.startswith("unix:") else None
    if path is not None and path.exists() and not os.access(path, os.W_OK):
        return Refused(f"this user may not connect to {path}: {_who_may(path)} may")
    return _unreachable(address, exc)


def watch_role(channel: grpc.Channel) -> Iterator[role_pb2.RoleStatus]:
    """The WatchRole stream (current status first, then each change)."""
    return iter(role_pb2_grpc.RoleServiceStub(channel).WatchRole(role_pb2.WatchRoleRequest()))


def role_name(status: dict[str, Any]) -> str:
    return str(status.get("role", "ROLE_UNSPECIFIED")).removeprefix("ROLE_")


def format_status(status: dict[str, Any]) -> str:
    """The status as a few aligned lines for a terminal."""
    rows = [
        ("node", status.get("node_id", "")),
        ("cluster", status.get("cluster", "")),
        ("role", role_name(status)),
        ("epoch", status.get("epoch", "0")),
        ("leader", f"{status.get('leader_id', '-')} ({status.get('leader_address', '-')})"),
        ("since", _short_time(status.get("role_since", ""))),
        ("reason", status.get("reason", "")),
    ]
    if "lease_time_left" in status:
        rows.append(("lease left", f"{float(status['lease_time_left'].rstrip('s')):.2f} s"))
    if status.get("resource_ips"):
        held = "held" if status.get("resource_ip_held") else "not held"
        rows.append(("resource IP", f"{', '.join(status['resource_ips'])} ({held})"))
    if status.get("etcd_alarms"):
        rows.append(("etcd alarms", f"{' '.join(status['etcd_alarms'])} (etcd refuses writes)"))
    members = ", ".join(f"{m.get('node_id')}={role_name(m)}" for m in status.get("members", []))
    rows.append(("members", members or "-"))
    rows.append(("paused", pause_line(status.get("pause"))))
    return "\n".join(f"{key:<11} {value}" for key, value in rows)


def pause_line(pause: dict[str, Any] | None) -> str:
    """The ``pause`` of a status in one line: "no", or who, since, until, why."""
    if not pause:
        return "no"
    until = _short_time(pause["until"]) if "until" in pause else "resume"
    text = f"PAUSED by {pause.get('by') or '?'} since {_short_time(pause.get('since', ''))}, " \
           f"until {until}"
    return f"{text}: {pause['reason']}" if pause.get("reason") else text


def cluster_view(status: dict[str, Any]) -> dict[str, Any]:
    """The cluster as one sidecar sees it (``status --all``): every member with its lag, in
    revisions, behind the member whose copy is newest (as each last published it)."""
    members = status.get("members", [])
    newest = max((int(m.get("applied_revision", 0)) for m in members), default=0)
    rows = []
    for m in sorted(members, key=lambda m: str(m.get("node_id"))):
        applied = int(m.get("applied_revision", 0))
        ip = ("held" if m.get("resource_ip_held") else "not held") \
            if m.get("has_resource_ip") else "none"
        rows.append({"node_id": m.get("node_id", ""), "role": role_name(m),
                     "epoch": int(m.get("epoch", 0)), "health": m.get("health", ""),
                     "applied_revision": applied, "lag": newest - applied if applied else None,
                     "resource_ip": ip, "version": m.get("version", ""),
                     "address": m.get("address", "")})
    return {"cluster": status.get("cluster", ""), "asked": status.get("node_id", ""),
            "leader_id": status.get("leader_id", ""), "epoch": int(status.get("epoch", 0)),
            "pause": status.get("pause"), "members": rows,
            "resource_ip_holders": [r["node_id"] for r in rows if r["resource_ip"] == "held"]}


def format_cluster(view: dict[str, Any]) -> str:
    """``status --all`` as a table (``patronictl list``'s shape)."""
    head = ("MEMBER", "ROLE", "EPOCH", "HEALTH", "APPLIED", "LAG", "RESOURCE IP", "VERSION")
    rows = [head] + [(r["node_id"], r["role"], str(r["epoch"]), r["health"] or "-",
                      str(r["applied_revision"] or "-"),
                      "-" if r["lag"] is None else str(r["lag"]), r["resource_ip"],
                      r["version"] or "-") for r in view["members"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    holders = ", ".join(view["resource_ip_holders"]) or "nobody"
    if all(r["resource_ip"] == "none" for r in view["members"]):
        holders = "nobody (none configured)"
    leader = view["leader_id"] or "none"
    return "\n".join([f"cluster {view['cluster']} (as seen by {view['asked']}): primary "
                      f"{leader}, epoch {view['epoch']}; resource IP held by {holders}",
                      f"paused: {pause_line(view['pause'])}", *table])


def _short_time(stamp: str) -> str:
    """An RFC 3339 time from the API cut to milliseconds: 2026-01-02T03:04:05.678Z."""
    head, dot, tail = stamp.partition(".")
    return f"{head}.{tail[:3]}Z" if dot else stamp


def _who_may(socket: Path) -> str:
    """Who the socket's owner, group and mode let connect, in words."""
    info = socket.stat()
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    if not info.st_mode & stat.S_IWGRP:
        return f"root and user {owner}"
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"root, user {owner} and members of group {group}"
