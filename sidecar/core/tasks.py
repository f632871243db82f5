"""Tasks that live as long as their caller: the first one to end, for any reason, ends them all.

Why not :class:`asyncio.TaskGroup`, which STYLE.md would otherwise prefer:

* A child that ends by cancellation (or simply returns) is normal to a TaskGroup. For the tasks
  of a sidecar - the keepalive, the leadership loop, the member record - there is no normal end:
  one that stops while the others go on is a half-alive node that reports healthy and will never
  take over. Here any end is an error the caller hears about.
* On CPython 3.11, when a child raises, the TaskGroup cancels the task that runs it and, when the
  ``async with`` body had already finished, never takes that cancellation back: the task stays
  marked (``Task.cancelling() == 1``) for the rest of its life. Up to 3.11.2 - Debian 12's own
  Python - :func:`asyncio.timeout` then turns its expiry into ``CancelledError`` instead of
  ``TimeoutError``, which silently ended the node's leadership loop after its first handover.
  This helper never cancels its caller, so the caller's cancellation count stays its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any


class TaskEnded(Exception):
    """A task that should have run until it was cancelled by its owner ended on its own."""

    def __init__(self, name: str, how: str) -> None:
        super().__init__(f"task {name!r} {how}")
        self.name = name


async def supervise(coros: Mapping[str, Coroutine[Any, Any, object]], *,
                    until: asyncio.Event | None = None) -> None:
    """Run the coroutines as named tasks until the first ends, or until ``until`` is set.

    Whatever happens, every task is cancelled and awaited before this returns or raises. When
    ``until`` is set first, this returns. When a task ends first, this raises: the task's own
    exception, or :class:`TaskEnded` if it returned or was cancelled by someone else. When the
    caller is cancelled, the tasks are cancelled with it and ``CancelledError`` propagates.
    """
    tasks = [asyncio.create_task(coro, name=name) for name, coro in coros.items()]
    stop = asyncio.create_task(until.wait(), name="until") if until is not None else None
    watched = [*tasks, stop] if stop is not None else tasks
    try:
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel_and_wait(watched)
    ended = [task for task in tasks if task in done]  # in the order given: deterministic
    if not ended:
        return  # ``until`` was set
    first = ended[0]
    if first.cancelled():
        raise TaskEnded(first.get_name(), "was cancelled")
    error = first.exception()
    if error is not None:
        raise error
    raise TaskEnded(first.get_name(), "returned")


async def _cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until every one has ended, even if the caller is cancelled
    again meanwhile (it then hears of that afterwards): no task outlives its supervisor."""
    for task in tasks:
        task.cancel()
    interrupted = False
    while pending := [task for task in tasks if not task.done()]:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            interrupted = True
    for task in tasks:  # mark every outcome as seen; the caller judges the first one only
        if not task.cancelled():
            task.exception()
    if interrupted:
        raise asyncio.CancelledError
