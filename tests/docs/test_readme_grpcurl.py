"""Every ``grpcurl`` command in README.md runs, as written, against a real pair of sidecars."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from sidecar.api import role_pb2, session_pb2
from sidecar.lab.localnode import LocalSidecar

from ..endpoints.test_grpc_role import grpcurl
from ..sidecars import Pair

pytestmark = [pytest.mark.etcd]

README = Path(__file__).resolve().parents[2] / "README.md"
README_ADDRESS = "127.0.0.1:50051"
README_SOCKET = "/run/vsm-sidecar/grpc.sock"
# A server stream never ends by itself: grpcurl stops it after this long, and fails with
# DeadlineExceeded after printing what arrived; that failure is accepted for streams only.
STREAM_SECONDS = 2
NODES = ("vsm-a", "vsm-b")  # the README's Switchover example names vsm-b


def readme_commands(text: str) -> list[str]:
    """Each line of a fenced code block that starts with ``grpcurl ``, continuations joined."""
    commands: list[str] = []
    in_block = False
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if pending:
            pending += " " + line.strip()
        elif line.startswith("grpcurl "):
            pending = line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        elif pending:
            commands.append(pending)
            pending = ""
    return commands


def test_readme_commands_are_found_whole() -> None:
    """The parser joins backslash continuations and skips text outside fences."""
    text = "grpcurl outside\n```sh\ngrpcurl -d '{}' \\\n  host m/A\necho x\ngrpcurl b\n```\n"
    assert readme_commands(text) == ["grpcurl -d '{}' host m/A", "grpcurl b"]


def _server_streaming_methods() -> set[str]:
    methods = set()
    for file in (role_pb2.DESCRIPTOR, session_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            methods |= {f"{service.full_name}/{m.name}" for m in service.methods
                        if m.server_streaming}
    return methods


STREAMING = _server_streaming_methods()


def _messages(stdout: str) -> list[dict[str, Any]]:
    """The JSON messages grpcurl printed, one after the other."""
    decoder, messages, at = json.JSONDecoder(), [], 0
    while stdout[at:].strip():
        at += len(stdout[at:]) - len(stdout[at:].lstrip())
        message, at = decoder.raw_decode(stdout, at)
        messages.append(message)
    return messages


# What each README command must print, by method (or "list"); given the text output (list) or
# the JSON messages (every RPC). A README command with no entry here fails the test.
Check = Callable[[Any], None]


def _listed(lines: list[str]) -> None:
    assert {"thinlinc.ha.v1.RoleService", "thinlinc.ha.v1.SessionService",
            "grpc.health.v1.Health"} <= set(lines)


def _role(messages: list[dict[str, Any]]) -> None:
    assert messages[0]["role"] == "ROLE_PRIMARY"
    assert messages[0]["node_id"] == messages[0]["leader_id"]
    assert int(messages[0]["epoch"]) > 0


def _health(messages: list[dict[str, Any]]) -> None:
    assert messages == [{"status": "SERVING"}]


def _put(messages: list[dict[str, Any]]) -> None:
    (answer,) = messages
    assert answer["session"]["session_id"] == "agent1:10"
    assert answer["session"]["revision"] == answer["revision"]


def _get(messages: list[dict[str, Any]]) -> None:
    (answer,) = messages
    assert (answer["session"]["username"], answer["session"]["created_at"]) == \
        ("alice", "2024-05-01T12:00:00Z")
    assert int(answer["revision"]) >= int(answer["session"]["revision"])


def _list(messages: list[dict[str, Any]]) -> None:
    (answer,) = messages
    assert [s["session_id"] for s in answer["sessions"]] == ["agent1:10"]
    assert int(answer["revision"]) > 0


def _watch_sessions(messages: list[dict[str, Any]]) -> None:
    assert [m["type"] for m in messages] == ["SESSION_EVENT_TYPE_SNAPSHOT",
                                             "SESSION_EVENT_TYPE_SNAPSHOT_DONE"]
    assert messages[0]["session_id"] == "agent1:10"


def _delete(messages: list[dict[str, Any]]) -> None:
    (answer,) = messages
    assert answer["deleted"] is True
    assert int(answer["revision"]) > 0


def _switchover(messages: list[dict[str, Any]]) -> None:
    (answer,) = messages
    assert answer["primary"] == "vsm-b"
    assert int(answer["epoch"]) > 0
    assert answer["took"].endswith("s")


EXPECTED: dict[str, Check] = {
    "list": _listed,
    "thinlinc.ha.v1.RoleService/GetRole": _role,
    "thinlinc.ha.v1.RoleService/WatchRole": _role,
    "grpc.health.v1.Health/Check": _health,
    "thinlinc.ha.v1.SessionService/PutSession": _put,
    "thinlinc.ha.v1.SessionService/GetSession": _get,
    "thinlinc.ha.v1.SessionService/ListSessions": _list,
    "thinlinc.ha.v1.SessionService/WatchSessions": _watch_sessions,
    "thinlinc.ha.v1.SessionService/DeleteSession": _delete,
    "thinlinc.ha.v1.RoleService/Switchover": _switchover,
}


def run_readme_command(command: str, node: LocalSidecar) -> str:
    """Run one README command against ``node`` (its port or its socket, as the command
    says); the method it called (or "list")."""
    address, socket = node.address, str(node.control_socket)
    args = shlex.split(command.replace(README_ADDRESS, address).replace(README_SOCKET, socket))
    assert args[0] == "grpcurl", command
    assert address in args or socket in args, command
    target = args[-1]
    streaming = target in STREAMING
    if streaming:
        args[1:1] = ["-max-time", str(STREAM_SECONDS)]
    done = subprocess.run([grpcurl(), *args[1:]], capture_output=True, text=True, timeout=60)
    if streaming:
        assert "DeadlineExceeded" in done.stderr, (command, done.returncode, done.stderr)
    else:
        assert done.returncode == 0, (command, done.stderr)
    output: Any = done.stdout.split() if target == "list" else _messages(done.stdout)
    assert output, (command, done.stderr)
    EXPECTED[target](output)
    return target


def start_named_pair(pair: Pair) -> LocalSidecar:
    """vsm-a (PRIMARY) and vsm-b (STANDBY); returns vsm-a."""
    first = pair.start_one(NODES[0], ttl=2)
    first.wait_role("PRIMARY")
    pair.start_one(NODES[1], ttl=2)
    primary, _ = pair.wait_split()
    assert primary is first
    return first


def test_every_readme_grpcurl_command_runs_against_the_primary(pair: Pair) -> None:
    """Each grpcurl line of README.md, pasted as written but with the primary's address,
    succeeds and prints what the README promises; none is skipped."""
    commands = readme_commands(README.read_text())
    methods = [re.split(r"\s+", c)[-1] for c in commands]
    assert set(EXPECTED) <= set(methods), f"README lost examples: {set(EXPECTED) - set(methods)}"
    start_named_pair(pair)

    ran = []
    for command in commands:
        primary, _ = pair.wait_split()  # the Switchover example moves it
        ran.append(run_readme_command(command, primary))

    assert ran == methods
    assert len(ran) == len(commands)
    assert pair.wait_split()[0].node_id == "vsm-b"
