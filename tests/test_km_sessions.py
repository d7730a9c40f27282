"""Sessions and multi-hop relay across real KM processes, configured over gRPC with mTLS.

The test plays the control plane: it pushes each KM on a path its forwarding entry
(KeyManagerControl.ConfigureSession) exactly as the control core does, then the SAEs draw
keys over ETSI 014 and the keys travel hop by hop through the trusted nodes.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from test_km_etsi014 import client, enc_keys_retrying, wait_stored
from vqkd.km import identity
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.etsi014.client import ETSI014Error
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_text

N = 6  # n0 - n1 - n2 - n3 - n4 - n5


def chain_yaml() -> str:
    docs = [f"""apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: n{i}}}
spec: {{saeIds: [sae-{i}]}}""" for i in range(N)]
    docs += [f"""apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: n{i}-n{i + 1}}}
spec:
  nodes: [n{i}, n{i + 1}]
  emulated: {{keyRateBps: 4000000, qber: 0.01}}""" for i in range(N - 1)]
    docs.append(f"""apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {{name: lab}}
spec: {{saeIds: [{", ".join(f"sae-{i}" for i in range(N))}]}}""")
    return "\n---\n".join(docs)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    network = LocalNetwork(load_text(chain_yaml(), "chain"), tmp_path_factory.mktemp("chain"), log_level="INFO")
    network.start()
    yield network
    network.stop()


class ControlPlane:
    """Pushes forwarding entries to KMs the way the control core does."""

    def __init__(self, net: LocalNetwork):
        self.net = net
        files = net._tls(identity.controller()).files()
        self.credentials = grpc_channel_credentials(files)

    def stub(self, node: str) -> km_pb2_grpc.KeyManagerControlStub:
        channel = grpc.aio.secure_channel(self.net.endpoints["nodes"][node]["grpc"], self.credentials)
        return km_pb2_grpc.KeyManagerControlStub(channel)

    async def configure(self, path: list[str], session_id: str, version: int = 1, rate_bps: float = 1e8,
                        bucket_bits: int = 1 << 22) -> None:
        src, dst = path[0], path[-1]
        for i, node in enumerate(path):
            role = km_pb2.SOURCE if i == 0 else km_pb2.DESTINATION if i == len(path) - 1 else km_pb2.INTERMEDIATE
            config = km_pb2.SessionConfig(
                session_id=session_id, version=version, role=role, user="lab",
                source=km_pb2.Endpoint(node=src, sae_id=f"sae-{src[1:]}"),
                destination=km_pb2.Endpoint(node=dst, sae_id=f"sae-{dst[1:]}"),
                prev_hop=path[i - 1] if i else "", next_hop=path[i + 1] if i < len(path) - 1 else "",
                priority=1, rate_bps=rate_bps, bucket_bits=bucket_bits, inactivity_timeout_ms=60_000,
                request_timeout_ms=5_000,
            )
            reply = await self.stub(node).ConfigureSession(config, timeout=5)
            assert reply.state == "Operative" and reply.version == version

    async def delete(self, path: list[str], session_id: str) -> list[bool]:
        return [(await self.stub(n).DeleteSession(km_pb2.DeleteSessionRequest(session_id=session_id,
                                                                               reason="test"), timeout=5)).existed
                for n in path]


def nodes(a: int, b: int) -> list[str]:
    return [f"n{i}" for i in range(a, b + 1)]


@pytest.mark.parametrize("hops", [1, 2, 5])
async def test_keys_relayed_over_hops_are_identical_at_both_ends(net, hops):
    cp = ControlPlane(net)
    path = nodes(0, hops)
    session = str(uuid.uuid4())
    await cp.configure(path, session)
    master, slave = "sae-0", f"sae-{hops}"
    m, s = client(net, master), client(net, slave)
    async with m, s:
        await wait_stored(m, "sae-1", 8 * 256 + 256)
        sent = await enc_keys_retrying(m, slave, 8, 256)
        assert await s.dec_keys(master, [k for k, _ in sent]) == sent
        # And the other way round in the same session.
        back = await enc_keys_retrying(s, master, 2, 512)
        assert await m.dec_keys(slave, [k for k, _ in back]) == back
    assert all(await cp.delete(path, session))


async def test_deleting_a_session_removes_the_forwarding_entries(net):
    cp = ControlPlane(net)
    path, session = nodes(0, 2), str(uuid.uuid4())
    await cp.configure(path, session)
    m = client(net, "sae-0")
    async with m:
        await wait_stored(m, "sae-1", 1024)
        await enc_keys_retrying(m, "sae-2", 1, 256)
        assert await cp.delete(path, session) == [True, True, True]
        assert await cp.delete(path, session) == [False, False, False]  # idempotent
        with pytest.raises(ETSI014Error) as e:
            await m.enc_keys("sae-2", 1, 256)
        assert e.value.status == 503 and "no QKD link to node n2" in e.value.message


async def test_token_bucket_of_the_session_is_enforced(net):
    cp = ControlPlane(net)
    path, session = nodes(3, 4), str(uuid.uuid4())
    await cp.configure(path, session, rate_bps=256, bucket_bits=2048)
    m = client(net, "sae-3")
    async with m:
        await wait_stored(m, "sae-4", 4096)
        await enc_keys_retrying(m, "sae-4", 8, 256)  # the whole burst
        with pytest.raises(ETSI014Error) as e:
            await m.enc_keys("sae-4", 8, 256)
        assert e.value.status == 503 and "token bucket allows" in e.value.message
    await cp.delete(path, session)


async def test_a_dead_intermediate_means_no_key_for_anyone(net):
    cp = ControlPlane(net)
    path, session = nodes(1, 3), str(uuid.uuid4())
    await cp.configure(path, session)
    m, s = client(net, "sae-1"), client(net, "sae-3")
    async with m, s:
        await wait_stored(m, "sae-2", 2048)
        net.processes["km-n2"].popen.kill()
        net.processes["km-n2"].popen.wait()
        with pytest.raises(ETSI014Error) as e:
            await m.enc_keys("sae-3", 4, 256)
        assert e.value.status == 503
        status = await s.status("sae-1")
        assert status.slave_SAE_ID == "sae-1"
    net.restart("km-n2")
    # The replaced KM lost its forwarding entry: the control plane pushes it again, idempotently.
    await cp.configure(path, session)
    m, s = client(net, "sae-1"), client(net, "sae-3")
    async with m, s:
        sent = await enc_keys_retrying(m, "sae-3", 4, 256)
        assert await s.dec_keys("sae-1", [k for k, _ in sent]) == sent


async def test_only_the_control_plane_may_configure(net):
    files = net._tls(identity.km("n0")).files()  # a KM certificate, not a controller
    channel = grpc.aio.secure_channel(net.endpoints["nodes"]["n1"]["grpc"], grpc_channel_credentials(files))
    stub = km_pb2_grpc.KeyManagerControlStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ListSessions(km_pb2.ListSessionsRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await channel.close()


async def test_malformed_configuration_is_refused_with_the_field_named(net):
    stub = ControlPlane(net).stub("n1")
    bad = km_pb2.SessionConfig(session_id="x", version=1, role=km_pb2.INTERMEDIATE,
                               source=km_pb2.Endpoint(node="n0", sae_id="sae-0"),
                               destination=km_pb2.Endpoint(node="n2", sae_id="sae-2"),
                               prev_hop="n0", next_hop="n5", rate_bps=1, bucket_bits=1)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ConfigureSession(bad, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "next_hop 'n5' is not a neighbour of n1" in e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ConfigureSession(km_pb2.SessionConfig(session_id="y", version=1), timeout=5)
    assert "role must be" in e.value.details()


async def test_standard_grpc_health_and_session_listing(net):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cp = ControlPlane(net)
    path, session = nodes(2, 3), str(uuid.uuid4())
    await cp.configure(path, session)
    channel = grpc.aio.secure_channel(net.endpoints["nodes"]["n2"]["grpc"], cp.credentials)
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = await cp.stub("n2").ListSessions(km_pb2.ListSessionsRequest(), timeout=5)
    info = next(s for s in listed.sessions if s.config.session_id == session)
    assert (info.state, info.config.role, info.config.next_hop) == ("Operative", km_pb2.SOURCE, "n3")
    stats = await cp.stub("n2").GetStats(km_pb2.GetStatsRequest(), timeout=5)
    assert {link.link for link in stats.links} == {"n1-n2", "n2-n3"} and stats.incarnation
    await channel.close()
    await cp.delete(path, session)
