"""The ``pause`` key: maintenance mode as stored in etcd, read, put and deleted.

The CLI (``vsm-sidecar pause``/``resume``) writes it straight to etcd, so it works on any node
whatever the sidecars do (the primary may be dead: that is when a pause matters most). A pause
``--for`` a while lives on an etcd lease of that TTL: etcd deletes it when the time is up,
whether or not any sidecar runs. The nodes only read it (sidecar.core.watches.watch_pause).
"""

from __future__ import annotations

from typing import Any

from etcd3 import etcdrpc

from .client import Etcd, kv_call
from .keys import Keys
from .records import GarbageLog, PauseRecord


async def read_pause(etcd: Etcd, keys: Keys,
                     garbage: GarbageLog | None = None) -> tuple[PauseRecord | None, int]:
    """The pause (None when there is none, or only garbage: reported to ``garbage``) and the
    revision the read reflects."""

    def read(client: Any) -> Any:
        return kv_call(client, "Range", etcdrpc.RangeRequest(key=keys.pause))

    response = await etcd.call(read, "read pause")
    revision = int(response.header.revision)
    if not response.kvs:
        return None, revision
    kv = response.kvs[0]
    if garbage is not None and garbage.known(keys.pause, kv.mod_revision):
        return None, revision
    try:
        return PauseRecord.decode(kv.value), revision
    except ValueError as exc:
        if garbage is not None:
            garbage.report("pause", keys.pause, kv.mod_revision, str(exc), kv.value)
        return None, revision


async def put_pause(etcd: Etcd, keys: Keys, record: PauseRecord, ttl: int | None) -> None:
    """Pause the cluster; with ``ttl``, on a lease of its own that ends the pause by itself.
    A pause already there is replaced (its old lease, if any, no longer holds the key)."""

    def put(client: Any) -> None:
        lease = client.lease(ttl).id if ttl is not None else None
        client.put(keys.pause, record.encode(), lease=lease)

    await etcd.call(put, "pause")


async def delete_pause(etcd: Etcd, keys: Keys) -> bool:
    """End the pause; whether there was one (garbage included)."""
    return bool(await etcd.call(lambda c: c.delete(keys.pause), "resume"))
