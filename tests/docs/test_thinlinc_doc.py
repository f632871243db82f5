"""docs/THINLINC.md's commands and settings, run or checked as written.

* The sidecar.toml block is a valid configuration (with the test etcd's endpoints).
* Every ``vsm-sidecar`` line parses with the real command line; check-config, check-host and
  restore-sessions-file run against a real etcd with that configuration.
* The ``tl-config`` lines, applied to ThinLinc-format files, are what check-host wants for each
  mode. (tl-config itself is ThinLinc's: it writes ``key=value`` under the folder's section, so
  the test appends exactly that to a file of its own.)
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import cli, config
from sidecar.host import checkhost, hiveconf
from sidecar.lab.localcluster import LocalEtcdCluster

DOC = Path(__file__).resolve().parents[2] / "docs" / "THINLINC.md"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "hiveconf"
DOC_CONFIG = "/etc/vsm-sidecar/sidecar.toml"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^\s*```{language}\n(.*?)^\s*```", DOC.read_text(), re.S | re.M)


def lines(prefix: str) -> list[str]:
    return [line.strip() for block in blocks("sh") for line in block.splitlines()
            if line.strip().startswith(prefix)]


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def doc_toml(tmp_path: Path, etcd: LocalEtcdCluster) -> Path:
    """The guide's sidecar.toml, pointed at the test etcd and a writable data folder."""
    (text,) = blocks("toml")
    endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints_arg.split(","))
    text = re.sub(r"^etcd_endpoints = .*$", f"etcd_endpoints = [{endpoints}]", text, flags=re.M)
    text = text.replace('"/var/lib/vsm-sidecar"', f'"{tmp_path / "data"}"')
    text = text.replace('"/var/lib/vsm/sessions"', f'"{tmp_path / "sessions"}"')
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return path


def run(command: str, toml: Path) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command.replace(DOC_CONFIG, str(toml)))
    assert argv[0] == "vsm-sidecar"
    return subprocess.run([sys.executable, "-m", "sidecar", *argv[1:]], capture_output=True,
                          text=True, timeout=60)


def test_every_vsm_sidecar_line_parses_with_the_real_command_line() -> None:
    """No guide command names a command or a flag the CLI does not have."""
    commands = lines("vsm-sidecar ")
    assert len(commands) >= 5
    parser = cli._parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])


@pytest.mark.etcd
def test_the_guides_configuration_and_commands_run(etcd_cluster: LocalEtcdCluster,
                                                   tmp_path: Path) -> None:
    """check-config accepts the guide's sidecar.toml; check-host prints one OK/WARN/FAIL line
    per check for it; restore-sessions-file, with no copy in etcd yet, exits 2 with one
    line, as the guide says."""
    toml = doc_toml(tmp_path, etcd_cluster)
    (check_config,) = [c for c in lines("vsm-sidecar check-config")]
    assert run(check_config, toml).returncode == 0
    (check_host,) = [c for c in lines("vsm-sidecar check-host")]
    result = run(check_host, toml)
    assert result.returncode in (0, 1), result.stderr
    assert all(re.match(r"^(OK|WARN|FAIL) ", line) for line in result.stdout.splitlines())
    assert "no *.hconf files in /opt/thinlinc/etc/conf.d" in result.stdout \
        or "ThinLinc HA sync" in result.stdout
    (restore,) = [c for c in lines("vsm-sidecar restore-sessions-file")]
    restore = restore.replace("/var/lib/vsm/sessions", str(tmp_path / "restored"))
    answer = run(restore, toml)
    assert answer.returncode == 2, answer.stderr
    assert answer.stderr.count("\n") == 1


def tl_config(folder: Path, command: str) -> None:
    """What ``tl-config /folder/key=value`` leaves in the hiveconf files."""
    (assignment,) = shlex.split(command)[1:]
    path, _, value = assignment.partition("=")
    folder_path, _, key = path.rpartition("/")
    with (folder / "zz-tl-config.hconf").open("a") as out:
        out.write(f"[{folder_path}]\n{key}={value}\n")


@pytest.mark.parametrize(("mode", "sections"), [
    ("replicated", ["5a.", "6."]), ("on-primary", ["5b.", "6."])])
def test_the_guides_tl_config_commands_satisfy_check_host(
        tmp_path: Path, mode: str, sections: list[str]) -> None:
    """Starting from ThinLinc's files with the other mode's settings, the guide's tl-config
    commands for a mode (and for the agents) make every hiveconf check pass on tl-a."""
    shutil.copytree(FIXTURES, tmp_path / "conf.d")
    conf = tmp_path / "conf.d"
    tl_config(conf, "tl-config /vsmserver/HA/enabled=" + ("0" if mode == "replicated" else "1"))
    tl_config(conf, "tl-config '/vsmagent/master_hostname=elsewhere.example.com'")
    text = "".join(section(title) for title in sections)
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("tl-config ")]
    assert commands
    for command in commands:
        tl_config(conf, command)
    settings = config.build({"node_id": "tl-a", "vsm_server_mode": mode,
                             "vip": ["10.0.0.10/24"], "vip_interface": "eth0"})
    names = {"tl.example.com": {"10.0.0.10"}, "tl-a.example.com": {"10.0.0.11"},
             "tl-b.example.com": {"10.0.0.12"}}
    checks = checkhost.check_hiveconf(settings, hiveconf.read_dir(conf), {"tl-a"},
                                      lambda address: address == "10.0.0.11",
                                      lambda name: names.get(name, set()))
    assert [c.status for c in checks] == ["OK"] * len(checks), checks
