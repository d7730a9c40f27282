"""What the operator creates, checked without a cluster: the pure builders in ``vqkd.operator.kopf.manifests``
and the network plan with their cluster addressing, plus the helpers around them (status merge patches,
endpoints, create-or-update, the CA Secret)."""

from __future__ import annotations

import base64

import pytest

from vqkd.km.config import EmulatedLinkConfig, KMConfig
from vqkd.operator.kopf import manifests
from vqkd.operator.kopf.endpoints import ClusterEndpoints, LocalEndpoints
from vqkd.operator.kopf.handlers.lifecycle import load_ca
from vqkd.operator.kopf.kube import CONFIGMAPS, SECRETS, Kube, Kind, KubeError
from vqkd.operator.kopf.status import merge_patch
from vqkd.operator import plan
from vqkd.operator.resources.loader import load_text
from vqkd.operator.resources.models import parse

NS = "qkd"
NETWORK = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: alice}
spec:
  saeIds: [sae-a]
  km:
    image: registry.example/vqkd:1.2
    imagePullPolicy: Always
    keySize: 512
    resources: {requests: {cpu: 250m, memory: 256Mi}, limits: {memory: 1Gi}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: bob}
spec: {saeIds: [sae-b1, sae-b2], kmeId: KME-BOB}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: carol}
spec: {saeIds: [sae-c]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: alice-bob}
spec:
  nodes: [alice, bob]
  emulated: {keyRateBps: 1000000, qber: 0.02, bufferBits: 4096000}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: bob-carol}
spec:
  nodes: [bob, carol]
  etsi014:
    endpoints:
      bob: {url: "https://qkd-b.lab:443/", saeId: KM_B, peerSaeId: KM_C, secretRef: {name: qkd-b-creds}}
      carol: {url: "https://qkd-c.lab:443/", saeId: KM_C, peerSaeId: KM_B, secretRef: {name: qkd-c-creds}}
"""
CONTROL_PLANE = "vqkd-control-plane.qkd.svc:9443"


@pytest.fixture(scope="module")
def network():
    return load_text(NETWORK, "specs-test")


def km_config(network, node: str) -> KMConfig:
    """What the node's KM ConfigMap holds: its identity and, until the control plane pushes it, its topology."""
    addressing = manifests.ClusterAddressing(NS, CONTROL_PLANE)
    return plan.km_config(network, node, addressing).model_copy(
        update={"topology": plan.km_topology(network, node, addressing)})


def test_children_are_named_after_their_resource_and_too_long_names_are_refused():
    assert (manifests.km_name("n1"), manifests.km_tls_secret("n1"), manifests.km_pod("n1")) == (
        "vqkd-km-n1", "vqkd-km-n1-tls", "vqkd-km-n1-0")
    assert (manifests.km_replicas_service("n1"), manifests.km_pod("n1", 2)) == ("vqkd-km-n1-dns", "vqkd-km-n1-2")
    longest = "n" * 51
    assert max(len(manifests.km_replicas_service(longest)), len(manifests.km_pod(longest, 15))) <= manifests.MAX_NAME
    assert (manifests.module_name("a-b"), manifests.module_tls_secret("a-b")) == ("vqkd-link-a-b", "vqkd-link-a-b-tls")
    assert manifests.name_problem("QKDNode", "n" * 51) is None
    problem = manifests.name_problem("QKDNode", "n" * 52)
    assert problem.startswith("QKDNode nnn") and "at most 51 characters" in problem and "got 52" in problem
    assert "at most 49 characters" in manifests.name_problem("QKDLink", "l" * 50)


def test_km_config_reaches_peers_and_modules_by_service_name(network):
    config = km_config(network, "bob")
    assert (config.node, config.kme_id, config.control_plane) == ("bob", "KME-BOB", CONTROL_PLANE)
    assert (config.etsi014_listen, config.grpc_listen, config.metrics_listen) == (
        "0.0.0.0:8443", "0.0.0.0:9443", "0.0.0.0:9090")
    assert config.topology.saes == {"sae-a": "alice", "sae-b1": "bob", "sae-b2": "bob", "sae-c": "carol"}
    assert [str(p) for p in (config.tls.ca, config.tls.cert, config.tls.key)] == [
        "/etc/vqkd/tls/ca.crt", "/etc/vqkd/tls/tls.crt", "/etc/vqkd/tls/tls.key"]
    emulated, device = config.topology.links
    # bob is the second node of alice-bob: end b of the module pair.
    assert (emulated.name, emulated.peer_node, emulated.peer_kme_id, emulated.peer_grpc) == (
        "alice-bob", "alice", "alice", "vqkd-km-alice-0.vqkd-km-alice-dns.qkd.svc:9443")
    assert emulated.module_url == "https://vqkd-link-alice-bob.qkd.svc:8444"
    assert (emulated.module_sae_id, emulated.peer_module_sae_id, emulated.block_bits) == ("bob", "alice", 8192)
    assert (device.module_url, device.module_sae_id, device.peer_module_sae_id, device.peer_grpc) == (
        "https://qkd-b.lab:443/", "KM_B", "KM_C", "vqkd-km-carol-0.vqkd-km-carol-dns.qkd.svc:9443")
    # The device is reached with the credentials of the link's Secret, mounted in the KM's pod.
    assert [str(p) for p in (device.module_tls.ca, device.module_tls.cert, device.module_tls.key)] == [
        "/etc/vqkd/modules/bob-carol/ca.crt", "/etc/vqkd/modules/bob-carol/tls.crt",
        "/etc/vqkd/modules/bob-carol/tls.key"]
    assert emulated.module_tls is None  # the emulated module trusts the KM's own certificate
    assert km_config(network, "alice").topology.links[0].module_url == "https://vqkd-link-alice-bob.qkd.svc:8443"
    assert km_config(network, "alice").topology.limits.key_size == 512
    # The config is what `python -m vqkd.km --config` reads.
    assert KMConfig.model_validate_json(manifests.config_json(config)) == config


def test_a_link_whose_other_node_is_unknown_is_left_out(network):
    partial = load_text(NETWORK, "specs-test")
    del partial.nodes["carol"]
    assert [link.name for link in plan.km_topology(partial, "bob", manifests.ClusterAddressing(NS)).links] == [
        "alice-bob"]


def test_emulator_config_serves_each_node_at_its_own_end(network):
    config = plan.module_config(network.links["alice-bob"], manifests.ClusterAddressing(NS))
    assert (config.link, config.key_rate_bps, config.qber, config.buffer_bits) == ("alice-bob", 1e6, 0.02, 4096000)
    assert config.admin_listen == "0.0.0.0:9100"
    assert {end: (e.listen, e.sae_id, e.client, e.kme_id, str(e.tls.cert)) for end, e in config.ends.items()} == {
        "a": ("0.0.0.0:8443", "alice", "vqkd://km/alice", "alice-bob-a", "/etc/vqkd/tls/a.crt"),
        "b": ("0.0.0.0:8444", "bob", "vqkd://km/bob", "alice-bob-b", "/etc/vqkd/tls/b.crt"),
    }
    assert EmulatedLinkConfig.model_validate_json(manifests.config_json(config)) == config
    with pytest.raises(plan.PlanError, match="QKDLink bob-carol has no emulated key source"):
        plan.module_config(network.links["bob-carol"], manifests.ClusterAddressing(NS))


def test_km_statefulset_runs_one_km_from_its_configmap_and_secret(network):
    node = network.nodes["alice"]
    configmap = manifests.build_km_configmap("alice", km_config(network, "alice"))
    digest = manifests.content_hash(configmap["data"])
    sts = manifests.build_km_statefulset(node, digest, "ca")
    spec = sts["spec"]
    template = spec["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert (sts["kind"], sts["metadata"]["name"], spec["replicas"], spec["serviceName"]) == (
        "StatefulSet", "vqkd-km-alice", 1, "vqkd-km-alice-dns")
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["annotations"][manifests.ANNOTATION_CONFIG_HASH] == digest
    assert (container["image"], container["imagePullPolicy"]) == ("registry.example/vqkd:1.2", "Always")
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert container["command"][-2:] == ["--config", "/etc/vqkd/config/km.json"]
    assert "km.json" in configmap["data"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"etsi014": 8443, "grpc": 9443, "metrics": 9090}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "vqkd-km-alice"
    assert volumes["tls"]["secret"]["secretName"] == "vqkd-km-alice-tls"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/etc/vqkd/config", "/etc/vqkd/tls"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False


def test_a_km_on_a_device_link_mounts_the_device_credentials(network):
    sts = manifests.build_km_statefulset(network.nodes["bob"], "0", "ca", {"bob-carol": "qkd-b-creds"})
    pod = sts["spec"]["template"]["spec"]
    assert {"name": "module-0", "secret": {"secretName": "qkd-b-creds", "defaultMode": 0o440}} in pod["volumes"]
    assert {"name": "module-0", "mountPath": "/etc/vqkd/modules/bob-carol", "readOnly": True} in \
        pod["containers"][0]["volumeMounts"]


def test_km_service_selects_the_km_pod_and_exposes_its_named_ports(network):
    service = manifests.build_km_service("alice")
    sts = manifests.build_km_statefulset(network.nodes["alice"], "0", "ca")
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    container_ports = {port["name"] for port in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == container_ports
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == {
        "etsi014": 8443, "grpc": 9443, "metrics": 9090}


def test_km_statefulset_runs_the_replicas_the_node_asks_for_each_knowing_its_ordinal(network):
    node = network.nodes["alice"].model_copy(deep=True)
    node.spec.km.replicas = 3
    sts = manifests.build_km_statefulset(node, "0", "ca")
    assert sts["spec"]["replicas"] == 3
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "VQKD_KM_REPLICA", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}}]
    assert sts["metadata"]["annotations"][manifests.ANNOTATION_SPEC_HASH] != \
        manifests.build_km_statefulset(network.nodes["alice"], "0", "ca")["metadata"]["annotations"][manifests.ANNOTATION_SPEC_HASH]


def test_each_km_replica_has_a_dns_name_of_its_own_and_the_saes_one_address(network):
    headless = manifests.build_km_replicas_service("alice")
    sts = manifests.build_km_statefulset(network.nodes["alice"], "0", "ca")
    assert (headless["metadata"]["name"], headless["spec"]["clusterIP"]) == (sts["spec"]["serviceName"], "None")
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"] for p in headless["spec"]["ports"]} == {"grpc", "metrics"}
    addressing = manifests.ClusterAddressing(NS)
    second = addressing.km("alice", 1)
    assert second.grpc == "vqkd-km-alice-1.vqkd-km-alice-dns.qkd.svc:9443"
    assert second.metrics_url == "http://vqkd-km-alice-1.vqkd-km-alice-dns.qkd.svc:9090/metrics"
    assert second.etsi014_url == addressing.km("alice", 0).etsi014_url == "https://vqkd-km-alice.qkd.svc:8443"
    # The KM's certificate names the Service and, by wildcard, every replica's pod.
    names = manifests.km_server_names("alice", NS)
    assert {"vqkd-km-alice.qkd.svc", "*.vqkd-km-alice-dns.qkd.svc", "*.vqkd-km-alice-dns.qkd.svc.cluster.local"} <= \
        set(names)
    assert manifests.km_selector("alice") == "app.kubernetes.io/instance=alice,app.kubernetes.io/name=vqkd-km"
    assert manifests.build_km_autoscaler(network.nodes["alice"]) is None, "no autoscaling asked for, no autoscaler"


def test_module_deployment_runs_one_pair_and_never_two(network):
    deployment = manifests.build_module_deployment("alice-bob", "registry.example/vqkd:1.2", "abc", "ca")
    service = manifests.build_module_service("alice-bob")
    spec = deployment["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert (spec["replicas"], spec["strategy"]["type"]) == (1, "Recreate")
    assert container["command"][-1] == "/etc/vqkd/config/emulator.json"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"end-a": 8443, "end-b": 8444, "admin": 9100}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {p["name"] for p in container["ports"]}
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "vqkd-link-alice-bob-tls"
    assert volumes["config"]["configMap"]["name"] == "vqkd-link-alice-bob"


def test_spec_hash_changes_with_the_manifest_only(network):
    first = manifests.build_km_configmap("alice", km_config(network, "alice"))
    again = manifests.build_km_configmap("alice", km_config(network, "alice"))
    assert first == again
    assert manifests.with_spec_hash(dict(first)) == first  # rehashing a hashed manifest changes nothing
    changed = load_text(NETWORK.replace("keySize: 512", "keySize: 1024"), "changed")
    other = manifests.build_km_configmap("alice", km_config(changed, "alice"))
    key = manifests.ANNOTATION_SPEC_HASH
    assert other["metadata"]["annotations"][key] != first["metadata"]["annotations"][key]


def test_a_km_statefulset_names_the_pod_template_it_carries_and_the_ca_is_part_of_it(network):
    node = network.nodes["alice"]
    sts = manifests.build_km_statefulset(node, "config", "ca-1")
    template = sts["spec"]["template"]
    assert template["metadata"]["annotations"][manifests.ANNOTATION_CA_HASH] == "ca-1"
    assert manifests.template_hash(sts) == manifests.content_hash(template)
    assert manifests.template_hash(manifests.build_km_statefulset(node, "config", "ca-1")) == manifests.template_hash(sts)
    for other in (manifests.build_km_statefulset(node, "config", "ca-2"),
                  manifests.build_km_statefulset(node, "other config", "ca-1"),
                  manifests.build_km_statefulset(network.nodes["bob"], "config", "ca-1")):
        assert manifests.template_hash(other) != manifests.template_hash(sts)
    assert manifests.template_hash({"metadata": {"name": "written-before-the-annotation"}}) is None
    module = manifests.build_module_deployment("alice-bob", "image", "config", "ca-1")
    assert module["spec"]["template"]["metadata"]["annotations"][manifests.ANNOTATION_CA_HASH] == "ca-1"


def test_tls_secret_and_application_session_manifests():
    secret = manifests.build_tls_secret("s", {"a": "b"}, {"tls.crt": b"cert", "ca.crt": b"ca"})
    assert secret["data"] == {"ca.crt": base64.b64encode(b"ca").decode(), "tls.crt": base64.b64encode(b"cert").decode()}
    body = manifests.build_application_session(
        "7f1f9a8e-0000-4000-8000-000000000001", "lab", ("n1", "sae-1"), ("n2", "sae-2"), {"minBps": 0}, "source")
    assert body["metadata"]["name"] == "app-7f1f9a8e-0000-4000-8000-000000000001"
    assert body["metadata"]["labels"][manifests.LABEL_ORIGIN] == manifests.ORIGIN_APPLICATION
    assert body["metadata"]["annotations"][manifests.ANNOTATION_SESSION_ID] == "7f1f9a8e-0000-4000-8000-000000000001"
    session = parse(body)  # a valid KeySession
    assert body["metadata"]["annotations"][manifests.ANNOTATION_REGISTERED] == "source"
    assert (session.spec.user, session.spec.source.sae_id, session.spec.destination.node) == ("lab", "sae-1", "n2")


def test_status_merge_patch_removes_what_is_gone_and_keeps_what_is_equal():
    old = {"phase": "Active", "reason": "x", "endpoints": {"grpc": "a", "metrics": "m"}, "path": ["a", "b"]}
    new = {"phase": "Active", "endpoints": {"grpc": "b", "metrics": "m"}, "path": ["a", "c", "b"]}
    assert merge_patch(old, new) == {"reason": None, "endpoints": {"grpc": "b"}, "path": ["a", "c", "b"]}
    assert merge_patch(new, new) == {}


def test_endpoints_in_a_cluster_and_from_a_local_runtime():
    cluster = ClusterEndpoints("qkd")
    assert cluster.km_grpc("n1") == "vqkd-km-n1-0.vqkd-km-n1-dns.qkd.svc:9443"
    assert cluster.km_etsi014("n1") == "https://vqkd-km-n1.qkd.svc:8443"
    assert cluster.km_metrics("n1") == "http://vqkd-km-n1-0.vqkd-km-n1-dns.qkd.svc:9090/metrics"
    assert cluster.module_metrics("l") == "http://vqkd-link-l.qkd.svc:9100/metrics"
    local = LocalEndpoints({"nodes": {"n1": {"grpc": "127.0.0.1:1", "etsi014_url": "https://127.0.0.1:2",
                                             "metrics_url": "http://127.0.0.1:3/metrics"}}, "links": {}})
    assert (local.km_grpc("n1"), local.module_metrics("l")) == ("127.0.0.1:1", None)
    with pytest.raises(LookupError, match="no endpoints for node 'n9' in the local runtime \\(known: n1\\)"):
        local.km_grpc("n9")
    assert manifests.control_plane_address("qkd") == CONTROL_PLANE


class MemoryKube(Kube):
    """Kube's create-or-update logic over a dict instead of an API server."""

    def __init__(self):
        self.namespace = NS
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[str] = []

    def get(self, kind: Kind, name: str):
        return self.objects.get((kind.plural, name))

    def create(self, kind: Kind, body: dict):
        self.calls.append("create")
        self.objects[kind.plural, body["metadata"]["name"]] = body
        return body

    def patch(self, kind: Kind, name: str, patch: dict, subresource=None):
        self.calls.append("patch")
        self.objects[kind.plural, name] = patch
        return patch

    def delete(self, kind: Kind, name: str, grace_period_s=None):
        return self.objects.pop((kind.plural, name), None) is not None


def test_ensure_creates_then_patches_only_when_the_wish_changed(network):
    kube = MemoryKube()
    configmap = manifests.build_km_configmap("alice", km_config(network, "alice"))
    assert kube.ensure(CONFIGMAPS, configmap) == "created"
    # The API server adds fields of its own; the hash still says nothing changed.
    kube.objects["configmaps", "vqkd-km-alice"]["metadata"]["resourceVersion"] = "7"
    assert kube.ensure(CONFIGMAPS, configmap) == "unchanged"
    changed = manifests.build_km_configmap("alice", km_config(load_text(NETWORK.replace("sae-c]", "sae-c, sae-d]"),
                                                                         "x"), "alice"))
    assert kube.ensure(CONFIGMAPS, changed) == "updated"
    secret = manifests.build_tls_secret("vqkd-km-alice-tls", {}, {"tls.crt": b"one"})
    assert kube.ensure(SECRETS, secret, create_only=True) == "created"
    assert kube.ensure(SECRETS, manifests.build_tls_secret("vqkd-km-alice-tls", {}, {"tls.crt": b"two"}),
                       create_only=True) == "unchanged"
    assert kube.calls == ["create", "patch", "create"]
    kube.objects["configmaps", "vqkd-km-alice"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    with pytest.raises(KubeError, match="ConfigMap vqkd-km-alice is being deleted"):
        kube.ensure(CONFIGMAPS, configmap)



def test_the_ca_comes_from_its_secret_in_either_layout_or_is_created_once(tmp_path):
    kube = MemoryKube()
    created = load_ca(kube, tmp_path / "first")
    stored = kube.objects["secrets", "vqkd-ca"]["data"]
    assert base64.b64decode(stored["ca.crt"]) == created.cert_path.read_bytes()
    # A second operator process, or a restart with a fresh working directory, uses the same CA.
    again = load_ca(kube, tmp_path / "second")
    assert again.cert_path.read_bytes() == created.cert_path.read_bytes()
    # cert-manager's layout: the CA certificate and key as tls.crt and tls.key.
    cert_manager = MemoryKube()
    cert_manager.objects["secrets", "vqkd-ca"] = {"metadata": {"name": "vqkd-ca"}, "data": {
        "tls.crt": stored["ca.crt"], "tls.key": stored["ca.key"], "ca.crt": stored["ca.crt"]}}
    assert load_ca(cert_manager, tmp_path / "third").cert_path.read_bytes() == created.cert_path.read_bytes()
    cert_manager.objects["secrets", "vqkd-ca"]["data"] = {"ca.crt": stored["ca.crt"]}
    with pytest.raises(KubeError, match="must hold ca.crt and ca.key, or tls.crt and tls.key of a CA certificate; "
                                        "it has ca.crt"):
        load_ca(cert_manager, tmp_path / "fourth")
