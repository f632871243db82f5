"""The sidecar against a secured etcd: TLS with client certificates, and user/password auth.

Each test has its own one-member cluster (closed after it), because auth and TLS are
cluster-wide. The failures a misconfiguration causes must be loud: a wrong certificate keeps
the sidecar STARTING with the reason in its status, a wrong password or a user without rights
is reported as access denied, and none of them ever becomes PRIMARY.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import etcd3
import etcd3.exceptions
import grpc
import pytest

from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar
from sidecar.lab.tlsfiles import TlsFiles

from ..tlsgen import Pki, make_pki

pytestmark = [pytest.mark.etcd]

TTL = 2
CLUSTER = "sec"
PREFIX = f"/thinlinc-ha/{CLUSTER}/"
# How long a misconfigured sidecar is watched for never turning PRIMARY.
WATCH_S = 4.0


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")



def _tls_cluster(pki: Pki, workdir: Path) -> LocalEtcdCluster:
    tls = TlsFiles(pki.ca, pki.server.cert, pki.server.key, pki.client.cert, pki.client.key)
    return LocalEtcdCluster(size=1, tls=tls, workdir=workdir / "etcd")


def _start(nodes: list[LocalSidecar], node_id: str, cluster: LocalEtcdCluster, workdir: Path,
           args: list[str], *, wait: bool = True) -> LocalSidecar:
    node = LocalSidecar(node_id, CLUSTER, cluster.endpoints_arg, workdir, ttl=TTL,
                        extra_args=args)
    nodes.append(node)
    return node.start(wait=wait)


def _elect_and_fail_over(nodes: list[LocalSidecar], cluster: LocalEtcdCluster, workdir: Path,
                         args: list[str]) -> None:
    a = _start(nodes, "a", cluster, workdir, args)
    a.wait_role("PRIMARY")
    b = _start(nodes, "b", cluster, workdir, args)
    standby = b.wait_role("STANDBY")
    primary = a.role()
    assert standby["leader_id"] == "a"
    assert standby["epoch"] == primary["epoch"]
    a.kill()
    promoted = b.wait_role("PRIMARY", timeout=TTL + 5)
    assert int(promoted["epoch"]) > int(primary["epoch"])


def _never_primary(node: LocalSidecar, seconds: float = WATCH_S) -> dict[str, object]:
    """Watch ``node`` for ``seconds``: it must stay up and STARTING; return its last status."""
    deadline = time.monotonic() + seconds
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        assert node.running, f"{node.node_id} exited:\n{node.log_tail()}"
        status = node.role(timeout=1.0)
        assert status["role"] == "ROLE_STARTING", f"{status}\n{node.log_tail()}"
        time.sleep(0.2)
    return status


def _log_events(node: LocalSidecar) -> list[dict[str, object]]:
    events = []
    for line in node.log_path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _password_file(workdir: Path, password: str) -> Path:
    path = workdir / "etcd-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def _auth_args(user: str, password_file: Path) -> list[str]:
    return ["--etcd-user", user, "--etcd-password-file", str(password_file)]


# -- TLS --------------------------------------------------------------------------------------


def test_tls_with_client_certificate_elects_and_fails_over(
        pki: Pki, tmp_path: Path, nodes: list[LocalSidecar]) -> None:
    """etcd with TLS and client certificates: two sidecars elect one PRIMARY and fail over
    after kill -9."""
    with _tls_cluster(pki, tmp_path) as cluster:
        assert all(url.startswith("https://") for url in cluster.endpoints)
        args = ["--etcd-ca", str(pki.ca), "--etcd-cert", str(pki.client.cert),
                "--etcd-key", str(pki.client.key)]
        _elect_and_fail_over(nodes, cluster, tmp_path, args)


def test_tls_cluster_refuses_a_client_without_a_certificate(pki: Pki, tmp_path: Path) -> None:
    """--client-cert-auth is really on: the cluster's CA alone does not get a client in."""
    with _tls_cluster(pki, tmp_path) as cluster:
        with cluster.client(timeout=2) as etcd:
            etcd.put(PREFIX + "k", "v")  # the cluster's own client presents its certificate
        member = cluster.members[0]
        creds = grpc.ssl_channel_credentials(pki.ca.read_bytes())  # no client certificate
        endpoint = etcd3.Endpoint(member.host, member.client_port, secure=True, creds=creds)
        with etcd3.MultiEndpointEtcd3Client([endpoint], timeout=2) as etcd, \
                pytest.raises(etcd3.exceptions.ConnectionFailedError) as caught:
            etcd.get(PREFIX + "k")
        rpc_error = caught.value.__context__
        assert isinstance(rpc_error, grpc.RpcError)
        assert "CERTIFICATE" in rpc_error.details().upper(), rpc_error.details()


def test_wrong_client_certificate_keeps_the_sidecar_starting_with_the_reason(
        pki: Pki, tmp_path: Path, nodes: list[LocalSidecar]) -> None:
    """A client certificate from another CA: the sidecar stays STARTING, says why, never PRIMARY."""
    with _tls_cluster(pki, tmp_path) as cluster:
        args = ["--etcd-ca", str(pki.ca), "--etcd-cert", str(pki.other_client.cert),
                "--etcd-key", str(pki.other_client.key)]
        node = _start(nodes, "a", cluster, tmp_path, args)
        status = _never_primary(node)
        reason = str(status.get("reason", ""))
        assert "etcd unreachable" in reason, status
        # etcd3 turns the UNAVAILABLE (SSLV3_ALERT_BAD_CERTIFICATE) into a bare
        # ConnectionFailedError, so the TLS detail itself does not reach the reason.
        assert "connection failed" in reason, status
        retries = [e for e in _log_events(node) if e.get("event") == "etcd_retry"]
        assert retries, node.log_tail()
        grants = [e for e in retries if e.get("what") == "grant lease"]
        assert grants, node.log_tail()
        assert "connection failed" in str(grants[-1].get("error")), grants[-1]
        # Calls made on raw stubs (e.g. "read sessions") keep grpc's detail: the TLS alert.
        assert any("BAD_CERTIFICATE" in str(e.get("error")) for e in retries), node.log_tail()
        # For the report: what exactly gRPC says about the refused handshake.
        print("reason:", reason)


# -- user/password ----------------------------------------------------------------------------


def _auth_cluster(pki: Pki, tmp_path: Path, *extra_args: str) -> LocalEtcdCluster:
    # Over TLS: grpc sends the auth token (a call credential) only on a secure channel, so
    # user/password auth over http:// cannot work with this client library at all.
    tls = TlsFiles(pki.ca, pki.server.cert, pki.server.key, pki.client.cert, pki.client.key)
    return LocalEtcdCluster(size=1, tls=tls, workdir=tmp_path / "etcd", extra_args=extra_args)


def _tls_args(pki: Pki) -> list[str]:
    return ["--etcd-ca", str(pki.ca), "--etcd-cert", str(pki.client.cert),
            "--etcd-key", str(pki.client.key)]


def test_user_limited_to_the_cluster_prefix_elects_and_fails_over(
        pki: Pki, tmp_path: Path, nodes: list[LocalSidecar]) -> None:
    """A user whose role covers only /thinlinc-ha/<cluster>/ is enough to elect and fail over."""
    with _auth_cluster(pki, tmp_path) as cluster:
        cluster.enable_auth("root-secret")
        cluster.add_user("vsm", "vsm-secret", PREFIX)
        with cluster.client() as etcd:  # as root
            etcd.put("/elsewhere/k", "v")
        args = _tls_args(pki) + _auth_args("vsm", _password_file(tmp_path, "vsm-secret"))
        _elect_and_fail_over(nodes, cluster, tmp_path, args)
        with cluster.client(user="vsm", password="vsm-secret") as etcd:
            assert etcd.get(PREFIX + "leader")[0] is not None
            for call in (lambda: etcd.get("/elsewhere/k"), lambda: etcd.put("/elsewhere/k", "x"),
                         lambda: etcd.get("/thinlinc-ha/other/leader")):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # Auth is really on: no user, no access.
        with cluster.client(user=None, password=None) as etcd, pytest.raises(grpc.RpcError):
            etcd.get(PREFIX + "leader")


def test_wrong_password_is_reported_as_access_denied_and_the_sidecar_exits(
        pki: Pki, tmp_path: Path, nodes: list[LocalSidecar]) -> None:
    """A wrong password is access denied (not an outage): logged plainly, exit non-zero."""
    with _auth_cluster(pki, tmp_path) as cluster:
        cluster.enable_auth("root-secret")
        cluster.add_user("vsm", "vsm-secret", PREFIX)
        args = _tls_args(pki) + _auth_args("vsm", _password_file(tmp_path, "not-the-password"))
        node = _start(nodes, "a", cluster, tmp_path, args, wait=False)
        code = node.wait_exit(20)
        log_text = node.log_tail(80)
        assert code != 0, log_text
        events = _log_events(node)
        denied = [e for e in events if e.get("event") == "etcd_access_denied"]
        assert denied, log_text
        assert "authentication failed" in log_text, log_text
        assert not any(e.get("new") == "PRIMARY" for e in events), log_text
        with cluster.client() as etcd:
            assert etcd.get(PREFIX + "leader")[0] is None


def test_user_without_rights_on_the_prefix_is_denied_and_never_primary(
        pki: Pki, tmp_path: Path, nodes: list[LocalSidecar]) -> None:
    """A user without rights on the prefix: one error line, exit 1, no leader key written."""
    with _auth_cluster(pki, tmp_path) as cluster:
        cluster.enable_auth("root-secret")
        cluster.add_user("vsm", "vsm-secret", "/thinlinc-ha/another-cluster/")
        args = _tls_args(pki) + _auth_args("vsm", _password_file(tmp_path, "vsm-secret"))
        node = _start(nodes, "a", cluster, tmp_path, args, wait=False)
        deadline = time.monotonic() + WATCH_S
        while time.monotonic() < deadline and node.running:
            time.sleep(0.2)
        log_text = node.log_tail(80)
        events = _log_events(node)
        assert not any(e.get("new") == "PRIMARY" for e in events), log_text
        assert "permission denied" in log_text, log_text
        assert not node.running, "a user without rights must stop the sidecar"
        assert node.process is not None
        assert node.process.returncode == 1, log_text
        assert "Traceback" not in node.log_path.read_text(), log_text
        assert log_text.splitlines()[-1].startswith("vsm-sidecar: error: etcd:"), log_text
        with cluster.client() as etcd:
            assert etcd.get(PREFIX + "leader")[0] is None


def test_primary_keeps_its_role_past_the_auth_token_ttl(
        pki: Pki, tmp_path: Path, nodes: list[LocalSidecar]) -> None:
    """etcd auth tokens expire (--auth-token-ttl); the primary keeps its role past that."""
    token_ttl = 2
    with _auth_cluster(pki, tmp_path, f"--auth-token-ttl={token_ttl}") as cluster:
        cluster.enable_auth("root-secret")
        cluster.add_user("vsm", "vsm-secret", PREFIX)
        args = _tls_args(pki) + _auth_args("vsm", _password_file(tmp_path, "vsm-secret"))
        a = _start(nodes, "a", cluster, tmp_path, args)
        a.wait_role("PRIMARY")
        b = _start(nodes, "b", cluster, tmp_path, args)
        b.wait_role("STANDBY")
        epoch = a.role()["epoch"]
        deadline = time.monotonic() + 4 * token_ttl + TTL
        while time.monotonic() < deadline:
            assert a.role()["role"] == "ROLE_PRIMARY", a.log_tail()
            assert a.role()["epoch"] == epoch
            assert b.role()["role"] == "ROLE_STANDBY", b.log_tail()
            time.sleep(0.2)
        # The standby still follows: a failover after the token TTL works.
        a.kill()
        promoted = b.wait_role("PRIMARY", timeout=TTL + 5)
        assert int(promoted["epoch"]) > int(epoch)
        for node in (a, b):
            events = _log_events(node)
            retries = sum(e.get("event") == "etcd_retry" for e in events)
            changes = [e.get("new") for e in events if e.get("event") == "role_change"]
            token_errors = sum("auth token" in json.dumps(e) for e in events)
            print(node.node_id, "etcd_retry:", retries, "role changes:", changes,
                  "token errors:", token_errors)
