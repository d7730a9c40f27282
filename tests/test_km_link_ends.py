"""A KM's ends of a link, one per KM replica of the peer node, checked without processes: how a
topology makes them, which end key for a hop goes over, what ETSI 014 status and the metrics
make of several ends, relays through a node with two replicas wired in-process, and the
session inactivity a replica leaves to the control plane."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from builders import Clock
from vqkd.km import __main__ as km_main
from vqkd.km import identity
from vqkd.km.config import KeyLimits, KMConfig, KMTopology, LinkEndConfig, TLSPaths
from vqkd.km.domain import errors
from vqkd.km.domain.exchange import KeyExchange
from vqkd.km.domain.keymanager import UNREACHABLE_PASS_OVER_S, KeyManager
from vqkd.km.domain.relay import RelayRejected, RelayService
from vqkd.km.domain.sessions import SessionConfig, SessionTable
from vqkd.km.domain.vocabulary import Endpoint, LinkState, Role
from vqkd.km.etsi014.service import ETSI014Service
from vqkd.km.metrics import KMMetrics
from vqkd.km.process import SESSION_SWEEP_S, KMProcess
from vqkd.km.rpc.peers import fields_from_pb, fields_to_pb

TLS = TLSPaths(ca=Path("/nonexistent/ca"), cert=Path("/nonexistent/c"), key=Path("/nonexistent/k"))


def end(node: str, peer: str, peer_replica: int = 0, **settings) -> LinkEndConfig:
    name = "-".join(sorted((node, peer)))
    fields = dict(name=name, peer_node=peer, peer_kme_id=peer, peer_grpc=f"{peer}-{peer_replica}.svc:9443",
                  module_url=f"https://module-{name}:8443", module_sae_id=node, peer_module_sae_id=peer,
                  peer_replica=peer_replica)
    return LinkEndConfig(**{**fields, **settings})


def config(node: str, replica: int = 0, topology: KMTopology | None = None) -> KMConfig:
    return KMConfig(node=node, kme_id=node, replica=replica, etsi014_listen="127.0.0.1:1", grpc_listen="127.0.0.1:1",
                    metrics_listen="127.0.0.1:1", tls=TLS, topology=topology)


def fill(link, bits: int) -> None:
    link.outgoing.add([(os.urandom(8).hex(), os.urandom(bits // 8))])


# -- the ends a topology makes ------------------------------------------------------------------


def test_a_km_holds_an_end_of_the_link_per_peer_replica_and_knows_its_siblings():
    topology = KMTopology(version=1, links=[end("a", "b", 1), end("a", "b", 0), end("a", "c")],
                          replicas={0: "a-0.svc:9443", 1: "a-1.svc:9443", 2: "a-2.svc:9443"})
    km = KeyManager(config("a", replica=1, topology=topology))
    assert list(km.links) == [("a-b", 1), ("a-b", 0), ("a-c", 0)]
    assert [link.peer_replica for link in km.link_to["b"]] == [0, 1], "ends in the order of the peer's replicas"
    assert [link.end for link in km.link_to["c"]] == [("a-c", 0)]
    assert km.siblings == {0: "a-0.svc:9443", 2: "a-2.svc:9443"}
    assert km.kme_id_of("b") == "b"
    # Each end meets another replica of b: they may present the same incarnation.
    assert {link.incarnation for link in km.links.values()} == {km.incarnation}


def test_a_peer_scaled_down_loses_only_the_end_of_its_removed_replica():
    km = KeyManager(config("a", topology=KMTopology(links=[end("a", "b", 0), end("a", "b", 1)])))
    kept, gone = km.links["a-b", 0], km.links["a-b", 1]
    fill(kept, 8192)
    fill(gone, 4096)
    change = km.apply_topology(KMTopology(version=1, links=[end("a", "b", 0)]))
    assert change.removed == (gone,) and not change.added
    assert km.links == {("a-b", 0): kept} and km.link_to == {"b": [kept]}
    assert kept.outgoing.available_bits == 8192
    assert km.flushed_bits()["link_removed"] == 4096
    # Scaled up again: the end is made anew, with an incarnation of its own.
    km.apply_topology(KMTopology(version=2, links=[end("a", "b", 0), end("a", "b", 1)]))
    again = km.links["a-b", 1]
    assert again is not gone and again.incarnation != gone.incarnation and kept.incarnation == km.incarnation


def test_one_replica_with_no_replicas_named_has_no_siblings():
    km = KeyManager(config("a", topology=KMTopology(links=[end("a", "b")], replicas={0: "a.svc:9443"})))
    assert km.siblings == {} and km.replica == 0


# -- which end key for a hop goes over -----------------------------------------------------------


def test_key_for_a_hop_goes_over_the_ends_holding_enough_in_turn_else_over_the_fullest():
    km = KeyManager(config("a", topology=KMTopology(links=[end("a", "b", r) for r in range(3)])))
    ends = km.link_to["b"]
    assert km.end_towards("b", 256) is None, "no end has its peer plugged in yet"
    for link in ends:
        link.peer = object()
    fill(ends[0], 8192)
    fill(ends[1], 4096)
    fill(ends[2], 1024)
    assert [km.end_towards("b", 2048).peer_replica for _ in range(4)] == [0, 1, 0, 1], "those holding enough"
    assert [km.end_towards("b", 1 << 20).peer_replica for _ in range(2)] == [0, 0], "none holds enough: the fullest"
    ends[0].peer = None
    assert {km.end_towards("b", 512).peer_replica for _ in range(4)} == {1, 2}, "never an end without its peer"
    ends[2].outgoing.add([("tie", bytes(384))])  # now as full as end 1
    assert {km.end_towards("b", 1 << 20).peer_replica for _ in range(4)} == {1, 2}, "the fullest tied take turns"
    assert km.end_towards("c", 256) is None


def test_an_end_whose_peer_did_not_answer_is_passed_over_while_another_can_serve():
    now = [100.0]
    km = KeyManager(config("a", topology=KMTopology(links=[end("a", "b", r) for r in range(2)])),
                    clock=lambda: now[0])
    ends = km.link_to["b"]
    for link in ends:
        link.peer = object()
        fill(link, 8192)
    ends[1].peer_unreachable_at = 100.0  # a call to replica 1 of b did not reach it
    assert {km.end_towards("b", 256).peer_replica for _ in range(4)} == {0}
    ends[0].peer_unreachable_at = 100.0
    assert {km.end_towards("b", 256).peer_replica for _ in range(4)} == {0, 1}, "none answers: all in turn"
    ends[0].peer_unreachable_at = None
    now[0] += UNREACHABLE_PASS_OVER_S + 0.1
    assert {km.end_towards("b", 256).peer_replica for _ in range(4)} == {0, 1}, "tried again after a while"


# -- ETSI 014 status and metrics over several ends ----------------------------------------------


def test_status_towards_a_node_counts_the_keys_of_all_its_ends():
    topology = KMTopology(saes={"sae-a": "a", "sae-b": "b"}, limits=KeyLimits(key_size=256),
                          links=[end("a", "b", 0, pool_target_bits=1 << 16),
                                 end("a", "b", 1, pool_target_bits=1 << 17)])
    km = KeyManager(config("a", topology=topology))
    fill(km.links["a-b", 0], 2048)
    fill(km.links["a-b", 1], 1024)
    status = ETSI014Service(km, exchange=None, replicas=None).status("sae-a", "sae-b")
    assert (status["stored_key_count"], status["max_key_count"]) == (12, (3 << 16) // 256)


def test_per_link_series_sum_the_ends_and_every_series_carries_the_replica():
    km = KeyManager(config("a", replica=3, topology=KMTopology(links=[end("a", "b", 0), end("a", "b", 1)])))
    metrics = KMMetrics(km)
    fill(km.links["a-b", 0], 8192)
    fill(km.links["a-b", 1], 4096)
    km.links["a-b", 1].devices.health.failed("peer", "PeerUnavailable", "replica 1 of b is gone")
    metrics.link_drawn_bits("a", "a-b").inc(100)
    value = metrics.exposed.get_sample_value
    labels = {"node": "a", "link": "a-b", "replica": "3"}
    assert value("vqkd_km_pool_bits", {**labels, "direction": "outgoing"}) == 12288
    assert value("vqkd_km_link_state", {**labels, "state": LinkState.DOWN.value}) == 1.0, "the worst end's state"
    assert value("vqkd_km_link_state", {**labels, "state": LinkState.UP.value}) == 0.0
    assert value("vqkd_km_link_drawn_bits_total", labels) == 100
    assert value("vqkd_km_refusals_total", {"node": "a", "reason": "no_path", "replica": "3"}) == 0
    names = {s.name for family in metrics.exposed.collect() for s in family.samples if "replica" not in s.labels}
    assert names == set(), f"series without the replica label: {sorted(names)}"


# -- the replica ordinal from the environment ---------------------------------------------------


def test_the_environment_names_the_replica_a_shared_configuration_file_runs_as(tmp_path):
    topology = KMTopology(replicas={0: "a-0.svc:9443", 1: "a-1.svc:9443"})
    path = tmp_path / "km.json"
    path.write_text(json.dumps(config("a", topology=topology).model_dump(mode="json")))
    assert km_main.load(path, environ={}).replica == 0
    assert km_main.load(path, environ={"VQKD_KM_REPLICA": "1"}).replica == 1
    with pytest.raises(SystemExit, match="VQKD_KM_REPLICA='x' is no replica ordinal"):
        km_main.load(path, environ={"VQKD_KM_REPLICA": "x"})
    with pytest.raises(SystemExit, match="not this KM's replica 2"):
        km_main.load(path, environ={"VQKD_KM_REPLICA": "2"})


# -- relays through a node with two replicas, in-process ----------------------------------------


class Instance:
    """One KM replica's domain: key manager, sessions, relay, key exchange."""

    def __init__(self, node: str, replica: int, links: list[LinkEndConfig], saes: dict, clock: Clock):
        self.km = KeyManager(config(node, replica, KMTopology(saes=saes, links=links)), clock=clock)
        self.sessions = SessionTable(node, clock=clock)
        self.rejected: list[str] = []
        self.relays = RelayService(self.km, self.sessions, clock=clock, on_reject=self.rejected.append,
                                   configuration_grace_s=0.05)
        self.exchange = KeyExchange(self.km, self.sessions, self.relays)


class WirePeer:
    """The peer of one end: hands what it sends to the far instance's end towards this replica."""

    def __init__(self, here: Instance, there: Instance, name: str):
        self.there, self.end = there, (name, here.km.replica)
        self.relayed: list[str] = []  # relay IDs
        self.delivered: list[str] = []  # key IDs

    async def relay(self, fields, tag):
        pb = fields_to_pb(fields, tag)
        self.relayed.append(pb.relay_id)
        try:
            await self.there.relays.receive(self.there.km.links[self.end], fields_from_pb(pb), pb.tag)
        except (RelayRejected, errors.KMError) as e:
            raise errors.PeerUnavailable(str(e)) from None

    async def commit(self, link, session_id, relay_id):
        await self.there.relays.commit(self.there.km.links[self.end], session_id, relay_id)

    async def deliver(self, master, slaves, key_ids, size_bits, spans):
        self.delivered += key_ids
        self.there.exchange.accept(self.there.km.links[self.end], master, slaves, key_ids, size_bits, spans)


def pair(x: Instance, y: Instance, name: str, bits: int = 1 << 20) -> None:
    """Join x's end towards y's replica and y's end towards x's, filled with shared key both ways."""
    ex, ey = x.km.links[name, y.km.replica], y.km.links[name, x.km.replica]
    for owner, other in ((ex, ey), (ey, ex)):
        blocks = [(os.urandom(16).hex(), os.urandom(1024)) for _ in range(bits // 8192)]
        owner.outgoing.add(blocks)
        other.incoming.add(blocks)
    ex.peer_incarnation, ey.peer_incarnation = ey.incarnation, ex.incarnation
    ex.peer, ey.peer = WirePeer(x, y, name), WirePeer(y, x, name)


def chain_through_two_replicas():
    """a - m - c, where m has two KM replicas and a and c one each."""
    clock = Clock()
    saes = {"sae-a": "a", "sae-m": "m", "sae-c": "c"}
    a = Instance("a", 0, [end("a", "m", 0), end("a", "m", 1)], saes, clock)
    m = [Instance("m", r, [end("m", "a"), end("m", "c")], saes, clock) for r in (0, 1)]
    c = Instance("c", 0, [end("c", "m", 0), end("c", "m", 1)], saes, clock)
    for replica in m:
        pair(a, replica, "a-m")
        pair(replica, c, "c-m")
    path = [a, *m, c]
    roles = {"a": Role.SOURCE, "m": Role.INTERMEDIATE, "c": Role.DESTINATION}
    hops = {"a": ("", "m"), "m": ("a", "c"), "c": ("m", "")}
    for instance in path:
        node = instance.km.node
        session = SessionConfig(
            session_id="s-1", version=1, role=roles[node], user="lab", source=Endpoint("a", "sae-a"),
            destination=Endpoint("c", "sae-c"), prev_hop=hops[node][0], next_hop=hops[node][1], priority=1,
            rate_bps=1e9, bucket_bits=1 << 24, inactivity_timeout_s=60, request_timeout_s=0.5, key_chunk_size=32,
            ttl_s=3600, fallback="")
        session.validate(node, set(instance.km.link_to))
        instance.sessions.configure(session)
    return a, m, c


async def test_relays_through_a_node_with_two_replicas_spread_over_both_and_arrive_intact():
    a, m, c = chain_through_two_replicas()
    issued = []
    for _ in range(8):
        issued += (await a.exchange.issue("sae-a", ["sae-c"], 2, 256)).keys
    assert [len(a.km.links["a-m", r].peer.relayed) for r in (0, 1)] == [4, 4]
    assert [len(replica.km.link_to["c"][0].peer.relayed) for replica in m] == [4, 4], "each replica passed its own on"
    assert not any(replica.relays.forwarded for replica in m), "every commit followed its relay's end"
    got = c.km.store.take("sae-c", "sae-a", [key_id for key_id, _ in issued])
    assert [(key_id, entry.key) for key_id, entry in got] == issued
    assert len({key_id for key_id, _ in issued}) == 16
    assert not (a.rejected or c.rejected or any(replica.rejected for replica in m))


async def test_direct_delivery_to_a_node_with_two_replicas_spreads_over_them():
    clock = Clock()
    saes = {"sae-a": "a", "sae-b": "b"}
    a = Instance("a", 0, [end("a", "b", 0), end("a", "b", 1)], saes, clock)
    b = [Instance("b", r, [end("b", "a")], saes, clock) for r in (0, 1)]
    for replica in b:
        pair(a, replica, "a-b")
    a.exchange.sessions = None  # a KM without a control plane serves its neighbours directly
    issued = [(await a.exchange.issue("sae-a", ["sae-b"], 1, 256)).keys[0] for _ in range(4)]
    held = [replica.km.store.take("sae-b", "sae-a", a.km.links["a-b", r].peer.delivered)
            for r, replica in enumerate(b)]
    assert [len(keys) for keys in held] == [2, 2]
    assert sorted((key_id, entry.key) for keys in held for key_id, entry in keys) == sorted(issued)


# -- session inactivity ------------------------------------------------------------------------


@pytest.mark.parametrize("replicas, ended", [({0: "a-0.svc:9443"}, True),
                                             ({0: "a-0.svc:9443", 1: "a-1.svc:9443"}, False)])
async def test_a_km_with_sibling_replicas_leaves_ending_idle_sessions_to_the_control_plane(pki, replicas, ended):
    files = pki.files(identity.km("a"))
    tls = TLSPaths(ca=files.ca, cert=files.cert, key=files.key)
    process = KMProcess(config("a", topology=KMTopology(saes={"sae-a": "a", "sae-b": "b"},
                                                        links=[end("a", "b")], replicas=replicas))
                        .model_copy(update={"tls": tls}))
    process.sessions.configure(SessionConfig(
        session_id="idle", version=1, role=Role.SOURCE, user="lab", source=Endpoint("a", "sae-a"),
        destination=Endpoint("b", "sae-b"), prev_hop="", next_hop="b", priority=1, rate_bps=1e6, bucket_bits=1 << 16,
        inactivity_timeout_s=0.05, request_timeout_s=1, key_chunk_size=32, ttl_s=3600, fallback=""))
    sweeping = asyncio.create_task(process._expire_sessions())
    await asyncio.sleep(3 * SESSION_SWEEP_S)
    sweeping.cancel()
    assert (process.sessions.get("idle") is None) is ended
