"""A process that only reads an etcd watch, as the standby's follower does: the floor under
the standby's CPU per applied write.

    python -m tests.bench.watch_floor ENDPOINTS PREFIX

Watches every key under PREFIX from now on, with the follower's own code for the stream
(:class:`sidecar.etcd.aiokv.AioWatch`: etcd's generated stub on a ``grpc.aio`` channel, each
response turned into events) and does nothing with the events but count them. Prints a line
once the watch is open. Whatever CPU it uses per write is what any follower on this stack
pays before it checks, stores or journals anything.
"""

from __future__ import annotations

import asyncio
import sys

from sidecar import config
from sidecar.etcd.aiokv import AioKV


async def follow(endpoints: str, prefix: bytes) -> None:
    settings = config.build({"node_id": "watch-floor", "etcd_endpoints": endpoints})
    kv = AioKV(settings)
    events = 0
    try:
        async with kv.watch(prefix, prefix=True, start_revision=0) as watch:
            print("watching", flush=True)
            async for batch in watch:
                events += len(batch.events)
    finally:
        await kv.close()


if __name__ == "__main__":
    asyncio.run(follow(sys.argv[1], sys.argv[2].encode()))
