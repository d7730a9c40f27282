"""The local runtime's KM replicas, planned: one process per replica of each node, sharing the
node's ETSI 014 port (SO_REUSEPORT) with a gRPC and metrics port each; ``replan`` starting the
replicas a node gains and stopping those it loses, and nothing else.

Planned, with two replicas and more; running, with one replica per node: KMs binding their
ETSI 014 port with SO_REUSEPORT is the KM's part.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from test_km_control_plane import eventually
from vqkd.km.config import KMConfig
from vqkd.operator.local import status
from vqkd.operator.local.processes import LocalNetwork, km_process
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.plan import km_topology
from vqkd.operator.resources.loader import load_text

NETWORK = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: a}}
spec: {{saeIds: [sae-a], km: {{replicas: {a}}}}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: b}}
spec: {{saeIds: [sae-b]}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: a-b}}
spec:
  nodes: [a, b]
  emulated: {{keyRateBps: 100000, qber: 0.01}}
"""


def manifest(replicas_at_a: int):
    return load_text(NETWORK.format(a=replicas_at_a), "replicas-test")


def config(network: LocalNetwork, name: str) -> KMConfig:
    return KMConfig.model_validate_json(network.processes[name].config.read_text())


def test_each_replica_is_a_process_with_its_own_grpc_and_metrics_on_the_node_s_etsi014_port(tmp_path):
    network = LocalNetwork(manifest(2), tmp_path, control_plane="auto")
    network.plan()
    assert sorted(network.processes) == ["km-a", "km-a.1", "km-b", "link-a-b"]
    assert (network.processes["km-a.1"].km, network.processes["km-a"].km) == (("a", 1), ("a", 0))
    first, second = config(network, "km-a"), config(network, "km-a.1")
    assert (first.replica, second.replica) == (0, 1)
    assert first.etsi014_listen == second.etsi014_listen, "one KME: both replicas bind its port"
    assert first.grpc_listen != second.grpc_listen and first.metrics_listen != second.metrics_listen
    assert all(config(network, name).etsi014_reuse_port for name in ("km-a", "km-a.1", "km-b"))
    assert first.topology is None, "the control plane pushes it"
    published = network.endpoints["nodes"]["a"]
    assert [replica["grpc"] for replica in published["replicas"]] == [first.grpc_listen, second.grpc_listen]
    assert published["grpc"] == published["replicas"][0]["grpc"]
    assert published["etsi014_url"] == f"https://{first.etsi014_listen}"
    to_a = km_topology(network.manifest, "b", network.addressing).links
    assert [(end.name, end.peer_replica, end.peer_grpc) for end in to_a] == [
        ("a-b", 0, first.grpc_listen), ("a-b", 1, second.grpc_listen)], "b has an end towards each replica of a"
    assert km_topology(network.manifest, "a", network.addressing).replicas == {
        0: first.grpc_listen, 1: second.grpc_listen}


def test_a_node_scaled_up_starts_only_its_new_replicas_and_scaled_down_stops_only_the_last(tmp_path):
    network = LocalNetwork(manifest(2), tmp_path, control_plane="auto")
    network.plan()
    before = {name: proc.config.read_text() for name, proc in network.processes.items()}
    grown = network.replan(manifest(3))
    assert (grown.start, grown.restart, grown.stop, grown.retune) == ([km_process("a", 2)], [], [], {})
    assert {name: network.processes[name].config.read_text() for name in before} == before, "nothing else changes"
    third = config(network, "km-a.2")
    assert third.replica == 2 and third.etsi014_listen == config(network, "km-a").etsi014_listen
    assert len(network.endpoints["nodes"]["a"]["replicas"]) == 3
    shrunk = network.replan(manifest(1))
    assert (shrunk.start, shrunk.restart, shrunk.stop) == ([], [], ["km-a.1", "km-a.2"])
    assert len(network.endpoints["nodes"]["a"]["replicas"]) == 1
    network.retire(shrunk.stop)
    assert sorted(network.processes) == ["km-a", "km-b", "link-a-b"]
    assert len(network.addressing.km_ports["a"].replicas) == 1, "the stopped replicas' ports given back"
    again = network.replan(manifest(2))
    assert (again.start, again.stop) == (["km-a.1"], [])


def test_a_change_undone_keeps_the_replicas_running_on_their_ports(tmp_path):
    """What ``vqkd apply`` does when a new process does not start: plan the running network again."""
    network = LocalNetwork(manifest(2), tmp_path, control_plane="auto")
    network.plan()
    running = config(network, "km-a.1")
    network.replan(manifest(1))  # the replica to stop is still running until the change completes
    undo = network.replan(manifest(2))
    assert (undo.start, undo.restart, undo.stop) == ([], [], [])
    assert config(network, "km-a.1") == running


def replica_gauges(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, sample.labels["node"]): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("vqkd_control_km_replicas")}


async def test_a_running_network_shows_each_node_s_ready_and_desired_replicas_and_restarts_a_dead_one(tmp_path):
    network = LocalNetwork(manifest(1), tmp_path, log_level="INFO", control_plane="auto")
    cp = LocalControlPlane(network)
    await cp.start()
    try:
        await eventually(lambda: [row["ready"] for row in cp.host.nodes()] == ["1/1", "1/1"], timeout=10)
        published = json.loads((tmp_path / "endpoints.json").read_text())
        assert [len(published["nodes"][node]["replicas"]) for node in "ab"] == [1, 1]
        rows = await asyncio.to_thread(status.fetch, tmp_path, "nodes")
        assert [(row["name"], row["ready"], row["readyReplicas"], row["replicas"]) for row in rows] == [
            ("a", "1/1", 1, 1), ("b", "1/1", 1, 1)]
        assert "READY" in status.table(rows, status.COLUMNS["nodes"]).splitlines()[0]
        metrics = f"{published['control']['status_url']}/metrics"
        assert await asyncio.to_thread(replica_gauges, metrics) == {
            ("vqkd_control_km_replicas", "a"): 1, ("vqkd_control_km_replicas_ready", "a"): 1,
            ("vqkd_control_km_replicas", "b"): 1, ("vqkd_control_km_replicas_ready", "b"): 1}
        proc = network.processes["km-a"]
        incarnation = cp.host.replica_liveness("a", 0).incarnation
        proc.popen.kill()

        def replaced_and_configured() -> bool:
            seen, held = cp.host.replica_liveness("a", 0), cp.host.topologies.held("a", 0)
            return (proc.restarts == 1 and seen.ok and seen.incarnation != incarnation
                    and held.incarnation == seen.incarnation)

        await eventually(replaced_and_configured, timeout=30)
        assert [row["ready"] for row in cp.host.nodes()] == ["1/1", "1/1"]
    finally:
        await cp.stop()
