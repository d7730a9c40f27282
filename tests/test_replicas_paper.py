"""The paper's network with its hub, node-0, run as two KM replicas: real processes on loopback.

node-0 relays session 2–3 and is an endpoint of 0–1 (master at node-0) and of 1–0 (an ETSI
014 pair whose slave is at node-0, so its keys are held by node-0's replicas); 4–5 does not
touch it. Under continuous round trips one node-0 replica is SIGKILLed: no key mismatches,
no key a master received is lost (but those of a dec_keys the killed replica was answering:
a key is handed out at most once), requests fail only while the replica is away, and it
comes back without restarting anything else. Then node-0 is scaled to one replica, to three and
back to one with ``vqkd apply`` while the pairs draw keys: the pair not through node-0 sees no
failed request.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from test_km_control_plane import eventually
from test_local_reconfigure import PAPER, healthz, vqkd
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local import paper
from vqkd.operator.local.paper import RoundTrips
from vqkd.operator.local.processes import LocalNetwork, km_process
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.resources.loader import load_text

pytestmark = pytest.mark.asyncio(loop_scope="module")

NODE_0 = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: node-0}}
spec: {{saeIds: [sae-0], km: {{replicas: {replicas}}}}}
"""
# A replica is back within this after its process died (supervision, start, topology, sessions).
BACK_WITHIN_S = 15.0
# Requests of a pair through node-0 may fail from the kill until the replica is back and
# configured, plus this: the requests already on their way when it came back.
SETTLE_S = 1.0
DEC_RETRY_S = 5.0
# A key is handed out at most once (README): a dec_keys the killed replica had taken the keys
# for but not answered loses them. Such a call began shortly before the kill.
IN_FLIGHT_S = 1.0


def paper_with_node_0_at(replicas: int):
    text = PAPER.read_text().split("---")
    text[0] = text[0].split("apiVersion")[0] + NODE_0.format(replicas=replicas)
    return load_text("---".join(text), "paper with node-0 replicated")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(tmp_path_factory):
    network = LocalNetwork(paper_with_node_0_at(2), tmp_path_factory.mktemp("hub"), log_level="INFO",
                           control_plane="auto")
    cp = LocalControlPlane(network, admission=AdmissionSettings(inactivity_timeout_s=600))
    await cp.start()
    await paper.wait_active(cp, ["session-0-1", "session-2-3", "session-4-5"])
    yield cp
    await cp.stop()


def pairs() -> dict[str, RoundTrips]:
    return {name: RoundTrips(master, slave, dec_retry_s=DEC_RETRY_S)
            for name, master, slave in (("0-1", "sae-0", "sae-1"), ("1-0", "sae-1", "sae-0"),
                                        ("2-3", "sae-2", "sae-3"), ("4-5", "sae-4", "sae-5"))}


async def warmed(cp: LocalControlPlane) -> dict[str, RoundTrips]:
    drawing = pairs()
    for pair in drawing.values():
        assert await pair.until_first_key(cp.network.endpoints, timeout_s=30), pair.failures[-3:]
        pair.ok, pair.failures, pair.lost, pair.lost_at = 0, [], 0, []
    return drawing


def relayed_bits(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "vqkd_km_relayed_bits" for sample in family.samples
               if sample.name == "vqkd_km_relayed_bits_total" and sample.labels["role"] == "intermediate")


def replica_healthz(cp: LocalControlPlane, replica: int) -> dict:
    url = cp.network.endpoints["nodes"]["node-0"]["replicas"][replica]["metrics_url"].rsplit("/", 1)[0] + "/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def replica_metrics(cp: LocalControlPlane) -> list[str]:
    return [replica["metrics_url"] for replica in cp.network.endpoints["nodes"]["node-0"]["replicas"]]


async def test_relays_through_the_hub_spread_over_its_replicas_with_identical_keys(hub):
    cp = hub
    before = [relayed_bits(url) for url in replica_metrics(cp)]
    relayed = RoundTrips("sae-2", "sae-3")
    stop = asyncio.Event()
    task = asyncio.create_task(relayed.run(cp.network.endpoints, stop, pause_s=0.02))
    await asyncio.sleep(4.0)
    stop.set()
    await task
    assert relayed.ok > 20 and relayed.mismatched == 0 and relayed.failures == [], relayed
    after = [relayed_bits(url) for url in replica_metrics(cp)]
    assert all(b > a for a, b in zip(before, after)), f"both replicas relay: {before} -> {after}"


async def test_a_hub_replica_killed_under_load_loses_no_key_and_comes_back(hub):
    cp = hub
    endpoints = cp.network.endpoints
    others = {node: healthz(endpoints, node)["incarnation"] for node in ("node-1", "node-2", "node-3", "node-4")}
    survivor = replica_healthz(cp, 0)["incarnation"]
    victim = cp.network.processes[km_process("node-0", 1)]
    killed_incarnation = replica_healthz(cp, 1)["incarnation"]
    drawing = await warmed(cp)
    stop = asyncio.Event()
    load = [asyncio.create_task(pair.run(endpoints, stop)) for pair in drawing.values()]
    try:
        await asyncio.sleep(1.0)
        counts_before = {name: pair.ok for name, pair in drawing.items()}
        await asyncio.sleep(3.0)
        rate_before = {name: (pair.ok - counts_before[name]) / 3.0 for name, pair in drawing.items()}
        killed_at = time.monotonic()
        victim.popen.kill()

        def back() -> bool:
            seen = cp.host.replica_liveness("node-0", 1)
            held = cp.host.topologies.held("node-0", 1)
            return bool(seen.ok and seen.incarnation != killed_incarnation and held is not None
                        and held.incarnation == seen.incarnation)

        await eventually(back, timeout=BACK_WITHIN_S)
        back_at = time.monotonic()
        await asyncio.sleep(SETTLE_S)
        counts_at_settled = {name: pair.ok for name, pair in drawing.items()}
        await asyncio.sleep(3.0)
        rate_after = {name: (pair.ok - counts_at_settled[name]) / 3.0 for name, pair in drawing.items()}
    finally:
        stop.set()
        await asyncio.gather(*load)

    window = back_at - killed_at
    print(f"\nreplica node-0/1 killed: back and configured after {window:.2f} s; "
          + ", ".join(f"{name}: {pair.ok} keys, {len(pair.failures)} failed, {pair.lost} lost in flight, "
                      f"{rate_before[name]:.1f} -> {rate_after[name]:.1f} keys/s" for name, pair in drawing.items()))
    for name, pair in drawing.items():
        assert pair.mismatched == 0, (name, pair)
        in_flight = [at for at in pair.lost_at if killed_at - IN_FLIGHT_S <= at <= killed_at]
        assert pair.lost_at == in_flight, (name, "keys lost beyond a dec_keys in flight at the kill",
                                           pair.failures)
        late = [f"+{at - back_at:.2f} s: {what}" for at, what in pair.failures if at > back_at + SETTLE_S]
        assert late == [], (name, late)
        assert rate_after[name] >= 0.5 * rate_before[name], \
            f"{name} draws at full rate again: {rate_before[name]:.1f} keys/s before, {rate_after[name]:.1f} after"
    assert drawing["4-5"].failures == [], "a pair not through node-0 sees nothing"
    assert victim.restarts == 1
    assert replica_healthz(cp, 0)["incarnation"] == survivor, "the other replica went on"
    assert {node: healthz(endpoints, node)["incarnation"] for node in others} == others, "nothing else restarted"


async def test_the_hub_scales_from_one_replica_to_three_and_back_live(hub):
    cp = hub
    endpoints = cp.network.endpoints
    others = {node: healthz(endpoints, node)["incarnation"] for node in ("node-4", "node-5")}
    drawing = await warmed(cp)
    stop = asyncio.Event()
    load = [asyncio.create_task(pair.run(endpoints, stop)) for pair in drawing.values()]
    manifest = cp.network.state_dir / "node-0.yaml"
    try:
        for replicas in (1, 3, 1):
            manifest.write_text(NODE_0.format(replicas=replicas))
            out = await vqkd(cp, "apply", str(manifest))
            assert out.stdout.strip() == "qkdnode/node-0 configured", out.stderr
            await eventually(lambda: next(n for n in cp.host.nodes() if n["name"] == "node-0")["ready"]
                             == f"{replicas}/{replicas}", timeout=20)
            out = await vqkd(cp, "get", "nodes", "-o", "json")
            row = next(n for n in json.loads(out.stdout) if n["name"] == "node-0")
            assert (row["readyReplicas"], row["replicas"]) == (replicas, replicas), row
            assert len(json.loads((cp.network.state_dir / "endpoints.json").read_text())["nodes"]["node-0"][
                "replicas"]) == replicas
            await asyncio.sleep(2.0)
    finally:
        stop.set()
        await asyncio.gather(*load)
    assert sorted(name for name in cp.network.processes if name.startswith("km-node-0")) == ["km-node-0"]
    assert drawing["4-5"].failures == [] and drawing["4-5"].ok > 20, drawing["4-5"]
    for name, pair in drawing.items():
        assert pair.mismatched == 0 and pair.lost == 0, (name, pair)
        assert pair.ok > 10, (name, pair)
    assert {node: healthz(endpoints, node)["incarnation"] for node in others} == others
