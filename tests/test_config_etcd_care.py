"""The compaction settings: defaults, the values taken, and bad values refused by name."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from sidecar import config


def test_compaction_defaults() -> None:
    """Every 300 s, 10,000 revisions kept, at once after 64 MiB more in use."""
    settings = config.build({"node_id": "a"})
    assert (settings.compaction_interval, settings.compaction_keep,
            settings.compaction_max_bytes) == (300.0, 10_000, 64 << 20)


@pytest.mark.parametrize("raw", [
    {"compaction_interval": 0}, {"compaction_interval": 1}, {"compaction_keep": 0},
    {"compaction_max_bytes": 1 << 20}, {"compaction_max_bytes": 1 << 30}])
def test_compaction_bounds_are_taken(raw: dict[str, Any]) -> None:
    """0 turns compaction off; the edges of each range are valid."""
    built = config.build({"node_id": "a", **raw})
    name, value = next(iter(raw.items()))
    assert getattr(built, name) == value


@pytest.mark.parametrize(("raw", "setting"), [
    ({"compaction_interval": -1}, "compaction_interval"),
    ({"compaction_interval": 8 * 86400}, "compaction_interval"),
    ({"compaction_keep": -1}, "compaction_keep"),
    ({"compaction_keep": 2.5}, "compaction_keep"),
    ({"compaction_max_bytes": 1000}, "compaction_max_bytes"),
    ({"compaction_max_bytes": (1 << 30) + 1}, "compaction_max_bytes"),
])
def test_bad_compaction_values_name_the_setting(raw: dict[str, Any], setting: str) -> None:
    """Out of range or not a number: ConfigError naming the setting."""
    with pytest.raises(config.ConfigError) as info:
        config.build({"node_id": "a", **raw})
    assert info.value.setting == setting


def test_cli_exits_2_naming_compaction_max_bytes() -> None:
    """`vsm-sidecar run --compaction-max-bytes 5`: exit 2, one line naming the setting."""
    result = subprocess.run([sys.executable, "-m", "sidecar", "run", "--compaction-max-bytes",
                             "5"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vsm-sidecar: error: setting 'compaction_max_bytes': must be 1048576-1073741824 bytes "
        "(1 MiB-1 GiB, at most 1/8 of etcd's quota; got 5)"]
