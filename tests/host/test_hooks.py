"""Role-change hooks (sidecar/hooks.py), run as real scripts in real processes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import structlog

from sidecar.core.roles import Role, Status
from sidecar.etcd.records import LeaderInfo
from sidecar.host.hooks import HookRunner
from sidecar.host.processes import check_program

from ..processes import alive

T = TypeVar("T")


def script(tmp_path: Path, body: str, name: str = "hook") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def with_runner(runner: HookRunner, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` while ``runner.run()`` works its queue; fail if it takes over 10 s."""

    async def main() -> T:
        task = asyncio.create_task(runner.run())
        try:
            async with asyncio.timeout(10):
                return await body()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


async def written(path: Path) -> None:
    """Wait until another process has written a line to ``path``."""
    # A file written by another process offers nothing to wait on but the disk.
    while not has_line(path):  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def has_line(path: Path) -> bool:
    return path.exists() and path.read_text().endswith("\n")



def test_hooks_run_one_at_a_time_in_order(tmp_path: Path) -> None:
    """Queued calls run sequentially in notify order; no two overlap."""
    out = tmp_path / "out"
    hook = script(tmp_path, f'echo "start $VSM_SIDECAR_EPOCH" >> {out}\nsleep 0.1\n'
                            f'echo "end $VSM_SIDECAR_EPOCH" >> {out}\n')
    runner = HookRunner(hook, timeout=5, node_id="a")

    async def body() -> None:
        for epoch in (1, 2, 3):
            runner.notify(Role.STANDBY, Role.PRIMARY, epoch, "a", "won")
        await runner.idle()

    with_runner(runner, body)
    expected = ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"]
    assert out.read_text().splitlines() == expected
    assert (runner.runs, runner.successes, runner.failures, runner.timeouts) == (3, 3, 0, 0)


def test_hook_gets_documented_environment_and_argv(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The new role is argv[1]; roles, epoch, node, leader and reason are in the environment,
    on top of the inherited one."""
    monkeypatch.setenv("VSM_TEST_INHERITED", "kept")
    out = tmp_path / "out"
    names = ["OLD_ROLE", "NEW_ROLE", "EPOCH", "NODE_ID", "LEADER", "REASON"]
    lines = "".join(f'echo "{n}=$VSM_SIDECAR_{n}" >> {out}\n' for n in names)
    hook = script(tmp_path, f'echo "argv=$# $1" > {out}\n{lines}'
                            f'echo "inherited=$VSM_TEST_INHERITED" >> {out}\n')
    runner = HookRunner(str(hook), timeout=5, node_id="node-b")

    async def body() -> None:
        runner.notify(Role.PRIMARY, Role.FENCED, 42, "node-a", "lease lost; no answer")
        await runner.idle()

    with_runner(runner, body)
    assert out.read_text().splitlines() == [
        "argv=1 FENCED", "OLD_ROLE=PRIMARY", "NEW_ROLE=FENCED", "EPOCH=42", "NODE_ID=node-b",
        "LEADER=node-a", "REASON=lease lost; no answer", "inherited=kept"]


def test_hanging_hook_is_killed_at_timeout_and_notify_never_blocks(tmp_path: Path) -> None:
    """A hook that ignores SIGTERM is killed with its whole process group after the timeout
    plus the SIGTERM grace; notify() meanwhile returns at once and the next call still runs."""
    pids, out = tmp_path / "pids", tmp_path / "out"
    hook = script(tmp_path, f'if [ "$VSM_SIDECAR_EPOCH" = 1 ]; then\n'
                            f"  trap '' TERM\n  sleep 30 &\n  echo $$ $! > {pids}\n  wait\n"
                            f'fi\necho "ran $VSM_SIDECAR_EPOCH" >> {out}\n')
    runner = HookRunner(hook, timeout=0.3, node_id="a")

    async def body() -> tuple[float, float]:
        started = time.monotonic()
        runner.notify(Role.STANDBY, Role.PRIMARY, 1, "a", "won")
        await written(pids)
        before = time.perf_counter()
        runner.notify(Role.PRIMARY, Role.STANDBY, 2, "b", "handed over")
        notify_took = time.perf_counter() - before
        await runner.idle()
        return notify_took, time.monotonic() - started

    notify_took, elapsed = with_runner(runner, body)
    assert notify_took < 0.005
    assert 1.3 <= elapsed < 4.0  # 0.3 s timeout, 1 s grace before SIGKILL
    assert [alive(int(pid)) for pid in pids.read_text().split()] == [False, False]
    assert out.read_text().splitlines() == ["ran 2"]
    assert (runner.runs, runner.timeouts, runner.failures, runner.successes) == (2, 1, 0, 1)


def test_failing_hook_is_counted_and_logged(tmp_path: Path) -> None:
    """A non-zero exit is a failure: counted, logged with its code and output tail."""
    hook = script(tmp_path, "echo starting\necho 'vsmserver: no such unit' >&2\nexit 3\n")
    runner = HookRunner(hook, timeout=5, node_id="a")

    async def body() -> None:
        runner.notify(Role.STANDBY, Role.PRIMARY, 7, "a", "won")
        await runner.idle()

    with structlog.testing.capture_logs() as logs:
        with_runner(runner, body)
    failed = [e for e in logs if e["event"] == "hook_failed"]
    assert len(failed) == 1
    assert (failed[0]["exit_code"], failed[0]["new"], failed[0]["hook_epoch"]) == (3, "PRIMARY", 7)
    assert failed[0]["output"] == "starting\nvsmserver: no such unit"
    assert failed[0]["duration"] < 2
    assert (runner.runs, runner.failures, runner.timeouts) == (1, 1, 0)


def test_hook_that_cannot_start_is_a_failure(tmp_path: Path) -> None:
    """A program that disappeared after the configuration check counts as a failed run."""
    runner = HookRunner(tmp_path / "gone", timeout=5, node_id="a")

    async def body() -> None:
        runner.notify(Role.STARTING, Role.STANDBY, 0, "", "following")
        await runner.idle()

    with_runner(runner, body)
    assert (runner.runs, runner.failures) == (1, 1)


def test_hook_exit_does_not_wait_for_a_daemon_it_started(tmp_path: Path) -> None:
    """A hook that starts a long-lived process holding its stdout is done when it exits,
    and that process is left running (it is what the hook was for)."""
    pid_file = tmp_path / "pid"
    hook = script(tmp_path, f"sleep 30 &\necho $! > {pid_file}\necho started\n")
    runner = HookRunner(hook, timeout=5, node_id="a")

    async def body() -> float:
        started = time.monotonic()
        runner.notify(Role.STANDBY, Role.PRIMARY, 1, "a", "won")
        await runner.idle()
        return time.monotonic() - started

    try:
        assert with_runner(runner, body) < 2
        assert alive(int(pid_file.read_text()))
        assert (runner.runs, runner.successes) == (1, 1)
    finally:
        os.kill(int(pid_file.read_text()), 9)


class FakeNode:
    """Stands in for Node.watch(): a fixed list of statuses (follow() is pure logic)."""

    def __init__(self, statuses: list[Status]) -> None:
        self.statuses = statuses

    async def watch(self) -> AsyncIterator[Status]:
        for status in self.statuses:
            yield status


def test_follow_notifies_on_role_changes_only() -> None:
    """The first status is the starting point; epoch-only changes queue nothing."""
    leader = LeaderInfo("a", "127.0.0.1:50051", "2024-01-01T00:00:00Z", epoch=5, lease=1)
    statuses = [Status("a", "c"), Status("a", "c", reason="still"),
                Status("a", "c", Role.STANDBY, "following b", None, 4),
                Status("a", "c", Role.STANDBY, "following b", None, 5),
                Status("a", "c", Role.PRIMARY, "won", leader, 5)]
    runner = HookRunner("/bin/true", timeout=1, node_id="a")
    asyncio.run(runner.follow(FakeNode(statuses)))
    queued = [runner._queue.get_nowait() for _ in range(runner.pending)]
    assert [(c.old, c.new, c.epoch, c.leader, c.reason) for c in queued] == [
        (Role.STARTING, Role.STANDBY, 4, "", "following b"),
        (Role.STANDBY, Role.PRIMARY, 5, "a", "won")]


@pytest.mark.parametrize(
    ("kind", "message"),
    [("missing", "no such file"), ("directory", "not a regular file"),
     ("plain", "not executable")],
)
def test_check_program_rejects(tmp_path: Path, kind: str, message: str) -> None:
    """Only an executable regular file passes the configuration check."""
    path = tmp_path / kind
    if kind == "directory":
        path.mkdir()
    elif kind == "plain":
        path.write_text("#!/bin/sh\n")
        path.chmod(0o644)
    with pytest.raises(ValueError, match=message):
        check_program(path)


def test_check_program_accepts_executable(tmp_path: Path) -> None:
    """An executable script passes."""
    check_program(script(tmp_path, "exit 0\n"))
