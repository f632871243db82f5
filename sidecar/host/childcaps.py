"""Programs the sidecar starts (role hooks, ``exec:`` health checks) get none of its
capabilities.

Under the systemd unit the sidecar holds CAP_NET_ADMIN and CAP_NET_RAW as *ambient*
capabilities, and the kernel hands the ambient set on at execve: a hook would run with both
permitted and effective. A program run by a non-root user gains at execve only its own file
capabilities plus, from its parent, the ambient set and the inheritable set (the latter masked
by the file's inheritable bits). Clearing both in the child before the exec therefore leaves
the program with nothing from us, while the sidecar keeps its own permitted and effective sets.

The child makes the change through util-linux's ``setpriv`` (Essential on Debian, part of
every RHEL), which clears its inheritable and ambient sets and then execs the program in place:
same pid, same session and process group, so a timed-out hook's group is still killed whole.
It needs only capget, capset and prctl, which the unit's ``SystemCallFilter=@system-service``
allows. Where there is nothing to pass on (the container, whose capabilities are file
capabilities; a user without any) programs start directly, without the extra exec (~1 ms).
Why not ``preexec_fn`` with prctl(2): capabilities belong to a thread and must change between
fork and exec, and preexec_fn runs Python code there, which CPython documents as unsafe in a
process with threads (the sidecar has gRPC's and the etcd executor's); it would also make
subprocess fork() where it now uses vfork().

A root sidecar (no supported deployment runs it so) keeps root's behaviour: the kernel gives a
root program every capability of the bounding set at exec whatever we clear, and a process of
uid 0 owns the system's files anyway, so its hooks run as root with them.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

STATUS = "/proc/thread-self/status"  # capabilities are per thread: the spawning thread's
SETPRIV_OPTIONS = ("--inh-caps=-all", "--ambient-caps=-all")


def inheritable_capabilities(status_path: str = STATUS) -> int | None:
    """The capability bits a program started now could get from this thread (its inheritable
    and ambient sets), or None when ``status_path`` cannot say."""
    bits = 0
    found = 0
    try:
        with open(status_path, encoding="ascii") as status:
            for line in status:
                if line.startswith(("CapInh:", "CapAmb:")):
                    bits |= int(line.split()[1], 16)
                    found += 1
    except (OSError, ValueError, IndexError):
        return None
    return bits if found == 2 else None


def without_capabilities(argv: Sequence[str], *, status_path: str = STATUS) -> list[str]:
    """``argv`` to start so that the program inherits no capability from this thread.

    Unchanged when there is nothing to pass on; otherwise run through ``setpriv``. Raises
    FileNotFoundError when ``argv[0]`` is not an executable command (as starting it directly
    would), or when ``setpriv`` is needed but missing: the program is then not started at all
    rather than started with the capabilities.
    """
    if inheritable_capabilities(status_path) == 0:
        return list(argv)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise FileNotFoundError(
            f"setpriv (util-linux) is not on PATH; it is needed to start {argv[0]} without "
            "the sidecar's capabilities")
    # setpriv reports a missing program only as its exit status 127: say it the way a direct
    # start would, so that callers keep one "cannot start" path.
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(f"no such executable: {argv[0]}")
    return [setpriv, *SETPRIV_OPTIONS, "--", *argv]
