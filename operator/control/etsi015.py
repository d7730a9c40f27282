"""The ETSI GS QKD 015 view of the network (YANG module ``etsi-qkd-sdn-node``, root ``qkd_node``).

One document per node, as JSON-ready dicts, rendered from the topology, the routing's link
loads and the live sessions (each an ETSI 015 ``qkd_app``; a relayed one also a multi-hop
virtual link at every node of its path). ETSI 015 identifies nodes, links and interfaces
by UUID; vqkd derives them from the resource names (UUID v5) so they are stable across
restarts, and adds the name under a ``vqkd_`` key for people.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vqkd.operator.control.network_session import NetworkSession
from vqkd.operator.control.routing import LinkLoad
from vqkd.operator.control.topology import LinkRecord, NodeRecord, Topology
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.resources.models import LinkType, QoS

ETSI015_ROOT = "etsi-qkd-sdn-node:qkd_node"
_ETSI015_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "https://vqkd.io/etsi-qkd-sdn-node")


@dataclass(frozen=True, slots=True)
class Application:
    """A session as ETSI 015 shows it at the nodes it touches (``qkd_app``)."""

    app_id: str  # the session ID (ETSI 004 Key_stream_ID), already a UUID
    status: str  # ON, DISCONNECTED, OUT-OF-TIME or ZOMBIE
    priority: int
    qos: dict[str, Any]
    server_app_id: str  # the source SAE
    client_app_ids: tuple[str, ...]  # the destination SAE
    local_node: str  # the source node
    remote_node: str  # the destination node
    path: tuple[str, ...]  # nodes, source first; empty while the session holds no path
    links: tuple[str, ...]  # the links of ``path``


def application_of(session: NetworkSession) -> Application:
    """A session as an ETSI 015 ``qkd_app``."""
    active = session.state is AdmissionState.ACTIVE
    qos = session.grant.qos if session.grant else QoS()
    route = session.route if active else None
    return Application(
        app_id=session.id,
        status="ON" if active else "DISCONNECTED",
        priority=session.priority,
        qos={
            "max_bandwidth": session.terms.rate_bps if session.terms else qos.max_bps,
            "min_bandwidth": qos.min_bps,
            "jitter": qos.jitter,
            "ttl": qos.ttl,
        },
        server_app_id=session.source.sae_id,
        client_app_ids=(session.destination.sae_id,),
        local_node=session.source.node,
        remote_node=session.destination.node,
        path=route.nodes if route else (),
        links=route.links if route else (),
    )


def qkd_nodes(topology: Topology, loads: Mapping[str, LinkLoad],
              applications: Iterable[Application]) -> dict[str, dict]:
    """Every node's ``qkd_node`` document, keyed by node name."""
    apps_at: dict[str, list[dict]] = {name: [] for name in topology.nodes}
    virtual_at: dict[str, list[dict]] = {name: [] for name in topology.nodes}
    for app in applications:
        backing = [_virtual_link_id(app.app_id)] if len(app.path) > 2 else [_link_id(n) for n in app.links]
        entry = _qkd_app(app, backing)
        for node in {app.local_node, app.remote_node}:
            if node in apps_at:
                apps_at[node].append(entry)
        if len(app.path) > 2:
            for index, node in enumerate(app.path):
                if node in virtual_at:
                    virtual_at[node].append(_virtual_link(app, index))
    return {
        name: {ETSI015_ROOT: _qkd_node(topology, record, loads, apps_at[name], virtual_at[name])}
        for name, record in sorted(topology.nodes.items())
    }


def _qkd_node(
    topology: Topology, node: NodeRecord, loads: Mapping[str, LinkLoad], apps: list[dict], virtual_links: list[dict],
) -> dict[str, Any]:
    links = topology.links_at(node.name)
    return {
        "qkdn_id": _node_id(node.name),
        "vqkd_name": node.name,
        "qkdn_status": node.status,
        "qkdn_capabilities": {
            "link_stats_support": True,
            "application_stats_support": True,
            "key_relay_mode_enable": True,
        },
        "qkd_applications": {"qkd_app": apps},
        "qkd_interfaces": {"qkd_interface": [
            {"qkdi_id": _interface_id(link.name, node.name), "vqkd_link": link.name} for link in links
        ]},
        "qkd_links": {"qkd_link": [_qkd_link(link, node.name, loads.get(link.name)) for link in links]
                      + virtual_links},
    }


def _qkd_link(link: LinkRecord, local: str, load: LinkLoad | None) -> dict[str, Any]:
    remote = link.far_end(local)
    reserved = load.reserved_bps if load is not None else 0
    qber = link.current_qber
    return {
        "qkdl_id": _link_id(link.name),
        "vqkd_name": link.name,
        "qkdl_status": "ACTIVE" if link.usable else "OFF",
        "vqkd_state": str(link.state),
        "vqkd_reason": link.reason,
        "qkdl_local": {"qkdn_id": _node_id(local), "qkdi_id": _interface_id(link.name, local)},
        "qkdl_remote": {"qkdn_id": _node_id(remote), "qkdi_id": _interface_id(link.name, remote)},
        "qkdl_type": "etsi-qkd-node-types:PHYS" if link.type is LinkType.PHYSICAL else "etsi-qkd-node-types:VIRT",
        "qkdl_performance": {
            "skr": link.available_bps,
            # Effective SKR: what is left for new applications after the reservations.
            "eskr": max(link.available_bps - reserved, 0.0),
            "expected_consumption": reserved,
            "phys_perf": [] if qber is None else [{"perf_type": "QBER", "value": qber}],
        },
        "vqkd_sessions": len(load.sessions) if load is not None else 0,
    }


def _node_id(name: str) -> str:
    return str(uuid.uuid5(_ETSI015_IDS, f"node/{name}"))


def _link_id(name: str) -> str:
    return str(uuid.uuid5(_ETSI015_IDS, f"link/{name}"))


def _interface_id(link: str, node: str) -> str:
    return str(uuid.uuid5(_ETSI015_IDS, f"interface/{link}/{node}"))


def _virtual_link_id(session_id: str) -> str:
    return str(uuid.uuid5(_ETSI015_IDS, f"session/{session_id}"))


def _qkd_app(app: Application, backing: list[str]) -> dict[str, Any]:
    return {
        "app_id": app.app_id,
        "app_status": app.status,
        "app_type": "CLIENT-SERVER",
        "server_app_id": app.server_app_id,
        "client_app_id": list(app.client_app_ids),
        "app_priority": app.priority,
        "app_qos": app.qos,
        "backing_qkdl_id": backing,
        "local_qkdn_id": _node_id(app.local_node),
        "remote_qkdn_id": _node_id(app.remote_node),
    }


def _virtual_link(app: Application, index: int) -> dict[str, Any]:
    """A relayed session as the multi-hop virtual link (VIRT) it is at one node of its path."""
    path = app.path
    return {
        "qkdl_id": _virtual_link_id(app.app_id),
        "vqkd_session": app.app_id,
        "qkdl_status": "ACTIVE" if app.status == "ON" else "PENDING",
        "qkdl_local": {"qkdn_id": _node_id(app.local_node)},
        "qkdl_remote": {"qkdn_id": _node_id(app.remote_node)},
        "qkdl_type": "etsi-qkd-node-types:VIRT",
        "virt_prev_hop": _node_id(path[index - 1]) if index > 0 else None,
        "virt_next_hop": [_node_id(path[index + 1])] if index < len(path) - 1 else [],
    }
