"""What others talk to: gRPC role and sessions, HTTP, Prometheus metrics."""
