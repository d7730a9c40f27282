"""The control-plane host: KM liveness by incarnation, replacement, the cadence, and its gRPC server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_port
from test_control_core import Clock
from vqkd.km import identity
from vqkd.km.config import KMTopology
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.v1 import km_pb2
from vqkd.operator.control.memory_kms import InMemoryKMs, KMUnreachable
from vqkd.operator.host import TICK_S, Cadence, ControlPlaneHost, HostListener
from vqkd.operator.resources.loader import load_text

NETWORK = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: a}
spec: {saeIds: [sae-a]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: b}
spec: {saeIds: [sae-b]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: ab}
spec:
  nodes: [a, b]
  emulated: {keyRateBps: 100000, qber: 0.01}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: lab}
spec: {saeIds: [sae-a, sae-b]}
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: s}
spec:
  user: lab
  source: {node: a, saeId: sae-a}
  destination: {node: b, saeId: sae-b}
"""


def km(node: str, replica: int = 0) -> str:
    """How the fakes name a KM instance: the node for replica 0, ``node/replica`` for the others."""
    return f"{node}/{replica}" if replica else node


@dataclass
class FakeKMs(InMemoryKMs):
    """KM instances in memory that also hold a topology and answer for their stats: each as its
    current incarnation. Every table, call, set and map is keyed by ``km(node, replica)``.
    Topology pushes are recorded in ``calls`` as ("topology", km, "", version)."""

    incarnations: dict[str, str] = field(default_factory=dict)
    drawn: dict[str, int] = field(default_factory=dict)  # KM -> bits drawn on every link so far
    topologies: dict[str, tuple[int, KMTopology]] = field(default_factory=dict)  # KM -> (version, topology)
    link_stats: dict[str, list[km_pb2.LinkStats]] = field(default_factory=dict)  # KM -> what it reports, if not "ab"
    closed: bool = False

    def restart(self, name: str) -> None:
        """A new instance: new incarnation, empty forwarding table, no topology."""
        self.incarnations[name] = self.incarnations.get(name, name) + "'"
        self.tables.pop(name, None)
        self.topologies.pop(name, None)

    def topology(self, name: str) -> KMTopology | None:
        held = self.topologies.get(name)
        return held[1] if held is not None else None

    async def configure(self, node: str, replica: int, config) -> None:
        await super().configure(km(node, replica), config)

    async def delete(self, node: str, replica: int, session_id: str, reason: str) -> None:
        await super().delete(km(node, replica), session_id, reason)

    async def configure_topology(self, node: str, replica: int, topology: KMTopology,
                                 version: int) -> km_pb2.ConfigureTopologyReply:
        name = km(node, replica)
        self._reach(name, "topology", "", version)
        held = self.topologies.get(name)
        if held is None or held[0] < version:
            self.topologies[name] = held = (version, topology)
        return km_pb2.ConfigureTopologyReply(version=held[0], incarnation=self.incarnations.setdefault(name, name))

    async def stats(self, node: str, replica: int, timeout: float = 2.0) -> km_pb2.Stats:
        name = km(node, replica)
        if name in self.unreachable:
            raise KMUnreachable(f"KM {name} is unreachable")
        held = self.topologies.get(name)
        links = self.link_stats.get(name, [km_pb2.LinkStats(link="ab", drawn_bits_total=self.drawn.get(name, 0))])
        return km_pb2.Stats(node=node, replica=replica, incarnation=self.incarnations.setdefault(name, name),
                            topology_version=held[0] if held is not None else 0, links=links)

    async def close(self) -> None:
        self.closed = True


@dataclass
class Heard(HostListener):
    liveness: list[tuple[str, bool | None]] = field(default_factory=list)
    replaced: list[tuple[str, float | None]] = field(default_factory=list)
    polls: int = 0

    def km_liveness_changed(self, node, replica, liveness):
        self.liveness.append((km(node, replica), liveness.ok))

    def km_replaced(self, node, replica, seconds):
        self.replaced.append((km(node, replica), seconds))

    def polled(self):
        self.polls += 1


class Replacer:
    def __init__(self, kms: FakeKMs):
        self.kms = kms
        self.asked: list[str] = []

    async def replace(self, node: str, replica: int) -> None:
        self.asked.append(km(node, replica))


async def hosted(replace_after_s: float | None = None):
    kms, clock, heard = FakeKMs(), Clock(100.0), Heard()
    host = ControlPlaneHost(kms, None, "unused", cadence=Cadence(poll_interval_s=1.0, replace_after_s=replace_after_s),
                            clock=clock)
    replacer = Replacer(kms)
    host.plug(replacer=replacer, listeners=[heard])
    host.core.clock = clock
    await host.core.load(load_text(NETWORK, "host-test"))
    return host, kms, clock, heard, replacer


def session_holders(host: ControlPlaneHost, kms: FakeKMs) -> set[str]:
    (session,) = host.core.sessions()
    return kms.holders(session["sessionId"])


async def test_a_km_that_stops_answering_is_down_and_back_up_when_it_answers_again():
    host, kms, clock, heard, _ = await hosted()
    await host.poll()
    assert (host.liveness("a").ok, host.liveness("a").incarnation) == (True, "a")
    assert heard.liveness == [("a", True), ("b", True)] and heard.polls == 1
    kms.unreachable.add("a")
    clock.now += 1
    await host.poll()
    assert host.liveness("a").ok is False and "unreachable" in host.liveness("a").error
    assert {n["name"]: n["status"] for n in host.core.nodes()}["a"] == "DOWN"
    (session,) = host.core.sessions()
    assert session["state"] == "Held"
    kms.unreachable.discard("a")
    clock.now += 1
    await host.poll()
    assert {n["name"]: n["status"] for n in host.core.nodes()}["a"] == "OPERATING"
    assert heard.replaced == [], "the same instance came back: not a replacement"
    assert host.metrics.km_replacements("a")._value.get() == 0


async def test_a_new_incarnation_is_a_replaced_km_that_gets_its_sessions_again_and_is_timed():
    host, kms, clock, heard, _ = await hosted()
    await host.poll()
    assert session_holders(host, kms) == {"a", "b"}
    host.km_lost("b")  # e.g. its process exited
    clock.now += 1.5
    kms.restart("b")
    await host.check("b")
    assert heard.replaced == [("b", 1.5)]
    assert session_holders(host, kms) == {"a", "b"}, "pushed again to the new instance"
    assert host.metrics.km_replacements("b")._value.get() == 1
    kms.restart("a")  # restarted between two polls, never seen down
    await host.poll()
    assert heard.replaced[-1] == ("a", None)


async def test_an_answer_to_an_older_question_does_not_undo_a_newer_one():
    host, kms, clock, heard, _ = await hosted()
    await host.poll()
    kms.unreachable.add("a")
    slow = asyncio.Event()
    answer = kms.stats

    async def stats(node, replica, timeout=2.0):
        if node == "a" and not slow.is_set():
            slow.set()
            await asyncio.sleep(0.05)
        return await answer(node, replica, timeout)

    kms.stats = stats
    polling = asyncio.create_task(host.poll())  # asks a now, answered (unreachable) later
    await slow.wait()
    kms.unreachable.discard("a")
    clock.now += 0.5
    await host.check("a")  # asked later, answered first
    await polling
    assert host.liveness("a").ok is True


async def test_a_km_unreachable_for_replace_after_is_replaced_with_backoff():
    host, kms, clock, heard, replacer = await hosted(replace_after_s=10.0)
    await host.poll()
    kms.unreachable.add("b")
    await host.poll()  # found unreachable at 100
    for at, asked in ((109.0, 0), (110.0, 1), (115.0, 1), (130.0, 2), (145.0, 2), (170.0, 3)):
        clock.now = at
        await host.tick()
        await asyncio.sleep(0)  # the replacement runs in the background
        assert len(replacer.asked) == asked, f"at {at}: {replacer.asked}"
    assert set(replacer.asked) == {"b"}
    kms.unreachable.discard("b")
    kms.restart("b")
    await host.check("b")
    assert heard.replaced == [("b", 70.0)]


async def test_a_km_that_is_down_is_asked_again_at_every_tick():
    host, kms, clock, heard, replacer = await hosted()
    await host.poll()
    kms.unreachable.add("a")
    await host.poll()
    kms.unreachable.discard("a")
    await host.tick()
    for _ in range(3):
        await asyncio.sleep(0)
    assert host.liveness("a").ok is True, "back before the next monitoring round"
    assert replacer.asked == [], "no replacement without replace_after_s"


async def test_monitoring_feeds_link_samples_and_the_timers_run_on_the_tick():
    host, kms, clock, heard, _ = await hosted()
    await host.poll()
    kms.drawn = {"a": 40_000, "b": 40_000}
    clock.now += 1.0
    await host.poll()
    (link,) = host.core.links()
    assert link["measured"] and link["keyRateBps"] == 80_000  # no module metrics: what the KMs drew
    assert TICK_S < Cadence().poll_interval_s


async def test_pushes_are_timed_in_the_control_metrics():
    host, kms, clock, heard, _ = await hosted()
    count = host.metrics.registry.get_sample_value("vqkd_control_push_duration_seconds_count", {"call": "configure"})
    assert count == 2  # the declared session, at both KMs


async def test_start_runs_both_loops_and_stop_ends_them_and_closes_the_kms():
    host, kms, clock, heard, _ = await hosted()
    host.cadence = Cadence(poll_interval_s=0.05)
    host.start()
    await asyncio.sleep(0.2)
    assert heard.polls >= 2
    await host.stop()
    polls = heard.polls
    await asyncio.sleep(0.1)
    assert heard.polls == polls and kms.closed


async def test_the_server_serves_the_control_plane_and_health_to_kms_only_over_mtls(pki):
    listen = f"127.0.0.1:{free_port()}"
    kms = FakeKMs()
    host = ControlPlaneHost(kms, pki.files(identity.controller()), listen)
    await host.serve()
    try:
        credentials = grpc_channel_credentials(pki.files(identity.km("a")))
        async with grpc.aio.secure_channel(listen, credentials) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(listen) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        with pytest.raises(OSError, match="cannot listen on 999.0.0.1:80"):
            await ControlPlaneHost(FakeKMs(), pki.files(identity.controller()), "999.0.0.1:80").serve()
    finally:
        await host.stop()
