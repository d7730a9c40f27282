"""The topology (SDN controller role): registration, changes, and its ETSI 015 view."""

from __future__ import annotations

import json

import pytest

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.control.etsi015 import ETSI015_ROOT, Application, qkd_nodes
from vqkd.operator.control.events import EventLog, Subject
from vqkd.operator.control.routing import LinkLoad
from vqkd.operator.control.topology import Topology
from vqkd.operator.resources.models import QKDLink, QKDNode

from builders import link, node


@pytest.fixture
def topology() -> Topology:
    topology = Topology(EventLog())
    for name, sae in (("a", "sae-a"), ("b", "sae-b"), ("c", "sae-c")):
        topology.apply_node(node(name, sae), 0.0)
    topology.apply_link(link("a", "b", name="ab", rate=1000), 0.0)
    topology.apply_link(link("b", "c", name="bc", rate=1000, type="virtual"), 0.0)
    return topology


def test_registration_and_lookups(topology):
    assert topology.node_of_sae("sae-b") == "b" and topology.node_of_sae("nobody") is None
    assert [l.name for l in topology.links_at("b")] == ["ab", "bc"]
    assert topology.links["ab"].available_bps == 1000 and topology.links["ab"].usable
    assert [(e.subject, e.name, e.reason) for e in topology.events][:2] == [
        (Subject.NODE, "a", "Registered"), (Subject.NODE, "b", "Registered")]


def test_updates_keep_state_and_move_saes(topology):
    topology.apply_node(node("a", "sae-a2"), 1.0)
    assert topology.node_of_sae("sae-a") is None and topology.node_of_sae("sae-a2") == "a"
    topology.set_link_state("ab", LinkState.DOWN, "NoKeyProduced", "quiet", 1.0)
    record, created = topology.apply_link(link("b", "a", name="ab", rate=1000, qberThreshold=0.05), 2.0)
    assert not created and record.qber_threshold == 0.05 and record.state is LinkState.DOWN


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda t: t.apply_node(node("c", "sae-a"), 1.0), ControlError, "SAE 'sae-a' is already attached to QKDNode a"),
    (lambda t: t.apply_link(link("a", "b", name="ab2", rate=1000), 1.0), ControlError, "already joined by QKDLink ab"),
    (lambda t: t.apply_link(link("a", "c", name="ab", rate=1000), 1.0), ControlError, "spec.nodes is immutable"),
    (lambda t: t.apply_link(link("a", "x", name="ax", rate=1000), 1.0), UnresolvedReference,
     "'x', which is not a registered QKDNode"),
    (lambda t: t.remove_node("b"), ControlError, "still joined by QKDLinks ab, bc"),
])
def test_refused_changes_say_what_to_do(topology, change, error, message):
    with pytest.raises(error, match=message):
        change(topology)


def test_state_changes_are_recorded_once(topology):
    assert topology.set_link_state("ab", LinkState.DOWN, "QBERAboveThreshold", "q", 1.0) is not None
    assert topology.set_link_state("ab", LinkState.DOWN, "NoKeyProduced", "n", 2.0) is None
    assert topology.links["ab"].reason == "NoKeyProduced", "the reason stays current"
    assert topology.set_node_state("c", False, "KMUnreachable", "pod lost", 3.0)
    assert not topology.set_node_state("c", False, "KMUnreachable", "pod lost", 4.0)
    last = list(topology.events)[-1]
    assert (last.subject, last.from_state, last.to_state) == (Subject.NODE, "OPERATING", "DOWN")


def test_etsi015_view(topology):
    topology.links["ab"].key_rate_bps, topology.links["ab"].qber = 800.0, 0.04
    app = Application(app_id="8d0e8a3e-0c1f-4a3e-9f1e-6c1c1f0e0b11", status="ON", priority=2,
                      qos={"max_bandwidth": 100, "min_bandwidth": 10, "jitter": 0, "ttl": 60},
                      server_app_id="sae-a", client_app_ids=("sae-c",), local_node="a", remote_node="c",
                      path=("a", "b", "c"), links=("ab", "bc"))
    view = qkd_nodes(topology, {"ab": LinkLoad(10, {app.app_id}), "bc": LinkLoad(10, {app.app_id})}, [app])
    json.dumps(view)
    b = view["b"][ETSI015_ROOT]
    assert b["qkdn_status"] == "OPERATING" and b["qkd_applications"]["qkd_app"] == [], "b only relays"
    physical, virtual_spec, virtual_session = b["qkd_links"]["qkd_link"]
    assert physical["qkdl_type"] == "etsi-qkd-node-types:PHYS"
    assert physical["qkdl_performance"]["skr"] == 800.0 and physical["qkdl_performance"]["eskr"] == 790.0
    assert physical["qkdl_performance"]["phys_perf"] == [{"perf_type": "QBER", "value": 0.04}]
    assert physical["qkdl_local"]["qkdn_id"] == b["qkdn_id"]
    assert physical["qkdl_remote"]["qkdn_id"] == view["a"][ETSI015_ROOT]["qkdn_id"]
    assert virtual_spec["qkdl_type"] == "etsi-qkd-node-types:VIRT", "a virtual QKDLink is VIRT"
    assert virtual_session["virt_prev_hop"] == view["a"][ETSI015_ROOT]["qkdn_id"]
    assert virtual_session["virt_next_hop"] == [view["c"][ETSI015_ROOT]["qkdn_id"]]
    (qkd_app,) = view["a"][ETSI015_ROOT]["qkd_applications"]["qkd_app"]
    assert qkd_app["backing_qkdl_id"] == [virtual_session["qkdl_id"]] and qkd_app["app_priority"] == 2
    assert view == qkd_nodes(topology, {"ab": LinkLoad(10, {app.app_id}), "bc": LinkLoad(10, {app.app_id})}, [app]), \
        "identifiers are stable"
