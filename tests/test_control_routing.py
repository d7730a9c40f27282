"""The routing element: link weights, capacity-constrained paths, exact reservations."""

from __future__ import annotations

import pytest

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.events import EventLog
from vqkd.operator.control.routing import LinkLoad, NoRoute, Route, Routing, link_weight
from vqkd.operator.control.topology import LinkRecord, Topology
from vqkd.operator.resources.models import LinkType, QKDLink

from builders import node


def build(links: dict[str, tuple[str, str, int]], qber: dict[str, float] | None = None) -> Routing:
    topology = Topology(EventLog())
    routing = Routing(topology)
    for name in sorted({n for a, b, _ in links.values() for n in (a, b)}):
        routing.add_node(topology.apply_node(node(name), 0.0))
    for name, (a, b, rate) in links.items():
        spec = {"nodes": [a, b], "emulated": {"keyRateBps": rate, "qber": (qber or {}).get(name, 0.0)}}
        record, _ = topology.apply_link(QKDLink.model_validate({"metadata": {"name": name}, "spec": spec}), 0.0)
        routing.add_link(record)
    return routing


SQUARE = {"ab": ("a", "b", 1000), "bc": ("b", "c", 1000), "ad": ("a", "d", 1000), "dc": ("d", "c", 1000)}


def test_weight_formula():
    link = LinkRecord("l", ("a", "b"), LinkType.PHYSICAL, 0.1, nominal_rate_bps=1000, nominal_qber=0.05)
    assert link_weight(link, LinkLoad()) == pytest.approx(1 + 0.5)
    assert link_weight(link, LinkLoad(500, {"s1"})) == pytest.approx(1 + 2 * 0.5 + 0.5 + 0.5 * 1 / 11)
    overbooked = LinkLoad(5000, {f"s{i}" for i in range(1000)})
    assert link_weight(link, overbooked) < 1 + 2 + 0.5 + 0.5, "every term is bounded"
    dark = LinkRecord("m", ("a", "b"), LinkType.PHYSICAL, 0.1, nominal_rate_bps=None, nominal_qber=None)
    assert link_weight(dark, LinkLoad()) == 3.0, "no known key rate counts as fully used"


def test_cached_weights_follow_reservations_and_refreshes():
    routing = build(SQUARE)
    assert routing.loads["ab"].weight == 1.0
    routing.route("s1", "a", "c", 500)
    assert routing.loads["ab"].weight == pytest.approx(link_weight(routing.topology.links["ab"], routing.loads["ab"]))
    assert routing.loads["ab"].weight > 2.0
    routing.topology.links["ab"].qber = 0.05
    routing.refresh("ab")
    assert routing.loads["ab"].weight == pytest.approx(link_weight(routing.topology.links["ab"], routing.loads["ab"]))
    routing.release("s1")
    assert routing.loads["ab"].weight == pytest.approx(1 + 0.05 / 0.11)


def test_cheapest_path_prefers_low_qber_and_reserves_the_minimum_rate():
    routing = build(SQUARE, qber={"ab": 0.08})
    route = routing.route("s1", "a", "c", 300)
    assert isinstance(route, Route) and route.nodes == ("a", "d", "c") and route.links == ("ad", "dc")
    assert route.spare_bps == 1000
    assert {n: l.reserved_bps for n, l in routing.loads.items()} == {"ab": 0, "bc": 0, "ad": 300, "dc": 300}


def test_links_without_spare_rate_are_avoided_and_the_refusal_says_which():
    routing = build(SQUARE)
    assert routing.route("s1", "a", "c", 700).nodes == ("a", "b", "c")
    assert routing.route("s2", "a", "c", 700).nodes == ("a", "d", "c")
    refusal = routing.route("s3", "a", "c", 700)
    assert isinstance(refusal, NoRoute) and refusal.reason == "InsufficientKeyRate"
    assert "minBps 700" in refusal.message and "300 bit/s" in refusal.message
    assert isinstance(routing.route("s4", "a", "c", 0), Route), "best effort needs no spare rate"


def test_refusal_reasons():
    routing = build(SQUARE)
    assert routing.route("s", "a", "a", 0).reason == "SameNode"
    assert routing.route("s", "a", "zz", 0).reason == "UnknownNode"
    routing.topology.set_node_state("c", False, "KMUnreachable", "gone", 1.0)
    assert routing.route("s", "a", "c", 0).reason == "EndpointDown"
    routing.topology.set_node_state("c", True, "KMReady", "", 2.0)
    for name in ("ab", "ad"):
        routing.topology.set_link_state(name, LinkState.DOWN, "QBERAboveThreshold", "", 3.0)
    refusal = routing.route("s", "a", "c", 0)
    assert refusal.reason == "NoPath" and "(2 links Down, 0 nodes down)" in refusal.message
    assert routing.loads["bc"].sessions == set(), "a refused search reserves nothing"


def test_reroute_avoids_the_failure_and_reserves_a_shared_link_once():
    routing = build({**SQUARE, "ce": ("c", "e", 1000)})
    first = routing.route("s1", "a", "e", 600)
    assert first.nodes == ("a", "b", "c", "e")
    routing.topology.set_link_state("bc", LinkState.DOWN, "NoKeyProduced", "", 1.0)
    assert not routing.usable(first)
    # ce keeps 600 reserved for s1 and has 400 left: the session's own share counts as spare.
    second = routing.route("s1", "a", "e", 600)
    assert second.nodes == ("a", "d", "c", "e")
    assert routing.loads["ce"].reserved_bps == 600 and routing.loads["ab"].reserved_bps == 600
    routing.settle("s1", second)
    assert {n: l.reserved_bps for n, l in routing.loads.items()} == {"ab": 0, "bc": 0, "ad": 600, "dc": 600, "ce": 600}
    assert routing.reserved_links("s1") == {"ad", "dc", "ce"}


def test_release_frees_once():
    routing = build(SQUARE)
    routing.route("s1", "a", "c", 500)
    assert routing.release("s1") is True
    assert routing.release("s1") is False
    assert all(load.reserved_bps == 0 and not load.sessions for load in routing.loads.values())


def test_failed_node_is_routed_around_and_sessions_are_found_by_node_and_link():
    routing = build(SQUARE)
    routing.route("s1", "a", "c", 0)
    assert routing.sessions_at_node("b") == {"s1"} and routing.sessions_on_link("ab") == {"s1"}
    routing.topology.set_node_state("b", False, "KMUnreachable", "", 1.0)
    assert routing.route("s1", "a", "c", 0).nodes == ("a", "d", "c")


def test_removed_link_takes_its_reservations_along():
    routing = build(SQUARE)
    route = routing.route("s1", "a", "c", 500)
    record = routing.topology.links["bc"]
    assert routing.remove_link(record) == {"s1"}
    routing.topology.remove_link("bc")
    assert not routing.usable(route)
    assert routing.reserved_links("s1") == {"ab"}
    assert routing.release("s1") and routing.loads["ab"].reserved_bps == 0


def test_connected_follows_registered_links_whatever_their_state():
    routing = build({"ab": ("a", "b", 1000), "bc": ("b", "c", 1000), "de": ("d", "e", 1000)})
    routing.topology.links["bc"].state = LinkState.DOWN
    routing.topology.set_node_state("b", False, "KMUnreachable", "gone", 1.0)
    assert routing.connected("a", "c") and not routing.connected("a", "e")
    assert not routing.connected("a", "unregistered")
