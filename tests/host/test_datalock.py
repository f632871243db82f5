"""The data directory's lock: one holder at a time, and the witness of a live holder."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.host import datalock

# A process that takes the lock, says so, then waits (optionally with a child program that
# outlives it, to show the child does not keep the lock).
HOLDER = """
import subprocess, sys, time
from pathlib import Path
from sidecar.host import datalock
lock = datalock.acquire(Path(sys.argv[1]))
if len(sys.argv) > 2:
    child = subprocess.Popen(["sleep", "60"], close_fds=False)
    print(child.pid, flush=True)
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        process.kill()
        process.communicate()


def hold(holders: list[subprocess.Popen[str]], data_dir: Path,
         *extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(data_dir), *extra],
                               stdout=subprocess.PIPE, text=True)
    holders.append(process)
    assert process.stdout is not None
    lines = []
    while (line := process.stdout.readline().strip()) != "held":
        assert line, f"the holder ended with {process.wait()}"
        lines.append(line)
    return process, lines


def test_a_lock_held_by_another_process_refuses_naming_the_folder_and_pid(
        tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    """acquire() while another live process holds the lock raises DataDirInUse with the
    folder and the holder's pid."""
    data_dir = tmp_path / "data"
    holder, _ = hold(holders, data_dir)
    with pytest.raises(datalock.DataDirInUse) as info:
        datalock.acquire(data_dir)
    assert (info.value.data_dir, info.value.pid) == (data_dir, holder.pid)
    assert str(info.value) == f"{data_dir} is in use by another sidecar (pid {holder.pid})"


def test_held_by_tells_a_live_holder_from_a_dead_one(
        tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    """held_by() is None with no lock file and no holder, the pid while a holder lives, and
    None again once it is killed with SIGKILL (the kernel drops the lock: nothing stale)."""
    data_dir = tmp_path / "data"
    assert datalock.held_by(data_dir) is None
    assert not data_dir.exists()  # looking creates nothing
    holder, _ = hold(holders, data_dir)
    assert datalock.held_by(data_dir) == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert datalock.held_by(data_dir) is None
    lock = datalock.acquire(data_dir)  # free again
    try:
        assert datalock.held_by(data_dir) == os.getpid()
    finally:
        lock.release()
    assert datalock.held_by(data_dir) is None


def test_a_child_program_does_not_keep_the_lock(
        tmp_path: Path, holders: list[subprocess.Popen[str]]) -> None:
    """A program the sidecar starts (a hook, a health check) and that outlives it does not
    hold the lock: the descriptor is closed in children."""
    data_dir = tmp_path / "data"
    holder, (child_pid,) = hold(holders, data_dir, "with-child")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    try:
        os.kill(int(child_pid), 0)  # the child still lives
        assert datalock.held_by(data_dir) is None
    finally:
        os.kill(int(child_pid), signal.SIGKILL)


def test_the_folder_is_made_owner_only(tmp_path: Path) -> None:
    """acquire() makes a missing data_dir with mode 0700 and the lock file 0600."""
    data_dir = tmp_path / "new" / "data"
    with datalock.held(data_dir):
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((data_dir / datalock.LOCK_NAME).stat().st_mode) == 0o600
