"""The one retry policy for etcd calls and watch reconnects."""

from __future__ import annotations

import structlog
import tenacity

from .errors import EtcdError

log = structlog.get_logger(__name__)


def retry_policy(what: str, *, max_wait: float = 2.0) -> tenacity.AsyncRetrying:
    """The one retry policy: transient etcd errors, jittered exponential backoff, forever.

    Callers that must give up at a deadline wrap the retrying block in ``asyncio.timeout``.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("etcd_retry", what=what, attempt=state.attempt_number, error=str(exc),
                    retry_in=round(state.upcoming_sleep, 2))

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, EtcdError) and e.transient),
        # 0.1 s, 0.2 s, 0.4 s ... up to max_wait, each plus up to 0.1 s of jitter.
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=max_wait, jitter=0.1),
        before_sleep=before_sleep,
        reraise=True,
    )
