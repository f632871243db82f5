"""The checks of :class:`~sidecar.settings.Settings`: each setting, and the rules that tie
settings together. :func:`validate` raises :class:`~sidecar.settings.ConfigError` naming the
setting at fault.

Checks that need another room's grammar import it from a leaf (the health-check target, the
hook program, the socket's group), so that no module below imports the settings' users.
"""

from __future__ import annotations

import os
import re
import shlex
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .host.accounts import group_id
from .host.processes import check_program
from .host.targets import parse_target
from .settings import MAX_TTL, MIN_TTL, NAME_PATTERN, ConfigError, Settings

MIN_MARGIN = 0.1
# compaction_max_bytes: 1 MiB, and 1/8 of etcd's largest recommended quota (8 GiB).
MIN_COMPACTION_BYTES = 1 << 20
MAX_COMPACTION_BYTES = 1 << 30
# sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


def validate(s: Settings) -> None:
    """Check each setting and the rules that tie them together."""
    for name in ("node_id", "cluster"):
        if not NAME_PATTERN.fullmatch(getattr(s, name)):
            raise ConfigError(name, "must be 1-63 characters of letters, digits, '.', '_' or '-', "
                                    f"starting with a letter or digit (got {getattr(s, name)!r})")
    _validate_endpoints(s.etcd_endpoints)
    _validate_credentials(s)
    _validate_timing(s)
    _validate_listen("grpc_listen", s.grpc_listen)
    if s.advertise_address is not None:
        _validate_address("advertise_address", s.advertise_address)
    _validate_grpc_security(s)
    if s.http_listen:
        if s.http_listen.startswith("unix:"):
            raise ConfigError("http_listen", "must be HOST:PORT (no Unix socket for HTTP)")
        _validate_listen("http_listen", s.http_listen)
    _validate_vip(s)
    _validate_hooks_and_health(s)
    if not 0 <= s.failback_delay <= 3600:
        raise ConfigError("failback_delay", f"must be 0-3600 seconds (got {s.failback_delay})")
    if not 0.1 <= s.vsm_file_check_interval <= 3600:
        raise ConfigError("vsm_file_check_interval", "must be 0.1-3600 seconds")
    if s.vsm_sessions_file is not None and not s.vsm_sessions_file.parent.is_dir():
        raise ConfigError("vsm_sessions_file",
                          f"the folder of {s.vsm_sessions_file} does not exist")
    _validate_vsm_server(s)
    _validate_compaction(s)


def _validate_compaction(s: Settings) -> None:
    # Checked every second (sidecar.core.compaction.CHECK_PERIOD): less acts as 1 s.
    if not 0 <= s.compaction_interval <= 7 * 86400:
        raise ConfigError("compaction_interval", "must be 0-604800 seconds, 0 for off "
                                                 f"(got {s.compaction_interval})")
    if not 0 <= s.compaction_keep <= 100_000_000:
        raise ConfigError("compaction_keep", f"must be 0-100000000 (got {s.compaction_keep})")
    if not MIN_COMPACTION_BYTES <= s.compaction_max_bytes <= MAX_COMPACTION_BYTES:
        raise ConfigError("compaction_max_bytes", f"must be {MIN_COMPACTION_BYTES}-"
                                                  f"{MAX_COMPACTION_BYTES} bytes (1 MiB-1 GiB, "
                                                  "at most 1/8 of etcd's quota; got "
                                                  f"{s.compaction_max_bytes})")


def _validate_vsm_server(s: Settings) -> None:
    for name in ("vsm_server_start", "vsm_server_stop"):
        try:
            words = shlex.split(getattr(s, name))
        except ValueError as exc:
            raise ConfigError(name, f"cannot be split into words: {exc}") from None
        if not words:
            raise ConfigError(name, "must name a command")
    if not 1 <= s.vsm_server_timeout <= 3600:
        raise ConfigError("vsm_server_timeout", "must be 1-3600 seconds")
    if s.vsm_server_mode == "on-primary" and s.health_check is not None:
        raise ConfigError("health_check", "cannot gate candidacy in on-primary mode: a "
                                          "standby's VSM server is stopped by design")


def _validate_hooks_and_health(s: Settings) -> None:
    if s.on_role_change is not None:
        try:
            check_program(s.on_role_change)
        except ValueError as exc:
            raise ConfigError("on_role_change", str(exc)) from None
    if not 0.1 <= s.hook_timeout <= 3600:
        raise ConfigError("hook_timeout", f"must be 0.1-3600 seconds (got {s.hook_timeout})")
    if s.health_check is not None:
        try:
            parse_target(s.health_check)
        except ValueError as exc:
            raise ConfigError("health_check", str(exc)) from None
    if not 0.1 <= s.health_interval <= 3600:
        raise ConfigError("health_interval", "must be 0.1-3600 seconds")
    if not 0.05 <= s.health_timeout <= s.health_interval:
        raise ConfigError("health_timeout", "must be 0.05 s up to health_interval")
    for name in ("health_rise", "health_fall"):
        if not 1 <= getattr(s, name) <= 100:
            raise ConfigError(name, f"must be 1-100 (got {getattr(s, name)})")


def _validate_vip(s: Settings) -> None:
    # Imported here, not at the top: vip.py loads pyroute2 (a fifth of a second), which the
    # CLI's client commands, importing this module through config, never need. A leaf: no cycle.
    from .resource import address as vip

    for text in s.vip:
        try:
            vip.parse_vip(text)
        except vip.VipError as exc:
            raise ConfigError("vip", str(exc)) from None
    if s.vip and not s.vip_interface:
        raise ConfigError("vip_interface", "is needed when a resource IP is configured")
    if s.vip_interface is not None and (
            not _IFNAME.fullmatch(s.vip_interface) or s.vip_interface in (".", "..")):
        raise ConfigError("vip_interface", f"{s.vip_interface!r} is not an interface name "
                                           "(1-15 characters, no '/', ':' or white space)")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,14}", s.vip_label):
        raise ConfigError("vip_label", "must be 1-14 letters, digits, '_' or '-'")
    if not 1 <= s.garp_repeat <= 100:
        raise ConfigError("garp_repeat", f"must be 1-100 (got {s.garp_repeat})")
    for name in ("garp_interval", "garp_delay", "garp_refresh"):
        if not 0 <= getattr(s, name) <= 3600:
            raise ConfigError(name, f"must be 0-3600 seconds (got {getattr(s, name)})")
    if not 0 <= s.vip_probe_timeout <= 1:
        raise ConfigError("vip_probe_timeout", "must be 0-1 seconds")


def _validate_endpoints(endpoints: Sequence[str]) -> None:
    if not endpoints:
        raise ConfigError("etcd_endpoints", "at least one URL is needed")
    for url in endpoints:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port in (None, -1):
            raise ConfigError("etcd_endpoints",
                              f"{url!r} is not a URL like http://HOST:2379 or https://HOST:2379")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError("etcd_endpoints", f"{url!r} must not have a path or query")
    schemes = {urlsplit(u).scheme for u in endpoints}
    if len(schemes) > 1:
        raise ConfigError("etcd_endpoints", "mixes http and https URLs")


def _validate_credentials(s: Settings) -> None:
    if (s.etcd_cert is None) != (s.etcd_key is None):
        missing = "etcd_key" if s.etcd_key is None else "etcd_cert"
        raise ConfigError(missing, "etcd_cert and etcd_key go together")
    if (s.etcd_user is None) != (s.etcd_password_file is None):
        missing = "etcd_password_file" if s.etcd_password_file is None else "etcd_user"
        raise ConfigError(missing, "etcd_user and etcd_password_file go together")
    https = urlsplit(s.etcd_endpoints[0]).scheme == "https"
    if s.etcd_user is not None and not https:
        raise ConfigError("etcd_user", "needs https:// etcd endpoints: gRPC sends the etcd "
                                       "auth token only over TLS")
    tls_files = (s.etcd_ca, s.etcd_cert, s.etcd_key)
    if any(tls_files) and urlsplit(s.etcd_endpoints[0]).scheme != "https":
        raise ConfigError("etcd_endpoints", "TLS files are set but the URLs are http://")
    for name in ("etcd_ca", "etcd_cert", "etcd_key", "etcd_password_file"):
        path = getattr(s, name)
        if path is not None:
            _check_readable(name, path)
    # gRPC reads these only when it first connects, and then retries a bad file for ever.
    if s.etcd_ca is not None:
        _check_ca("etcd_ca", s.etcd_ca)
    if s.etcd_cert is not None and s.etcd_key is not None:
        _check_key_pair(("etcd_cert", s.etcd_cert), ("etcd_key", s.etcd_key))


def _validate_grpc_security(s: Settings) -> None:
    if (s.grpc_tls_cert is None) != (s.grpc_tls_key is None):
        missing = "grpc_tls_key" if s.grpc_tls_key is None else "grpc_tls_cert"
        raise ConfigError(missing, "grpc_tls_cert and grpc_tls_key go together")
    if s.grpc_client_ca is not None and s.grpc_tls_cert is None:
        raise ConfigError("grpc_client_ca", "needs grpc_tls_cert and grpc_tls_key: client "
                                            "certificates are checked only over TLS")
    for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_client_ca"):
        path = getattr(s, name)
        if path is not None:
            _check_readable(name, path)
    if s.grpc_tls_cert is not None and s.grpc_tls_key is not None:
        # Either file wrong names grpc_tls_cert, as this check always has.
        _check_key_pair(("grpc_tls_cert", s.grpc_tls_cert), ("grpc_tls_cert", s.grpc_tls_key))
    if s.grpc_client_ca is not None:
        _check_ca("grpc_client_ca", s.grpc_client_ca)
    for name in s.grpc_writers:
        if len(name) > 64:
            raise ConfigError("grpc_writers", f"{name!r} is longer than a common name may be "
                                              "(64)")
        if s.grpc_client_ca is None:
            raise ConfigError("grpc_writers", f"{name!r} is a certificate common name: it "
                                              "needs grpc_client_ca (mutual TLS); local "
                                              "callers use grpc_socket")
    _validate_grpc_socket(s)


def _validate_grpc_socket(s: Settings) -> None:
    if s.grpc_socket is None:
        if s.grpc_socket_group is not None:
            raise ConfigError("grpc_socket_group", "needs grpc_socket")
        return
    path = s.grpc_socket
    if not path.is_absolute():
        raise ConfigError("grpc_socket", f"{str(path)!r} must be an absolute path")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError("grpc_socket", f"{path} is longer than a socket path may be "
                                         f"({MAX_SOCKET_PATH} bytes)")
    # The sidecar makes the socket's own folder (as /run/vsm-sidecar), not a whole tree.
    if not path.parent.parent.is_dir():
        raise ConfigError("grpc_socket", f"the folder of {path.parent} does not exist")
    if s.grpc_listen == f"unix:{path}":
        raise ConfigError("grpc_socket", "is the same socket as grpc_listen")
    if s.grpc_socket_group is not None:
        try:
            group_id(s.grpc_socket_group)
        except KeyError:
            raise ConfigError("grpc_socket_group",
                              f"no group {s.grpc_socket_group!r} on this host") from None


def _check_readable(setting: str, path: Path) -> None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from None


def _check_ca(setting: str, path: Path) -> None:
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(setting, f"{path} is not a PEM CA bundle: {exc.reason or exc}") from None


def _check_key_pair(cert: tuple[str, Path], key: tuple[str, Path]) -> None:
    """A PEM certificate and the private key that goes with it (OpenSSL compares them)."""
    (cert_setting, cert_path), (key_setting, key_path) = cert, key
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert_path)
    except ssl.SSLError as exc:
        raise ConfigError(cert_setting, f"{cert_path} is not a PEM certificate: "
                                        f"{exc.reason or exc}") from None
    try:
        # The password callback stops OpenSSL from prompting on the terminal for an encrypted
        # key (gRPC could not use one anyway).
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(key_setting, f"{key_path} is not the unencrypted PEM key of "
                                       f"{cert_path}: {exc.reason or exc}") from None


def _validate_timing(s: Settings) -> None:
    if not MIN_TTL <= s.ttl <= MAX_TTL:
        raise ConfigError("ttl", f"must be {MIN_TTL}-{MAX_TTL} seconds (got {s.ttl}); etcd "
                                 "raises shorter leases to 1.5 x its election timeout anyway")
    if not 0.02 <= s.keepalive_fraction <= 0.5:
        raise ConfigError("keepalive_fraction",
                          f"must be 0.02-0.5 (got {s.keepalive_fraction}): at most every half TTL")
    if not 0.05 <= s.etcd_timeout <= 30:
        raise ConfigError("etcd_timeout", f"must be 0.05-30 seconds (got {s.etcd_timeout})")
    if s.margin < MIN_MARGIN:
        raise ConfigError("safety_margin", f"must be at least {MIN_MARGIN} s (got {s.margin})")
    # The primary must survive one lost keepalive: two intervals plus the margin fit in a TTL.
    budget = s.ttl - 2 * s.keepalive_interval
    if s.margin >= budget:
        raise ConfigError(
            "safety_margin", f"{s.margin:g} s leaves no room to miss a keepalive: must be below "
            f"ttl - 2 x keepalive interval = {budget:g} s")
    if s.etcd_timeout >= s.ttl - s.margin:
        raise ConfigError("etcd_timeout", f"must be shorter than ttl - safety margin "
                                          f"({s.ttl - s.margin:g} s)")


# What Linux takes as an interface name (dev_valid_name): below IFNAMSIZ, no "/", ":" or space.
_IFNAME = re.compile(r"[^/:\s]{1,15}")
# A host name or IPv4 address, or an IPv6 address in brackets (with a zone index, perhaps).
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?\]")


def _validate_address(setting: str, address: str) -> None:
    """HOST:PORT or unix:PATH, as another host would dial it (no local checks)."""
    if address.startswith("unix:") and len(address) > len("unix:"):
        return
    _validate_host_port(setting, address)


def _validate_host_port(setting: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or \
            not 0 < int(port) < 65536:
        raise ConfigError(setting, f"{address!r} is not HOST:PORT or unix:PATH")
    if not _HOST.fullmatch(host):
        raise ConfigError(setting, f"{address!r}: {host!r} is not a host name or IP address "
                                   "(an IPv6 address goes in brackets: [::1]:PORT)")


def _validate_listen(setting: str, address: str) -> None:
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        try:
            usable = bool(path) and Path(path).parent.is_dir()
        except OSError as exc:  # e.g. a folder on the way that we may not enter
            raise ConfigError(setting, f"{address!r}: {exc.strerror}") from None
        if not usable:
            raise ConfigError(setting, f"{address!r}: the socket's folder does not exist")
        return
    _validate_host_port(setting, address)
