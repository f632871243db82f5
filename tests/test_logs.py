"""The log is one JSON object per line, whoever writes it: our structlog events, and other
libraries' standard ``logging`` (grpc's Python side, asyncio, tenacity)."""

from __future__ import annotations

import json
import subprocess
import sys

PROGRAM = """
import logging
from sidecar import logs
logs.configure("json", "info")
logs.set_status(node="a", role="PRIMARY", epoch=7)
import structlog
structlog.get_logger("sidecar.x").info("ours", n=1)
logging.getLogger("grpc._server").warning("Exception calling application: %s", "boom")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("asyncio").exception("Task exception was never retrieved")
logging.getLogger("tenacity").debug("below the level: not written")
"""


def test_standard_logging_lines_are_json_with_the_node_fields() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          timeout=30, check=True)
    lines = done.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [e["event"] for e in events] == [
        "ours", "Exception calling application: boom", "Task exception was never retrieved"]
    grpc_line, asyncio_line = events[1], events[2]
    assert (grpc_line["logger"], grpc_line["level"]) == ("grpc._server", "warning")
    assert {k: grpc_line[k] for k in ("node", "role", "epoch")} == {
        "node": "a", "role": "PRIMARY", "epoch": 7}
    assert asyncio_line["level"] == "error"
    assert "ZeroDivisionError" in asyncio_line["exception"]
