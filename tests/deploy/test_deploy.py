"""The deployment files (image, compose, systemd, Kubernetes, example TOML) are coherent and
their settings pass the sidecar's own validation. No Docker engine is needed."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar import config
from sidecar.tools import example_config

from ..tlsgen import make_pki

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "vsm-sidecar.service"
KUBE = DEPLOY / "kubernetes"
SIDECARS = ("sidecar-a", "sidecar-b")
ETCDS = ("etcd-1", "etcd-2", "etcd-3")

# Settings that name a file or folder on the target host; check_config() points them at
# stand-ins in a temporary folder, passed as flags (which beat the file and the environment).
FILE_SETTINGS = ("etcd_ca", "etcd_cert", "etcd_key", "etcd_password_file")


def check_config(args: list[str], env: Mapping[str, str], tmp: Path,
                 toml: Mapping[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m sidecar check-config` with exactly ``env`` as its VSM_SIDECAR_* settings;
    the settings alone, since the files describe other hosts than this one."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    given = {**(toml or {}), **{k[len(config.ENV_PREFIX):].lower(): v for k, v in env.items()}}
    if any(given.get(name) for name in FILE_SETTINGS):
        pki = make_pki(tmp / "pki")  # certificates are read and checked, so real ones
        (tmp / "password").write_text("stand-in\n")
        stand_ins = {"etcd_ca": pki.ca, "etcd_cert": pki.client.cert,
                     "etcd_key": pki.client.key, "etcd_password_file": tmp / "password"}
        for name in FILE_SETTINGS:
            if given.get(name):
                args = [*args, config.flag_name(name), str(stand_ins[name])]
    if given.get("vsm_sessions_file"):
        args = [*args, "--vsm-sessions-file", str(tmp / "sessions")]
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "--settings-only", *args],
        env={**base, **env}, capture_output=True, text=True, timeout=60, check=False)


def assert_valid(result: subprocess.CompletedProcess[str]) -> None:
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    assert "settings are valid" in result.stdout


# --- docker-compose.yml -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def dockerfile_env() -> dict[str, str]:
    """The VSM_SIDECAR_* variables the image itself sets (ENV lines of the final stage)."""
    final = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    joined = final.replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                name, _, value = word.partition("=")
                if name.startswith(config.ENV_PREFIX):
                    found[name] = value
    return found


@pytest.mark.parametrize("service", SIDECARS)
def test_compose_sidecar_environment_passes_check_config(
        compose: dict[str, Any], service: str, tmp_path: Path) -> None:
    """Each sidecar's environment (plus the image's own ENV) is accepted by check-config."""
    env = {**dockerfile_env(), **services(compose)[service]["environment"]}
    assert all(k.startswith(config.ENV_PREFIX) for k in env), sorted(env)
    assert all(isinstance(v, str) for v in env.values()), "quote YAML booleans and numbers"
    assert_valid(check_config([], env, tmp_path))


def test_compose_sidecars_differ_where_they_must(compose: dict[str, Any]) -> None:
    """Two node ids, vsm-a alone preferred, the same VIP, gRPC and HTTP on all addresses."""
    envs = [services(compose)[s]["environment"] for s in SIDECARS]
    assert [e["VSM_SIDECAR_NODE_ID"] for e in envs] == ["vsm-a", "vsm-b"]
    assert [e["VSM_SIDECAR_PREFERRED_PRIMARY"] for e in envs] == ["true", "false"]
    for env in envs:
        assert env["VSM_SIDECAR_GRPC_LISTEN"] == "0.0.0.0:50051"
        assert env["VSM_SIDECAR_HTTP_LISTEN"] == "0.0.0.0:8008"
        assert env["VSM_SIDECAR_VIP_INTERFACE"] == "eth0"
    assert len({e["VSM_SIDECAR_VIP"] for e in envs}) == 1


def test_compose_images_and_builds_are_consistent(compose: dict[str, Any]) -> None:
    """Both sidecars build deploy/Dockerfile into one image; the stand-ins run that image."""
    svc = services(compose)
    builds = [svc[s]["build"] for s in SIDECARS]
    assert builds == [{"context": ".", "dockerfile": "deploy/Dockerfile",
                       "args": {"PYTHON_IMAGE": "${PYTHON_IMAGE:-python:3.11-slim-bookworm}"}}] * 2
    assert (ROOT / builds[0]["context"] / builds[0]["dockerfile"]).is_file()
    images = {svc[s]["image"] for s in (*SIDECARS, "vsm-a", "vsm-b")}
    assert len(images) == 1, images
    for standin, sidecar in (("vsm-a", "sidecar-a"), ("vsm-b", "sidecar-b")):
        assert "build" not in svc[standin]
        assert svc[standin]["network_mode"] == f"service:{sidecar}"
        assert svc[standin]["depends_on"] == {sidecar: {"condition": "service_healthy"}}
        argv = [*svc[standin]["entrypoint"], *svc[standin]["command"]]
        assert argv[:4] == ["python3", "-m", "sidecar", "vsm-standin"]
        # Its own sidecar's socket (writes are allowed there only), on a volume the two share.
        assert argv[argv.index("--grpc") + 1] == "unix:/run/vsm-sidecar/grpc.sock"
        assert svc[standin]["volumes"] == svc[sidecar]["volumes"]
        assert svc[sidecar]["volumes"][0].endswith(":/run/vsm-sidecar")
        assert argv[argv.index("--listen") + 1] == "0.0.0.0:9000"
    assert svc["sidecar-a"]["volumes"] != svc["sidecar-b"]["volumes"]


def test_compose_sidecars_have_only_the_two_capabilities(compose: dict[str, Any]) -> None:
    """cap_drop ALL, cap_add exactly NET_ADMIN and NET_RAW; distinct published gRPC ports."""
    svc = services(compose)
    for name in SIDECARS:
        assert svc[name]["cap_drop"] == ["ALL"]
        assert sorted(svc[name]["cap_add"]) == ["NET_ADMIN", "NET_RAW"]
        assert svc[name]["depends_on"] == {
            e: {"condition": "service_healthy"} for e in ETCDS}
    grpc_ports = [p for s in SIDECARS for p in svc[s]["ports"] if p.endswith(":50051")]
    assert grpc_ports == ["${SIDECAR_A_GRPC_PORT:-50051}:50051",
                          "${SIDECAR_B_GRPC_PORT:-50052}:50051"]


def _check_python_c(argv: list[str]) -> None:
    assert argv[:2] == ["/opt/vsm-sidecar/bin/python3", "-c"]  # the venv's, without capabilities
    compile(argv[2], "<healthcheck>", "exec")
    assert "/health" in argv[2]


def test_compose_healthchecks_are_well_formed(compose: dict[str, Any]) -> None:
    """Exec-form tests: etcdctl endpoint health on etcd, compiled Python on the sidecar port."""
    svc = services(compose)
    for name, spec in svc.items():
        if "healthcheck" not in spec:
            assert name in ("vsm-a", "vsm-b"), f"{name} has no healthcheck"
            continue
        test = spec["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: exec form needed (the etcd image has no shell)"
        for key in ("interval", "timeout"):
            assert re.fullmatch(r"\d+(ms|s|m)", spec["healthcheck"][key]), (name, key)
        if name in ETCDS:
            assert test[1:] == ["/usr/local/bin/etcdctl", "--endpoints=http://127.0.0.1:2379",
                                "endpoint", "health"]
        else:
            _check_python_c(test[1:])
            port = spec["environment"]["VSM_SIDECAR_HTTP_LISTEN"].rpartition(":")[2]
            assert f"127.0.0.1:{port}/health" in test[3]


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_compose_etcd_cluster_is_coherent(compose: dict[str, Any]) -> None:
    """Every member is in every --initial-cluster, one token, URLs on the member's own IP."""
    svc = services(compose)
    flags = {name: _flags(svc[name]["command"]) for name in ETCDS}
    clusters = {f["initial-cluster"] for f in flags.values()}
    assert len(clusters) == 1, clusters
    members = dict(m.split("=", 1) for m in clusters.pop().split(","))
    assert sorted(members) == sorted(f["name"] for f in flags.values())
    assert len({f["initial-cluster-token"] for f in flags.values()}) == 1
    for name, f in flags.items():
        ip = svc[name]["networks"]["ha"]["ipv4_address"]
        assert f["name"] == name
        assert f["initial-cluster-state"] == "new"
        assert members[name] == f["initial-advertise-peer-urls"] == f"http://{ip}:2380"
        assert f["advertise-client-urls"] == f"http://{ip}:2379"
    for sidecar in SIDECARS:
        urls = svc[sidecar]["environment"]["VSM_SIDECAR_ETCD_ENDPOINTS"].split(",")
        assert sorted(urlsplit(u).hostname for u in urls) == sorted(ETCDS)
        assert {urlsplit(u).port for u in urls} == {2379}


def test_compose_addresses_fit_the_network(compose: dict[str, Any]) -> None:
    """Fixed IPs inside the subnet and distinct; the VIP in the subnet and nobody's IP."""
    (pool,) = compose["networks"]["ha"]["ipam"]["config"]
    subnet = ipaddress.ip_network(pool["subnet"])
    svc = services(compose)
    fixed = [ipaddress.ip_address(spec["networks"]["ha"]["ipv4_address"])
             for spec in svc.values() if "networks" in spec]
    assert len(fixed) == len(ETCDS) + len(SIDECARS) == len(set(fixed))
    taken = {*fixed, ipaddress.ip_address(pool["gateway"])}
    assert all(ip in subnet for ip in taken)
    for sidecar in SIDECARS:
        env = svc[sidecar]["environment"]
        vip = ipaddress.ip_interface(env["VSM_SIDECAR_VIP"])
        assert vip.network == subnet
        assert vip.ip not in taken
        own_ip = svc[sidecar]["networks"]["ha"]["ipv4_address"]
        assert env["VSM_SIDECAR_ADVERTISE_ADDRESS"] == f"{own_ip}:50051"


# `docker compose config` (Compose's own schema check) runs in tests/deploy/test_docker.py, with the
# Compose binary of the test extra, so it never skips for want of a plugin.


# --- deploy/Dockerfile -------------------------------------------------------------------


def test_dockerfile_runs_unprivileged_with_file_capabilities() -> None:
    """Final stage: python slim base, non-root USER, two file capabilities, entrypoint."""
    text = DOCKERFILE.read_text()
    final = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    (user,) = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user.split(":")[0] not in ("root", "0")
    assert "setcap cap_net_admin,cap_net_raw=ep" in final
    assert 'ENTRYPOINT ["vsm-sidecar"]' in final
    assert 'CMD ["run"]' in final
    assert re.search(r"^EXPOSE 50051 8008$", final, re.MULTILINE)
    assert 'VOLUME ["/var/lib/vsm-sidecar"]' in final
    assert dockerfile_env()["VSM_SIDECAR_DATA_DIR"] == "/var/lib/vsm-sidecar"


def test_dockerfile_healthcheck_is_well_formed() -> None:
    """HEALTHCHECK runs compiled Python against /health on the VSM_SIDECAR_HTTP_LISTEN port."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if ln.startswith("HEALTHCHECK ")]
    argv = json.loads(line[line.index("CMD ") + 4:])
    _check_python_c(argv)
    assert "VSM_SIDECAR_HTTP_LISTEN" in argv[2]


def test_dockerignore_keeps_the_context_small() -> None:
    """Only what the wheel build reads is sent to the daemon."""
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!LICENSE", "!sidecar/"} <= set(lines)


def test_image_build_reads_the_license_files() -> None:
    """The build stage copies every file pyproject's license-files names, so the image's
    wheel carries the licence (setuptools only warns when one is missing)."""
    build_stage = DOCKERFILE.read_text().split("\nFROM ")[1]
    copied = {word for line in build_stage.splitlines() if line.startswith("COPY ")
              for word in line.split()[1:-1]}
    license_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "license-files"]
    assert set(license_files) <= copied


# --- Kubernetes --------------------------------------------------------------------------


def kube_documents() -> list[dict[str, Any]]:
    return [d for p in sorted(KUBE.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
            if d]


def kube_sidecar() -> tuple[dict[str, Any], dict[str, Any]]:
    (sts,) = [d for d in kube_documents() if d["kind"] == "StatefulSet"]
    (container,) = [c for c in sts["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "vsm-sidecar"]
    return sts, container


def test_kubernetes_pod_runs_the_sidecar_with_two_capabilities() -> None:
    """hostNetwork, non-root, drop ALL, add exactly NET_ADMIN and NET_RAW, /health probes."""
    kinds = sorted(d["kind"] for d in kube_documents())
    assert kinds == ["ConfigMap", "Service", "StatefulSet"]
    sts, sidecar = kube_sidecar()
    pod = sts["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert len(pod["containers"]) == 2
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["capabilities"]["drop"] == ["ALL"]
    assert sorted(security["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    # no_new_privs would make exec ignore the interpreter's file capabilities.
    assert security["allowPrivilegeEscalation"] is True
    for probe in ("livenessProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"] == {"path": "/health", "port": 8008}


def test_kubernetes_configmap_passes_check_config(tmp_path: Path) -> None:
    """The ConfigMap's TOML, mounted where --config says, with the container's env, is valid."""
    (cm,) = [d for d in kube_documents() if d["kind"] == "ConfigMap"]
    sts, sidecar = kube_sidecar()
    args = sidecar["args"]
    assert args[:2] == ["run", "--config"]
    mount = Path(args[2]).parent
    volume = {m["name"] for m in sidecar["volumeMounts"] if m["mountPath"] == str(mount)}
    assert volume == {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]
                      if v.get("configMap", {}).get("name") == cm["metadata"]["name"]}
    text = cm["data"][Path(args[2]).name]
    (tmp_path / "sidecar.toml").write_text(text)
    fake = {"metadata.name": "vsm-0", "status.hostIP": "10.0.0.11"}
    env: dict[str, str] = {}
    for item in sidecar["env"]:
        value = item.get("value") or fake[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
    settings_env = {k: v for k, v in env.items() if k.startswith(config.ENV_PREFIX)}
    result = check_config(["--config", str(tmp_path / "sidecar.toml")], settings_env, tmp_path,
                          tomllib.loads(text))
    assert_valid(result)
    printed = tomllib.loads(result.stdout)
    assert (printed["node_id"], printed["http_listen"]) == ("vsm-0", "10.0.0.11:8008")


# --- systemd -----------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_systemd_unit_grants_only_the_two_capabilities() -> None:
    """Type=notify with a watchdog, a non-root user with two ambient capabilities, sandboxed,
    and `release` after any exit."""
    unit = unit_settings()
    expected = {
        "Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["10s"],
        "User": ["vsm-sidecar"], "Group": ["vsm-sidecar"],
        "AmbientCapabilities": ["CAP_NET_ADMIN CAP_NET_RAW"],
        "CapabilityBoundingSet": ["CAP_NET_ADMIN CAP_NET_RAW"],
        "NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"],
        "StateDirectory": ["vsm-sidecar"], "Restart": ["on-failure"],
        "ExecStart": [
            "/opt/vsm-sidecar/bin/vsm-sidecar run --config /etc/vsm-sidecar/sidecar.toml"],
        "ExecStopPost": [
            "/opt/vsm-sidecar/bin/vsm-sidecar release --config /etc/vsm-sidecar/sidecar.toml"],
    }
    assert {k: unit.get(k) for k in expected} == expected


def test_systemd_example_config_passes_check_config(tmp_path: Path) -> None:
    """deploy/systemd/sidecar.toml is valid (host-only paths replaced by stand-ins)."""
    path = DEPLOY / "systemd" / "sidecar.toml"
    toml = tomllib.loads(path.read_text())
    assert_valid(check_config(["--config", str(path)], {}, tmp_path, toml))
    assert config.Settings().data_dir.name == unit_settings()["StateDirectory"][0]


def test_systemd_unit_makes_the_grpc_sockets_folder() -> None:
    """The unit's RuntimeDirectory is the folder of grpc_socket's default, which the sidecar
    user could not make itself under ProtectSystem=strict."""
    runtime = unit_settings()["RuntimeDirectory"]
    assert [f"/run/{runtime[0]}"] == [str(config.DEFAULT_GRPC_SOCKET.parent)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing. It runs on a scratch root holding the
    system's units and a stand-in for the ExecStart program, because it also checks that the
    program exists; it exits 0 even on bad lines, so any output fails the test."""
    units = Path("/usr/lib/systemd/system")
    if not units.is_dir():
        pytest.skip("no /usr/lib/systemd/system to verify against")
    shutil.copytree(units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    program = tmp_path / unit_settings()["ExecStart"][0].split()[0].lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    target = tmp_path / "etc/systemd/system" / UNIT.name
    target.parent.mkdir(parents=True)
    shutil.copy(UNIT, target)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}",
         f"/etc/systemd/system/{UNIT.name}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- deploy/sidecar.example.toml ---------------------------------------------------------


def test_example_config_is_current() -> None:
    """The committed example equals the generator's output; if this fails, run
    `python -m sidecar.tools.example_config > deploy/sidecar.example.toml`."""
    assert (DEPLOY / "sidecar.example.toml").read_text() == example_config.render()


def test_example_config_documents_every_setting_with_its_default(tmp_path: Path) -> None:
    """Uncommenting every key gives a file check-config accepts whose values are the
    defaults, so the documented defaults are true."""
    text = (DEPLOY / "sidecar.example.toml").read_text()
    assert_valid(check_config(["--config", str(DEPLOY / "sidecar.example.toml")], {}, tmp_path))
    keys = re.findall(r"^#(\w+) = ", text, re.MULTILINE)
    assert keys == list(config.SETTING_NAMES)
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.MULTILINE)
    (tmp_path / "all.toml").write_text(uncommented)
    assert_valid(check_config(["--config", str(tmp_path / "all.toml")], {}, tmp_path))
    loaded = config.build(config.read_file(tmp_path / "all.toml"))
    assert loaded == config.build({})


def test_example_config_script_prints_the_file() -> None:
    """`python -m sidecar.tools.example_config` prints the same text as render()."""
    result = subprocess.run([sys.executable, "-m", "sidecar.tools.example_config"],
                            capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    assert result.stdout == example_config.render()
