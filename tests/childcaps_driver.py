"""Runs the sidecar's real hook runner and ``exec:`` health check once each, for
tests/host/test_childcaps.py, which starts it as another user with ambient capabilities.

``python -m tests.childcaps_driver DIR`` runs a role hook and a health check that each copy
their own /proc/self/status to DIR/hook.status and DIR/health.status, and writes this
process' status before and after to DIR/parent-before.status and DIR/parent-after.status.
Exits 1 when either program did not succeed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sidecar.core.roles import Role
from sidecar.host.health import HealthCheck
from sidecar.host.hooks import HookRunner
from sidecar.host.targets import CommandTarget

# What a child copies: its own status, as the kernel gave it after execve.
COPY_STATUS = 'exec cat /proc/self/status > "$0"'
# Capabilities belong to a thread: the event loop's, which starts the programs.
OWN_STATUS = Path("/proc/thread-self/status")


async def start_programs(out: Path, hook: Path) -> bool:
    """One role hook call and one health check; whether both succeeded."""
    runner = HookRunner(hook, timeout=10, node_id="caps")
    worker = asyncio.create_task(runner.run())
    runner.notify(Role.STANDBY, Role.PRIMARY, 1, "caps", "test")
    await runner.idle()
    worker.cancel()
    check = HealthCheck(CommandTarget(("sh", "-c", COPY_STATUS, str(out / "health.status"))),
                        interval=1, timeout=10, rise=1, fall=1)
    healthy = await check.check_once()
    print(f"hook successes={runner.successes} health={healthy} reason={check.reason}")
    return runner.successes == 1 and healthy is True


def main(out: Path) -> int:
    hook = out / "hook.sh"
    hook.write_text(f"#!/bin/sh\n{COPY_STATUS.replace('$0', str(out / 'hook.status'))}\n")
    hook.chmod(0o755)
    (out / "parent-before.status").write_text(OWN_STATUS.read_text())
    ok = asyncio.run(start_programs(out, hook))
    (out / "parent-after.status").write_text(OWN_STATUS.read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
