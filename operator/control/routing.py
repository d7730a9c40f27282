"""The routing element (paper §3.1): paths for sessions over a graph of the QKD network.

The graph has one vertex per node and one edge per link; each edge carries the topology's
``LinkRecord`` (state and measured metrics, kept current by monitoring) and a ``LinkLoad``
(what routing reserved on it), so a path search always sees the latest data.

A path is usable for a session when every node on it is up, every link is not Down, and
every link has at least the session's minimum rate (``minBps``) of unreserved key rate.
Among usable paths the cheapest wins, with link weight

    w = 1 + 2·min(reserved / available, 1) + 1·min(QBER / threshold, 1) + 0.5·n / (n + 10)

where ``available`` is the link's measured key rate (the spec's rate until measured),
``reserved`` the key rate reserved on it, and ``n`` the sessions routed over it. Why:

- the 1 per hop dominates, so paths stay short: every hop is one more trusted node that
  sees the key and one more link whose key the relay consumes;
- a link close to fully reserved costs up to two extra hops, keeping headroom for bursts
  and for sessions rerouted onto it when another link fails;
- a link whose QBER nears its threshold costs up to one extra hop: its key rate falls with
  the QBER and it is the likeliest to go Down and force a reroute;
- the session term spreads best-effort sessions (``minBps`` 0 reserves nothing, so the
  load term cannot see them) and saturates, never outweighing a hop.

Reservations are per session and per link, in whole bit/s, so accounting is exact: a
reroute reserves the new path's links before the old path's are released (``settle``), a
link shared by both paths is reserved once, and releasing twice frees nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import networkx as nx

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.topology import LinkRecord, NodeRecord, Topology

HOP_COST = 1.0
LOAD_WEIGHT = 2.0
QBER_WEIGHT = 1.0
SESSION_WEIGHT = 0.5
SESSION_SCALE = 10


def link_weight(link: LinkRecord, load: LinkLoad) -> float:
    available = link.available_bps
    utilisation = min(load.reserved_bps / available, 1.0) if available > 0 else 1.0
    qber = link.current_qber
    qber_share = min(qber / link.qber_threshold, 1.0) if qber is not None else 0.0
    sessions = len(load.sessions)
    return (HOP_COST + LOAD_WEIGHT * utilisation + QBER_WEIGHT * qber_share
            + SESSION_WEIGHT * sessions / (sessions + SESSION_SCALE))


class AccountingError(RuntimeError):
    """Reservations no longer add up: a bug, never a user error."""


@dataclass(slots=True)
class LinkLoad:
    reserved_bps: int = 0
    sessions: set[str] = field(default_factory=set)
    # ``link_weight`` as of the last change of its inputs: path searches read it for every
    # edge they relax, far more often than reservations or samples change it.
    weight: float = HOP_COST


@dataclass(frozen=True, slots=True)
class Route:
    nodes: tuple[str, ...]  # source first
    links: tuple[str, ...]
    cost: float
    # The smallest key rate left on the path's links for this session, its own reservation
    # included: what the session could draw if nothing bounds it.
    spare_bps: float


@dataclass(frozen=True, slots=True)
class NoRoute:
    reason: str  # CamelCase
    message: str


@dataclass(slots=True)
class _Reservation:
    rate_bps: int
    links: set[str]


class Routing:
    def __init__(self, topology: Topology):
        self.topology = topology
        self.graph = nx.Graph()
        self.loads: dict[str, LinkLoad] = {}
        self._reservations: dict[str, _Reservation] = {}

    # --- the graph follows the topology ------------------------------------------------

    def add_node(self, record: NodeRecord) -> None:
        self.graph.add_node(record.name)

    def remove_node(self, name: str) -> None:
        self.graph.remove_node(name)

    def add_link(self, record: LinkRecord) -> None:
        load = self.loads.setdefault(record.name, LinkLoad())
        self.graph.add_edge(*record.ends, link=record, load=load)
        self.refresh(record.name)

    def refresh(self, name: str) -> None:
        """Recompute a link's weight after its metrics changed (a sample, a new spec)."""
        load = self.loads.get(name)
        if load is not None:
            load.weight = link_weight(self.topology.links[name], load)

    def remove_link(self, record: LinkRecord) -> frozenset[str]:
        """Forget a link; returns the sessions that were routed over it (they need a new path)."""
        load = self.loads.pop(record.name, LinkLoad())
        self.graph.remove_edge(*record.ends)
        for session_id in load.sessions:
            self._reservations[session_id].links.discard(record.name)
        return frozenset(load.sessions)

    # --- paths -------------------------------------------------------------------------

    def route(self, session_id: str, source: str, destination: str, min_rate_bps: int) -> Route | NoRoute:
        """The cheapest usable path, with ``min_rate_bps`` reserved on each of its links.

        Reservations the session already holds count as its own spare rate, so a reroute
        can reuse the unaffected part of its current path.
        """
        refusal = self._check_endpoints(source, destination)
        if refusal is not None:
            return refusal
        held = self._reservations.get(session_id)
        own_links = held.links if held is not None else frozenset()
        own_rate = held.rate_bps if held is not None else 0
        down_nodes = self.topology.down_nodes

        def weight(u: str, v: str, data: dict) -> float | None:
            link: LinkRecord = data["link"]
            if link.state is LinkState.DOWN or u in down_nodes or v in down_nodes:
                return None
            load: LinkLoad = data["load"]
            if min_rate_bps > 0:
                spare = link.available_bps - load.reserved_bps + (own_rate if link.name in own_links else 0)
                if spare < min_rate_bps:
                    return None
            return load.weight

        try:
            cost, path = nx.bidirectional_dijkstra(self.graph, source, destination, weight=weight)
        except nx.NetworkXNoPath:
            return self._explain(source, destination, min_rate_bps)
        links = tuple(self.graph.edges[u, v]["link"].name for u, v in pairwise(path))
        spare = min(self._spare(name, own_links, own_rate) for name in links)
        self._reserve(session_id, links, min_rate_bps)
        return Route(tuple(path), links, cost, spare)

    def _check_endpoints(self, source: str, destination: str) -> NoRoute | None:
        if source == destination:
            return NoRoute("SameNode", f"source and destination are both at node {source}; "
                                       "vqkd relays keys between different nodes only")
        for end in (source, destination):
            node = self.topology.nodes.get(end)
            if node is None:
                return NoRoute("UnknownNode", f"node {end} is not registered")
            if not node.up:
                return NoRoute("EndpointDown", f"the KM of endpoint node {end} is down ({node.reason}: {node.message})")
        return None

    def _spare(self, link: str, own_links: set[str] | frozenset[str], own_rate: int) -> float:
        load = self.loads[link]
        own = own_rate if link in own_links else 0
        return self.topology.links[link].available_bps - load.reserved_bps + own

    def _explain(self, source: str, destination: str, min_rate_bps: int) -> NoRoute:
        """Why no path qualified: the network is cut, or every way lacks spare key rate."""
        down_nodes = self.topology.down_nodes

        def up_only(u: str, v: str, data: dict) -> float | None:
            return 1.0 if data["link"].usable and u not in down_nodes and v not in down_nodes else None

        try:
            path = nx.bidirectional_dijkstra(self.graph, source, destination, weight=up_only)[1]
        except nx.NetworkXNoPath:
            down_links = sum(not link.usable for link in self.topology.links.values())
            return NoRoute(
                "NoPath",
                f"no path of working links joins {source} and {destination} "
                f"({down_links} links Down, {len(down_nodes)} nodes down)",
            )
        narrowest = min(
            (self.graph.edges[u, v]["link"] for u, v in pairwise(path)),
            key=lambda link: link.available_bps - self.loads[link.name].reserved_bps,
        )
        spare = narrowest.available_bps - self.loads[narrowest.name].reserved_bps
        return NoRoute(
            "InsufficientKeyRate",
            f"every path from {source} to {destination} crosses a link with less than the minBps "
            f"{min_rate_bps} bit/s unreserved (e.g. {narrowest.name} on the shortest: {max(spare, 0):.0f} bit/s)",
        )

    def connected(self, source: str, destination: str) -> bool:
        """Whether registered links join the two nodes, whatever the state of nodes and links."""
        return source in self.graph and destination in self.graph and nx.has_path(self.graph, source, destination)

    def usable(self, route: Route) -> bool:
        """Whether every node and link of the route still works."""
        nodes, links = self.topology.nodes, self.topology.links
        return (all(name in nodes and name not in self.topology.down_nodes for name in route.nodes)
                and all(name in links and links[name].usable for name in route.links))

    # --- reservations ------------------------------------------------------------------

    def _reserve(self, session_id: str, links: tuple[str, ...], rate_bps: int) -> None:
        held = self._reservations.get(session_id)
        if held is None:
            held = self._reservations[session_id] = _Reservation(rate_bps, set())
        elif held.rate_bps != rate_bps:
            raise AccountingError(
                f"session {session_id} holds reservations of {held.rate_bps} bit/s, asked for {rate_bps} bit/s; "
                "release before reserving at another rate"
            )
        for name in links:
            if name not in held.links:
                load = self.loads[name]
                load.reserved_bps += rate_bps
                load.sessions.add(session_id)
                held.links.add(name)
                self.refresh(name)

    def settle(self, session_id: str, route: Route) -> None:
        """Release the session's reservations on links not on ``route`` (after it switched paths)."""
        held = self._reservations.get(session_id)
        if held is not None:
            for name in held.links - set(route.links):
                self._unreserve(session_id, name, held)

    def release(self, session_id: str) -> bool:
        """Release everything the session holds; False when it held nothing (already released)."""
        held = self._reservations.get(session_id)
        if held is None:
            return False
        for name in list(held.links):
            self._unreserve(session_id, name, held)
        del self._reservations[session_id]
        return True

    def _unreserve(self, session_id: str, name: str, held: _Reservation) -> None:
        held.links.discard(name)
        load = self.loads.get(name)
        if load is None:  # the link was removed; its reservations went with it
            return
        if session_id not in load.sessions or load.reserved_bps < held.rate_bps:
            raise AccountingError(
                f"link {name}: releasing {held.rate_bps} bit/s of session {session_id}, but the link holds "
                f"{load.reserved_bps} bit/s and {'does' if session_id in load.sessions else 'does not'} list the session"
            )
        load.reserved_bps -= held.rate_bps
        load.sessions.discard(session_id)
        self.refresh(name)

    def reserved_links(self, session_id: str) -> frozenset[str]:
        held = self._reservations.get(session_id)
        return frozenset(held.links) if held is not None else frozenset()

    def sessions_on_link(self, name: str) -> frozenset[str]:
        load = self.loads.get(name)
        return frozenset(load.sessions) if load is not None else frozenset()

    def sessions_at_node(self, node: str) -> frozenset[str]:
        sessions: set[str] = set()
        for link in self.topology.links_at(node):
            sessions |= self.loads[link.name].sessions
        return frozenset(sessions)
