"""Chaos suite: faults injected into real etcd members and real sidecar processes (issue 7)."""
