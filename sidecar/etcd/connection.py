"""The endpoints of the etcd client: their TLS credentials and password, and failing over
from one that does not answer to another.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import etcd3
import grpc

from ..settings import Settings
from .errors import TRANSIENT_CODES

# How long an endpoint that failed is skipped before it is tried again.
ENDPOINT_RETRY_SECONDS = 1.0


def endpoints(settings: Settings) -> list[etcd3.Endpoint]:
    creds = None
    secure = urlsplit(settings.etcd_endpoints[0]).scheme == "https"
    if secure:
        creds = _tls_credentials(settings)
    result = []
    for url in settings.etcd_endpoints:
        parts = urlsplit(url)
        result.append(etcd3.Endpoint(parts.hostname or "", parts.port or 2379, secure=secure,
                                     creds=creds, time_retry=ENDPOINT_RETRY_SECONDS))
    return result


def _tls_credentials(settings: Settings) -> grpc.ChannelCredentials:
    def read(path: Any) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(
        read(settings.etcd_ca), read(settings.etcd_key), read(settings.etcd_cert))


def password(settings: Settings) -> str | None:
    if settings.etcd_password_file is None:
        return None
    return settings.etcd_password_file.read_text(encoding="utf-8").rstrip("\r\n")


def revive_if_all_failed(client: Any) -> None:
    """Never let every endpoint be "failed" at once.

    The client skips a failed endpoint for ENDPOINT_RETRY_SECONDS and, when all are skipped,
    refuses every call without trying. During an etcd leader election every member times out
    for a moment, so all get marked, and the client would then stay silent for a second after
    etcd is back: a second the primary's lease deadline does not have. The endpoint that failed
    longest ago is tried again instead.
    """
    endpoints = list(client.endpoints.values())
    if endpoints and all(e.is_failed() for e in endpoints):
        min(endpoints, key=lambda e: e.last_failed).last_failed = 0


def fail_over(client: Any, exc: grpc.RpcError) -> None:
    """Skip this endpoint for a while so the next call or watch goes to another one.

    The next access to ``client.channel`` then picks another endpoint and drops the stubs bound
    to the failed one.
    """
    if hasattr(exc, "code") and exc.code() in TRANSIENT_CODES:
        endpoint = client.endpoint_in_use
        if endpoint is not None:
            endpoint.fail()
