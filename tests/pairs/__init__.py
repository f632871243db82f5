"""Two real sidecar processes on a real etcd cluster: election, failover, failback."""
