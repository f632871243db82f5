"""`status --all`'s view and table, from a GetRole answer (sidecar.client)."""

from __future__ import annotations

from typing import Any

from sidecar import client

STATUS: dict[str, Any] = {
    "node_id": "vsm-b", "cluster": "thinlinc", "leader_id": "vsm-a", "epoch": "7",
    "pause": {"by": "root@vsm-a", "reason": "upgrade", "since": "2024-05-01T12:00:00.125Z"},
    "members": [
        {"node_id": "vsm-b", "role": "ROLE_STANDBY", "epoch": "7", "health": "healthy",
         "applied_revision": "95", "has_resource_ip": True, "version": "0.2.0"},
        {"node_id": "vsm-a", "role": "ROLE_PRIMARY", "epoch": "7", "health": "healthy",
         "applied_revision": "100", "resource_ip_held": True, "has_resource_ip": True,
         "version": "0.1.0"},
    ],
}


def test_the_view_gives_each_member_its_lag_and_names_the_ip_holder() -> None:
    view = client.cluster_view(STATUS)
    assert [(r["node_id"], r["lag"], r["resource_ip"]) for r in view["members"]] == [
        ("vsm-a", 0, "held"), ("vsm-b", 5, "not held")]
    assert view["resource_ip_holders"] == ["vsm-a"]


def test_the_table_shows_the_pause_and_one_row_per_member() -> None:
    lines = client.format_cluster(client.cluster_view(STATUS)).splitlines()
    assert lines[0] == ("cluster thinlinc (as seen by vsm-b): primary vsm-a, epoch 7; "
                        "resource IP held by vsm-a")
    assert lines[1] == "paused: PAUSED by root@vsm-a since 2024-05-01T12:00:00.125Z, until " \
                       "resume: upgrade"
    assert lines[3].split() == ["vsm-a", "PRIMARY", "7", "healthy", "100", "0", "held", "0.1.0"]
    assert lines[4].split() == ["vsm-b", "STANDBY", "7", "healthy", "95", "5", "not", "held",
                                "0.2.0"]


def test_not_paused_says_no() -> None:
    assert client.pause_line(None) == "no"
