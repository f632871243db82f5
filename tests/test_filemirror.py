"""The file adapter end to end: a stock VSM server's session file follows the primary."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sidecar.fileadapter import atomic_write

from .netns_lab import wait_for
from .sidecars import Pair

pytestmark = [pytest.mark.etcd]


def files(pair: Pair) -> dict[str, Path]:
    paths = {}
    for node_id in ("a", "b"):
        folder = pair.workdir / f"vsm-{node_id}"
        folder.mkdir(exist_ok=True)
        paths[node_id] = folder / "sessions"
    return paths


def start(pair: Pair, paths: dict[str, Path]) -> None:
    for node_id in ("a", "b"):
        pair.start_one(node_id, ttl=2, extra_args=[
            "--vsm-sessions-file", str(paths[node_id]), "--vsm-file-check-interval", "0.5"])


def content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def test_primary_file_reaches_the_standby_and_flows_back_after_failover(pair: Pair) -> None:
    """A change of the file on the primary appears on the standby's disk (same bytes, written
    atomically with the old file's mode); after kill -9 of the primary the new primary's
    changes reach the restarted old primary."""
    paths = files(pair)
    paths["b"].write_bytes(b"old standby content")
    os.chmod(paths["b"], 0o640)
    start(pair, paths)
    primary, standby = pair.wait_split()
    assert primary.node_id == "a"
    first = b"session database v1\n" * 100
    atomic_write(paths["a"], first)
    wait_for(lambda: content(paths["b"]) == first, timeout=5)
    assert paths["b"].stat().st_mode & 0o777 == 0o640
    primary.kill()
    standby.wait_role("PRIMARY", timeout=6)
    second = b"written by the VSM server on b\n" * 50
    paths["b"].write_bytes(second)  # in place, as a plain write would
    primary.start()
    primary.wait_role("STANDBY")
    wait_for(lambda: content(paths["a"]) == second, timeout=5)


def test_promotion_makes_the_file_current_before_the_role_is_primary(pair: Pair) -> None:
    """Rule 5 for the file: when the standby becomes PRIMARY its file already holds etcd's
    copy, even if its disk had something else (written while its watch was not looking)."""
    paths = files(pair)
    start(pair, paths)
    primary, standby = pair.wait_split()
    data = b"x" * 1_200_000  # three 512 KiB chunks in one transaction
    atomic_write(paths[primary.node_id], data)
    wait_for(lambda: content(paths[standby.node_id]) == data, timeout=5)
    standby.stop()  # paused: it cannot notice the next change
    paths[standby.node_id].write_bytes(b"stale local content")
    standby.cont()
    recorder = pair.recorder(standby)
    sent = time.monotonic()
    primary.terminate()
    recorder.wait_role("PRIMARY", timeout=5, after=sent)
    assert content(paths[standby.node_id]) == data
