"""Everything that talks to etcd: the client, the election, switchover requests."""
