"""The kopf operator in-process against the kmock API server, with real KM processes as the pods.

One cluster stand-in for the module (see ``operator_harness``): a chain of three nodes
n0 - n1 - n2 with emulated links, one user owning the three SAEs and a declared KeySession
from n0 to n2 (relayed through n1). The tests run in order, as the life of one network:
apply, draw keys, restart the operator, crash a KM, hang a KM, lose a StatefulSet, delete the session,
refuse invalid resources, grow the running network, shrink it again, and change every KM's pod
template at once. The "pods" include those of what the network grows into, started from the
beginning with their identity only, as a pod waiting for its topology.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest

from operator_harness import ApiServer, InProcessOperator, Kubelet, manifests
from conftest import free_port
from test_km_control_plane import get_key_when_connected, post
from test_km_etsi014 import client, enc_keys_retrying
from vqkd.km import identity
from vqkd.km.config import EmulatedLinkConfig, KMConfig
from vqkd.km.domain.devices import TROUBLE_WINDOW_S
from vqkd.km.etsi014.client import ETSI014Error
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.kopf.endpoints import LocalEndpoints
from vqkd.operator.kopf.kube import CONFIGMAPS, DEPLOYMENTS, EVENTS, SECRETS, SERVICES, STATEFULSETS, VQKD, Kube
from vqkd.operator.kopf.runtime import OperatorOptions
from vqkd.operator.kopf.manifests import (
    ANNOTATION_CONFIG_HASH, ANNOTATION_REGISTERED, ANNOTATION_RESTARTED_AT, ANNOTATION_SESSION_ID, LABEL_ORIGIN,
    ORIGIN_APPLICATION, content_hash, template_hash,
)
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_text

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
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n2}
spec: {saeIds: [sae-n2]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: n0-n1}
spec:
  nodes: [n0, n1]
  emulated: {keyRateBps: 4000000, qber: 0.01}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: n1-n2}
spec:
  nodes: [n1, n2]
  emulated: {keyRateBps: 4000000, qber: 0.01}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: lab}
spec: {saeIds: [sae-n0, sae-n1, sae-n2], priority: 2}
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: s02}
spec:
  user: lab
  source: {node: n0, saeId: sae-n0}
  destination: {node: n2, saeId: sae-n2}
  qos: {minBps: 8192, priority: 1}
"""
NODES = ("n0", "n1", "n2")
POLL_S = 0.5
# What the running network gets later: a node n3 with its SAE and user, linked to n0, and an SAE added to n2.
GROWTH = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n3}
spec: {saeIds: [sae-n3]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: n0-n3}
spec:
  nodes: [n0, n3]
  emulated: {keyRateBps: 4000000, qber: 0.01}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: growth}
spec: {saeIds: [sae-n3, sae-n2b]}
"""
N2_SAES = ["sae-n2", "sae-n2b"]
# The pods the "kubelet" can run: those of NETWORK and of what it grows into.
PODS = NETWORK.replace("spec: {saeIds: [sae-n2]}", f"spec: {{saeIds: [{', '.join(N2_SAES)}]}}") + "---" + GROWTH


def wait_for(check, timeout: float = 20.0, what: str = "condition"):
    """Poll ``check`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (KeyError, IndexError, TypeError) as e:  # the object is not there or not complete yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s; last seen: {last!r}")


class Cluster:
    """The operator against kmock, with ``pods`` (a network's manifests) run as real processes
    by a stand-in kubelet in place of the pods it would schedule."""

    def __init__(self, tmp: Path, pods: str = PODS):
        self.api = ApiServer(tmp / "api", NAMESPACE)
        (tmp / "api").mkdir()
        self.api.start()
        self.kube: Kube = self.api.client()
        control_plane = f"127.0.0.1:{free_port()}"
        self.network = LocalNetwork(load_text(pods, "operator-test"), tmp / "net", log_level="INFO",
                                    control_plane=control_plane)
        self.network.plan()
        self.metrics_port = free_port()
        self.options = OperatorOptions(
            namespace=NAMESPACE, kubeconfig=str(self.api.kubeconfig),
            control_plane_listen=control_plane, control_plane_address=control_plane,
            metrics_listen=f"127.0.0.1:{self.metrics_port}", liveness_endpoint=f"http://127.0.0.1:{free_port()}/healthz",
            endpoints=LocalEndpoints(self.network.endpoints), addressing=self.network.addressing,
            state_dir=tmp / "operator",
            poll_interval_s=POLL_S, counts_interval_s=POLL_S, replace_after_s=3.0, workload_check_s=0.3,
            retry_delay_s=0.5,
            admission=AdmissionSettings(inactivity_timeout_s=600, held_retry_s=0.5, held_retry_max_s=1.0),
        )
        self.operator = InProcessOperator(self.options)
        self.kubelet: Kubelet | None = None
        self._grpc: dict[str, grpc.Channel] = {}

    def start(self) -> None:
        self.network.start()  # the pods, already scheduled
        pki = self.network.state_dir / "pki"
        self.kube.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vqkd-ca"},
                                   "data": {name: base64.b64encode((pki / name).read_bytes()).decode()
                                            for name in ("ca.crt", "ca.key")}})
        self.kubelet = Kubelet(self.api.client(), self.network).start()
        self.operator.start()

    def stop(self) -> None:
        for channel in self._grpc.values():
            channel.close()
        if self.operator.thread is not None and self.operator.thread.is_alive():
            self.operator.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        self.network.stop()
        self.kube.close()
        self.api.stop()

    def apply(self, text: str) -> None:
        for document in manifests(text):
            self.kube.create(VQKD[document["kind"]], document)

    def get(self, kind: str, name: str) -> dict | None:
        return self.kube.get(VQKD[kind], name)

    def status(self, kind: str, name: str) -> dict:
        return (self.get(kind, name) or {}).get("status") or {}

    def condition(self, kind: str, name: str, type: str) -> dict | None:
        return next((c for c in self.status(kind, name).get("conditions", []) if c["type"] == type), None)

    def _km(self, node: str) -> km_pb2_grpc.KeyManagerControlStub:
        """The KM of ``node``, asked over gRPC as the control plane."""
        channel = self._grpc.get(node)
        if channel is None:
            tls = self.network._tls(identity.controller()).files()
            channel = self._grpc[node] = grpc.secure_channel(self.network.endpoints["nodes"][node]["grpc"],
                                                             grpc_channel_credentials(tls))
        return km_pb2_grpc.KeyManagerControlStub(channel)

    def km_sessions(self, node: str) -> dict[str, km_pb2.SessionInfo]:
        reply = self._km(node).ListSessions(km_pb2.ListSessionsRequest(), timeout=2)
        return {info.config.session_id: info for info in reply.sessions if info.state != "TERMINATED"}

    def km_stats(self, node: str) -> km_pb2.Stats:
        return self._km(node).GetStats(km_pb2.GetStatsRequest(), timeout=2)

    def km_holds(self, node: str, session_id: str) -> bool:
        try:
            return session_id in self.km_sessions(node)
        except grpc.RpcError:
            return False

    def metric(self, sample: str) -> float:
        """One sample from the operator's /metrics, by name and (if any) labels as exposed; 0 if absent."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def events(self, name: str) -> list[dict]:
        return [e for e in self.kube.list(EVENTS) if e["involvedObject"]["name"] == name]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = time.monotonic()
    c = Cluster(tmp_path_factory.mktemp("operator"))
    try:
        c.start()
        print(f"\ncluster stand-in up in {time.monotonic() - started:.1f} s")
        yield c
    finally:
        c.stop()
    assert not c.kubelet.errors, c.kubelet.errors
    assert not c.operator.errors, c.operator.errors


def active(c: Cluster, name: str):
    status = c.status("KeySession", name)
    return status if status.get("phase") == "Active" else None


def test_resources_become_km_workloads_and_an_active_session(cluster):
    c = cluster
    c.apply(NETWORK)
    status = wait_for(lambda: active(c, "s02"), what="KeySession s02 Active")
    session_id = status["sessionId"]
    assert uuid.UUID(session_id)
    assert status["path"] == ["n0", "n1", "n2"]
    assert status["reservedBps"] == 8192
    assert status["peersRegistered"] == ["sae-n0", "sae-n2"]
    conditions = {cond["type"]: cond for cond in status["conditions"]}
    assert {t: conditions[t]["status"] for t in ("Admitted", "Routed", "Configured", "Ready")} == dict.fromkeys(
        ("Admitted", "Routed", "Configured", "Ready"), "True")
    assert status["observedGeneration"] == c.get("KeySession", "s02")["metadata"]["generation"]
    # Every KM on the path holds its part, with its own hops only.
    for node, (prev, nxt) in zip(NODES, (("", "n1"), ("n0", "n2"), ("n1", ""))):
        held = wait_for(lambda: c.km_sessions(node).get(session_id), what=f"KM {node} configured")
        assert (held.config.prev_hop, held.config.next_hop) == (prev, nxt)

    for node in NODES:
        owner = c.get("QKDNode", node)
        def rolled_out(node=node):
            """The StatefulSet and the ConfigMap it was rendered from (the operator writes them in turn)."""
            statefulset = c.kube.get(STATEFULSETS, f"vqkd-km-{node}")
            configmap = c.kube.get(CONFIGMAPS, f"vqkd-km-{node}")
            if statefulset and configmap and statefulset["spec"]["template"]["metadata"]["annotations"].get(
                    ANNOTATION_CONFIG_HASH) == content_hash(configmap["data"]):
                return statefulset, configmap
            return None

        statefulset, configmap = wait_for(rolled_out, what=f"StatefulSet of {node} rendered from its ConfigMap")
        assert statefulset["spec"]["replicas"] == 1
        reference = statefulset["metadata"]["ownerReferences"][0]
        assert (reference["kind"], reference["name"], reference["uid"], reference["controller"]) == (
            "QKDNode", node, owner["metadata"]["uid"], True)
        config = KMConfig.model_validate_json(configmap["data"]["km.json"])
        template = statefulset["spec"]["template"]
        assert template["spec"]["containers"][0]["image"] == "ghcr.io/vqkd/km:0.1.0"
        assert config.control_plane == c.options.control_plane_address
        assert config.topology is None, "the ConfigMap holds the KM's identity; its topology is pushed"
        # The KM holds its topology, pushed by the operator: its links drawing key.
        stats = wait_for(lambda: (s := c.km_stats(node)).topology_version and s, what=f"KM {node} holding a topology")
        assert {link.link for link in stats.links} == {
            name for name in ("n0-n1", "n1-n2") if node in name.split("-")}
        service = c.kube.get(SERVICES, f"vqkd-km-{node}")
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"etsi014": 8443, "grpc": 9443,
                                                                           "metrics": 9090}
        secret = c.kube.get(SECRETS, f"vqkd-km-{node}-tls")
        assert identity.from_pem(base64.b64decode(secret["data"]["tls.crt"])) == identity.km(node)
        node_status = wait_for(lambda: c.status("QKDNode", node).get("phase") == "Running" and c.status("QKDNode", node),
                               what=f"QKDNode {node} Running")
        assert node_status["ready"] is True
    for link in ("n0-n1", "n1-n2"):
        deployment = c.kube.get(DEPLOYMENTS, f"vqkd-link-{link}")
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
        module = EmulatedLinkConfig.model_validate_json(c.kube.get(CONFIGMAPS, f"vqkd-link-{link}")["data"]["emulator.json"])
        assert module.key_rate_bps == 4_000_000 and [e.sae_id for e in module.ends.values()] == link.split("-")
        # The link shows what its KMs report: Degraded while their start (each refused the
        # other's first calls) is less than a trouble window old, Up after.
        link_status = wait_for(lambda: (s := c.status("QKDLink", link)).get("keyRateBps") and s["state"] == "Up" and s,
                               timeout=TROUBLE_WINDOW_S + 10, what=f"QKDLink {link} measured and Up")
        assert link_status["burnedBits"] == 0
        assert link_status["state"] == "Up" and link_status["reservedBps"] == 8192 and link_status["sessions"] == 1
    assert c.status("UserProfile", "lab")["activeSessions"] == 1
    reasons = wait_for(lambda: {event["reason"] for event in c.events("s02")} >= {"Admitted", "Configured"},
                       what="Events for the session's transitions")
    assert reasons
    assert c.metric('vqkd_operator_reconciles_total{kind="KeySession",result="success"}') >= 1
    assert c.metric('vqkd_control_sessions{phase="Active"}') == 1
    assert c.metric('vqkd_control_push_duration_seconds_count{call="configure"}') >= 3
    with urllib.request.urlopen(c.options.liveness_endpoint, timeout=2) as response:
        assert json.loads(response.read())["kms"] == {"kms": 3, "answering": 3}


async def test_both_saes_draw_the_same_keys_and_application_sessions_become_resources(cluster):
    c = cluster
    net = c.network
    session_id = c.status("KeySession", "s02")["sessionId"]

    def shown() -> int | None:
        """keysDelivered of s02, once it shows what its endpoint KMs count."""
        counted = sum(c.km_sessions(node)[session_id].keys_delivered for node in ("n0", "n2"))
        return counted if c.status("KeySession", "s02").get("keysDelivered", 0) == counted else None

    before = await asyncio.to_thread(wait_for, lambda: (n := shown()) is not None and (n,), what="s02 keys shown")
    async with client(net, "sae-n0") as source, client(net, "sae-n2") as destination:
        sent = await enc_keys_retrying(source, "sae-n2", 4, 256)
        assert await destination.dec_keys("sae-n0", [key_id for key_id, _ in sent]) == sent
    await asyncio.to_thread(wait_for, lambda: c.status("KeySession", "s02").get("keysDelivered") == before[0] + 4,
                            what="s02 showing its 4 new keys")
    # The user's status is written on its own, a moment apart from the session's.
    usage = await asyncio.to_thread(
        wait_for, lambda: (u := c.status("UserProfile", "lab").get("usage", {})).get("deliveredKeys", 0) >= before[0] + 4
        and u, what="the user's usage counting the 4 new keys")
    assert usage["deliveredBits"] == 256 * usage["deliveredKeys"]
    # No KeySession names sae-n1 and sae-n2: the KM of n1 opens an implicit ETSI 014 session.
    async with client(net, "sae-n1") as source, client(net, "sae-n2") as destination:
        sent = await enc_keys_retrying(source, "sae-n2", 2, 256)
        assert await destination.dec_keys("sae-n1", [key_id for key_id, _ in sent]) == sent
    recorded = wait_for(lambda: [s for s in c.kube.list(VQKD["KeySession"])
                                 if s["metadata"].get("labels", {}).get(LABEL_ORIGIN) == ORIGIN_APPLICATION
                                 and s.get("status", {}).get("phase") == "Active"],
                        what="a KeySession recording the application's session")
    assert len(recorded) == 1
    session = recorded[0]
    session_id = session["metadata"]["annotations"][ANNOTATION_SESSION_ID]
    assert session["metadata"]["name"] == f"app-{session_id}" and session["status"]["sessionId"] == session_id
    assert (session["spec"]["source"], session["spec"]["destination"]) == (
        {"node": "n1", "saeId": "sae-n1"}, {"node": "n2", "saeId": "sae-n2"})
    assert session["spec"]["user"] == "lab" and session["status"]["path"] == ["n1", "n2"]


def test_a_restarted_operator_rebuilds_everything_from_the_resources(cluster):
    c = cluster
    before = {item["metadata"]["name"]: item["status"]["sessionId"] for item in c.kube.list(VQKD["KeySession"])}
    versions = {node: c.km_sessions(node)[before["s02"]].config.version for node in NODES}
    c.operator.stop()
    c.operator.start()
    # The same sessions under the same IDs, and every KM got its configuration pushed again.
    for name, session_id in before.items():
        status = wait_for(lambda: active(c, name), what=f"{name} Active after the restart")
        assert status["sessionId"] == session_id
    assert {item["metadata"]["name"] for item in c.kube.list(VQKD["KeySession"])} == set(before)
    for node in NODES:
        assert c.km_sessions(node)[before["s02"]].config.version > versions[node]
    app = next(name for name in before if name.startswith("app-"))
    for node in ("n1", "n2"):
        assert c.km_holds(node, before[app])


async def test_keys_still_match_after_the_operator_restart(cluster):
    async with client(cluster.network, "sae-n0") as source, client(cluster.network, "sae-n2") as destination:
        sent = await enc_keys_retrying(source, "sae-n2", 2, 256)
        assert await destination.dec_keys("sae-n0", [key_id for key_id, _ in sent]) == sent


async def test_a_session_waiting_for_its_peer_survives_an_operator_restart(cluster):
    """ETSI 004: the source application opens, the operator restarts, then the destination
    application joins with the Key_stream_ID the source got; both draw the same keys."""
    c = cluster
    net = c.network
    status, opened = await post(net, "sae-n0", "/api/v1/etsi004/open_connect",
                                {"source": "sae-n0", "destination": "sae-n1", "QoS": {"Timeout": 300}})
    assert status == 200 and opened["status"] == 1, opened  # the destination has not connected yet
    ksid = opened["Key_stream_ID"]
    name = f"app-{ksid}"

    def waiting():
        record = c.get("KeySession", name)
        status = record["status"]
        return record if status["phase"] == "Accepted" and status.get("peersRegistered") == ["sae-n0"] else None

    record = await asyncio.to_thread(wait_for, waiting, what=f"{name} recorded, waiting for sae-n1")
    assert record["metadata"]["annotations"][ANNOTATION_REGISTERED] == "source"
    assert (record["spec"]["source"], record["spec"]["destination"]) == (
        {"node": "n0", "saeId": "sae-n0"}, {"node": "n1", "saeId": "sae-n1"})
    assert c.condition("KeySession", name, "Routed")["reason"] == "WaitingForPeer"
    assert not c.km_holds("n0", ksid) and not c.km_holds("n1", ksid)  # no path before both opened

    await asyncio.to_thread(c.operator.stop)
    await asyncio.to_thread(c.operator.start)
    assert not c.km_holds("n0", ksid), "restored as waiting, not given a path"

    status, joined = await post(net, "sae-n1", "/api/v1/etsi004/open_connect",
                                {"source": "sae-n0", "destination": "sae-n1", "Key_stream_ID": ksid})
    assert status == 200 and joined["status"] == 0 and joined["Key_stream_ID"] == ksid, joined
    source_keys = [await get_key_when_connected(net, "sae-n0", ksid, index) for index in range(3)]
    dest_keys = [await get_key_when_connected(net, "sae-n1", ksid, index) for index in range(3)]
    assert [reply["status"] for _, reply in source_keys + dest_keys] == [0] * 6
    assert [reply["Key_buffer"] for _, reply in source_keys] == [reply["Key_buffer"] for _, reply in dest_keys]
    assert len({reply["Key_buffer"] for _, reply in source_keys}) == 3

    def active_record():
        record = c.get("KeySession", name)
        annotated = record["metadata"]["annotations"][ANNOTATION_REGISTERED] == "source,destination"
        return record if annotated and record["status"]["phase"] == "Active" else None

    record = await asyncio.to_thread(wait_for, active_record, what=f"{name} Active with both ends registered")
    assert record["status"]["path"] == ["n0", "n1"] and record["status"]["peersRegistered"] == ["sae-n0", "sae-n1"]
    _, closed = await post(net, "sae-n0", "/api/v1/etsi004/close", {"Key_stream_ID": ksid})
    assert closed["status"] == 0


def test_a_crashed_km_is_restarted_and_configured_again(cluster):
    c = cluster
    session_id = c.status("KeySession", "s02")["sessionId"]
    crashed = time.monotonic()
    c.network.processes["km-n1"].popen.kill()
    # The "kubelet" restarts the container (restartPolicy Always); the operator sees a new KM
    # instance answer and pushes it everything it should hold.
    wait_for(lambda: c.km_holds("n1", session_id), timeout=30, what="the restarted KM of n1 configured")
    print(f"\nKM n1 crashed -> restarted and configured again in {time.monotonic() - crashed:.2f} s")
    wait_for(lambda: active(c, "s02"), what="s02 Active again")
    wait_for(lambda: "KMReplaced" in {event["reason"] for event in c.events("n1")}, what="an Event on QKDNode n1")


def test_a_hung_km_is_replaced_by_the_operator(cluster):
    c = cluster
    session_id = c.status("KeySession", "s02")["sessionId"]
    replaced_before = c.metric("vqkd_operator_km_replacement_seconds_count")
    sum_before = c.metric("vqkd_operator_km_replacement_seconds_sum")
    hung = time.monotonic()
    c.network.processes["km-n1"].popen.send_signal(signal.SIGSTOP)  # alive, but answers nothing
    # Unreachable for replace_after_s: the operator replaces the pod (template restamped); the
    # "kubelet" replaces the process; the new KM gets its sessions pushed again.
    stamped = wait_for(lambda: c.kube.get(STATEFULSETS, "vqkd-km-n1")["spec"]["template"]["metadata"]
                       .get("annotations", {}).get(ANNOTATION_RESTARTED_AT), timeout=15, what="the pod replaced")
    assert stamped
    wait_for(lambda: c.km_holds("n1", session_id), timeout=30, what="the new KM of n1 configured")
    replaced = time.monotonic() - hung
    wait_for(lambda: active(c, "s02"), what="s02 Active again")
    wait_for(lambda: c.metric("vqkd_operator_km_replacement_seconds_count") > replaced_before,
             what="the replacement measured")
    measured = c.metric("vqkd_operator_km_replacement_seconds_sum") - sum_before
    print(f"\nKM n1 hung -> replaced and configured again in {replaced:.2f} s (operator: found unreachable -> "
          f"new KM serving with its sessions pushed again: {measured:.2f} s, of which {c.options.replace_after_s} s "
          "waiting before replacing)")


async def test_keys_flow_through_the_replaced_km(cluster):
    async with client(cluster.network, "sae-n0") as source, client(cluster.network, "sae-n2") as destination:
        sent = await enc_keys_retrying(source, "sae-n2", 2, 256, timeout=20)
        assert await destination.dec_keys("sae-n0", [key_id for key_id, _ in sent]) == sent


def test_a_deleted_statefulset_is_created_again(cluster):
    c = cluster
    session_id = c.status("KeySession", "s02")["sessionId"]
    uid = c.kube.get(STATEFULSETS, "vqkd-km-n2")["metadata"]["uid"]
    c.kube.delete(STATEFULSETS, "vqkd-km-n2")
    c.network.processes["km-n2"].popen.kill()  # what the garbage collector does to its pod
    recreated = wait_for(lambda: (s := c.kube.get(STATEFULSETS, "vqkd-km-n2")) and s["metadata"]["uid"] != uid and s,
                         timeout=15, what="StatefulSet vqkd-km-n2 created again")
    assert recreated["metadata"]["ownerReferences"][0]["name"] == "n2"
    wait_for(lambda: c.km_holds("n2", session_id), timeout=30, what="the new KM of n2 configured")
    wait_for(lambda: active(c, "s02"), what="s02 Active again")


def test_deleting_a_session_deletes_it_at_every_km_before_the_finalizer_goes(cluster):
    c = cluster
    session_id = c.status("KeySession", "s02")["sessionId"]
    assert "vqkd.io/finalizer" in c.get("KeySession", "s02")["metadata"]["finalizers"]
    c.kube.delete(VQKD["KeySession"], "s02")
    wait_for(lambda: c.get("KeySession", "s02") is None, what="KeySession s02 gone")
    assert [node for node in NODES if c.km_holds(node, session_id)] == []
    wait_for(lambda: c.status("UserProfile", "lab").get("activeSessions") == 1, what="the user's usage updated")


INVALID = """
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: loop}
spec:
  nodes: [n0, n0]
  emulated: {keyRateBps: 1000}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n9}
spec: {saeIds: ["not an sae id"]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: n8}
spec: {saeIds: [sae-n0]}
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: greedy}
spec:
  user: lab
  source: {node: n0, saeId: sae-n0}
  destination: {node: n1, saeId: sae-n1}
  qos: {minBps: 5000, maxBps: 10}
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: orphan}
spec:
  user: nobody
  source: {node: n0, saeId: sae-n0}
  destination: {node: n1, saeId: sae-n1}
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata:
  name: garbled
  annotations: {vqkd.io/registered: "source,both"}
spec:
  user: lab
  source: {node: n0, saeId: sae-n0}
  destination: {node: n1, saeId: sae-n1}
"""


def test_invalid_resources_get_a_condition_saying_why_and_no_children(cluster):
    c = cluster
    held = {node: c.km_stats(node).topology_version for node in NODES}
    c.apply(INVALID)
    expected = {
        ("QKDLink", "loop"): ("InvalidSpec", "spec.nodes: must name two distinct QKDNodes"),
        ("QKDNode", "n9"): ("InvalidSpec", "spec.saeIds[0]: should be an SAE ID"),
        ("QKDNode", "n8"): ("Conflict", "SAE 'sae-n0' is already attached to QKDNode n0"),
        ("KeySession", "greedy"): ("InvalidSpec", "spec.qos.minBps: must not exceed maxBps"),
        ("KeySession", "orphan"): ("UnresolvedReference", "UserProfile 'nobody', which is not registered"),
        ("KeySession", "garbled"): ("InvalidSpec", "expected source, destination or source,destination"),
    }
    for (kind, name), (reason, words) in expected.items():
        ready = wait_for(lambda: (r := c.condition(kind, name, "Ready")) and r["reason"] == reason and r,
                         what=f"{kind} {name} refused with {reason}")
        assert ready["status"] == "False" and words in ready["message"], ready
    assert c.status("KeySession", "greedy")["phase"] == "Rejected"
    assert c.status("KeySession", "orphan")["phase"] == "Pending"
    assert c.status("QKDNode", "n9")["phase"] == "Failed"
    for kind, name in ((STATEFULSETS, "vqkd-km-n9"), (STATEFULSETS, "vqkd-km-n8"), (CONFIGMAPS, "vqkd-km-n8"),
                       (SECRETS, "vqkd-km-n8-tls"), (SERVICES, "vqkd-km-n9"), (DEPLOYMENTS, "vqkd-link-loop"),
                       (CONFIGMAPS, "vqkd-link-loop")):
        assert c.kube.get(kind, name) is None, f"{kind.kind} {name} was created for an invalid resource"
    # The valid network is untouched: no KM was pushed anything for the refused resources.
    assert {node: c.km_stats(node).topology_version for node in NODES} == held


def templates(c: Cluster) -> dict[str, dict]:
    """The pod template of every KM StatefulSet and module Deployment there is, by workload name."""
    return {item["metadata"]["name"]: item["spec"]["template"]
            for kind in (STATEFULSETS, DEPLOYMENTS) for item in c.kube.list(kind)}


def link_ends(c: Cluster, node: str) -> dict[str, str]:
    """Each link end the KM of ``node`` holds, with its incarnation."""
    return {link.link: link.incarnation for link in c.km_stats(node).links}


async def test_growing_the_running_network_pushes_the_kms_concerned_and_restarts_none(cluster):
    """A new node n3 (with its SAE) linked to n0, and an SAE added to n2: every KM is told live,
    no existing workload's pod template changes, no KM or link end is replaced, and keys flow
    between the new SAEs over the new link."""
    c = cluster
    before = templates(c)
    incarnations = {node: c.km_stats(node).incarnation for node in NODES}
    ends = {node: link_ends(c, node) for node in NODES}
    restarts = len(c.kubelet.restarts)
    applied = time.monotonic()
    c.apply(GROWTH)
    await asyncio.to_thread(wait_for, lambda: "n0-n3" in link_ends(c, "n0") and "n0-n3" in link_ends(c, "n3"),
                            what="both KMs of the new link holding it")
    pushed_s = time.monotonic() - applied
    version = c.km_stats("n3").topology_version
    c.kube.patch(VQKD["QKDNode"], "n2", {"spec": {"saeIds": N2_SAES}})
    # Every KM holds the whole SAE directory: the new SAE reaches n3 too, and keys flow to it.
    await asyncio.to_thread(wait_for, lambda: c.km_stats("n3").topology_version > version,
                            what="the SAE added to n2 pushed to n3")
    async with client(c.network, "sae-n3") as source, client(c.network, "sae-n2b") as destination:
        sent = await enc_keys_retrying(source, "sae-n2b", 2, 256, timeout=20)
        assert await destination.dec_keys("sae-n3", [key_id for key_id, _ in sent]) == sent
    session = wait_for(lambda: next((s for s in c.kube.list(VQKD["KeySession"])
                                     if s["spec"]["source"]["saeId"] == "sae-n3"
                                     and s.get("status", {}).get("phase") == "Active"), None),
                       what="the application's session over the new link recorded")
    assert session["status"]["path"] == ["n3", "n0", "n1", "n2"]
    print(f"\nQKDNode n3 and QKDLink n0-n3 applied -> both KMs holding the new link in {pushed_s:.2f} s")

    after = templates(c)
    assert set(after) - set(before) == {"vqkd-km-n3", "vqkd-link-n0-n3"}
    assert {name: after[name] for name in before} == before, "no existing workload's pod template changed"
    assert {node: c.km_stats(node).incarnation for node in NODES} == incarnations, "no KM restarted"
    for node in NODES:
        held = link_ends(c, node)
        assert {link: held[link] for link in ends[node]} == ends[node], f"{node}'s link ends kept as they were"
    assert len(c.kubelet.restarts) == restarts and c.kubelet.errors == []
    stats = c.km_stats("n0")
    assert next(link for link in stats.links if link.link == "n0-n3").drawn_bits_total > 0


async def test_shrinking_it_again_removes_the_link_and_the_node_from_the_kms_and_restarts_none(cluster):
    c = cluster
    before = templates(c)
    incarnations = {node: c.km_stats(node).incarnation for node in NODES}
    kept = {node: {link: end for link, end in link_ends(c, node).items() if link != "n0-n3"} for node in NODES}
    c.kube.delete(VQKD["QKDLink"], "n0-n3")
    await asyncio.to_thread(wait_for, lambda: "n0-n3" not in link_ends(c, "n0") and c.get("QKDLink", "n0-n3") is None,
                            what="the link gone from the KM of n0 and from the API")
    c.kube.delete(VQKD["QKDNode"], "n3")
    await asyncio.to_thread(wait_for, lambda: c.get("QKDNode", "n3") is None, what="QKDNode n3 gone")
    # No KM knows the SAE of n3 any more.
    async with client(c.network, "sae-n2b") as source:
        with pytest.raises(ETSI014Error) as refused:
            await source.enc_keys("sae-n3", 1, 256)
    assert refused.value.status == 400 and "not known" in refused.value.message

    after = templates(c)
    assert set(before) - set(after) == {"vqkd-km-n3", "vqkd-link-n0-n3"}
    assert {name: after[name] for name in after} == {name: before[name] for name in after}
    assert {node: c.km_stats(node).incarnation for node in NODES} == incarnations, "no KM restarted"
    assert {node: link_ends(c, node) for node in NODES} == kept, "the other link ends kept as they were"


def test_an_operator_wide_change_rolls_the_kms_one_at_a_time(cluster):
    """The operator started again with another control-plane address for its KMs changes every
    KM's pod template (the address is in each KM's ConfigMap, whose hash the template carries):
    the StatefulSets are rewritten one at a time, by name, each only once the KM rewritten
    before it is back Ready as a new instance."""
    c = cluster
    port = c.options.control_plane_address.rsplit(":", 1)[1]
    moved = dataclasses.replace(c.options, control_plane_address=f"localhost:{port}")  # the same listener
    written = {node: template_hash(c.kube.get(STATEFULSETS, f"vqkd-km-{node}")) for node in NODES}
    incarnations = {node: c.km_stats(node).incarnation for node in NODES}
    writes, restarts = len(c.api.emulator.statefulset_writes), len(c.kubelet.restarts)
    c.operator.stop()
    c.operator = InProcessOperator(moved)
    started = time.monotonic()
    c.operator.start()

    def rolled(node: str) -> bool:
        config = KMConfig.model_validate_json(c.kube.get(CONFIGMAPS, f"vqkd-km-{node}")["data"]["km.json"])
        if config.control_plane != moved.control_plane_address or c.status("QKDNode", node).get("ready") is not True \
                or "KMRolled" not in {event["reason"] for event in c.events(node)}:
            return False
        try:
            return c.km_stats(node).incarnation != incarnations[node]
        except grpc.RpcError:  # the channel to the KM's previous process
            return False

    wait_for(lambda: all(rolled(node) for node in NODES), timeout=60, what="every KM rolled and Ready again")
    rolled_s = time.monotonic() - started
    # The first write of each StatefulSet with its new template (a KM replaced meanwhile gets
    # only a restartedAt stamp, which leaves the recorded template as it is).
    rewrites: dict[str, float] = {}
    for at, name, statefulset in c.api.emulator.statefulset_writes[writes:]:
        node = name.removeprefix("vqkd-km-")
        if template_hash(statefulset) != written[node]:
            rewrites.setdefault(node, at)
    assert sorted(rewrites, key=rewrites.get) == list(NODES), rewrites
    answered: dict[str, float] = {}  # when each KM's new process answered, after its StatefulSet was rewritten
    for process, at in c.kubelet.restarts[restarts:]:
        node = process.removeprefix("km-")
        if node in rewrites and at > rewrites[node]:
            answered.setdefault(node, at)
    assert set(answered) == set(NODES)
    for previous, node in zip(NODES, NODES[1:]):
        assert answered[previous] < rewrites[node], f"{node} rewritten before the KM of {previous} was back"
    assert not any(event["reason"] == "KMRollTimedOut" for node in NODES for event in c.events(node))
    gaps = ", ".join(f"{node} {rewrites[node] - answered[previous]:.2f} s" for previous, node in zip(NODES, NODES[1:]))
    print(f"\nevery KM's pod template changed -> all {len(NODES)} rolled one at a time and Ready again in "
          f"{rolled_s:.1f} s from the operator's start; from a KM back to the next rewrite: {gaps}")
