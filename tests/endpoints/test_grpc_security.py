"""The gRPC API secured: TLS, mutual TLS, who may make changes over TCP (a certificate named in
grpc_writers, or nobody unidentified unless allow_unauthenticated_changes), the Unix sockets'
modes, and the settings that are refused before the sidecar starts. Changes as other users on
the Unix socket: tests/endpoints/test_grpc_access.py.

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
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import client
from sidecar.api import role_pb2, role_pb2_grpc, session_pb2, session_pb2_grpc
from sidecar.endpoints.grpc_access import READS, AccessPolicy, is_change, on_unix_socket
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

from .. import builders
from ..tlsgen import Pki, make_pki
from .test_grpc_role import grpcurl

pytestmark = [pytest.mark.etcd]

TTL = 2
RPC_TIMEOUT = 5.0
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("grpc-pki"))



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


def _stub(channel: grpc.Channel) -> session_pb2_grpc.SessionServiceStub:
    return session_pb2_grpc.SessionServiceStub(channel)


def _put(channel: grpc.Channel, session_id: str) -> int:
    request = session_pb2.PutSessionRequest(session=builders.session(session_id))
    return int(_stub(channel).PutSession(request, timeout=RPC_TIMEOUT).revision)


def _denied(call: Any) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    assert error.code() is Code.PERMISSION_DENIED, error
    details = str(error.details())
    assert "grpc_writers" in details, details
    return details


def _delete(channel: grpc.Channel, session_id: str) -> bool:
    return bool(_stub(channel).DeleteSession(
        session_pb2.DeleteSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT).deleted)


def _switchover(channel: grpc.Channel) -> Any:
    return role_pb2_grpc.RoleServiceStub(channel).Switchover(
        role_pb2.SwitchoverRequest(), timeout=RPC_TIMEOUT)


def _switchover_passes_the_guard(channel: grpc.Channel) -> None:
    """A lone sidecar has no standby to hand over to: FAILED_PRECONDITION, which comes from
    the servicer, so the call got past the access check."""
    with pytest.raises(grpc.RpcError) as caught:
        _switchover(channel)
    error: Any = caught.value
    assert error.code() is Code.FAILED_PRECONDITION, error


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
    # The refused handshakes did not break the log's one JSON object per line (gRPC's C core
    # prints each at INFO by itself unless kept to errors).
    lines = node.log_path.read_text().splitlines()
    assert [line for line in lines if not line.startswith("{")] == []


# -- the session write restriction ---------------------------------------------------------------


def test_session_writes_by_certificate_common_name(
        pki: Pki, etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """grpc_writers=client over mutual TLS: CN=client writes, deletes and calls Switchover;
    CN=server (same CA) gets PERMISSION_DENIED naming the setting for each; both read."""
    args = [*_tls_args(pki, mtls=True), "--grpc-writers", "client"]
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, args)
    writer: dict[str, Any] = {"ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key}
    other: dict[str, Any] = {"ca": pki.ca, "cert": pki.server.cert, "key": pki.server.key}
    _wait_primary(node, **writer)
    with client.channel(node.address, **writer) as allowed, \
            client.channel(node.address, **other) as denied:
        assert _put(allowed, "s1") > 0
        details = _denied(lambda: _put(denied, "s2"))
        assert "CN server" in details, details
        _denied(lambda: _delete(denied, "s1"))
        _denied(lambda: _switchover(denied))
        _reads_work(allowed, {"s1"})
        _reads_work(denied, {"s1"})
        assert _delete(allowed, "s1")
        _switchover_passes_the_guard(allowed)


def test_loopback_tcp_reads_but_may_not_change_anything(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """Default settings: over 127.0.0.1 anyone reads (role, health, sessions, reflection with
    the real grpcurl), and PutSession, DeleteSession and Switchover get PERMISSION_DENIED
    naming the Unix socket and grpc_writers; the same calls on the socket work."""
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, [])
    _wait_primary(node)
    with grpc.insecure_channel(node.address) as tcp, \
            grpc.insecure_channel(node.control_address) as local:
        details = _denied(lambda: _put(tcp, "s1"))
        assert f"the Unix socket {node.control_socket}" in details, details
        assert "ipv4:127.0.0.1:" in details
        assert "without a client certificate" in details
        assert _put(local, "s1") > 0
        _denied(lambda: _delete(tcp, "s1"))
        _denied(lambda: _switchover(tcp))
        _reads_work(tcp, {"s1"})
        assert _delete(local, "s1")
        _switchover_passes_the_guard(local)
        health = health_pb2_grpc.HealthStub(tcp).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service="thinlinc.ha.v1.Primary"), timeout=RPC_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    listed = subprocess.run([grpcurl(), "-plaintext", node.address, "list"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "thinlinc.ha.v1.SessionService" in listed.stdout.split()


def test_allow_unauthenticated_changes_opens_tcp_with_a_warning(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """allow_unauthenticated_changes = true: a plain loopback client writes and deletes, and
    the sidecar said so in a warning at start."""
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path,
                  ["--allow-unauthenticated-changes"])
    _wait_primary(node)
    with grpc.insecure_channel(node.address) as tcp:
        assert _put(tcp, "s1") > 0
        assert _delete(tcp, "s1")
        _switchover_passes_the_guard(tcp)
    warnings = [json.loads(line) for line in node.log_path.read_text().splitlines()
                if '"changes_unauthenticated"' in line]
    assert [w["level"] for w in warnings] == ["warning"], node.log_tail()
    assert warnings[0]["address"] == node.address


def test_unix_sockets_are_owner_only_and_changes_are_allowed_on_them(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """grpc_listen = unix:PATH and grpc_socket are both mode 0600 without a group, and a
    peer on either may change things."""
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, [], unix_socket=True)
    _wait_primary(node)
    assert node.unix_socket is not None
    for path in (node.unix_socket, node.control_socket):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, (path, oct(mode))
    for address, session_id in ((node.address, "s1"), (node.control_address, "s2")):
        with grpc.insecure_channel(address) as channel:
            assert _put(channel, session_id) > 0
            _reads_work(channel, {session_id})
            assert _delete(channel, session_id)


def test_grpc_socket_group_makes_the_socket_0660_for_that_group(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """grpc_socket_group: the socket belongs to that group, mode 0660."""
    node = _start(nodes, etcd_cluster, cluster_name, tmp_path, ["--grpc-socket-group", "4242"])
    _wait_primary(node)
    info = node.control_socket.stat()
    assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (4242, 0o660)


def test_a_socket_in_use_is_not_taken_over(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, tmp_path: Path,
        nodes: list[LocalSidecar]) -> None:
    """A second sidecar given a socket path another one serves exits 2 naming grpc_socket,
    and the first one's socket still answers."""
    first = _start(nodes, etcd_cluster, cluster_name, tmp_path, [])
    _wait_primary(first)
    second = LocalSidecar("b", cluster_name, etcd_cluster.endpoints_arg, tmp_path, ttl=TTL,
                          extra_args=["--grpc-socket", str(first.control_socket)])
    nodes.append(second)
    second.start(wait=False)
    assert second.wait_exit(15) == 2, second.log_tail()
    assert "setting 'grpc_socket'" in second.log_tail()
    assert "in use" in second.log_tail()
    assert client.role_name(client.get_role(first.control_address)) == "PRIMARY"


def test_methods_that_change_something_are_guarded_unless_listed_as_reads() -> None:
    """The check fails closed: of our services, exactly PutSession, DeleteSession and
    Switchover are guarded today; every listed read exists; health and reflection are open."""
    methods = {f"/{service.full_name}/{method.name}"
               for file in (role_pb2.DESCRIPTOR, session_pb2.DESCRIPTOR)
               for service in file.services_by_name.values() for method in service.methods}
    assert methods >= READS
    assert {m for m in methods if is_change(m)} == {
        "/thinlinc.ha.v1.SessionService/PutSession",
        "/thinlinc.ha.v1.SessionService/DeleteSession",
        "/thinlinc.ha.v1.RoleService/Switchover"}
    assert is_change("/thinlinc.ha.v1.RoleService/Pause")  # a method added later
    assert not is_change("/grpc.health.v1.Health/Watch")
    assert not is_change("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


@pytest.mark.parametrize(("peer", "unix"), [
    ("unix:", True), ("unix:/run/vsm-sidecar/grpc.sock", True),
    ("unix-abstract:vsm", False), ("ipv4:127.0.0.1:5000", False), ("ipv6:[::1]:5000", False),
    ("unknown", False), ("", False),
])
def test_unix_peer_strings(peer: str, unix: bool) -> None:
    assert on_unix_socket(peer) is unix


def test_access_policy_decisions() -> None:
    policy = AccessPolicy(socket=Path("/run/s.sock"), group=None, writers=frozenset({"vsm"}),
                          open_to_all=False, user="vsm-sidecar")
    assert policy.allows("unix:", [])
    assert not policy.allows("ipv4:127.0.0.1:1", [])
    assert not policy.allows("ipv4:127.0.0.1:1", ["other"])
    assert policy.allows("ipv4:192.0.2.2:1", ["vsm"])
    opened = AccessPolicy(socket=None, group=None, writers=frozenset(), open_to_all=True,
                          user="vsm-sidecar")
    assert opened.allows("ipv4:192.0.2.2:1", [])
    grouped = AccessPolicy(socket=Path("/run/s.sock"), group="vsm-admins",
                           writers=frozenset(), open_to_all=False, user="vsm-sidecar")
    message = grouped.refusal("/thinlinc.ha.v1.RoleService/Switchover", "ipv4:127.0.0.1:9", [])
    assert message.startswith("Switchover changes state"), message
    for named in ("/run/s.sock", "group vsm-admins", "user vsm-sidecar", "grpc_writers"):
        assert named in message, message


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
        (["--grpc-writers", "vsm-a"], "grpc_writers"),
        ([*_tls_args(pki), "--grpc-writers", "vsm-a"], "grpc_writers"),
        ([*_tls_args(pki, mtls=True), "--grpc-writers", "x" * 65], "grpc_writers"),
        (["--grpc-socket", "relative.sock"], "grpc_socket"),
        (["--grpc-socket", "/" + "s" * 120], "grpc_socket"),
        (["--grpc-socket", str(tmp / "no" / "such" / "grpc.sock")], "grpc_socket"),
        (["--grpc-socket", "", "--grpc-socket-group", "0"], "grpc_socket_group"),
        (["--grpc-socket-group", "no-such-group-here"], "grpc_socket_group"),
    ]


def test_bad_grpc_security_settings_exit_2_naming_the_setting(pki: Pki, tmp_path: Path) -> None:
    for args, setting in _bad_cases(pki, tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "run", "--etcd-endpoints", "http://127.0.0.1:1",
             "--data-dir", str(tmp_path / "data"), "--log-format", "json", *args],
            capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert f"setting '{setting}'" in result.stderr, (args, result.stderr)
