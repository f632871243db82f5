"""Hostile and valid values for every setting, from every source (TOML file, ``VSM_SIDECAR_*``
environment variables, command-line flags), through the CLI's own entry point.

Each setting has a strategy for values within its rules and one for values that break them,
written out here from the settings' help texts rather than taken from the code under test; a
drawn case may set companion settings a value needs (a client key with its certificate, https
endpoints with a CA). Each key of a case then goes to a source drawn among those that can carry
its value. Properties: a valid case exits 0 and ``check-config`` prints the settings as TOML
that holds the parsed value and that ``--config`` takes back to the same output; an invalid one
exits 2 with exactly one line on stderr that names the setting (or the unknown key), and never
a traceback. A number or a boolean is text in a flag or a variable, but a string in the TOML
file is an error. Most runs call ``cli.main`` in-process, the code path of the console
script; a few run ``python -m sidecar check-config`` to show the same end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import stat
import subprocess
import sys
import tomllib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sidecar import cli, config

from .tlsgen import Pki, make_pki

# No example database, and a fixed seed (derandomize, or @seed where one inner function serves
# many runs): the same examples on every run.
SETTINGS = settings(deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
VALID_EXAMPLES = 8
INVALID_EXAMPLES = 12
# Characters an environment variable or a command-line argument can hold (no NUL, no lone
# surrogates); a TOML string can hold NUL as well.
ARG_CHAR = st.characters(codec="utf-8", exclude_characters="\0")
ANY_CHAR = st.characters(codec="utf-8")

# -- cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Raw values by setting (a string, or any TOML value) and, for a valid case, the parsed
    value ``setting`` must take; for an invalid case, ``setting`` is the one the error names."""

    values: Mapping[str, Any]
    setting: str
    expected: Any = None
    toml_only: bool = False  # a value of a TOML type the setting does not take


@dataclass(frozen=True)
class Files:
    """Real files for the settings that name one."""

    dir: Path
    text: Path  # readable, not a certificate
    program: Path  # executable
    not_executable: Path
    pki: Pki
    toml: Path  # where each example writes its TOML file


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    base = tmp_path_factory.mktemp("config-fuzz")
    text = base / "plain.txt"
    text.write_text("not a certificate\n")
    program = base / "hook.sh"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    not_executable = base / "hook.txt"
    not_executable.write_text("#!/bin/sh\n")
    return Files(base, text, program, not_executable, make_pki(base / "pki"),
                 base / "sidecar.toml")


def padded(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Text with white space around it, which every setting ignores."""
    space = st.sampled_from(["", " ", "\t", "  "])
    return st.builds(lambda a, t, b: a + t + b, space, text, space)


def one(name: str, raws: st.SearchStrategy[Any], expected: Callable[[Any], Any] | None = None,
        **companions: Any) -> st.SearchStrategy[Case]:
    """Cases that set ``name`` to a drawn raw value (plus fixed companions)."""
    return raws.map(lambda raw: Case({**companions, name: raw}, name,
                                     expected(raw) if expected else None))


def mistyped(name: str, raws: st.SearchStrategy[Any], **companions: Any) -> \
        st.SearchStrategy[Case]:
    """Invalid cases with a value of the wrong TOML type (only a TOML file can hold one: a
    flag or a variable would spell it as text, which may be valid)."""
    return raws.map(lambda raw: Case({**companions, name: raw}, name, toml_only=True))


def named(name: str, values: Mapping[str, Any]) -> st.SearchStrategy[Case]:
    """An invalid case of fixed values whose error names ``name``."""
    return st.just(Case(dict(values), name))


# Wrong TOML types, per parser family. Each fails the parse, so the error names the setting.
DATETIMES = st.datetimes(min_value=datetime(1, 1, 2), timezones=st.just(UTC))
TABLES = st.dictionaries(st.text(ANY_CHAR, max_size=5), st.integers(), min_size=1, max_size=2)
LISTS = st.lists(st.integers() | st.booleans(), min_size=1, max_size=3)
NOT_TEXT = st.one_of(st.integers(), st.floats(), st.booleans(), LISTS, TABLES, DATETIMES)
NOT_NUMBER = st.one_of(st.booleans(), LISTS, TABLES, DATETIMES,
                       st.lists(st.floats(allow_nan=False), max_size=2))
NOT_LIST = st.one_of(st.integers(), st.floats(), st.booleans(), TABLES, DATETIMES, LISTS,
                     st.lists(st.text(max_size=3) | st.integers(), min_size=2, max_size=3)
                     .filter(lambda items: not all(isinstance(i, str) for i in items)))
NOT_BOOL = st.one_of(st.integers(), st.floats(), LISTS, TABLES, DATETIMES)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


GARBAGE = st.text(ANY_CHAR, max_size=20).filter(lambda t: not _is_number(t)) | st.sampled_from(
    ["", " ", "1,5", "0x10", "ten", "1 2", "--1", "\u0663", "\uff15", "1e", "5s"])


def numbers(name: str, kind: type, low: float, high: float, top: float | None = None) -> \
        tuple[st.SearchStrategy[Case], st.SearchStrategy[Case]]:
    """A number setting that must lie from ``low`` to ``high``: valid cases from ``low`` to
    ``top`` (default ``high``; lower where a rule tying it to another setting's default cuts
    in), invalid ones outside ``low`` to ``high``."""
    top = high if top is None else top
    if kind is int:
        inside: st.SearchStrategy[Any] = st.integers(int(low), int(top))
        raws = inside | padded(inside.map(str))
        outside = st.integers(max_value=int(low) - 1) | st.integers(min_value=int(high) + 1) | \
            st.sampled_from([10**30, -(10**30)])
        wrong = st.one_of(GARBAGE, st.floats(low, high).map(repr), outside.map(str),
                          st.just("9" * 5000))
        # A TOML float, even 3.0, is not whole; a number in quotes is a string.
        mistyped_raws = NOT_NUMBER | st.floats() | inside.map(str)
    else:
        inside = st.floats(low, top)
        if math.ceil(low) <= math.floor(top):
            inside |= st.integers(math.ceil(low), math.floor(top))
        raws = inside | padded(inside.map(repr))
        outside = st.floats(max_value=low, exclude_max=True) | \
            st.floats(min_value=high, exclude_min=True) | st.sampled_from([10**400, -(10**400)])
        wrong = st.one_of(GARBAGE, outside.map(repr),
                          st.sampled_from(["nan", "inf", "-inf", "1e400", "NaN"]))
        mistyped_raws = NOT_NUMBER | inside.map(repr)
    valid = one(name, raws, lambda raw: kind(raw))
    invalid = one(name, outside | wrong) | mistyped(name, mistyped_raws)
    return valid, invalid


def choices(name: str, words: tuple[str, ...]) -> \
        tuple[st.SearchStrategy[Case], st.SearchStrategy[Case]]:
    mixed = st.sampled_from(words).flatmap(
        lambda w: st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in w)).map("".join))
    valid = one(name, padded(mixed), lambda raw: raw.strip().lower())
    others = st.text(ANY_CHAR, max_size=12).filter(lambda t: t.strip().lower() not in words)
    return valid, one(name, others) | mistyped(name, NOT_TEXT)


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def boolean(name: str) -> tuple[st.SearchStrategy[Case], st.SearchStrategy[Case]]:
    words, _ = choices(name, TRUE_WORDS + FALSE_WORDS)
    valid = st.one_of(
        one(name, st.booleans(), lambda raw: raw),
        words.map(lambda c: Case(c.values, name, c.expected in TRUE_WORDS)),
    )
    others = st.text(ANY_CHAR, max_size=12).filter(
        lambda t: t.strip().lower() not in TRUE_WORDS + FALSE_WORDS)
    quoted = st.sampled_from(TRUE_WORDS + FALSE_WORDS)  # a word where TOML has true/false
    return valid, one(name, others) | mistyped(name, NOT_BOOL | quoted)


NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True)
HOST = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
                 st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"))
PORT = st.integers(1, 65535)
HOST_PORT = st.builds(lambda h, p: f"{h}:{p}", HOST, PORT)
BAD_HOST_PORT = st.one_of(
    st.text(ANY_CHAR, max_size=20).filter(lambda t: ":" not in t),  # no port
    st.builds(lambda h, p: f"{h}:{p}", HOST, st.integers(65536) | st.just(0)),
    st.builds(lambda h, p: f"{h}:{p}", HOST, st.text(ANY_CHAR, min_size=1, max_size=5)
              .filter(lambda p: not (p.strip().isascii() and p.strip().isdigit()))),
    # A host with a character no host has (leading white space would be stripped).
    st.builds(lambda h, p: f"{h}:{p}", st.text(ANY_CHAR, min_size=1, max_size=10)
              .filter(lambda h: re.search(r"[\s/@#?\0]", h.lstrip()) is not None), PORT),
    st.builds(lambda a, p: f"{a}:{p}", st.ip_addresses(v=6).map(str), PORT),  # no brackets
    st.just(":50051"),
)
HTTP_URL = st.builds(lambda h, p: f"http://{h}:{p}", HOST, PORT)
IFNAME = st.from_regex(r"[A-Za-z0-9_.-]{1,15}", fullmatch=True).filter(
    lambda n: n not in (".", ".."))
VIP = st.builds(lambda last, prefix: f"192.0.2.{last}/{prefix}", st.integers(1, 254),
                st.sampled_from([24, 31, 32])) | st.builds(lambda n: f"2001:db8::{n:x}/64",
                                                 st.integers(1, 0xFFFF))


def table(files: Files) -> dict[str, tuple[st.SearchStrategy[Case], st.SearchStrategy[Case]]]:
    """For every setting: (valid cases, invalid cases)."""
    https = "https://127.0.0.1:2379"
    pki = files.pki
    tls = {"grpc_tls_cert": str(pki.server.cert), "grpc_tls_key": str(pki.server.key)}
    missing = str(files.dir / "missing" / "file")
    nul = str(files.text) + "\0"  # only TOML can carry it
    t: dict[str, tuple[st.SearchStrategy[Case], st.SearchStrategy[Case]]] = {}

    for name in ("node_id", "cluster"):
        t[name] = (
            one(name, padded(NAME), str.strip),
            one(name, st.text(ANY_CHAR, min_size=1, max_size=70).filter(
                lambda s: s.strip() != "" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}",
                                                              s.strip())))
            | mistyped(name, NOT_TEXT),
        )
    t["etcd_endpoints"] = (
        st.one_of(one("etcd_endpoints", st.lists(HTTP_URL, min_size=1, max_size=3), tuple),
                  one("etcd_endpoints", HTTP_URL, lambda u: (u,))),
        st.one_of(
            one("etcd_endpoints", st.sampled_from(["", [], "localhost:2379", "ftp://a:1",
                                                   "http://a", "http://a:1/path", "http://a:1?q",
                                                   "http://a:1,https://b:2", "http://:1",
                                                   "http://a:99999", "http://a:port"])),
            one("etcd_endpoints", st.text(ANY_CHAR, min_size=1, max_size=20).filter(
                lambda s: not s.strip().startswith(("http://", "https://", ","))
                and s.strip(", ") != "")),
            mistyped("etcd_endpoints", NOT_LIST),
        ),
    )
    for name, value in (("etcd_ca", pki.ca), ("etcd_password_file", files.text)):
        partner = {"etcd_endpoints": https}
        if name == "etcd_password_file":
            partner["etcd_user"] = "root"
        t[name] = (
            st.one_of(one(name, st.just(str(value)), Path, **partner),
                      one(name, st.just(""), lambda _: None)),
            st.one_of(one(name, st.just(missing), **partner),
                      one(name, st.just(nul), **partner),
                      mistyped(name, NOT_TEXT, **partner)),
        )
    t["etcd_ca"] = (t["etcd_ca"][0], t["etcd_ca"][1] | named(
        "etcd_endpoints", {"etcd_ca": str(pki.ca)}))  # TLS files with http:// endpoints
    for name, other in (("etcd_cert", "etcd_key"), ("etcd_key", "etcd_cert")):
        files_of = {"etcd_cert": str(pki.client.cert), "etcd_key": str(pki.client.key)}
        t[name] = (
            one(name, st.just(files_of[name]), Path, etcd_endpoints=https,
                **{other: files_of[other]}),
            st.one_of(one(name, st.just(missing), etcd_endpoints=https,
                          **{other: files_of[other]}),
                      mistyped(name, NOT_TEXT, etcd_endpoints=https),
                      named(other, {name: files_of[name], "etcd_endpoints": https})),
        )
    t["etcd_user"] = (
        one("etcd_user", padded(st.text(ARG_CHAR, min_size=1, max_size=20).filter(str.strip)),
            str.strip, etcd_password_file=str(files.text), etcd_endpoints=https),
        st.one_of(named("etcd_user", {"etcd_user": "root",
                                      "etcd_password_file": str(files.text)}),  # http://
                  named("etcd_password_file", {"etcd_user": "root", "etcd_endpoints": https}),
                  mistyped("etcd_user", NOT_TEXT)),
    )
    # The defaults cut in: etcd_timeout < ttl - margin = 2.7 s, safety_margin < ttl - 2
    # keepalive intervals = 1.8 s, and a keepalive_fraction of 0.45 leaves no room for the margin.
    t["etcd_timeout"] = numbers("etcd_timeout", float, 0.05, 2.7, top=2.69)
    t["ttl"] = numbers("ttl", int, 2, 300)
    t["keepalive_fraction"] = numbers("keepalive_fraction", float, 0.02, 0.5, top=0.449)
    valid, invalid = numbers("safety_margin", float, 0.1, 1.8, top=1.79)
    t["safety_margin"] = (valid | one("safety_margin", padded(st.just("")), lambda _: None),
                          invalid.filter(lambda c: str(c.values["safety_margin"]).strip() != ""))
    t["grpc_listen"] = (
        st.one_of(one("grpc_listen", padded(HOST_PORT), str.strip),
                  one("grpc_listen", st.just(f"unix:{files.dir}/grpc.sock"), str)),
        st.one_of(one("grpc_listen", BAD_HOST_PORT), mistyped("grpc_listen", NOT_TEXT),
                  one("grpc_listen", st.sampled_from(["unix:", f"unix:{missing}"]))),
    )
    for name in ("grpc_tls_cert", "grpc_tls_key"):
        other = "grpc_tls_key" if name == "grpc_tls_cert" else "grpc_tls_cert"
        t[name] = (
            one(name, st.just(tls[name]), Path, **{other: tls[other]}),
            st.one_of(one(name, st.sampled_from([missing, nul]), **{other: tls[other]}),
                      mistyped(name, NOT_TEXT),
                      named(other, {name: tls[name]})),
        )
    # A text file or a CA certificate in place of the server's pair: not a certificate and key.
    t["grpc_tls_cert"] = (t["grpc_tls_cert"][0], t["grpc_tls_cert"][1] | named(
        "grpc_tls_cert", {"grpc_tls_cert": str(files.text), "grpc_tls_key": tls["grpc_tls_key"]}))
    t["grpc_client_ca"] = (
        one("grpc_client_ca", st.just(str(pki.ca)), Path, **tls),
        st.one_of(named("grpc_client_ca", {"grpc_client_ca": str(pki.ca)}),  # TLS is off
                  one("grpc_client_ca", st.sampled_from([missing, str(files.text)]), **tls),
                  mistyped("grpc_client_ca", NOT_TEXT)),
    )
    common_name = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1,
                          max_size=64)
    t["grpc_writers"] = (
        st.one_of(one("grpc_writers", st.sampled_from(["", " ", []]), lambda _: ()),
                  one("grpc_writers", common_name, lambda n: (n,), grpc_client_ca=str(pki.ca),
                      **tls)),
        st.one_of(one("grpc_writers", common_name),  # a common name needs mutual TLS
                  one("grpc_writers", st.just("x" * 65), grpc_client_ca=str(pki.ca), **tls),
                  mistyped("grpc_writers", NOT_LIST)),
    )
    socket_name = st.from_regex(r"[a-z][a-z0-9.-]{0,20}\.sock", fullmatch=True)
    t["grpc_socket"] = (
        st.one_of(one("grpc_socket", socket_name.map(lambda n: f"{files.dir}/{n}"), Path),
                  # Its own folder is made at start; the one above it must exist.
                  one("grpc_socket", st.just(f"{files.dir}/new-folder/grpc.sock"), Path),
                  one("grpc_socket", padded(st.just("")), lambda _: None)),
        st.one_of(one("grpc_socket", socket_name),  # relative
                  one("grpc_socket", st.just(f"{files.dir}/{'x' * 120}.sock")),  # too long
                  one("grpc_socket", st.just(f"{missing}/folder/grpc.sock")),
                  mistyped("grpc_socket", NOT_TEXT)),
    )
    t["grpc_socket_group"] = (
        st.one_of(one("grpc_socket_group", padded(st.sampled_from(["root", "0"])), str.strip),
                  one("grpc_socket_group", st.integers(1, 2**31).map(str), str)),
        st.one_of(one("grpc_socket_group", st.just("no-such-group-on-this-host")),
                  named("grpc_socket_group", {"grpc_socket_group": "0", "grpc_socket": ""}),
                  mistyped("grpc_socket_group", NOT_TEXT)),
    )
    t["allow_unauthenticated_changes"] = boolean("allow_unauthenticated_changes")
    t["http_listen"] = (
        one("http_listen", padded(HOST_PORT | st.just("")), str.strip),
        one("http_listen", BAD_HOST_PORT.filter(str.strip) |
            st.just(f"unix:{files.dir}/http.sock")) | mistyped("http_listen", NOT_TEXT),
    )
    t["advertise_address"] = (
        st.one_of(one("advertise_address", padded(HOST_PORT), str.strip),
                  one("advertise_address", st.just(""), lambda _: None),
                  one("advertise_address", st.just("unix:/run/remote/grpc.sock"), str)),
        one("advertise_address", BAD_HOST_PORT.filter(
            lambda s: s.strip() != "" and not s.strip().startswith("unix:")))
        | mistyped("advertise_address", NOT_TEXT),
    )
    t["vip"] = (
        st.one_of(one("vip", st.lists(VIP, min_size=1, max_size=3), tuple, vip_interface="eth0"),
                  one("vip", VIP, lambda v: (v,), vip_interface="eth0"),
                  one("vip", st.just(""), lambda _: ())),
        st.one_of(one("vip", st.sampled_from(["192.0.2.10", "127.0.0.1/8", "192.0.2.0/24",
                                              "224.0.0.1/32", "fe80::1/64", "0.0.0.0/0",
                                              "192.0.2.10/33", "not-an-ip/24"]),
                      vip_interface="eth0"),
                  mistyped("vip", NOT_LIST),
                  named("vip_interface", {"vip": "192.0.2.10/24"})),
    )
    t["vip_interface"] = (
        st.one_of(one("vip_interface", padded(IFNAME), str.strip, vip="192.0.2.10/24"),
                  one("vip_interface", st.just(""), lambda _: None)),
        one("vip_interface", st.one_of(
            st.from_regex(r"[A-Za-z0-9]{16,30}", fullmatch=True),
            st.builds(lambda a, c, b: a + c + b, IFNAME, st.sampled_from("/: \u00a0"), IFNAME),
            st.sampled_from([".", ".."])))
        | mistyped("vip_interface", NOT_TEXT),
    )
    t["vip_label"] = (
        one("vip_label", padded(st.from_regex(r"[A-Za-z0-9_-]{1,14}", fullmatch=True)), str.strip),
        one("vip_label", st.text(ANY_CHAR, max_size=20).filter(
            lambda s: not re.fullmatch(r"[A-Za-z0-9_-]{1,14}", s.strip())))
        | mistyped("vip_label", NOT_TEXT),
    )
    t["garp_repeat"] = numbers("garp_repeat", int, 1, 100)
    for name in ("garp_interval", "garp_delay", "garp_refresh", "failback_delay"):
        t[name] = numbers(name, float, 0, 3600)
    t["compaction_interval"] = numbers("compaction_interval", float, 0, 7 * 86400)
    t["compaction_keep"] = numbers("compaction_keep", int, 0, 100_000_000)
    t["compaction_max_bytes"] = numbers("compaction_max_bytes", int, 1 << 20, 1 << 30)
    t["vip_probe_timeout"] = numbers("vip_probe_timeout", float, 0, 1)
    t["vsm_sessions_file"] = (
        st.one_of(one("vsm_sessions_file", st.just(str(files.dir / "sessions")), Path),
                  one("vsm_sessions_file", st.just(""), lambda _: None)),
        one("vsm_sessions_file", st.sampled_from([missing, str(files.dir) + "/\0x"]))
        | mistyped("vsm_sessions_file", NOT_TEXT),
    )
    for name in ("vsm_file_check_interval", "hook_timeout"):
        t[name] = numbers(name, float, 0.1, 3600)
    t["vsm_server_mode"] = choices("vsm_server_mode", ("replicated", "on-primary"))
    for name in ("vsm_server_start", "vsm_server_stop"):
        t[name] = (
            one(name, padded(st.sampled_from([
                "true", "systemctl start vsmserver.service",
                "sudo -n /bin/systemctl stop 'vsmserver.service'"])), str.strip),
            one(name, st.sampled_from(["", "  ", "'unclosed", 'say "half']))
            | mistyped(name, NOT_TEXT),
        )
    t["vsm_server_timeout"] = numbers("vsm_server_timeout", float, 1, 3600)
    t["thinlinc_conf_dir"] = (
        one("thinlinc_conf_dir", padded(st.text(ARG_CHAR, min_size=1, max_size=30).filter(
            str.strip)), lambda raw: Path(raw.strip())),
        one("thinlinc_conf_dir", st.sampled_from(["", "  ", "/opt/\0"]))
        | mistyped("thinlinc_conf_dir", NOT_TEXT),
    )
    t["preferred_primary"] = boolean("preferred_primary")
    t["failback"] = boolean("failback")
    t["on_role_change"] = (
        st.one_of(one("on_role_change", st.just(str(files.program)), Path),
                  one("on_role_change", st.just(""), lambda _: None)),
        one("on_role_change", st.sampled_from([missing, str(files.not_executable), str(files.dir),
                                               nul]))
        | mistyped("on_role_change", NOT_TEXT),
    )
    t["health_check"] = (
        st.one_of(one("health_check", st.builds(lambda p: f"tcp:{p}", PORT)),
                  one("health_check", st.builds(lambda h, p: f"tcp:{h}:{p}",
                                                st.from_regex(r"[a-z][a-z0-9.-]{0,20}",
                                                              fullmatch=True), PORT)),
                  one("health_check", st.sampled_from(["exec:true", "exec:sh -c 'exit 0'",
                                                       "", "tcp:localhost"]))
                  ).map(lambda c: Case(c.values, c.setting, c.values["health_check"] or None)),
        one("health_check", st.one_of(
            st.sampled_from(["tcp:0", "tcp:65536", "tcp:host:port", "exec:", "exec:'open",
                             "exec:/nonexistent/command", "http://x", "tcp", "9000"]),
            st.text(ANY_CHAR, min_size=1, max_size=20).filter(
                lambda s: s.strip() != "" and not s.strip().startswith(("tcp:", "exec:"))),
            )) | mistyped("health_check", NOT_TEXT),
    )
    t["health_interval"] = numbers("health_interval", float, 0.1, 3600, top=3600)
    # At least health_timeout (1 s by default).
    t["health_interval"] = (numbers("health_interval", float, 1.0, 3600)[0],
                            t["health_interval"][1])
    t["health_timeout"] = numbers("health_timeout", float, 0.05, 2.0)  # <= health_interval
    for name in ("health_rise", "health_fall"):
        t[name] = numbers(name, int, 1, 100)
    t["data_dir"] = (
        one("data_dir", padded(st.text(ARG_CHAR, min_size=1, max_size=30).filter(str.strip)),
            lambda raw: Path(raw.strip())),
        one("data_dir", st.sampled_from(["", "  ", "/var/lib/\0"]))
        | mistyped("data_dir", NOT_TEXT),
    )
    t["log_format"] = choices("log_format", config.LOG_FORMATS)
    t["log_level"] = choices("log_level", config.LOG_LEVELS)
    return t


# -- sources -----------------------------------------------------------------------------------


@dataclass
class Sources:
    """Where each value goes: a TOML document, environment variables, flags."""

    toml: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


def _as_text(raw: Any) -> str | None:
    """How a flag or an environment variable spells ``raw``, if one can."""
    if isinstance(raw, str):
        return raw if "\0" not in raw else None
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float):
        return repr(raw)
    if isinstance(raw, list) and all(isinstance(i, str) and "," not in i and "\0" not in i
                                     for i in raw):
        return ",".join(raw)
    return None


@st.composite
def placed(draw: st.DrawFn, case: Case) -> Sources:
    """Each value in a source that can carry it: anything in TOML; text (and what spells as
    text) in the environment and in flags, except that a boolean flag takes no value."""
    sources = Sources()
    for name, raw in case.values.items():
        only_toml = case.toml_only and name == case.setting
        text = None if only_toml else _as_text(raw)
        # Where TOML has a type of its own, text is for flags and variables: in the file it is
        # a mistake (the mistyped cases put it there on purpose). Empty text means "not set".
        spelled = isinstance(raw, str) and raw.strip() != "" and name in TYPED_SETTINGS
        options = [] if spelled and text is not None else ["toml"]
        if text is not None:
            options.append("env")
            if name not in BOOLEAN_SETTINGS or isinstance(raw, bool):
                options.append("flag")
        where = draw(st.sampled_from(options))
        if where == "toml":
            key = name.replace("_", "-") if draw(st.booleans()) else name  # both spellings work
            sources.toml[key] = raw
        elif where == "env":
            sources.env[config.env_name(name)] = str(text)
        elif isinstance(raw, bool):
            sources.flags.append(config.flag_name(name) if raw
                                 else "--no-" + config.flag_name(name)[2:])
        elif isinstance(raw, list) and raw and draw(st.booleans()):  # the flag repeated
            sources.flags.extend(f"{config.flag_name(name)}={item}" for item in raw)
        else:
            sources.flags.append(f"{config.flag_name(name)}={text}")
    return sources


BOOLEAN_SETTINGS = ("preferred_primary", "failback", "allow_unauthenticated_changes")
# Settings whose TOML value is a number or a boolean, from the settings' declared types.
TYPED_SETTINGS = tuple(f.name for f in dataclasses.fields(config.Settings)
                       if isinstance(f.default, bool | int | float) or f.name == "safety_margin")


def toml_string(text: str) -> str:
    def escape(c: str) -> str:
        if c in '"\\':
            return "\\" + c
        if ord(c) < 0x20 or ord(c) == 0x7F:
            return f"\\u{ord(c):04x}"
        return c

    return '"' + "".join(escape(c) for c in text) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # inf, -inf, 1e-05 are TOML too
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict), value
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(values: Mapping[str, Any]) -> str:
    text = "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in values.items())
    parsed = tomllib.loads(text)  # the writer is checked, not trusted
    same = {k: v for k, v in parsed.items() if not (isinstance(v, float) and math.isnan(v))}
    assert same == {k: v for k, v in values.items() if k in same}, (text, values)
    return text


# -- running the CLI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def run(sources: Sources, toml_path: Path, via_env: bool = False,
        raw_file: bytes | None = None) -> Result:
    """``vsm-sidecar check-config`` in this process: cli.main, with its environment set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env.update(sources.env)
    # The settings' own rules: the host checks (does the interface exist?) have tests of
    # their own, and a drawn interface name would not name one of this host's.
    argv = ["check-config", "--settings-only", *sources.flags]
    if sources.toml or raw_file is not None:
        if raw_file is not None:
            toml_path.write_bytes(raw_file)
        else:
            toml_path.write_text(toml_document(sources.toml), encoding="utf-8")
        if via_env:
            env[config.env_name("config")] = str(toml_path)
        else:
            argv.append(f"--config={toml_path}")
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return Result(code, out.getvalue(), err.getvalue())


def refused(result: Result, name: str) -> None:
    """Exit 2, nothing on stdout, and one line on stderr that names ``name``."""
    assert result.code == 2, result
    assert result.stdout == "", result
    assert len(result.lines) == 1, result
    assert result.lines[0].startswith(
        f"vsm-sidecar: error: setting '{config.printable(name)}': "), result


# -- the properties ----------------------------------------------------------------------------


def for_every_setting(examples: int, check: Callable[[st.DataObject, str], None]) -> None:
    """Run ``check`` with hypothesis once per setting, so that each one is covered."""
    for name in config.SETTING_NAMES:
        examples_for(name, examples, check)()


def examples_for(name: str, examples: int,
                 check: Callable[[st.DataObject, str], None]) -> Callable[[], None]:
    # A seed of its own for each setting: one derived from the (shared) inner function would
    # make every run draw the same choices.
    @seed(zlib.crc32(f"{check.__name__} {name}".encode()))
    @settings(SETTINGS, max_examples=examples)
    @given(st.data())
    def example(data: st.DataObject) -> None:
        check(data, name)

    return example


def test_every_setting_has_valid_and_invalid_cases(files: Files) -> None:
    """The table below covers exactly the settings the code declares."""
    assert sorted(table(files)) == sorted(config.SETTING_NAMES)


def test_valid_values_from_any_source_are_accepted_as_written(files: Files) -> None:
    """Property, for every setting: a value within its rules, from the TOML file, the
    environment or a flag, exits 0; check-config prints TOML that holds the value it was
    parsed to, and that file alone, given back with --config, prints the same again."""
    cases = table(files)
    printed = files.dir / "printed.toml"

    def accepted(data: st.DataObject, name: str) -> None:
        case = data.draw(cases[name][0])
        sources = data.draw(placed(case))
        result = run(sources, files.toml, data.draw(st.booleans()))
        assert (result.code, result.stderr) == (0, ""), (case, sources, result)
        settings = config.build(tomllib.loads(result.stdout))
        assert getattr(settings, name) == case.expected, (case, sources, result)
        printed.write_text(result.stdout, encoding="utf-8")
        again = run(Sources(flags=[f"--config={printed}"]), files.toml)
        assert again == result, (case, sources)

    for_every_setting(VALID_EXAMPLES, accepted)


def test_invalid_values_from_any_source_exit_2_naming_the_setting(files: Files) -> None:
    """Property, for every setting: a wrong type, an out-of-range number, garbage text or an
    unusable file, from any source, exits 2 with one line on stderr that names the setting."""
    cases = table(files)

    def rejected(data: st.DataObject, name: str) -> None:
        case = data.draw(cases[name][1])
        sources = data.draw(placed(case))
        refused(run(sources, files.toml, data.draw(st.booleans())), case.setting)

    for_every_setting(INVALID_EXAMPLES, rejected)


def _flags() -> list[str]:
    names = [config.flag_name(n) for n in config.SETTING_NAMES]
    return [*names, *("--no-" + config.flag_name(n)[2:] for n in BOOLEAN_SETTINGS),
            "--config", "--help"]


KNOWN_FLAGS = _flags()
KEY_TEXT = st.text(ANY_CHAR, min_size=1, max_size=24)


@settings(SETTINGS, derandomize=True, max_examples=60)
@given(data=st.data(), where=st.sampled_from(["toml", "env", "flag"]))
def test_unknown_keys_exit_2_naming_the_key(files: Files, data: st.DataObject,
                                            where: str) -> None:
    """Property: an unknown key in the TOML file, an unknown VSM_SIDECAR_ variable or an unknown
    flag exits 2 with one line naming it (beside valid settings, which do not hide it)."""
    sources = Sources(toml={"ttl": 5}, env={config.env_name("cluster"): "c"})
    if where == "toml":
        key = data.draw(KEY_TEXT.filter(lambda k: k.replace("-", "_") not in config.SETTING_NAMES))
        sources.toml[key] = data.draw(st.integers() | st.text(max_size=5))
        refused(run(sources, files.toml), key)
    elif where == "env":
        suffix = data.draw(st.from_regex(r"[A-Z0-9_]{1,20}", fullmatch=True).filter(
            lambda s: s.lower() not in (*config.SETTING_NAMES, "config")))
        sources.env[config.ENV_PREFIX + suffix] = data.draw(st.text(ARG_CHAR, max_size=5))
        refused(run(sources, files.toml), config.ENV_PREFIX + suffix)
    else:
        flag = "--" + data.draw(st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True).filter(
            lambda f: not any(k.startswith("--" + f) for k in KNOWN_FLAGS)))  # no abbreviations
        sources.flags.append(flag + data.draw(st.sampled_from(["", "=1", "=x y"])))
        result = run(sources, files.toml)
        assert (result.code, result.stdout, len(result.lines)) == (2, "", 1), result
        assert f"unrecognized arguments: {flag}" in result.lines[0], result


def _not_toml(text: str) -> bool:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return True
    return False


@settings(SETTINGS, derandomize=True, max_examples=60)
@given(content=st.one_of(
    st.text(ANY_CHAR, max_size=60).map(str.encode),
    st.sampled_from(["ttl = = 3", "ttl = 3\nttl = 4", "[ttl", 'ttl = "3', "ttl = 3 4",
                     "ttl = 0x", "a.b = 1\na = 2"]).map(str.encode),
    st.binary(min_size=1, max_size=40),
).filter(lambda raw: _is_not_toml_bytes(raw)), via_env=st.booleans())
def test_a_file_that_is_not_toml_exits_2_naming_config(files: Files, content: bytes,
                                                        via_env: bool) -> None:
    """Property: a config file that is not UTF-8 TOML exits 2 with one line naming 'config'."""
    refused(run(Sources(), files.toml, via_env, raw_file=content), "config")


def _is_not_toml_bytes(raw: bytes) -> bool:
    try:
        return _not_toml(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return True


CLI_CASES = [
    (["--ttl=2.5"], {}, None, "ttl"),
    (["--failback=maybe"], {}, None, None),  # a bool flag takes no value: argparse says so
    ([], {"VSM_SIDECAR_HEALTH_CHECK": "tcp:0"}, None, "health_check"),
    # on-primary stops the standby's VSM server: a health check of it cannot gate candidacy.
    (["--vsm-server-mode=on-primary", "--health-check=tcp:9000"], {}, None, "health_check"),
    ([], {"VSM_SIDECAR_TTL": "inf"}, None, "ttl"),
    ([], {}, 'ttl = inf\n', "ttl"),
    ([], {}, 'etcd_timeout = 1' + "0" * 400 + '\n', "etcd_timeout"),
    ([], {}, '"node\\nid" = 1\n', "node\\nid"),
    ([], {}, 'data_dir = "/var/lib/\\u0000"\n', "data_dir"),
    ([], {}, 'vip_interface = "eth0 1"\n', "vip_interface"),
    ([], {}, "ttl = 3\r", "config"),  # a lone CR is no TOML line break
    ([], {}, 'ttl = "5"\n', "ttl"),  # a number in quotes: TOML has numbers
    ([], {}, 'failback = "no"\n', "failback"),
]


@pytest.mark.parametrize(("flags", "env", "toml", "name"), CLI_CASES)
def test_the_console_command_exits_2_with_one_line(
        tmp_path: Path, flags: list[str], env: dict[str, str], toml: str | None,
        name: str | None) -> None:
    """`python -m sidecar check-config` with a bad value from a flag, the environment or the
    file: exit code 2 and one line on stderr naming the setting, no traceback."""
    argv = [sys.executable, "-m", "sidecar", "check-config", *flags]
    if toml is not None:
        path = tmp_path / "sidecar.toml"
        path.write_text(toml)
        argv.append(f"--config={path}")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env={**clean, **env})
    assert (result.returncode, result.stdout) == (2, ""), result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    expected = f"setting '{name}'" if name else "argument --failback/--no-failback"
    assert lines[0].startswith("vsm-sidecar"), lines
    assert expected in lines[0], lines


def test_the_console_command_accepts_valid_values_from_every_source(
        tmp_path: Path, files: Files) -> None:
    """The same command with valid values from all three sources exits 0 and prints them."""
    path = tmp_path / "sidecar.toml"
    path.write_text('ttl = 7\nvip = ["192.0.2.10/24"]\nvip-interface = "eth0"\n')
    clean = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "--settings-only", f"--config={path}",
         "--no-failback", "--etcd-timeout=0.25"],
        capture_output=True, text=True, timeout=60,
        env={**clean, "VSM_SIDECAR_LOG_LEVEL": " DEBUG ", "VSM_SIDECAR_NODE_ID": "n1"})
    assert (result.returncode, result.stderr) == (0, ""), result
    printed = tomllib.loads(result.stdout)
    assert {k: printed[k] for k in ("ttl", "vip", "vip_interface", "failback", "etcd_timeout",
                                    "log_level", "node_id")} == {
        "ttl": 7, "vip": ["192.0.2.10/24"], "vip_interface": "eth0", "failback": False,
        "etcd_timeout": 0.25, "log_level": "debug", "node_id": "n1"}
    assert "settings are valid" in result.stdout.splitlines()[0]


