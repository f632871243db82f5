"""The demo's live view: the header, the live tables and the scene log, redrawn in place on a
terminal and appended anywhere else."""

from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import TextIO

from .lab import Lab
from .table import (
    MEMBER_HEADER,
    MemberProbe,
    NodeRow,
    VipProbe,
    node_header,
    node_row,
    paint,
    table,
)

REFRESH_S = 0.25  # the live table: about four times a second
PROGRESS_EVERY_S = 5.0  # off a terminal: a progress line when nothing else was printed
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _rows(line: str, width: int) -> int:
    """Terminal rows a line takes once wrapped."""
    return max(1, -(-len(_ANSI.sub("", line)) // width))


def _newest(lines: Sequence[str], rows: int, width: int) -> list[str]:
    """The newest lines that fit in ``rows`` terminal rows (at least the last three)."""
    kept: list[str] = []
    for line in reversed(lines):
        rows -= _rows(line, width)
        if rows < 0 and len(kept) >= 3:
            break
        kept.append(line)
    return kept[::-1]


def _erase_rest(line: str, width: int) -> str:
    # Clear what an older, longer line left behind. Not after a line that fills its last row
    # exactly: there the cursor waits on the last column and the erase would take that column.
    length = len(_ANSI.sub("", line))
    return line if length and length % width == 0 else line + "\x1b[K"


def _style_event(line: str) -> str:
    if line.startswith("Scene "):
        return paint(line, "1", True)
    if line.startswith("  => "):
        return paint(line, "32", True)
    return paint(line, "1;31", True) if line.startswith("FAILED") else line


class LiveView:
    """Header, live tables and scene log.

    On a terminal the whole screen is redrawn in place. Anywhere else (a CI log, a pipe) lines
    are only appended: the tables when something in them changed, else a progress line now
    and then, so the log stays readable.
    """

    def __init__(self, lab: Lab, tty: bool, started: float) -> None:
        self.lab = lab
        self.tty = tty
        self.started = started
        self.header: list[str] = []
        self.events: list[str] = []
        self.progress = ""
        self._members = MemberProbe(lab.etcd)
        self._vip = VipProbe(lab)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_key: object = None
        self._last_print = float("-inf")

    def add_header(self, *lines: str) -> None:
        self._add(self.header, lines)

    def say(self, line: str) -> None:
        self._add(self.events, [line])

    def _add(self, target: list[str], lines: Sequence[str]) -> None:
        with self._lock:
            target.extend(lines)
            drawn = self.tty and self._thread is not None
            if not drawn:
                emit("\n".join(lines))
        if drawn:
            self._wake.set()

    def start(self) -> None:
        if self.tty:
            emit("\x1b[?25l\x1b[2J", end="")  # hide the cursor, clear the screen
        self._thread = threading.Thread(target=self._loop, name="demo-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing; the last screen stays, and later lines are printed below it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join(5)
        if self.tty:
            emit("\x1b[?25h", end="")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._vip.refresh()
                nodes = [node_row(self.lab, node, self._vip.holders) for node in self.lab.nodes]
                members = self._members.rows()
                if self.tty:
                    self._redraw(nodes, members)
                else:
                    self._append(nodes, members)
            except Exception as exc:  # a display glitch must not end the demo
                self.progress = f"(display error: {exc!r})"
            self._wake.wait(REFRESH_S)
            self._wake.clear()

    def _tables(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> list[str]:
        client_line = self._vip.line(self.tty)
        return [
            *table(node_header(self.lab), [row.cells() for row in nodes], self.tty),
            *([] if client_line is None else [client_line]),
            "",
            *table(MEMBER_HEADER, members, self.tty),
        ]

    def _footer(self) -> str:
        return f"[{time.monotonic() - self.started:6.1f} s] {self.progress}"

    def _redraw(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> None:
        width, height = shutil.get_terminal_size()
        with self._lock:
            top = [*self.header, "", *self._tables(nodes, members), ""]
            bottom = ["", self._footer()]
            # Long lines wrap rather than being cut (a cut command cannot be copied), so the
            # budget is in rows; the newest scene lines win when the terminal is too short.
            room = height - 1 - sum(_rows(line, width) for line in top + bottom)
            events = [_style_event(line) for line in _newest(self.events, room, width)]
            screen = "".join(_erase_rest(line, width) + "\n" for line in top + events + bottom)
        # Home, overwrite every line, clear what is left below: no flicker.
        emit(f"\x1b[H{screen}\x1b[J", end="")

    def _append(self, nodes: list[NodeRow], members: list[tuple[str, ...]]) -> None:
        key = ([row.key for row in nodes], members, self._vip.client)
        now = time.monotonic()
        if key != self._last_key:
            lines = [self._footer(), *self._tables(nodes, members)]
        elif now - self._last_print >= PROGRESS_EVERY_S:
            lines = [self._footer()]
        else:
            return
        self._last_key, self._last_print = key, now
        with self._lock:
            emit("\n".join(lines))


def emit(text: str, end: str = "\n", file: TextIO | None = None) -> None:
    """Print and flush; a terminal that is gone (SIGHUP, a closed pipe) must not stop cleanup."""
    with suppress(OSError):
        print(text, end=end, file=file or sys.stdout, flush=True)
