"""Counters of the resource IP's work, kept by the announcer, the prober and the reconciler.

A leaf, so each of them can count without importing the actuator that owns the counters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VipStats:
    """Counters for /metrics and status output."""

    announcements_sent: int = 0
    stale_holders_seen: int = 0
    last_announcement: float | None = None  # wall-clock time, for humans
    repairs: int = 0
