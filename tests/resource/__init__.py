"""The resource IP, in network namespaces."""
