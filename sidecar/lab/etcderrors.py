"""The errors of the local etcd cluster harness, and how an etcd RPC error reads in them."""

from __future__ import annotations


class EtcdClusterError(RuntimeError):
    """The local cluster did not reach or keep the state a caller waited for."""


class EtcdMemberUnavailable(EtcdClusterError):
    """One member did not answer a Status request in time."""


class EtcdStartError(EtcdClusterError):
    """A member process exited while the cluster was starting."""


def rpc_reason(exc: BaseException) -> str:
    # grpc errors print as a multi-line blob; code and details are what a reader needs.
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{getattr(code(), 'name', code())}: {details()}"
    return repr(exc)
