"""What the demo runs and how long it waits: the shared vocabulary of :mod:`sidecar.lab.demo`."""

from __future__ import annotations

CLUSTER = "demo"
NODE_IDS = ("vsm-a", "vsm-b")
FAILBACK_DELAY_S = 2
# vsm-a is the node ThinLinc calls primary: it takes the role back after a failover.
NODE_ARGS = {"vsm-a": ("--preferred-primary", "--failback-delay", str(FAILBACK_DELAY_S))}

PROBE_TIMEOUT_S = 0.3

# Generous on purpose: the demo runs on laptops and busy CI machines alike. The measured times
# are what the demo is about; these only decide when to give up.
SETTLE_TIMEOUT_S = 30.0
FAILOVER_SLACK_S = 15.0  # on top of the TTL
EXIT_TIMEOUT_S = 10.0
ETCD_TIMEOUT_S = 30.0
RIDE_OUT_S = 2.0  # after an etcd member loss, watch this much longer than a TTL
# The shortest TTL that outlasts an etcd leader election at stock etcd timing (measured): with
# a shorter one the primary may fence itself, safely, so scene 5 shows that instead of failing.
RIDE_OUT_TTL = 3
# A stand-in that exits this soon after its start is a placeholder: this build has none.
STANDIN_GRACE_S = 1.0
RPC_TIMEOUT_S = 5.0

# The resource IP, where the sidecars run in network namespaces (root only).
NETNS_ENV = "VSM_DEMO_NETNS"  # "0": stay on loopback, without a resource IP
LAB_HOSTS = {"vsm-a": "a", "vsm-b": "b"}  # node id -> lab host
VIP_OCTET = 50  # the resource IP is <lab subnet>.50/24 on eth0
VIP_PORT = 9000  # the stand-ins listen on 0.0.0.0:9000 in their host, so the VIP reaches them
# Each look through the resource IP runs a short Python in the client's namespace: twice a
# second is enough. Who holds it (a quick ``ip addr``) is looked at every refresh.
VIP_ASK_EVERY_S = 0.5
VIP_ASK_TIMEOUT_S = 0.3


class SceneFailed(Exception):
    """A scene's expectation was not met in time; the message says what was seen instead."""

