"""The control-plane host with nodes running several KM replicas: the unit it watches, pushes to
and replaces is a KM instance (node, replica), while the control core thinks in nodes.

The KMs are kept in memory (``FakeKMs``, which names replica r of node a ``a/r`` and replica 0
``a``); the network is a - b - c with two replicas at a and b, one session from a to c.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from builders import Clock, link, node, user
from test_host import FakeKMs, Heard, Replacer
from vqkd.km.domain.vocabulary import Endpoint, Role
from vqkd.operator.control.session_config import KMSessionConfig
from vqkd.operator.host import Cadence, ControlPlaneHost, source_share
from vqkd.operator.local.processes import KMPorts, LocalAddressing, ModulePorts, ReplicaPorts
from vqkd.operator.plan import km_topology
from vqkd.operator.resources.models import KeySession
from vqkd.operator.resources.network import Network

SESSION_KMS = {"a", "a/1", "b", "b/1", "c"}


def session(name: str, source: str = "a", destination: str = "c") -> KeySession:
    return KeySession.model_validate({"metadata": {"name": name}, "spec": {
        "user": "lab", "source": {"node": source, "saeId": f"sae-{source}"},
        "destination": {"node": destination, "saeId": f"sae-{destination}"}}})


def replicated(replicas_at_a: int = 2) -> Network:
    network = Network(namespace="qkd")
    network.nodes["a"] = node("a", "sae-a", km={"replicas": replicas_at_a})
    network.nodes["b"] = node("b", "sae-b", km={"replicas": 2})
    network.nodes["c"] = node("c", "sae-c")
    network.links["a-b"] = link("a", "b")
    network.links["b-c"] = link("b", "c")
    network.users["lab"] = user("lab", ["sae-a", "sae-b", "sae-c"])
    network.sessions["s"] = session("s")
    return network


async def hosted(network: Network, replace_after_s: float | None = None):
    kms, clock, heard = FakeKMs(), Clock(100.0), Heard()
    host = ControlPlaneHost(kms, None, "unused", cadence=Cadence(replace_after_s=replace_after_s), clock=clock)
    replacer = Replacer(kms)
    host.plug(replacer=replacer, listeners=[heard])
    host.core.clock = clock
    host.track(network, None)
    await host.core.load(network)
    return host, kms, clock, heard, replacer


def session_id(host: ControlPlaneHost, name: str = "s") -> str:
    return host.core.declared_session(name).id


def status(host: ControlPlaneHost, name: str) -> str:
    return {row["name"]: row["status"] for row in host.core.nodes()}[name]


def gauge(host: ControlPlaneHost, metric: str, node_: str) -> float | None:
    return host.metrics.registry.get_sample_value(metric, {"node": node_})


async def test_a_session_push_reaches_every_replica_and_the_source_replicas_share_its_rate():
    host, kms, *_ = await hosted(replicated())
    sid = session_id(host)
    assert kms.holders(sid) == SESSION_KMS
    whole = kms.entry("c", sid)
    for km in ("a", "a/1"):
        share = kms.entry(km, sid)
        assert share.rate_bps == whole.rate_bps / 2
        assert share.bucket_bits == max(whole.bucket_bits // 2, min(whole.bucket_bits, whole.key_chunk_size * 8))
    assert kms.entry("b/1", sid).rate_bps == kms.entry("b", sid).rate_bps == whole.rate_bps, "only the source meters"
    assert host.metrics.registry.get_sample_value("vqkd_control_push_duration_seconds_count",
                                                  {"call": "configure"}) == 3, "one confirmed push per node"


def test_a_source_share_never_sums_above_the_grant_and_keeps_room_for_one_chunk():
    config = KMSessionConfig(
        session_id="s", version=1, role=Role.SOURCE, user="lab", source=Endpoint("a", "sae-a"),
        destination=Endpoint("c", "sae-c"), prev_hop="", next_hop="b", priority=1, rate_bps=9000.0,
        bucket_bits=9000, inactivity_timeout_ms=1000, request_timeout_ms=1000, key_chunk_size=0, ttl_s=60,
        fallback="")
    thirds = source_share(config, 3)
    assert (thirds.rate_bps, thirds.bucket_bits) == (3000.0, 3000)
    chunked = source_share(replace(config, key_chunk_size=512), 3)
    assert (chunked.rate_bps, chunked.bucket_bits) == (3000.0, 4096), "a bucket below one chunk could never serve"
    assert source_share(config, 1) is config
    destination = replace(config, role=Role.DESTINATION)
    assert source_share(destination, 3) is destination


async def test_a_replica_that_stops_answering_leaves_its_node_serving_and_gets_what_it_missed_back():
    network = replicated()
    host, kms, clock, heard, _ = await hosted(network)
    await host.poll()
    assert (gauge(host, "vqkd_control_km_replicas", "a"), gauge(host, "vqkd_control_km_replicas_ready", "a")) == (2, 2)
    kms.unreachable.add("a/1")
    clock.advance(1)
    await host.poll()
    assert ("a/1", False) in heard.liveness
    assert status(host, "a") == "OPERATING" and host.liveness("a").ok is True
    assert host.replica_liveness("a", 1).ok is False
    assert gauge(host, "vqkd_control_km_replicas_ready", "a") == 1
    assert {row["name"]: row["ready"] for row in host.nodes()} == {"a": "1/2", "b": "2/2", "c": "1/1"}
    old = session_id(host)
    kms.calls.clear()
    await host.core.delete("KeySession", "s")
    assert kms.holders(old) == {"a/1"}, "the replica down was not asked"
    network.sessions["s2"] = session("s2")
    await host.core.apply(network.sessions["s2"])
    new = session_id(host, "s2")
    assert kms.holders(new) == SESSION_KMS - {"a/1"}
    assert all(km != "a/1" for _, km, _, _ in kms.calls), "pushes skip a replica seen down"
    kms.unreachable.discard("a/1")
    clock.advance(1)
    await host.poll()
    assert kms.holders(old) == set(), "the deletion it missed was sent once it answered"
    assert kms.holders(new) == SESSION_KMS, "and the session it missed pushed"
    assert gauge(host, "vqkd_control_km_replicas_ready", "a") == 2 and heard.replaced == []


async def test_a_node_is_down_only_once_none_of_its_replicas_answers():
    host, kms, clock, heard, _ = await hosted(replicated())
    await host.poll()
    kms.unreachable.add("a")
    await host.poll()
    assert status(host, "a") == "OPERATING"
    kms.unreachable.add("a/1")
    clock.advance(1)
    await host.poll()
    assert status(host, "a") == "DOWN" and host.liveness("a").ok is False
    assert "replica 0:" in host.liveness("a").error and "replica 1:" in host.liveness("a").error
    (row,) = host.core.sessions()
    assert row["state"] == "Held"
    kms.unreachable.discard("a/1")
    clock.advance(1)
    await host.poll()
    assert status(host, "a") == "OPERATING"
    (row,) = host.core.sessions()
    assert row["state"] == "Active"
    assert kms.holders(row["sessionId"]) >= {"a/1", "b", "b/1", "c"}


async def test_a_replica_unreachable_for_replace_after_is_replaced_alone():
    host, kms, clock, heard, replacer = await hosted(replicated(), replace_after_s=10.0)
    await host.poll()
    kms.unreachable.add("a/1")
    await host.poll()
    clock.now = 110.0
    await host.tick()
    await asyncio.sleep(0)
    assert replacer.asked == ["a/1"]
    kms.unreachable.discard("a/1")
    kms.restart("a/1")
    await host.check("a", 1)
    assert heard.replaced == [("a/1", 10.0)]
    assert host.metrics.km_replacements("a")._value.get() == 1
    assert "a/1" in kms.holders(session_id(host)), "the new instance got its node's sessions"
    assert status(host, "a") == "OPERATING"


async def test_scaling_a_node_pushes_its_sessions_again_with_each_replica_s_new_share():
    network = replicated(replicas_at_a=1)
    host, kms, clock, *_ = await hosted(network)
    sid = session_id(host)
    whole = kms.entry("a", sid).rate_bps
    await host.rescale()  # first look: nothing to do
    assert kms.entry("a", sid).rate_bps == whole
    network.nodes["a"] = node("a", "sae-a", km={"replicas": 2})
    clock.advance(1)
    await host.rescale()
    assert (kms.entry("a", sid).rate_bps, kms.entry("a/1", sid).rate_bps) == (whole / 2, whole / 2)
    assert kms.entry("a", sid).version == kms.entry("a/1", sid).version > kms.entry("c", sid).version
    network.nodes["a"] = node("a", "sae-a", km={"replicas": 1})
    clock.advance(1)
    await host.rescale()
    assert kms.entry("a", sid).rate_bps == whole
    await host.poll()
    assert (gauge(host, "vqkd_control_km_replicas", "a"), gauge(host, "vqkd_control_km_replicas_ready", "a")) == (1, 1)


async def test_each_replica_gets_its_node_s_topology_and_only_a_new_instance_is_pushed_again():
    network = replicated()
    ports = iter(range(7000, 7100))
    addressing = LocalAddressing(
        km_ports={name: KMPorts(next(ports), tuple(ReplicaPorts(next(ports), next(ports)) for _ in range(count)))
                  for name, count in (("a", 2), ("b", 2), ("c", 1))},
        module_ports={name: ModulePorts(next(ports), next(ports), next(ports)) for name in ("a-b", "b-c")},
        certificates={})
    kms = FakeKMs()
    host = ControlPlaneHost(kms, None, "unused")
    host.track(network, addressing)
    await host.core.load(network)
    assert sorted(km for call, km, _, _ in kms.calls if call == "topology") == sorted(SESSION_KMS)
    assert kms.topology("a/1") == kms.topology("a") == km_topology(network, "a", addressing)
    assert [(end.name, end.peer_replica) for end in kms.topology("c").links] == [("b-c", 0), ("b-c", 1)]
    await host.poll()
    kms.calls.clear()
    kms.restart("a/1")
    await host.poll()
    assert [km for call, km, _, _ in kms.calls if call == "topology"] == ["a/1"], "the others hold theirs"
    assert kms.calls[0][:2] == ("topology", "a/1") and "a/1" in kms.holders(session_id(host))
    assert host.topologies.held("a", 1).incarnation == kms.incarnations["a/1"]
