"""Benchmarks: programs that print figures (``python -m tests.bench.<name>``), not timed tests.

Each measures on real processes (a local etcd cluster, real sidecars) and prints its method,
its samples as they come, and a summary table that can go into ``docs/BENCHMARKS.md`` as is.
"""
