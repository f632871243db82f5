"""The settings table: every setting of a sidecar, declared once as a field of
:class:`Settings` whose metadata carries its help text and its parser, and the error that names
a setting (:class:`ConfigError`).

A leaf: every room reads :class:`Settings`. :mod:`sidecar.config` derives the file keys, the
environment names and the flags from this table and builds validated settings;
:mod:`sidecar.configcheck` holds the checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_TTL, MAX_TTL = 2, 300
# Where the gRPC API's Unix socket is made by default (systemd's RuntimeDirectory=vsm-sidecar).
DEFAULT_GRPC_SOCKET = Path("/run/vsm-sidecar/grpc.sock")


class ConfigError(Exception):
    """A setting is missing, unknown or invalid. ``str()`` is the one line an operator sees."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting '{printable(setting)}': {printable(problem)}")
        self.setting = setting
        self.problem = problem


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with control characters (and line separators) escaped: a value quoted in an
    error, or an unknown key taken from a TOML file, must not break the message's one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


Parser = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    _check_utf8(value)
    return value.strip()


def _check_utf8(text: str) -> None:
    # An environment variable or an argument that is not UTF-8 arrives with lone surrogates
    # (surrogateescape): no TOML file can hold it, so check-config could not print it back.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{text!r} is not valid UTF-8") from None


def _optional_text(value: Any) -> str | None:
    text = _text(value)
    return text or None


def _optional_path(value: Any) -> Path | None:
    text = _text(value)
    return _checked_path(text) if text else None


def _checked_path(text: str) -> Path:
    if "\0" in text:  # only TOML can spell it ("\u0000"); no system call takes it
        raise ValueError("a path cannot contain a NUL character")
    return Path(text)


def _number(kind: type[int] | type[float]) -> Parser:
    expected = "a whole number" if kind is int else "a number"

    def parse(value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected {expected}, got {type(value).__name__}")
        # int() would cut 2.5 (a TOML float) to 2, and int() and float() read any script's
        # digits ("\u0663" is 3): refuse both rather than guess.
        if (kind is int and isinstance(value, float)) or \
                (isinstance(value, str) and not value.isascii()):
            raise ValueError(f"expected {expected}, got {value!r}")
        try:
            number = kind(value)
        except (ValueError, OverflowError):  # OverflowError: float() of a 400-digit TOML int
            raise ValueError(f"expected {expected}, got {value!r}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number

    return parse


def _path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    text = _text(value)
    if not text:
        raise ValueError("expected a path")
    return _checked_path(text)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _optional_float(value: Any) -> float | None:
    if isinstance(value, str) and not value.strip():
        return None
    return float(_number(float)(value))


def _string_list(value: Any) -> tuple[str, ...]:
    """A list from TOML, or a comma separated string from a flag or the environment."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of strings or a comma separated string")
    for item in items:
        _check_utf8(item)
    return tuple(part.strip() for item in items for part in item.split(",") if part.strip())


def _choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        text = _text(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _setting(default: Any, parse: Parser, help: str, *, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help, "metavar": metavar})


def default_node_id() -> str:
    """The host name, cut to what a node id may contain."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63]
    return name if NAME_PATTERN.match(name) else "node"


@dataclass(frozen=True)
class Settings:
    """All settings of one sidecar. Field order is the order of ``--help``."""

    node_id: str = _setting(
        "", _text, "this node's id in etcd (default: the host name)", metavar="ID")
    cluster: str = _setting(
        "thinlinc", _text, "cluster name: keys live under /thinlinc-ha/<cluster>/", metavar="NAME")
    etcd_endpoints: tuple[str, ...] = _setting(
        ("http://127.0.0.1:2379",), _string_list,
        "etcd client URLs, comma separated; calls fail over between them", metavar="URLS")
    etcd_ca: Path | None = _setting(
        None, _optional_path, "CA bundle that signed the etcd servers' certificates",
        metavar="FILE")
    etcd_cert: Path | None = _setting(
        None, _optional_path, "client certificate for etcd (with --etcd-key)", metavar="FILE")
    etcd_key: Path | None = _setting(
        None, _optional_path, "client key for etcd (with --etcd-cert)", metavar="FILE")
    etcd_user: str | None = _setting(
        None, _optional_text, "etcd user name (with --etcd-password-file)", metavar="USER")
    etcd_password_file: Path | None = _setting(
        None, _optional_path, "file holding the etcd user's password", metavar="FILE")
    etcd_timeout: float = _setting(
        0.5, _number(float), "deadline in seconds of each etcd call on the control path",
        metavar="SECONDS")
    compaction_interval: float = _setting(
        300.0, _number(float), "the primary compacts etcd's history this often (0: never; "
        "then etcd's own auto-compaction must)", metavar="SECONDS")
    compaction_keep: int = _setting(
        10_000, _number(int), "revisions of history kept behind the current one when "
        "compacting on the interval", metavar="REVISIONS")
    compaction_max_bytes: int = _setting(
        64 * 1024 * 1024, _number(int), "compact at once, keeping no history, when etcd's "
        "database in use has grown this much since the last compaction; at most 1/8 of etcd's "
        "--quota-backend-bytes", metavar="BYTES")
    ttl: int = _setting(
        3, _number(int), f"lease TTL in whole seconds ({MIN_TTL}-{MAX_TTL}): how long etcd keeps "
        "a silent primary's leadership", metavar="SECONDS")
    keepalive_fraction: float = _setting(
        0.2, _number(float), "send a lease keepalive every ttl x this fraction", metavar="FRACTION")
    safety_margin: float | None = _setting(
        None, _optional_float, "give up the primary role this long before the local lease "
        "deadline (default: max(0.25, ttl / 10))", metavar="SECONDS")
    grpc_listen: str = _setting(
        "127.0.0.1:50051", _text, "gRPC listen address: HOST:PORT or unix:PATH", metavar="ADDR")
    grpc_tls_cert: Path | None = _setting(
        None, _optional_path, "server certificate (PEM) for the gRPC API: turns TLS on "
        "(with --grpc-tls-key)", metavar="FILE")
    grpc_tls_key: Path | None = _setting(
        None, _optional_path, "private key (PEM) of --grpc-tls-cert", metavar="FILE")
    grpc_client_ca: Path | None = _setting(
        None, _optional_path, "mutual TLS: gRPC clients must present a certificate signed "
        "by this CA bundle (PEM); needs TLS on", metavar="FILE")
    grpc_socket: Path | None = _setting(
        DEFAULT_GRPC_SOCKET, _optional_path, "Unix socket of the gRPC API, where changes "
        "(session writes, Switchover) are allowed: the kernel lets only root, the sidecar's "
        "user and --grpc-socket-group connect; empty: no socket", metavar="PATH")
    grpc_socket_group: str | None = _setting(
        None, _optional_text, "group (name or number) whose members may use --grpc-socket "
        "(mode 0660); unset: root and the sidecar's user only (0600)", metavar="GROUP")
    grpc_writers: tuple[str, ...] = _setting(
        (), _string_list, "client certificate common names that may make changes over "
        "--grpc-listen (needs --grpc-client-ca), comma separated", metavar="NAMES")
    allow_unauthenticated_changes: bool = _setting(
        False, _boolean, "let anyone who reaches --grpc-listen write sessions and move the "
        "role, unidentified (off: only --grpc-socket and --grpc-writers may; logged as a "
        "warning when on)")
    http_listen: str = _setting(
        "127.0.0.1:8008", _text, "HTTP for load balancers and "
        "Prometheus (/primary /standby /health /metrics): HOST:PORT, empty to turn it off; "
        "loopback by default, set the node's address for a remote HAProxy", metavar="ADDR")
    advertise_address: str | None = _setting(
        None, _optional_text, "gRPC address other nodes and operators use to reach this node, "
        "published in etcd (default: --grpc-listen)", metavar="ADDR")
    vip: tuple[str, ...] = _setting(
        (), _string_list, "resource IP(s) the primary holds, ADDRESS/PREFIX, IPv4 or IPv6; "
        "repeat the flag or separate with commas", metavar="CIDR")
    vip_interface: str | None = _setting(
        None, _optional_text, "interface that carries the resource IP(s)", metavar="IFNAME")
    vip_label: str = _setting(
        "vsm", _text, "IPv4 address label suffix (<ifname>:<label>) marking our addresses",
        metavar="LABEL")
    garp_repeat: int = _setting(
        5, _number(int), "announcements (gratuitous ARP / unsolicited NA) per burst",
        metavar="N")
    garp_interval: float = _setting(
        0.0, _number(float), "seconds between the announcements of a burst", metavar="SECONDS")
    garp_delay: float = _setting(
        5.0, _number(float), "second burst this long after the first (0: none)",
        metavar="SECONDS")
    garp_refresh: float = _setting(
        0.0, _number(float), "re-announce this often while primary (0: never)",
        metavar="SECONDS")
    vip_probe_timeout: float = _setting(
        0.01, _number(float), "before claiming, listen this long for another host answering "
        "for the address (a stale holder is logged and counted, then the claim goes on)",
        metavar="SECONDS")
    vsm_sessions_file: Path | None = _setting(
        None, _optional_path, "mirror a stock VSM server's session database file (e.g. "
        "/var/lib/vsm/sessions): uploaded to etcd by the primary; in on-primary mode also "
        "kept current on the standby",
        metavar="FILE")
    vsm_file_check_interval: float = _setting(
        2.0, _number(float), "re-check the file this often besides inotify events",
        metavar="SECONDS")
    # -- how the VSM server runs beside the sidecar (docs/THINLINC.md) ----------------------
    vsm_server_mode: str = _setting(
        "replicated", _choice("replicated", "on-primary"), "replicated: the VSM server runs on "
        "both nodes with ThinLinc's HA sync on, the sidecar moves the resource IP and never "
        "writes the sessions file; on-primary: ThinLinc's sync off, the sidecar starts the VSM "
        "server on promotion and stops it on demotion", metavar="MODE")
    vsm_server_start: str = _setting(
        "systemctl start vsmserver.service", _text, "on-primary: command that starts the VSM "
        "server (split like a shell would, run without one)", metavar="COMMAND")
    vsm_server_stop: str = _setting(
        "systemctl stop vsmserver.service", _text, "on-primary: command that stops the VSM "
        "server", metavar="COMMAND")
    vsm_server_timeout: float = _setting(
        60.0, _number(float), "on-primary: a start or stop still running after this long is "
        "killed and counts as failed", metavar="SECONDS")
    thinlinc_conf_dir: Path = _setting(
        Path("/opt/thinlinc/etc/conf.d"), _path, "ThinLinc's hiveconf folder (*.hconf), read "
        "by check-host", metavar="DIR")
    preferred_primary: bool = _setting(
        False, _boolean, "this node is the one ThinLinc calls primary: it takes the role back "
        "when it is healthy and caught up (failback)")
    failback: bool = _setting(
        True, _boolean, "let the preferred primary take the role back (--no-failback: "
        "stay with the current primary, like keepalived's nopreempt)")
    failback_delay: float = _setting(
        5.0, _number(float), "the preferred primary must be healthy, caught up and unchanged "
        "this long before it asks for the role back", metavar="SECONDS")
    on_role_change: Path | None = _setting(
        None, _optional_path, "program run on every role change (old and new role, epoch, "
        "node and leader in its environment), one at a time, in order", metavar="PROGRAM")
    hook_timeout: float = _setting(
        30.0, _number(float), "a role hook still running after this long is killed",
        metavar="SECONDS")
    health_check: str | None = _setting(
        None, _optional_text, "check of the local VSM server gating candidacy: tcp:PORT, "
        "tcp:HOST:PORT (port 9000 is the VSM server's) or exec:COMMAND (off when unset)",
        metavar="CHECK")
    health_interval: float = _setting(
        2.0, _number(float), "seconds between health checks", metavar="SECONDS")
    health_timeout: float = _setting(
        1.0, _number(float), "a health check not done after this long fails", metavar="SECONDS")
    health_rise: int = _setting(
        2, _number(int), "consecutive passes that make the VSM server healthy", metavar="N")
    health_fall: int = _setting(
        3, _number(int), "consecutive failures that make it unhealthy", metavar="N")
    data_dir: Path = _setting(
        Path("/var/lib/vsm-sidecar"), _path, "folder for the durable copy of the session "
        "records (created, owner-only)", metavar="DIR")
    log_format: str = _setting(
        "auto", _choice(*LOG_FORMATS), "json, console, or auto (console on a terminal)",
        metavar="FORMAT")
    log_level: str = _setting("info", _choice(*LOG_LEVELS), "lowest level logged", metavar="LEVEL")

    @property
    def keepalive_interval(self) -> float:
        return self.ttl * self.keepalive_fraction

    @property
    def margin(self) -> float:
        """The safety margin in force (explicit, or derived from the TTL)."""
        if self.safety_margin is not None:
            return self.safety_margin
        return max(0.25, self.ttl / 10)

    @property
    def published_address(self) -> str:
        return self.advertise_address or self.grpc_listen

    @property
    def prefix(self) -> str:
        return f"/thinlinc-ha/{self.cluster}/"


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
