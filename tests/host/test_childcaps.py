"""Programs the sidecar starts get none of its capabilities (sidecar/childcaps.py).

The end-to-end tests run the sidecar's code as user nobody holding CAP_NET_ADMIN and
CAP_NET_RAW as ambient capabilities, the way the systemd unit runs it, and read the
capability sets the started programs report in their own /proc/self/status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.host.childcaps import SETPRIV_OPTIONS, inheritable_capabilities, without_capabilities
from sidecar.lab.localcluster import LocalEtcdCluster
from sidecar.lab.localnode import LocalSidecar

CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
TWO = 1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW
SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")
NOBODY = 65534
AS_NOBODY_WITH_TWO = [
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
    "--inh-caps=-all,+net_admin,+net_raw", "--ambient-caps=-all,+net_admin,+net_raw", "--"]
REPO = Path(__file__).resolve().parents[2]


def capabilities(status: str) -> dict[str, int]:
    """The CapInh, CapPrm, CapEff and CapAmb sets of a /proc/PID/status text."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith("Cap"))
    return {name: int(fields[name], 16) for name in SETS}


def status_file(tmp_path: Path, inh: int, amb: int) -> str:
    path = tmp_path / "status"
    path.write_text(f"Name:\tpython3\nCapInh:\t{inh:016x}\nCapPrm:\t{TWO:016x}\n"
                    f"CapEff:\t{TWO:016x}\nCapBnd:\t000001ffffffffff\nCapAmb:\t{amb:016x}\n")
    return str(path)


def require_root_and_setpriv() -> None:
    """Skip unless root with setpriv; under CI=true (which runs as root) fail instead."""
    reason = ("needs root to become another user" if os.geteuid() != 0
              else "needs setpriv (util-linux)" if shutil.which("setpriv") is None else None)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, where capability tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder user nobody may write (pytest's tmp_path is root's alone), removed after."""
    path = Path(tempfile.mkdtemp(prefix="vsm-caps-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_nothing_to_pass_on_starts_the_program_itself(tmp_path: Path) -> None:
    """With empty inheritable and ambient sets the command is left as it is (no setpriv)."""
    status = status_file(tmp_path, inh=0, amb=0)
    assert inheritable_capabilities(status) == 0
    assert without_capabilities(["true", "x"], status_path=status) == ["true", "x"]


@pytest.mark.parametrize(("inh", "amb"), [(TWO, TWO), (TWO, 0), (1 << CAP_NET_RAW, 0)])
def test_inheritable_or_ambient_capabilities_go_through_setpriv(tmp_path: Path, inh: int,
                                                                amb: int) -> None:
    """Any inheritable or ambient bit makes the command run through setpriv, which clears
    both sets before it execs the program."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    status = status_file(tmp_path, inh=inh, amb=amb)
    assert inheritable_capabilities(status) == inh | amb
    assert without_capabilities(["true", "x"], status_path=status) == [
        shutil.which("setpriv"), *SETPRIV_OPTIONS, "--", "true", "x"]


def test_unreadable_status_counts_as_something_to_drop(tmp_path: Path) -> None:
    """When the capability sets cannot be read, the command goes through setpriv anyway."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    missing = str(tmp_path / "no-status")
    assert inheritable_capabilities(missing) is None
    assert without_capabilities(["true"], status_path=missing)[0] == shutil.which("setpriv")


def test_without_setpriv_the_program_is_not_started(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Capabilities to drop but no setpriv on PATH: FileNotFoundError naming setpriv (the
    callers log it as "cannot start"), never a start with the capabilities."""
    status = status_file(tmp_path, inh=TWO, amb=TWO)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"setpriv \(util-linux\) is not on PATH"):
        without_capabilities(["/bin/true"], status_path=status)


def test_a_missing_program_fails_to_start_through_setpriv_too(tmp_path: Path) -> None:
    """A program that does not exist raises FileNotFoundError, as a direct start would, rather
    than surfacing as setpriv's exit status 127."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    status = status_file(tmp_path, inh=TWO, amb=TWO)
    with pytest.raises(FileNotFoundError, match="no such executable: /nonexistent/hook"):
        without_capabilities(["/nonexistent/hook"], status_path=status)


def run_driver(out: Path) -> subprocess.CompletedProcess[str]:
    """tests/childcaps_driver.py as nobody with the two capabilities ambient."""
    return subprocess.run([*AS_NOBODY_WITH_TWO, sys.executable, "-m", "tests.childcaps_driver",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)


def field(status: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in status.splitlines()
                if line.startswith(f"{name}:"))


def test_hook_and_health_check_get_no_capabilities(shared_dir: Path) -> None:
    """As nobody with ambient NET_ADMIN and NET_RAW, the hook runner's and the exec: health
    check's programs start with empty inheritable, permitted, effective and ambient sets; each
    is still the sidecar's own child and leads its own session (setpriv replaced itself), so a
    timeout kills the program's whole process group as before."""
    require_root_and_setpriv()
    result = run_driver(shared_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    sidecar = field((shared_dir / "parent-before.status").read_text(), "Tgid")
    for program in ("hook", "health"):
        status = (shared_dir / f"{program}.status").read_text()
        assert f"Uid:\t{NOBODY}" in status
        assert capabilities(status) == dict.fromkeys(SETS, 0), program
        assert field(status, "PPid") == sidecar, program
        assert field(status, "NSsid") == field(status, "Pid"), program


def test_the_sidecar_keeps_its_capabilities_after_starting_programs(shared_dir: Path) -> None:
    """The drop is the child's alone: after a hook and a health check ran, the spawning
    thread of the sidecar still holds the two capabilities in every set it started with."""
    require_root_and_setpriv()
    result = run_driver(shared_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    before = capabilities((shared_dir / "parent-before.status").read_text())
    after = capabilities((shared_dir / "parent-after.status").read_text())
    assert before == dict.fromkeys(SETS, TWO)
    assert after == before


@pytest.mark.etcd
def test_a_real_sidecar_starts_its_hook_and_health_check_without_capabilities(
        etcd_cluster: LocalEtcdCluster, cluster_name: str, shared_dir: Path) -> None:
    """`vsm-sidecar run` as nobody with ambient NET_ADMIN and NET_RAW (the systemd unit's
    setup): its role hook and exec: health check run with no capabilities, while the sidecar
    process itself keeps both."""
    require_root_and_setpriv()
    hook = shared_dir / "hook.sh"
    hook.write_text(f'#!/bin/sh\ncat /proc/self/status > {shared_dir}/hook-"$1".status\n')
    hook.chmod(0o755)
    check = f"exec:sh -c 'cat /proc/self/status > {shared_dir}/health.status'"
    node = LocalSidecar("a", cluster_name, etcd_cluster.endpoints_arg, shared_dir,
                        command_prefix=AS_NOBODY_WITH_TWO,
                        extra_args=["--on-role-change", str(hook), "--health-check", check,
                                    "--health-interval", "1", "--health-timeout", "1",
                                    "--health-rise", "1"])
    try:
        node.start().wait_role("PRIMARY")
        hook_status = shared_dir / "hook-PRIMARY.status"
        deadline = time.monotonic() + 10
        while not (hook_status.exists() and hook_status.read_text().endswith("\n")):
            assert time.monotonic() < deadline, f"no hook ran:\n{node.log_tail()}"
            time.sleep(0.05)
        sidecar = Path(f"/proc/{node.pid}/status").read_text()
        assert f"Uid:\t{NOBODY}" in sidecar
        assert capabilities(sidecar) == dict.fromkeys(SETS, TWO)
        for path in (hook_status, shared_dir / "health.status"):
            status = path.read_text()
            assert f"Uid:\t{NOBODY}" in status
            assert capabilities(status) == dict.fromkeys(SETS, 0), path.name
        node.terminate()
        node.wait_exit()
    finally:
        node.close()
