"""systemd service notification (``Type=notify``): READY, STATUS, WATCHDOG and STOPPING.

The protocol is one datagram of ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``
(a leading "@" means Linux's abstract namespace). Written here rather than taken from the
``sdnotify`` package, which has not been maintained since 2017: the whole protocol is the send
below. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        # systemd asks for a ping at least every WATCHDOG_USEC; ping at half that.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:  # systemd gone or the socket misnamed: never fatal
            log.warning("sd_notify_failed", error=str(exc))

    async def watchdog(self) -> None:
        """Ping while the event loop runs: a stuck loop stops the pings, systemd restarts us."""
        if self.watchdog_interval is None or not self.address:
            return
        while True:
            self.send(watchdog="1")
            await asyncio.sleep(self.watchdog_interval)
