"""A KM's topology changed live, checked without processes: the diff of two topologies, what
``KeyManager.apply_topology`` keeps and drops, the metrics of removed links, and the
KeyManagerControl messages that carry a topology."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from test_relay_inprocess import chain, configure
from vqkd.km.config import InvalidTopology, KeyLimits, KMConfig, KMTopology, LinkEndConfig, TLSPaths
from vqkd.km.domain import errors
from vqkd.km.domain.keymanager import KeyManager, diff_links
from vqkd.km.metrics import KMMetrics
from vqkd.km.rpc.control_service import topology_from_pb, topology_to_pb
from vqkd.km.v1 import km_pb2

TLS = TLSPaths(ca=Path("/tls/ca.crt"), cert=Path("/tls/km.crt"), key=Path("/tls/km.key"))


def end(peer: str, node: str = "a", **settings) -> LinkEndConfig:
    name = "-".join(sorted((node, peer)))
    fields = dict(name=name, peer_node=peer, peer_kme_id=peer, peer_grpc=f"{peer}.svc:9443",
                  module_url=f"https://module-{name}:8443", module_sae_id=node, peer_module_sae_id=peer)
    return LinkEndConfig(**{**fields, **settings})


def topology(version: int, *links: LinkEndConfig, saes: dict | None = None, **limits) -> KMTopology:
    return KMTopology(version=version, links=list(links), saes=saes or {"sae-a": "a", "sae-b": "b"},
                      limits=KeyLimits(**limits))


def km(initial: KMTopology | None = None) -> KeyManager:
    return KeyManager(KMConfig(node="a", kme_id="KME-A", etsi014_listen="127.0.0.1:1", grpc_listen="127.0.0.1:2",
                               metrics_listen="127.0.0.1:3", tls=TLS, topology=initial))


def fill(link, bits: int = 8192) -> None:
    """Shared material in both pools, as key agreement with the peer would leave it."""
    link.outgoing.add([(os.urandom(8).hex(), os.urandom(bits // 8))])
    link.incoming.add([(os.urandom(8).hex(), os.urandom(bits // 8))])


# -- the diff ---------------------------------------------------------------------------------


def test_links_are_told_apart_by_name_and_settings_taken_in_place_are_retuned():
    held = {link.end: link for link in (end("b"), end("c"), end("d"), end("e"))}
    wanted = [end("b"), end("c", block_bits=256, pool_target_bits=1 << 20, peer_kme_id="KME-C"),
              end("d", module_url="https://elsewhere:8443"), end("f")]
    diff = diff_links(held, wanted)
    assert [link.name for link in diff.added] == ["a-f"]
    assert diff.removed == (("a-e", 0),)
    assert [link.name for link in diff.retuned] == ["a-c"]
    assert [link.name for link in diff.replaced] == ["a-d"]
    assert diff.unchanged == (("a-b", 0),)


@pytest.mark.parametrize("setting, value", [
    ("peer_grpc", "moved.svc:9443"), ("module_sae_id", "A2"), ("peer_module_sae_id", "B2"),
    ("module_tls", TLS), ("peer_node", "z"),
])
def test_a_change_of_peer_module_or_credentials_makes_another_link_end(setting, value):
    diff = diff_links({("a-b", 0): end("b")}, [end("b", **{setting: value})])
    assert [link.name for link in diff.replaced] == ["a-b"] and not diff.retuned


# -- applying a topology ----------------------------------------------------------------------


def test_a_km_started_with_its_identity_only_serves_nobody_until_it_holds_a_topology():
    manager = km()
    assert (manager.topology, manager.topology_version, manager.links, manager.saes) == (None, None, {}, {})
    with pytest.raises(errors.Unavailable, match="awaits its configuration .* from the control plane"):
        manager.check_configured()
    change = manager.apply_topology(topology(1, end("b")))
    assert change.applied and [link.name for link in change.added] == ["a-b"]
    manager.check_configured()
    assert (manager.topology_version, manager.node_of("sae-b"), manager.is_local("sae-a")) == (1, "b", True)
    assert manager.link_to["b"][0].incarnation == manager.incarnation


def test_an_initial_topology_counts_as_version_0_and_any_push_supersedes_it():
    manager = km(topology(0, end("b")))
    assert manager.topology_version == 0 and list(manager.links) == [("a-b", 0)]
    assert manager.apply_topology(topology(1, end("b"))).applied


def test_untouched_links_keep_their_pools_peer_and_everything_else():
    manager = km(topology(0, end("b"), end("c")))
    ab, ac = manager.links["a-b", 0], manager.links["a-c", 0]
    fill(ab)
    ab.peer_incarnation, ab.peer = "peer-b", object()
    change = manager.apply_topology(topology(1, end("b"), end("c", block_bits=1024), end("d"),
                                             saes={"sae-a": "a", "sae-d": "d"}, key_size=512))
    assert manager.links["a-b", 0] is ab and manager.links["a-c", 0] is ac
    assert (ab.outgoing.available_bits, ab.incoming.available_bits, ab.peer_incarnation) == (8192, 8192, "peer-b")
    assert [link.name for link in change.retuned] == ["a-c"] and ac.config.block_bits == 1024
    assert [link.name for link in change.added] == ["a-d"] and not change.removed
    assert manager.flushed_bits() == {"peer_restarted": 0, "link_removed": 0, "link_reconfigured": 0}
    # The SAE directory and the key limits are replaced as a whole.
    assert (manager.node_of("sae-b"), manager.node_of("sae-d"), manager.limits.key_size) == (None, "d", 512)
    assert list(manager.link_to) == ["b", "c", "d"]


def test_a_push_not_newer_than_the_topology_held_changes_nothing():
    manager = km()
    manager.apply_topology(topology(5, end("b")))
    link = manager.links["a-b", 0]
    fill(link)
    for version in (5, 4):
        change = manager.apply_topology(topology(version, end("c"), saes={"sae-x": "a"}))
        assert (change.applied, change.version, change.added, change.removed) == (False, 5, (), ())
    assert manager.links == {("a-b", 0): link} and link.outgoing.available_bits == 8192
    assert manager.node_of("sae-b") == "b" and manager.node_of("sae-x") is None


def test_a_removed_link_has_its_pools_wiped_and_counted_and_leaves_the_forwarding_view():
    manager = km(topology(0, end("b"), end("c")))
    ab = manager.links["a-b", 0]
    fill(ab, 16384)
    ab.flushed_bits = 1000  # dropped earlier because the peer restarted: stays counted
    change = manager.apply_topology(topology(1, end("c")))
    assert change.removed == (ab,) and not change.added
    assert (ab.outgoing.available_bits, ab.incoming.available_bits) == (0, 0)
    assert ("a-b", 0) not in manager.links and "b" not in manager.link_to
    assert manager.kme_id_of("b") == "b"  # no longer known as a neighbour
    assert manager.flushed_bits() == {"peer_restarted": 1000, "link_removed": 32768, "link_reconfigured": 0}


def test_a_recreated_link_end_presents_a_new_incarnation_so_the_peer_drops_what_it_shared():
    a = km(topology(0, end("b")))
    b = KeyManager(KMConfig(node="b", kme_id="b", etsi014_listen="127.0.0.1:1", grpc_listen="127.0.0.1:2",
                            metrics_listen="127.0.0.1:3", tls=TLS, topology=topology(0, end("a", node="b"))))
    old = a.links["a-b", 0]
    fill(old)
    b_end = b.links["a-b", 0]
    fill(b_end)
    b_end.observe_peer(old.incarnation)
    change = a.apply_topology(topology(1, end("b", module_url="https://new-module:8443")))
    new = a.links["a-b", 0]
    assert change.removed == (old,) and change.added == (new,) and new is not old
    assert new.incarnation != old.incarnation and new.incarnation.startswith(a.incarnation)
    assert a.flushed_bits()["link_reconfigured"] == 2 * 8192
    # The peer meets the new end: everything it shared with the old one is gone on its side too.
    assert b_end.observe_peer(new.incarnation)
    assert (b_end.outgoing.available_bits, b_end.incoming.available_bits, b_end.peer_restarts) == (0, 0, 1)
    # Removed and added again later: yet another incarnation.
    a.apply_topology(topology(2))
    a.apply_topology(topology(3, end("b")))
    assert a.links["a-b", 0].incarnation not in (old.incarnation, new.incarnation)


def test_a_removed_link_leaves_the_metrics_but_what_it_dropped_stays_counted():
    manager = km(topology(0, end("b"), end("c")))
    metrics = KMMetrics(manager)
    fill(manager.links["a-b", 0])
    metrics.link_drawn_bits("a", "a-b").inc(8192)
    metrics.link_drawn_bits("a", "a-c").inc(4096)
    value = metrics.registry.get_sample_value
    assert value("vqkd_km_pool_bits", {"node": "a", "link": "a-b", "direction": "outgoing"}) == 8192
    manager.apply_topology(topology(1, end("c")))
    metrics.forget_link("a-b")
    for name, labels in (("vqkd_km_pool_bits", {"direction": "outgoing"}), ("vqkd_km_link_drawn_bits_total", {}),
                         ("vqkd_km_peer_restarts_total", {})):
        assert value(name, {"node": "a", "link": "a-b", **labels}) is None, name
    assert value("vqkd_km_link_drawn_bits_total", {"node": "a", "link": "a-c"}) == 4096
    assert value("vqkd_km_flushed_bits_total", {"node": "a", "reason": "link_removed"}) == 16384
    assert value("vqkd_km_flushed_bits_total", {"node": "a", "reason": "peer_restarted"}) == 0


async def test_a_session_whose_next_hop_is_no_longer_a_neighbour_is_refused_cleanly():
    nodes, names, _ = chain(3)
    configure(nodes, names)
    n1 = nodes["n1"].km
    n1.apply_topology(n1.topology.model_copy(update={
        "version": 1, "links": [link for link in n1.topology.links if link.peer_node != "n2"]}))
    with pytest.raises(errors.PeerUnavailable, match="no_route"):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256)
    assert nodes["n1"].rejected == ["no_route"]
    n0 = nodes["n0"].km
    n0.apply_topology(n0.topology.model_copy(update={"version": 1, "links": []}))
    with pytest.raises(errors.NoPath, match="no link to next hop 'n1'"):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256)


# -- validation -------------------------------------------------------------------------------


def test_a_topology_with_two_links_to_one_peer_or_a_link_to_itself_is_refused():
    with pytest.raises(ValidationError, match="(?s)links.*more than one link with peer_node b"):
        topology(1, end("b"), end("b", name="a-b-2"))
    with pytest.raises(ValidationError, match="more than one link with name a-b"):
        topology(1, end("b"), end("c", name="a-b"))
    with pytest.raises(ValidationError, match="topology.links.0.peer_node: link a-a joins node a to itself"):
        km(topology(0, end("a")))


# -- the messages -----------------------------------------------------------------------------


def test_a_topology_survives_the_trip_through_its_message():
    original = topology(7, end("b"), end("c", module_tls=TLS, block_bits=256, pool_target_bits=1 << 20),
                        key_size=512, max_key_per_request=16)
    pb = km_pb2.TopologyConfig.FromString(topology_to_pb(original, "a").SerializeToString())
    assert topology_from_pb(pb, "a") == original
    assert topology_from_pb(topology_to_pb(original, "a", version=9), "a").version == 9


def test_zero_and_unset_fields_of_a_pushed_topology_take_the_defaults():
    pb = topology_to_pb(topology(1, end("b")), "a")
    pb.links[0].ClearField("block_bits")
    pb.ClearField("limits")
    parsed = topology_from_pb(pb, "a")
    assert (parsed.links[0].block_bits, parsed.limits) == (LinkEndConfig.model_fields["block_bits"].default,
                                                           KeyLimits())


@pytest.mark.parametrize("spoil, problem", [
    (lambda pb: setattr(pb, "node", "b"), "node: this topology is for node 'b', this KM serves node a"),
    (lambda pb: setattr(pb, "version", 0), "version: a pushed topology needs a version >= 1, got 0"),
    (lambda pb: setattr(pb.links[0], "peer_grpc", "no port"), "links.0.peer_grpc: String should match pattern"),
    (lambda pb: pb.links[0].ClearField("module_url"), "links.0.module_url: Field required"),
    (lambda pb: setattr(pb.links[0], "block_bits", 100), "links.0.block_bits: Input should be a multiple of 8"),
    (lambda pb: setattr(pb.links[0], "peer_node", "a"), "links.0.peer_node: link a-b joins node a to itself"),
    (lambda pb: pb.links.append(pb.links[0]), "links: Value error, more than one link with name a-b"),
    (lambda pb: setattr(pb.limits, "min_key_size", 1024), "limits: Value error, need min_key_size <= key_size"),
    (lambda pb: pb.links[0].module_tls.SetInParent(), "links.0.module_tls.ca: Field required"),
])
def test_a_malformed_push_is_refused_naming_the_field(spoil, problem):
    pb = topology_to_pb(topology(1, end("b")), "a")
    spoil(pb)
    with pytest.raises(InvalidTopology) as refused:
        topology_from_pb(pb, "a")
    assert problem in str(refused.value)
