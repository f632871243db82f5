"""The resource IP actuator (sidecar/resource/): pure helpers, then real hosts in namespaces.

The network tests run ResourceIP inside a host namespace through a small driver process (this
module run with ``python -m tests.resource.test_vip``) that takes one JSON command per line.
Nothing is mocked: addresses, ARP, neighbour discovery and the client's caches are the kernel's
own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.resource.actuator import ResourceIP
from sidecar.resource.address import VipAddress, parse_vip
from sidecar.resource.announce import AnnounceSettings
from sidecar.resource.errors import VipError, VipPermissionError
from sidecar.resource.frames import (
    ETH_P_ARP,
    dad_solicitation,
    gratuitous_arps,
    internet_checksum,
    parse_na,
    unsolicited_na,
)
from sidecar.resource.netlink import OWNER_PROTO, kernel_label
from sidecar.resource.privileges import check_privileges

from .. import netns_lab as lab_module
from ..netns_conftest import netns_lab  # noqa: F401 - the fixture, until conftest imports it
from ..netns_lab import (
    HOST_SYSCTLS,
    SWITCH_SYSCTLS,
    NetnsLab,
    list_netns,
    require_netns,
    root_sysctls,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
PORT = 7000
VIP4 = "192.0.2.4/24"
VIP4_IP = "192.0.2.4"
VIP6 = "2001:db8::4/64"
VIP6_IP = "2001:db8::4"
QUICK = {"repeat": 2, "interval": 0.01, "delay": 0.0}  # one short burst, no second one
# dockerd turns on forwarding in the root namespace, and new namespaces copy it from there.
DOCKER_HOST = {"net.ipv4.ip_forward": "1"}
# The lab's fixture, built on the root namespace as found and as on every Docker host.
ROOT_AS_FOUND_AND_AS_DOCKER_HOST = pytest.mark.parametrize(
    "netns_lab", [{}, DOCKER_HOST], ids=["root-as-found", "root-forwarding"], indirect=True
)


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.4/24", ipaddress.IPv4Interface("10.0.0.4/24")),
        (" 2001:db8::4/64 ", ipaddress.IPv6Interface("2001:db8::4/64")),
        ("192.0.2.4/32", ipaddress.IPv4Interface("192.0.2.4/32")),
    ],
)
def test_parse_vip_accepts_address_with_prefix(text: str, expected: VipAddress) -> None:
    """A host address with a prefix length parses to an interface of its family."""
    assert parse_vip(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.4", "needs a prefix length"),
        ("10.0.0.300/24", "not an IP address"),
        ("10.0.0.4/33", "not an IP address"),
        ("10.0.0.0/24", "network or broadcast"),
        ("10.0.0.255/24", "network or broadcast"),
        ("224.0.0.5/24", "multicast"),
        ("fe80::4/64", "link-local"),
        ("::/0", "unspecified"),
    ],
)
def test_parse_vip_rejects_bad_input_with_a_clear_message(text: str, message: str) -> None:
    """Bad resource IPs raise VipError naming the input and the problem."""
    with pytest.raises(VipError, match=message) as caught:
        parse_vip(text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize(
    ("ifname", "tag", "expected"),
    [
        ("eth0", "vsm", "eth0:vsm"),
        ("eth0", "vsm-sidecar-primary", "eth0:vsm-sideca"),  # cut to 15 characters
        ("enp0s31f6", "vsm", "enp0s31f6:vsm"),
        ("bond0.1234567", "vsm", "bond0.1234567:v"),
        ("averylongname14", "vsm", None),  # no room left: the kernel uses the bare name
        ("eth0", "", None),
    ],
)
def test_kernel_label_fits_the_kernel_limit(ifname: str, tag: str, expected: str | None) -> None:
    """Labels are '<ifname>:<tag>' and never longer than the kernel's 15 characters."""
    label = kernel_label(ifname, tag)
    assert label == expected
    assert label is None or len(label) <= 15


@pytest.mark.parametrize(
    ("cap_eff", "missing"),
    [
        (0, ["CAP_NET_ADMIN", "CAP_NET_RAW"]),
        (1 << 13, ["CAP_NET_ADMIN"]),
        (1 << 12, ["CAP_NET_RAW"]),
    ],
)
def test_check_privileges_names_each_missing_capability(
    tmp_path: Path, cap_eff: int, missing: list[str]
) -> None:
    """The error names exactly the capabilities that are absent from CapEff."""
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython\nCapEff:\t{cap_eff:016x}\n")
    with pytest.raises(VipPermissionError) as caught:
        check_privileges(status_path=str(status))
    named = [cap for cap in ("CAP_NET_ADMIN", "CAP_NET_RAW") if cap in str(caught.value)]
    assert named == missing


def test_check_privileges_passes_with_both_capabilities(tmp_path: Path) -> None:
    """Bits 12 and 13 of CapEff are enough."""
    status = tmp_path / "status"
    status.write_text(f"CapEff:\t{(1 << 12) | (1 << 13):016x}\n")
    check_privileges(status_path=str(status))


def test_gratuitous_arps_have_both_forms() -> None:
    """Request: target MAC zero. Reply: target MAC = sender MAC. Both broadcast, IP = IP."""
    mac = bytes.fromhex("020000000042")
    request, reply = gratuitous_arps(mac, ipaddress.IPv4Address(VIP4_IP))
    for frame, op, target_mac in ((request, 1, bytes(6)), (reply, 2, mac)):
        fields = _arp_fields(frame)
        assert len(frame) == 60
        assert fields["eth_dst"] == b"\xff" * 6
        assert fields["op"] == op
        assert (fields["sha"], fields["tha"]) == (mac, target_mac)
        assert fields["spa"] == fields["tpa"] == VIP4_IP


def test_neighbour_frames_carry_valid_icmpv6_checksums() -> None:
    """Unsolicited NA and DAD solicitation: hop limit 255, right groups, checksum verifies."""
    mac = bytes.fromhex("020000000042")
    target = ipaddress.IPv6Address("2001:db8::1234:5678")
    advert = unsolicited_na(mac, target)
    solicit = dad_solicitation(mac, target)
    assert _ipv6_fields(advert)["dst"] == "ff02::1"
    assert _ipv6_fields(solicit)["dst"] == "ff02::1:ff34:5678"
    assert advert[:6] == bytes.fromhex("333300000001")
    assert solicit[:6] == bytes.fromhex("3333ff345678")
    for frame in (advert, solicit):
        fields = _ipv6_fields(frame)
        assert fields["hop_limit"] == 255
        pseudo = fields["src_raw"] + fields["dst_raw"] + struct.pack("!I3xB", len(frame) - 54, 58)
        assert internet_checksum(pseudo + frame[54:]) == 0
    flags = struct.unpack_from("!I", advert, 58)[0]
    assert flags == 0x20000000  # override only: not a router, not solicited
    assert parse_na(advert) == (target, mac)


def test_require_netns_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without namespaces a network test is skipped, except under CI=true where it fails."""
    monkeypatch.setattr(lab_module, "_netns_unavailable", lambda: "no root here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no root here"):
        require_netns()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no root here"):
        require_netns()


def _arp_fields(frame: bytes) -> dict[str, Any]:
    """Decoded independently of sidecar.resource.frames, so a wrong builder cannot agree with
    itself."""
    eth_dst, eth_src, ethertype = struct.unpack_from("!6s6sH", frame)
    _, _, _, _, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    return {
        "eth_dst": eth_dst,
        "eth_src": eth_src,
        "ethertype": ethertype,
        "op": op,
        "sha": sha,
        "spa": socket.inet_ntoa(spa),
        "tha": tha,
        "tpa": socket.inet_ntoa(tpa),
    }


def _ipv6_fields(frame: bytes) -> dict[str, Any]:
    _, _, _, hop_limit, src, dst = struct.unpack_from("!IHBB16s16s", frame, 14)
    return {
        "hop_limit": hop_limit,
        "src_raw": src,
        "dst_raw": dst,
        "dst": str(ipaddress.IPv6Address(dst)),
    }


# --------------------------------------------------------------------------- the driver
#
# Runs in a host namespace; one JSON request per stdin line, one JSON reply per stdout line.


class _Driver:
    def __init__(self) -> None:
        self.rip: ResourceIP | None = None
        self.hold = False
        self.repairs: list[str] = []
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.capture: tuple[socket.socket, list[str]] | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            try:
                reply = {"ok": True, "result": await self.dispatch(request.pop("op"), request)}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)

    async def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        handler: Callable[..., Awaitable[Any]] = getattr(self, f"op_{op}")
        return await handler(**args)

    def resource_ip(self) -> ResourceIP:
        assert self.rip is not None, "send 'open' first"
        return self.rip

    async def op_open(
        self,
        addresses: list[str],
        interface: str = "eth0",
        announce: dict[str, Any] | None = None,
        open_now: bool = True,
    ) -> None:
        settings = AnnounceSettings(**announce) if announce else AnnounceSettings()
        self.rip = ResourceIP([parse_vip(a) for a in addresses], interface, settings)
        if open_now:
            self.rip.open()

    async def op_claim(self) -> list[str]:
        return self.resource_ip().claim()

    async def op_release(self) -> dict[str, Any]:
        start = time.monotonic()
        removed = self.resource_ip().release()
        return {"removed": removed, "seconds": time.monotonic() - start}

    async def op_present(self) -> list[str]:
        return self.resource_ip().present()

    async def op_held(self) -> bool:
        return self.resource_ip().held()

    async def op_announce(self) -> int:
        return await self.resource_ip().announce()

    async def op_probe(self, window: float) -> list[str]:
        return await self.resource_ip().probe(window)

    async def op_stats(self) -> dict[str, Any]:
        return vars(self.resource_ip().stats)

    async def op_check_privileges(self) -> None:
        check_privileges()

    async def op_start(self, job: str, hold: bool = True, backstop: float = 0.5) -> None:
        rip = self.resource_ip()
        self.hold = hold
        if job == "reconcile":
            work = rip.reconcile(lambda: self.hold, self.repairs.append, backstop=backstop)
        else:
            work = rip.announce_after_claim()
        self.tasks[job] = asyncio.create_task(work)
        await asyncio.sleep(0)  # let it start
        if self.tasks[job].done():
            self.tasks[job].result()  # surface a failed start

    async def op_cancel(self, job: str) -> None:
        task = self.tasks.pop(job)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def op_set_hold(self, value: bool) -> None:
        self.hold = value

    async def op_repairs(self) -> list[str]:
        return self.repairs

    async def op_capture_start(self, ethertype: int, interface: str = "eth0") -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
        sock.bind((interface, ethertype))
        sock.setblocking(False)
        self.capture = (sock, [])
        self.tasks["capture"] = asyncio.create_task(self._capture(sock, self.capture[1]))

    async def op_capture_peek(self) -> list[str]:
        assert self.capture is not None
        return self.capture[1]

    async def op_capture_stop(self) -> list[str]:
        assert self.capture is not None
        await self.op_cancel("capture")
        sock, frames = self.capture
        sock.close()
        return frames

    async def _capture(self, sock: socket.socket, frames: list[str]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames.append((await loop.sock_recv(sock, 2048)).hex())


class DriverError(AssertionError):
    """The driver reported an exception: its type and message."""


class VipDriver:
    """The test's end of a driver running in a lab host."""

    def __init__(self, lab: NetnsLab, host: str, log: Path, prefix: Sequence[str] = ()) -> None:
        self.log = log
        with log.open("w") as log_file:
            self.process = lab.popen(
                host,
                *prefix,
                *(sys.executable, "-m", "tests.resource.test_vip"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=ROOT,
            )

    def call(self, op: str, timeout: float = 10.0, **args: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        line = lab_module.read_line(self.process.stdout, timeout)
        if not line:
            raise DriverError(f"driver gave no answer to {op!r}; its log:\n{self.log.read_text()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise DriverError(reply["error"])
        return reply["result"]

    def close(self) -> None:
        """End of input makes the driver exit; the lab kills it if it does not."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class Drivers:
    def __init__(self, lab: NetnsLab, logs: Path) -> None:
        self.lab = lab
        self.logs = logs
        self.started: list[VipDriver] = []

    def start(
        self,
        host: str,
        addresses: Sequence[str] = (),
        announce: dict[str, float] | None = None,
        prefix: Sequence[str] = (),
    ) -> VipDriver:
        """A driver in ``host``; with ``addresses`` it has opened a ResourceIP on eth0."""
        log = self.logs / f"driver-{host}-{len(self.started)}.log"
        driver = VipDriver(self.lab, host, log, prefix)
        self.started.append(driver)
        if addresses:
            driver.call("open", addresses=list(addresses), announce=announce)
        return driver


@pytest.fixture
def drivers(netns_lab: NetnsLab, tmp_path: Path) -> Iterator[Drivers]:  # noqa: F811
    started = Drivers(netns_lab, tmp_path)
    yield started
    for driver in started.started:
        driver.close()


def _protocols(lab: NetnsLab, host: str) -> dict[str, int | None]:
    """IFA_PROTO per address, read with pyroute2 (iproute2 6.1 does not show it)."""
    dump = (
        "import json; from pyroute2 import IPRoute\n"
        "with IPRoute() as ipr:\n"
        "    print(json.dumps({m.get('address'): m.get('IFA_PROTO') for m in ipr.get_addr()}))"
    )
    return json.loads(lab.run(host, sys.executable, "-c", dump).stdout)  # type: ignore[no-any-return]


def _details(lab: NetnsLab, host: str, address: str) -> dict[str, Any]:
    return next(info for info in lab.address_details(host) if info["local"] == address)


# --------------------------------------------------------------------------- claim / release


@pytest.mark.netns
def test_claim_adds_labelled_addresses_and_is_idempotent(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """claim adds IPv4 with label eth0:vsm and both families with our IFA_PROTO; twice is fine."""
    a = drivers.start("a", [VIP4, VIP6])
    assert a.call("claim") == [VIP4, VIP6]
    assert a.call("claim") == []
    assert {VIP4, VIP6} <= netns_lab.addresses("a")
    assert _details(netns_lab, "a", VIP4_IP)["label"] == "eth0:vsm"
    protocols = _protocols(netns_lab, "a")
    assert (protocols[VIP4_IP], protocols[VIP6_IP]) == (OWNER_PROTO, OWNER_PROTO)
    assert protocols[netns_lab.hosts["a"].ipv4] is None  # the host's own address is not ours
    assert a.call("held") is True


@pytest.mark.netns
def test_release_removes_and_is_idempotent_and_fast(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """release removes only the resource IPs; a second release returns [] in milliseconds."""
    a = drivers.start("a", [VIP4, VIP6])
    a.call("claim")
    first = a.call("release")
    assert sorted(first["removed"]) == sorted([VIP4, VIP6])
    assert netns_lab.addresses("a").isdisjoint({VIP4, VIP6})
    assert {netns_lab.hosts["a"].ipv4 + "/24", netns_lab.hosts["a"].ipv6 + "/64"} <= (
        netns_lab.addresses("a")
    )
    second = a.call("release")
    assert second["removed"] == []
    assert second["seconds"] < 0.05
    assert a.call("held") is False
    assert a.call("present") == []


@pytest.mark.netns
def test_release_removes_a_copy_with_another_prefix(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """A stale copy of the address added by hand as /32 is removed as well."""
    a = drivers.start("a", [VIP4])
    netns_lab.run("a", "ip", "addr", "add", f"{VIP4_IP}/32", "dev", "eth0")
    assert a.call("present") == [VIP4]
    assert a.call("release")["removed"] == [f"{VIP4_IP}/32"]
    assert VIP4_IP not in {entry.split("/")[0] for entry in netns_lab.addresses("a")}


# --------------------------------------------------------------------------- failover


def _a_serves_the_vip(lab: NetnsLab, drivers: Drivers, vip_cidr: str) -> tuple[VipDriver, str]:
    """Both hosts run the name service; a holds the VIP and the client has talked to it."""
    address = vip_cidr.split("/")[0]
    for host in ("a", "b"):
        lab.serve_name(host, host, PORT)
    a = drivers.start("a", [vip_cidr])
    a.call("claim")
    assert lab.ask("client", address, PORT) == "a"
    assert lab.neigh("client")[address].mac == lab.hosts["a"].mac
    return a, address


@pytest.mark.netns
@ROOT_AS_FOUND_AND_AS_DOCKER_HOST
def test_announcement_moves_the_client_to_the_new_holder(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """After a releases and b claims + announces, the client reaches b within 1 s, cache intact."""
    a, address = _a_serves_the_vip(netns_lab, drivers, VIP4)
    b = drivers.start("b", [VIP4], announce=QUICK)
    a.call("release")
    b.call("claim")
    start = time.monotonic()
    assert b.call("announce") == 4  # 2 rounds x (request + reply)
    answer = netns_lab.ask("client", address, PORT, timeout=1.0)
    elapsed = time.monotonic() - start
    assert (answer, elapsed < 1.0) == ("b", True)
    assert netns_lab.neigh("client")[address].mac == netns_lab.hosts["b"].mac


@pytest.mark.netns
@ROOT_AS_FOUND_AND_AS_DOCKER_HOST
def test_without_announcement_the_client_keeps_the_old_mac(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """Control case: a move without announcement leaves the client on a's MAC, unanswered."""
    a, address = _a_serves_the_vip(netns_lab, drivers, VIP4)
    b = drivers.start("b", [VIP4], announce=QUICK)
    a.call("release")
    b.call("claim")
    assert netns_lab.ask("client", address, PORT, timeout=0.5) is None
    assert netns_lab.neigh("client")[address].mac == netns_lab.hosts["a"].mac


@pytest.mark.netns
def test_both_gratuitous_arp_forms_reach_the_client(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """Captured at the client: `repeat` GARP requests and `repeat` GARP replies from b."""
    capture = drivers.start("client")
    capture.call("capture_start", ethertype=ETH_P_ARP)
    b = drivers.start("b", [VIP4], announce={"repeat": 3, "interval": 0.01, "delay": 0.0})
    b.call("claim")
    assert b.call("announce") == 6
    b_mac = bytes.fromhex(netns_lab.hosts["b"].mac.replace(":", ""))
    frames = wait_for_frames(capture, lambda frames: len(frames) >= 6, b_mac)
    gratuitous = [f for f in frames if f["spa"] == f["tpa"] == VIP4_IP]
    requests = [f for f in gratuitous if f["op"] == 1 and f["tha"] == bytes(6)]
    replies = [f for f in gratuitous if f["op"] == 2 and f["tha"] == b_mac]
    assert (len(requests), len(replies), len(gratuitous)) == (3, 3, 6)
    assert all(f["eth_dst"] == b"\xff" * 6 and f["sha"] == b_mac for f in gratuitous)
    stats = b.call("stats")
    assert stats["announcements_sent"] == 6
    assert stats["last_announcement"] == pytest.approx(time.time(), abs=5)


def wait_for_frames(
    capture: VipDriver, enough: Callable[[list[dict[str, Any]]], bool], src_mac: bytes
) -> list[dict[str, Any]]:
    """The ARP frames from ``src_mac`` a capture saw, once ``enough`` of them arrived (<= 1 s)."""
    seen: list[dict[str, Any]] = []

    def arrived() -> bool:
        frames = [_arp_fields(bytes.fromhex(hexed)) for hexed in capture.call("capture_peek")]
        seen[:] = [f for f in frames if f["eth_src"] == src_mac]
        return enough(seen)

    wait_for(arrived, timeout=1.0, interval=0.02)
    capture.call("capture_stop")
    return seen


@pytest.mark.netns
def test_announcements_follow_the_schedule_and_stop_when_released(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """First burst at once, second after `delay`, refreshes; silent once released; cancellable."""
    settings = {"repeat": 1, "interval": 0.0, "delay": 0.2, "refresh": 0.2}
    b = drivers.start("b", [VIP4], announce=settings)
    b.call("claim")
    b.call("start", job="announce_after_claim")

    def sent() -> int:
        return int(b.call("stats")["announcements_sent"])

    assert sent() == 2  # the first burst: one request and one reply
    wait_for(lambda: sent() >= 6, timeout=2.0)  # second burst, then at least one refresh
    b.call("release")
    quiet = sent()
    time.sleep(0.5)  # two refresh periods: the task runs on but has nothing to announce
    assert sent() == quiet
    b.call("cancel", job="announce_after_claim")


# --------------------------------------------------------------------------- probe


@pytest.mark.netns
def test_probe_finds_a_stale_holder_of_either_family(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """With the VIPs left on a, b's probe names a's MAC for each; after release, nothing."""
    a = drivers.start("a", [VIP4, VIP6])
    b = drivers.start("b", [VIP4, VIP6])
    a.call("claim")
    a_mac = netns_lab.hosts["a"].mac
    assert b.call("probe", window=0.3) == [f"{VIP4_IP} is at {a_mac}", f"{VIP6_IP} is at {a_mac}"]
    assert b.call("stats")["stale_holders_seen"] == 2
    a.call("release")
    assert b.call("probe", window=0.3) == []
    b.call("claim")  # our own copy is not a stale holder
    assert b.call("probe", window=0.3) == []
    assert b.call("stats")["stale_holders_seen"] == 2


@pytest.mark.netns
def test_probe_does_not_teach_the_client_anything(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """Probing from b while a holds the VIP leaves the client's cache pointing at a."""
    _, address = _a_serves_the_vip(netns_lab, drivers, VIP4)
    b = drivers.start("b", [VIP4])
    assert b.call("probe", window=0.2) == [f"{address} is at {netns_lab.hosts['a'].mac}"]
    assert netns_lab.neigh("client")[address].mac == netns_lab.hosts["a"].mac


# --------------------------------------------------------------------------- reconcile


@pytest.mark.netns
def test_reconcile_repairs_within_a_second_on_netlink_events_alone(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """Deleted by hand while held: back within 1 s. Added by hand while not: gone within 1 s.

    The backstop timer is set to 30 s, so only netlink events can make these repairs in time.
    """
    b = drivers.start("b", [VIP4, VIP6], announce=QUICK)
    b.call("start", job="reconcile", hold=True, backstop=30.0)
    wait_for(lambda: {VIP4, VIP6} <= netns_lab.addresses("b"), timeout=1.0)

    netns_lab.run("b", "ip", "addr", "del", VIP4, "dev", "eth0")
    restored = wait_for(lambda: VIP4 in netns_lab.addresses("b"), timeout=1.0)
    b.call("set_hold", value=False)
    wait_for(lambda: netns_lab.addresses("b").isdisjoint({VIP4, VIP6}), timeout=1.0)
    netns_lab.run("b", "ip", "addr", "add", VIP6, "dev", "eth0", "nodad")
    removed = wait_for(lambda: VIP6 not in netns_lab.addresses("b"), timeout=1.0)

    assert max(restored, removed) < 1.0
    assert b.call("repairs") == [
        f"restored {VIP4} on eth0",
        f"restored {VIP6} on eth0",
        f"restored {VIP4} on eth0",
        f"removed {VIP4} on eth0",
        f"removed {VIP6} on eth0",
        f"removed {VIP6} on eth0",
    ]
    assert b.call("stats")["repairs"] == 6
    b.call("cancel", job="reconcile")


@pytest.mark.netns
def test_reconcile_backstop_notices_what_no_event_reports(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """should_hold turning true makes no netlink event; the 0.5 s backstop claims within 1 s."""
    b = drivers.start("b", [VIP4], announce=QUICK)
    b.call("start", job="reconcile", hold=False)
    time.sleep(0.1)  # the first check has run and found nothing to do
    b.call("set_hold", value=True)
    assert wait_for(lambda: VIP4 in netns_lab.addresses("b"), timeout=1.0) < 1.0
    assert b.call("repairs") == [f"restored {VIP4} on eth0"]
    b.call("cancel", job="reconcile")


# --------------------------------------------------------------------------- IPv6


@pytest.mark.netns
def test_ipv6_vip_is_usable_at_once_and_na_moves_the_client(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """No DAD wait (never 'tentative'); the unsolicited NA repoints the client's cache to b."""
    a, address = _a_serves_the_vip(netns_lab, drivers, VIP6)
    claimed = _details(netns_lab, "a", address)
    assert (claimed.get("tentative", False), claimed.get("nodad", False)) == (False, True)
    # Deprecated on purpose: never chosen as the source of the host's own connections.
    assert claimed.get("deprecated", False) is True
    b = drivers.start("b", [VIP6], announce=QUICK)
    a.call("release")
    b.call("claim")
    assert _details(netns_lab, "b", address).get("tentative", False) is False
    assert netns_lab.neigh("client")[address].mac == netns_lab.hosts["a"].mac  # not told yet
    assert b.call("announce") == 2  # 2 rounds x one NA
    assert netns_lab.neigh("client")[address].mac == netns_lab.hosts["b"].mac
    assert netns_lab.ask("client", address, PORT, timeout=1.0) == "b"


# --------------------------------------------------------------------------- privileges


@pytest.mark.netns
def test_check_privileges_passes_as_root() -> None:
    """The test suite runs as root, which has every capability."""
    require_netns()
    check_privileges()


@pytest.mark.netns
def test_missing_capabilities_are_reported(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """With capabilities dropped (setpriv), every entry point names the one missing."""
    no_admin = drivers.start("a", prefix=_drop("net_admin"))
    with pytest.raises(DriverError, match="CAP_NET_ADMIN") as caught:
        no_admin.call("check_privileges")
    assert "CAP_NET_RAW" not in str(caught.value)
    no_admin.call("open", addresses=[VIP4])  # the raw socket needs CAP_NET_RAW only
    with pytest.raises(DriverError, match=r"VipPermissionError: .*CAP_NET_ADMIN"):
        no_admin.call("claim")
    assert VIP4 not in netns_lab.addresses("a")

    no_raw = drivers.start("a", prefix=_drop("net_raw"))
    with pytest.raises(DriverError, match="CAP_NET_RAW") as caught:
        no_raw.call("check_privileges")
    assert "CAP_NET_ADMIN" not in str(caught.value)
    with pytest.raises(DriverError, match=r"VipPermissionError: .*CAP_NET_RAW"):
        no_raw.call("open", addresses=[VIP4])

    neither = drivers.start("a", prefix=_drop("net_admin,-net_raw"))
    with pytest.raises(DriverError, match=r"CAP_NET_ADMIN .* and CAP_NET_RAW"):
        neither.call("check_privileges")


def _drop(caps: str) -> list[str]:
    # Root regains every capability in its bounding set at exec, so the bounding set is what
    # must lose them; no inheritable or ambient capability may bring them back.
    return ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set=-{caps}"]


@pytest.mark.netns
def test_open_names_a_missing_interface(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """open() on a missing interface fails naming it; release() there has nothing to remove."""
    a = drivers.start("a")
    with pytest.raises(DriverError, match="interface 'eth9' does not exist"):
        a.call("open", addresses=[VIP4], interface="eth9")
    a.call("open", addresses=[VIP4], interface="eth9", open_now=False)
    assert a.call("release")["removed"] == []
    with pytest.raises(DriverError, match="interface 'eth9' does not exist"):
        a.call("claim")


@pytest.mark.netns
def test_announce_on_a_down_link_sends_nothing_and_does_not_raise(
    netns_lab: NetnsLab,  # noqa: F811
    drivers: Drivers,
) -> None:
    """A dead link must not kill the announcer; it counts only what really went out."""
    b = drivers.start("b", [VIP4], announce=QUICK)
    b.call("claim")
    netns_lab.link_down("b", side="host")
    assert b.call("announce") == 0
    netns_lab.link_up("b", side="host")
    assert b.call("announce") == 4
    assert b.call("stats")["announcements_sent"] == 4


# --------------------------------------------------------------------------- the lab itself


@pytest.mark.netns
def test_lab_close_leaves_no_namespace_or_process_behind() -> None:
    """close() kills the lab's processes and deletes its namespaces, even after a failure."""
    require_netns()
    before = list_netns()
    used: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="test body failed"):
        _use_a_lab_then_fail(used)
    lab, server = used["lab"], used["server"]
    assert server.poll() is not None
    assert not {name for name in list_netns() if name.startswith(lab.tag)}
    # Nothing else was touched (other labs may come and go meanwhile: parallel runs).
    others = {name for name in before if not name.startswith(f"{lab_module.PREFIX}-")}
    assert others <= list_netns()
    lab.close()  # idempotent


@pytest.mark.netns
def test_labs_left_open_are_cleaned_at_exit_or_by_the_next_lab() -> None:
    """atexit closes a lab its process forgot; a SIGKILLed run's namespaces get swept later."""
    require_netns()
    forgetful = (
        "from tests.netns_lab import NetnsLab; lab = NetnsLab(); lab.start(); "
        "print(lab.tag, flush=True)"
    )
    tag = _run_python(forgetful).stdout.strip()
    assert tag.startswith(f"{lab_module.PREFIX}-")
    assert not {name for name in list_netns() if name.startswith(tag)}

    killed = forgetful + "; import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    tag = _run_python(killed, check=False).stdout.strip()
    assert tag.startswith(f"{lab_module.PREFIX}-")
    assert {name for name in list_netns() if name.startswith(tag)}  # left behind
    with NetnsLab():  # starting any lab sweeps namespaces whose creator is dead
        assert not {name for name in list_netns() if name.startswith(tag)}


@pytest.mark.netns
def test_lab_namespaces_never_forward_whatever_the_root_has() -> None:
    """With ip_forward=1 in the root, which a bare new namespace copies, every lab namespace
    still has forwarding off (IPv4 and IPv6: all, default, eth0) and the other settings the lab
    relies on, and no bridge netfilter in the switch; the root's value is back afterwards."""
    require_netns()
    before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    eth0_forwarding = {f"net.ipv{v}.conf.eth0.forwarding": "0" for v in (4, 6)}
    # Where br_netfilter is not loaded its settings do not exist, in the switch either.
    bridge_loaded = Path("/proc/sys/net/bridge").exists()
    switch_wanted = {key: value if bridge_loaded else None for key, value in SWITCH_SYSCTLS.items()}
    wanted = {host: {**HOST_SYSCTLS, **eth0_forwarding} for host in lab_module.HOSTS}
    wanted["switch"] = {**HOST_SYSCTLS, **switch_wanted}
    with root_sysctls(DOCKER_HOST):
        assert _bare_namespace_sysctl("net.ipv4.ip_forward") == "1"  # what the lab must undo
        with NetnsLab() as lab:
            found = {ns: {key: lab.sysctl(ns, key) for key in keys} for ns, keys in wanted.items()}
    assert found == wanted
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == before


def _bare_namespace_sysctl(key: str) -> str:
    """A sysctl as a new namespace gets it, before anyone sets it."""
    name = f"{lab_module.PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-bare"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        path = "/proc/sys/" + key.replace(".", "/")
        shown = subprocess.run(
            ["ip", "netns", "exec", name, "cat", path], capture_output=True, text=True, check=True
        )
        return shown.stdout.strip()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _run_python(code: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=check
    )


def _use_a_lab_then_fail(used: dict[str, Any]) -> None:
    with NetnsLab() as lab:
        used["lab"] = lab
        used["server"] = lab.serve_name("a", "a", PORT)
        assert {h.netns for h in lab.hosts.values()} | {lab.switch} <= list_netns()
        assert lab.ask("client", lab.hosts["a"].ipv4, PORT) == "a"
        raise RuntimeError("test body failed")


# --------------------------------------------------------------------------- driver entry point


def _driver_main() -> None:
    # stdout carries the protocol; logs go to stderr (a file the test names).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(_Driver().serve())


if __name__ == "__main__":
    _driver_main()
