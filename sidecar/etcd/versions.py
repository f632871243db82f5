"""etcd releases: which lack the fix for etcd-io/etcd#15247 and what the guard costs, and which
can lose committed writes (etcd's own advisories; nothing the sidecar can guard).

Pure functions of a version string and the settings; the guard itself (the checks through
another member, the takeover wait) is carried out by :mod:`sidecar.etcd.election`.
"""

from __future__ import annotations

import re

from ..settings import Settings

# -- etcd-io/etcd#15247 ----------------------------------------------------------------------
#
# A primary whose lease was revoked early still believes its local deadline, which lies up to a
# TTL ahead; only learning of the revoke ends that belief. So, on an affected etcd only:
# (a) the primary learns through any member: a keepalive that fails, or whose answer is slow
#     (a stalled member, or one that just resumed), has the lease checked through another
#     member (TimeToLive, which a follower forwards to the raft leader); a slow answer never
#     renews the deadline on its own, the check does. So the deposed primary steps down within
#     one keepalive interval plus that slowness of the revoke (its watch often sooner);
# (b) a node that wins the leader key after an involuntary loss (the key went with its
#     holder's lease, not a handover) waits that long plus the safety margin before it turns
#     PRIMARY, claims the resource IP and serves (takeover_wait).
# Planned moves (the holder deleted its key while its lease lived, or a switchover request
# names the winner) and etcd releases with the fix skip the wait.

# First release of each series with the fix (etcd-io/etcd#16822 and its backports); 3.6.0 on.
FIXED_15247 = {(3, 4): (3, 4, 31), (3, 5): (3, 5, 13)}
# A keepalive answer later than this fraction of the interval is checked through another member.
SLOW_KEEPALIVE = 0.5
# Members' versions are asked again at a lease grant at most this often (rolling upgrades).
VERSION_RECHECK = 300.0
_RELEASE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


def release_numbers(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string such as ``3.5.1`` or ``v3.6.0-rc.1``; None
    when it has none."""
    match = _RELEASE.match(version.strip())
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def affected_by_15247(version: str) -> bool:
    """Whether this etcd release lacks the fix for etcd-io/etcd#15247 (a resumed stale leader
    revokes leases early). Pre-release suffixes are ignored; an unreadable version counts as
    affected (the guard costs a little failover time, its absence a double primary)."""
    release = release_numbers(version)
    if release is None:
        return True
    if release >= (3, 6, 0):
        return False
    fixed = FIXED_15247.get((release[0], release[1]))
    return fixed is None or release < fixed


# -- releases that can lose committed writes --------------------------------------------------
#
# etcd's advisories name releases in which a member can end up without transactions the
# cluster committed: writes the sidecar had acknowledged then differ between members, and a
# standby that follows such a member holds what that member holds. The sidecar cannot undo
# that; every release the #15247 fix asks for (upgrade_target) has these fixes too.
_AUTH_MEMBER_ADDED = ("with authentication on, a member added to the cluster can apply writes "
                      "differently (etcd's advisory of November 2022)")
# (first affected, first fixed, what happens)
_LOSES_WRITES = (
    ((3, 5, 0), (3, 5, 3), "a member killed under load can skip committed transactions "
     "(etcd-io/etcd#13766)"),
    ((3, 5, 0), (3, 5, 6), "a member that crashes while defragmenting can skip or re-apply "
     "transactions (etcd-io/etcd#14685)"),
    ((3, 4, 20), (3, 4, 22), _AUTH_MEMBER_ADDED),
    ((3, 5, 5), (3, 5, 6), _AUTH_MEMBER_ADDED),
)


def write_loss(version: str) -> str | None:
    """How this etcd release can lose committed writes, by etcd's advisories; None when
    they name none. An unreadable version is not judged here (see affected_by_15247)."""
    release = release_numbers(version)
    if release is None:
        return None
    found = [what for first, fixed, what in _LOSES_WRITES if first <= release < fixed]
    return "; ".join(found) or None


def upgrade_target(version: str) -> str:
    """The first release with the fix in this version's series (3.5's for older ones)."""
    release = release_numbers(version)
    if release is not None and release[:2] == (3, 4):
        return "3.4.31"
    return "3.5.13"


def takeover_wait(settings: Settings) -> float:
    """How long a new primary waits after an involuntary loss on an affected etcd: the deposed
    primary's next keepalive (one interval), the slowness after which its answer is checked
    through another member, and the safety margin for that check's round trip."""
    return settings.keepalive_interval * (1 + SLOW_KEEPALIVE) + settings.margin
