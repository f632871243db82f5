"""The one retry policy (sidecar/etcd/retry.py): what it retries, and its pauses."""

from __future__ import annotations

import asyncio

import pytest
import tenacity

from sidecar.etcd.errors import EtcdAccessDenied, EtcdError, EtcdUnavailable
from sidecar.etcd.retry import reconnect_policy, retry_policy


def attempts(policy: tenacity.AsyncRetrying, errors: list[EtcdError]) -> tuple[int, list[float]]:
    """Run ``policy`` over a body that raises ``errors`` in turn, then succeeds; return the
    attempts made and the pauses taken (no real sleeping)."""
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    policy.sleep = sleep  # type: ignore[method-assign]
    made = 0

    async def body() -> None:
        nonlocal made
        async for attempt in policy:
            with attempt:
                made += 1
                if errors:
                    raise errors.pop(0)

    asyncio.run(body())
    return made, pauses


def test_calls_retry_transient_errors_with_growing_pauses() -> None:
    made, pauses = attempts(retry_policy("t", jitter=0.0),
                            [EtcdUnavailable("down") for _ in range(6)])
    assert made == 7
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]


def test_calls_do_not_retry_an_error_that_retrying_cannot_mend() -> None:
    with pytest.raises(EtcdAccessDenied):
        attempts(retry_policy("t"), [EtcdAccessDenied("no")])


def test_a_steady_pause_is_a_parameter_of_the_same_policy() -> None:
    _, pauses = attempts(retry_policy("t", first_wait=0.05, max_wait=0.05, jitter=0.0),
                         [EtcdUnavailable("down") for _ in range(3)])
    assert pauses == [0.05, 0.05, 0.05]


def test_watches_reconnect_after_any_etcd_error_with_a_steady_pause() -> None:
    errors: list[EtcdError] = [EtcdUnavailable("stream ended"), EtcdAccessDenied("token"),
                               EtcdUnavailable("again")]
    made, pauses = attempts(reconnect_policy("t"), errors)
    assert made == 4
    assert pauses == [0.2, 0.2, 0.2]


def test_the_retry_callback_sees_each_error() -> None:
    seen: list[BaseException] = []
    attempts(reconnect_policy("t", on_retry=seen.append), [EtcdUnavailable("a")])
    assert [str(e) for e in seen] == ["a"]
