"""The etcd room against a real etcd cluster: elections, garbage, security."""
