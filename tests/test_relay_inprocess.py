"""Trusted-node relay through the real KM domain code, wired in-process.

Each KM is a real KeyManager with its SessionTable and RelayService; the links between them
carry messages through the same protobuf conversion as gRPC, but without sockets, so
tampering, replay and failures can be injected exactly where wanted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from vqkd.km.domain import errors
from vqkd.km.config import KMConfig, KMTopology, LinkEndConfig, TLSPaths
from vqkd.km.domain.exchange import KeyExchange
from vqkd.km.domain.keymanager import KeyManager
from vqkd.km.rpc.peers import fields_from_pb, fields_to_pb
from vqkd.km.domain.relay import RelayRejected, RelayService
from vqkd.km.domain.sessions import SessionConfig, SessionTable, State
from vqkd.km.domain.vocabulary import Endpoint, Role

from builders import Clock

TLS = TLSPaths(ca=Path("/nonexistent/ca"), cert=Path("/nonexistent/c"), key=Path("/nonexistent/k"))


class WirePeer:
    """A domain Peer standing in for the gRPC PeerClient: hands each message to the neighbour's servicer logic."""

    def __init__(self, here: "Node", there: "Node", link_name: str):
        self.here, self.there, self.link_name = here, there, link_name
        self.tamper = None  # callable(pb) -> None, applied to the next relay message
        self.fail_commit = False
        self.sent: list = []

    async def relay(self, fields, tag):
        pb = fields_to_pb(fields, tag)
        self.sent.append(pb.SerializeToString())
        if self.tamper:
            self.tamper(pb)
            self.tamper = None
        link_in = self.there.km.links[self.link_name, 0]
        try:
            await self.there.relays.receive(link_in, fields_from_pb(pb), pb.tag)
        except (RelayRejected, errors.KMError) as e:
            raise errors.PeerUnavailable(str(e)) from None

    async def commit(self, link, session_id, relay_id):
        if self.fail_commit:
            raise errors.PeerUnavailable("connection lost")
        link_in = self.there.km.links[self.link_name, 0]
        try:
            await self.there.relays.commit(link_in, session_id, relay_id)
        except RelayRejected as e:
            raise errors.PeerUnavailable(str(e)) from None


class Node:
    def __init__(self, name, neighbours, saes, clock):
        links = [LinkEndConfig(name=link_name(name, n), peer_node=n, peer_kme_id=n, peer_grpc="127.0.0.1:1",
                               module_url="https://127.0.0.1:1", module_sae_id=name, peer_module_sae_id=n)
                 for n in neighbours]
        cfg = KMConfig(node=name, kme_id=name, etsi014_listen="127.0.0.1:1", grpc_listen="127.0.0.1:1",
                       metrics_listen="127.0.0.1:1", tls=TLS, topology=KMTopology(saes=saes, links=links))
        self.km = KeyManager(cfg, clock=clock)
        self.sessions = SessionTable(name, clock=clock)
        self.rejected: list[str] = []
        self.relays = RelayService(self.km, self.sessions, clock=clock, on_reject=self.rejected.append,
                                   configuration_grace_s=0.05)
        self.exchange = KeyExchange(self.km, self.sessions, self.relays)


def link_name(a, b):
    return "-".join(sorted((a, b)))


def chain(n, bits_per_link=1 << 20):
    """Nodes n0 … n{n-1} in a line, one SAE each, every link filled with shared key."""
    clock = Clock()
    names = [f"n{i}" for i in range(n)]
    saes = {f"sae-{x}": x for x in names}
    nodes = {x: Node(x, [y for y in names if abs(names.index(y) - names.index(x)) == 1], saes, clock)
             for x in names}
    for a, b in zip(names, names[1:]):
        la, lb = nodes[a].km.link_to[b][0], nodes[b].km.link_to[a][0]
        # Each direction's material, as the two KMs would hold after AgreeKeys.
        for owner, other in ((la, lb), (lb, la)):
            blocks = [(os.urandom(16).hex(), os.urandom(1024)) for _ in range(bits_per_link // 8192)]
            owner.outgoing.add(blocks)
            other.incoming.add(blocks)
        la.peer_incarnation, lb.peer_incarnation = lb.incarnation, la.incarnation
        la.peer, lb.peer = WirePeer(nodes[a], nodes[b], la.name), WirePeer(nodes[b], nodes[a], lb.name)
    return nodes, names, clock


def configure(nodes, path, session_id="s-1", version=1, rate_bps=1e9, bucket_bits=1 << 24, timeout_s=60):
    src, dst = path[0], path[-1]
    for i, node in enumerate(path):
        role = Role.SOURCE if i == 0 else Role.DESTINATION if i == len(path) - 1 else Role.INTERMEDIATE
        cfg = SessionConfig(
            session_id=session_id, version=version, role=role, user="lab",
            source=Endpoint(src, f"sae-{src}"), destination=Endpoint(dst, f"sae-{dst}"),
            prev_hop=path[i - 1] if i else "", next_hop=path[i + 1] if i < len(path) - 1 else "",
            priority=1, rate_bps=rate_bps, bucket_bits=bucket_bits, inactivity_timeout_s=timeout_s,
            request_timeout_s=0.5, key_chunk_size=32, ttl_s=3600, fallback="",
        )
        cfg.validate(node, set(nodes[node].km.link_to))
        nodes[node].sessions.configure(cfg)


def link_bits(nodes, names):
    return {(a, b): nodes[a].km.link_to[b][0].outgoing.available_bits for a, b in zip(names, names[1:])}


@pytest.mark.parametrize("hops", [1, 2, 5])
async def test_both_ends_get_the_same_key_over_any_number_of_hops(hops):
    nodes, names, _ = chain(hops + 1)
    configure(nodes, names)
    src, dst = names[0], names[-1]
    before = link_bits(nodes, names)
    keys = (await nodes[src].exchange.issue(f"sae-{src}", [f"sae-{dst}"], 4, 256)).keys
    got = nodes[dst].km.store.take(f"sae-{dst}", f"sae-{src}", [k for k, _ in keys])
    assert [(k, e.key) for k, e in got] == keys
    # Every link on the path spent exactly the key plus one 256-bit MAC key, once.
    assert all(before[hop] - after == 4 * 256 + 256 for hop, after in link_bits(nodes, names).items())
    # Intermediate KMs never learn the path: their forwarding entry is only prev and next.
    for node in names[1:-1]:
        c = nodes[node].sessions.get("s-1").config
        assert (c.prev_hop, c.next_hop) == (names[names.index(node) - 1], names[names.index(node) + 1])


async def test_reverse_direction_uses_the_same_session():
    nodes, names, _ = chain(3)
    configure(nodes, names)
    keys = (await nodes["n2"].exchange.issue("sae-n2", ["sae-n0"], 2, 512)).keys
    got = nodes["n0"].km.store.take("sae-n0", "sae-n2", [k for k, _ in keys])
    assert [(k, e.key) for k, e in got] == keys


async def test_non_adjacent_keys_are_not_sent_in_the_clear():
    nodes, names, _ = chain(3)
    configure(nodes, names)
    keys = (await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256)).keys
    wire = b"".join(nodes["n0"].km.link_to["n1"][0].peer.sent + nodes["n1"].km.link_to["n2"][0].peer.sent)
    assert keys[0][1] not in wire


@pytest.mark.parametrize("field", ["ciphertext", "tag", "slave_sae_ids", "key_ids", "key_size_bits", "index"])
async def test_tampering_on_any_hop_is_detected_and_nobody_gets_the_key(field):
    nodes, names, _ = chain(3)
    configure(nodes, names)

    def flip(pb):
        if field == "ciphertext":
            pb.ciphertext = bytes([pb.ciphertext[0] ^ 1]) + pb.ciphertext[1:]
        elif field == "tag":
            pb.tag = bytes([pb.tag[0] ^ 0x80]) + pb.tag[1:]
        elif field == "slave_sae_ids":
            pb.slave_sae_ids[0] = "sae-n1"
        elif field == "key_ids":
            pb.key_ids[0] = "00000000-0000-4000-8000-000000000000"
        elif field == "key_size_bits":
            pb.key_size_bits = 128  # two keys of 128 bits in place of one of 256
            pb.key_ids.append("00000000-0000-4000-8000-000000000000")
        else:
            pb.index += 1

    nodes["n1"].km.link_to["n2"][0].peer.tamper = flip  # on the second hop
    with pytest.raises(errors.PeerUnavailable, match="tampered"):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256)
    assert nodes["n2"].rejected == ["tampered"]
    assert len(nodes["n2"].km.store) == 0 and not nodes["n2"].relays.pending


async def test_a_replayed_relay_message_is_refused():
    nodes, names, _ = chain(2)
    configure(nodes, names)
    await nodes["n0"].exchange.issue("sae-n0", ["sae-n1"], 1, 256)
    from vqkd.km.v1 import km_pb2
    pb = km_pb2.RelayRequest.FromString(nodes["n0"].km.link_to["n1"][0].peer.sent[0])
    with pytest.raises(RelayRejected) as e:
        await nodes["n1"].relays.receive(nodes["n1"].km.link_to["n0"][0], fields_from_pb(pb), pb.tag)
    assert e.value.reason == "replayed"


@pytest.mark.parametrize("field, value", [("link", "n1-n2"), ("receiver_incarnation", "an-earlier-one")])
async def test_a_relay_naming_another_link_or_incarnation_is_refused_before_any_material_is_used(field, value):
    nodes, names, _ = chain(3)
    configure(nodes, names)
    nodes["n0"].km.link_to["n1"][0].peer.tamper = lambda pb: setattr(pb, field, value)
    link_in = nodes["n1"].km.link_to["n0"][0]
    before = link_in.incoming.available_bits
    with pytest.raises(errors.PeerUnavailable, match="malformed"):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256)
    assert nodes["n1"].rejected == ["malformed"] and link_in.incoming.available_bits == before


async def test_a_lost_commit_delivers_to_neither_end():
    nodes, names, clock = chain(3)
    configure(nodes, names)
    nodes["n1"].km.link_to["n2"][0].peer.fail_commit = True  # the path breaks after the relay
    with pytest.raises(errors.PeerUnavailable):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 2, 256)
    assert len(nodes["n2"].km.store) == 0  # held as pending, never released to the slave
    clock.now += 31  # past the commit wait
    nodes["n2"].relays._expire()
    assert not nodes["n2"].relays.pending


async def test_token_bucket_limits_the_session_and_says_so():
    nodes, names, _ = chain(2)
    configure(nodes, names, rate_bps=1000, bucket_bits=1024)
    await nodes["n0"].exchange.issue("sae-n0", ["sae-n1"], 4, 256)  # the whole burst
    with pytest.raises(errors.Unavailable, match="token bucket allows 0 bits now"):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n1"], 1, 256)
    assert nodes["n0"].sessions.get("s-1").refused_by_bucket == 1


async def test_not_enough_link_key_is_refused_before_anything_is_taken():
    nodes, names, _ = chain(3, bits_per_link=16384)
    configure(nodes, names)
    before = link_bits(nodes, names)
    with pytest.raises(errors.InsufficientKey):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 64, 512)
    assert link_bits(nodes, names) == before


async def test_session_cycle_states_expiry_and_deletion():
    nodes, names, clock = chain(3)
    configure(nodes, names, timeout_s=10)
    table = nodes["n0"].sessions
    assert table.get("s-1").state is State.OPERATIVE
    await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256)
    assert [(e.event, e.state) for e in table.events] == [
        ("route configured", State.OPERATIVE), ("key request", State.KEY_EXCHANGING),
        ("QKD key available", State.KEY_EXCHANGING), ("key delivered", State.OPERATIVE),
    ]
    assert [e.event for e in nodes["n1"].sessions.events][-1] == "relayed key received"
    assert [e.event for e in nodes["n2"].sessions.events][-2:] == ["relayed key received", "key committed"]
    clock.now += 11
    assert [s.session_id for s in table.expired()] == ["s-1"]
    table.terminate("s-1", "inactivity timer expired")
    assert table.get("s-1") is None and table.events[-1].state is State.TERMINATED
    # Without the session there is no path from n0 to n2: the forwarding entry is gone.
    with pytest.raises(errors.NoPath, match="no QKD link to node n2"):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256)


async def test_pushing_an_old_version_changes_nothing():
    nodes, names, _ = chain(3)
    configure(nodes, names, version=2)
    configure(nodes, names, version=1, rate_bps=1)
    assert nodes["n0"].sessions.get("s-1").config.rate_bps == 1e9


def drain(link):
    link.outgoing.clear()


async def test_short_key_is_served_by_priority_then_first_come_first_served():
    nodes, names, _ = chain(2)
    for sid, priority in (("low", 1), ("high", 9), ("low-2", 1)):
        configure(nodes, names, session_id=sid)
        nodes["n0"].sessions.get(sid).config = dataclasses.replace(
            nodes["n0"].sessions.get(sid).config, priority=priority, request_timeout_s=5)
    # one SAE pair per session
    link = nodes["n0"].km.link_to["n1"][0]
    drain(link)
    served: list[str] = []

    async def request(sid):
        session = nodes["n0"].sessions.get(sid)
        await nodes["n0"].relays.send(session, "sae-n0", ["sae-n1"], 1, 256)
        served.append(sid)

    tasks = [asyncio.create_task(request(sid)) for sid in ("low", "high", "low-2")]
    await asyncio.sleep(0.01)
    assert served == []  # all wait: the link has no key
    for _ in range(3):  # key for exactly one request at a time
        blocks = [(os.urandom(16).hex(), os.urandom(64))]
        link.outgoing.add(blocks)
        nodes["n1"].km.link_to["n0"][0].incoming.add(blocks)
        link.queue.notify()
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert served == ["high", "low", "low-2"]


async def test_waiting_for_key_is_bounded_by_the_session_timeout():
    nodes, names, _ = chain(2)
    configure(nodes, names)
    drain(nodes["n0"].km.link_to["n1"][0])
    with pytest.raises(errors.InsufficientKey, match="within its timeout of 0.5 s"):
        await nodes["n0"].exchange.issue("sae-n0", ["sae-n1"], 1, 256)


async def test_token_bucket_rate_holds_over_several_seconds():
    nodes, names, clock = chain(2, bits_per_link=1 << 23)
    rate, burst = 8192, 4096
    configure(nodes, names, rate_bps=rate, bucket_bits=burst)
    delivered = refused = 0
    start = clock.now
    while clock.now - start < 5.0:  # greedy client, a request every 10 ms of simulated time
        try:
            await nodes["n0"].exchange.issue("sae-n0", ["sae-n1"], 1, 256)
            delivered += 256
        except errors.Unavailable:
            refused += 1
        clock.now += 0.01
    assert rate * 5 + burst - 256 <= delivered <= rate * 5 + burst
    assert refused > 0 and nodes["n0"].sessions.get("s-1").refused_by_bucket == refused


async def test_relay_for_an_unknown_session_is_refused_and_counted():
    nodes, names, _ = chain(2)
    configure(nodes, names, session_id="known")
    session = nodes["n0"].sessions.get("known")
    nodes["n1"].sessions.terminate("known", "deletion signal: test")
    with pytest.raises(errors.PeerUnavailable, match="unknown_session"):
        await nodes["n0"].relays.send(session, "sae-n0", ["sae-n1"], 1, 256)
    assert nodes["n1"].rejected == ["unknown_session"]


class _HeldBack:
    """A node whose configuration is captured instead of applied, to be applied later."""

    def __init__(self, node: Node):
        self.km = node.km
        self.config = None
        self.sessions = self

    def configure(self, config):
        self.config = config


async def test_a_relay_arriving_just_before_its_configuration_waits_for_it():
    nodes, names, _ = chain(3)
    late = _HeldBack(nodes["n2"])
    configure({"n0": nodes["n0"], "n1": nodes["n1"], "n2": late}, names)
    nodes["n2"].relays.configuration_grace_s = 1.0
    issuing = asyncio.create_task(nodes["n0"].exchange.issue("sae-n0", ["sae-n2"], 1, 256))
    await asyncio.sleep(0.05)  # the relay waits at n2
    nodes["n2"].sessions.configure(late.config)
    keys = (await issuing).keys
    assert [(k, e.key) for k, e in nodes["n2"].km.store.take("sae-n2", "sae-n0", [keys[0][0]])] == keys


async def test_open_then_configure_walks_the_session_cycle():
    nodes, names, _ = chain(2)
    table = nodes["n0"].sessions
    session = table.open("s-1", Endpoint("n0", "sae-n0"), Endpoint("n1", "sae-n1"), detail="ETSI 004")
    assert session.state is State.USER_ACCEPTED and not session.configured.is_set()
    configure(nodes, names)
    assert session.configured.is_set() and session.state is State.OPERATIVE
    table.terminate("s-1", "deletion signal: control plane")
    assert [(e.event, e.state) for e in table.events] == [
        ("open request", State.AUTHENTICATING), ("user authenticated", State.USER_ACCEPTED),
        ("route configured", State.OPERATIVE), ("deletion signal: control plane", State.TERMINATED),
    ]


def test_the_session_of_an_sae_pair_is_the_oldest_live_one_in_either_direction():
    table = SessionTable("n0")
    a, b, c = Endpoint("n0", "sae-a"), Endpoint("n1", "sae-b"), Endpoint("n2", "sae-c")
    assert table.between("sae-a", "sae-b") is None
    table.open("s-1", a, b)
    table.open("s-2", b, a)
    table.open("s-3", a, c)
    assert table.between("sae-b", "sae-a").session_id == "s-1"
    assert table.between("sae-c", "sae-a").session_id == "s-3"
    table.terminate("s-1", "close request")
    assert table.between("sae-a", "sae-b").session_id == "s-2"
    table.terminate("s-2", "close request")
    assert table.between("sae-a", "sae-b") is None and table.between("sae-a", "sae-c").session_id == "s-3"
    assert table.terminate("s-2", "again") is None


async def test_an_abandoned_key_request_leaves_the_session_idle_so_its_timer_can_expire():
    # An application that hangs up mid-relay cancels its request: the session must not stay
    # KeyExchanging for ever (it would never expire and its KMs would keep it).
    nodes, names, clock = chain(3)
    configure(nodes, names, timeout_s=5)
    src, dst = names[0], names[-1]
    relayed = asyncio.Event()

    async def stuck(*args, **kwargs):
        relayed.set()
        await asyncio.Event().wait()

    nodes[src].relays.send = stuck
    request = asyncio.create_task(nodes[src].exchange.issue(f"sae-{src}", [f"sae-{dst}"], 1, 256))
    await relayed.wait()
    session = nodes[src].sessions.get("s-1")
    assert session.state is State.KEY_EXCHANGING
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert session.busy == 0 and session.state is State.OPERATIVE
    clock.now += 6
    assert nodes[src].sessions.expired() == [session]
