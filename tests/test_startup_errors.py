"""Start-up errors of the real CLI: exit code 2 and exactly one line on stderr naming the
setting, with nothing before it (no gRPC log line) and nothing after it (no traceback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from sidecar import config
from sidecar.localcluster import free_port

# No etcd answers here: every check in this file comes before the first etcd call, and a
# sidecar that got past them would retry for ever (the test then sees it still running).
NO_ETCD = "http://127.0.0.1:1"
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
    script = ("import sys; from sidecar import cli, preflight; "
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


