"""Checks of this host that ``run`` makes before it touches etcd, each a ConfigError naming the
setting: the resource IP's interface and capabilities, the data directory, the listen
addresses. ``check-config`` makes the same ones, except those a running sidecar would fail
(its listen addresses are bound and its data directory locked).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from ..settings import ConfigError, Settings


def check_host(settings: Settings) -> None:
    """What ``check-config`` adds to the settings' own rules."""
    if settings.vip:
        from ..resource.controller import ResourceController

        resource = ResourceController(settings, lambda: False)
        try:
            resource.open()  # the very check run makes: capabilities, interface, its MAC
        finally:
            resource.close()
    check_data_dir(settings.data_dir)


def check_data_dir(data_dir: Path) -> None:
    """The folder exists and is writable, or it can be made (run makes it, owner only)."""
    existing = data_dir.absolute()
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        folder = existing.is_dir()
    except OSError as exc:  # e.g. a folder on the way that we may not enter
        raise ConfigError("data_dir", f"cannot use {data_dir}: {exc.strerror}") from None
    if not folder:
        raise ConfigError("data_dir", f"cannot use {data_dir}: {existing} is not a folder")
    if not os.access(existing, os.R_OK | os.W_OK | os.X_OK):
        where = "it" if existing == data_dir.absolute() else f"{existing}, where it would be made,"
        raise ConfigError("data_dir", f"cannot use {data_dir}: {where} is not writable for "
                                      "this user")


def check_listen(setting: str, address: str) -> None:
    """``address`` (HOST:PORT or unix:PATH) can be listened on now.

    Run before the servers start, so a busy address is this one line rather than gRPC's own
    log line and a half-started process. Every address the host name resolves to must be free:
    gRPC would settle for one of them, and a client of the name might then reach whatever
    holds the other.
    """
    if address.startswith("unix:"):
        _check_unix(setting, address, address[len("unix:"):])
        return
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(setting, f"cannot listen on {address}: {exc}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As both servers do: a port left in TIME_WAIT by the last run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise ConfigError(setting, f"cannot listen on {address}: "
                                           f"{exc.strerror or exc}") from None


def _check_unix(setting: str, address: str, path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(setting, f"cannot listen on {address}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(setting, f"cannot listen on {address}: it exists and is not a socket")
    # gRPC removes a socket file in its way, even one a live server answers on: refuse that.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return  # left by a process that is gone: gRPC replaces it
    raise ConfigError(setting, f"cannot listen on {address}: another process listens on it")
