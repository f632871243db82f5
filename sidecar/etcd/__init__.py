"""Everything that talks to etcd.

Leaves: ``errors`` (the EtcdError family), ``keys`` (the layout under the prefix), ``records``
(leader, switchover request and member values, garbage), ``lease`` (a lease's local deadline),
``versions`` (etcd releases and etcd-io/etcd#15247). On them: ``retry`` (the one retry policy),
``connection`` (endpoints, TLS, fail-over), ``watch``, ``client`` (calls off the event loop),
``election`` (campaign, keepalive, resign) and ``switchover`` (asking for a move).
"""
