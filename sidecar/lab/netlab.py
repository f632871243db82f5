"""Real hosts for network tests and the demo, built from network namespaces on one Linux bridge.

    switch (namespace with bridge br0)
      ├── va       ── eth0 in host "a"       192.0.2.11/24  2001:db8::11/64
      ├── vb       ── eth0 in host "b"       192.0.2.12/24  2001:db8::12/64
      ├── vclient  ── eth0 in host "client"  192.0.2.100/24 2001:db8::100/64
      └── vetcd    ── eth0 in host "etcd"    192.0.2.1/24   2001:db8::1/64

Only documentation ranges are used, and nothing is created in the root namespace, so a lab can
never reach or disturb the machine's real network. Nor does a lab depend on the machine's
settings: a new namespace copies the root's IPv4 sysctls (``ip_forward=1`` on every Docker host
would make host a route a client's packet on to b), so each namespace sets what the lab relies
on (:data:`HOST_SYSCTLS`, :data:`SWITCH_SYSCTLS`) before any interface exists. Netfilter tables
are per namespace and start empty with ACCEPT policies. The root's tables (Docker's FORWARD
DROP among them) see only the traffic of the root's own leg (``attach_root``), as INPUT and
OUTPUT, never as FORWARD.

Every namespace name carries the creating process id and a random tag: parallel runs never
clash, and a later run can tell the leftovers of a killed run (dead pid) from a lab that is
still in use.

Helpers take a host name ("a", "client", "switch") or a full namespace name. This harness uses
the ``ip`` command freely; the product code must not (it speaks netlink). It is a test and demo
tool only: nothing the sidecar itself runs imports it. ``tests/netns_lab.py`` adds the pytest
helpers (``require_netns``); :mod:`sidecar.lab.netns` keeps the namespace bookkeeping.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from .netns import PREFIX, LabError, check, read_line, root_subnets, stop_process, sweep_orphans

BRIDGE: Final = "br0"
HOST_IFNAME: Final = "eth0"
# Host name -> last octet / last group of its addresses.
HOSTS: Final[Mapping[str, int]] = {"etcd": 1, "a": 11, "b": 12, "client": 100}

# What every lab namespace relies on, whatever the root namespace has. Set on "all" and
# "default" right after the namespace is made, so eth0 (moved in later) starts from them too.
HOST_SYSCTLS: Final[Mapping[str, str]] = {
    # Hosts are hosts, not routers: a packet for an address a host gave up is dropped there,
    # not routed on to its new holder (which would hide a missing announcement).
    **{f"net.ipv{v}.conf.{c}.forwarding": "0" for v in (4, 6) for c in ("all", "default")},
    # The announcement tests need the client to learn from gratuitous ARP and unsolicited NA.
    **{f"net.ipv4.conf.{c}.drop_gratuitous_arp": "0" for c in ("all", "default")},
    **{f"net.ipv6.conf.{c}.drop_unsolicited_na": "0" for c in ("all", "default")},
    **{f"net.ipv6.conf.{c}.disable_ipv6": "0" for c in ("all", "default")},
}
# With br_netfilter loaded (dockerd loads it) a new namespace's bridge hands bridged frames to
# that namespace's iptables; the switch is a plain switch. Only where the module is loaded.
SWITCH_SYSCTLS: Final[Mapping[str, str]] = {
    f"net.bridge.bridge-nf-call-{table}": "0" for table in ("iptables", "ip6tables", "arptables")
}


class Host(NamedTuple):
    name: str
    netns: str
    ipv4: str
    ipv6: str
    mac: str  # fixed per host so that a test failure message is easy to read


class Neighbour(NamedTuple):
    mac: str | None  # None while the entry is INCOMPLETE or FAILED
    state: str


# Run inside a namespace with ``python -I -S -c``: isolated and without site, it starts in
# about 20 ms, which keeps "the client asks" close to the moment the test cares about.
_NAME_SERVER: Final = r"""
import socket, sys
name, port = sys.argv[1].encode(), int(sys.argv[2])
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
server.bind(("::", port))
server.listen(64)
print("ready", flush=True)
while True:
    connection, _ = server.accept()
    with connection:
        connection.sendall(name)
"""

_ASK: Final = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as connection:
        chunks = []
        while chunk := connection.recv(256):
            chunks.append(chunk)
            if b"\n" in chunk:  # a server that greets and waits: its first line is enough
                break
except OSError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
sys.stdout.write(b"".join(chunks).decode().split("\n")[0])
"""


ROOT_OCTET: Final = 254
ROOT_PORT: Final = "p-root"


class NetnsLab:
    """A bridge, hosts a, b, client and etcd, and every process started in them.

    Use as a context manager (or call ``start()`` and ``close()``). ``close()`` kills what the
    lab started and deletes what it created, pass or fail, and may be called any number of
    times; an atexit hook closes labs a crashed test left open.
    """

    def __init__(self, hosts: Mapping[str, int] = HOSTS, subnet: str = "192.0.2") -> None:
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-switch"
        self.subnet = subnet
        self.hosts = {name: _host(self.tag, name, octet, subnet) for name, octet in hosts.items()}
        self._namespaces: list[str] = []  # created, in order
        self._processes: list[subprocess.Popen[str]] = []
        self._closed = False

    def __enter__(self) -> NetnsLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        _open_labs.add(self)
        sweep_orphans()
        self._add_netns(self.switch)
        self._sysctl(self.switch, SWITCH_SYSCTLS, missing_ok=True)
        self._batch(
            self.switch,
            "link set lo up",
            # No STP and no forwarding delay: ports forward the moment they are up. No multicast
            # snooping: without an MLD querier it would make neighbour discovery flaky.
            f"link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            f"link set {BRIDGE} up",
        )
        for host in self.hosts.values():
            self._add_host(host)

    def _add_host(self, host: Host) -> None:
        self._add_netns(host.netns)
        port = _switch_port(host.name)
        self._batch(
            self.switch,
            f"link add {port} type veth peer name {HOST_IFNAME} address {host.mac} "
            f"netns {host.netns}",
            f"link set {port} master {BRIDGE}",
            f"link set {port} up",
        )
        self._batch(
            host.netns,
            "link set lo up",
            f"addr add {host.ipv4}/24 dev {HOST_IFNAME}",
            # nodad: usable at once; the lab's own addresses are not what the tests examine.
            f"addr add {host.ipv6}/64 dev {HOST_IFNAME} nodad",
            f"link set {HOST_IFNAME} up",
        )

    def attach_root(self) -> str:
        """Give the test process itself a leg on the bridge, so that it can run etcd there
        and reach every host; the veth dies with the switch namespace. Returns its address.

        Refuses when the root namespace already routes the lab's subnet: lab traffic must
        never leak onto the machine's real network (build the lab with ``free_subnet()``)."""
        if self.subnet in root_subnets():
            raise LabError(f"the root namespace already uses {self.subnet}.0/24")
        address = f"{self.subnet}.{ROOT_OCTET}"
        name = f"vl{secrets.token_hex(4)}"  # root side; under the 15-character limit
        self._batch(
            self.switch,
            f"link add {ROOT_PORT} type veth peer name {name} netns 1",
            f"link set {ROOT_PORT} master {BRIDGE}",
            f"link set {ROOT_PORT} up",
        )
        check(["ip", "addr", "add", f"{address}/24", "dev", name])
        check(["ip", "link", "set", name, "up"])
        return address

    def _add_netns(self, name: str) -> None:
        check(["ip", "netns", "add", name])
        self._namespaces.append(name)
        self._sysctl(name, HOST_SYSCTLS)

    def _sysctl(self, ns: str, settings: Mapping[str, str], missing_ok: bool = False) -> None:
        assignments = [f"{key}={value}" for key, value in settings.items()]
        # -e: a setting whose module is not loaded does not exist, so it cannot be on either.
        flags = ["-q", "-e", "-w"] if missing_ok else ["-q", "-w"]
        check(["ip", "netns", "exec", ns, "sysctl", *flags, *assignments])

    def sysctl(self, ns: str, key: str) -> str | None:
        """The value of a sysctl in the host (None where the key does not exist there)."""
        path = "/proc/sys/" + key.replace(".", "/")
        done = self.run(ns, "cat", path, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    def _batch(self, ns: str, *commands: str) -> None:
        check(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")

    # -- naming ---------------------------------------------------------------------

    def netns(self, ns: str) -> str:
        """The full namespace name for a host name (or a full name of this lab)."""
        if ns in self.hosts:
            return self.hosts[ns].netns
        if ns == "switch":
            return self.switch
        if ns in self._namespaces:
            return ns
        raise KeyError(f"{ns!r} is neither a host nor a namespace of lab {self.tag}")

    def exec_prefix(self, ns: str) -> list[str]:
        """Runs a command in the host; e.g. ``LocalEtcdCluster(command_prefix=...)``."""
        return ["ip", "netns", "exec", self.netns(ns)]

    # -- processes ----------------------------------------------------------------------

    def run(
        self,
        ns: str,
        *cmd: str,
        check: bool = True,
        timeout: float = 10.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the host and wait for it; LabError on failure when ``check``."""
        argv = [*self.exec_prefix(ns), *cmd]
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise LabError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def popen(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a command in the host; the lab kills it (and its process group) at close()."""
        kwargs.setdefault("text", True)
        process: subprocess.Popen[str] = subprocess.Popen(
            [*self.exec_prefix(ns), *cmd], start_new_session=True, **kwargs
        )
        self._processes.append(process)
        return process

    def serve_name(self, ns: str, name: str, port: int) -> subprocess.Popen[str]:
        """A TCP server in the host that answers every connection with ``name`` and closes.

        It listens on every address (IPv4 and IPv6), so it answers on the resource IP whenever
        the host holds it. Returns once it is listening.
        """
        server = self.popen(
            ns,
            *_quick_python(_NAME_SERVER, name, str(port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if read_line(server.stdout, timeout=5.0) != "ready":
            raise LabError(f"name server {name!r} in {ns} did not start")
        return server

    def ask(self, ns: str, address: str, port: int, timeout: float = 1.0) -> str | None:
        """Connect from the host to ``address:port``; what is served there up to the end of
        the connection or of the first line (without the newline), or None."""
        done = self.run(
            ns,
            *_quick_python(_ASK, address, str(port), str(timeout)),
            check=False,
            timeout=timeout + 10,
        )
        return done.stdout if done.returncode == 0 else None

    # -- looking at hosts ---------------------------------------------------------------

    def address_details(self, ns: str, ifname: str = HOST_IFNAME) -> list[dict[str, Any]]:
        """``ip -j addr`` entries of the interface: local, prefixlen, label, nodad, tentative..."""
        shown = check(["ip", "-n", self.netns(ns), "-j", "addr", "show", "dev", ifname])
        entries: list[dict[str, Any]] = []
        for link in json.loads(shown.stdout or "[]"):
            entries.extend(link.get("addr_info", []))
        return entries

    def addresses(self, ns: str, ifname: str = HOST_IFNAME) -> set[str]:
        """The addresses on the interface as ``"address/prefix"`` strings."""
        return {f"{info['local']}/{info['prefixlen']}" for info in self.address_details(ns, ifname)}

    def neigh(self, ns: str, ifname: str = HOST_IFNAME) -> dict[str, Neighbour]:
        """The host's ARP / neighbour cache: address -> (MAC, state)."""
        shown = check(["ip", "-n", self.netns(ns), "-j", "neigh", "show", "dev", ifname])
        return {
            entry["dst"]: Neighbour(entry.get("lladdr"), ",".join(entry.get("state", [])))
            for entry in json.loads(shown.stdout or "[]")
        }

    # -- faults ---------------------------------------------------------------------------

    def link_down(self, ns: str, side: str = "switch") -> None:
        """Cut the host off: its switch port down (a dead host or pulled cable) or its eth0."""
        self._set_link(ns, side, "down")

    def link_up(self, ns: str, side: str = "switch") -> None:
        self._set_link(ns, side, "up")

    def _set_link(self, ns: str, side: str, state: str) -> None:
        host = next((h for h in self.hosts.values() if self.netns(ns) == h.netns), None)
        if host is None:
            raise KeyError(f"{ns!r} is not a host of lab {self.tag}")
        if side == "switch":
            check(["ip", "-n", self.switch, "link", "set", _switch_port(host.name), state])
        elif side == "host":
            check(["ip", "-n", host.netns, "link", "set", HOST_IFNAME, state])
        else:
            raise ValueError(f"side must be 'switch' or 'host', not {side!r}")

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process the lab started, then delete every namespace it created."""
        if self._closed:
            return
        self._closed = True
        for process in reversed(self._processes):
            stop_process(process)
        # Deleting a namespace destroys its interfaces; a veth dies with either end.
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        _open_labs.discard(self)


def _host(tag: str, name: str, octet: int, subnet: str = "192.0.2") -> Host:
    return Host(
        name=name,
        netns=f"{tag}-{name}",
        ipv4=f"{subnet}.{octet}",
        ipv6=f"2001:db8::{octet}",  # reads like the IPv4 octet
        mac=f"02:00:00:00:00:{octet:02x}",
    )


def _switch_port(host: str) -> str:
    return f"v{host}"[:15]


def _quick_python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", code, *args]


_open_labs: set[NetnsLab] = set()


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


