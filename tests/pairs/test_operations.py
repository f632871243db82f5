"""What operators steer and watch: the health gate, role hooks, and the HTTP endpoints."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import client
from sidecar.core.member import MEMBERS_REFRESH_SECONDS
from sidecar.lab.localnode import LocalSidecar
from sidecar.lab.ports import free_port

from ..sidecars import Pair
from ..tlsgen import make_pki

pytestmark = [pytest.mark.etcd]

# A stand-in VSM server: accepts TCP connections on a port until it is killed.
LISTENER = ("import socket, sys; s = socket.create_server(('127.0.0.1', int(sys.argv[1]))); "
            "print('ready', flush=True)\nwhile True: s.accept()[0].close()")


class Service:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", LISTENER, str(self.port)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process = None


@pytest.fixture
def services() -> Iterator[dict[str, Service]]:
    made = {"a": Service(), "b": Service()}
    try:
        yield made
    finally:
        for service in made.values():
            service.stop()


def health_args(service: Service) -> list[str]:
    return ["--health-check", f"tcp:{service.port}", "--health-interval", "0.2",
            "--health-timeout", "0.1", "--health-rise", "1", "--health-fall", "2"]


def test_unhealthy_primary_hands_over_to_the_healthy_standby(
        pair: Pair, services: dict[str, Service]) -> None:
    """Health gate: the stand-in VSM service stopped on the primary moves the role to the
    healthy standby (a handover, well under a TTL); RoleStatus shows the health."""
    for service in services.values():
        service.start()
    a = pair.start_one("a", extra_args=health_args(services["a"]))
    b = pair.start_one("b", extra_args=health_args(services["b"]))
    pair.wait_split()
    pair.wait_member_record(b, role="ROLE_STANDBY", health="healthy", copy_current=True)
    # a picks the handover target from its own view of the members, refreshed this often:
    time.sleep(MEMBERS_REFRESH_SECONDS)
    assert a.role()["health"] == "healthy"
    recorder = pair.recorder(b)
    stopped = time.monotonic()
    services["a"].stop()
    promoted = recorder.wait_role("PRIMARY", timeout=5, after=stopped)
    assert promoted.at - stopped < 2.0  # fall x interval + the handover, not a lease TTL
    assert client.role_name(a.role()) == "STANDBY"
    assert a.role()["health"] == "unhealthy"


def test_unhealthy_standby_does_not_campaign(pair: Pair,
                                             services: dict[str, Service]) -> None:
    """Stopped on the standby, the check keeps it from campaigning: with the primary gone
    it stays STANDBY; once its VSM server is back it takes over."""
    services["a"].start()
    a = pair.start_one("a", extra_args=health_args(services["a"]))
    b = pair.start_one("b", extra_args=health_args(services["b"]))  # its service is down
    pair.wait_split()
    a.terminate()
    assert a.wait_exit(10) == 0
    time.sleep(3)
    status = b.role()
    assert client.role_name(status) == "STANDBY"
    assert status["health"] == "unhealthy"
    services["b"].start()
    b.wait_role("PRIMARY", timeout=5)


def test_keeps_the_role_loudly_when_no_standby_can_take_over(
        pair: Pair, services: dict[str, Service]) -> None:
    """An unhealthy primary with no eligible standby keeps the role, and says so in its log."""
    services["a"].start()
    a = pair.start_one("a", extra_args=health_args(services["a"]))
    services["a"].stop()
    time.sleep(2)
    assert client.role_name(a.role()) == "PRIMARY"
    assert "primary_unhealthy_keeps_role" in a.log_tail(100)


def test_role_hooks_run_in_order_with_the_documented_environment(pair: Pair,
                                                                 tmp_path: Path) -> None:
    """--on-role-change: one call per role change, in order, with old and new role, epoch,
    node and leader in the environment and the new role as the argument."""
    out = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\necho \"$1 $VSM_SIDECAR_OLD_ROLE>$VSM_SIDECAR_NEW_ROLE "
                    "epoch=$VSM_SIDECAR_EPOCH node=$VSM_SIDECAR_NODE_ID "
                    f"leader=$VSM_SIDECAR_LEADER\" >> {out}\n")
    hook.chmod(0o755)
    a = pair.start_one("a", extra_args=["--on-role-change", str(hook)])
    epoch = a.role()["epoch"]
    a.terminate()
    assert a.wait_exit(10) == 0
    lines = out.read_text().splitlines()
    assert lines == [f"PRIMARY STARTING>PRIMARY epoch={epoch} node=a leader=a",
                     f"STOPPING PRIMARY>STOPPING epoch={epoch} node=a leader=a"]


# No proxy from the environment may stand between the test and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(node: LocalSidecar, path: str) -> tuple[int, str]:
    try:
        with OPENER.open(f"http://127.0.0.1:{node.http_port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def test_http_endpoints_follow_a_role_change(pair: Pair) -> None:
    """/primary and /standby answer 200 or 503 on both nodes, and swap on a switchover;
    /metrics, parsed with prometheus-client's parser, reports role and epoch."""
    pair.start(ttl=2)
    primary, standby = pair.wait_split()
    assert [http(primary, "/primary")[0], http(primary, "/standby")[0]] == [200, 503]
    assert [http(standby, "/primary")[0], http(standby, "/standby")[0]] == [503, 200]
    assert http(standby, "/health")[0] == 200
    pair.wait_member_record(standby, role="ROLE_STANDBY", copy_current=True)
    _, epoch, _ = client.switchover(primary.control_address, standby.node_id)
    assert [http(standby, "/primary")[0], http(primary, "/primary")[0]] == [200, 503]
    families = {f.name: f for f in text_string_to_metric_families(http(standby, "/metrics")[1])}
    roles = {s.labels["role"]: s.value for s in families["vsm_sidecar_role"].samples}
    assert roles["PRIMARY"] == 1
    assert sum(roles.values()) == 1
    assert families["vsm_sidecar_epoch"].samples[0].value == epoch


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                          text=True, timeout=60)


def test_switchover_cli_keeps_the_exit_code_convention(pair: Pair) -> None:
    """`vsm-sidecar switchover`: to the node that is already primary, it says so and exits 0
    (nothing to do; not "moved in 3 ms"); a refusal by the cluster exits 1; a --to that is no
    node id is a usage error, exit 2, before any call; a move exits 0 and says it moved."""
    pair.start(ttl=2)
    primary, standby = pair.wait_split()
    # Switchover changes state: it goes to each sidecar's own socket (grpc_socket).
    epoch = primary.role()["epoch"]
    same = cli("switchover", "--to", primary.node_id, "--grpc", standby.control_address)
    assert (same.returncode, same.stderr) == (0, ""), same.stderr
    assert same.stdout == f"{primary.node_id} is already the primary (epoch {epoch}): " \
                          "nothing to move\n"
    assert primary.role()["epoch"] == epoch
    refused = cli("switchover", "--to", "ghost", "--grpc", primary.control_address)
    assert (refused.returncode, refused.stdout) == (1, ""), refused
    assert refused.stderr.startswith("vsm-sidecar: switchover refused: ghost is not a member")
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    bad = cli("switchover", "--to", "no such id!", "--grpc", primary.control_address)
    assert (bad.returncode, bad.stdout, len(bad.stderr.splitlines())) == (2, "", 1), bad
    assert bad.stderr.startswith("vsm-sidecar: error: --to:"), bad.stderr
    pair.wait_member_record(standby, role="ROLE_STANDBY", copy_current=True)
    moved = cli("switchover", "--to", standby.node_id, "--grpc", primary.control_address)
    assert (moved.returncode, moved.stderr) == (0, ""), moved.stderr
    assert moved.stdout.startswith(f"{standby.node_id} is PRIMARY (epoch "), moved.stdout
    assert "moved in" in moved.stdout


def test_status_with_nothing_listening_is_one_line() -> None:
    """`vsm-sidecar status` with no sidecar at the address: "no sidecar answers at ADDR",
    one line, exit 1 (a runtime failure, not a usage error), for a port and a Unix socket."""
    for address in (f"127.0.0.1:{free_port()}", "unix:/nonexistent/vsm-sidecar.sock"):
        result = cli("status", "--grpc", address)
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr == f"vsm-sidecar: no sidecar answers at {address}\n"


def test_status_tells_a_tls_refusal_from_nothing_listening(tmp_path: Path) -> None:
    """A server that wants TLS and a client certificate: plaintext, or a certificate of
    another CA, is "closed the connection", and a server certificate the client does not
    trust is "the TLS handshake failed"; both one line, exit 1, not "no sidecar answers"."""
    pki = make_pki(tmp_path / "pki")
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(), require_client_auth=True)
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
    server.start()
    try:
        other = ["--grpc-ca", str(pki.ca), "--grpc-cert", str(pki.other_client.cert),
                 "--grpc-key", str(pki.other_client.key)]
        for flags, message in (
                ([], f"{address} closed the connection"),
                (other, f"{address} closed the connection"),
                (["--grpc-ca", str(pki.other_ca)], f"the TLS handshake with {address} failed")):
            result = cli("status", "--grpc", address, *flags)
            assert (result.returncode, result.stdout) == (1, ""), result
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith(f"vsm-sidecar: {message}"), result.stderr
    finally:
        server.stop(None)
