"""The demo's signal handling: SIGTERM and SIGHUP unwind like Ctrl-C; cleanup ignores them."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, or SIGHUP (the terminal closed): unwinds like Ctrl-C, so one cleanup serves all.

    The children run in sessions of their own and would outlive a demo killed by the default
    action of either signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    def unwind(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = _set_handlers({signal.SIGTERM: unwind, signal.SIGHUP: unwind})
    try:
        yield
    finally:
        _set_handlers(previous)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Cleanup must run to its end: a second Ctrl-C there would leave etcd running."""
    ignored = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = _set_handlers(dict.fromkeys(ignored, signal.SIG_IGN))
    try:
        yield
    finally:
        _set_handlers(previous)


Handler = Callable[[int, FrameType | None], Any] | int | None


def _set_handlers(handlers: dict[signal.Signals, Handler]) -> dict[signal.Signals, Handler]:
    """Install handlers and return the previous ones; a no-op off the main thread (signals
    can only be handled there, and then the caller handles its own)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
