"""Two real KM replicas of one node are one KME: keys held twice, taken at either, once.

Node ``s`` runs two KM processes, replicas 0 and 1, both presenting the node's certificate,
with the same ``replicas`` map in their topologies; node ``m`` runs one KM, linked to
replica 0 of ``s`` over an emulated module pair. Replica 1 has no end of link m-s of its
own: it holds copies and serves dec_keys through its sibling. (For ETSI 004 it carries an
end towards m that never comes up — its module is not there — only so that it takes the
session's route.) The test plays the control plane: each KM gets its topology in its
file and the sessions over KeyManagerControl.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
import urllib.request

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Processes, wait_for_port
from test_km_etsi014 import enc_keys_retrying, wait_stored
from test_km_topology_push import free_ports
from vqkd.km import identity
from vqkd.km.domain.replicas import stream_owner
from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.tls import client_context
from vqkd.km.v1 import km_pb2, km_pb2_grpc

LINK = "m-s"
SAES = {"sae-m": "m", "sae-s": "s", "sae-m2": "m", "sae-s2": "s"}
KMS = ("m", "s0", "s1")


class ReplicaNetwork:
    def __init__(self, pki, processes: Processes):
        self.pki, self.processes = pki, processes
        names = [f"{kind}-{km}" for km in KMS for kind in ("api", "grpc", "met")] + ["a", "b", "admin", "nowhere"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.procs = {}
        processes.start("vqkd.km.emulator", {
            "link": LINK, "key_rate_bps": 4_000_000, "qber": 0.0, "admin_listen": self.at("admin"),
            "ends": {end: {"listen": self.at(end), "sae_id": node, "client": identity.km(node).uri,
                           "kme_id": f"module-{end}", "tls": pki.paths(identity.module(LINK, end))}
                     for end, node in (("a", "m"), ("b", "s"))},
        }, "module")
        replicas = {0: self.at("grpc-s0"), 1: self.at("grpc-s1")}
        self.start_km("m", "m", 0, [self.link_end("m", "s", "grpc-s0", "a")], {})
        self.start_km("s0", "s", 0, [self.link_end("s", "m", "grpc-m", "b")], replicas)
        self.start_km("s1", "s", 1, [self.link_end("s", "m", "grpc-m", "nowhere", name="m-s-r1")], replicas)
        for port in self.ports.values():
            if port != self.ports["nowhere"]:
                wait_for_port(port, timeout=60)  # four processes starting on a shared, busy machine
        self.controller = grpc_channel_credentials(pki.files(identity.controller()))

    def at(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def link_end(self, node: str, peer: str, peer_grpc: str, module: str, name: str = LINK) -> dict:
        return {"name": name, "peer_node": peer, "peer_kme_id": peer, "peer_grpc": self.at(peer_grpc),
                "module_url": f"https://{self.at(module)}", "module_sae_id": node, "peer_module_sae_id": peer}

    def start_km(self, km: str, node: str, replica: int, links: list[dict], replicas: dict[int, str]) -> None:
        self.procs[km] = self.processes.start("vqkd.km", {
            "node": node, "kme_id": node, "replica": replica, "etsi014_listen": self.at(f"api-{km}"),
            "grpc_listen": self.at(f"grpc-{km}"), "metrics_listen": self.at(f"met-{km}"),
            "tls": self.pki.paths(identity.km(node)),
            "topology": {"saes": SAES, "links": links, "replicas": replicas},
        }, f"km-{km}")

    def kill(self, km: str) -> None:
        self.procs[km].send_signal(signal.SIGKILL)
        self.procs[km].wait()

    def sae(self, sae: str, km: str) -> ETSI014Client:
        return ETSI014Client(f"https://{self.at('api-' + km)}", self.pki.files(identity.sae(sae)))

    async def configure(self, session_id: str, master: str, slave: str, kms=("m", "s0")) -> None:
        """The session master -> slave, pushed to the KM of m and to replicas of s."""
        for km in kms:
            source = km == "m"
            config = km_pb2.SessionConfig(
                session_id=session_id, version=1, role=km_pb2.SOURCE if source else km_pb2.DESTINATION, user="lab",
                source=km_pb2.Endpoint(node="m", sae_id=master), destination=km_pb2.Endpoint(node="s", sae_id=slave),
                prev_hop="" if source else "m", next_hop="s" if source else "", priority=1, rate_bps=1e8,
                bucket_bits=1 << 22, inactivity_timeout_ms=600_000, request_timeout_ms=3_000, key_chunk_size=32)
            async with grpc.aio.secure_channel(self.at(f"grpc-{km}"), self.controller) as channel:
                reply = await km_pb2_grpc.KeyManagerControlStub(channel).ConfigureSession(config, timeout=5)
            assert reply.state == "Operative"

    async def etsi004(self, sae: str, km: str, call: str, body: dict) -> dict:
        ctx = client_context(self.pki.files(identity.sae(sae)))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.post(f"https://{self.at('api-' + km)}/api/v1/etsi004/{call}", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

    def metric(self, km: str, name: str) -> float:
        with urllib.request.urlopen(f"http://{self.at('met-' + km)}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name)


async def issue(net: ReplicaNetwork, number: int = 2) -> list[tuple[str, bytes]]:
    async with net.sae("sae-m", "m") as m:
        await wait_stored(m, "sae-s", number * 256 + 256)
        return await enc_keys_retrying(m, "sae-s", number, 256)


async def dec_keys(net: ReplicaNetwork, km: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
    async with net.sae("sae-s", km) as s:
        return await s.dec_keys("sae-m", key_ids)


@pytest.fixture(scope="module")
def net(pki, tmp_path_factory):
    processes = Processes(tmp_path_factory.mktemp("replicas"))
    try:
        network = ReplicaNetwork(pki, processes)
        asyncio.run(network.configure(str(uuid.uuid4()), "sae-m", "sae-s"))
        yield network
    finally:
        processes.stop_all()


async def test_a_key_committed_at_one_replica_is_taken_once_at_the_other(net):
    sent = await issue(net)
    ids = [key_id for key_id, _ in sent]
    assert net.metric("s0", "vqkd_km_keys_held_once_total") == 0
    assert await dec_keys(net, "s1", ids) == sent  # replica 1 has no link: s0 committed them
    for km in ("s0", "s1"):
        with pytest.raises(ETSI014Error) as e:
            await dec_keys(net, km, ids[:1])
        assert e.value.status == 400
    # And at the replica that committed them, as before.
    sent = await issue(net, 1)
    assert await dec_keys(net, "s0", [sent[0][0]]) == sent
    with pytest.raises(ETSI014Error):
        await dec_keys(net, "s1", [sent[0][0]])
    assert net.metric("s1", "vqkd_km_copies_promoted_total") == 0


async def test_dec_keys_racing_at_both_replicas_deliver_the_key_once(net):
    for _ in range(3):
        sent = await issue(net, 1)
        results = await asyncio.gather(*(dec_keys(net, km, [sent[0][0]]) for km in ("s0", "s1", "s0", "s1")),
                                       return_exceptions=True)
        assert [r for r in results if not isinstance(r, Exception)] == [sent], results
        assert all(isinstance(r, ETSI014Error) and r.status == 400 for r in results if isinstance(r, Exception))


async def test_only_a_slave_of_the_key_takes_it_at_either_replica(net):
    sent = await issue(net, 1)
    async with net.sae("sae-s2", "s1") as other:
        with pytest.raises(ETSI014Error) as e:
            await other.dec_keys("sae-m", [sent[0][0]])
    assert e.value.status == 401
    assert await dec_keys(net, "s1", [sent[0][0]]) == sent


async def test_node_replicas_serves_the_nodes_own_km_identity_only(net):
    sent = await issue(net, 1)
    for stranger in (identity.km("m"), identity.controller(), identity.sae("sae-s")):
        credentials = grpc_channel_credentials(net.pki.files(stranger))
        async with grpc.aio.secure_channel(net.at("grpc-s0"), credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await km_pb2_grpc.NodeReplicasStub(channel).TakeKeys(km_pb2.TakeKeysRequest(
                    sender_replica=1, caller_sae_id="sae-s", master_sae_id="sae-m", key_ids=[sent[0][0]]), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await dec_keys(net, "s1", [sent[0][0]]) == sent


def owned_by(replica: int) -> str:
    return next(s for s in (str(uuid.uuid4()) for _ in range(100)) if stream_owner(s, [0, 1]) == replica)


@pytest.mark.parametrize("owner", [0, 1])
async def test_etsi004_calls_landing_at_either_replica_reach_the_streams_owner(net, owner):
    session = owned_by(owner)
    await net.configure(session, "sae-m2", "sae-s2", kms=("m", "s0", "s1"))
    chunks = {}
    for index in range(4):
        got = await net.etsi004("sae-m2", "m", "get_key", {"Key_stream_ID": session, "index": index})
        assert got["status"] == 0, got
        chunks[index] = got["Key_buffer"]
    # Committed at replica 0 (the only one linked), held at the owner, served at either.
    for index in range(4):
        got = await net.etsi004("sae-s2", f"s{index % 2}", "get_key", {"Key_stream_ID": session, "index": index})
        assert (got["status"], got["Key_buffer"]) == (0, chunks[index]), got
    again = await net.etsi004("sae-s2", f"s{1 - owner}", "get_key", {"Key_stream_ID": session, "index": 0})
    assert again["status"] == 6  # taken: a chunk goes to the application once
    closed = await net.etsi004("sae-s2", f"s{1 - owner}", "close", {"Key_stream_ID": session})
    assert closed["status"] == 0
    for km in ("s0", "s1"):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                ssl=client_context(net.pki.files(identity.sae("sae-s2"))))) as s:
            async with s.post(f"https://{net.at('api-' + km)}/api/v1/etsi004/get_key",
                              json={"Key_stream_ID": session}) as resp:
                assert resp.status == 400 and "no open session" in (await resp.json())["message"]


async def test_the_holder_killed_after_enc_keys_the_survivor_hands_the_keys_out_once(pki, tmp_path):
    processes = Processes(tmp_path)
    try:
        net = ReplicaNetwork(pki, processes)
        await net.configure(str(uuid.uuid4()), "sae-m", "sae-s")
        sent = await issue(net, 4)
        async with net.sae("sae-s", "s0") as master:  # keys between two SAEs of node s, made at s0
            local = await master.enc_keys("sae-s2", 2, 256)
        net.kill("s0")  # the replica that committed them; the copy is at replica 1
        assert await dec_keys(net, "s1", [key_id for key_id, _ in sent]) == sent
        async with net.sae("sae-s2", "s1") as slave:
            assert await slave.dec_keys("sae-s", [key_id for key_id, _ in local]) == local
        assert net.metric("s1", "vqkd_km_copies_promoted_total") == 6
        with pytest.raises(ETSI014Error) as e:
            await dec_keys(net, "s1", [sent[0][0]])
        assert e.value.status == 503 and "did not" in e.value.message  # replica 0 might hold it: retry
    finally:
        processes.stop_all()
