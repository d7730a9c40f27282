"""Where the operator reaches each KM and emulated module.

In a cluster every KM is reached through its Service's DNS name, so the address survives
pod replacement. Outside a cluster (tests, or a development loop against processes started
by ``vqkd up``) the same questions are answered from that runtime's ``endpoints.json``, so
the operator talks to real processes on loopback while the API server is an emulator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from vqkd.operator.kopf.manifests import ClusterAddressing


class EndpointResolver(Protocol):
    def km_grpc(self, node: str, replica: int = 0) -> str:
        """host:port of the gRPC service (KeyManagerControl, health) of one replica of the node's KMs."""

    def km_etsi014(self, node: str) -> str:
        """Base URL of the KM's ETSI GS QKD 014 API, as the node's SAEs reach it."""

    def km_metrics(self, node: str) -> str:
        """URL of the KM's Prometheus metrics."""

    def module_metrics(self, link: str) -> str | None:
        """URL of an emulated module pair's metrics; None when the link has none to offer."""


class ClusterEndpoints:
    """Service DNS names in the operator's namespace."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.addressing = ClusterAddressing(namespace)

    def km_grpc(self, node: str, replica: int = 0) -> str:
        return self.addressing.km(node, replica).grpc

    def km_etsi014(self, node: str) -> str:
        return self.addressing.km(node).etsi014_url

    def km_metrics(self, node: str) -> str:
        return self.addressing.km(node).metrics_url

    def module_metrics(self, link: str) -> str | None:
        return self.addressing.module(link).metrics_url


class LocalEndpoints:
    """The endpoints a local runtime published (``LocalNetwork.endpoints``, ``endpoints.json``)."""

    def __init__(self, endpoints: dict[str, Any]):
        self.endpoints = endpoints

    @classmethod
    def from_file(cls, path: str | Path) -> LocalEndpoints:
        try:
            return cls(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such endpoints file; `vqkd up` writes one into its state directory") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON: {e}") from None

    def _node(self, node: str) -> dict[str, str]:
        try:
            return self.endpoints["nodes"][node]
        except KeyError:
            known = ", ".join(sorted(self.endpoints.get("nodes", {}))) or "none"
            raise LookupError(f"no endpoints for node {node!r} in the local runtime (known: {known})") from None

    def km_grpc(self, node: str, replica: int = 0) -> str:
        entry = self._node(node)  # its own grpc is replica 0's; "replicas" lists every replica's
        return (entry["replicas"][replica] if replica else entry)["grpc"]

    def km_etsi014(self, node: str) -> str:
        return self._node(node)["etsi014_url"]

    def km_metrics(self, node: str) -> str:
        return self._node(node)["metrics_url"]

    def module_metrics(self, link: str) -> str | None:
        return self.endpoints.get("links", {}).get(link, {}).get("metrics_url")
