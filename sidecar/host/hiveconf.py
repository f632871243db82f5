"""A reader for ThinLinc's hiveconf files (``/opt/thinlinc/etc/conf.d/*.hconf``), read only.

The format, as ThinLinc writes it and ``tl-config`` edits it::

    # a comment
    [/vsmserver/HA]
    # Enable HA operations by setting this to 1.
    enabled=1
    nodes=tl-a.example.com tl-b.example.com

A ``[/folder/path]`` line opens a folder; ``key=value`` lines set parameters in it (white space
around the key and the value is not part of them; a value may be empty); ``#`` starts a comment
line; blank lines are ignored. A ``%`` line is a hiveconf directive (``%include``, ``%mount``):
the files in conf.d are mounted by ThinLinc's root hive, which this reader stands in for by
reading every ``*.hconf`` in the folder in name order, a later file's value winning. No
ThinLinc library is used: none is published outside ThinLinc, and the sidecar reads, never
writes, these files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_SECTION = re.compile(r"^\[\s*(/[^\]]*?)\s*\]$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class HiveconfError(ValueError):
    """A line that is neither a section, a parameter, a comment nor blank."""


@dataclass(frozen=True, slots=True)
class Value:
    text: str
    source: str  # "file:line", for messages that point the admin at the line


@dataclass
class Hive:
    """Parameters by full path (``/vsmserver/HA/enabled``)."""

    values: dict[str, Value] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def get(self, path: str) -> str | None:
        value = self.values.get(path)
        return value.text if value is not None else None

    def where(self, path: str) -> str:
        value = self.values.get(path)
        return value.source if value is not None else "not set"

    def boolean(self, path: str) -> bool | None:
        """True or False as hiveconf reads it, None when unset; HiveconfError for neither."""
        text = self.get(path)
        if text is None:
            return None
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise HiveconfError(f"{path} = {text!r} ({self.where(path)}) is not a boolean")

    def words(self, path: str) -> list[str]:
        """A white-space (or comma) separated list parameter; [] when unset or empty."""
        return (self.get(path) or "").replace(",", " ").split()

    def has_folder(self, folder: str) -> bool:
        prefix = folder.rstrip("/") + "/"
        return any(p.startswith(prefix) for p in self.values)


def parse(text: str, source: str = "<text>", hive: Hive | None = None) -> Hive:
    """Read one file's text into ``hive`` (a new one by default)."""
    hive = hive if hive is not None else Hive()
    folder = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "%")):
            continue
        section = _SECTION.match(line)
        if section:
            folder = "/" + section.group(1).strip("/")
            continue
        key, equals, value = line.partition("=")
        key = key.strip()
        if not equals or not key or "/" in key or " " in key:
            raise HiveconfError(f"{source}:{number}: not a [/folder], key=value or # comment "
                                f"line: {raw.strip()[:60]!r}")
        path = (folder.rstrip("/") + "/" + key) if folder else "/" + key
        hive.values[path] = Value(value.strip(), f"{source}:{number}")
    return hive


def read_dir(folder: Path) -> Hive:
    """Every ``*.hconf`` in ``folder``, in name order. OSError when the folder is unreadable;
    HiveconfError for a line that is not hiveconf."""
    hive = Hive()
    for path in sorted(Path(folder).glob("*.hconf")):
        parse(path.read_text(encoding="utf-8", errors="replace"), str(path), hive)
        hive.files.append(path)
    return hive
