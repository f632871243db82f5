"""What pip installs is whole and loads: the dependency floors admit only runtimes the committed
stubs accept, and the sdist and the wheel carry the protos, the licence and the type hints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sidecar.tools import genproto

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
UNIT = ROOT / "deploy" / "systemd" / "vsm-sidecar.service"
# Released together with grpcio, each requiring grpcio>= its own version.
GRPC_COMPANIONS = ("grpcio-health-checking", "grpcio-reflection")


def requirement(name: str, extra: str | None = None) -> Requirement:
    listed = (PYPROJECT["project"]["optional-dependencies"][extra] if extra
              else PYPROJECT["project"]["dependencies"])
    (found,) = [r for r in map(Requirement, listed) if r.name == name]
    return found


def floor(req: Requirement) -> Version:
    """The lowest version ``req`` admits, from its >=, == or ~= clauses."""
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert lows, f"{req} has no floor"
    return max(lows)


def stub_texts(pattern: str) -> list[str]:
    paths = sorted(genproto.OUT_DIR.glob(pattern))
    assert paths, f"no {pattern} in {genproto.OUT_DIR}"
    return [p.read_text() for p in paths]


def stubs_need_grpcio() -> Version:
    """The grpcio the *_pb2_grpc modules check for when they are imported."""
    found = {m for t in stub_texts("*_pb2_grpc.py")
             for m in re.findall(r"^GRPC_GENERATED_VERSION = '([^']+)'$", t, re.MULTILINE)}
    (version,) = found
    return Version(version)


def stubs_need_protobuf() -> Version:
    """The protobuf runtime the *_pb2 modules check for when they are imported."""
    call = (r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
            r"\s*(\d+),\s*(\d+),\s*(\d+),")
    found = {".".join(m) for t in stub_texts("*_pb2.py") for m in re.findall(call, t)}
    (version,) = found
    return Version(version)


def just_below(version: Version) -> Version:
    major, minor, patch = (*version.release, 0, 0)[:3]
    if patch:
        return Version(f"{major}.{minor}.{patch - 1}")
    if minor:
        return Version(f"{major}.{minor - 1}.999")
    return Version(f"{major - 1}.999.999")


def load_stubs(grpcio: Version, protobuf: Version) -> subprocess.CompletedProcess[str]:
    """Import every generated module in a fresh interpreter that reports the given grpcio and
    protobuf versions, so the stubs' own version checks run against them."""
    modules = sorted(f"sidecar.api.{p.stem}" for p in genproto.OUT_DIR.glob("*_pb2*.py"))
    # protobuf's own well-known types check the runtime too, against the release they came
    # with: they are loaded before the runtime is made to report another version.
    well_known = sorted({m for t in stub_texts("*_pb2.py")
                         for m in re.findall(r"^from google\.protobuf import (\w+_pb2) ", t,
                                             re.MULTILINE)})
    major, minor, patch = (*protobuf.release, 0, 0)[:3]
    code = "\n".join([
        "import grpc",
        "from google.protobuf import runtime_version",
        *(f"from google.protobuf import {m}" for m in well_known),
        f"grpc.__version__ = {str(grpcio)!r}",
        f"runtime_version.MAJOR, runtime_version.MINOR, runtime_version.PATCH = "
        f"{major}, {minor}, {patch}",
        *(f"import {m}" for m in modules),
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


# --- dependency floors -------------------------------------------------------------------


def test_the_stubs_load_on_the_lowest_runtimes_pyproject_admits() -> None:
    """With grpcio and protobuf at their pyproject floors the generated modules import: a
    floor below what the stubs were generated for would let pip install a runtime on which
    `vsm-sidecar run` crashes at import."""
    grpcio, protobuf = floor(requirement("grpcio")), floor(requirement("protobuf"))
    result = load_stubs(grpcio, protobuf)
    assert (result.returncode, result.stderr) == (0, ""), (
        f"grpcio {grpcio} / protobuf {protobuf}: the stubs need grpcio>={stubs_need_grpcio()}"
        f" and protobuf>={stubs_need_protobuf()}\n{result.stderr}")


def test_the_stubs_refuse_runtimes_older_than_their_generator() -> None:
    """The version checks the floors rely on are real: one patch release below what the stubs
    were generated for, grpcio or protobuf, and their import fails."""
    grpcio, protobuf = stubs_need_grpcio(), stubs_need_protobuf()
    assert load_stubs(grpcio, protobuf).returncode == 0
    old_grpcio = load_stubs(just_below(grpcio), protobuf)
    assert old_grpcio.returncode != 0
    assert f"depends on grpcio>={grpcio}" in old_grpcio.stderr
    old_protobuf = load_stubs(grpcio, just_below(protobuf))
    assert old_protobuf.returncode != 0
    assert "VersionError" in old_protobuf.stderr


@pytest.mark.parametrize("name", GRPC_COMPANIONS)
def test_grpc_companion_floors_match_the_stubs(name: str) -> None:
    """Health checking and reflection are floored where grpcio is: an older release of either
    needs an older protobuf major and, loaded beside the stubs' grpcio, is not what we test."""
    assert floor(requirement(name)) >= stubs_need_grpcio()


def test_grpcio_tools_is_pinned_to_the_stubs_generator() -> None:
    """The test extra pins grpcio-tools to exactly the release that wrote the committed stubs
    (and that release is installed), so a new grpcio-tools on PyPI cannot make the stub test
    fail on a fresh install."""
    req = requirement("grpcio-tools", extra="test")
    assert [(s.operator, Version(s.version)) for s in req.specifier] == [
        ("==", stubs_need_grpcio())]
    assert Version(metadata.version("grpcio-tools")) == stubs_need_grpcio()


def test_license_is_apache_2_0_by_spdx_expression() -> None:
    """LICENSE holds the Apache License 2.0, named by the SPDX expression and listed in
    license-files; the build backend's floor is the first setuptools that reads both (76.x
    rejects the string form outright)."""
    project = PYPROJECT["project"]
    assert (project["license"], project["license-files"]) == ("Apache-2.0", ["LICENSE"])
    text = (ROOT / "LICENSE").read_text()
    assert re.match(r"\s*Apache License\s+Version 2\.0, January 2004\s", text)
    assert "END OF TERMS AND CONDITIONS" in text
    (backend,) = map(Requirement, PYPROJECT["build-system"]["requires"])
    assert backend.name == "setuptools"
    assert floor(backend) >= Version("77.0.3")


# --- the built sdist and wheel -----------------------------------------------------------


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An sdist and a wheel built the way a release is: the wheel from the unpacked sdist.

    The build runs on a copy (setuptools writes build/ and *.egg-info beside the sources)
    without isolation, using the test extra's setuptools instead of downloading one per run.
    """
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                    str(src)], capture_output=True, text=True, timeout=300, check=True)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def source_files(pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern)
            if "__pycache__" not in p.parts}


@pytest.mark.slow
def test_sdist_is_the_whole_source_release(dists: tuple[Path, Path]) -> None:
    """The sdist carries the protos, LICENSE, the tests, the type hints and the deployment
    files, and no byte code."""
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        top, *_ = tar.getnames()
        names = {n.removeprefix(f"{top}/") for n in tar.getnames()}
    expected = {"LICENSE", "sidecar/py.typed", "tests/conftest.py",
                "deploy/systemd/vsm-sidecar.service",
                *source_files("proto/**/*.proto"), *source_files("sidecar/**/*.pyi"),
                *source_files("tests/**/*.py")}
    assert source_files("proto/**/*.proto")
    assert sorted(expected - names) == []
    assert [n for n in names if "__pycache__" in n or n.endswith(".pyc")] == []


@pytest.mark.slow
def test_wheel_carries_every_module_the_type_hints_and_the_license(
        dists: tuple[Path, Path]) -> None:
    """Every module of sidecar/, py.typed, the .pyi stubs, and LICENSE under
    .dist-info/licenses; the metadata names the licence by its SPDX expression."""
    _, wheel = dists
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        license_text = whl.read(f"{info}/licenses/LICENSE")
        meta = whl.read(f"{info}/METADATA").decode()
    expected = {"sidecar/py.typed", *source_files("sidecar/**/*.py"),
                *source_files("sidecar/**/*.pyi")}
    assert sorted(expected - names) == []
    assert license_text == (ROOT / "LICENSE").read_bytes()
    headers = meta.split("\n\n", 1)[0].splitlines()
    assert {"License-Expression: Apache-2.0", "License-File: LICENSE"} <= set(headers)
    for name in ("grpcio", "protobuf", *GRPC_COMPANIONS):
        assert f"Requires-Dist: {requirement(name)}" in headers


@pytest.mark.slow
def test_the_unpacked_sdist_passes_its_own_stub_test(
        dists: tuple[Path, Path], tmp_path: Path) -> None:
    """tests/test_proto_stubs.py, run inside the unpacked sdist against the sdist's own
    sidecar/ and proto/, passes: the release can regenerate the stubs it ships."""
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.11.4 on; Debian 12's 3.11.2 has no filters
            tar.extraction_filter = tarfile.data_filter
        tar.extractall(tmp_path)
    (unpacked,) = tmp_path.iterdir()
    env = {**os.environ, "PYTHONPATH": str(unpacked), "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "from sidecar.tools import genproto; print(genproto.ROOT)"],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert Path(where.stdout.strip()) == unpacked
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_proto_stubs.py"],
        cwd=unpacked, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^2 passed", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.slow
def test_the_wheel_installs_the_program_the_systemd_unit_starts(
        dists: tuple[Path, Path], tmp_path: Path) -> None:
    """Installing the wheel into a venv, as the unit's comments say, makes the program its
    ExecStart runs: <venv>/bin/vsm-sidecar, started by the venv's own interpreter."""
    _, wheel = dists
    unit = UNIT.read_text()
    (documented_venv,) = set(re.findall(r"python3\.11 -m venv (/\S+)", unit))
    assert f"{documented_venv}/bin/pip install" in unit
    (exec_start,) = re.findall(r"^ExecStart=(\S+)", unit, re.MULTILINE)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   capture_output=True, timeout=120, check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   capture_output=True, timeout=120, check=True)
    (program,) = [p for p in venv.glob("bin/*") if p.name == "vsm-sidecar"]
    assert os.access(program, os.X_OK)
    assert program.read_text().splitlines()[0] == f"#!{venv / 'bin' / 'python'}"
    assert exec_start == f"{documented_venv}/{program.relative_to(venv).as_posix()}"
