"""ETSI GS QKD 014 at real KM processes over mutual TLS, fed by an emulated QKD link.

Network: alice (two SAEs) and bob (one SAE) joined by a fast emulated link; carol has an
SAE but no link. Every test talks HTTPS to the processes started by the local runner.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from vqkd.km import identity
from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.km.tls import TLSFiles, client_context
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_text

NETWORK = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: alice}
spec: {saeIds: [sae-a1, sae-a2]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: bob}
spec: {saeIds: [sae-b1]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: carol}
spec: {saeIds: [sae-c1]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: alice-bob}
spec:
  nodes: [alice, bob]
  emulated: {keyRateBps: 20000000, qber: 0.01}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: lab}
spec:
  saeIds: [sae-a1, sae-a2, sae-b1, sae-c1]
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    network = LocalNetwork(load_text(NETWORK, "test-network"), tmp_path_factory.mktemp("net"), log_level="INFO")
    network.start()
    yield network
    network.stop()


def files(net: LocalNetwork, sae: str) -> TLSFiles:
    info = net.endpoints["saes"][sae]
    return TLSFiles(Path(net.endpoints["ca_cert"]), Path(info["cert"]), Path(info["key"]))


def url(net: LocalNetwork, node: str) -> str:
    return net.endpoints["nodes"][node]["etsi014_url"]


def client(net: LocalNetwork, sae: str, node: str | None = None) -> ETSI014Client:
    return ETSI014Client(url(net, node or net.endpoints["saes"][sae]["node"]), files(net, sae))


def control(net: LocalNetwork, link: str, **settings) -> dict:
    req = urllib.request.Request(
        net.endpoints["links"][link]["control_url"], data=json.dumps(settings).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


async def wait_stored(c: ETSI014Client, slave: str, bits: int, timeout: float = 15.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await c.status(slave)
        if status.stored_key_count * status.key_size >= bits:
            return status.stored_key_count
        assert loop.time() < deadline, f"pool never reached {bits} bits"
        await asyncio.sleep(0.1)


async def enc_keys_retrying(c: ETSI014Client, slave: str, number: int, size: int, timeout: float = 15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await c.enc_keys(slave, number, size)
        except ETSI014Error as e:
            assert e.status == 503, e
            assert loop.time() < deadline, f"still failing after {timeout}s: {e}"
            await asyncio.sleep(0.1)


async def raw(net, sae_or_ident, node, method, path, **kwargs) -> tuple[int, bytes]:
    """One HTTPS request with the named principal's certificate, answered as bytes."""
    if isinstance(sae_or_ident, identity.Identity):
        ident = sae_or_ident
        tls = net._tls(ident)
        ctx = client_context(tls.files())
    else:
        ctx = client_context(files(net, sae_or_ident))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.request(method, url(net, node) + path, **kwargs) as resp:
            return resp.status, await resp.read()


async def test_master_and_slave_get_identical_keys(net):
    a1, b1 = client(net, "sae-a1"), client(net, "sae-b1")
    async with a1, b1:
        await wait_stored(a1, "sae-b1", 8 * 512)
        status = await a1.status("sae-b1")
        assert (status.source_KME_ID, status.target_KME_ID) == ("alice", "bob")
        assert (status.master_SAE_ID, status.slave_SAE_ID, status.max_SAE_ID_count) == ("sae-a1", "sae-b1", 0)
        sent = await a1.enc_keys("sae-b1", 8, 512)
        assert len(sent) == 8 and all(len(k) == 64 for _, k in sent)
        got = await b1.dec_keys("sae-a1", [k for k, _ in sent])
        assert got == sent
        with pytest.raises(ETSI014Error) as e:
            await b1.dec_keys("sae-a1", [sent[0][0]])
        assert (e.value.status, e.value.message) == (400, "one or more keys specified are not found on KME")


async def test_get_forms_of_enc_keys_and_dec_keys(net):
    await wait_stored(client(net, "sae-a1"), "sae-b1", 1024)
    status, body = await raw(net, "sae-a1", "alice", "GET", "/api/v1/keys/sae-b1/enc_keys?number=2&size=128")
    assert status == 200
    keys = json.loads(body)["keys"]
    assert [len(base64.b64decode(k["key"], validate=True)) for k in keys] == [16, 16]
    status, body = await raw(net, "sae-b1", "bob", "GET", f"/api/v1/keys/sae-a1/dec_keys?key_ID={keys[1]['key_ID']}")
    assert status == 200 and json.loads(body)["keys"] == [keys[1]]


async def test_no_key_is_ever_handed_out_twice_under_concurrency_in_both_directions(net):
    a1, a2, b1 = client(net, "sae-a1"), client(net, "sae-a2"), client(net, "sae-b1")
    async with a1, a2, b1:
        await wait_stored(a1, "sae-b1", 40 * 16 * 256)
        await wait_stored(b1, "sae-a1", 20 * 16 * 256)
        # Both ends draw at the same moment: alice's two SAEs towards bob, bob towards alice.
        batches = await asyncio.gather(
            *(a1.enc_keys("sae-b1", 16, 256) for _ in range(20)),
            *(a2.enc_keys("sae-b1", 16, 256) for _ in range(20)),
            *(b1.enc_keys("sae-a1", 16, 256) for _ in range(20)),
        )
        keys = [k for batch in batches for k in batch]
        assert len({key_id for key_id, _ in keys}) == len(keys) == 960
        assert len({key for _, key in keys}) == len(keys), "some key material was used twice"
        a1_to_b1, a2_to_b1, b1_to_a1 = batches[:20], batches[20:40], batches[40:]
        for master, batch_list in (("sae-a1", a1_to_b1), ("sae-a2", a2_to_b1)):
            for batch in batch_list:
                assert await b1.dec_keys(master, [k for k, _ in batch]) == batch
        for batch in b1_to_a1:
            assert await a1.dec_keys("sae-b1", [k for k, _ in batch]) == batch


async def test_a_km_restart_never_causes_reuse(net):
    a1, b1 = client(net, "sae-a1"), client(net, "sae-b1")
    async with a1, b1:
        await wait_stored(a1, "sae-b1", 64 * 256)
        before = await a1.enc_keys("sae-b1", 64, 256)
        assert await b1.dec_keys("sae-a1", [k for k, _ in before[:32]]) == before[:32]
    net.restart("km-bob")  # SIGKILL: bob loses its pools and the keys it held for sae-b1
    a1, b1 = client(net, "sae-a1"), client(net, "sae-b1")
    async with a1, b1:
        # alice drops what it shared with the old bob; meanwhile applications may see a
        # retryable 503, never a key the new bob does not hold.
        after = await enc_keys_retrying(a1, "sae-b1", 64, 256)
        assert await b1.dec_keys("sae-a1", [k for k, _ in after]) == after
        with pytest.raises(ETSI014Error) as e:  # held by the old bob: gone, not resurrected
            await b1.dec_keys("sae-a1", [before[40][0]])
        assert e.value.status == 400
        reverse = await b1.enc_keys("sae-a1", 8, 256) if (await b1.status("sae-a1")).stored_key_count >= 8 else []
    material = [k for _, k in before + after + reverse]
    assert len(set(material)) == len(material)


async def test_limits_and_fixed_error_messages(net):
    cases = [
        ("POST", "/api/v1/keys/sae-b1/enc_keys", {"json": {"size": 100}}, 400, "size shall be a multiple of 8"),
        ("POST", "/api/v1/keys/sae-b1/enc_keys", {"json": {"number": 0}}, 400, "number must be between 1 and"),
        ("POST", "/api/v1/keys/sae-b1/enc_keys", {"json": {"number": 1025}}, 400, "max_key_per_request=1024"),
        ("POST", "/api/v1/keys/sae-b1/enc_keys", {"json": {"size": 16}}, 400, "min_key_size=64"),
        ("POST", "/api/v1/keys/sae-b1/enc_keys", {"json": {"size": 16384}}, 400, "max_key_size=8192"),
        ("POST", "/api/v1/keys/sae-b1/enc_keys", {"json": {"extension_mandatory": [{"vqkd_x": 1}]}}, 400,
         "not all extension_mandatory parameters are supported"),
        ("POST", "/api/v1/keys/sae-b1/enc_keys", {"json": {"additional_slave_SAE_IDs": ["sae-a2"]}}, 400,
         "max_SAE_ID_count is 0"),
        ("POST", "/api/v1/keys/nobody/enc_keys", {"json": {}}, 400, "slave SAE 'nobody' is not known"),
        ("POST", "/api/v1/keys/sae-a1/enc_keys", {"json": {}}, 400, "must differ from the calling SAE"),
        ("GET", "/api/v1/keys/nobody/status", {}, 400, "slave SAE 'nobody' is not known"),
        ("POST", "/api/v1/keys/sae-b1/dec_keys", {"json": {"key_IDs": [{"key_ID": "00000000-0000-4000-8000-000000000000"}]}},
         400, "one or more keys specified are not found on KME"),
        ("POST", "/api/v1/keys/sae-b1/dec_keys", {"json": {"key_IDs": []}}, 400, "at least one key"),
        ("GET", "/api/v1/keys/sae-b1/dec_keys", {}, 400, "exactly one key_ID"),
        ("POST", "/api/v1/keys/sae-c1/enc_keys", {"json": {}}, 503, "no QKD link to node carol"),
    ]
    for method, path, kwargs, code, message in cases:
        status, body = await raw(net, "sae-a1", "alice", method, path, **kwargs)
        assert status == code, (path, kwargs, body)
        assert message in json.loads(body)["message"], (path, kwargs, body)


async def test_malformed_input_gets_a_clear_400_and_the_server_keeps_serving(net):
    cases = [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
        ({"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}}, "must be a JSON object"),
        ({"json": {"number": "many"}}, "number"),
        ({"json": {"size": [256]}}, "size"),
        ({"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
    ]
    for kwargs, message in cases:
        status, body = await raw(net, "sae-a1", "alice", "POST", "/api/v1/keys/sae-b1/enc_keys", **kwargs)
        assert status == 400 and message in json.loads(body)["message"], (kwargs, body)
    status, body = await raw(net, "sae-b1", "bob", "POST", "/api/v1/keys/sae-a1/dec_keys", json={"key_IDs": "x"})
    assert status == 400 and "key_IDs" in json.loads(body)["message"]
    status, _ = await raw(net, "sae-a1", "alice", "GET", "/api/v1/keys/sae-b1/enc_keys?number=two")
    assert status == 400
    status, _ = await raw(net, "sae-a1", "alice", "POST", "/api/v1/keys/sae-b1/enc_keys",
                          data=b"{" + b" " * (2 * 1024 * 1024) + b"}", headers={"Content-Type": "application/json"})
    assert status == 413
    c = client(net, "sae-a1")
    async with c:
        assert (await c.status("sae-b1")).source_KME_ID == "alice"


async def test_each_sae_acts_only_as_itself(net):
    # An SAE of bob cannot use alice's KM, a KM certificate is not an SAE, and only the named
    # slave may collect a key.
    status, _ = await raw(net, "sae-b1", "alice", "GET", "/api/v1/keys/sae-a1/status")
    assert status == 401
    status, _ = await raw(net, identity.km("bob"), "alice", "GET", "/api/v1/keys/sae-b1/status")
    assert status == 401
    a1, a2 = client(net, "sae-a1"), client(net, "sae-a2")
    async with a1, a2:
        await wait_stored(a1, "sae-b1", 256)
        sent = await a1.enc_keys("sae-b1", 1, 256)
        with pytest.raises(ETSI014Error) as e:
            await a2.dec_keys("sae-a1", [sent[0][0]])  # a2 is on the same node but not the slave
        assert e.value.status in (400, 401)
    b1 = client(net, "sae-b1")
    async with b1:
        assert await b1.dec_keys("sae-a1", [sent[0][0]]) == sent  # still there for the real slave


async def test_a_client_without_a_certificate_is_refused(net):
    ctx = ssl.create_default_context(cafile=net.endpoints["ca_cert"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(url(net, "alice") + "/api/v1/keys/sae-b1/status") as resp:
                await resp.read()


async def test_not_enough_key_is_503_and_consumes_nothing(net):
    control(net, "alice-bob", outage=True)
    try:
        a1 = client(net, "sae-a1")
        async with a1:
            for _ in range(64):  # drain the pool in the largest requests allowed
                try:
                    await a1.enc_keys("sae-b1", 1024, 8192)
                except ETSI014Error as e:
                    assert e.status == 503, e; print("DEBUG err", e)
                    break
            stored = await stable_stored(a1, "sae-b1"); print("DEBUG stored", stored, _)
            too_many = stored * 256 // 8192 + 1  # just more than the pool holds
            with pytest.raises(ETSI014Error) as e:
                await a1.enc_keys("sae-b1", too_many, 8192)
            assert e.value.status == 503 and "not enough QKD key on link alice-bob" in e.value.message
            assert (await a1.status("sae-b1")).stored_key_count == stored
    finally:
        control(net, "alice-bob", outage=False)


async def stable_stored(c: ETSI014Client, slave: str) -> int:
    """The pool level once draws already under way have landed (the module is in outage)."""
    previous = -1
    while True:
        stored = (await c.status(slave)).stored_key_count
        if stored == previous:
            return stored
        previous = stored
        await asyncio.sleep(0.5)


async def test_openapi_document_and_metrics(net):
    status, body = await raw(net, "sae-a1", "alice", "GET", "/api/v1/openapi.json")
    doc = json.loads(body)
    assert status == 200 and "/api/v1/keys/{master_SAE_ID}/dec_keys" in doc["paths"]
    assert set(doc["components"]["schemas"]) >= {"Status", "KeyRequest", "KeyContainer", "KeyIDs", "Error"}
    with urllib.request.urlopen(net.endpoints["nodes"]["alice"]["metrics_url"], timeout=5) as resp:
        text = resp.read().decode()
    for metric in ("vqkd_km_keys_delivered_total", "vqkd_km_pool_bits", "vqkd_km_request_duration_seconds_bucket",
                   "vqkd_km_responses_total", "vqkd_km_link_drawn_bits_total"):
        assert metric in text
    assert 'vqkd_km_pool_bits{direction="outgoing",link="alice-bob",node="alice",replica="0"}' in text
    with urllib.request.urlopen(net.endpoints["links"]["alice-bob"]["metrics_url"], timeout=5) as resp:
        assert "vqkd_module_generated_bits_total" in resp.read().decode()


async def test_refusals_are_counted_by_reason_from_zero(net):
    def refusals() -> dict[str, float]:
        with urllib.request.urlopen(net.endpoints["nodes"]["alice"]["metrics_url"], timeout=5) as resp:
            text = resp.read().decode()
        return {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("vqkd_km_refusals_total{")}

    before = refusals()
    assert {"insufficient_key", "token_bucket", "no_path"} <= set(before)  # exported at 0 from the start
    status, _ = await raw(net, "sae-a1", "alice", "POST", "/api/v1/keys/sae-c1/enc_keys", json={})
    assert status == 503
    assert refusals()["no_path"] == before["no_path"] + 1
