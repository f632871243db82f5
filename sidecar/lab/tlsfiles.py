"""TLS files for the client URLs of a local etcd cluster's members."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TlsFiles:
    """TLS for the members' client URLs (peer traffic stays plain http).

    ``ca`` is the CA the members trust for client certificates (``--client-cert-auth``) and
    the one the cluster's own probes and :meth:`LocalEtcdCluster.client` trust for the server
    certificate, which must name the cluster's host (an IP SAN for 127.0.0.1). ``client_cert``
    and ``client_key`` are what those probes and clients present; without them they present
    none, and members with ``--client-cert-auth`` refuse them.
    """

    ca: Path
    cert: Path
    key: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")

    def server_args(self) -> tuple[str, ...]:
        return (f"--cert-file={self.cert}", f"--key-file={self.key}",
                f"--trusted-ca-file={self.ca}", "--client-cert-auth")

    def channel_credentials(self) -> Any:
        """gRPC channel credentials for a client of these members."""
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            read(self.ca), read(self.client_key), read(self.client_cert))
