"""Changing the paper's network while it runs (``vqkd apply`` / ``vqkd delete``), real processes.

Three pairs of applications draw keys over ETSI 014 all along (0–1, 2–3 relayed by node 0,
4–5) while a new site is added (node-6 linked to node-0, with its own user, SAE and
session), node-5 gets a second SAE, link-4-5 is deleted (session 4–5 goes through node-0)
and the new site goes again. The pairs whose path did not change see no failed request and
no mismatched key; no original KM restarts, no untouched link loses key.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from test_km_control_plane import eventually
from vqkd.km.etsi014.client import ETSI014Error
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local import paper
from vqkd.operator.local.clients import sae_client
from vqkd.operator.local.paper import RoundTrips
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.resources.loader import load_files

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "examples" / "paper.yaml"
ORIGINAL_NODES = [f"node-{n}" for n in range(6)]
UNTOUCHED_LINKS = ["link-0-1", "link-0-2", "link-0-3", "link-0-4", "link-0-5"]
NEW_KEYS_WITHIN_S = 2.0

NODE_6 = (ROOT / "examples" / "paper-new-site.yaml").read_text()
NODE_5_TWO_SAES = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: node-5}
spec: {saeIds: [sae-5, sae-5b]}
"""
LINK_4_5 = PAPER.read_text().split("---")[11]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def paper_net(tmp_path_factory):
    network = LocalNetwork(load_files([PAPER]), tmp_path_factory.mktemp("reconfigure"), log_level="INFO",
                           control_plane="auto")
    cp = LocalControlPlane(network, admission=AdmissionSettings(inactivity_timeout_s=600))
    await cp.start()
    await paper.wait_active(cp, ["session-0-1", "session-2-3", "session-4-5"])
    yield cp
    await cp.stop()


async def vqkd(cp: LocalControlPlane, *args: str) -> subprocess.CompletedProcess:
    """The vqkd command, as an operator runs it, against the network of ``cp``."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-P", "-m", "vqkd.operator.cli", *args, "--state-dir",
                         str(cp.network.state_dir)], capture_output=True, text=True, timeout=180)


def manifest(cp: LocalControlPlane, name: str, text: str) -> str:
    path = cp.network.state_dir / name
    path.write_text(text)
    return str(path)


def healthz(endpoints: dict, node: str) -> dict:
    url = endpoints["nodes"][node]["metrics_url"].rsplit("/", 1)[0] + "/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def flushed_bits(endpoints: dict, node: str) -> dict[str, float]:
    with urllib.request.urlopen(endpoints["nodes"][node]["metrics_url"], timeout=5) as response:
        text = response.read().decode()
    return {sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(text) if family.name == "vqkd_km_flushed_bits"
            for sample in family.samples if sample.name == "vqkd_km_flushed_bits_total"}


async def link_incarnations(cp: LocalControlPlane, nodes: list[str]) -> dict[tuple[str, str], str]:
    """(node, link) -> the incarnation of that node's end of the link: new when its pools were wiped."""
    found = {}
    for node in nodes:
        for link in (await cp.host.kms.stats(node, 0)).links:
            found[node, link.link] = link.incarnation
    return found


async def slave_status(endpoints: dict, master: str, slave: str) -> int:
    async with sae_client(endpoints, master) as client:
        try:
            await client.status(slave)
        except ETSI014Error as e:
            return e.status
        return 200


def session(cp: LocalControlPlane, name: str) -> dict:
    return next(s for s in cp.core.sessions() if s["keySession"] == name)


async def test_an_invalid_change_changes_nothing_and_says_what_is_wrong(paper_net):
    cp = paper_net
    before = (cp.network.state_dir / "endpoints.json").read_text()
    bad = manifest(cp, "bad.yaml", NODE_6.replace("qber: 0.02", "qber: 0.7").replace("[node-0, node-6]",
                                                                                   "[node-0, node-9]"))
    out = await vqkd(cp, "apply", bad)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        "vqkd apply: invalid resources:",
        f"{bad}: document 2 (QKDLink link-0-6): spec.emulated.qber: Input should be less than or equal to 0.5 "
        "(got 0.7)",
    ], out.stderr
    dangling = manifest(cp, "dangling.yaml", NODE_6.replace("[node-0, node-6]", "[node-0, node-9]"))
    out = await vqkd(cp, "apply", dangling)
    assert out.returncode != 0
    assert f"{dangling}: document 2 (QKDLink link-0-6): spec.nodes[1]: no QKDNode named 'node-9'" in out.stderr, \
        out.stderr
    out = await vqkd(cp, "delete", manifest(cp, "node-4.yaml", PAPER.read_text().split("---")[4]))
    assert out.returncode != 0 and "deleting QKDNode node-4 would leave resources that refer to them" in out.stderr
    out = await vqkd(cp, "delete", manifest(cp, "unknown.yaml", NODE_6.split("---")[0]))
    assert out.returncode == 1 and out.stderr.strip() == "vqkd delete: QKDNode node-6 not found", out.stderr
    out = await vqkd(cp, "apply", str(PAPER))
    assert out.returncode == 0 and set(out.stdout.split("\n")[:-1]) == {
        f"{r.kind.lower()}/{r.name} unchanged" for r in load_files([PAPER]).resources()}, out.stdout
    assert (cp.network.state_dir / "endpoints.json").read_text() == before
    assert sorted(cp.network.processes) == sorted([f"km-{n}" for n in ORIGINAL_NODES]
                                                  + [f"link-{link}" for link in load_files([PAPER]).links])


async def test_a_change_whose_processes_do_not_start_is_undone(paper_net, monkeypatch):
    cp = paper_net
    before = (cp.network.state_dir / "endpoints.json").read_text()
    processes = dict(cp.network.processes)

    def never_ready(names, timeout=0.0):
        raise TimeoutError(f"{names[0]} did not answer")

    monkeypatch.setattr(cp.network, "wait_ready", never_ready)
    with pytest.raises(TimeoutError):
        await cp.changes.apply([("node-6.yaml", NODE_6)])
    monkeypatch.undo()
    assert cp.network.processes == processes, "the processes started for the change are stopped again"
    assert "node-6" not in cp.network.manifest.nodes and "node-6" not in cp.network.endpoints["nodes"]
    assert "node-6" not in {n["name"] for n in cp.core.nodes()}
    assert (cp.network.state_dir / "endpoints.json").read_text() == before


async def test_the_network_changes_under_load_without_disturbing_what_it_does_not_touch(paper_net):
    cp = paper_net
    endpoints = cp.network.endpoints
    incarnations = {node: healthz(endpoints, node)["incarnation"] for node in ORIGINAL_NODES}
    links_before = await link_incarnations(cp, ORIGINAL_NODES)
    pairs = {name: RoundTrips(master, slave)
             for name, master, slave in (("0-1", "sae-0", "sae-1"), ("2-3", "sae-2", "sae-3"),
                                         ("4-5", "sae-4", "sae-5"))}
    for pair in pairs.values():  # key in every pool before counting
        assert await pair.until_first_key(endpoints, timeout_s=30), pair.failures[-3:]
        pair.ok, pair.failures = 0, []
    stop = asyncio.Event()
    load = [asyncio.create_task(pair.run(endpoints, stop)) for pair in pairs.values()]
    try:
        await asyncio.sleep(1.0)

        # A new site: its KM, its link's module pair, its user, SAE and session.
        out = await vqkd(cp, "apply", manifest(cp, "node-6.yaml", NODE_6))
        applied_at = time.monotonic()
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:-1] == ["qkdnode/node-6 created", "qkdlink/link-0-6 created",
                                               "userprofile/user-6 created", "keysession/session-6-0 created"]
        on_disk = json.loads((cp.network.state_dir / "endpoints.json").read_text())
        assert "node-6" in on_disk["nodes"] and "link-0-6" in on_disk["links"]
        assert Path(on_disk["saes"]["sae-6"]["cert"]).is_file() and on_disk["saes"]["sae-6"]["node"] == "node-6"
        new_pair = RoundTrips("sae-6", "sae-0")
        first_key = await new_pair.until_first_key(on_disk, timeout_s=10)
        assert first_key is not None, new_pair.failures[-3:]
        assert first_key - applied_at < NEW_KEYS_WITHIN_S, f"first key {first_key - applied_at:.2f} s after apply"
        assert session(cp, "session-6-0")["path"] == ["node-6", "node-0"]
        new_pair_stop = asyncio.Event()
        new_load = asyncio.create_task(new_pair.run(on_disk, new_pair_stop))

        # A second SAE at node-5: every KM learns it, none restarts.
        out = await vqkd(cp, "apply", manifest(cp, "node-5.yaml", NODE_5_TWO_SAES))
        assert out.stdout.strip() == "qkdnode/node-5 configured", out.stderr
        out = await vqkd(cp, "get", "nodes", "-o", "json")
        assert next(n for n in json.loads(out.stdout) if n["name"] == "node-5")["saeIds"] == ["sae-5", "sae-5b"]
        assert await slave_status(endpoints, "sae-2", "sae-5b") == 200, "node-2's KM knows the new SAE"

        # link-4-5 goes: session 4-5 is relayed by node-0 before the link is taken from its KMs.
        out = await vqkd(cp, "delete", manifest(cp, "link-4-5.yaml", LINK_4_5))
        assert out.stdout.strip() == "qkdlink/link-4-5 deleted", out.stderr
        assert session(cp, "session-4-5")["path"] == ["node-4", "node-0", "node-5"]
        assert session(cp, "session-4-5")["state"] == "Active"
        await asyncio.sleep(1.0)

        # The new site goes again, with everything it brought.
        new_pair_stop.set()
        await new_load
        out = await vqkd(cp, "delete", manifest(cp, "node-6.yaml", NODE_6))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:-1] == ["keysession/session-6-0 deleted", "userprofile/user-6 deleted",
                                               "qkdlink/link-0-6 deleted", "qkdnode/node-6 deleted"]
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*load)

    for name in ("0-1", "2-3"):
        pair = pairs[name]
        assert pair.failures == [] and pair.mismatched == 0 and pair.ok > 20, (name, pair)
    assert pairs["4-5"].mismatched == 0 and pairs["4-5"].ok > 20, pairs["4-5"]
    assert new_pair.mismatched == 0

    assert {node: healthz(endpoints, node)["incarnation"] for node in ORIGINAL_NODES} == incarnations
    links_after = await link_incarnations(cp, ORIGINAL_NODES)
    for link in UNTOUCHED_LINKS:
        ends = {key: value for key, value in links_before.items() if key[1] == link}
        assert len(ends) == 2 and all(links_after[key] == value for key, value in ends.items()), link
    for node in ORIGINAL_NODES:
        flushed = flushed_bits(endpoints, node)
        assert flushed["peer_restarted"] == flushed["link_reconfigured"] == 0, (node, flushed)
        if node in ("node-1", "node-2", "node-3"):
            assert flushed["link_removed"] == 0, (node, flushed)

    # Nothing of node-6 left: not on any KM, not in endpoints.json, no process.
    for node in ORIGINAL_NODES:
        stats = await cp.host.kms.stats(node, 0)
        assert all(link.link != "link-0-6" and link.peer_node != "node-6" for link in stats.links), node
        held = (await cp.host.kms.sessions(node, 0)).sessions
        assert all("node-6" not in (s.config.source.node, s.config.destination.node) for s in held), node
        master = next(sae for sae, info in endpoints["saes"].items() if info["node"] == node)
        assert await slave_status(endpoints, master, "sae-6") == 400, f"{node}'s KM still knows sae-6"
    on_disk = json.loads((cp.network.state_dir / "endpoints.json").read_text())
    assert "node-6" not in on_disk["nodes"] and "link-0-6" not in on_disk["links"] and "sae-6" not in on_disk["saes"]
    assert "link-4-5" not in on_disk["links"] and on_disk["saes"]["sae-5b"]["node"] == "node-5"
    assert not {"km-node-6", "link-link-0-6", "link-link-4-5"} & set(cp.network.processes)
    assert "node-6" not in {n["name"] for n in cp.core.nodes()}
    await eventually(lambda: not any(s["keySession"] == "session-6-0" for s in cp.core.sessions()), timeout=2)


async def test_a_changed_link_takes_new_conditions_live_and_its_kms_keep_their_pools(paper_net):
    cp = paper_net
    pids = {name: proc.popen.pid for name, proc in cp.network.processes.items()}
    incarnations = {node: healthz(cp.network.endpoints, node)["incarnation"] for node in ORIGINAL_NODES}
    ends = {key: value for key, value in (await link_incarnations(cp, ["node-0", "node-3"])).items()
            if key[1] == "link-0-3"}
    link = PAPER.read_text().split("---")[8]

    out = await vqkd(cp, "apply", manifest(cp, "link-0-3.yaml", link.replace("keyRateBps: 500000",
                                                                              "keyRateBps: 400000")))
    assert out.stdout.strip() == "qkdlink/link-0-3 configured", out.stderr
    assert {name: proc.popen.pid for name, proc in cp.network.processes.items()} == pids, "nothing restarted"
    module = json.loads(urllib.request.urlopen(cp.network.endpoints["links"]["link-0-3"]["control_url"],
                                               timeout=5).read())
    assert module["key_rate_bps"] == 400000, module
    assert session(cp, "session-2-3")["state"] == "Active"
    assert await RoundTrips("sae-2", "sae-3").until_first_key(cp.network.endpoints, timeout_s=10)

    # A buffer of another size needs a new module process: that one alone starts again.
    bigger = link.replace("emulated: {keyRateBps: 500000, qber: 0.02}",
                          "emulated: {keyRateBps: 400000, qber: 0.02, bufferBits: 1048576}")
    out = await vqkd(cp, "apply", manifest(cp, "link-0-3.yaml", bigger))
    assert out.stdout.strip() == "qkdlink/link-0-3 configured", out.stderr
    restarted = {name for name, proc in cp.network.processes.items() if proc.popen.pid != pids[name]}
    assert restarted == {"link-link-0-3"}
    assert {node: healthz(cp.network.endpoints, node)["incarnation"] for node in ORIGINAL_NODES} == incarnations
    after = await link_incarnations(cp, ["node-0", "node-3"])
    assert all(after[key] == value for key, value in ends.items()), "the KMs kept their pools of the link"
