"""The resource room's errors, shared by every module of it (a leaf: imports nothing)."""

from __future__ import annotations


class VipError(Exception):
    """A configuration or kernel problem, worded for one line to an operator."""


class VipPermissionError(VipError):
    """The process lacks CAP_NET_ADMIN or CAP_NET_RAW."""
