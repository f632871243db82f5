"""Settings: precedence, validation, and the one-line exit-2 errors of the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar import config


def test_defaults_are_valid_and_derived_values_follow_the_ttl() -> None:
    """Defaults validate; the keepalive interval and margin derive from the TTL."""
    s = config.build({"node_id": "a"})
    assert s.ttl == 3
    assert s.keepalive_interval == pytest.approx(0.6)
    assert s.margin == pytest.approx(0.3)
    assert s.prefix == "/thinlinc-ha/thinlinc/"
    assert s.etcd_endpoints == ("http://127.0.0.1:2379",)


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    """Precedence: a flag beats the environment, which beats the TOML file."""
    path = tmp_path / "sidecar.toml"
    path.write_text('ttl = 5\ncluster = "from-file"\nnode_id = "file"\n'
                    'etcd_endpoints = ["http://10.1.1.1:2379", "http://10.1.1.2:2379"]\n')
    env = {"VSM_SIDECAR_CLUSTER": "from-env", "VSM_SIDECAR_NODE_ID": "env",
           "VSM_SIDECAR_CONFIG": str(path)}
    s = config.load({"node_id": "flag"}, env)
    assert (s.node_id, s.cluster, s.ttl) == ("flag", "from-env", 5)
    assert s.etcd_endpoints == ("http://10.1.1.1:2379", "http://10.1.1.2:2379")


def test_comma_separated_endpoints_from_the_environment() -> None:
    """Lists come as comma separated strings from flags and the environment."""
    s = config.load({}, {"VSM_SIDECAR_ETCD_ENDPOINTS": "http://a:1, http://b:2"})
    assert s.etcd_endpoints == ("http://a:1", "http://b:2")


BAD = [
    ({"ttl": "0"}, "ttl", "must be 2-300"),
    ({"ttl": "abc"}, "ttl", "whole number"),
    ({"ttl": "1000"}, "ttl", "must be 2-300"),
    ({"keepalive_fraction": "0.9"}, "keepalive_fraction", "0.02-0.5"),
    ({"safety_margin": "1.9"}, "safety_margin", "no room to miss a keepalive"),
    ({"safety_margin": "0.01"}, "safety_margin", "at least"),
    ({"etcd_timeout": "2.9"}, "etcd_timeout", "shorter than ttl"),
    ({"etcd_endpoints": "localhost:2379"}, "etcd_endpoints", "not a URL"),
    ({"etcd_endpoints": "ftp://a:1"}, "etcd_endpoints", "not a URL"),
    ({"etcd_endpoints": "http://a"}, "etcd_endpoints", "not a URL"),
    ({"etcd_endpoints": "http://a:1,https://b:2"}, "etcd_endpoints", "mixes"),
    ({"etcd_endpoints": ""}, "etcd_endpoints", "at least one"),
    ({"node_id": "bad id!"}, "node_id", "letters, digits"),
    ({"cluster": "-x"}, "cluster", "starting with a letter"),
    ({"etcd_cert": "/nonexistent.pem", "etcd_key": "/nonexistent.key",
      "etcd_endpoints": "https://a:1"}, "etcd_cert", "cannot read"),
    ({"etcd_cert": "/etc/hostname"}, "etcd_key", "go together"),
    ({"etcd_user": "root"}, "etcd_password_file", "go together"),
    ({"etcd_user": "root", "etcd_password_file": "/etc/hostname"}, "etcd_user",
     "needs https"),
    ({"etcd_ca": "/etc/hostname"}, "etcd_endpoints", "URLs are http"),
    ({"grpc_listen": "nohost"}, "grpc_listen", "HOST:PORT"),
    ({"grpc_listen": "unix:/nonexistent/dir/s.sock"}, "grpc_listen", "folder does not exist"),
    ({"log_format": "xml"}, "log_format", "json"),
    # Found by tests/test_config_fuzz.py: each was a traceback or was taken silently.
    ({"ttl": 2.5}, "ttl", "whole number"),  # a TOML float, cut to 2 by int()
    ({"ttl": float("inf")}, "ttl", "whole number"),  # OverflowError
    ({"etcd_timeout": 10**400}, "etcd_timeout", "expected a number"),  # OverflowError
    ({"ttl": "\u0663"}, "ttl", "whole number"),  # int() reads Arabic-Indic digits
    ({"etcd_ca": "/etc/host\0name", "etcd_endpoints": "https://a:1"}, "etcd_ca", "NUL"),
    ({"vip_interface": "eth0/1"}, "vip_interface", "not an interface name"),
    ({"advertise_address": "not an address"}, "advertise_address", "HOST:PORT"),
    ({"grpc_listen": "::1:50051"}, "grpc_listen", "brackets"),
    ({"grpc_listen": "a host:50051"}, "grpc_listen", "not a host name"),
]


@pytest.mark.parametrize(("raw", "setting", "message"), BAD)
def test_invalid_settings_name_the_setting(raw: dict[str, Any], setting: str,
                                           message: str) -> None:
    """Each invalid value raises ConfigError naming the setting and what is wrong."""
    with pytest.raises(config.ConfigError) as info:
        config.build(raw)
    assert info.value.setting == setting
    assert message in str(info.value)


def test_an_error_stays_on_one_line() -> None:
    """A value or an unknown TOML key with a newline in it is escaped in the message."""
    with pytest.raises(config.ConfigError) as info:
        config.build({"node_id": "a\nb"})
    assert str(info.value).splitlines() == [str(info.value)]
    assert "'a\\nb'" in str(info.value)
    assert str(config.ConfigError("x\ny", "bad\u2028line")) == "setting 'x\\ny': bad\\u2028line"


def test_unknown_key_in_file_and_environment(tmp_path: Path) -> None:
    """An unknown key in the file or a VSM_SIDECAR_ variable is an error, with a suggestion."""
    path = tmp_path / "c.toml"
    path.write_text("tll = 3\n")
    with pytest.raises(config.ConfigError, match=r"'tll': unknown key .*did you mean 'ttl'"):
        config.load({"config": str(path)}, {})
    with pytest.raises(config.ConfigError, match="VSM_SIDECAR_CLUSTR"):
        config.load({}, {"VSM_SIDECAR_CLUSTR": "x"})


def test_unreadable_or_invalid_config_file(tmp_path: Path) -> None:
    """A missing or malformed TOML file is named in the error."""
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load({"config": str(tmp_path / "missing.toml")}, {})
    bad = tmp_path / "bad.toml"
    bad.write_text("ttl = = 3")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load({"config": str(bad)}, {})


CLI_CASES = [
    (["--ttl", "0"], "setting 'ttl'"),
    (["--etcd-endpoints", "nope"], "setting 'etcd_endpoints'"),
    (["--etcd-cert", "/missing.pem", "--etcd-key", "/missing.key",
      "--etcd-endpoints", "https://127.0.0.1:1"], "setting 'etcd_cert'"),
    (["--safety-margin", "2"], "setting 'safety_margin'"),
    (["--config", "/missing.toml"], "setting 'config'"),
]


@pytest.mark.parametrize(("args", "expected"), CLI_CASES)
def test_cli_exits_2_with_one_line_naming_the_setting(args: list[str], expected: str) -> None:
    """`vsm-sidecar run` with a bad setting: exit code 2 and one line on stderr."""
    result = subprocess.run([sys.executable, "-m", "sidecar", "run", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vsm-sidecar: error: " + expected)


def test_cli_refuses_a_grpc_address_in_use(tmp_path: Path) -> None:
    """A gRPC address that cannot be bound is a configuration error too (exit 2)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "--grpc-listen", f"127.0.0.1:{port}",
             "--etcd-endpoints", "http://127.0.0.1:1", "--log-format", "json",
             "--data-dir", str(tmp_path / "data")],  # never the host's own /var/lib
            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "setting 'grpc_listen'" in result.stderr.strip().splitlines()[-1]


def test_a_string_in_the_file_where_toml_has_a_type_is_an_error(tmp_path: Path) -> None:
    """TOML has numbers and booleans: `ttl = "5"` in the file names ttl (exit 2 in the CLI),
    while the same text from a variable or a flag, which can only hold text, is the number.
    An empty string still means "not set" for the optional safety_margin."""
    path = tmp_path / "c.toml"
    for text, setting in (('ttl = "5"', "ttl"), ('etcd_timeout = "0.5"', "etcd_timeout"),
                          ('safety_margin = "1"', "safety_margin"),
                          ('failback = "true"', "failback")):
        path.write_text(text + "\n")
        with pytest.raises(config.ConfigError) as info:
            config.load({"config": str(path)}, {})
        assert info.value.setting == setting
        assert "got the string" in str(info.value)
    path.write_text('safety_margin = " "\n')
    assert config.load({"config": str(path)}, {}).safety_margin is None
    assert config.load({}, {"VSM_SIDECAR_TTL": "5", "VSM_SIDECAR_FAILBACK": "no"}).ttl == 5


def test_text_that_is_not_utf8_is_refused() -> None:
    """A variable or argument that is not UTF-8 (a lone surrogate in Python) names its
    setting: no TOML file could hold it, so check-config could not print it back."""
    with pytest.raises(config.ConfigError) as info:
        config.load({}, {"VSM_SIDECAR_HEALTH_CHECK": "exec:true \udcff"})
    assert info.value.setting == "health_check"
    with pytest.raises(config.ConfigError) as info:
        config.load({"vip": ["192.0.2.1/24\udcff"]}, {})
    assert info.value.setting == "vip"


def test_defaults_print_as_toml_that_reads_back_to_the_defaults(tmp_path: Path) -> None:
    """to_toml() of the defaults, read back with read_file(), builds the same settings; an
    unset optional setting is a comment."""
    defaults = config.build({"node_id": "a"})
    text = config.to_toml(defaults)
    assert '#etcd_ca = ""  # not set\n' in text
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert config.build(config.read_file(path)) == defaults
