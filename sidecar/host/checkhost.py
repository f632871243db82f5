"""``vsm-sidecar check-host``: is this host ready for the chosen vsm_server_mode?

One line per check: ``OK``, ``WARN`` or ``FAIL``, what was found, and the fix. Exit 0 when
nothing FAILs, 1 otherwise; ``--json`` for tools. The checks read: ThinLinc's hiveconf files,
etcd (with the sidecar's own TLS and credentials), this host (capabilities, interface, folders,
commands), and the sessions file's copy in etcd. Nothing is changed anywhere.

Each group is a function of what it reads, so that a test can hand it a fixture instead of a
ThinLinc installation.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import os
import shlex
import shutil
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from ..core.reports import FILE_BEHIND, ON_PRIMARY, REPLICATED
from ..etcd.client import Etcd
from ..etcd.errors import EtcdError
from ..etcd.keys import Keys
from ..etcd.records import MemberRecord, decode_member, load_json
from ..etcd.retry import quiet, reconnect_policy
from ..etcd.versions import affected_by_15247, release_numbers, upgrade_target, write_loss
from ..settings import Settings
from . import hiveconf

log = structlog.get_logger(__name__)

OK, WARN, FAIL = "OK", "WARN", "FAIL"
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
ETCD_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Check:
    status: str
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.what}" + (f" -- fix: {self.fix}" if self.fix else "")


# -- hiveconf ------------------------------------------------------------------------------------


def check_hiveconf(settings: Settings, hive: hiveconf.Hive, local_names: set[str],
                   is_local: Callable[[str], bool],
                   resolve: Callable[[str], set[str]]) -> list[Check]:
    """ThinLinc's own settings against the mode: HA sync, its nodes, the agents' master."""
    checks = []
    try:
        enabled = hive.boolean("/vsmserver/HA/enabled")
    except hiveconf.HiveconfError as exc:
        return [Check(FAIL, str(exc), "tl-config /vsmserver/HA/enabled=1 (or 0)")]
    where = hive.where("/vsmserver/HA/enabled")
    if settings.vsm_server_mode == REPLICATED:
        if enabled:
            checks.append(Check(OK, f"ThinLinc HA sync is on ({where})"))
        else:
            checks.append(Check(FAIL, "replicated mode needs ThinLinc's HA sync, but "
                                f"/vsmserver/HA/enabled is off ({where})",
                                "tl-config /vsmserver/HA/enabled=1 on both nodes"))
        checks.append(_check_nodes(hive, local_names, is_local, resolve))
    elif enabled:
        checks.append(Check(FAIL, "on-primary mode runs one VSM server at a time, but "
                            f"/vsmserver/HA/enabled is on ({where})",
                            "tl-config /vsmserver/HA/enabled=0 on both nodes"))
    else:
        checks.append(Check(OK, f"ThinLinc HA sync is off, as on-primary mode needs ({where})"))
    checks.append(_check_master(settings, hive, resolve))
    return checks


def _check_nodes(hive: hiveconf.Hive, local_names: set[str], is_local: Callable[[str], bool],
                 resolve: Callable[[str], set[str]]) -> Check:
    nodes = hive.words("/vsmserver/HA/nodes")
    fix = "tl-config '/vsmserver/HA/nodes=NODE1 NODE2' (both host names, the same on both)"
    if len(nodes) != 2:
        return Check(FAIL, f"/vsmserver/HA/nodes names {len(nodes)} hosts "
                     f"({' '.join(nodes) or 'none'}), not two", fix)
    mine = [n for n in nodes if n in local_names or n.split(".")[0] in local_names
            or any(is_local(a) for a in resolve(n))]
    if not mine:
        return Check(FAIL, f"/vsmserver/HA/nodes ({' '.join(nodes)}) does not name this host "
                     f"({', '.join(sorted(local_names))})", fix)
    return Check(OK, f"/vsmserver/HA/nodes is {' '.join(nodes)}; this host is {mine[0]}")


def _check_master(settings: Settings, hive: hiveconf.Hive,
                  resolve: Callable[[str], set[str]]) -> Check:
    if not hive.has_folder("/vsmagent"):
        return Check(OK, "no VSM agent configured on this host")
    master = hive.get("/vsmagent/master_hostname") or ""
    vips = {text.split("/")[0] for text in settings.vip}
    fix = "tl-config /vsmagent/master_hostname=NAME, NAME resolving to the resource IP"
    if not master:
        return Check(FAIL, "/vsmagent/master_hostname is empty", fix)
    if not vips:
        return Check(WARN, f"/vsmagent/master_hostname is {master}, but no resource IP (vip) "
                     "is configured to compare it with", "set vip and vip_interface")
    addresses = resolve(master)
    if not addresses & vips:
        return Check(FAIL, f"/vsmagent/master_hostname {master} resolves to "
                     f"{', '.join(sorted(addresses)) or 'nothing'}, not the resource IP "
                     f"{', '.join(sorted(vips))}", fix)
    return Check(OK, f"/vsmagent/master_hostname {master} resolves to the resource IP")


def resolve_name(name: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
    except (socket.gaierror, UnicodeError):
        return set()


def is_local_address(address: str) -> bool:
    """Whether ``address`` is one of this host's (a socket can be bound to it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def local_names() -> set[str]:
    names = {os.uname().nodename, socket.gethostname(), socket.getfqdn()}
    return names | {n.split(".")[0] for n in names}


# -- etcd ----------------------------------------------------------------------------------------


def version_check(version: str) -> Check:
    """FAIL for releases that can lose committed writes (etcd's advisories: no session copy
    survives that), WARN for releases without the fix for etcd-io/etcd#15247 (the sidecar
    guards it); either names the release to take."""
    if release_numbers(version) is None:
        return Check(WARN, f"etcd reports version {version!r}, which cannot be compared")
    fix = f"upgrade etcd to {upgrade_target(version)} or later"
    if (loss := write_loss(version)) is not None:
        return Check(FAIL, f"etcd {version} can lose writes it acknowledged: {loss}", fix)
    if affected_by_15247(version):
        return Check(WARN, f"etcd {version} lacks the fix for etcd-io/etcd#15247 (a revoked "
                     "lease's keys may outlive it across an etcd leader change)", fix)
    return Check(OK, f"etcd version {version}")


async def watch_etcd_version(etcd: Etcd, interval: float = 3600.0) -> None:
    """Log etcd's version at start and whenever it changes (WARN when it lacks the fix)."""
    logged = None
    while True:
        # Retried quietly, as any etcd error: the node reports etcd's outages itself.
        async for attempt in reconnect_policy("etcd version", wait=5.0, on_retry=quiet):
            with attempt:
                version = await etcd.call(lambda client: str(client.status().version),
                                          "etcd version")
        if version != logged:
            check = version_check(version)
            if check.status == OK:
                log.info("etcd_version", version=version)
            else:
                level = log.error if check.status == FAIL else log.warning
                level("etcd_version_old", version=version, problem=check.what, fix=check.fix)
            logged = version
        await asyncio.sleep(interval)


def check_etcd(settings: Settings, etcd: Etcd) -> list[Check]:
    """Reachable with our TLS and credentials, 3 members or more, its version, the clock."""
    try:
        members = etcd.run_sync(lambda client: list(client.members), "list members")
        version = etcd.run_sync(lambda client: str(client.status().version), "etcd status")
    except EtcdError as exc:
        return [Check(FAIL, f"etcd at {','.join(settings.etcd_endpoints)} does not answer: "
                      f"{exc}", "check etcd_endpoints, the TLS files, etcd_user and the "
                      "firewall (client port 2379)")]
    checks = [Check(OK, f"etcd answers at {','.join(settings.etcd_endpoints)}")]
    if len(members) < 3:
        checks.append(Check(FAIL, f"etcd has {len(members)} member(s): a majority needs 3 (two "
                            "VSM hosts and a witness)", "add a third etcd member (the witness)"))
    else:
        checks.append(Check(OK, f"etcd has {len(members)} members"))
    checks.append(version_check(version))
    checks.append(clock_check(settings))
    return checks


def clock_check(settings: Settings) -> Check:
    """The offset from etcd's clock (HTTP Date header, 1 s resolution): shown, never a FAIL."""
    url = settings.etcd_endpoints[0].rstrip("/") + "/version"
    context = None
    if urlsplit(url).scheme == "https":
        context = ssl.create_default_context(
            cafile=str(settings.etcd_ca) if settings.etcd_ca else None)
        if settings.etcd_cert is not None and settings.etcd_key is not None:
            context.load_cert_chain(settings.etcd_cert, settings.etcd_key)
    note = "clocks do not matter for safety (leases run on monotonic clocks)"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        sent = time.time()
        with opener.open(url, timeout=ETCD_TIMEOUT) as answer:
            date = answer.headers.get("Date")
        received = time.time()
    except (OSError, ValueError) as exc:
        return Check(WARN, f"{note}; etcd's clock could not be read: {exc}")
    if not date:
        return Check(OK, f"{note}; etcd sent no Date header")
    offset = (sent + received) / 2 - email.utils.parsedate_to_datetime(date).timestamp()
    return Check(OK, f"{note}; this host's clock is {offset:+.1f} s from etcd's (to within "
                 "1 s)")


def check_sessions_copy(settings: Settings, etcd: Etcd) -> list[Check]:
    """What this node's sidecar says of the file's copy, and the copy against the disk."""
    if settings.vsm_sessions_file is None:
        hint = "set vsm_sessions_file = \"/var/lib/vsm/sessions\""
        return [Check(WARN, "no sessions file is mirrored: etcd holds no copy for recovery",
                      hint)]
    keys = Keys(settings.prefix)
    member_key = keys.member(settings.node_id)
    manifest_key = keys.prefix.encode() + b"vsmfile/manifest"
    try:
        member, meta = etcd.run_sync(lambda client: client.get(member_key), "read member")
        manifest, _ = etcd.run_sync(lambda client: client.get(manifest_key), "read manifest")
    except EtcdError as exc:
        return [Check(FAIL, f"the sessions file's copy could not be read: {exc}")]
    checks = []
    record = _member(settings.node_id, member, meta)
    report = record.extras.get("sessions_file") if record else None
    if record is None:
        checks.append(Check(WARN, f"no sidecar for node {settings.node_id} runs now: its view "
                            "of the copy is unknown", "start vsm-sidecar"))
    elif isinstance(report, dict) and report.get("state") == FILE_BEHIND:
        checks.append(Check(FAIL, f"the etcd copy of the sessions file is behind since "
                            f"{report.get('behind_since')}: {report.get('error')}",
                            "see the sidecar's log (vsm_file_upload_failed)"))
    elif isinstance(report, dict):
        checks.append(Check(OK, f"the sidecar reports the sessions file's copy as "
                            f"{report.get('state')}"))
    stored = _json_object(manifest)
    if stored is None:
        checks.append(Check(WARN, "etcd holds no copy of the sessions file yet"))
        return checks
    try:
        local = hashlib.sha256(settings.vsm_sessions_file.read_bytes()).hexdigest()
    except OSError as exc:
        local = f"unreadable ({exc.strerror})"
    same = local == stored.get("sha256")
    checks.append(Check(OK if same else WARN, f"{settings.vsm_sessions_file} "
                        f"{'equals' if same else 'differs from'} etcd's copy "
                        f"({str(stored.get('sha256'))[:12]})"))
    return checks


def _member(node_id: str, value: bytes | None, meta: Any) -> MemberRecord | None:
    """This node's member record, or None when there is none (or garbage: no sidecar wrote it)."""
    if value is None or meta is None:
        return None
    try:
        return decode_member(node_id.encode(), value, meta.lease_id)
    except ValueError:
        return None


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        data = load_json(value)
        if isinstance(data, dict):
            return data
    return None


# -- this host -----------------------------------------------------------------------------------


def check_this_host(settings: Settings, capabilities: int | None = None) -> list[Check]:
    checks = []
    user = _user()
    if settings.vip:
        caps = effective_capabilities() if capabilities is None else capabilities
        missing = [name for name, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN),
                                          ("CAP_NET_RAW", CAP_NET_RAW))
                   if not caps & (1 << bit)]
        if missing:
            checks.append(Check(FAIL, f"{user} lacks {' and '.join(missing)}, needed to move "
                                "the resource IP", "run the sidecar from the shipped unit "
                                "(AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW), and this "
                                "check as its user with those capabilities"))
        else:
            checks.append(Check(OK, f"{user} has CAP_NET_ADMIN and CAP_NET_RAW"))
        interface = settings.vip_interface or ""
        if Path("/sys/class/net", interface).is_dir() and interface:
            checks.append(Check(OK, f"interface {interface} exists"))
        else:
            checks.append(Check(FAIL, f"interface {interface!r} (vip_interface) does not exist "
                                "here", "set vip_interface to the interface of the VSM "
                                "server's address (ip -br link)"))
    checks.append(_writable("data_dir", settings.data_dir, user))
    if settings.vsm_server_mode == ON_PRIMARY:
        if settings.vsm_sessions_file is not None:
            checks.append(_writable("vsm_sessions_file's folder",
                                    settings.vsm_sessions_file.parent, user))
        for name in ("vsm_server_start", "vsm_server_stop"):
            program = shlex.split(getattr(settings, name))[0]
            if shutil.which(program) is None:
                checks.append(Check(FAIL, f"{name}: {program} is not found", f"install it or "
                                    f"set {name} to a command that exists"))
            else:
                checks.append(Check(OK, f"{name}: {program} is present"))
    return checks


def _writable(what: str, folder: Path, user: str) -> Check:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # a folder the sidecar would create
    if os.access(existing, os.W_OK | os.X_OK):
        return Check(OK, f"{what} {folder} is writable by {user}")
    return Check(FAIL, f"{what} {folder} is not writable by {user}",
                 f"chown {user} {existing} (or give its group write access)")


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


# -- all of it -----------------------------------------------------------------------------------


def run_checks(settings: Settings) -> list[Check]:
    try:
        hive = hiveconf.read_dir(settings.thinlinc_conf_dir)
    except (OSError, hiveconf.HiveconfError) as exc:
        checks = [Check(FAIL, f"ThinLinc's configuration cannot be read: {exc}",
                        "set thinlinc_conf_dir to ThinLinc's conf.d folder")]
    else:
        if not hive.files:
            checks = [Check(FAIL, f"no *.hconf files in {settings.thinlinc_conf_dir}",
                            "install ThinLinc, or set thinlinc_conf_dir")]
        else:
            checks = check_hiveconf(settings, hive, local_names(), is_local_address,
                                    resolve_name)
    etcd = Etcd(settings, timeout=ETCD_TIMEOUT, workers=1, name="check-host")
    try:
        found = check_etcd(settings, etcd)
        checks += found
        if found[0].status != FAIL:  # etcd answered
            checks += check_sessions_copy(settings, etcd)
    finally:
        etcd.close()
    return checks + check_this_host(settings)


def render(checks: Iterable[Check], as_json: bool) -> str:
    checks = list(checks)
    if as_json:
        failed = any(c.status == FAIL for c in checks)
        return json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2)
    return "\n".join(c.line() for c in checks)
