"""ETSI 014 clients for the SAEs of a local network, from its endpoints.json content."""

from __future__ import annotations

from pathlib import Path

from vqkd.km.etsi014.client import ETSI014Client
from vqkd.km.tls import TLSFiles


def sae_tls(endpoints: dict, sae: str) -> TLSFiles:
    info = endpoints["saes"][sae]
    return TLSFiles(Path(endpoints["ca_cert"]), Path(info["cert"]), Path(info["key"]))


def sae_client(endpoints: dict, sae: str) -> ETSI014Client:
    """A client of the KM the SAE is attached to, presenting the SAE's certificate."""
    node = endpoints["saes"][sae]["node"]
    return ETSI014Client(endpoints["nodes"][node]["etsi014_url"], sae_tls(endpoints, sae))
