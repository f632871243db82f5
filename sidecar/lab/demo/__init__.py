"""``vsm-sidecar demo``: watch two sidecars elect, fail over, fail back and switch over.

Nothing to set up: the demo starts a real 3-member etcd cluster (the bundled etcd binary), two
real sidecar processes, ``vsm-a`` (the preferred primary) and ``vsm-b``, and beside each a
stand-in VSM server (``vsm-sidecar vsm-standin``) that serves only while its sidecar is
PRIMARY, all in one temporary work directory. As root, where network namespaces can be made,
the sidecars and their stand-ins run in two hosts of a namespace lab (:mod:`sidecar.lab.netlab`)
with a real resource IP that a third host, the client, reaches; ``VSM_DEMO_NETNS=0`` keeps
them on loopback, without a resource IP. It plays a few scenes (election, sessions, crash
failover, restart and failback, planned switchover, etcd member loss), each with a measured
result, under a live table of what every process reports. Ctrl-C, SIGTERM or a closed terminal
(SIGHUP) at any time kills everything it started and removes the directory and the namespaces.

Times are measured the way a VSM server would see them: from the fault to the arrival of the
survivor's WatchRole message saying PRIMARY (:class:`~sidecar.lab.localnode.RoleRecorder`).
"""

from .run import main

__all__ = ["main"]
