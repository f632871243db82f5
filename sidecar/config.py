"""Settings: a TOML file, ``VSM_SIDECAR_*`` environment variables and command-line flags.

Every setting is declared once, as a field of :class:`Settings` (in :mod:`sidecar.settings`)
whose metadata carries its help text and its parser; the file keys, the environment names and
the flags are all derived from that table here, so they cannot drift apart. Precedence: flags
beat environment beat file beat defaults. Values are validated once
(:mod:`sidecar.configcheck`) and the result is frozen. Anything wrong raises
:class:`ConfigError` naming the setting; the CLI turns that into one line on stderr and exit
code 2.

This module is the face the rest of the sidecar uses: it re-exports the table's names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from .configcheck import validate
from .settings import (
    DEFAULT_GRPC_SOCKET,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_TTL,
    MIN_TTL,
    NAME_PATTERN,
    SETTING_NAMES,
    ConfigError,
    Settings,
    default_node_id,
    printable,
)

__all__ = [
    "DEFAULT_GRPC_SOCKET", "ENV_PREFIX", "LOG_FORMATS", "LOG_LEVELS", "MAX_TTL", "MIN_TTL",
    "NAME_PATTERN", "SETTING_NAMES", "ConfigError", "Settings", "add_arguments", "build",
    "env_name", "flag_name", "load", "printable", "read_file", "to_toml",
]

ENV_PREFIX = "VSM_SIDECAR_"


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
