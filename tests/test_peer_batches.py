"""Requests to the peer KM made together (km.peering._Batches): Deliver and Commit."""

from __future__ import annotations

import asyncio

import pytest

from vqkd.km.rpc.peers import _Batches


class Peer:
    """A send function that answers when told to, recording each request's items."""

    def __init__(self):
        self.requests: list[list] = []
        self.answer: asyncio.Event = asyncio.Event()
        self.refuse: set = set()
        self.fail: Exception | None = None

    async def send(self, items: list) -> list[Exception | None]:
        self.requests.append(items)
        await self.answer.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"refused {item}") if item in self.refuse else None for item in items]


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(10):
        await asyncio.sleep(0)


def batches(peer: Peer, max_weight: int = 10) -> _Batches:
    return _Batches("test", peer.send, max_weight, lambda: RuntimeError("cancelled"))


async def test_items_made_during_a_request_go_together_in_the_next():
    peer = Peer()
    b = batches(peer)
    first = asyncio.create_task(b.submit("a"))
    await settle()
    assert peer.requests == [["a"]]  # an idle link sends at once
    rest = [asyncio.create_task(b.submit(item)) for item in "bcd"]
    await settle()
    peer.answer.set()
    await asyncio.gather(first, *rest)
    assert peer.requests == [["a"], ["b", "c", "d"]]


async def test_a_request_carries_at_most_max_weight_but_a_heavier_item_goes_alone():
    peer = Peer()
    b = batches(peer, max_weight=10)
    tasks = [asyncio.create_task(b.submit(name, weight)) for name, weight in
             (("first", 1), ("x", 6), ("y", 4), ("z", 1), ("huge", 25), ("w", 1))]
    await settle()
    peer.answer.set()
    await asyncio.gather(*tasks)
    assert peer.requests == [["first", "x"], ["y", "z"], ["huge"], ["w"]]


async def test_each_submitter_gets_its_own_outcome():
    peer = Peer()
    peer.refuse = {"b"}
    b = batches(peer)
    peer.answer.set()
    outcomes = await asyncio.gather(*(b.submit(item) for item in "abc"), return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "refused b"


async def test_a_failed_request_fails_every_item_in_it_and_the_next_ones_still_go():
    peer = Peer()
    peer.fail = ConnectionError("peer gone")
    b = batches(peer)
    peer.answer.set()
    outcomes = await asyncio.gather(*(b.submit(item) for item in "ab"), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    peer.fail = None
    await b.submit("c")
    assert peer.requests[-1] == ["c"]


async def test_cancelling_the_sender_fails_whatever_waits():
    peer = Peer()
    b = batches(peer)
    tasks = [asyncio.create_task(b.submit(item)) for item in "abc"]
    await settle()
    b._sending.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert [str(o) for o in outcomes] == ["cancelled"] * 3


async def test_a_submitter_that_gives_up_does_not_stop_the_others():
    peer = Peer()
    b = batches(peer)
    gave_up = asyncio.create_task(b.submit("a"))
    kept = asyncio.create_task(b.submit("b"))
    await settle()
    gave_up.cancel()
    peer.answer.set()
    await kept
    with pytest.raises(asyncio.CancelledError):
        await gave_up


async def test_relays_of_different_sessions_never_wait_for_each_other():
    """At an intermediate KM one session's relay may wait for key on its next link: another
    session's relays go in requests of their own meanwhile."""
    from types import SimpleNamespace

    from vqkd.km.rpc.peers import PeerClient
    from vqkd.km.domain.relay_crypto import RelayFields

    held = asyncio.Event()
    sent: list[list[str]] = []

    async def send(relays):
        sent.append([r.session_id for r in relays])
        if relays[0].session_id == "slow":
            await held.wait()
        return [None] * len(relays)

    client = PeerClient.__new__(PeerClient)
    client.link = SimpleNamespace(name="a-b", peer_node="b", peer_incarnation="inc-b")
    client._relays = {}
    client._send_relays = send

    def fields(session_id: str, relay_id: str) -> RelayFields:
        return RelayFields(link="a-b", sender_incarnation="inc-a", receiver_incarnation="inc-b",
                           session_id=session_id, relay_id=relay_id, index=0, master_sae_id="sae-a",
                           slave_sae_ids=("sae-c",), key_ids=("k",), key_size_bits=256, direct=False,
                           ciphertext=bytes(32), pad=(), mac_key=(), key_extension="")

    slow = [asyncio.create_task(client.relay(fields("slow", f"s{i}"), b"t")) for i in range(2)]
    await settle()
    await asyncio.wait_for(asyncio.gather(*(client.relay(fields("fast", f"f{i}"), b"t") for i in range(3))), 1)
    assert not any(task.done() for task in slow)
    held.set()
    await asyncio.gather(*slow)
    assert sent == [["slow", "slow"], ["fast", "fast", "fast"]]
    assert client._relays == {}, "a session's batches go when nothing waits"
