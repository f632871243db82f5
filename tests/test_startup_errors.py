"""Start-up errors of the real CLI: exit code 2 and exactly one line on stderr naming the
setting, with nothing before it (no gRPC log line) and nothing after it (no traceback), for
`run` and, where the check does not need the sidecar's own ports, for `check-config` too."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from sidecar import config
from sidecar.lab.ports import free_port

from .tlsgen import Pki, make_pki

# No etcd answers here: every check in this file comes before the first etcd call, and a
# sidecar that got past them would retry for ever (the test then sees it still running).
NO_ETCD = "http://127.0.0.1:1"
HTTPS_NO_ETCD = "https://127.0.0.1:1"
# A `run` that neither stops nor starts listening within this long is killed (it hangs).
RUN_WAIT = 60.0


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}


def sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar ARGS`, expected to end by itself."""
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, timeout=60, env=clean_env())


def run(tmp_path: Path, *args: str, data_dir: Path | None = None,
        endpoints: str = NO_ETCD) -> tuple[int | None, str]:
    """`vsm-sidecar run` with free ports and its own data_dir (unless ARGS say otherwise):
    its exit code and stderr; or None, once it logged that its API listens (past every
    start-up check; it is killed then)."""
    command = [sys.executable, "-m", "sidecar", "run", "--node-id", "n1",
               "--etcd-endpoints", endpoints, "--log-format", "json",
               "--data-dir", str(data_dir or tmp_path / "data"),
               "--grpc-listen", f"127.0.0.1:{free_port()}",
               "--http-listen", f"127.0.0.1:{free_port()}", *args]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=clean_env()) as process:
        assert process.stderr is not None
        guard = threading.Timer(RUN_WAIT, process.kill)
        guard.start()
        try:
            lines = []
            for line in process.stderr:
                lines.append(line)
                if "grpc_listening" in line:
                    process.kill()
                    process.wait()
                    return None, "".join(lines)
            return process.wait(), "".join(lines)
        finally:
            guard.cancel()


def assert_one_line(code: int | None, stderr: str, setting: str, *words: str) -> None:
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"vsm-sidecar: error: setting '{setting}': "), stderr
    for word in words:
        assert word in lines[0], stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


@pytest.fixture
def grpc_server() -> Iterator[tuple[grpc.Server, int]]:
    """A plain gRPC server on a loopback port, with gRPC's default socket options (as another
    sidecar's would be)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield server, port
    finally:
        server.stop(None)


# -- listen addresses --------------------------------------------------------------------------


def test_a_busy_http_port_is_one_line(tmp_path: Path, busy_port: int) -> None:
    """An HTTP address in use: one line naming http_listen, no traceback after it (the gRPC
    server, already started, used to be left to a finaliser on a closed event loop)."""
    code, stderr = run(tmp_path, "--http-listen", f"127.0.0.1:{busy_port}")
    assert_one_line(code, stderr, "http_listen", f"127.0.0.1:{busy_port}", "in use")


def test_a_busy_grpc_port_is_one_line(tmp_path: Path, busy_port: int) -> None:
    """A gRPC address in use: one line naming grpc_listen, without gRPC's own log line
    before it."""
    code, stderr = run(tmp_path, "--grpc-listen", f"127.0.0.1:{busy_port}")
    assert_one_line(code, stderr, "grpc_listen", f"127.0.0.1:{busy_port}", "in use")


def test_a_port_another_grpc_server_holds_is_not_shared(
        tmp_path: Path, grpc_server: tuple[grpc.Server, int]) -> None:
    """gRPC servers set SO_REUSEPORT: a second sidecar on the first one's port would bind it
    too and take half of its calls. It stops with one line instead."""
    _, port = grpc_server
    code, stderr = run(tmp_path, "--grpc-listen", f"127.0.0.1:{port}")
    assert_one_line(code, stderr, "grpc_listen", "in use")


def test_a_unix_socket_a_live_server_answers_on_is_left_alone(tmp_path: Path) -> None:
    """gRPC replaces a socket file in its way even when a live server answers on it: the
    sidecar refuses to, and the other server's socket stays where it was."""
    path = tmp_path / "api.sock"
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        before = path.stat().st_ino
        code, stderr = run(tmp_path, "--grpc-listen", f"unix:{path}")
        assert_one_line(code, stderr, "grpc_listen", "another process listens on it")
        assert path.stat().st_ino == before
    finally:
        server.stop(None)


def test_a_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    """A socket file nobody answers on (left by a killed sidecar) is no reason to refuse."""
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    code, stderr = run(tmp_path, "--grpc-listen", f"unix:{path}")
    assert code is None, stderr  # still running: past every start-up check
    assert "grpc_listening" in stderr


def test_a_failure_after_the_grpc_server_started_stops_it_first(tmp_path: Path,
                                                                 busy_port: int) -> None:
    """Without the address checks (an address taken between check and bind), the failure to
    start the HTTP server comes after the gRPC server started: it is stopped before the event
    loop closes, so the error is still the last line, with no traceback after it."""
    script = ("import sys; from sidecar import cli; from sidecar.host import preflight; "
              "preflight.check_listen = lambda setting, address: None; "
              "sys.exit(cli.main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", script, "run", "--etcd-endpoints", NO_ETCD,
         "--log-format", "json", "--data-dir", str(tmp_path / "data"),
         "--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen",
         f"127.0.0.1:{busy_port}"], capture_output=True, text=True, timeout=60,
        env=clean_env())
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("vsm-sidecar: error: setting 'http_listen': "), result.stderr
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr


# -- etcd TLS files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def garbage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("garbage") / "garbage.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
                    "-----END CERTIFICATE-----\n")
    return path


def tls_cases(pki: Pki, garbage: Path) -> dict[str, tuple[list[str], str, str]]:
    """Flags, the setting the error must name, and a word it must contain."""
    pair = ["--etcd-cert", str(pki.client.cert), "--etcd-key", str(pki.client.key)]
    return {
        "garbage CA": (["--etcd-ca", str(garbage)], "etcd_ca", "not a PEM CA bundle"),
        "key of another certificate": (
            ["--etcd-cert", str(pki.client.cert), "--etcd-key", str(pki.other_client.key)],
            "etcd_key", "not the unencrypted PEM key"),
        "garbage certificate": (["--etcd-cert", str(garbage), "--etcd-key",
                                 str(pki.client.key)], "etcd_cert", "not a PEM certificate"),
        "CA is a folder": (["--etcd-ca", str(garbage.parent), *pair], "etcd_ca",
                           "cannot read"),
        "key is missing": (["--etcd-cert", str(pki.client.cert), "--etcd-key",
                            str(garbage.parent / "missing.key")], "etcd_key", "cannot read"),
    }


TLS_CASES = ["garbage CA", "key of another certificate", "garbage certificate",
             "CA is a folder", "key is missing"]


@pytest.mark.parametrize("case", TLS_CASES)
def test_bad_etcd_tls_files_fail_check_config_and_run(tmp_path: Path, pki: Pki, garbage: Path,
                                                      case: str) -> None:
    """A garbage etcd_ca, a key that is not etcd_cert's, a garbage certificate, a file that
    cannot be read: check-config and run both exit 2 naming the setting (run used to retry
    for ever with gRPC's TLS errors in its log)."""
    flags, setting, words = tls_cases(pki, garbage)[case]
    checked = sidecar("check-config", "--etcd-endpoints", HTTPS_NO_ETCD, *flags)
    assert checked.stdout == ""
    assert_one_line(checked.returncode, checked.stderr, setting, words)
    code, stderr = run(tmp_path, *flags, endpoints=HTTPS_NO_ETCD)
    assert_one_line(code, stderr, setting, words)


def test_good_etcd_tls_files_pass(pki: Pki) -> None:
    """The CA and a client certificate with its own key pass (the check is not a refusal of
    everything)."""
    result = sidecar("check-config", "--etcd-endpoints", HTTPS_NO_ETCD, "--etcd-ca", str(pki.ca),
                     "--etcd-cert", str(pki.client.cert), "--etcd-key", str(pki.client.key))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


# -- what check-config checks on this host -----------------------------------------------------


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the resource IP checks need CAP_NET_ADMIN and CAP_NET_RAW (root)")


def test_check_config_refuses_an_interface_run_would_refuse(tmp_path: Path) -> None:
    """--vip-interface nosuchif0: check-config fails as run does, naming vip_interface."""
    needs_root()
    flags = ["--vip", "192.0.2.10/24", "--vip-interface", "nosuchif0"]
    checked = sidecar("check-config", "--data-dir", str(tmp_path / "data"), *flags)
    assert_one_line(checked.returncode, checked.stderr, "vip_interface", "nosuchif0")
    code, stderr = run(tmp_path, *flags)
    assert_one_line(code, stderr, "vip_interface", "nosuchif0")
    # --settings-only leaves this host out: for a file meant for another one.
    assert sidecar("check-config", "--settings-only", *flags).returncode == 0


def test_check_config_refuses_a_data_dir_run_could_not_make(tmp_path: Path) -> None:
    """A data_dir below a regular file: check-config and run both name data_dir."""
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "data"
    checked = sidecar("check-config", "--data-dir", str(data_dir))
    assert_one_line(checked.returncode, checked.stderr, "data_dir", "not a folder")
    code, stderr = run(tmp_path, data_dir=data_dir)
    assert_one_line(code, stderr, "data_dir")
    assert not data_dir.exists()


# -- one sidecar per data_dir ------------------------------------------------------------------


def start_run(tmp_path: Path, data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--node-id", "first", "--etcd-endpoints",
         NO_ETCD, "--log-format", "json", "--data-dir", str(data_dir), "--grpc-listen",
         f"127.0.0.1:{free_port()}", "--http-listen", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())


def wait_for_line(process: subprocess.Popen[str], word: str, timeout: float = 30) -> None:
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if word in line:
            return
        assert line, f"the first sidecar ended (exit {process.wait()})"
    raise TimeoutError(f"no {word!r} from the first sidecar")


def test_a_second_sidecar_on_one_data_dir_exits_2_naming_it(tmp_path: Path) -> None:
    """Two sidecars on one data_dir would share one copy: the second exits 2 with one line
    naming the folder and the first one's pid, for as long as the first one lives."""
    data_dir = tmp_path / "shared"
    first = start_run(tmp_path, data_dir)
    try:
        wait_for_line(first, "grpc_listening")
        code, stderr = run(tmp_path, data_dir=data_dir)
        assert_one_line(code, stderr, "data_dir", str(data_dir), f"pid {first.pid}")
    finally:
        first.kill()
        first.communicate()
    code, stderr = run(tmp_path, data_dir=data_dir)
    assert code is None, stderr  # the lock went with the first process


# -- check-config's output ---------------------------------------------------------------------


def test_check_config_prints_toml_that_config_takes_back(tmp_path: Path, pki: Pki) -> None:
    """The effective settings from flags, environment and file, printed as TOML; that output
    alone, given back with --config, gives the same settings and prints the same text."""
    source = tmp_path / "in.toml"
    source.write_text('ttl = 5\nvip = ["192.0.2.10/24", "2001:db8::10/64"]\n'
                      'vip_interface = "eth9"\nsafety_margin = ""\n')
    env = {**clean_env(), "VSM_SIDECAR_CLUSTER": "prod", "VSM_SIDECAR_FAILBACK": "no"}
    flags: Sequence[str] = [
        "--settings-only", f"--config={source}", "--node-id", "a", "--etcd-endpoints",
        "https://10.0.0.1:2379,https://10.0.0.2:2379", "--etcd-ca", str(pki.ca),
        "--etcd-cert", str(pki.client.cert), "--etcd-key", str(pki.client.key),
        "--etcd-timeout", "0.25", "--data-dir",
        str(tmp_path / "data dir"), "--health-check", "exec:true --flag='x y'"]
    first = subprocess.run([sys.executable, "-m", "sidecar", "check-config", *flags],
                           capture_output=True, text=True, timeout=60, env=env)
    assert (first.returncode, first.stderr) == (0, ""), first.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(first.stdout)
    again = sidecar("check-config", "--settings-only", f"--config={printed}")
    assert (again.returncode, again.stderr, again.stdout) == (0, "", first.stdout)
    expected = config.load({k: v for k, v in {
        "config": str(source), "node_id": "a",
        "etcd_endpoints": ["https://10.0.0.1:2379,https://10.0.0.2:2379"],
        "etcd_ca": str(pki.ca), "etcd_cert": str(pki.client.cert),
        "etcd_key": str(pki.client.key), "etcd_timeout": "0.25",
        "data_dir": str(tmp_path / "data dir"), "health_check": "exec:true --flag='x y'",
    }.items()}, {"VSM_SIDECAR_CLUSTER": "prod", "VSM_SIDECAR_FAILBACK": "no"})
    assert config.load({"config": str(printed)}, {}) == expected
    assert (expected.cluster, expected.failback, expected.safety_margin) == ("prod", False, None)
