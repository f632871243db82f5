"""This host's groups, by name or number (``grpc_socket_group``).

A leaf: the settings check (:mod:`sidecar.configcheck`) looks the group up before start-up and
the gRPC API (:mod:`sidecar.endpoints.grpc_access`) gives its socket to it.
"""

from __future__ import annotations

import grp


def group_id(group: str) -> int:
    """A group given by name or number (a number needs no name); KeyError for an unknown
    name."""
    if group.isascii() and group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid
