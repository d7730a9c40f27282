"""The local runtime with its control plane: the paper's network (§4) as real processes.

One network for the whole module, driven through a sequence of situations an operator
of a real QKD network meets: key for three pairs in parallel, a crashed KM, a lost node,
an eavesdropper raising the QBER of a link, a session over its SLA and an application
whose peer never shows up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from test_km_control_plane import eventually
from test_km_etsi014 import control as link_control, wait_stored
from vqkd.km.etsi014.client import ETSI014Error
from vqkd.km.tls import client_context
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local import paper
from vqkd.operator.local.clients import sae_client, sae_tls
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_text

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
OVER_SLA = """
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: session-over-sla}
spec:
  user: user-4-5
  source: {node: node-4, saeId: sae-4}
  destination: {node: node-5, saeId: sae-5}
  qos: {minBps: 100000, maxBps: 200000}
"""


LIMITED = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: alice}
spec:
  saeIds: [sae-a]
  km: {keySize: 512, minKeySize: 128, maxKeySize: 1024, maxKeyPerRequest: 4}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: bob}
spec: {saeIds: [sae-b]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: alice-bob}
spec:
  nodes: [alice, bob]
  emulated: {keyRateBps: 1000000}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def paper_net(tmp_path_factory):
    text = (ROOT / "examples" / "paper.yaml").read_text() + OVER_SLA
    network = LocalNetwork(load_text(text, "paper.yaml"), tmp_path_factory.mktemp("paper"), log_level="INFO",
                           control_plane="auto")
    cp = LocalControlPlane(network, admission=AdmissionSettings(peer_wait_s=2, inactivity_timeout_s=600))
    await cp.start()
    yield cp
    await cp.stop()


def session(cp: LocalControlPlane, name: str) -> dict:
    return next(s for s in cp.core.sessions() if s["keySession"] == name)


async def keys_match(cp: LocalControlPlane, master: str, slave: str) -> None:
    matched, mismatched = await paper.exchange(cp.network.endpoints, master, slave)
    assert (matched, mismatched) == (paper.ROUNDS * paper.KEYS_PER_REQUEST, 0)


async def test_paper_scenario_three_pairs_in_parallel(paper_net):
    cp = paper_net
    await paper.wait_active(cp, ["session-0-1", "session-2-3", "session-4-5"])
    assert session(cp, "session-2-3")["path"] == ["node-2", "node-0", "node-3"]
    assert session(cp, "session-4-5")["path"] == ["node-4", "node-5"]
    await asyncio.gather(keys_match(cp, "sae-0", "sae-1"), keys_match(cp, "sae-2", "sae-3"),
                         keys_match(cp, "sae-4", "sae-5"))
    # Each key counted once, by the KM that issued it (node-0 relayed 2-3's keys, the KM of
    # node 3 received them: neither counts them again).
    drawn = paper.ROUNDS * paper.KEYS_PER_REQUEST
    names = ("session-0-1", "session-2-3", "session-4-5")
    await eventually(lambda: all(session(cp, name)["keysDelivered"] == drawn for name in names), timeout=5)
    assert all(session(cp, name)["bitsDelivered"] == drawn * 256 for name in names)
    events = paper.km_events(cp.network.endpoints)
    assert "relayed key received" in [e["event"] for e in events["node-0"]]  # node 0 is the trusted relay


async def test_a_session_over_its_sla_is_rejected_with_the_reason(paper_net):
    s = session(paper_net, "session-over-sla")
    assert s["phase"] == "Rejected" and s["reason"] == "KeyRateAboveSLA", s
    assert s["reservedBps"] == 0


async def test_a_killed_km_is_restarted_and_its_sessions_continue(paper_net):
    cp = paper_net
    proc = cp.network.processes["km-node-1"]
    before = proc.restarts
    proc.popen.kill()
    await eventually(lambda: proc.restarts == before + 1 and proc.popen.poll() is None, timeout=20)
    await keys_match(cp, "sae-0", "sae-1")  # retryable 503s at most, never a mismatch


async def test_node_loss_holds_sessions_without_alternative_and_resumes_them(paper_net):
    cp = paper_net
    cp.paused.add("node-0")
    cp.network.processes["km-node-0"].popen.kill()
    await eventually(lambda: session(cp, "session-2-3")["state"] == "Held", timeout=20)
    assert "node-0" in session(cp, "session-2-3")["message"] or session(cp, "session-2-3")["reason"]
    assert session(cp, "session-4-5")["state"] == "Active"  # its own link does not cross node 0
    await keys_match(cp, "sae-4", "sae-5")
    cp.paused.discard("node-0")  # the supervisor brings the node back
    await eventually(lambda: session(cp, "session-2-3")["state"] == "Active", timeout=30)
    await keys_match(cp, "sae-2", "sae-3")


async def test_qber_spike_marks_the_link_down_raises_an_alarm_and_reroutes(paper_net):
    cp = paper_net
    link_control(cp.network, "link-4-5", qber=0.2)
    try:
        await eventually(lambda: session(cp, "session-4-5")["path"] == ["node-4", "node-0", "node-5"], timeout=20)
        link = next(l for l in cp.core.links() if l["name"] == "link-4-5")
        assert link["state"] == "Down"
        assert [a.link for a in cp.core.alarms()] == ["link-4-5"]
        await keys_match(cp, "sae-4", "sae-5")  # now relayed through node 0
    finally:
        link_control(cp.network, "link-4-5", qber=0.02)


async def test_a_session_whose_peer_never_registers_reserves_nothing_and_expires(paper_net):
    cp = paper_net
    info = cp.network.endpoints["saes"]["sae-0"]
    ctx = client_context(_files(cp, "sae-0"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        url = cp.network.endpoints["nodes"][info["node"]]["etsi014_url"] + "/api/v1/etsi004/open_connect"
        # A fresh Key_stream_ID agreed out of band: a new session, not the declared one.
        body = {"source": "sae-0", "destination": "sae-1", "QoS": {"Timeout": 200}, "Key_stream_ID": str(uuid.uuid4())}
        async with s.post(url, json=body) as r:
            opened = await r.json()
    assert opened["status"] == 1
    waiting = next(x for x in cp.core.sessions() if x["sessionId"] == opened["Key_stream_ID"])
    assert waiting["phase"] == "Accepted" and waiting["reservedBps"] == 0 and waiting["path"] == []
    await eventually(lambda: next(x for x in cp.core.sessions()
                                  if x["sessionId"] == opened["Key_stream_ID"])["reason"] == "PeerNotRegistered",
                     timeout=10)


async def test_status_api_and_etsi015_view(paper_net):
    # The status server runs on this test's event loop: block only worker threads.
    status_url = paper_net.network.endpoints["control"]["status_url"]

    def read(url):
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    view = (await asyncio.to_thread(read, status_url + "/restconf/data/etsi-qkd-sdn-node:qkd_node?node=node-0"))[
        "etsi-qkd-sdn-node:qkd_node"]
    assert {"qkdn_id", "qkdn_status", "qkd_links", "qkd_applications"} <= set(view)
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-P", "-m", "vqkd.operator.cli", "get", "links",
                                                   "--state-dir", str(paper_net.network.state_dir)],
                                  capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "link-4-5" in out.stdout and "STATE" in out.stdout, out.stderr
    users = {u["name"]: u for u in await asyncio.to_thread(read, status_url + "/users")}
    sessions = [s for s in paper_net.core.sessions() if s["user"] == "user-0-1" and s["state"] != "Terminated"]
    assert users["user-0-1"]["sessions"] == len(sessions) >= 1 and users["user-0-1"]["saeIds"] == ["sae-0", "sae-1"]
    assert users["user-0-1"]["keysDelivered"] == sum(s["keysDelivered"] for s in sessions) > 0
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-P", "-m", "vqkd.operator.cli", "get", "users",
                                                   "--state-dir", str(paper_net.network.state_dir)],
                                  capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.split("\n")[0].split()[:3] == ["USER", "ENABLED", "SAES"], out.stderr


async def test_each_km_of_vqkd_up_offers_and_enforces_the_key_limits_of_its_node(tmp_path):
    network = LocalNetwork(load_text(LIMITED, "limited.yaml"), tmp_path, log_level="INFO")
    await asyncio.to_thread(network.start)
    try:
        endpoints = network.endpoints
        async with sae_client(endpoints, "sae-a") as alice, sae_client(endpoints, "sae-b") as bob:
            status = await alice.status("sae-b")
            assert (status.key_size, status.min_key_size, status.max_key_size, status.max_key_per_request) == (
                512, 128, 1024, 4)
            status = await bob.status("sae-a")  # bob's node sets no limits: the defaults
            assert (status.key_size, status.min_key_size, status.max_key_size, status.max_key_per_request) == (
                256, 64, 8192, 1024)
            with pytest.raises(ETSI014Error) as refused:
                await alice.enc_keys("sae-b", 5, 512)
            assert (refused.value.status, refused.value.message) == (
                400, "number must be between 1 and max_key_per_request=4, got 5")
            with pytest.raises(ETSI014Error) as refused:
                await alice.enc_keys("sae-b", 1, 2048)
            assert (refused.value.status, refused.value.message) == (
                400, "size must be between min_key_size=128 and max_key_size=1024 bits, got 2048")
            await wait_stored(alice, "sae-b", 4 * 512)
        # A request naming no size gets keys of the node's keySize.
        ctx = client_context(sae_tls(endpoints, "sae-a"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.get(endpoints["nodes"]["alice"]["etsi014_url"] + "/api/v1/keys/sae-b/enc_keys") as r:
                assert r.status == 200, await r.text()
                (key,) = (await r.json())["keys"]
        assert len(base64.b64decode(key["key"])) * 8 == 512
    finally:
        await asyncio.to_thread(network.stop)


async def test_the_kms_of_vqkd_up_start_with_their_identity_and_it_is_up_once_each_holds_its_topology(tmp_path):
    network = LocalNetwork(load_text(LIMITED, "limited.yaml"), tmp_path, log_level="INFO", control_plane="auto")
    cp = LocalControlPlane(network)
    published = network.publish
    at_publish: dict[str, int] = {}

    def publish() -> None:
        for node, ends in network.endpoints["nodes"].items():
            with urllib.request.urlopen(ends["metrics_url"].removesuffix("/metrics") + "/healthz", timeout=5) as r:
                at_publish[node] = json.loads(r.read())["topologyVersion"]
        published()

    network.publish = publish
    await cp.start()
    try:
        for node in ("alice", "bob"):
            config = json.loads(network.processes[f"km-{node}"].config.read_text())
            assert "topology" not in config or config["topology"] is None, f"{node}'s file holds its identity only"
        assert at_publish == {node: cp.host.topologies.held(node).version for node in ("alice", "bob")}
        assert all(version > 0 for version in at_publish.values())
        async with sae_client(network.endpoints, "sae-a") as alice:
            status = await alice.status("sae-b")  # the node's limits, pushed
            assert (status.key_size, status.max_key_per_request) == (512, 4)
            await wait_stored(alice, "sae-b", 4 * 512)
    finally:
        await cp.stop()


def _files(cp, sae):
    from vqkd.km.tls import TLSFiles

    info = cp.network.endpoints["saes"][sae]
    return TLSFiles(Path(cp.network.endpoints["ca_cert"]), Path(info["cert"]), Path(info["key"]))
