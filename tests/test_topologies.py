"""The topology pusher: each KM gets its topology live, only when it changed or the KM needs it again.

The pusher runs against KMs kept in memory (``FakeKMs``), on its own and inside the
control-plane host, with a network the test changes as a runtime's resource cache changes.
"""

from __future__ import annotations

import asyncio

from builders import Clock, link, node, user
from test_host import FakeKMs
from vqkd.km.v1 import km_pb2
from vqkd.operator.control.session_config import next_version
from vqkd.operator.host import ControlPlaneHost
from vqkd.operator.kopf.manifests import ClusterAddressing
from vqkd.operator.plan import km_topology
from vqkd.operator.resources.models import KeySession
from vqkd.operator.resources.network import Network
from vqkd.operator.topologies import TopologyPusher

ADDRESSING = ClusterAddressing("qkd")


def chain() -> Network:
    """a - b - c, one SAE each."""
    network = Network(namespace="qkd")
    for name in "abc":
        network.nodes[name] = node(name, f"sae-{name}")
    for a, b in ("ab", "bc"):
        network.links[f"{a}-{b}"] = link(a, b)
    return network


def pushed(kms: FakeKMs) -> list[tuple[str, int]]:
    """The topology pushes so far, as (node, version), and forget them."""
    calls = [(node, version) for call, node, _, version in kms.calls if call == "topology"]
    kms.calls.clear()
    return calls


def tracked(network: Network, clock: Clock | None = None) -> tuple[TopologyPusher, FakeKMs]:
    kms = FakeKMs()
    pusher = TopologyPusher(kms, clock=clock or Clock(1000.0))
    pusher.track(network, ADDRESSING)
    return pusher, kms


async def test_every_km_gets_its_planned_topology_once_and_nothing_again_while_the_network_stays():
    network = chain()
    pusher, kms = tracked(network)
    await pusher.refresh()
    assert sorted(node for node, _ in pushed(kms)) == ["a", "b", "c"]
    for name in "abc":
        assert kms.topology(name) == km_topology(network, name, ADDRESSING)
        assert pusher.held(name).version == kms.topologies[name][0]
    assert [link.name for link in kms.topology("b").links] == ["a-b", "b-c"]
    await pusher.refresh()
    assert pushed(kms) == [], "nothing changed: no push"
    assert pusher.unconfirmed() == {} and pusher.due() == []


async def test_only_the_kms_whose_topology_changed_are_pushed():
    network = chain()
    pusher, kms = tracked(network)
    await pusher.refresh()
    pushed(kms)
    # A new link between a and c concerns a and c only: b's topology stays as it was.
    network.links["a-c"] = link("a", "c")
    await pusher.refresh()
    assert sorted(node for node, _ in pushed(kms)) == ["a", "c"]
    assert [link.name for link in kms.topology("c").links] == ["a-c", "b-c"]
    # Key limits are one node's.
    network.nodes["b"] = node("b", "sae-b", km={"keySize": 512})
    await pusher.refresh()
    assert [node for node, _ in pushed(kms)] == ["b"]
    assert kms.topology("b").limits.key_size == 512
    # Every KM holds the whole SAE directory: an SAE added reaches all, and nothing else changes at them.
    links_before = {name: kms.topology(name).links for name in "abc"}
    network.nodes["c"] = node("c", "sae-c", "sae-c2")
    await pusher.refresh()
    assert sorted(node for node, _ in pushed(kms)) == ["a", "b", "c"]
    assert all(kms.topology(name).saes["sae-c2"] == "c" and kms.topology(name).links == links_before[name]
               for name in "abc")
    # A link removed leaves the KMs of its ends; a node removed is forgotten, its KM pushed nothing more.
    del network.links["a-c"]
    await pusher.refresh()
    assert sorted(node for node, _ in pushed(kms)) == ["a", "c"]
    assert [link.name for link in kms.topology("a").links] == ["a-b"]
    del network.links["b-c"], network.nodes["c"]
    await pusher.refresh()
    assert sorted(node for node, _ in pushed(kms)) == ["a", "b"]
    assert "sae-c" not in kms.topology("a").saes and pusher.held("c") is None


async def test_versions_rise_with_every_push_and_across_a_control_plane_restart():
    network, clock = chain(), Clock(1000.0)
    pusher, kms = tracked(network, clock)
    await pusher.refresh()
    network.nodes["a"] = node("a", "sae-a", "sae-a2")
    await pusher.refresh()
    versions = [version for _, version in pushed(kms)]
    assert versions == sorted(set(versions)) and versions[0] >= 1000 * 1000
    # A new control-plane process, a moment later, forgot every version but reads the clock: it pushes above.
    clock.advance(1.0)
    restarted = TopologyPusher(kms, clock=clock)
    restarted.track(network, ADDRESSING)
    await restarted.refresh()
    again = pushed(kms)
    assert sorted(node for node, _ in again) == ["a", "b", "c"], "no record of what the KMs hold: all pushed"
    assert min(version for _, version in again) > max(versions)
    assert all(kms.topologies[name][0] == restarted.held(name).version for name in "abc")


async def test_a_km_holding_a_newer_version_is_pushed_again_above_it():
    network = chain()
    clock = Clock(1000.0)
    pusher, kms = tracked(network, clock)
    ahead = next_version(0, clock() + 3600)  # pushed by a control plane whose clock ran an hour ahead
    kms.topologies["a"] = (ahead, km_topology(network, "b", ADDRESSING))
    await pusher.refresh()
    offered = [version for name, version in pushed(kms) if name == "a"]
    assert len(offered) == 2 and offered[0] < ahead < offered[1]
    assert kms.topology("a") == km_topology(network, "a", ADDRESSING)
    assert pusher.held("a").version == offered[1]


async def test_a_new_incarnation_a_lower_version_or_no_topology_at_a_km_means_a_push_again():
    network = chain()
    pusher, kms = tracked(network)
    assert pusher.observed("a", 0, "a", 0) is True, "first seen, holding none"
    await pusher.refresh()
    pushed(kms)
    held = pusher.held("a")
    assert held.incarnation == "a"
    assert pusher.observed("a", 0, "a", held.version) is False, "as pushed: nothing owed"
    assert pusher.observed("a", 0, "a", held.version - 1) is True
    await pusher.settle("a", 0)
    assert [name for name, _ in pushed(kms)] == ["a"]
    kms.restart("b")
    assert pusher.observed("b", 0, kms.incarnations["b"], 0) is True
    assert pusher.due() == [("b", 0)]
    await pusher.refresh()
    assert [name for name, _ in pushed(kms)] == ["b"], "the same topology, to the new instance only"
    assert kms.topology("b") == km_topology(network, "b", ADDRESSING)
    assert pusher.held("b").incarnation == kms.incarnations["b"]
    assert pusher.observed("z", 0, "z", 0) is False, "not declared: nothing to push"


async def test_a_km_that_does_not_answer_is_owed_its_topology_until_it_does():
    network = chain()
    pusher, kms = tracked(network)
    kms.unreachable.add("c")
    await pusher.refresh()
    assert kms.topology("c") is None and kms.topology("a") is not None
    assert pusher.due() == [("c", 0)]
    assert "unreachable" in pusher.unconfirmed()[("c", 0)] and set(pusher.unconfirmed()) == {("c", 0)}
    assert await pusher.settle("c", 0) is False
    kms.unreachable.discard("c")
    pushed(kms)
    assert await pusher.settle("c", 0) is True
    assert pushed(kms)[0][0] == "c" and pusher.due() == [] and pusher.unconfirmed() == {}
    assert kms.topology("c") == km_topology(network, "c", ADDRESSING)


async def test_pushes_to_different_kms_run_at_once():
    network = chain()
    pusher, kms = tracked(network)
    gate, in_flight, most = asyncio.Event(), set(), 0
    push = kms.configure_topology

    async def slow(name, replica, topology, version) -> km_pb2.ConfigureTopologyReply:
        nonlocal most
        in_flight.add(name)
        most = max(most, len(in_flight))
        await gate.wait()
        in_flight.discard(name)
        return await push(name, replica, topology, version)

    kms.configure_topology = slow
    refreshing = asyncio.create_task(pusher.refresh())
    for _ in range(5):
        await asyncio.sleep(0)
    assert most == 3 and not refreshing.done()
    gate.set()
    await refreshing
    assert sorted(name for name, _ in pushed(kms)) == ["a", "b", "c"], "one push each"
    assert all(pusher.held(name).version == kms.topologies[name][0] for name in "abc")


# --- inside the host ------------------------------------------------------------------


def session(name: str, source: str, destination: str) -> KeySession:
    return KeySession.model_validate({"metadata": {"name": name}, "spec": {
        "user": "lab", "source": {"node": source, "saeId": f"sae-{source}"},
        "destination": {"node": destination, "saeId": f"sae-{destination}"}}})


async def hosted(network: Network) -> tuple[ControlPlaneHost, FakeKMs]:
    kms = FakeKMs()
    host = ControlPlaneHost(kms, None, "unused")
    host.track(network, ADDRESSING)
    network.users["lab"] = user("lab", ["sae-a", "sae-b", "sae-c"])
    network.sessions["s"] = session("s", "a", "c")
    await host.core.load(network)
    return host, kms


def first_calls(kms: FakeKMs, name: str) -> list[str]:
    """The kinds of push the KM of ``name`` got, in order, each once."""
    kinds = []
    for call, node_, _, _ in kms.calls:
        if node_ == name and call not in kinds:
            kinds.append(call)
    return kinds


async def test_a_km_gets_its_topology_before_any_session_is_pushed_to_it():
    network = chain()
    host, kms = await hosted(network)
    for name in "abc":
        assert first_calls(kms, name) == ["topology", "configure"]
    assert host.metrics.registry.get_sample_value("vqkd_control_push_duration_seconds_count",
                                                  {"call": "topology"}) == 3


async def test_a_replaced_km_gets_its_topology_before_its_sessions_and_the_others_get_nothing():
    network = chain()
    host, kms = await hosted(network)
    await host.poll()
    kms.calls.clear()
    kms.restart("b")
    await host.poll()
    assert [(call, name) for call, name, _, _ in kms.calls] == [("topology", "b"), ("configure", "b")]
    assert kms.topology("b") == km_topology(network, "b", ADDRESSING)
    kms.calls.clear()
    await host.poll()
    assert kms.calls == [], "every KM holds what it should"


async def test_a_km_first_seen_holding_none_is_pushed_its_topology_and_one_owed_is_retried_at_the_tick():
    network = chain()
    kms = FakeKMs()
    host = ControlPlaneHost(kms, None, "unused")
    host.track(network, ADDRESSING)
    await host.core.load(network)
    assert kms.calls == []
    await host.poll()
    assert all(kms.topology(name) == km_topology(network, name, ADDRESSING) for name in "abc")
    network.links["a-c"] = link("a", "c")
    kms.unreachable.add("a")
    await host.topologies.refresh()
    assert host.topologies.due() == [("a", 0)]
    kms.unreachable.discard("a")
    await host.tick()
    for _ in range(3):
        await asyncio.sleep(0)  # the push runs in the background
    assert host.topologies.due() == [] and [link.name for link in kms.topology("a").links] == ["a-b", "a-c"]


async def test_a_link_deleted_leaves_the_kms_only_after_its_sessions_were_rerouted_off_it():
    """The runtime's order: the core deletes the link (rerouting), then the resource leaves the
    tracked network, then refresh pushes the KMs of its ends a topology without it."""
    network = chain()
    network.links["a-c"] = link("a", "c")
    host, kms = await hosted(network)
    (before,) = host.core.sessions()
    assert before["path"] == ["a", "c"]
    kms.calls.clear()
    await host.core.delete("QKDLink", "a-c")
    del network.links["a-c"]
    await host.topologies.refresh()
    calls = [(call, name) for call, name, _, _ in kms.calls]
    assert sorted(calls[-2:]) == [("topology", "a"), ("topology", "c")]
    rerouting = calls[:-2]
    assert {name for call, name in rerouting if call == "configure"} == {"a", "b", "c"}
    assert [name for call, name in rerouting if call == "topology"] == ["b"], \
        "rerouted first; only b, new on the path and never seen, got its topology first"
    (after,) = host.core.sessions()
    assert after["path"] == ["a", "b", "c"] and after["state"] == "Active"
    assert all("a-c" not in [link.name for link in kms.topology(name).links] for name in "ac")
