"""Real KM processes started with their identity only, their topology pushed live over gRPC.

The test plays the control plane: it plans the network with the local runtime's addressing,
starts the emulated modules of every link and each KM with the identity the plan gives it,
and pushes each KM the topology the plan gives it (KeyManagerControl.ConfigureTopology),
then changes the network and pushes again. Nodes a - b - c; link a-b first, b-c added live,
a-b removed live; node d has no link and shows a KM waiting for its first topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
import urllib.request

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for_port
from vqkd.km import identity
from vqkd.km.config import TLSPaths
from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.km.rpc.control_service import topology_to_pb
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.tls import client_context
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.local.processes import KMPorts, LocalAddressing, ModulePorts, ReplicaPorts
from vqkd.operator.plan import km_topology, plan_network
from vqkd.operator.resources.loader import load_text

NODES = """apiVersion: vqkd.io/v1alpha1
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
kind: QKDNode
metadata: {name: c}
spec: {saeIds: [sae-c]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: d}
spec: {saeIds: [sae-d, sae-d2]}
"""


def link(a: str, b: str) -> str:
    return f"""---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: {a}-{b}}}
spec:
  nodes: [{a}, {b}]
  emulated: {{keyRateBps: 2000000, qber: 0.01}}
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: held open together, so none is handed out twice."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def network(*links: str, nodes: str = NODES):
    return load_text(nodes + "".join(links), "live-topology")


class Network:
    """The processes, and the test's side of the control plane."""

    def __init__(self, pki, processes):
        self.pki = pki
        nodes, links = "abcd", ("a-b", "b-c")
        ports = free_ports(3 * len(nodes) + 3 * len(links))
        self.addressing = LocalAddressing(
            km_ports={n: KMPorts(ports.pop(), (ReplicaPorts(ports.pop(), ports.pop()),)) for n in nodes},
            module_ports={name: ModulePorts(ports.pop(), ports.pop(), ports.pop()) for name in links},
            certificates={ident: self.tls(ident) for ident in
                          [identity.km(n) for n in nodes] + [identity.module(name, e) for name in links for e in "ab"]},
        )
        self.plan = plan_network(network(link("a", "b"), link("b", "c")), self.addressing)
        for name, config in self.plan.modules.items():
            processes.start("vqkd.km.emulator", config.model_dump(mode="json"), f"link-{name}")
        for node, (config,) in self.plan.kms.items():
            assert config.topology is None
            processes.start("vqkd.km", config.model_dump(mode="json"), f"km-{node}")
        for node in nodes:
            ports = self.addressing.km_ports[node]
            for port in (ports.etsi014, *ports.replicas[0]):
                wait_for_port(port)
        self.controller = grpc_channel_credentials(self.tls(identity.controller()).files())
        self.versions = itertools.count(1)

    def tls(self, ident: identity.Identity) -> TLSPaths:
        files = self.pki.files(ident)
        return TLSPaths(ca=files.ca, cert=files.cert, key=files.key)

    def control(self, node: str, credentials=None):
        channel = grpc.aio.secure_channel(self.addressing.km(node).grpc, credentials or self.controller)
        return channel, km_pb2_grpc.KeyManagerControlStub(channel)

    async def push(self, declared, *nodes: str, version: int | None = None) -> dict[str, km_pb2.ConfigureTopologyReply]:
        """Each node's topology in ``declared``, pushed to its KM at once (one new version for all)."""
        version = next(self.versions) if version is None else version

        async def one(node):
            channel, stub = self.control(node)
            async with channel:
                pb = topology_to_pb(km_topology(declared, node, self.addressing), node, version)
                return node, await stub.ConfigureTopology(pb, timeout=5)

        return dict(await asyncio.gather(*map(one, nodes)))

    async def stats(self, node: str) -> km_pb2.Stats:
        channel, stub = self.control(node)
        async with channel:
            return await stub.GetStats(km_pb2.GetStatsRequest(), timeout=5)

    async def link_stats(self, node: str, name: str) -> km_pb2.LinkStats | None:
        return next((s for s in (await self.stats(node)).links if s.link == name), None)

    def sae(self, sae: str, node: str) -> ETSI014Client:
        return ETSI014Client(self.addressing.km(node).etsi014_url, self.pki.files(identity.sae(sae)))

    async def healthz(self, node: str) -> dict:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{self.addressing.km(node).metrics_listen}/healthz") as response:
                return await response.json()

    def metrics(self, url: str) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def km_metrics(self, node: str) -> dict[tuple[str, frozenset], float]:
        return self.metrics(self.addressing.km(node).metrics_url)

    def module_delivered_bits(self, name: str) -> float:
        samples = self.metrics(self.addressing.module(name).metrics_url)
        return sum(v for (metric, _), v in samples.items() if metric == "vqkd_module_delivered_bits_total")


@pytest.fixture(scope="module")
def net(pki, tmp_path_factory):
    from conftest import Processes

    processes = Processes(tmp_path_factory.mktemp("live-topology"))
    try:
        yield Network(pki, processes)
    finally:
        processes.stop_all()


def flushed(samples, reason: str | None = None) -> float:
    return sum(v for (name, labels), v in samples.items() if name == "vqkd_km_flushed_bits_total"
               and (reason is None or ("reason", reason) in labels))


def link_series(samples, name: str) -> list[str]:
    return sorted(metric for metric, labels in samples if ("link", name) in labels)


async def wait_drawn(net: Network, node: str, name: str, timeout: float = 10.0) -> float:
    """Seconds until the KM of ``node`` has drawn key on link ``name``."""
    started = time.monotonic()
    while True:
        stats = await net.link_stats(node, name)
        if stats is not None and stats.drawn_bits_total > 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{node} drew nothing on {name} within {timeout}s"
        await asyncio.sleep(0.02)


async def keys_flow(net: Network, master: str, slave: str, master_node: str, slave_node: str) -> None:
    m, s = net.sae(master, master_node), net.sae(slave, slave_node)
    async with m, s:
        deadline = time.monotonic() + 10
        while (await m.status(slave)).stored_key_count < 4:
            assert time.monotonic() < deadline, f"no key for {master} -> {slave}"
            await asyncio.sleep(0.05)
        sent = await m.enc_keys(slave, 4, 256)
        assert await s.dec_keys(master, [key_id for key_id, _ in sent]) == sent


async def test_a_km_started_with_its_identity_only_awaits_its_topology_then_serves(net):
    assert (await net.healthz("d"))["topologyVersion"] is None  # and it answers: it is alive
    assert (await net.stats("d")).topology_version == 0
    client = net.sae("sae-d", "d")
    async with client:
        with pytest.raises(ETSI014Error) as waiting:
            await client.status("sae-d2")
        assert waiting.value.status == 503
        assert waiting.value.message == ("KM d awaits its configuration (SAEs, links, key limits) from the control "
                                         "plane; retry shortly")
        ctx = client_context(net.pki.files(identity.sae("sae-d")))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            async with session.post(net.addressing.km("d").etsi014_url + "/api/v1/etsi004/open_connect", json={
                    "source": "sae-d", "destination": "sae-d2", "QoS": {}}) as response:
                body = await response.json()
        assert body["status"] == 4 and "awaits its configuration" in body["message"]

        replies = await net.push(network(), "d")
        assert (await net.healthz("d"))["topologyVersion"] == replies["d"].version
        assert (await net.stats("d")).topology_version == replies["d"].version
        assert len(await client.enc_keys("sae-d2", 2, 256)) == 2  # both on d: made on demand


async def test_links_are_added_and_removed_live_and_nothing_else_moves(net):
    incarnations = {n: (await net.stats(n)).incarnation for n in "abc"}
    first = await net.push(network(link("a", "b")), "a", "b", "c")
    assert {n: r.incarnation for n, r in first.items()} == incarnations
    await keys_flow(net, "sae-a", "sae-b", "a", "b")

    # The same version again: nothing changes, not even the pools.
    held = {n: await net.link_stats(n, "a-b") for n in "ab"}
    again = await net.push(network(link("a", "b"), link("b", "c")), "a", "b", version=first["a"].version)
    assert {n: r.version for n, r in again.items()} == {"a": first["a"].version, "b": first["b"].version}
    for n in "ab":
        now = await net.link_stats(n, "a-b")
        assert now.incarnation == held[n].incarnation and now.drawn_bits_total >= held[n].drawn_bits_total
        assert now.outgoing_bits >= held[n].outgoing_bits
    assert await net.link_stats("b", "b-c") is None, "a push no newer than the one held was applied"

    # b-c added live: drawn from within a second, a-b untouched.
    pushed = time.monotonic()
    await net.push(network(link("a", "b"), link("b", "c")), "b", "c")
    drawn = await asyncio.gather(wait_drawn(net, "b", "b-c"), wait_drawn(net, "c", "b-c"))
    took = time.monotonic() - pushed
    print(f"push to first key drawn on the new link: b {drawn[0]:.3f}s, c {drawn[1]:.3f}s, both {took:.3f}s")
    assert took < 1.0, f"the new link drew its first key {took:.2f}s after the push"
    now = await net.link_stats("b", "a-b")
    assert now.incarnation == held["b"].incarnation and now.drawn_bits_total >= held["b"].drawn_bits_total
    for n in "abc":
        assert flushed(net.km_metrics(n)) == 0, f"KM {n} dropped key material"
        assert (await net.stats(n)).incarnation == incarnations[n]
    peer_restarts = net.km_metrics("b")[("vqkd_km_peer_restarts_total", frozenset({("node", "b"), ("link", "a-b"), ("replica", "0")}))]
    assert peer_restarts == 0
    await keys_flow(net, "sae-b", "sae-c", "b", "c")
    await keys_flow(net, "sae-a", "sae-b", "a", "b")

    # a-b removed live: its pools wiped and counted, its feed stopped, its series gone; b-c untouched.
    before_bc = await net.link_stats("b", "b-c")
    held_ab = (await net.link_stats("b", "a-b"))
    await net.push(network(link("b", "c")), "a", "b")
    assert await net.link_stats("b", "a-b") is None and await net.link_stats("a", "a-b") is None
    samples = net.km_metrics("b")
    assert link_series(samples, "a-b") == []
    assert "vqkd_km_pool_bits" in link_series(samples, "b-c")
    assert flushed(samples, "link_removed") >= held_ab.outgoing_bits + held_ab.incoming_bits > 0
    assert flushed(samples, "peer_restarted") == flushed(net.km_metrics("c")) == 0
    await asyncio.sleep(0.2)  # a draw the module was serving when the push arrived
    delivered = net.module_delivered_bits("a-b")
    await asyncio.sleep(0.6)
    assert net.module_delivered_bits("a-b") == delivered, "a removed link is still drawn from"
    now_bc = await net.link_stats("b", "b-c")
    assert now_bc.incarnation == before_bc.incarnation and now_bc.drawn_bits_total >= before_bc.drawn_bits_total
    a = net.sae("sae-a", "a")
    async with a:
        with pytest.raises(ETSI014Error) as no_link:
            await a.enc_keys("sae-b", 1, 256)
        assert no_link.value.status == 503 and "no QKD link to node b" in no_link.value.message
    await keys_flow(net, "sae-c", "sae-b", "c", "b")


async def test_an_sae_added_is_served_at_its_next_request_and_one_removed_is_refused(net):
    with_a2 = network(link("a", "b"), nodes=NODES.replace("[sae-a]", "[sae-a, sae-a2]"))
    await net.push(with_a2, "a", "b")
    await keys_flow(net, "sae-a2", "sae-b", "a", "b")
    await net.push(network(link("a", "b")), "a", "b")
    a2 = net.sae("sae-a2", "a")
    async with a2:
        with pytest.raises(ETSI014Error) as refused:
            await a2.status("sae-b")
        assert refused.value.status == 401


async def test_only_the_controller_may_push_and_a_malformed_push_changes_nothing(net):
    await net.push(network(link("a", "b")), "a", "b")
    before = await net.stats("b")
    km_credentials = grpc_channel_credentials(net.tls(identity.km("a")).files())
    good = topology_to_pb(km_topology(network(), "b", net.addressing), "b", next(net.versions))
    channel, stub = net.control("b", km_credentials)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ConfigureTopology(good, timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    bad = topology_to_pb(km_topology(network(link("a", "b"), link("b", "c")), "b", net.addressing), "b",
                         next(net.versions))
    bad.links[1].peer_grpc = "nowhere"
    channel, stub = net.control("b")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ConfigureTopology(bad, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"topology version {bad.version} for node b refused: links.1.peer_grpc: String should match" \
        in refused.value.details()
    after = await net.stats("b")
    assert after.topology_version == before.topology_version
    assert [(s.link, s.incarnation) for s in after.links] == [(s.link, s.incarnation) for s in before.links]
