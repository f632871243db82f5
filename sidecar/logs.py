"""Logging: structlog, one JSON object per line off a terminal, readable lines on one.

Every line carries the node id, its role and its epoch. Those live in one process-wide snapshot
that the node replaces on each role change, rather than in context variables: asyncio tasks copy
their context when they are created, so a role bound that way would be stale in every task
started before the change (and absent in the etcd threads).

Lines from other libraries' standard ``logging`` (grpc's Python side, asyncio, tenacity) go
through the same renderer, so the log stays one JSON object per line. gRPC's C core writes to
stderr by itself: :func:`quiet_grpc_core` keeps it to errors (its INFO lines, such as each
refused TLS handshake, are plain text).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_status: dict[str, Any] = {}


def set_status(**fields: Any) -> None:
    """Replace the node fields stamped on every log line (node, role, epoch)."""
    global _status
    _status = {**_status, **fields}


def _add_status(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in _status.items():
        event.setdefault(key, value)
    return event


def quiet_grpc_core() -> None:
    """Keep gRPC's C core to errors unless the operator chose otherwise (``GRPC_VERBOSITY``).
    Call before grpc first starts a channel or a server."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Set up structlog for the process, and standard logging through it; ``fmt`` is json,
    console or auto."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console
                     else structlog.processors.JSONRenderer())
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_status,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
