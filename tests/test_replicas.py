"""The KM replicas of one node hold each key twice and hand it out once, at any replica.

Three replicas of node ``b`` are real ``NodeReplicas`` wired in-process: a sibling is the
other replica's servicer logic behind a switch that makes it unreachable, and a replica
"restarts" by being replaced with a new one at the same ordinal (a new incarnation, empty
stores).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vqkd.km.config import KMConfig, KMTopology, TLSPaths
from vqkd.km.domain import errors
from vqkd.km.domain.keymanager import KeyManager
from vqkd.km.domain.keystore import NotASlave
from vqkd.km.domain.replicas import DEPARTING_S, LOST_AFTER_S, NodeReplicas, SiblingTimedOut, SiblingUnavailable, stream_owner
from vqkd.km.domain.sessions import Session
from vqkd.km.domain.vocabulary import Endpoint

from builders import Clock

TLS = TLSPaths(ca=Path("/nonexistent/ca"), cert=Path("/nonexistent/c"), key=Path("/nonexistent/k"))
SLAVES = frozenset({"sae-b"})


class WireSibling:
    """Replica ``ordinal`` as another replica of the node calls it: down (connections refused) or
    slow (reached, no answer in time) as the node says."""

    def __init__(self, node: "Node", ordinal: int, caller: int):
        self.node, self.ordinal, self.caller = node, ordinal, caller

    @property
    def there(self) -> NodeReplicas:
        replica = self.node.replicas.get(self.ordinal)
        if replica is None or self.ordinal in self.node.down:
            raise SiblingUnavailable(f"replica {self.ordinal}: UNAVAILABLE")
        if self.ordinal in self.node.slow:
            raise SiblingTimedOut(f"replica {self.ordinal}: DEADLINE_EXCEEDED")
        return replica

    async def incarnation(self):
        await asyncio.sleep(0)
        return self.there.km.incarnation

    async def hold_copies(self, incarnation, held):
        await asyncio.sleep(0)
        self.there.keep_copies(self.caller, incarnation, held)

    async def drop_copies(self, key_ids):
        await asyncio.sleep(0)
        self.there.drop_copies(self.caller, key_ids)

    async def take_keys(self, incarnation, caller, master, key_ids):
        await asyncio.sleep(0)
        return await self.there.give(self.caller, incarnation, caller, master, key_ids)

    async def hand_chunks(self, session_id, index, chunks):
        self.node.chunks[self.ordinal].append((session_id, index, chunks))


class Node:
    """Replicas 0 … n-1 of node b."""

    def __init__(self, n: int = 3):
        self.clock = Clock()
        self.down: set[int] = set()
        self.slow: set[int] = set()
        self.replicas: dict[int, NodeReplicas] = {}
        self.held_once: dict[int, int] = {}
        self.promoted: dict[int, int] = {}
        self.chunks: dict[int, list] = {r: [] for r in range(n)}
        self.n = n
        for r in range(n):
            self.start(r)

    def start(self, r: int) -> NodeReplicas:
        topology = KMTopology(saes={"sae-a": "a", "sae-b": "b", "sae-b2": "b"},
                              replicas={o: f"127.0.0.1:{9000 + o}" for o in range(self.n)})
        km = KeyManager(KMConfig(node="b", kme_id="b", replica=r, etsi014_listen="127.0.0.1:1",
                                 grpc_listen="127.0.0.1:1", metrics_listen="127.0.0.1:1", tls=TLS,
                                 delivered_key_ttl_s=100, topology=topology), clock=self.clock)
        replica = NodeReplicas(km, self.clock, on_held_once=lambda k: self._count(self.held_once, r, k),
                               on_promoted=lambda k: self._count(self.promoted, r, k))
        replica.siblings = {o: WireSibling(self, o, r) for o in km.siblings}
        self.replicas[r] = replica
        self.down.discard(r)
        return replica

    @staticmethod
    def _count(counts, r, keys):
        counts[r] = counts.get(r, 0) + keys

    def __getitem__(self, r: int) -> NodeReplicas:
        return self.replicas[r]

    def copies(self) -> int:
        return sum(len(r.copies) for o, r in self.replicas.items() if o not in self.down)


def keys(*ids: str) -> list[tuple[str, bytes]]:
    return [(key_id, key_id.encode().ljust(32, b".")) for key_id in ids]


async def take(replica: NodeReplicas, *ids: str, caller: str = "sae-b") -> list[tuple[str, bytes]]:
    return [(key_id, entry.key) for key_id, entry in await replica.take(caller, "sae-a", list(ids))]


def test_siblings_are_the_other_replicas_of_the_topology():
    node = Node(3)
    assert sorted(node[1].siblings) == [0, 2]


async def test_a_committed_key_is_held_by_its_primary_and_copied_at_one_sibling():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1", "k2"), None)
    assert len(node[0].store) == 2 and node.copies() == 2
    assert len(node[1].copies) == 2  # the next ordinal up is asked first
    assert node.held_once == {}


async def test_taken_at_the_primary_drops_the_copy_before_answering():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    assert await take(node[0], "k1") == keys("k1")
    assert len(node[0].store) == 0 and node.copies() == 0


@pytest.mark.parametrize("at", [1, 2])
async def test_taken_at_another_replica_once(at):
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1", "k2"), None)
    assert await take(node[at], "k2", "k1") == keys("k2", "k1")
    assert node.copies() == 0 and len(node[0].store) == 0
    for r in range(3):
        with pytest.raises(errors.KeysNotFound):
            await take(node[r], "k1")
    assert node.promoted == {}


async def test_keys_of_one_request_from_several_replicas():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    await node[2].hold("sae-a", SLAVES, keys("k2"), None)
    await node[1].hold("sae-a", SLAVES, keys("k3"), None)
    assert await take(node[1], "k1", "k2", "k3") == keys("k1", "k2", "k3")
    assert node.copies() == 0 and sum(len(node[r].store) for r in range(3)) == 0


async def test_a_copy_is_refused_while_its_primary_is_alive_in_its_incarnation():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    # Asked directly, the copy holder refuses: the primary answers in the copy's incarnation.
    assert await node[1].give(2, node[2].km.incarnation, "sae-b", "sae-a", ["k1"]) == ([], False)
    # Asked by the primary itself, which does not hold the key (it is being handed out there).
    taken = node[0].store.take("sae-b", "sae-a", ["k1"])
    assert await node[1].give(0, node[0].km.incarnation, "sae-b", "sae-a", ["k1"]) == ([], False)
    assert len(node[1].copies) == 1 and node.promoted == {}
    node[0]._put_back(node[0].store, taken)


@pytest.mark.parametrize("how", ["killed", "restarted"])
async def test_the_copy_is_promoted_once_its_primary_is_gone(how):
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1", "k2"), None)
    if how == "killed":
        node.down.add(0)
    else:
        node.start(0)  # a new incarnation with empty stores at the same ordinal
    assert await take(node[2], "k1") == keys("k1")  # copy at replica 1, asked by replica 2
    assert node.promoted == {1: 1}
    assert await take(node[1], "k2") == keys("k2")  # at the copy holder itself
    assert node.promoted == {1: 2} and node.copies() == 0
    with pytest.raises(errors.KeysNotFound if how == "restarted" else errors.Unavailable):
        await take(node[2], "k1")


async def test_a_copy_waits_while_its_primary_is_reached_but_slow_to_answer():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    node.slow.add(0)  # maybe alive and handing the key out: the copy must not go too
    assert await node[1].give(2, node[2].km.incarnation, "sae-b", "sae-a", ["k1"]) == ([], True)
    with pytest.raises(errors.Unavailable):
        await take(node[2], "k1")
    assert node.promoted == {} and len(node[1].copies) == 1
    node.slow.clear()
    assert await take(node[2], "k1") == keys("k1")


@pytest.mark.parametrize("at", [0, 2])
async def test_a_key_whose_copy_holder_does_not_answer_in_time_is_not_handed_out_yet(at):
    """Its copy might outlive the answer and be let out once the primary goes: retry."""
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    node.slow.add(1)  # holds the copy, reached but slow
    with pytest.raises(errors.Unavailable, match="did not answer in time|retry"):
        await take(node[at], "k1")
    assert len(node[0].store) == 1 and len(node[1].copies) == 1, "held twice still"
    node.slow.clear()
    assert await take(node[at], "k1") == keys("k1")
    assert node.copies() == 0 and len(node[0].store) == 0


async def test_racing_takes_of_one_key_at_every_replica_deliver_it_once():
    for gone in (None, 0):
        node = Node(3)
        await node[0].hold("sae-a", SLAVES, keys("k1"), None)
        if gone is not None:
            node.down.add(gone)
        alive = [r for r in range(3) if r != gone]
        results = await asyncio.gather(*(take(node[r], "k1") for r in alive for _ in range(3)),
                                       return_exceptions=True)
        assert sum(1 for r in results if r == keys("k1")) == 1, results
        assert all(isinstance(r, (errors.KeysNotFound, errors.Unavailable)) for r in results if r != keys("k1"))
        assert node.copies() == 0


async def test_all_or_none_keys_collected_for_a_failed_request_are_held_again():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    await node[2].hold("sae-a", SLAVES, keys("k2"), None)
    with pytest.raises(errors.KeysNotFound):
        await take(node[1], "k1", "k2", "unknown")
    # Nothing lost: k1 and k2 are held again (at replica 1, which collected them), with copies.
    assert len(node[1].store) == 2 and node.copies() == 2
    assert await take(node[0], "k1", "k2") == keys("k1", "k2")
    assert node.copies() == 0


async def test_all_or_none_local_keys_stay_with_their_copies():
    node = Node(2)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    with pytest.raises(errors.KeysNotFound):
        await take(node[0], "k1", "unknown")
    assert len(node[0].store) == 1 and len(node[1].copies) == 1
    assert await take(node[1], "k1") == keys("k1")


async def test_only_a_slave_takes_and_a_refusal_takes_nothing():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    await node[1].hold("sae-a", SLAVES, keys("k2"), None)
    with pytest.raises(NotASlave):
        await take(node[1], "k1", "k2", caller="sae-b2")
    assert len(node[0].store) == 1 and len(node[1].store) == 1 and node.copies() == 2
    assert await take(node[2], "k1", "k2") == keys("k1", "k2")


async def test_keys_are_held_once_when_no_sibling_answers():
    node = Node(3)
    node.down.update({1, 2})
    await node[0].hold("sae-a", SLAVES, keys("k1", "k2"), None)
    assert len(node[0].store) == 2 and node.held_once == {0: 2}
    node.down.clear()
    assert node.copies() == 0
    assert await take(node[2], "k1", "k2") == keys("k1", "k2")


async def test_a_dead_sibling_is_passed_over_and_the_next_one_holds_the_copy():
    node = Node(3)
    node.down.add(1)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    assert len(node[2].copies) == 1 and node.held_once == {}
    node.down.clear()
    await node[0].hold("sae-a", SLAVES, keys("k2"), None)
    assert len(node[2].copies) == 2  # replica 1 is passed over for a while
    node.clock.advance(5)
    await node[0].hold("sae-a", SLAVES, keys("k3"), None)
    assert len(node[1].copies) == 1


async def test_copies_a_restarted_holder_lost_are_made_again_and_the_key_survives_its_primary():
    node = Node(2)
    await node[0].hold("sae-a", SLAVES, keys("k1", "k2"), None)
    await node[0].check_siblings()  # replica 1 as it first answers
    node.start(1)  # the copy holder restarts: its copies are gone
    assert node.copies() == 0
    await node[0].check_siblings()
    assert len(node[1].copies) == 2, "copied again at the new instance"
    node.down.add(0)  # now the primary goes: the keys are still there, once each
    assert await take(node[1], "k1", "k2") == keys("k1", "k2")
    with pytest.raises(errors.Unavailable):
        await take(node[1], "k1")


async def test_copies_at_a_holder_out_of_reach_for_long_go_to_another_sibling():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    assert len(node[1].copies) == 1
    node.down.add(1)
    await node[0].check_siblings()
    assert len(node[2].copies) == 0, "out of reach a moment: not yet"
    node.clock.advance(LOST_AFTER_S)
    await node[0].check_siblings()
    assert len(node[2].copies) == 1
    assert await take(node[0], "k1") == keys("k1")
    assert len(node[2].copies) == 0, "the new copy is dropped when the key is taken"


async def test_a_key_taken_while_its_copy_is_made_again_leaves_no_copy_behind():
    node = Node(3)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    node.down.add(1)  # the copy holder is gone: the copy is made again, at replica 2
    copying = asyncio.ensure_future(node[0].copy_again(1))
    await asyncio.sleep(0)  # the copy is on its way
    assert await take(node[0], "k1") == keys("k1")  # drops the copy where it was: replica 1, gone
    await copying
    assert node.copies() == 0, "the copy made meanwhile is dropped too"


async def test_replicas_scaled_away_together_hand_their_keys_to_one_that_stays():
    node = Node(3)
    await node[1].hold("sae-a", SLAVES, keys("k1", "k2"), None)  # copies at replica 2
    await node[2].hold("sae-a", SLAVES, keys("k3"), None)  # copy at replica 0
    assert len(node[2].copies) == 2 and len(node[0].copies) == 1
    assert await node[0].hand_over() == 0, "replica 0 always stays"
    assert await node[2].hand_over() == 0, "the copy of its key is at replica 0 already"
    assert await node[1].hand_over() == 2
    assert len(node[1].store) == 0 and len(node[2].copies) == 0 and len(node[0].copies) == 3
    node.down.update({1, 2})  # both stopped: 3 -> 1
    assert await take(node[0], "k1", "k2", "k3") == keys("k1", "k2", "k3")
    assert node.copies() == 0


async def test_a_replica_the_topology_dropped_is_still_asked_while_it_departs():
    node = Node(2)
    await node[1].hold("sae-a", SLAVES, keys("k1", "k2"), None)  # copies at replica 0
    node[0].departing = {1: (node[0].siblings[1], node.clock())}  # scaled to one replica: 1 is stopping
    node[0].siblings = {}
    assert await take(node[0], "k1") == keys("k1"), "asked of the departing replica, which still holds it"
    node[1].store.drop(["k2"])  # handed over: its copy at replica 0 waits for replica 1 to be gone
    with pytest.raises(errors.Unavailable, match="scaled away"):
        await take(node[0], "k2")
    node.down.add(1)  # it stopped
    assert await take(node[0], "k2") == keys("k2")
    node.clock.advance(DEPARTING_S)
    with pytest.raises(errors.KeysNotFound):
        await take(node[0], "k9")


async def test_a_copy_has_the_keys_time_to_live():
    node = Node(2)
    await node[0].hold("sae-a", SLAVES, keys("k1"), None)
    node.down.add(0)
    node.clock.advance(101)
    with pytest.raises(errors.Unavailable):
        await take(node[1], "k1")
    assert node.promoted == {}


def test_every_replica_names_the_same_stream_owner_and_owners_spread():
    owners = {stream_owner(f"session-{i}", [0, 1, 2]) for i in range(64)}
    assert owners == {0, 1, 2}
    assert stream_owner("s", [2, 0, 1]) == stream_owner("s", [0, 1, 2])
    # A replica added takes streams only for itself: every other stream keeps its owner.
    for i in range(64):
        owner = stream_owner(f"session-{i}", [0, 1, 2, 3])
        assert owner in (3, stream_owner(f"session-{i}", [0, 1, 2]))


async def test_stream_chunks_committed_away_from_the_owner_go_to_the_owner():
    node = Node(3)
    session_id = next(f"s-{i}" for i in range(100) if stream_owner(f"s-{i}", [0, 1, 2]) == 2)
    session = Session(session_id, Endpoint("a", "sae-a"), Endpoint("b", "sae-b"))
    assert node[0].stream_owner(session_id) == 2 and node[2].stream_owner(session_id) is None
    await node[0].hand_chunks(session, 4, keys("c4"))
    assert node.chunks[2] == [(session_id, 4, keys("c4"))] and session.stream == {}
    await node[2].hand_chunks(session, 5, keys("c5"))
    assert session.stream == {5: keys("c5")[0]}
