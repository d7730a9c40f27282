"""KM replicas and their autoscaler: the kopf operator in-process against the kmock API server.

The operator runs as ``vqkd operator`` runs it (see ``operator_harness``), at first with no
KM processes: what is checked is what it writes to the API server. kmock emulates no
subresource but status — a PATCH to ``qkdnodes/<name>/scale`` lands on the QKDNode as it
is, not on ``spec.km.replicas`` — so ``kubectl scale qkdnode n0 --replicas=3`` is stood in
for by the change the API server makes of it: ``spec.km.replicas`` set to 3. And no
controllers run, so the StatefulSet's status is written here, as its controller would.

The last test runs a node's two replicas as real KM processes in place of its pods (the
harness of ``test_operator_kopf``): the operator configures each one, and the node serves
its SAEs as one KME.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import grpc
import pytest

from conftest import free_port
from operator_harness import ApiServer, InProcessOperator, manifests
from test_km_etsi014 import client, enc_keys_retrying
from test_operator_kopf import Cluster, wait_for
from vqkd.km import identity
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.kopf.endpoints import LocalEndpoints
from vqkd.operator.kopf.kube import HORIZONTALPODAUTOSCALERS, STATEFULSETS, VQKD
from vqkd.operator.kopf.runtime import OperatorOptions

NAMESPACE = "qkd"
NETWORK = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n0}
spec: {saeIds: [sae-n0]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n1}
spec: {saeIds: [sae-n1]}
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    directory = tmp_path_factory.mktemp("replicas")
    server = ApiServer(directory / "api", NAMESPACE)
    (directory / "api").mkdir()
    server.start()
    kube = server.client()
    # No KM answers: the operator's view of the KMs is not what these tests look at.
    endpoints = LocalEndpoints({"nodes": {node: {"grpc": f"127.0.0.1:{free_port()}",
                                                 "etsi014_url": f"https://127.0.0.1:{free_port()}",
                                                 "metrics_url": f"http://127.0.0.1:{free_port()}/metrics"}
                                          for node in ("n0", "n1")}})
    operator = InProcessOperator(OperatorOptions(
        namespace=NAMESPACE, kubeconfig=str(server.kubeconfig), control_plane_listen=f"127.0.0.1:{free_port()}",
        metrics_listen=None, liveness_endpoint=f"http://127.0.0.1:{free_port()}/healthz", endpoints=endpoints,
        state_dir=directory / "operator", poll_interval_s=0.5, replace_after_s=600, workload_check_s=0.3,
        retry_delay_s=0.5,
    ))
    operator.start()
    try:
        for document in manifests(NETWORK):
            kube.create(VQKD[document["kind"]], document)
        yield kube
    finally:
        operator.stop()
        kube.close()
        server.stop()
    assert not operator.errors, operator.errors


def replicas_of(kube, node: str) -> int | None:
    statefulset = kube.get(STATEFULSETS, f"vqkd-km-{node}")
    return statefulset["spec"]["replicas"] if statefulset else None


def test_spec_km_replicas_drives_the_statefulset_as_kubectl_scale_would(api):
    wait_for(lambda: replicas_of(api, "n0") == 1, what="the StatefulSet of n0 at one replica")
    api.patch(VQKD["QKDNode"], "n0", {"spec": {"km": {"replicas": 3}}})
    wait_for(lambda: replicas_of(api, "n0") == 3, what="the StatefulSet of n0 at three replicas")
    statefulset = api.get(STATEFULSETS, "vqkd-km-n0")
    assert statefulset["spec"]["serviceName"] == "vqkd-km-n0-dns"
    assert replicas_of(api, "n1") == 1
    api.patch(VQKD["QKDNode"], "n0", {"spec": {"km": {"replicas": 1}}})
    wait_for(lambda: replicas_of(api, "n0") == 1, what="the StatefulSet of n0 back at one replica")


def test_autoscaling_creates_an_autoscaler_owned_by_the_node_and_removing_it_removes_it(api):
    api.patch(VQKD["QKDNode"], "n0", {"spec": {"km": {"autoscaling": {
        "minReplicas": 1, "maxReplicas": 4, "target": {"requestsPerSecond": 150}}}}})
    hpa = wait_for(lambda: api.get(HORIZONTALPODAUTOSCALERS, "vqkd-km-n0"), what="the autoscaler of n0")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "vqkd.io/v1alpha1", "kind": "QKDNode", "name": "n0"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "150"}
    owner = hpa["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("QKDNode", "n0", api.get(VQKD["QKDNode"], "n0")["metadata"]["uid"])
    api.patch(VQKD["QKDNode"], "n0", {"spec": {"km": {"autoscaling": {"maxReplicas": 6}}}})
    wait_for(lambda: api.get(HORIZONTALPODAUTOSCALERS, "vqkd-km-n0")["spec"]["maxReplicas"] == 6,
             what="the autoscaler following maxReplicas")
    assert api.get(HORIZONTALPODAUTOSCALERS, "vqkd-km-n1") is None
    api.patch(VQKD["QKDNode"], "n0", {"spec": {"km": {"autoscaling": None}}})
    wait_for(lambda: api.get(HORIZONTALPODAUTOSCALERS, "vqkd-km-n0") is None, what="the autoscaler of n0 removed")


def test_the_node_status_shows_ready_and_desired_replicas_from_its_statefulset(api):
    api.patch(VQKD["QKDNode"], "n0", {"spec": {"km": {"replicas": 2}}})
    wait_for(lambda: replicas_of(api, "n0") == 2, what="the StatefulSet of n0 at two replicas")
    api.patch(STATEFULSETS, "vqkd-km-n0", {"status": {"replicas": 2, "readyReplicas": 1}}, "status")

    def shown():
        node = api.get(VQKD["QKDNode"], "n0")
        status = node.get("status") or {}
        return node if (status.get("replicas"), status.get("readyReplicas")) == (2, 1) else None

    node = wait_for(shown, what="QKDNode n0 showing 1 of 2 replicas ready")
    assert node["spec"]["km"]["replicas"] == 2  # desired, the scale subresource's spec.replicas
    assert node["status"]["selector"] == "app.kubernetes.io/instance=n0,app.kubernetes.io/name=vqkd-km"
    started = time.monotonic()
    api.patch(STATEFULSETS, "vqkd-km-n0", {"status": {"readyReplicas": 2}}, "status")
    wait_for(lambda: api.get(VQKD["QKDNode"], "n0")["status"]["readyReplicas"] == 2, what="both replicas ready")
    print(f"\nStatefulSet status -> QKDNode status in {time.monotonic() - started:.2f} s")


# --- with real KM processes ---------------------------------------------------------------

REPLICATED = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n0}
spec: {saeIds: [sae-n0], km: {replicas: 2}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n1}
spec: {saeIds: [sae-n1]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: n0-n1}
spec:
  nodes: [n0, n1]
  emulated: {keyRateBps: 4000000, qber: 0.01}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: lab}
spec: {saeIds: [sae-n0, sae-n1]}
"""


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """The operator against kmock with the pods of a node at two replicas run as real KM processes."""
    c = Cluster(tmp_path_factory.mktemp("replicated"), pods=REPLICATED)
    try:
        c.start()
        c.apply(REPLICATED)
        yield c
    finally:
        c.stop()
    assert not c.operator.errors, c.operator.errors


def replica_healthz(c: Cluster, replica: int) -> dict:
    url = c.network.endpoints["nodes"]["n0"]["replicas"][replica]["metrics_url"].rsplit("/", 1)[0] + "/healthz"
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def replica_sessions(c: Cluster, replica: int) -> set[str]:
    tls = c.network._tls(identity.controller()).files()
    address = c.network.endpoints["nodes"]["n0"]["replicas"][replica]["grpc"]
    with grpc.secure_channel(address, grpc_channel_credentials(tls)) as channel:
        reply = km_pb2_grpc.KeyManagerControlStub(channel).ListSessions(km_pb2.ListSessionsRequest(), timeout=2)
    return {info.config.session_id for info in reply.sessions if info.state != "TERMINATED"}


async def test_the_operator_configures_every_replica_and_the_node_serves_as_one_kme(replicated):
    c = replicated
    await asyncio.to_thread(wait_for, lambda: all(replica_healthz(c, r)["topologyVersion"] for r in (0, 1)),
                            what="both replicas of n0 holding a topology the operator pushed")
    # Keys for sae-n0 are held by n0's replicas and taken at whichever its connection reaches.
    for _ in range(8):
        async with client(c.network, "sae-n1") as master, client(c.network, "sae-n0") as slave:
            sent = await enc_keys_retrying(master, "sae-n0", 2, 256)
            assert await slave.dec_keys("sae-n1", [key_id for key_id, _ in sent]) == sent
    sessions = [replica_sessions(c, r) for r in (0, 1)]
    assert sessions[0] and sessions[0] == sessions[1], "the session is configured at both replicas"
    assert replicas_of(c.kube, "n0") == 2
