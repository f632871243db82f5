"""Test certificates made with the ``openssl`` command line (``cryptography`` is not installed).

:func:`make_pki` writes a CA, a server certificate for 127.0.0.1 (IP SAN) and a client
certificate signed by that CA, plus an unrelated second CA with its own client certificate:
the "wrong certificate" a server that trusts only the first CA must refuse.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DAYS = "2"


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: CertPair
    client: CertPair
    other_ca: Path
    other_client: CertPair  # signed by other_ca, which the server does not trust


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False,
                            timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path))
    return path


def _ca(directory: Path, name: str) -> CertPair:
    key = _key(directory / f"{name}.key")
    cert = directory / f"{name}.pem"
    _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", DAYS,
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return CertPair(cert, key)


def _leaf(directory: Path, name: str, ca: CertPair, extensions: str) -> CertPair:
    key = _key(directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    cert = directory / f"{name}.pem"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-out", str(cert), "-days", DAYS, "-extfile", str(ext))
    return CertPair(cert, key)


def make_pki(directory: Path) -> Pki:
    """Write every certificate and key into ``directory`` (created if missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    server = _leaf(directory, "server", ca,
                   "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    client_ext = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                  "extendedKeyUsage=clientAuth\n")
    client = _leaf(directory, "client", ca, client_ext)
    other_ca = _ca(directory, "other-ca")
    other_client = _leaf(directory, "other-client", other_ca, client_ext)
    return Pki(ca.cert, server, client, other_ca.cert, other_client)
