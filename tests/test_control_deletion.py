"""Deleting resources under running sessions: rerouted or held, ended, nothing left on a KM.

The network (a-d and d-c have a higher QBER, so a-b-c is the preferred way a -> c):

    a --- b --- c --- e
    |           |
    +---- d ----+
"""

from __future__ import annotations

import asyncio

import pytest

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.access import Credentials
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.errors import ControlError
from vqkd.operator.control.memory_kms import InMemoryKMs
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.resources.models import KeySession, QoS

from builders import Clock, link, node, user

A, B, C, D, E = (Endpoint(n, f"sae-{n}") for n in "abcde")
QOS = QoS(min_bps=1000, max_bps=4000, key_chunk_size=32)
SETTINGS = AdmissionSettings(inactivity_timeout_s=60, peer_wait_s=30, held_retry_s=5, held_retry_max_s=20)


async def network(kms: InMemoryKMs, clock: Clock) -> ControlCore:
    core = ControlCore(kms, clock=clock, admission=SETTINGS)
    for name in "abcde":
        await core.apply(node(name, f"sae-{name}"))
    for a, b in (("a", "b"), ("b", "c"), ("c", "e")):
        await core.apply(link(a, b))
    await core.apply(link("a", "d", qber=0.05))
    await core.apply(link("d", "c", qber=0.05))
    await core.apply(user("alice", ["sae-a", "sae-c", "sae-e"], priority=3, sla={"maxSessions": 5}))
    await core.apply(user("bob", ["sae-b", "sae-d"], sla={}))
    return core


async def open_pair(core: ControlCore, source: Endpoint, destination: Endpoint) -> str:
    first = await core.open_session(source.node, Credentials(source.sae_id), source, destination, QOS)
    second = await core.open_session(destination.node, Credentials(destination.sae_id), source, destination,
                                     session_id=first.session_id)
    assert first.accepted and second.accepted, (first.message, second.message)
    return first.session_id


def reserved(core: ControlCore) -> dict[str, int]:
    return {name: load.reserved_bps for name, load in core.routing.loads.items() if load.reserved_bps or load.sessions}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kms() -> InMemoryKMs:
    return InMemoryKMs()


async def test_deleting_a_link_reroutes_its_sessions_make_before_break(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, C)
    kms.calls.clear()

    await core.delete("QKDLink", "b-c")

    session = core.session(session_id)
    assert session.state is AdmissionState.ACTIVE and session.route.nodes == ("a", "d", "c")
    assert session.reason == "Rerouted" and "link b-c deleted" in session.message
    # Every KM of the new path confirmed before the KM left behind deletes its entry.
    assert sorted(call[1] for call in kms.calls[:3]) == ["a", "c", "d"]
    assert all(call[0] == "configure" and call[3] == session.version for call in kms.calls[:3])
    assert kms.calls[3:] == [("delete", "b", session_id, 0)]
    assert kms.holders(session_id) == {"a", "d", "c"}
    assert reserved(core) == {"a-d": 1000, "d-c": 1000}, "nothing is left reserved on the deleted link's neighbours"


async def test_deleting_the_only_link_holds_the_session_naming_it_and_a_new_link_resumes_it(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, C, E)

    await core.delete("QKDLink", "c-e")

    session = core.session(session_id)
    assert session.state is AdmissionState.HELD and session.reason == "NoPath"
    assert session.message.startswith("link c-e deleted; no alternative path")
    assert reserved(core) == {}
    # A new way to e is a better topology: the session resumes at once, not at its next retry.
    await core.apply(link("b", "e"))
    assert session.state is AdmissionState.ACTIVE and session.reason == "Resumed"
    assert session.route.nodes == ("c", "b", "e") and kms.holders(session_id) == {"c", "b", "e"}


async def test_a_node_is_deleted_only_once_its_links_are_and_its_km_keeps_nothing(kms, clock):
    core = await network(kms, clock)
    crossing = await open_pair(core, A, C)  # a -> b -> c
    ending = await open_pair(core, B, D)
    with pytest.raises(ControlError, match="QKDNode b is still joined by QKDLinks a-b, b-c; delete those links first"):
        await core.delete("QKDNode", "b")
    assert "b" in core.topology.nodes, "a refused deletion changes nothing"

    for name in ("a-d", "a-b", "b-c"):  # a is cut off, b too: both sessions are Held
        await core.delete("QKDLink", name)
    held = core.session(crossing)
    assert held.state is AdmissionState.HELD and "link a-b deleted" in held.message
    assert core.session(ending).state is AdmissionState.HELD
    assert "b" in kms.holders(crossing), "a Held session keeps what its KMs hold"

    await core.delete("QKDNode", "b")

    assert core.session(ending).state is AdmissionState.TERMINATED and core.session(ending).reason == "NodeDeleted"
    assert kms.holders(ending) == set()
    assert held.state is AdmissionState.HELD and kms.holders(crossing) == {"a", "c"}, \
        "the deleted node's KM drops the entry of the Held session that crossed it"
    assert "b" not in held.configured_nodes and kms.tables["b"] == {}
    assert "b" not in core.topology.nodes and "b" not in core.routing.graph


async def test_a_deleted_node_is_owed_nothing_even_when_its_km_does_not_answer(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, E)  # a -> b -> c -> e
    kms.unreachable.add("b")
    await core.session_closed(session_id, "a")
    assert core.admission.pending_deletes("b") == {session_id: "Closed"}
    for name in ("a-b", "b-c"):
        await core.delete("QKDLink", name)

    await core.delete("QKDNode", "b")

    assert core.admission.pending_deletes("b") == {}, "no deletion is kept for a node that is gone"
    assert kms.calls[-1] == ("delete", "b", session_id, 0), "it was tried once more before being forgotten"


async def test_an_sae_taken_off_its_node_ends_its_sessions_there(kms, clock):
    core = await network(kms, clock)
    to_e = await open_pair(core, A, E)
    to_c = await open_pair(core, A, C)

    await core.apply(node("e"))  # e keeps no SAE

    assert core.session(to_e).state is AdmissionState.TERMINATED and core.session(to_e).reason == "SAEDetached"
    assert "SAE sae-e is no longer attached to QKDNode e" in core.session(to_e).message
    assert kms.holders(to_e) == set()
    assert core.session(to_c).state is AdmissionState.ACTIVE, "sessions of the node's other SAEs are left alone"


async def test_deleting_a_user_ends_its_sessions_and_leaves_nothing_on_any_km(kms, clock):
    core = await network(kms, clock)
    active = await open_pair(core, A, C)
    waiting = (await core.open_session("a", Credentials("sae-a"), A, E, QOS)).session_id
    bobs = await open_pair(core, B, D)

    await core.delete("UserProfile", "alice")

    for session_id in (active, waiting):
        session = core.session(session_id)
        assert session.state is AdmissionState.TERMINATED and session.reason == "UserDeleted"
        assert "UserProfile alice was deleted" in session.message
        assert kms.holders(session_id) == set()
    assert ("delete", "a", waiting, 0) in kms.calls, "the KM that only held the open request is told too"
    assert core.session(bobs).state is AdmissionState.ACTIVE, "another user's session is untouched"
    assert reserved(core) == dict.fromkeys(core.session(bobs).route.links, 1000)
    assert core.admission.usage("alice").sessions == 0
    refused = await core.open_session("a", Credentials("sae-a"), A, C, QOS)
    assert not refused.accepted and refused.reason == "UnknownSAE"


class GatedKMs(InMemoryKMs):
    """KMs that confirm a deletion only once the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def delete(self, node: str, session_id: str, reason: str) -> None:
        await self.gate.wait()
        await super().delete(node, session_id, reason)


async def test_deleting_a_key_session_waits_for_every_kms_confirmation(clock):
    kms = GatedKMs()
    core = await network(kms, clock)
    await core.apply(KeySession.model_validate({
        "metadata": {"name": "a-to-c"},
        "spec": {"user": "alice", "source": {"node": "a", "saeId": "sae-a"},
                 "destination": {"node": "c", "saeId": "sae-c"}, "qos": {"minBps": 1000}},
    }))
    session = core.declared_session("a-to-c")
    assert session.state is AdmissionState.ACTIVE and kms.holders(session.id) == {"a", "b", "c"}

    deletion = asyncio.create_task(core.delete("KeySession", "a-to-c"))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not deletion.done(), "the deletion is not over while a KM has not confirmed"
    assert session.state is AdmissionState.TERMINATED, "no key is served meanwhile"
    assert not await core.key_requested(session.id, "a")

    kms.gate.set()
    await deletion
    assert kms.holders(session.id) == set() and core.declared_session("a-to-c") is None
    assert reserved(core) == {}
