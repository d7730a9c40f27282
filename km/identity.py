"""Who is on the other end of a TLS connection.

Every certificate vqkd issues or accepts names exactly one principal in a URI subject
alternative name, ``vqkd://<kind>/<name>``: an application (``sae``), a key manager
(``km``), one end of a QKD module (``module``) or the control plane (``controller``).
The kind keeps a key manager from posing as an application and vice versa.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509

SCHEME = "vqkd://"


class PrincipalKind(StrEnum):
    """What kind of principal a certificate names (a KM's part in a session is ``vocabulary.Role``)."""

    SAE = "sae"
    KM = "km"
    MODULE = "module"
    CONTROLLER = "controller"


@dataclass(frozen=True, slots=True)
class Identity:
    kind: PrincipalKind
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.kind.value}/{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> Identity:
        if not uri.startswith(SCHEME):
            raise ValueError(f"identity {uri!r} must start with {SCHEME!r}")
        kind, sep, name = uri[len(SCHEME):].partition("/")
        if not sep or not name:
            raise ValueError(f"identity {uri!r} must look like {SCHEME}<kind>/<name>")
        try:
            return cls(PrincipalKind(kind), name)
        except ValueError:
            kinds = ", ".join(k.value for k in PrincipalKind)
            raise ValueError(f"identity {uri!r} has unknown kind {kind!r}; expected one of {kinds}") from None


def sae(name: str) -> Identity:
    return Identity(PrincipalKind.SAE, name)


def km(node: str) -> Identity:
    return Identity(PrincipalKind.KM, node)


def module(link: str, end: str) -> Identity:
    return Identity(PrincipalKind.MODULE, f"{link}/{end}")


def controller(name: str = "control-plane") -> Identity:
    return Identity(PrincipalKind.CONTROLLER, name)


def _from_certificate(cert: x509.Certificate) -> Identity | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SCHEME):
            try:
                return Identity.parse(uri)
            except ValueError:
                return None
    return None


@functools.lru_cache(maxsize=4096)
def from_der(der: bytes) -> Identity | None:
    """The identity in a DER certificate (as ``ssl`` hands out), or None if it names none."""
    return _from_certificate(x509.load_der_x509_certificate(der))


@functools.lru_cache(maxsize=4096)
def from_pem(pem: bytes) -> Identity | None:
    """The identity in a PEM certificate (as gRPC's auth context hands out)."""
    return _from_certificate(x509.load_pem_x509_certificate(pem))
