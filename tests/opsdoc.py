"""The shell blocks of docs/OPERATIONS.md, run by the tests as the guide prints them.

A block the tests run is introduced by ``<!-- test: NAME -->`` on the line before its
```` ```sh ```` fence; one they cannot run (it needs a booted systemd, say) by
``<!-- not run: REASON -->``. The tests run a block through bash after replacing the host
addresses and paths of the guide with their own (``subs``): nothing else in it changes.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "OPERATIONS.md"

_MARK = re.compile(r"^<!-- (test|not run): (.+?) -->$")
_FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(text: str | None = None) -> list[tuple[str, str, str]]:
    """Every fenced ``sh`` block as (kind, name or reason, body); kind is "" when unmarked."""
    lines = (GUIDE.read_text() if text is None else text).splitlines()
    found, index = [], 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        if fence.group(1) == "sh":
            mark = _MARK.match(lines[index - 1]) if index else None
            kind, label = (mark.group(1), mark.group(2)) if mark else ("", "")
            found.append((kind, label, "\n".join(lines[index + 1:end]) + "\n"))
        index = end + 1
    return found


def block(name: str) -> str:
    """The body of the block marked ``<!-- test: NAME -->``."""
    bodies = [body for kind, label, body in blocks() if (kind, label) == ("test", name)]
    assert len(bodies) == 1, f"docs/OPERATIONS.md has {len(bodies)} blocks named {name!r}"
    return bodies[0]


def substitute(text: str, subs: Mapping[str, str]) -> str:
    """Replace every key of ``subs`` at once, longest first, so no replacement is replaced."""
    if not subs:
        return text
    pattern = re.compile("|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True)))
    return pattern.sub(lambda m: subs[m.group()], text)


def run(names: list[str], subs: Mapping[str, str], env: Mapping[str, str] | None = None,
        path: list[Path] | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the named blocks, in order, in one bash with ``set -euo pipefail``.

    ``path`` goes before PATH (where the test's etcdctl or python3.11 is found).
    """
    script = "set -euo pipefail\n" + "".join(substitute(block(n), subs) for n in names)
    full_env = {**os.environ, **(env or {})}
    if path:
        full_env["PATH"] = os.pathsep.join([*map(str, path), full_env.get("PATH", "")])
    result = subprocess.run(["bash", "-c", script], env=full_env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, (
            f"blocks {names} exited {result.returncode}\n--- script\n{script}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result
