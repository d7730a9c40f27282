"""Real KM processes with a node of two KM replicas: its link ends, one per pair of replicas.

Nodes b - a - c on loopback, real mutual TLS and gRPC, emulated module pairs; node a runs two
KM replicas that share its ETSI 014 port (SO_REUSEPORT), b and c one each. The test plans the
network with an addressing of its own (a port set per replica) and plays the control plane
where a session is needed (KeyManagerControl.ConfigureSession). Keys b -> c are relayed
through a's replicas, keys a -> b are delivered directly; a restarted replica of a is only
a new peer to the ends that paired with it.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Processes, wait_for_port
from test_km_topology_push import free_ports
from vqkd.km import identity
from vqkd.km.config import TLSPaths
from vqkd.km.domain.sessions import SessionConfig
from vqkd.km.domain.vocabulary import Endpoint, Role
from vqkd.km.etsi014.client import ETSI014Client
from vqkd.km.rpc.control_service import config_to_pb
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.local.processes import HOST
from vqkd.operator.plan import (
    End, KMAddress, ModuleAddress, PlanError, km_config, km_topology, module_config, replicas_of,
)
from vqkd.operator.resources.loader import load_text

NETWORK = """apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: a}
spec: {saeIds: [sae-a], km: {replicas: 2}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: b}
spec: {saeIds: [sae-b]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: c}
spec: {saeIds: [sae-c]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: a-b}
spec: {nodes: [a, b], emulated: {keyRateBps: 2000000, qber: 0.01}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: a-c}
spec: {nodes: [a, c], emulated: {keyRateBps: 2000000, qber: 0.01}}
"""
INSTANCES = [("a", 0), ("a", 1), ("b", 0), ("c", 0)]


@dataclass(frozen=True)
class ReplicaAddressing:
    """Loopback ports per KM replica, one ETSI 014 port per node for all its replicas."""

    etsi014: dict[str, int]
    km_ports: dict[tuple[str, int], tuple[int, int]]  # (node, replica) -> gRPC, metrics
    module_ports: dict[str, tuple[int, int, int]]  # link -> end a, end b, admin
    certificates: dict[identity.Identity, TLSPaths]
    control_plane: str | None = None

    def km(self, node: str, replica: int = 0) -> KMAddress:
        grpc_port, metrics_port = self.km_ports[node, replica]
        return KMAddress(
            etsi014_listen=f"{HOST}:{self.etsi014[node]}", grpc_listen=f"{HOST}:{grpc_port}",
            metrics_listen=f"{HOST}:{metrics_port}", etsi014_url=f"https://{HOST}:{self.etsi014[node]}",
            grpc=f"{HOST}:{grpc_port}", metrics_url=f"http://{HOST}:{metrics_port}/metrics")

    def module(self, link: str) -> ModuleAddress:
        a, b, admin = self.module_ports[link]
        return ModuleAddress(
            end_listen={"a": f"{HOST}:{a}", "b": f"{HOST}:{b}"},
            end_urls={"a": f"https://{HOST}:{a}", "b": f"https://{HOST}:{b}"},
            admin_listen=f"{HOST}:{admin}", control_url=f"http://{HOST}:{admin}/control",
            metrics_url=f"http://{HOST}:{admin}/metrics")

    def km_tls(self, node: str) -> TLSPaths:
        return self.certificates[identity.km(node)]

    def module_tls(self, link: str, end: End) -> TLSPaths:
        return self.certificates[identity.module(link, end)]

    def device_tls(self, link: str, node: str) -> TLSPaths:
        raise PlanError(f"link {link}: this test has no devices")


class Network:
    def __init__(self, pki, processes: Processes):
        self.pki, self.processes = pki, processes
        self.declared = load_text(NETWORK, "replica-links")
        ports = free_ports(3 + 2 * len(INSTANCES) + 3 * 2)
        self.addressing = ReplicaAddressing(
            etsi014={node: ports.pop() for node in "abc"},
            km_ports={instance: (ports.pop(), ports.pop()) for instance in INSTANCES},
            module_ports={link: (ports.pop(), ports.pop(), ports.pop()) for link in ("a-b", "a-c")},
            certificates={ident: self.tls(ident) for ident in
                          [identity.km(n) for n in "abc"] + [identity.module(link, e) for link in ("a-b", "a-c")
                                                             for e in "ab"]})
        assert list(replicas_of(self.declared, "a")) == [0, 1]
        for name, link in self.declared.links.items():
            config = module_config(link, self.addressing)
            processes.start("vqkd.km.emulator", config.model_dump(mode="json"), f"link-{name}")
        self.procs = {instance: self.start(*instance) for instance in INSTANCES}
        self.controller = grpc_channel_credentials(self.tls(identity.controller()).files())

    def tls(self, ident: identity.Identity) -> TLSPaths:
        files = self.pki.files(ident)
        return TLSPaths(ca=files.ca, cert=files.cert, key=files.key)

    def start(self, node: str, replica: int):
        config = km_config(self.declared, node, self.addressing, replica).model_copy(update={
            "etsi014_reuse_port": True, "topology": km_topology(self.declared, node, self.addressing)})
        proc = self.processes.start("vqkd.km", config.model_dump(mode="json"), f"km-{node}-{replica}")
        grpc_port, metrics_port = self.addressing.km_ports[node, replica]
        for port in (self.addressing.etsi014[node], grpc_port, metrics_port):
            wait_for_port(port, proc=proc)
        return proc

    async def stats(self, node: str, replica: int = 0) -> km_pb2.Stats:
        async with grpc.aio.secure_channel(self.addressing.km(node, replica).grpc, self.controller) as channel:
            return await km_pb2_grpc.KeyManagerControlStub(channel).GetStats(km_pb2.GetStatsRequest(), timeout=5)

    async def ends(self, node: str, link: str, replica: int = 0) -> dict[int, km_pb2.LinkStats]:
        """The LinkStats of the KM's ends of ``link``, by peer replica."""
        return {s.peer_replica: s for s in (await self.stats(node, replica)).links if s.link == link}

    async def configure(self, session: SessionConfig, *instances: tuple[str, int]) -> None:
        for node, replica in instances:
            async with grpc.aio.secure_channel(self.addressing.km(node, replica).grpc, self.controller) as channel:
                await km_pb2_grpc.KeyManagerControlStub(channel).ConfigureSession(config_to_pb(session), timeout=5)

    def sae(self, sae: str, node: str) -> ETSI014Client:
        return ETSI014Client(self.addressing.km(node).etsi014_url, self.pki.files(identity.sae(sae)))

    def metric(self, node: str, replica: int, name: str, **labels: str) -> float:
        """The sum of the KM's samples ``name`` with ``labels``; each carries the replica's label."""
        with urllib.request.urlopen(self.addressing.km(node, replica).metrics_url, timeout=5) as response:
            text = response.read().decode()
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
        assert all(s.labels["replica"] == str(replica) for s in samples), samples
        return sum(s.value for s in samples if labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def net(pki, tmp_path_factory):
    processes = Processes(tmp_path_factory.mktemp("replica-links"))
    try:
        yield Network(pki, processes)
    finally:
        processes.stop_all()


async def wait_ends_hold(net: Network, node: str, link: str, bits: int, timeout: float = 15.0) -> None:
    """Until every end of ``node``'s KM on ``link`` holds ``bits`` of outgoing key."""
    deadline = time.monotonic() + timeout
    while True:
        ends = await net.ends(node, link)
        if len(ends) == 2 and all(s.outgoing_bits >= bits for s in ends.values()):
            return
        assert time.monotonic() < deadline, f"{node}'s ends of {link} hold {ends} after {timeout}s"
        await asyncio.sleep(0.05)


async def test_a_km_holds_an_end_per_peer_replica_and_the_replicas_share_the_node_port(net):
    assert (await net.stats("a", 1)).replica == 1
    for node, link in (("b", "a-b"), ("c", "a-c")):
        ends = await net.ends(node, link)
        assert sorted(ends) == [0, 1], f"{node} has an end of {link} per replica of a"
        assert ends[0].incarnation == ends[1].incarnation, "the ends of one KM present its incarnation"
    for replica in (0, 1):
        assert list(await net.ends("a", "a-b", replica)) == [0], "b has one replica: one end"
    # Fresh connections to a's port reach both replicas.
    for _ in range(16):
        client = net.sae("sae-a", "a")
        async with client:
            await client.status("sae-b")
    served = [net.metric("a", r, "vqkd_km_responses_total", call="status") for r in (0, 1)]
    assert sum(served) == 16 and min(served) > 0, f"status calls per replica of a: {served}"


async def test_a_request_naming_a_replica_without_an_end_is_refused_naming_both(net):
    credentials = grpc_channel_credentials(net.tls(identity.km("a")).files())
    async with grpc.aio.secure_channel(net.addressing.km("b").grpc, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await km_pb2_grpc.LinkPeerStub(channel).Hello(
                km_pb2.HelloRequest(link="a-b", incarnation="x", sender_replica=7), timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == "node b has no end of link 'a-b' towards replica 7 of its peer"


async def test_keys_relayed_through_two_replicas_spread_over_both_and_arrive_intact(net):
    path = {"b": (Role.SOURCE, "", "a"), "a": (Role.INTERMEDIATE, "b", "c"), "c": (Role.DESTINATION, "a", "")}
    for node, (role, prev_hop, next_hop) in path.items():
        session = SessionConfig(
            session_id="relay-1", version=1, role=role, user="lab", source=Endpoint("b", "sae-b"),
            destination=Endpoint("c", "sae-c"), prev_hop=prev_hop, next_hop=next_hop, priority=1, rate_bps=1e9,
            bucket_bits=1 << 24, inactivity_timeout_s=60, request_timeout_s=5, key_chunk_size=32, ttl_s=3600,
            fallback="")
        await net.configure(session, *[(n, r) for n, r in INSTANCES if n == node])
    await wait_ends_hold(net, "b", "a-b", 1 << 14)
    relayed_before = [net.metric("a", r, "vqkd_km_relayed_bits_total", role="intermediate") for r in (0, 1)]
    master, slave = net.sae("sae-b", "b"), net.sae("sae-c", "c")
    sent = []
    async with master, slave:
        for _ in range(20):
            keys = await master.enc_keys("sae-c", 2, 256)
            assert await slave.dec_keys("sae-b", [key_id for key_id, _ in keys]) == keys
            sent += keys
    assert len({key_id for key_id, _ in sent}) == len({key for _, key in sent}) == 40, "a key ID or key reused"
    relayed = [net.metric("a", r, "vqkd_km_relayed_bits_total", role="intermediate") - relayed_before[r]
               for r in (0, 1)]
    assert sum(relayed) == 40 * 256 and min(relayed) > 0, f"bits relayed per replica of a: {relayed}"


async def test_keys_delivered_directly_by_either_replica_arrive_intact_and_never_twice(net):
    await wait_ends_hold(net, "b", "a-b", 1 << 12)
    sent = []
    slave = net.sae("sae-b", "b")
    async with slave:
        for _ in range(16):  # each on a fresh connection: both replicas of a serve some
            master = net.sae("sae-a", "a")
            async with master:
                keys = await master.enc_keys("sae-b", 2, 256)
            assert await slave.dec_keys("sae-a", [key_id for key_id, _ in keys]) == keys
            sent += keys
    # Direct keys are link key itself: both replicas drew from one module end, and none got a key twice.
    assert len({key_id for key_id, _ in sent}) == len({key for _, key in sent}) == 32
    served = [net.metric("a", r, "vqkd_km_responses_total", call="enc_keys", code="200") for r in (0, 1)]
    assert min(served) > 0, f"enc_keys answered per replica of a: {served}"


async def test_a_restarted_replica_is_a_new_peer_only_to_the_ends_that_paired_with_it(net):
    await wait_ends_hold(net, "b", "a-b", 1 << 12)
    before = {node: await net.ends(node, link) for node, link in (("b", "a-b"), ("c", "a-c"))}
    a0 = await net.stats("a", 0)
    proc = net.procs["a", 1]
    proc.terminate()
    proc.wait(timeout=10)
    net.procs["a", 1] = net.start("a", 1)
    restarted = await net.stats("a", 1)
    assert restarted.incarnation != before["b"][1].incarnation
    for node, link in (("b", "a-b"), ("c", "a-c")):
        deadline = time.monotonic() + 10
        while net.metric(node, 0, "vqkd_km_peer_restarts_total", link=link) < 1:
            assert time.monotonic() < deadline, f"{node} did not notice a's replica 1 restarted"
            await asyncio.sleep(0.05)
        assert net.metric(node, 0, "vqkd_km_peer_restarts_total", link=link) == 1, "only one end met a new peer"
        assert net.metric(node, 0, "vqkd_km_flushed_bits_total", reason="peer_restarted") > 0
        kept = (await net.ends(node, link))[0]
        assert kept.incarnation == before[node][0].incarnation
        assert kept.incoming_bits >= before[node][0].incoming_bits, f"{node}'s end towards replica 0 was flushed"
    assert (await net.stats("a", 0)).incarnation == a0.incarnation
    for link in ("a-b", "a-c"):
        assert net.metric("a", 0, "vqkd_km_peer_restarts_total", link=link) == 0
    # The restarted replica serves again: its ends filled anew.
    await wait_ends_hold(net, "b", "a-b", 1 << 12)
