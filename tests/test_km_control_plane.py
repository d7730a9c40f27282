"""The KM side of the control-plane interface (paper Fig. 2a), across real processes.

A small ControlPlane double runs in the test process on real gRPC with mutual TLS. It
records every call the KMs make and, like admission control, configures the KMs on the
path once both peers are registered (an ETSI 014 open counts for both). The KMs start with
their identity only; the control plane's topology pusher gives them their topologies.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

import aiohttp
import grpc
import pytest

from conftest import free_port
from test_km_etsi014 import client, control, files, url, wait_stored
from vqkd.km import identity
from vqkd.km.rpc.credentials import grpc_channel_credentials, grpc_server_credentials
from vqkd.km.etsi014.client import ETSI014Error
from vqkd.km.tls import client_context
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.adapters.kms import GrpcKMs
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_text
from vqkd.operator.topologies import TopologyPusher

NODES = ["n0", "n1", "n2"]
NETWORK = "\n---\n".join(
    [f"""apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: {n}}}
spec: {{saeIds: [sae-{n}, sae-{n}b]}}""" for n in NODES]
    + [f"""apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: {a}-{b}}}
spec:
  nodes: [{a}, {b}]
  emulated: {{keyRateBps: 4000000, qber: 0.01}}""" for a, b in zip(NODES, NODES[1:])]
    + ["""apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: lab}
spec: {saeIds: [sae-n0, sae-n1, sae-n2, sae-n0b, sae-n1b, sae-n2b]}"""]
)


class ControlPlaneDouble(km_pb2_grpc.ControlPlaneServicer):
    """Records calls; configures the chain path between the endpoints when both registered."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.requests: list[int] = []  # the key requests each KeyRequested signal stood for
        self.registered: dict[str, set[str]] = {}
        self.endpoints: dict[str, tuple] = {}
        self.fallback = ""
        self.inactivity_ms = 60_000
        self.net: LocalNetwork | None = None

    async def OpenSession(self, request, context):
        self.calls.append(("OpenSession", request.caller_sae_id))
        sid = request.session_id or str(uuid.uuid4())
        self.endpoints.setdefault(sid, (request.source, request.destination))
        both = {request.source.sae_id, request.destination.sae_id}
        self.registered.setdefault(sid, set()).update(both if request.implicit else {request.caller_sae_id})
        peer = self.registered[sid] == both
        if peer:
            asyncio.get_running_loop().create_task(self.configure(sid))
        return km_pb2.OpenSessionReply(accepted=True, session_id=sid, peer_registered=peer,
                                       qos=km_pb2.QoS(key_chunk_size=32, timeout_ms=3000))

    async def configure(self, sid: str):
        source, destination = self.endpoints[sid]
        a, b = NODES.index(source.node), NODES.index(destination.node)
        path = NODES[a:b + 1] if a < b else NODES[b:a + 1][::-1]
        creds = grpc_channel_credentials(self.net._tls(identity.controller()).files())
        # Far end first: the source turns Operative (and starts relaying) only when every KM
        # after it already holds its forwarding entry.
        for i, node in reversed(list(enumerate(path))):
            role = km_pb2.SOURCE if i == 0 else km_pb2.DESTINATION if i == len(path) - 1 else km_pb2.INTERMEDIATE
            async with grpc.aio.secure_channel(self.net.endpoints["nodes"][node]["grpc"], creds) as channel:
                await km_pb2_grpc.KeyManagerControlStub(channel).ConfigureSession(km_pb2.SessionConfig(
                    session_id=sid, version=1, role=role, user="lab", source=source, destination=destination,
                    prev_hop=path[i - 1] if i else "", next_hop=path[i + 1] if i < len(path) - 1 else "",
                    priority=1, rate_bps=1e8, bucket_bits=1 << 22, inactivity_timeout_ms=self.inactivity_ms,
                    request_timeout_ms=1500, key_chunk_size=32, fallback=self.fallback,
                ), timeout=5)

    async def KeyRequested(self, request, context):
        self.calls.append(("KeyRequested", request.session_id))
        self.requests.append(request.requests)
        return km_pb2.SignalReply()

    async def SessionClosed(self, request, context):
        self.calls.append(("SessionClosed", request.reason))
        return km_pb2.SignalReply()


@pytest.fixture
async def cp_net(tmp_path):
    double = ControlPlaneDouble()
    port = free_port()
    network = LocalNetwork(load_text(NETWORK, "cp"), tmp_path, log_level="INFO", control_plane=f"127.0.0.1:{port}")
    server = grpc.aio.server()
    km_pb2_grpc.add_ControlPlaneServicer_to_server(double, server)
    server.add_secure_port(f"127.0.0.1:{port}", grpc_server_credentials(network._tls(identity.controller()).files()))
    await server.start()
    double.net = network
    await asyncio.to_thread(network.start)
    kms = GrpcKMs(lambda node, replica: network.addressing.km(node, replica).grpc,
                  network._tls(identity.controller()).files())
    topologies = TopologyPusher(kms)
    topologies.track(network.manifest, network.addressing)
    await topologies.refresh()
    assert topologies.unconfirmed() == {}
    yield network, double
    await kms.close()
    await asyncio.to_thread(network.stop)
    await server.stop(0)


async def post(net, sae, path, body, at: str | None = None):
    """POST as ``sae`` to the KM of its own node, or to the KM of node ``at``."""
    ctx = client_context(files(net, sae))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.post(url(net, at or net.endpoints["saes"][sae]["node"]) + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)


async def eventually(condition, timeout: float = 5.0) -> None:
    """Signals to the control plane are fire-and-forget: wait for one to land."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def get_key_when_connected(net, sae, ksid, index):
    """GET_KEY, retried while the KM still waits for its own route (status 3)."""
    for _ in range(50):
        status, reply = await post(net, sae, "/api/v1/etsi004/get_key", {"Key_stream_ID": ksid, "index": index})
        if reply["status"] != 3:
            return status, reply
        await asyncio.sleep(0.1)
    raise AssertionError(f"{sae}: peer never connected on {ksid}")


async def test_etsi014_opens_an_implicit_session_signals_requests_and_reports_expiry(cp_net):
    net, cp = cp_net
    cp.inactivity_ms = 1500
    m, s = client(net, "sae-n0"), client(net, "sae-n2")
    async with m, s:
        await wait_stored(m, "sae-n1", 4096)
        # Signals are at least a second apart from the first request on, however long the
        # steps between the requests take on a loaded machine.
        started = time.monotonic()
        sent = await m.enc_keys("sae-n2", 4, 256)
        assert await s.dec_keys("sae-n0", [k for k, _ in sent]) == sent
        await eventually(lambda: cp.requests == [1])  # the first request of a session: signalled at once
        for _ in range(9):
            await m.enc_keys("sae-n2", 1, 256)  # same session: no second open
        took = time.monotonic() - started
    assert [c for c in cp.calls if c[0] == "OpenSession"] == [("OpenSession", "sae-n0")]
    # The other nine: at most one signal a second, together counting every request.
    await eventually(lambda: sum(cp.requests) == 10)
    assert 2 <= len(cp.requests) <= 2 + int(took), (cp.requests, took)
    await eventually(lambda: ("SessionClosed", "inactivity timer expired") in cp.calls)


async def test_etsi004_both_applications_get_the_same_stream(cp_net):
    net, cp = cp_net
    async with client(net, "sae-n0") as c:
        await wait_stored(c, "sae-n1", 8192)
    status, opened = await post(net, "sae-n0", "/api/v1/etsi004/open_connect",
                                {"source": "sae-n0", "destination": "sae-n2", "QoS": {"Timeout": 300}})
    assert status == 200 and opened["status"] == 1  # the destination has not connected yet
    ksid = opened["Key_stream_ID"]
    status, reply = await post(net, "sae-n0", "/api/v1/etsi004/get_key", {"Key_stream_ID": ksid})
    assert reply["status"] == 3  # GET_KEY: peer application not connected
    status, joined = await post(net, "sae-n2", "/api/v1/etsi004/open_connect",
                                {"source": "sae-n0", "destination": "sae-n2", "Key_stream_ID": ksid})
    assert joined["status"] == 0 and joined["Key_stream_ID"] == ksid
    _, small = await post(net, "sae-n0", "/api/v1/etsi004/get_key", {"Key_stream_ID": ksid, "Metadata_size": 8})
    assert small["status"] == 8 and "needs" in small["message"]  # nothing taken: index 0 still comes next
    source_keys = [await get_key_when_connected(net, "sae-n0", ksid, i) for i in range(3)]
    dest_keys = await asyncio.gather(*(post(net, "sae-n2", "/api/v1/etsi004/get_key",
                                            {"Key_stream_ID": ksid, "index": i}) for i in (2, 0, 1)))
    assert [r["status"] for _, r in source_keys] == [0, 0, 0]
    by_index = {r["index"]: r["Key_buffer"] for _, r in dest_keys}
    assert by_index == {r["index"]: r["Key_buffer"] for _, r in source_keys}
    assert all(len(base64.b64decode(k)) == 32 for k in by_index.values())
    _, nothing = await post(net, "sae-n2", "/api/v1/etsi004/get_key", {"Key_stream_ID": ksid, "index": 7})
    assert nothing["status"] == 6  # the source never asked for chunk 7: timeout
    # The destination application at the source's KM: refused at once, as ETSI 014 calls are,
    # instead of waiting out the stream's timeout.
    started = time.monotonic()
    status, body = await post(net, "sae-n2", "/api/v1/etsi004/get_key", {"Key_stream_ID": ksid, "index": 3},
                              at=net.endpoints["saes"]["sae-n0"]["node"])
    assert status == 401 and "not attached" in body["message"] and time.monotonic() - started < 1.0
    _, closed = await post(net, "sae-n0", "/api/v1/etsi004/close", {"Key_stream_ID": ksid})
    assert closed["status"] == 0
    await eventually(lambda: ("SessionClosed", "closed by application sae-n0") in cp.calls)
    status, _ = await post(net, "sae-n1", "/api/v1/etsi004/get_key", {"Key_stream_ID": ksid})
    assert status == 401  # sae-n1 is not an application of this session
    status, body = await post(net, "sae-n0", "/api/v1/etsi004/get_key", {"Key_stream_ID": ksid})
    assert status == 400 and "no open session" in body["message"]  # closed


async def test_etsi004_refuses_to_act_for_another_sae(cp_net):
    net, _ = cp_net
    status, _ = await post(net, "sae-n1", "/api/v1/etsi004/open_connect", {"source": "sae-n0", "destination": "sae-n2"})
    assert status == 401
    status, body = await post(net, "sae-n0", "/api/v1/etsi004/open_connect", {"source": "sae-n0"})
    assert status == 400 and "destination" in body["message"]


async def test_hybrid_fallback_only_for_a_session_that_asked(cp_net):
    net, cp = cp_net
    control(net, "n0-n1", outage=True)
    m, s = client(net, "sae-n0"), client(net, "sae-n2")
    async with m, s:
        # drain what is left on the first link, down to less than one small key
        for number, size in ((256, 8192), (16, 8192), (1, 8192), (1, 256)):
            while True:
                try:
                    await m.enc_keys("sae-n1", number, size)
                except ETSI014Error:
                    break
        with pytest.raises(ETSI014Error) as e:  # no fallback asked: not enough key, nothing else
            await m.enc_keys("sae-n2", 2, 256)
        assert e.value.status == 503 and "not enough QKD key" in e.value.message
    cp.fallback = "pqc"
    s = client(net, "sae-n2b")  # another pair, whose session is opened with the fallback allowed
    async with s:
        status, body = await post(net, "sae-n0b", "/api/v1/keys/sae-n2b/enc_keys", {"number": 2, "size": 256})
        assert status == 200, body
        assert all(k["key_extension"] == {"vqkd_key_origin": "hybrid-x25519-mlkem768"} for k in body["keys"])
        got = await s.dec_keys("sae-n0b", [k["key_ID"] for k in body["keys"]])
        assert [base64.b64encode(k).decode() for _, k in got] == [k["key"] for k in body["keys"]]
    control(net, "n0-n1", outage=False)
