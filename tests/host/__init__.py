"""Hooks, health checks, systemd."""
