"""What an administrator installs for on-primary mode: the polkit rule and the sudoers line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULE = DEPLOY / "polkit" / "50-vsm-sidecar.rules"
SUDOERS = DEPLOY / "sudoers" / "vsm-sidecar"

# Runs the rule file as polkitd would (it is JavaScript) against one request and prints the
# verdict: polkit's Result values are strings, NOT_HANDLED included.
HARNESS = """
const fs = require("fs");
const rules = [];
const polkit = {addRule: (f) => rules.push(f),
                Result: {YES: "yes", NO: "no", NOT_HANDLED: null}};
new Function("polkit", fs.readFileSync(process.argv[2], "utf8"))(polkit);
const [id, user, unit, verb] = process.argv.slice(3);
const details = {unit: unit, verb: verb};
const action = {id: id, lookup: (k) => details[k]};
const subject = {user: user};
let verdict = null;
for (const rule of rules) { verdict = rule(action, subject); if (verdict) break; }
console.log(JSON.stringify(verdict));
"""

MANAGE = "org.freedesktop.systemd1.manage-units"


def _missing(reason: str) -> None:
    """Skip where the tool is missing; under CI=true (where ./dev installs it) fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, where ./dev installs it)", pytrace=False)
    pytest.skip(reason)


def verdict(tmp_path: Path, action: str, user: str, unit: str, verb: str) -> str | None:
    node = shutil.which("node")
    if node is None:
        _missing("node (JavaScript) is not installed")
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    done = subprocess.run([node, str(harness), str(RULE), action, user, unit, verb],
                          capture_output=True, text=True, timeout=30, check=True)
    result: str | None = json.loads(done.stdout)
    return result


@pytest.mark.parametrize(("user", "unit", "verb", "expected"), [
    ("vsm-sidecar", "vsmserver.service", "start", "yes"),
    ("vsm-sidecar", "vsmserver.service", "stop", "yes"),
    ("vsm-sidecar", "vsmserver.service", "restart", None),
    ("vsm-sidecar", "vsmagent.service", "start", None),
    ("vsm-sidecar", "sshd.service", "stop", None),
    ("nobody", "vsmserver.service", "start", None),
])
def test_polkit_rule_grants_exactly_start_and_stop_of_vsmserver(
        tmp_path: Path, user: str, unit: str, verb: str, expected: str | None) -> None:
    """The rule lets the vsm-sidecar user start and stop vsmserver.service; any other unit,
    verb or user is left to polkit's defaults (not handled)."""
    assert verdict(tmp_path, MANAGE, user, unit, verb) == expected


def test_polkit_rule_ignores_other_actions(tmp_path: Path) -> None:
    """Another action (here: rebooting) is not handled by the rule, even for vsm-sidecar."""
    assert verdict(tmp_path, "org.freedesktop.login1.reboot", "vsm-sidecar",
                   "vsmserver.service", "start") is None


def test_rule_and_sudoers_name_the_units_user() -> None:
    """Both name the user the systemd unit runs the sidecar as, and only vsmserver.service."""
    unit = (DEPLOY / "systemd" / "vsm-sidecar.service").read_text()
    assert "User=vsm-sidecar" in unit.splitlines()
    assert 'subject.user !== "vsm-sidecar"' in RULE.read_text()
    grant = [line for line in SUDOERS.read_text().splitlines()
             if line and not line.startswith("#")]
    assert grant == ["vsm-sidecar ALL=(root) NOPASSWD: /usr/bin/systemctl start "
                     "vsmserver.service, /usr/bin/systemctl stop vsmserver.service"]


def test_sudoers_file_is_valid() -> None:
    """visudo accepts the sudoers file (where sudo is installed)."""
    visudo = shutil.which("visudo")
    if visudo is None:
        _missing("visudo (sudo) is not installed")
    subprocess.run([visudo, "-cf", str(SUDOERS)], check=True, capture_output=True, timeout=30)
