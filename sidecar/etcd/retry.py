"""The one retry policy for etcd calls and watch reconnects.

Every etcd call that may fail for a while (an etcd leader election, a member down, a token that
expired) is retried through :func:`retry_policy`, and every watch that must be opened again
after its stream broke through :func:`reconnect_policy`, the same policy with a steady pause.
Both retry forever: a caller that must give up at a deadline wraps the retrying block in
``asyncio.timeout``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
import tenacity

from .errors import EtcdError

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A call is retried after 0.1 s, 0.2 s, 0.4 s ... up to MAX_WAIT, each plus up to JITTER.
FIRST_WAIT = 0.1
MAX_WAIT = 2.0
JITTER = 0.1
# A broken watch is opened again after this pause, whatever the stream did before it broke:
# the watch is how a node learns of a new leader, so it never backs off further.
RECONNECT_WAIT = 0.2
# A loop that handles an etcd error by starting over (the node's lifecycle, its removal of an
# unowned leader key) pauses this long first: it never spins against a refusing etcd.
ERROR_PAUSE = 0.5


def transient(exc: BaseException) -> bool:
    """An etcd error that retrying can help (not a refused login, not a lost lease)."""
    return isinstance(exc, EtcdError) and exc.transient


def any_etcd_error(exc: BaseException) -> bool:
    """Every etcd error: a watch is opened again after any of them (a fresh client
    authenticates anew, so even a refused token may pass next time)."""
    return isinstance(exc, EtcdError)


def quiet(_: BaseException) -> None:
    """``on_retry`` for a caller that reports the failure its own way, or not at all."""


def retry_policy(what: str, *, max_wait: float = MAX_WAIT, first_wait: float = FIRST_WAIT,
                 jitter: float = JITTER,
                 retry_if: Callable[[BaseException], bool] = transient,
                 on_retry: Callable[[BaseException], None] | None = None,
                 ) -> tenacity.AsyncRetrying:
    """The one retry policy: etcd errors (transient ones unless ``retry_if`` says otherwise),
    jittered exponential backoff from ``first_wait`` to ``max_wait``, forever.

    Each retry is logged as ``etcd_retry``, or handed to ``on_retry`` instead.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and exc is not None:
            on_retry(exc)
            return
        log.warning("etcd_retry", what=what, attempt=state.attempt_number, error=str(exc),
                    retry_in=round(state.upcoming_sleep, 2))

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(retry_if),
        wait=tenacity.wait_exponential_jitter(multiplier=first_wait, max=max_wait,
                                              jitter=jitter),
        before_sleep=before_sleep,
        reraise=True,
    )


def reconnect_policy(what: str, *, wait: float = RECONNECT_WAIT,
                     on_retry: Callable[[BaseException], None] | None = None,
                     ) -> tenacity.AsyncRetrying:
    """The retry policy for a watch: every etcd error, after a steady ``wait`` (no jitter, no
    growth: a watch that ran for days and broke is opened again as soon as a fresh one)."""
    return retry_policy(what, first_wait=wait, max_wait=wait, jitter=0.0,
                        retry_if=any_etcd_error, on_retry=on_retry)


async def retried(what: str, call: Callable[[], Awaitable[T]], *,
                  max_wait: float = MAX_WAIT) -> T:
    """``call()``'s result, retried under :func:`retry_policy` until it succeeds."""
    async for attempt in retry_policy(what, max_wait=max_wait):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # the policy retries forever or re-raises
