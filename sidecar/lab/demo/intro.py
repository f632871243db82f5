"""The lines at the top of the demo's screen: what runs where, and commands to try meanwhile."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .. import netlab
from .lab import Lab
from .plan import CLUSTER, FAILBACK_DELAY_S, LAB_HOSTS, NETNS_ENV, NODE_IDS, VIP_PORT

HEALTH_REQUEST = '{"service":"thinlinc.ha.v1.Primary"}'
VIP_SKIPPED = "resource IP: skipped (needs root and network namespaces)"


def standins_line(available: bool, lab: Lab) -> str:
    if not available:
        return "stand-in VSM servers: not available in this build"
    where = ", ".join(f"{name} on {standin.address}" for name, standin in lab.standins.items())
    return (f"stand-in VSM servers: {where} (only the primary's serves: try "
            f"{_ask_command('HOST', 'PORT')})")


def vip_line(lab: Lab) -> str:
    if lab.net is None or lab.vip is None:
        reason = "" if lab.net_skipped is None else f": {lab.net_skipped}"
        return f"{VIP_SKIPPED}{reason}"
    a, b = (lab.net.hosts[LAB_HOSTS[node_id]] for node_id in NODE_IDS)
    return (
        f"resource IP: {lab.vip}/24 on {netlab.HOST_IFNAME} of the primary's host; "
        f"{NODE_IDS[0]} runs in host a ({a.ipv4}), {NODE_IDS[1]} in host b ({b.ipv4}), and "
        f"host client asks {lab.vip}:{VIP_PORT} (namespaces {lab.net.tag}-*)"
    )


def intro(lab: Lab) -> list[str]:
    return [
        f"vsm-sidecar demo: sidecars {' and '.join(NODE_IDS)} on a local 3-member etcd "
        f"cluster, lease TTL {lab.ttl} s; {NODE_IDS[0]} is the preferred primary (failback "
        f"delay {FAILBACK_DELAY_S} s). As root they run in network namespaces with a resource "
        f"IP; {NETNS_ENV}=0 keeps them on loopback without one.",
        f"Work dir (every process's log): {lab.workdir}",
    ]


def commands(lab: Lab) -> list[str]:
    address, other = (node.address for node in lab.nodes)
    grpcurl, sidecar = _tool("grpcurl"), _tool("vsm-sidecar")
    # grpcurl takes a Unix socket as a path with -unix.
    target = address.removeprefix("unix:")
    grpcurl += " -unix" if address.startswith("unix:") else ""
    extra: list[str] = []
    if lab.net is not None and lab.vip is not None:
        client_ns = lab.net.netns("client")
        extra.append(f"  ip netns exec {client_ns} {_ask_command(lab.vip, VIP_PORT)}")
    return [
        f"Try these in another terminal while it runs ({NODE_IDS[1]} answers on {other}):",
        f"  {sidecar} status --grpc {address}",
        f"  {sidecar} switchover --to {NODE_IDS[1]} --grpc {lab.nodes[0].control_address}",
        f"  {grpcurl} -plaintext {target} list",
        f"  {grpcurl} -plaintext {target} thinlinc.ha.v1.RoleService/GetRole",
        f"  {grpcurl} -plaintext {target} thinlinc.ha.v1.SessionService/ListSessions",
        f"  {grpcurl} -plaintext -d '{HEALTH_REQUEST}' {target} grpc.health.v1.Health/Check",
        *(f"  curl http://{n.host}:{n.http_port}/primary" for n in lab.nodes if n.http_port),
        *extra,
        f"  {_tool('etcdctl')} --endpoints={lab.etcd.endpoints_arg} get --prefix "
        f"/thinlinc-ha/{CLUSTER}/",
    ]


def _ask_command(host: object, port: object) -> str:
    """A command that prints a stand-in's greeting: nc where installed, else bash alone."""
    if shutil.which("nc"):
        return f"nc {host} {port}"
    return f"bash -c 'exec 3<>/dev/tcp/{host}/{port}; head -1 <&3'"


def _tool(name: str) -> str:
    """``name`` if it is on PATH, else its full path beside this Python (a virtualenv)."""
    if shutil.which(name):
        return name
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name
