"""KM replicas and their autoscaler: the kopf operator in-process against the kmock API server.

The operator runs as ``vqkd operator`` runs it (see ``operator_harness``), with no KM
processes: what is checked is what it writes to the API server. kmock emulates no
subresource but status — a PATCH to ``qkdnodes/<name>/scale`` lands on the QKDNode as it
is, not on ``spec.km.replicas`` — so ``kubectl scale qkdnode n0 --replicas=3`` is stood in
for by the change the API server makes of it: ``spec.km.replicas`` set to 3. And no
controllers run, so the StatefulSet's status is written here, as its controller would.
"""

from __future__ import annotations

import time

import pytest

from conftest import free_port
from operator_harness import ApiServer, InProcessOperator, manifests
from test_operator_kopf import wait_for
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
