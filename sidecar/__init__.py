"""vsm-sidecar: etcd-backed leader election that makes the ThinLinc VSM server highly available."""

from __future__ import annotations

__version__ = "0.1.0"
