"""The network plan: every process's configuration, derived once from the declared resources.

A network of QKDNodes and QKDLinks becomes the KMs of each node (``spec.km.replicas`` of them,
one KME to its applications) — each one's identity (``KMConfig``,
what its process starts with) and its topology (``KMTopology``: SAE directory, links, key
limits, what changes with the network and a running KM takes live) — and one emulated QKD
module pair per emulated link (``EmulatedLinkConfig``), plus the endpoints a runtime
publishes for them. Both runtimes derive these from the same functions here; what differs
between them is only the *addressing*: where each process listens, where the others reach
it and where it finds its TLS files. The local runtime passes the loopback ports it
allocated and the certificates it issued into its state directory; the cluster passes
Service DNS names, fixed container ports and the paths at which its pods mount Secrets.

Pure: no sockets, files or clock; the addressing is data the runtime prepared beforehand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from vqkd.km import identity
from vqkd.km.config import EmulatedLinkConfig, KMConfig, KMTopology, LinkEndConfig, ModuleEndConfig, TLSPaths
from vqkd.operator.resources.models import QKDLink, QKDNode

End = Literal["a", "b"]
ENDS: tuple[End, End] = ("a", "b")  # end "a" of a module pair serves spec.nodes[0]

PULLS_PER_SECOND = 20  # how often a KM should be able to draw a full block on a slow link
# The largest key a KM draws from a QKD module. The KMs draw the largest size both module ends
# accept up to this bound (km/domain/devices.fit_block_bits), so on a link to real devices the
# devices' own max_key_size decides unless it is larger. The bound is what one draw costs the KMs,
# not a guess about any device: up to 512 keys (MAX_BLOCKS_PER_DRAW) arrive in one JSON answer,
# 0.7 MB at 8192 bits, parsed while the KM's requests wait.
MAX_BLOCK_BITS = 8192


class PlanError(ValueError):
    """A declared resource the runtime planning it cannot realise; the message says which and why."""


@dataclass(frozen=True)
class KMAddress:
    """Where one KM replica of a node binds its servers, and where the others reach it."""

    etsi014_listen: str
    grpc_listen: str
    metrics_listen: str
    etsi014_url: str  # base URL of the node's ETSI 014 API, for its SAEs: one for all its replicas
    grpc: str  # host:port of this replica's gRPC services, for the control plane and the peer KMs
    metrics_url: str


@dataclass(frozen=True)
class ModuleAddress:
    """Where an emulated module pair binds its two ends and its admin server, and where they are reached."""

    end_listen: Mapping[End, str]
    end_urls: Mapping[End, str]  # https base URL of each end's ETSI 014 API, for the KM of its node
    admin_listen: str
    control_url: str
    metrics_url: str


class Addressing(Protocol):
    """What a runtime decides about where its processes are; the plan decides everything else."""

    @property
    def control_plane(self) -> str | None:
        """The ControlPlane gRPC address every KM reports to; None runs the KMs without one."""

    def km(self, node: str, replica: int = 0) -> KMAddress:
        """Where replica ``replica`` of the node's KMs is (0 for a node with one KM)."""

    def module(self, link: str) -> ModuleAddress: ...

    def km_tls(self, node: str) -> TLSPaths:
        """The TLS files of a node's KM."""

    def module_tls(self, link: str, end: End) -> TLSPaths:
        """The TLS files of one end of an emulated module pair."""

    def device_tls(self, link: str, node: str) -> TLSPaths:
        """The credentials a node's KM presents at its end of a link to real devices (``spec.etsi014``)."""


class DeclaredNetwork(Protocol):
    """What the plan reads of a network: its nodes and links by name (a loaded ``Network``, the operator's cache)."""

    @property
    def nodes(self) -> Mapping[str, QKDNode]: ...

    @property
    def links(self) -> Mapping[str, QKDLink]: ...


@dataclass(frozen=True)
class KMReplicaEndpoints:
    """Where one replica of a node's KMs is reached: its own gRPC services and metrics."""

    grpc: str
    metrics_url: str


@dataclass(frozen=True)
class KMEndpoints:
    """Where a node's KMs are reached, as a runtime publishes it: the node's KME (one ETSI 014
    URL, whichever replica answers) and each replica by ordinal. ``grpc`` and ``metrics_url``
    are replica 0's, the replica every node has."""

    kme_id: str
    etsi014_url: str
    grpc: str
    metrics_url: str
    replicas: tuple[KMReplicaEndpoints, ...]


@dataclass(frozen=True)
class ModuleEndpoints:
    """Where an emulated link's module pair is controlled and scraped, as a runtime publishes it."""

    nodes: tuple[str, str]
    control_url: str
    metrics_url: str


@dataclass(frozen=True)
class NetworkPlan:
    """Every process a runtime starts for a network, and what it publishes about them."""

    kms: dict[str, list[KMConfig]]  # node -> each of its KM replicas' identity and process settings, by ordinal
    topologies: dict[str, KMTopology]  # node -> its KMs' topology (version 0: the control plane versions pushes)
    modules: dict[str, EmulatedLinkConfig]  # emulated link -> its module pair's configuration
    km_endpoints: dict[str, KMEndpoints]
    module_endpoints: dict[str, ModuleEndpoints]
    saes: dict[str, str]  # SAE ID -> the node it is attached to


def block_bits_for(secret_rate_bps: float) -> int:
    """Blocks a KM draws from its module: large on fast links, small enough on slow ones
    that key becomes usable within a fraction of a second."""
    bits = int(secret_rate_bps / PULLS_PER_SECOND) // 256 * 256
    return max(256, min(MAX_BLOCK_BITS, bits))


def sae_directory(network: DeclaredNetwork) -> dict[str, str]:
    """Every SAE of the network and the node it is attached to: each KM holds all of them."""
    return {sae: name for name, node in sorted(network.nodes.items()) for sae in node.spec.sae_ids}


def replicas_of(network: DeclaredNetwork, node: str) -> range:
    """The replica ordinals of a declared node's KMs."""
    return range(network.nodes[node].spec.km.replicas)


def km_config(network: DeclaredNetwork, node: str, addressing: Addressing, replica: int = 0) -> KMConfig:
    """The identity and process settings of one KM replica of a node: what its process starts with.

    Nothing in it depends on other nodes or links, so changing the network leaves it as it is.
    """
    address = addressing.km(node, replica)
    return KMConfig(
        node=node, kme_id=network.nodes[node].kme_id, replica=replica,
        etsi014_listen=address.etsi014_listen, grpc_listen=address.grpc_listen,
        metrics_listen=address.metrics_listen, tls=addressing.km_tls(node),
        control_plane=addressing.control_plane,
    )


def km_topology(network: DeclaredNetwork, node: str, addressing: Addressing, version: int = 0) -> KMTopology:
    """The topology of a node's KMs, the same for each of its replicas: every SAE of the network,
    an end of each of the node's links per replica of the peer node, the node's own replicas
    and its key limits.

    Only links whose other node is declared are included: a KM cannot reach a peer that does
    not exist, and the link is configured once both nodes do.
    """
    links = [
        _link_end(name, link, node, network.nodes[peer], peer_replica, addressing)
        for name, link in sorted(network.links.items())
        if node in link.spec.nodes and (peer := _other(link, node)) in network.nodes
        for peer_replica in replicas_of(network, peer)
    ]
    replicas = {replica: addressing.km(node, replica).grpc for replica in replicas_of(network, node)}
    return KMTopology(version=version, saes=sae_directory(network), links=links,
                      limits=network.nodes[node].spec.km.key_limits(), replicas=replicas)


def module_config(link: QKDLink, addressing: Addressing) -> EmulatedLinkConfig:
    """The configuration of an emulated link's module pair; end ``a`` serves ``spec.nodes[0]``."""
    emulated = link.spec.emulated
    if emulated is None:
        raise PlanError(f"QKDLink {link.name} has no emulated key source; only emulated links get module workloads")
    address = addressing.module(link.name)
    ends = {
        end: ModuleEndConfig(
            listen=address.end_listen[end], sae_id=node, client=identity.km(node).uri, kme_id=f"{link.name}-{end}",
            tls=addressing.module_tls(link.name, end),
        )
        for end, node in zip(ENDS, link.spec.nodes)
    }
    return EmulatedLinkConfig(
        link=link.name, key_rate_bps=emulated.key_rate_bps, qber=emulated.qber, buffer_bits=emulated.buffer_bits,
        device=emulated.device_profile(), admin_listen=address.admin_listen, ends=ends,
    )


def plan_network(network: DeclaredNetwork, addressing: Addressing) -> NetworkPlan:
    """Every process of the network: a KM per replica of each node, a module pair per emulated
    link, and their endpoints."""
    emulated = {name: link for name, link in sorted(network.links.items()) if link.spec.emulated is not None}
    kms = {name: [km_config(network, name, addressing, replica) for replica in replicas_of(network, name)]
           for name in sorted(network.nodes)}
    topologies = {name: km_topology(network, name, addressing) for name in sorted(network.nodes)}
    km_endpoints = {}
    for name, configs in kms.items():
        addresses = [addressing.km(name, config.replica) for config in configs]
        first = addresses[0]
        km_endpoints[name] = KMEndpoints(
            configs[0].kme_id, first.etsi014_url, first.grpc, first.metrics_url,
            tuple(KMReplicaEndpoints(address.grpc, address.metrics_url) for address in addresses))
    module_endpoints = {}
    for name, link in emulated.items():
        address = addressing.module(name)
        a, b = link.spec.nodes
        module_endpoints[name] = ModuleEndpoints((a, b), address.control_url, address.metrics_url)
    return NetworkPlan(
        kms=kms, topologies=topologies,
        modules={name: module_config(link, addressing) for name, link in emulated.items()},
        km_endpoints=km_endpoints, module_endpoints=module_endpoints, saes=sae_directory(network),
    )


def _other(link: QKDLink, node: str) -> str:
    a, b = link.spec.nodes
    return b if node == a else a


def _link_end(name: str, link: QKDLink, node: str, peer: QKDNode, peer_replica: int,
              addressing: Addressing) -> LinkEndConfig:
    """This node's side of a link towards one replica of the peer's KMs: that KM, and the module
    end this node draws key from."""
    common = dict(name=name, peer_node=peer.name, peer_kme_id=peer.kme_id, peer_replica=peer_replica,
                  peer_grpc=addressing.km(peer.name, peer_replica).grpc)
    if link.spec.emulated is not None:
        end = ENDS[link.spec.nodes.index(node)]
        return LinkEndConfig(
            **common, module_url=addressing.module(name).end_urls[end],
            module_sae_id=node, peer_module_sae_id=peer.name,
            block_bits=block_bits_for(link.spec.emulated.key_rate_bps),
        )
    device = link.spec.etsi014.endpoints[node]
    # Nothing in the spec says what a device hands out: the KMs read it from both devices and
    # fit their blocks below this bound.
    return LinkEndConfig(
        **common, module_url=device.url, module_sae_id=device.sae_id, peer_module_sae_id=device.peer_sae_id,
        module_tls=addressing.device_tls(name, node), block_bits=MAX_BLOCK_BITS,
    )
