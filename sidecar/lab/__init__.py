"""Test and demo tooling: local etcd clusters, a network lab, stand-in VSM servers."""
