"""The VSM server health check (sidecar/health.py) against real sockets and processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from sidecar.host.health import HealthCheck
from sidecar.host.targets import CommandTarget, TcpTarget, parse_target

from ..processes import alive

T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        async with asyncio.timeout(10):
            return await body()

    return asyncio.run(main())


async def _ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()



def test_tcp_check_rises_falls_and_rises_again() -> None:
    """UNKNOWN -> HEALTHY after `rise` connects; UNHEALTHY after `fall` refusals once the
    listener closes; HEALTHY again after `rise` connects to a new listener."""
    changes: list[tuple[bool, str]] = []

    async def body() -> list[bool | None]:
        server = await asyncio.start_server(_ignore, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        check = HealthCheck(TcpTarget("127.0.0.1", port), interval=0.01, timeout=1,
                            rise=2, fall=3)
        check.on_change.append(lambda healthy, reason: changes.append((healthy, reason)))
        seen = [check.healthy]
        seen += [await check.check_once() for _ in range(2)]
        server.close()
        await server.wait_closed()
        seen += [await check.check_once() for _ in range(3)]
        server = await asyncio.start_server(_ignore, "127.0.0.1", port)
        seen += [await check.check_once() for _ in range(2)]
        server.close()
        await server.wait_closed()
        return seen

    assert run(body) == [None, None, True, True, True, False, False, True]
    assert [healthy for healthy, _ in changes] == [True, False, True]
    assert "refused" in changes[1][1]


def test_wait_change_wakes_on_the_next_verdict() -> None:
    """run() probes on its own; wait_change() returns the new verdict and changed_at moves."""

    async def body() -> tuple[bool, bool, float]:
        server = await asyncio.start_server(_ignore, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        check = HealthCheck(TcpTarget("127.0.0.1", port), interval=0.02, timeout=1,
                            rise=1, fall=2)
        before = check.changed_at
        task = asyncio.create_task(check.run())
        try:
            first = await check.wait_change()
            server.close()
            await server.wait_closed()
            second = await check.wait_change()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return first, second, check.changed_at - before

    first, second, moved = run(body)
    assert (first, second) == (True, False)
    assert moved > 0


def test_command_check_true_and_false() -> None:
    """Exit status 0 is healthy; anything else is unhealthy, with the output as the reason."""

    async def body() -> tuple[bool | None, bool | None, str]:
        good = HealthCheck(CommandTarget(("true",)), interval=1, timeout=2, rise=1, fall=1)
        bad = HealthCheck(CommandTarget(("sh", "-c", "echo vsmserver is down; exit 3")),
                          interval=1, timeout=2, rise=1, fall=1)
        return await good.check_once(), await bad.check_once(), bad.reason

    assert run(body) == (True, False, "exit status 3: vsmserver is down")
    assert run(lambda: HealthCheck(CommandTarget(("false",)), 1, 2, 1, 1).check_once()) is False


def test_hanging_command_is_killed_at_the_timeout(tmp_path: Path) -> None:
    """A command that does not answer within the timeout fails, and its whole process group
    (here a shell and the sleep it started) is killed."""
    pids = tmp_path / "pids"
    target = CommandTarget(("sh", "-c", f"sleep 30 & echo $$ $! > {pids}; wait"))

    async def body() -> tuple[bool | None, str, float]:
        check = HealthCheck(target, interval=1, timeout=0.3, rise=1, fall=1)
        started = time.monotonic()
        verdict = await check.check_once()
        return verdict, check.reason, time.monotonic() - started

    verdict, reason, elapsed = run(body)
    assert (verdict, reason) == (False, "no answer within 0.3s")
    assert elapsed < 1.5
    assert [alive(int(pid)) for pid in pids.read_text().split()] == [False, False]


def test_rise_and_fall_must_be_positive() -> None:
    """A zero threshold is a configuration error."""
    with pytest.raises(ValueError, match="at least 1"):
        HealthCheck(TcpTarget("127.0.0.1", 9000), interval=1, timeout=1, rise=0, fall=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:9001", TcpTarget("127.0.0.1", 9001)),
        ("tcp:10.0.0.5:9002", TcpTarget("10.0.0.5", 9002)),
        ("tcp:vsm.example.com", TcpTarget("vsm.example.com", 9000)),
        ("tcp:[::1]:9003", TcpTarget("::1", 9003)),
        ("tcp:[::1]", TcpTarget("::1", 9000)),
        ("tcp:", TcpTarget("127.0.0.1", 9000)),
        (" tcp:localhost:9000 ", TcpTarget("localhost", 9000)),
        ("exec:true", CommandTarget(("true",))),
        ("exec:/bin/sh -c 'exit 0'", CommandTarget(("/bin/sh", "-c", "exit 0"))),
    ],
)
def test_parse_target_accepts(text: str, expected: TcpTarget | CommandTarget) -> None:
    """tcp: and exec: targets parse into their parts; the VSM server's port is the default."""
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9000", "expected tcp:HOST:PORT"),
        ("http://localhost:9000", "expected tcp:HOST:PORT"),
        ("tcp:localhost:0", "port must be 1-65535"),
        ("tcp:localhost:65536", "port must be 1-65535"),
        ("tcp:localhost:http", "port must be 1-65535"),
        ("tcp:localhost:\u0663", "port must be 1-65535"),  # an Arabic-Indic digit three
        ("exec:", "no command"),
        ("exec:/nonexistent/check-vsm", "not an executable command"),
        ("exec:sh -c 'unterminated", "No closing quotation"),
    ],
)
def test_parse_target_rejects(text: str, message: str) -> None:
    """Anything else is a ValueError that names the problem."""
    with pytest.raises(ValueError, match=message):
        parse_target(text)


def test_target_str_round_trips() -> None:
    """str() of a target is text that parses back to it (used in logs and status)."""
    for target in (TcpTarget("::1", 9000), TcpTarget("127.0.0.1", 9001),
                   CommandTarget(("sh", "-c", "exit 0"))):
        assert parse_target(str(target)) == target
