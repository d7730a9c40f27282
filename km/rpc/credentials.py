"""Mutual TLS for gRPC: credentials made from a ``TLSFiles``, and who the caller is.

Every gRPC server and channel of vqkd (KM ⇄ KM, control plane ⇄ KM) uses these, so both
ends of a call present certificates from the same CA and name their principal the same way
(``vqkd.km.identity``).
"""

from __future__ import annotations

import grpc

from vqkd.km import identity
from vqkd.km.tls import TLSFiles


def grpc_server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def grpc_channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def peer_identity(context: grpc.aio.ServicerContext) -> identity.Identity | None:
    """The identity in the caller's client certificate, or None if it names none."""
    certs = context.auth_context().get("x509_pem_cert")
    return identity.from_pem(certs[0]) if certs else None
