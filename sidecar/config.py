"""Settings: a TOML file, ``VSM_SIDECAR_*`` environment variables and command-line flags.

Every setting is declared once, as a field of :class:`Settings` whose metadata carries its help
text and its parser; the file keys, the environment names and the flags are all derived from that
table, so they cannot drift apart. Precedence: flags beat environment beat file beat defaults.
Values are validated once and the result is frozen. Anything wrong raises :class:`ConfigError`
naming the setting; the CLI turns that into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import socket
import ssl
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

ENV_PREFIX = "VSM_SIDECAR_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_TTL, MAX_TTL = 2, 300
MIN_MARGIN = 0.1
# Where the gRPC API's Unix socket is made by default (systemd's RuntimeDirectory=vsm-sidecar).
DEFAULT_GRPC_SOCKET = Path("/run/vsm-sidecar/grpc.sock")
# sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


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


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting; unset flags stay out of the namespace."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML file with the same keys (also {env_name('config')})")
    for f in dataclasses.fields(Settings):
        default = f.default if f.default not in (None, "") else "none"
        if isinstance(default, tuple):
            default = ",".join(default)
        help_text = f"{f.metadata['help']} [{default}; env {env_name(f.name)}]"
        if isinstance(f.default, bool):  # --preferred-primary / --no-preferred-primary
            parser.add_argument(flag_name(f.name), dest=f.name, default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=help_text)
            continue
        # List settings may be repeated (--vip A --vip B) as well as comma separated.
        action = "append" if isinstance(f.default, tuple) else "store"
        parser.add_argument(
            flag_name(f.name), dest=f.name, metavar=f.metadata["metavar"], action=action,
            default=argparse.SUPPRESS, help=help_text)


def load(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Merge file, environment and flags (in rising precedence) into validated settings."""
    environ = os.environ if environ is None else environ
    config_file = flags.get("config") or environ.get(env_name("config"))
    raw: dict[str, Any] = {}
    if config_file:
        raw.update(read_file(Path(config_file)))
    raw.update(_from_environ(environ))
    raw.update({k: v for k, v in flags.items() if k in SETTING_NAMES})
    return build(raw)


def read_file(path: Path) -> dict[str, Any]:
    try:
        # Bytes, not read_text(): its newline translation would turn a lone "\r", which TOML
        # refuses, into a line break, and change multi-line strings.
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in SETTING_NAMES:
            raise ConfigError(key, f"unknown key in {path}{_suggest(key)}")
        _check_toml_type(name, value)
    return {key.replace("-", "_"): value for key, value in data.items()}


def _check_toml_type(name: str, value: Any) -> None:
    """TOML has numbers and booleans: one written as a string in the file is a mistake
    (``ttl = "5"``), although flags and environment variables, which hold only text, spell
    them so. An empty string still means "not set" for an optional number."""
    if not isinstance(value, str):
        return  # other types are the parsers' business
    kinds = typing.get_args(_HINTS[name]) or (_HINTS[name],)
    if bool in kinds:
        expected = "true or false"
    elif int in kinds:
        expected = "a whole number"
    elif float in kinds:
        if type(None) in kinds and not value.strip():
            return
        expected = "a number"
    else:
        return
    raise ConfigError(name, f"expected {expected}, got the string {value!r} (a TOML "
                            "number or boolean is written without quotes)")


_HINTS = typing.get_type_hints(Settings)


def to_toml(settings: Settings) -> str:
    """The settings as a TOML file that :func:`read_file` takes back to the same settings.

    One key per setting, in ``--help`` order; a setting that is not set stays commented out
    with the empty string that means "not set", as in deploy/sidecar.example.toml. A setting
    that is on by default and turned off (``grpc_socket``) is written as that empty string, so
    that it stays off when read back."""
    defaults = Settings.__dataclass_fields__
    lines = []
    for name in SETTING_NAMES:
        value = getattr(settings, name)
        if value is None:
            off = defaults[name].default not in (None, dataclasses.MISSING)
            lines.append(f'{name} = ""  # off\n' if off else f'#{name} = ""  # not set\n')
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        lines.append(tomli_w.dumps({name: value}))
    return "".join(lines)


def _from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    values = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == env_name("config"):
            continue
        setting = name[len(ENV_PREFIX):].lower()
        if setting not in SETTING_NAMES:
            raise ConfigError(name, f"unknown environment variable{_suggest(setting)}")
        values[setting] = value
    return values


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key.replace("-", "_").lower(), SETTING_NAMES, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build(raw: Mapping[str, Any]) -> Settings:
    """Parse raw values (strings or TOML values) and validate the whole."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            values[name] = fields[name].metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None
    settings = Settings(**values)
    if not settings.node_id:
        settings = dataclasses.replace(settings, node_id=default_node_id())
    validate(settings)
    return settings


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


def _validate_vsm_server(s: Settings) -> None:
    import shlex

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
    from .host import health, hooks

    if s.on_role_change is not None:
        try:
            hooks.check_program(s.on_role_change)
        except ValueError as exc:
            raise ConfigError("on_role_change", str(exc)) from None
    if not 0.1 <= s.hook_timeout <= 3600:
        raise ConfigError("hook_timeout", f"must be 0.1-3600 seconds (got {s.hook_timeout})")
    if s.health_check is not None:
        try:
            health.parse_target(s.health_check)
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
    from .endpoints.grpc_access import group_id

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
