"""Admission control's session cycle (paper Fig. 2b) driven through the control core.

The network (link a-d and d-c have a higher QBER, so a-b-c is the preferred way a -> c):

    a --- b --- c --- e
    |           |
    +---- d ----+
"""

from __future__ import annotations

import asyncio
import random

import pytest

from vqkd.km.domain.vocabulary import Endpoint, LinkState, Role
from vqkd.operator.control.access import Credentials
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.memory_kms import InMemoryKMs
from vqkd.operator.control.monitoring import AlarmKind, LinkSample
from vqkd.operator.control.network_session import InvalidTransition, NetworkSession
from vqkd.operator.control.session_config import KMSessionConfig
from vqkd.operator.resources.admission_cycle import ALLOWED, ENTRY, AdmissionState
from vqkd.operator.resources.models import QoS, SessionPhase

from builders import Clock, link, node, user


A, B, C, D, E = (Endpoint(n, f"sae-{n}") for n in "abcde")
QOS = QoS(min_bps=1000, max_bps=4000, key_chunk_size=32)
SETTINGS = AdmissionSettings(inactivity_timeout_s=60, peer_wait_s=30, held_retry_s=5, held_retry_max_s=20)


async def network(kms: InMemoryKMs, clock: Clock, *, ad_rate: int = 10_000, **sla) -> ControlCore:
    core = ControlCore(kms, clock=clock, admission=SETTINGS)
    for name in "abcde":
        await core.apply(node(name, f"sae-{name}"))
    for a, b in (("a", "b"), ("b", "c"), ("c", "e")):
        await core.apply(link(a, b))
    await core.apply(link("a", "d", rate=ad_rate, qber=0.05))
    await core.apply(link("d", "c", qber=0.05))
    limits = {"maxKeyRateBps": 8000, "maxSessions": 3, "maxBurstBits": 8192} | sla
    await core.apply(user("alice", ["sae-a", "sae-c", "sae-e"], priority=3, sla=limits))
    await core.apply(user("bob", ["sae-b", "sae-d"], priority=1, sla={}))
    return core


async def open_pair(core: ControlCore, source: Endpoint, destination: Endpoint, qos: QoS = QOS) -> str:
    first = await core.open_session(source.node, Credentials(source.sae_id), source, destination, qos)
    assert first.accepted, first.message
    second = await core.open_session(destination.node, Credentials(destination.sae_id), source, destination,
                                     session_id=first.session_id)
    assert second.accepted, second.message
    return first.session_id


def reserved(core: ControlCore) -> dict[str, int]:
    return {name: load.reserved_bps for name, load in core.routing.loads.items() if load.reserved_bps or load.sessions}


def states(core: ControlCore, session_id: str) -> list[tuple[str | None, str, str]]:
    return [(e.from_state, e.to_state, e.reason) for e in core.events.about(session_id)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def kms() -> InMemoryKMs:
    return InMemoryKMs()


async def test_full_cycle_from_open_to_close(kms, clock):
    core = await network(kms, clock)
    first = await core.open_session("a", Credentials("sae-a"), A, C, QOS)
    assert first.accepted and not first.peer_registered
    assert kms.calls == [] and reserved(core) == {}, "nothing is configured or reserved for half a session"

    second = await core.open_session("c", Credentials("sae-c"), A, C, session_id=first.session_id)
    assert second.accepted and second.peer_registered and second.session_id == first.session_id
    assert second.qos.min_bps == 1000 and second.qos.priority == 3
    session = core.session(first.session_id)
    assert session.state is AdmissionState.ACTIVE and session.route.nodes == ("a", "b", "c")

    entries = {n: kms.entry(n, session.id) for n in "abc"}
    assert [(e.role, e.prev_hop, e.next_hop) for e in entries.values()] == [
        (Role.SOURCE, "", "b"), (Role.INTERMEDIATE, "a", "c"), (Role.DESTINATION, "b", ""),
    ]
    source_config: KMSessionConfig = entries["a"]
    assert (source_config.priority, source_config.rate_bps, source_config.bucket_bits) == (3, 4000.0, 4000)
    assert source_config.inactivity_timeout_ms == 60_000 and source_config.key_chunk_size == 32
    assert source_config.source == A and source_config.destination == C and source_config.user == "alice"
    assert reserved(core) == {"a-b": 1000, "b-c": 1000}
    assert core.admission.usage("alice").reserved_bps == 1000

    assert await core.session_closed(session.id, "b") is False, "only an endpoint KM closes a session"
    assert await core.session_closed(session.id, "c", "application closed")
    assert session.state is AdmissionState.TERMINATED and session.reason == "Closed"
    assert kms.holders(session.id) == set()
    assert sorted(call[1] for call in kms.calls if call[0] == "delete") == ["a", "b", "c"]
    assert reserved(core) == {} and core.admission.usage("alice").sessions == 0
    assert await core.session_closed(session.id, "c") is False, "a second close frees nothing twice"
    assert states(core, session.id) == [
        (None, "Accepted", "Admitted"), ("Accepted", "Accepted", "PeerRegistered"),
        ("Accepted", "Active", "Configured"), ("Active", "Terminated", "Closed"),
    ]


@pytest.mark.parametrize(("qos", "sla", "reason"), [
    (QoS(max_bps=9000), {}, "KeyRateAboveSLA"),
    (QoS(priority=4), {}, "PriorityAboveClass"),
    (QoS(key_chunk_size=2048), {}, "BurstAboveSLA"),
    (QoS(), {"maxSessions": 0}, "SessionsAboveSLA"),
])
async def test_qos_over_the_sla_is_terminated_with_the_reason(kms, clock, qos, sla, reason):
    core = await network(kms, clock, **sla)
    result = await core.open_session("a", Credentials("sae-a"), A, C, qos)
    assert not result.accepted and result.reason == reason and not result.peer_registered
    assert result.etsi004_status == 7 and not result.unauthorized, "ETSI 004: QoS not met"
    assert core.session(result.session_id) is None, "a refused open leaves no session behind"
    assert [(e.from_state, e.to_state, e.reason) for e in core.events.about(result.session_id)] == [
        (None, "Terminated", reason)
    ]
    assert kms.calls == [] and reserved(core) == {}


async def test_reserved_rate_of_live_sessions_counts_against_the_sla(kms, clock):
    core = await network(kms, clock)
    await open_pair(core, A, C, QoS(min_bps=5000, max_bps=8000))
    refused = await core.open_session("a", Credentials("sae-a"), A, E, QoS(min_bps=4000))
    assert not refused.accepted and refused.reason == "KeyRateAboveSLA"
    assert "already reserved" in refused.message and "at most 3000" in refused.message


async def test_peer_that_never_registers_reserves_nothing_and_expires(kms, clock):
    core = await network(kms, clock)
    opened = await core.open_session("a", Credentials("sae-a"), A, C, QOS)
    clock.now += 29
    await core.tick()
    session = core.session(opened.session_id)
    assert session.state is AdmissionState.ACCEPTED and reserved(core) == {}
    clock.now += 2
    await core.tick()
    assert session.state is AdmissionState.TERMINATED and session.reason == "PeerNotRegistered"
    assert "sae-c@c did not register within 30 s" in session.message
    assert [call[:2] for call in kms.calls] == [("delete", "a")], "only the KM that asked held the session"
    assert core.admission.usage("alice").sessions == 0 and reserved(core) == {}


async def test_key_requests_restart_the_timer_and_silence_expires_the_session(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, C)
    for _ in range(3):
        clock.now += 50
        assert await core.key_requested(session_id, "a")
        await core.tick()
    assert core.session(session_id).state is AdmissionState.ACTIVE and core.session(session_id).key_requests == 3
    assert not await core.key_requested(session_id, "d"), "a key-request signal comes from an endpoint KM"
    clock.now += 61
    await core.tick()
    session = core.session(session_id)
    assert session.state is AdmissionState.TERMINATED and session.reason == "InactivityTimeout"
    assert kms.holders(session_id) == set() and reserved(core) == {}
    assert not await core.key_requested(session_id, "a")


async def test_qber_spike_takes_the_link_down_raises_an_alarm_and_reroutes(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, C)
    before = core.session(session_id).version
    kms.calls.clear()

    await core.link_sample(LinkSample("b-c", clock.now, key_rate_bps=9000, qber=0.2))

    assert core.topology.links["b-c"].state is LinkState.DOWN
    (alarm,) = core.monitoring.active_alarms()
    assert alarm.kind is AlarmKind.POSSIBLE_EAVESDROPPING and alarm.link == "b-c" and alarm.qber == 0.2
    session = core.session(session_id)
    assert session.state is AdmissionState.ACTIVE and session.route.nodes == ("a", "d", "c")
    assert session.version > before
    # Make-before-break: every KM of the new path confirmed before the old-only KM deletes.
    assert sorted(call[1] for call in kms.calls[:3]) == ["a", "c", "d"]
    assert all(call[0] == "configure" and call[3] == session.version for call in kms.calls[:3])
    assert kms.calls[3:] == [("delete", "b", session_id, 0)]
    assert (kms.entry("a", session_id).next_hop, kms.entry("c", session_id).prev_hop) == ("d", "d")
    assert kms.holders(session_id) == {"a", "c", "d"}
    assert reserved(core) == {"a-d": 1000, "d-c": 1000}
    assert states(core, session_id)[-1] == ("Active", "Active", "Rerouted")
    assert "link b-c Down (QBERAboveThreshold)" in session.message


async def test_reroute_gives_scarce_capacity_to_the_higher_priority(kms, clock):
    core = await network(kms, clock, ad_rate=1500, maxKeyRateBps=20_000)
    low = await open_pair(core, A, C, QoS(min_bps=1000, priority=1))
    high = await open_pair(core, A, C, QoS(min_bps=1000, priority=3))
    await core.link_sample(LinkSample("a-b", clock.now, key_rate_bps=0, qber=0.3))
    assert core.session(high).state is AdmissionState.ACTIVE and core.session(high).route.nodes == ("a", "d", "c")
    held = core.session(low)
    assert held.state is AdmissionState.HELD and held.reason == "InsufficientKeyRate"
    assert "link a-b Down" in held.message and "a-d" in held.message
    assert reserved(core) == {"a-d": 1000, "d-c": 1000}, "a Held session holds no reservation"


async def test_lost_intermediate_node_reroutes(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, C)
    await core.node_down("b", "KMUnreachable", "pod km-b lost")
    session = core.session(session_id)
    assert session.state is AdmissionState.ACTIVE and session.route.nodes == ("a", "d", "c")
    assert "node b down (KMUnreachable)" in session.message


async def test_session_without_alternative_is_held_and_resumes_when_the_node_is_back(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, E)
    session = core.session(session_id)
    assert session.route.nodes == ("a", "b", "c", "e")
    kms.unreachable.add("c")
    await core.node_down("c")
    assert session.state is AdmissionState.HELD and session.reason == "NoPath"
    assert session.phase == "Held" and session.view()["phase"] == "Held", "its KeySession shows it Held"
    assert "node c down (KMUnreachable); no alternative path" in session.message
    assert reserved(core) == {}
    assert kms.holders(session_id) == {"a", "b", "c", "e"}, "KMs keep their entries while the session is Held"

    clock.now += 10
    assert await core.key_requested(session_id, "a"), "a Held session stays alive while the application asks"
    await core.tick()
    assert session.state is AdmissionState.HELD and session.retries == 1

    kms.unreachable.discard("c")
    clock.now += 1
    await core.node_up("c")
    assert session.state is AdmissionState.ACTIVE and session.route.nodes == ("a", "b", "c", "e")
    assert states(core, session_id)[-2:] == [("Active", "Held", "NoPath"), ("Held", "Active", "Resumed")]
    assert reserved(core) == {"a-b": 1000, "b-c": 1000, "c-e": 1000}


async def test_held_endpoint_retries_with_backoff(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, C)
    await core.node_down("c")
    session = core.session(session_id)
    assert session.state is AdmissionState.HELD and session.reason == "EndpointDown"
    retry_times = []
    for _ in range(4):
        clock.now = session.retry_at
        await core.key_requested(session_id, "a")
        await core.tick()
        retry_times.append(session.retry_at - clock.now)
    assert retry_times == [10, 20, 20, 20], "retries back off, up to held_retry_max_s"


async def test_km_not_confirming_terminates_and_removes_what_was_installed(kms, clock):
    core = await network(kms, clock)
    kms.unreachable.add("b")
    first = await core.open_session("a", Credentials("sae-a"), A, C, QOS)
    second = await core.open_session("c", Credentials("sae-c"), A, C, session_id=first.session_id)
    assert not second.accepted and second.reason == "KMNotConfigured"
    assert second.etsi004_status == 4, "ETSI 004: no QKD connection available"
    assert "b: KMUnreachable" in second.message
    assert core.session(first.session_id).phase == "Rejected"
    assert kms.holders(first.session_id) == set() and reserved(core) == {}
    assert core.admission.pending_deletes("b") == {first.session_id: "KMNotConfigured"}

    kms.unreachable.clear()
    kms.calls.clear()
    await core.node_up("b")
    assert kms.calls == [("delete", "b", first.session_id, 0)]
    assert core.admission.pending_deletes("b") == {}


async def test_replaced_km_gets_its_sessions_pushed_again_with_a_newer_version(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, C)
    version = core.session(session_id).version
    kms.tables["b"].clear()  # a new KM instance starts empty
    clock.now += 1
    await core.node_up("b")
    entry = kms.entry("b", session_id)
    assert entry is not None and entry.version > version and (entry.prev_hop, entry.next_hop) == ("a", "c")


async def test_close_arriving_during_configuration_waits_and_removes_everything(kms, clock):
    class SlowKMs(InMemoryKMs):
        gate: asyncio.Event

        async def configure(self, node, config):
            await self.gate.wait()
            await super().configure(node, config)

    slow = SlowKMs()
    slow.gate = asyncio.Event()
    core = await network(slow, clock)
    first = await core.open_session("a", Credentials("sae-a"), A, C, QOS)
    opening = asyncio.create_task(
        core.open_session("c", Credentials("sae-c"), A, C, session_id=first.session_id))
    await asyncio.sleep(0)
    closing = asyncio.create_task(core.session_closed(first.session_id, "a"))
    await asyncio.sleep(0)
    slow.gate.set()
    await asyncio.gather(opening, closing)
    session = core.session(first.session_id)
    assert session.state is AdmissionState.TERMINATED and session.reason == "Closed"
    assert slow.holders(session.id) == set() and reserved(core) == {}


async def test_implicit_open_registers_both_and_is_reused(kms, clock):
    core = await network(kms, clock)
    first = await core.open_session("a", Credentials("sae-a"), A, C, QOS, implicit=True)
    assert first.accepted and first.peer_registered
    assert core.session(first.session_id).state is AdmissionState.ACTIVE
    again = await core.open_session("a", Credentials("sae-a"), A, C, QOS, implicit=True)
    assert again.session_id == first.session_id and core.admission.usage("alice").sessions == 1


async def test_reservations_add_up_through_any_sequence_of_events(kms, clock):
    """Accounting invariant: each link holds exactly the minimum rates of the Active
    sessions routed over it, never less than zero, whatever happens in between."""
    core = await network(kms, clock, maxKeyRateBps=10**6, maxSessions=100)
    rng = random.Random(7)
    ends = [A, C, E]
    links = ["a-b", "b-c", "c-e", "a-d", "d-c"]
    opened: list[str] = []
    for _ in range(150):
        action = rng.choice(["open", "open", "close", "sample", "node", "tick"])
        if action == "open":
            source, destination = rng.sample(ends, 2)
            result = await core.open_session(source.node, Credentials(source.sae_id), source, destination,
                                             QoS(min_bps=rng.choice([0, 500, 2000])), implicit=True)
            if result.accepted:
                opened.append(result.session_id)
        elif action == "close" and opened:
            session_id = opened.pop(rng.randrange(len(opened)))
            await core.session_closed(session_id, core.session(session_id).source.node)
        elif action == "sample":
            await core.link_sample(LinkSample(rng.choice(links), clock.now, key_rate_bps=rng.choice([9000, 4000]),
                                              qber=rng.choice([0.01, 0.02, 0.3])))
        elif action == "node":
            name = rng.choice("bd")
            await (core.node_down(name) if rng.random() < 0.5 else core.node_up(name))
        else:
            clock.now += rng.choice([1, 20, 70])
            await core.tick()
        expected: dict[str, int] = {}
        for session in core.admission.sessions.values():
            if session.state is AdmissionState.ACTIVE:
                for name in session.route.links:
                    expected[name] = expected.get(name, 0) + session.grant.min_rate_bps
        for name, load in core.routing.loads.items():
            assert load.reserved_bps >= 0
            assert load.reserved_bps == expected.get(name, 0), (action, name)
            routed = {s.id for s in core.admission.sessions.values()
                      if s.state is AdmissionState.ACTIVE and name in s.route.links}
            assert load.sessions == routed
    for session_id in opened:
        assert core.routing.release(session_id) is (core.session(session_id).state is AdmissionState.ACTIVE)
        assert core.routing.release(session_id) is False
    for event in core.events:
        if event.subject == "KeySession" and event.from_state != event.to_state:
            allowed = ENTRY if event.from_state is None else ALLOWED[AdmissionState(event.from_state)]
            assert event.to_state in allowed, event


async def test_every_push_of_a_session_carries_a_higher_version(kms, clock):
    core = await network(kms, clock)
    session_id = await open_pair(core, A, E)
    await core.link_sample(LinkSample("b-c", clock.now, 9000, qber=0.3))  # reroute over d
    await core.node_up("a")  # resync of a replaced KM
    await core.node_down("d")  # no way left: Held
    await core.node_up("d")  # resume
    assert [to for _, to, _ in states(core, session_id)][-3:] == ["Active", "Held", "Active"]
    versions = [call[3] for call in kms.calls if call[0] == "configure" and call[2] == session_id]
    pushes = [version for index, version in enumerate(versions) if index == 0 or version != versions[index - 1]]
    assert len(pushes) == 4, "first path, new path, resync, resumed path"
    assert pushes == sorted(pushes) and len(set(pushes)) == len(pushes)


def test_the_cycle_refuses_a_transition_its_table_lacks():
    def session(state: AdmissionState) -> NetworkSession:
        return NetworkSession("s", "alice", A, C, grant=None, created_at=0.0, state=state)

    with pytest.raises(InvalidTransition, match="begins Accepted or Terminated, not Active"):
        session(AdmissionState.ACTIVE)
    accepted = session(AdmissionState.ACCEPTED)
    with pytest.raises(InvalidTransition, match="no transition Accepted -> Held"):
        accepted.move_to(AdmissionState.HELD)
    assert accepted.move_to(AdmissionState.ACTIVE) is AdmissionState.ACCEPTED
    assert accepted.move_to(AdmissionState.TERMINATED) is AdmissionState.ACTIVE
    with pytest.raises(InvalidTransition, match="no transition Terminated -> Active"):
        accepted.move_to(AdmissionState.ACTIVE)
    assert accepted.state is AdmissionState.TERMINATED


def test_every_state_maps_to_one_phase():
    assert {SessionPhase.of(state, rejected=False) for state in AdmissionState} == {
        SessionPhase.ACCEPTED, SessionPhase.ACTIVE, SessionPhase.HELD, SessionPhase.TERMINATED}
    assert SessionPhase.of(AdmissionState.TERMINATED, rejected=True) is SessionPhase.REJECTED
    assert set(ALLOWED) == set(AdmissionState) and ENTRY <= set(AdmissionState)
