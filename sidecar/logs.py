"""Logging: structlog, one JSON object per line off a terminal, readable lines on one.

Every line carries the node id, its role and its epoch. Those live in one process-wide snapshot
that the node replaces on each role change, rather than in context variables: asyncio tasks copy
their context when they are created, so a role bound that way would be stale in every task
started before the change (and absent in the etcd threads).
"""

from __future__ import annotations

import logging
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


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Set up structlog for the process; ``fmt`` is json, console or auto."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_status,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
