"""This host: role hooks, the VSM server's health check, systemd notification."""
