"""Start-up, run, shut down: one sidecar process in a straight line.

Signals only set an event. The first SIGTERM or SIGINT starts a handover (rule 6) and the
process exits 0 when it is done; a second one exits at once, after the release actions (which
are synchronous and fast) so that even then no resource IP is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

from . import logs
from .config import ConfigError, Settings
from .etcd import Etcd
from .grpc_api import GrpcServer
from .node import Node

log = structlog.get_logger(__name__)

EXIT_FORCED = 130
SHUTDOWN_GRACE = 1.0


class Service:
    """The parts of one sidecar, wired together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        logs.set_status(node=settings.node_id, role="STARTING", epoch=0)
        self.etcd = Etcd(settings, name="etcd-control")
        self.node = Node(settings, self.etcd)
        self.grpc = GrpcServer(self.node, settings.grpc_listen)
        self.stop = asyncio.Event()

    def _on_signal(self, signum: int) -> None:
        if not self.stop.is_set():
            log.info("signal", signal=signal.Signals(signum).name, decision="hand over and exit")
            self.stop.set()
            return
        log.warning("signal", signal=signal.Signals(signum).name, decision="exit at once")
        self.node._release("second signal: exit at once")
        os._exit(EXIT_FORCED)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            await self.grpc.start()
        except (OSError, RuntimeError) as exc:
            raise ConfigError("grpc_listen", f"cannot listen on {self.settings.grpc_listen}: "
                                             f"{exc}") from None
        try:
            await self.node.run(self.stop)
        finally:
            await self.grpc.stop(SHUTDOWN_GRACE)
            self.etcd.close()
        log.info("stopped")
        return 0


async def run(settings: Settings) -> int:
    return await Service(settings).serve()
