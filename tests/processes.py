"""Processes as /proc shows them: whether one still runs, and which children of this one do."""

from __future__ import annotations

import os
from pathlib import Path


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """The state letter and parent pid of ``pid``, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = stat.rpartition(")")[2].split()[:2]  # after the command name, which may hold ")"
    return state, int(ppid)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting for its reaper counts as dead)."""
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def running_children() -> list[tuple[int, str]]:
    """This process's children that still run (not zombies): pid and command line."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        found = _state_and_parent(int(entry.name))
        if found is None or found[1] != os.getpid() or found[0] == "Z":
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        children.append((int(entry.name), command.strip()))
    return children
