"""systemd service notification (``Type=notify``): READY, STATUS, WATCHDOG and STOPPING.

The protocol is one datagram of ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``
(a leading "@" means Linux's abstract namespace). Written here rather than taken from the
``sdnotify`` package, which has not been maintained since 2017: the whole protocol is the send
below. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.

Every send is non-blocking. A datagram socket whose reader has fallen behind has a short queue
(``net.unix.max_dgram_qlen``, 10 by default): a blocking send would then freeze the event loop,
and with it the role, the API and the lease, until systemd read again. A message that does not fit
is dropped and logged; a missed watchdog ping is what the watchdog is there to notice.
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
        self.dropped = 0  # messages not sent because the reader's queue was full

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), socket.MSG_DONTWAIT, self.address)
        except BlockingIOError:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:  # a stuck reader: not one per ping
                log.warning("sd_notify_dropped", keys=sorted(fields), dropped=self.dropped,
                            why="the notify socket's queue is full")
        except OSError as exc:  # systemd gone or the socket misnamed: never fatal
            log.warning("sd_notify_failed", error=str(exc))

    async def watchdog(self) -> None:
        """Ping while the event loop runs: a stuck loop stops the pings, systemd restarts us."""
        if self.watchdog_interval is None or not self.address:
            return
        while True:
            self.send(watchdog="1")
            await asyncio.sleep(self.watchdog_interval)
