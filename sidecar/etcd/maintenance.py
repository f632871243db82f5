"""etcd's maintenance calls the sidecar makes: the database size, history compaction and the
alarm list.

Each function takes the ``etcd3`` client and runs in :meth:`sidecar.etcd.client.Etcd.call`'s
thread. The client's own ``status()`` drops the revision and the size in use, and its
generated stubs predate etcd 3.4's ``dbSizeInUse`` (field 9 of StatusResponse) and 3.5's
``CORRUPT`` alarm: both are read here from what protobuf keeps of fields and enum values it
does not know, rather than from a second copy of etcd's protos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from etcd3 import etcdrpc
from google.protobuf.unknown_fields import UnknownFieldSet

# etcd's rpc.proto: StatusResponse.dbSizeInUse, and the AlarmType values.
DB_SIZE_IN_USE_FIELD = 9
ALARM_TYPES = {1: "NOSPACE", 2: "CORRUPT"}
COMPACTED_MARK = "required revision has been compacted"


@dataclass(frozen=True, slots=True)
class DbStatus:
    """One member's database as its Status call reports it."""

    revision: int  # the cluster's current revision, from the response header
    compact_revision: int  # not in Status: 0 here, filled in by whoever knows it
    db_size: int  # bytes of the bbolt file: what etcd's quota counts
    db_size_in_use: int  # bytes of it that hold data; the rest is free pages


def db_status(client: Any) -> DbStatus:
    """Status of the member the client uses now."""
    client.channel  # noqa: B018 - a property: selects a live endpoint, drops stale stubs
    response = client.maintenancestub.Status(
        etcdrpc.StatusRequest(), client.timeout, credentials=client.call_credentials,
        metadata=client.metadata)
    return DbStatus(int(response.header.revision), 0, int(response.dbSize),
                    _unknown_varint(response, DB_SIZE_IN_USE_FIELD, int(response.dbSize)))


def _unknown_varint(message: Any, number: int, default: int) -> int:
    fields = UnknownFieldSet(message)
    for index in range(len(fields)):
        unknown = fields[index]
        if unknown.field_number == number and isinstance(unknown.data, int):
            return int(unknown.data)
    return default  # an etcd older than 3.4 does not report it: count the whole file


def compact(client: Any, revision: int) -> bool:
    """Compact history up to ``revision``; False when etcd had compacted past it already (by
    an operator, or its own auto-compaction): nothing is left to do then."""
    client.channel  # noqa: B018 - see db_status
    try:
        # Not physical: etcd frees the pages in the background; waiting for it would hold
        # the call for as long as a large history takes to drop.
        client.kvstub.Compact(etcdrpc.CompactionRequest(revision=revision, physical=False),
                              client.timeout, credentials=client.call_credentials,
                              metadata=client.metadata)
    except grpc.RpcError as exc:
        details = exc.details() if hasattr(exc, "details") else ""
        if COMPACTED_MARK in (details or ""):
            return False
        raise
    return True


def active_alarms(client: Any) -> tuple[tuple[str, int], ...]:
    """The alarms raised in the cluster now, as (type, member id), sorted."""
    client.channel  # noqa: B018 - see db_status
    response = client.maintenancestub.Alarm(
        etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET, memberID=0, alarm=etcdrpc.NONE),
        client.timeout, credentials=client.call_credentials, metadata=client.metadata)
    return tuple(sorted((ALARM_TYPES.get(int(a.alarm), f"TYPE{int(a.alarm)}"), int(a.memberID))
                        for a in response.alarms))


def disarm(client: Any, alarms: tuple[tuple[str, int], ...]) -> None:
    """Deactivate each alarm, member by member, as ``etcdctl alarm disarm`` does (the client's
    own ``disarm_alarm()`` asks for member 0, which etcd takes as no member at all)."""
    client.channel  # noqa: B018 - see db_status
    codes = {name: code for code, name in ALARM_TYPES.items()}
    for kind, member in alarms:
        client.maintenancestub.Alarm(
            etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.DEACTIVATE, memberID=member,
                                 alarm=codes[kind]),
            client.timeout, credentials=client.call_credentials, metadata=client.metadata)
