"""The core room: the node's rules as pure functions (no etcd, no clock)."""
