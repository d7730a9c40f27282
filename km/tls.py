"""The mutual-TLS file set of a principal, and the ``ssl`` contexts HTTPS (aiohttp) uses.

No gRPC here: the configuration models name a ``TLSFiles``, and whatever reads them (the
control core among others) must not pull in gRPC for it. The gRPC credentials made from
the same files are in ``vqkd.km.rpc.credentials``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TLSFiles:
    """The trust anchor and this principal's certificate and key (PEM paths)."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """Server side: TLS 1.2+, and every client must present a certificate from our CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def client_context(files: TLSFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx
