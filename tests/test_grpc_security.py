"""The gRPC API secured: TLS, mutual TLS, the session write restriction, the Unix socket mode,
and the settings that are refused before the sidecar starts.

Each test runs one real sidecar on the shared etcd cluster, under its own cluster name, so it is
PRIMARY and session writes succeed when allowed. The test certificates come from ``tlsgen``:
"client" (CN=client) is the allowed writer; the server certificate, which also carries the
clientAuth usage, is a second client certificate from the same CA (CN=server) that is not.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import client
from sidecar.api import session_pb2, session_pb2_grpc
from sidecar.api.session_pb2 import Session
from sidecar.grpc_sessions import is_local_peer, writer_allowed
from sidecar.localcluster import LocalEtcdCluster, free_port
from sidecar.localnode import LocalSidecar

from .test_grpc_api import grpcurl
from .tlsgen import Pki, make_pki

pytestmark = [pytest.mark.etcd]

TTL = 2
RPC_TIMEOUT = 5.0
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("grpc-pki"))


@pytest.fixture
def nodes() -> Iterator[list[LocalSidecar]]:
    started: list[LocalSidecar] = []
    yield started
    for node in started:
        node.close()


def _tls_args(pki: Pki, *, mtls: bool = False) -> list[str]:
    args = ["--grpc-tls-cert", str(pki.server.cert), "--grpc-tls-key", str(pki.server.key)]
    return args + (["--grpc-client-ca", str(pki.ca)] if mtls else [])


def _start(nodes: list[LocalSidecar], etcd: LocalEtcdCluster, cluster: str, workdir: Path,
           args: list[str], *, unix_socket: bool = False) -> LocalSidecar:
    node = LocalSidecar("a", cluster, etcd.endpoints_arg, workdir, ttl=TTL, extra_args=args,
                        unix_socket=unix_socket)
    nodes.append(node)
    return node.start(wait=False)


def _wait_primary(node: LocalSidecar, *, timeout: float = 15.0, **tls: Any) -> dict[str, Any]:
    """Poll GetRole (with the given TLS material) until the node is PRIMARY."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        assert node.running, f"the sidecar exited:\n{node.log_tail()}"
        try:
            last = client.get_role(node.address, timeout=0.5, **tls)
            if client.role_name(last) == "PRIMARY":
                return last  # type: ignore[no-any-return]
        except client.Unreachable as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"not PRIMARY after {timeout}s: {last}\n{node.log_tail()}")


def _refused(address: str, **tls: Any) -> str:
    with pytest.raises(client.Unreachable) as caught:
        client.get_role(address, timeout=2.0, **tls)
    return str(caught.value)


def _session(session_id: str) -> Session:
    return Session(session_id=session_id, username="alice", agent_hostname="agent1.example.com",
                   agent_address="192.0.2.10", display=10, status="running")


def _stub(channel: grpc.Channel) -> session_pb2_grpc.SessionServiceStub:
    return session_pb2_grpc.SessionServiceStub(channel)


def _put(channel: grpc.Channel, session_id: str) -> int:
    request = session_pb2.PutSessionRequest(session=_session(session_id))
    return int(_stub(channel).PutSession(request, timeout=RPC_TIMEOUT).revision)


def _denied(call: Any) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    assert error.code() is Code.PERMISSION_DENIED, error
    details = str(error.details())
    assert "session_writers" in details, details
    return details


def _reads_work(channel: grpc.Channel, expected: set[str]) -> None:
    stub = _stub(channel)
    listed = stub.ListSessions(session_pb2.ListSessionsRequest(), timeout=RPC_TIMEOUT)
    assert expected <= {s.session_id for s in listed.sessions}
    for session_id in expected:
        got = stub.GetSession(session_pb2.GetSessionRequest(session_id=session_id),
                              timeout=RPC_TIMEOUT)
        assert got.session.username == "alice"


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_serves_tls_clients_only_with_health_and_reflection(
        pki: Pki, etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """TLS without client certificates: a client trusting the CA gets GetRole and health;
    a plaintext client and a client trusting another CA get nothing."""
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, _tls_args(pki))
    status = _wait_primary(node, ca=pki.ca)
    assert status["node_id"] == "a"
    _refused(node.address)  # plaintext
    _refused(node.address, ca=pki.other_ca)  # the server's certificate is not trusted
    with client.channel(node.address, ca=pki.ca) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service="thinlinc.ha.v1.Primary"), timeout=RPC_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    listed = subprocess.run(
        [grpcurl(), "-cacert", str(pki.ca), node.address, "list"],
        capture_output=True, text=True, timeout=30, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "thinlinc.ha.v1.RoleService" in listed.stdout.split()


def test_mtls_refuses_clients_without_a_certificate_from_the_ca(
        pki: Pki, etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """Mutual TLS: no certificate, a certificate from another CA, or plaintext are refused;
    the CA's client works, also with the real grpcurl (list and GetRole)."""
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, _tls_args(pki, mtls=True))
    good: dict[str, Any] = {"ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key}
    assert _wait_primary(node, **good)["node_id"] == "a"
    _refused(node.address)
    _refused(node.address, ca=pki.ca)
    _refused(node.address, ca=pki.ca, cert=pki.other_client.cert, key=pki.other_client.key)

    tls = ["-cacert", str(pki.ca), "-cert", str(pki.client.cert), "-key", str(pki.client.key)]
    listed = subprocess.run([grpcurl(), *tls, node.address, "list"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert listed.returncode == 0, listed.stderr
    assert {"thinlinc.ha.v1.RoleService", "thinlinc.ha.v1.SessionService",
            "grpc.health.v1.Health"} <= set(listed.stdout.split())
    called = subprocess.run(
        [grpcurl(), *tls, node.address, "thinlinc.ha.v1.RoleService/GetRole"],
        capture_output=True, text=True, timeout=30, check=False)
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["role"] == "ROLE_PRIMARY"
    no_cert = subprocess.run([grpcurl(), "-cacert", str(pki.ca), node.address, "list"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert no_cert.returncode != 0

    # The CLI too: `vsm-sidecar status` with the client's certificate, and without it.
    cli = [sys.executable, "-m", "sidecar", "status", "--grpc", node.address, "--json"]
    flags = ["--grpc-ca", str(pki.ca), "--grpc-cert", str(pki.client.cert),
             "--grpc-key", str(pki.client.key)]
    status = subprocess.run([*cli, *flags], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["role"] == "ROLE_PRIMARY"
    anonymous = subprocess.run([*cli, "--grpc-ca", str(pki.ca), "--timeout", "2"],
                               capture_output=True, text=True, timeout=30)
    assert anonymous.returncode == 1


# -- the session write restriction ---------------------------------------------------------------


def test_session_writes_by_certificate_common_name(
        pki: Pki, etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """session_writers=client: CN=client writes, CN=server (same CA) gets PERMISSION_DENIED
    naming the rule; both read."""
    args = [*_tls_args(pki, mtls=True), "--session-writers", "client"]
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, args)
    writer: dict[str, Any] = {"ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key}
    other: dict[str, Any] = {"ca": pki.ca, "cert": pki.server.cert, "key": pki.server.key}
    _wait_primary(node, **writer)
    with client.channel(node.address, **writer) as allowed, \
            client.channel(node.address, **other) as denied:
        assert _put(allowed, "s1") > 0
        details = _denied(lambda: _put(denied, "s2"))
        assert "CN server" in details, details
        _denied(lambda: _stub(denied).DeleteSession(
            session_pb2.DeleteSessionRequest(session_id="s1"), timeout=RPC_TIMEOUT))
        _reads_work(allowed, {"s1"})
        _reads_work(denied, {"s1"})
        gone = _stub(allowed).DeleteSession(session_pb2.DeleteSessionRequest(session_id="s1"),
                                            timeout=RPC_TIMEOUT)
        assert gone.deleted


def _non_loopback_ipv4() -> str | None:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5,
                             check=False).stdout
    except OSError:
        return None
    return next((a for a in out.split() if ":" not in a and not a.startswith("127.")), None)


def test_session_writes_local_only_over_tcp(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """session_writers=local on 0.0.0.0: a loopback client writes; the same host through its
    non-loopback address is refused; both read."""
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    port = free_port("0.0.0.0")
    args = ["--grpc-listen", f"0.0.0.0:{port}", "--session-writers", "local"]
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, args)
    local = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while client.role_name(_role_or_empty(local)) != "PRIMARY":
        assert node.running, node.log_tail()
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(0.05)
    with grpc.insecure_channel(local) as allowed, \
            grpc.insecure_channel(f"{address}:{port}") as remote:
        assert _put(allowed, "s1") > 0
        details = _denied(lambda: _put(remote, "s2"))
        assert f"ipv4:{address}:" in details
        assert "without a client certificate" in details
        _reads_work(allowed, {"s1"})
        _reads_work(remote, {"s1"})


def _role_or_empty(address: str) -> dict[str, Any]:
    try:
        return client.get_role(address, timeout=0.5)
    except client.Unreachable:
        return {}


def test_unix_socket_is_owner_only_and_local_writers_may_write(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """The Unix socket is mode 0600, and a peer on it counts as local."""
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, ["--session-writers", "local"],
                  unix_socket=True)
    _wait_primary(node)
    assert node.unix_socket is not None
    mode = node.unix_socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(mode)
    with grpc.insecure_channel(node.address) as channel:
        assert _put(channel, "s1") > 0
        _reads_work(channel, {"s1"})


@pytest.mark.parametrize(("peer", "local"), [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.8.9.1:5000", True), ("ipv6:[::1]:5000", True),
    ("ipv6:[::ffff:127.0.0.1]:5000", True), ("unix:/run/vsm-sidecar.sock", True),
    ("unix:", True), ("ipv4:192.0.2.2:5000", False), ("ipv6:[fd00::2]:5000", False),
    ("ipv6:[::ffff:192.0.2.2]:5000", False), ("ipv6:[fe80::1%eth0]:5000", False),
    ("unknown", False), ("ipv4:garbage", False),
])
def test_local_peer_strings(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local


def test_writer_rules() -> None:
    assert writer_allowed((), "ipv4:192.0.2.2:1", [])
    assert writer_allowed(("local",), "unix:", [])
    assert not writer_allowed(("local",), "ipv4:192.0.2.2:1", [])
    assert writer_allowed(("local", "vsm"), "ipv4:192.0.2.2:1", ["vsm"])
    assert not writer_allowed(("vsm",), "ipv4:127.0.0.1:1", ["other"])
    assert not writer_allowed(("vsm",), "ipv4:127.0.0.1:1", [])
    # A certificate whose CN is literally "local" does not stand in for the local rule.
    assert not writer_allowed(("local",), "ipv4:192.0.2.2:1", ["local"])


# -- settings refused before the start -----------------------------------------------------------


def _bad_cases(pki: Pki, tmp: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key = str(pki.server.cert), str(pki.server.key)
    return [
        (["--grpc-tls-cert", cert], "grpc_tls_key"),
        (["--grpc-tls-key", key], "grpc_tls_cert"),
        (["--grpc-tls-cert", cert, "--grpc-tls-key", str(tmp / "missing.key")], "grpc_tls_key"),
        (["--grpc-tls-cert", cert, "--grpc-tls-key", str(pki.client.key)], "grpc_tls_cert"),
        (["--grpc-tls-cert", str(garbage), "--grpc-tls-key", key], "grpc_tls_cert"),
        (["--grpc-client-ca", str(pki.ca)], "grpc_client_ca"),
        ([*_tls_args(pki), "--grpc-client-ca", str(garbage)], "grpc_client_ca"),
        ([*_tls_args(pki), "--grpc-client-ca", str(tmp / "missing.pem")], "grpc_client_ca"),
        (["--session-writers", "vsm-a"], "session_writers"),
        ([*_tls_args(pki), "--session-writers", "local,vsm-a"], "session_writers"),
    ]


def test_bad_grpc_security_settings_exit_2_naming_the_setting(pki: Pki, tmp_path: Path) -> None:
    for args, setting in _bad_cases(pki, tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "--etcd-endpoints", "http://127.0.0.1:1",
             "--data-dir", str(tmp_path / "data"), "--log-format", "json", *args],
            capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert f"setting '{setting}'" in result.stderr, (args, result.stderr)
