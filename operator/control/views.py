"""The control plane's JSON views of links, nodes and users: one row each, JSON-ready.

Pure functions over the core's state, shown by the local runtime's status API and read by
the metrics and the kopf runtime's status writers. A session's row is its own
(``NetworkSession.view``); the ETSI GS QKD 015 view is in ``etsi015``.
"""

from __future__ import annotations

from typing import Any

from vqkd.operator.control.access import AccessControl
from vqkd.operator.control.routing import Routing
from vqkd.operator.control.session_registry import SessionRegistry
from vqkd.operator.control.topology import Topology


def link_rows(topology: Topology, routing: Routing) -> list[dict[str, Any]]:
    rows = []
    for name, link in sorted(topology.links.items()):
        load = routing.loads[name]
        rows.append({
            "name": name,
            "nodes": list(link.ends),
            "type": str(link.type),
            "state": str(link.state),
            "reason": link.reason,
            "message": link.message,
            "keyRateBps": link.available_bps,
            "measured": link.measured_at is not None,
            "qber": link.current_qber,
            "qberThreshold": link.qber_threshold,
            "storedKeyBits": link.stored_key_bits,
            "burnedBits": link.burned_bits,
            "loadBps": link.load_bps,
            "reservedBps": load.reserved_bps,
            "sessions": len(load.sessions),
            "weight": round(load.weight, 4),
        })
    return rows


def node_rows(topology: Topology, routing: Routing) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "status": node.status,
            "reason": node.reason,
            "message": node.message,
            "saeIds": sorted(node.sae_ids),
            "links": [link.name for link in topology.links_at(name)],
            "sessions": len(routing.sessions_at_node(name)),
        }
        for name, node in sorted(topology.nodes.items())
    ]


def user_rows(access: AccessControl, registry: SessionRegistry) -> list[dict[str, Any]]:
    """Each UserProfile with its SLA and what its active sessions use of it."""
    rows = []
    for name, user in sorted(access.users.items()):
        sla = user.spec.sla
        rows.append({
            "name": name,
            "enabled": user.spec.enabled,
            "saeIds": list(user.spec.sae_ids),
            "priority": user.spec.priority,
            "maxSessions": sla.max_sessions,
            "maxKeyRateBps": sla.max_key_rate_bps,
            **user_usage(registry, name),
        })
    return rows


def user_usage(registry: SessionRegistry, name: str) -> dict[str, int]:
    """What the active sessions of UserProfile ``name`` hold and have delivered."""
    live = registry.live_sessions_of(name)
    return {
        "sessions": len(live),
        "reservedBps": round(registry.usage(name).reserved_bps),
        "keysDelivered": sum(session.keys_delivered for session in live),
        "bitsDelivered": sum(session.bits_delivered for session in live),
    }
