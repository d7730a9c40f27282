"""A network's declared resources, each kind by name: what the loader fills and the runtimes keep.

Plain containers over the resource models, with no parser behind them, so the control core
and the kopf runtime use them without reading YAML (``loader`` reads manifests into one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from vqkd.operator.resources.models import KeySession, QKDLink, QKDNode, Resource, UserProfile


@dataclass(frozen=True)
class Origin:
    """Where a resource was declared: a manifest file and the document in it."""

    file: str
    document: int  # 1-based, as an editor counts them

    def __str__(self) -> str:
        return f"{self.file}: document {self.document}"


@dataclass
class Network:
    """The validated resources of one network, each kind by name."""

    namespace: str = "default"
    nodes: dict[str, QKDNode] = field(default_factory=dict)
    links: dict[str, QKDLink] = field(default_factory=dict)
    users: dict[str, UserProfile] = field(default_factory=dict)
    sessions: dict[str, KeySession] = field(default_factory=dict)
    origins: dict[tuple[str, str], Origin] = field(default_factory=dict)

    def of_kind(self, kind: str) -> dict[str, Resource]:
        by_kind: dict[str, dict] = {
            "QKDNode": self.nodes, "QKDLink": self.links, "UserProfile": self.users, "KeySession": self.sessions,
        }
        return by_kind[kind]

    def resources(self) -> Iterator[Resource]:
        """Every resource, those referred to before those referring to them."""
        for group in (self.nodes, self.links, self.users, self.sessions):
            yield from group.values()

    def origin(self, resource: Resource) -> Origin:
        return self.origins[resource.kind, resource.name]

    def node_of_sae(self, sae_id: str) -> str | None:
        return next((name for name, node in self.nodes.items() if sae_id in node.spec.sae_ids), None)

    def owner_of_sae(self, sae_id: str) -> str | None:
        return next((name for name, user in self.users.items() if sae_id in user.spec.sae_ids), None)

    def link_between(self, a: str, b: str) -> QKDLink | None:
        return next((link for link in self.links.values() if sorted(link.spec.nodes) == sorted((a, b))), None)
