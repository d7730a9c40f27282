"""The network plan, checked without processes: one network planned with the local runtime's
addressing (loopback ports, certificates in a state directory) and the cluster's (Service DNS
names, fixed ports, mounted Secrets) gives the same processes, differing only in where they are."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vqkd.km import identity
from vqkd.km.config import DeviceProfile, KeyLimits, TLSPaths
from vqkd.km.domain.devices import EndLimits, fit_block_bits
from vqkd.operator.kopf.manifests import ClusterAddressing
from vqkd.operator.local.processes import KMPorts, LocalAddressing, ModulePorts, ReplicaPorts
from vqkd.operator.plan import (
    MAX_BLOCK_BITS, KMEndpoints, KMReplicaEndpoints, ModuleEndpoints, PlanError, block_bits_for, km_config, km_topology, module_config,
    plan_network,
)
from vqkd.operator.resources.loader import load_text

NETWORK = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: carol}
spec:
  saeIds: [sae-c]
  km: {keySize: 512, minKeySize: 128, maxKeySize: 1024, maxKeyPerRequest: 4}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: alice}
spec: {saeIds: [sae-a]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: bob}
spec: {saeIds: [sae-b1, sae-b2], kmeId: KME-BOB}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: bob-carol}
spec:
  nodes: [bob, carol]
  emulated: {keyRateBps: 1000, qber: 0.03}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: alice-bob}
spec:
  nodes: [alice, bob]
  emulated: {keyRateBps: 1000000, qber: 0.02, bufferBits: 4096000}
"""
DEVICE_LINK = """
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: alice-carol}
spec:
  nodes: [alice, carol]
  etsi014:
    endpoints:
      alice: {url: "https://qkd-a.lab:443/", saeId: KM_A, peerSaeId: KM_C, secretRef: {name: qkd-a-creds}}
      carol: {url: "https://qkd-c.lab:443/", saeId: KM_C, peerSaeId: KM_A, secretRef: {name: qkd-c-creds}}
"""
PKI = Path("/state/pki")


def network(text: str = NETWORK):
    return load_text(text, "plan-test")


def local_addressing(control_plane: str | None = "127.0.0.1:7000") -> LocalAddressing:
    nodes, links = ("alice", "bob", "carol"), ("alice-bob", "bob-carol")
    certificates = {ident: TLSPaths(ca=PKI / "ca.crt", cert=PKI / f"{ident.name}.crt", key=PKI / f"{ident.name}.key")
                    for ident in [identity.km(n) for n in nodes]
                    + [identity.module(link, end) for link in links for end in "ab"]}
    return LocalAddressing(
        km_ports={node: KMPorts(8000 + 10 * i, (ReplicaPorts(8001 + 10 * i, 8002 + 10 * i),))
                  for i, node in enumerate(nodes)},
        module_ports={link: ModulePorts(9000 + 10 * i, 9001 + 10 * i, 9002 + 10 * i) for i, link in enumerate(links)},
        certificates=certificates, control_plane=control_plane,
    )


def cluster_addressing() -> ClusterAddressing:
    return ClusterAddressing("qkd", "vqkd-control-plane.qkd.svc:9443")


def test_local_addressing_puts_every_process_on_its_loopback_ports():
    plan = plan_network(network(), local_addressing())
    (bob,) = plan.kms["bob"]
    assert (bob.etsi014_listen, bob.grpc_listen, bob.metrics_listen) == ("127.0.0.1:8010", "127.0.0.1:8011",
                                                                         "127.0.0.1:8012")
    assert (str(bob.tls.cert), bob.control_plane) == ("/state/pki/bob.crt", "127.0.0.1:7000")
    assert bob.topology is None  # the identity only: the topology is planned apart
    to_alice, to_carol = plan.topologies["bob"].links
    assert (to_alice.peer_grpc, to_alice.module_url) == ("127.0.0.1:8001", "https://127.0.0.1:9001")
    assert (to_carol.peer_grpc, to_carol.module_url) == ("127.0.0.1:8021", "https://127.0.0.1:9010")
    module = plan.modules["alice-bob"]
    assert {end: (e.listen, str(e.tls.cert)) for end, e in module.ends.items()} == {
        "a": ("127.0.0.1:9000", "/state/pki/alice-bob/a.crt"), "b": ("127.0.0.1:9001", "/state/pki/alice-bob/b.crt")}
    assert module.admin_listen == "127.0.0.1:9002"
    assert plan.km_endpoints["bob"] == KMEndpoints("KME-BOB", "https://127.0.0.1:8010", "127.0.0.1:8011",
                                                   "http://127.0.0.1:8012/metrics", (KMReplicaEndpoints(
                                                       "127.0.0.1:8011", "http://127.0.0.1:8012/metrics"),))
    assert plan.module_endpoints["alice-bob"] == ModuleEndpoints(("alice", "bob"), "http://127.0.0.1:9002/control",
                                                                 "http://127.0.0.1:9002/metrics")
    assert plan_network(network(), local_addressing(None)).kms["bob"][0].control_plane is None


def test_cluster_addressing_reaches_every_process_by_its_service_name():
    plan = plan_network(network(), cluster_addressing())
    (bob,) = plan.kms["bob"]
    assert (bob.etsi014_listen, bob.grpc_listen, bob.metrics_listen) == ("0.0.0.0:8443", "0.0.0.0:9443",
                                                                         "0.0.0.0:9090")
    assert (str(bob.tls.cert), bob.control_plane) == ("/etc/vqkd/tls/tls.crt", "vqkd-control-plane.qkd.svc:9443")
    assert [(link.peer_grpc, link.module_url) for link in plan.topologies["bob"].links] == [
        ("vqkd-km-alice-0.vqkd-km-alice-dns.qkd.svc:9443", "https://vqkd-link-alice-bob.qkd.svc:8444"),
        ("vqkd-km-carol-0.vqkd-km-carol-dns.qkd.svc:9443", "https://vqkd-link-bob-carol.qkd.svc:8443"),
    ]
    assert plan.km_endpoints["bob"] == KMEndpoints("KME-BOB", "https://vqkd-km-bob.qkd.svc:8443",
                                                   "vqkd-km-bob-0.vqkd-km-bob-dns.qkd.svc:9443",
                                                   "http://vqkd-km-bob-0.vqkd-km-bob-dns.qkd.svc:9090/metrics",
                                                   (KMReplicaEndpoints("vqkd-km-bob-0.vqkd-km-bob-dns.qkd.svc:9443",
                                                                       "http://vqkd-km-bob-0.vqkd-km-bob-dns.qkd.svc:9090/metrics"),))
    assert plan.module_endpoints["alice-bob"].control_url == "http://vqkd-link-alice-bob.qkd.svc:9100/control"


def _placeless(config) -> dict:
    """A configuration without where its process listens, reaches others and finds its TLS files."""
    places = {"etsi014_listen", "grpc_listen", "metrics_listen", "tls", "control_plane", "admin_listen", "listen",
              "peer_grpc", "module_url"}

    def strip(value):
        if isinstance(value, dict):
            return {key: sorted(item) if key == "replicas" else strip(item)  # replica ordinals, not addresses
                    for key, item in value.items() if key not in places}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return strip(config.model_dump(mode="json"))


def test_both_runtimes_plan_the_same_processes_and_differ_only_in_where_they_are():
    local, cluster = plan_network(network(), local_addressing()), plan_network(network(), cluster_addressing())
    assert list(local.kms) == list(cluster.kms) == ["alice", "bob", "carol"]
    assert {n: [_placeless(c) for c in cs] for n, cs in local.kms.items()} == {
        n: [_placeless(c) for c in cs] for n, cs in cluster.kms.items()}
    assert {n: _placeless(t) for n, t in local.topologies.items()} == {
        n: _placeless(t) for n, t in cluster.topologies.items()}
    assert {n: _placeless(c) for n, c in local.modules.items()} == {
        n: _placeless(c) for n, c in cluster.modules.items()}
    bob = _placeless(local.topologies["bob"])
    assert bob["saes"] == local.saes == {"sae-a": "alice", "sae-b1": "bob", "sae-b2": "bob", "sae-c": "carol"}
    assert [(link["name"], link["peer_node"], link["peer_kme_id"], link["module_sae_id"], link["peer_module_sae_id"],
             link["block_bits"], link["pool_target_bits"]) for link in bob["links"]] == [
        ("alice-bob", "alice", "alice", "bob", "alice", 8192, 64 * 1024 * 1024),
        ("bob-carol", "carol", "carol", "bob", "carol", 256, 64 * 1024 * 1024),
    ]
    module = local.modules["alice-bob"]
    assert (module.key_rate_bps, module.qber, module.buffer_bits) == (1e6, 0.02, 4096000)
    assert {end: (e.sae_id, e.client, e.kme_id) for end, e in module.ends.items()} == {
        "a": ("alice", "vqkd://km/alice", "alice-bob-a"), "b": ("bob", "vqkd://km/bob", "alice-bob-b")}


@pytest.mark.parametrize("addressing", [local_addressing(), cluster_addressing()], ids=["local", "cluster"])
def test_each_km_gets_the_key_limits_of_its_node(addressing):
    plan = plan_network(network(), addressing)
    assert plan.topologies["carol"].limits == KeyLimits(key_size=512, min_key_size=128, max_key_size=1024,
                                                        max_key_per_request=4)
    assert plan.topologies["alice"].limits == KeyLimits()


@pytest.mark.parametrize("addressing", [local_addressing(), cluster_addressing()], ids=["local", "cluster"])
def test_a_link_to_a_node_not_yet_declared_waits_for_it_but_its_modules_are_planned(addressing):
    partial = network()
    del partial.nodes["carol"]
    plan = plan_network(partial, addressing)
    assert [link.name for link in plan.topologies["bob"].links] == ["alice-bob"]
    assert "carol" not in plan.kms and "sae-c" not in plan.topologies["bob"].saes
    # The module pair needs neither KM to run: it is there when the node is declared.
    assert plan.modules["bob-carol"].ends["b"].client == "vqkd://km/carol"
    assert [km_config(partial, "bob", addressing)] == plan.kms["bob"]
    assert km_topology(partial, "bob", addressing) == plan.topologies["bob"]


def test_a_change_of_the_network_changes_the_topologies_it_concerns_and_no_km_identity():
    before, grown = plan_network(network(), cluster_addressing()), plan_network(network(NETWORK + DEVICE_LINK),
                                                                                  cluster_addressing())
    assert grown.kms == before.kms
    assert [n for n in before.topologies if grown.topologies[n] != before.topologies[n]] == ["alice", "carol"]
    assert [link.name for link in grown.topologies["carol"].links] == ["alice-carol", "bob-carol"]
    more_saes = plan_network(network(NETWORK.replace("[sae-a]", "[sae-a, sae-a2]")), cluster_addressing())
    assert more_saes.kms == before.kms
    assert all(more_saes.topologies[n].saes["sae-a2"] == "alice" for n in more_saes.topologies)


def test_a_device_link_in_the_cluster_uses_the_device_and_the_credentials_mounted_from_its_secret():
    alice = plan_network(network(NETWORK + DEVICE_LINK), cluster_addressing()).topologies["alice"]
    device = next(link for link in alice.links if link.name == "alice-carol")
    assert (device.module_url, device.module_sae_id, device.peer_module_sae_id, device.peer_grpc) == (
        "https://qkd-a.lab:443/", "KM_A", "KM_C", "vqkd-km-carol-0.vqkd-km-carol-dns.qkd.svc:9443")
    assert [str(p) for p in (device.module_tls.ca, device.module_tls.cert, device.module_tls.key)] == [
        "/etc/vqkd/modules/alice-carol/ca.crt", "/etc/vqkd/modules/alice-carol/tls.crt",
        "/etc/vqkd/modules/alice-carol/tls.key"]
    assert next(link for link in alice.links if link.name == "alice-bob").module_tls is None
    with pytest.raises(PlanError, match="QKDLink alice-carol has no emulated key source"):
        module_config(network(NETWORK + DEVICE_LINK).links["alice-carol"], cluster_addressing())


def test_the_local_runtime_without_device_credentials_refuses_a_device_link_naming_it_and_the_way_out():
    with pytest.raises(PlanError) as refused:
        plan_network(network(NETWORK + DEVICE_LINK), local_addressing())
    assert str(refused.value) == (
        "QKDLink alice-carol: spec.etsi014: node alice's KM needs the credentials for its QKD device that the "
        "cluster takes from the Secret its endpoint names (secretRef); pass vqkd up --secrets DIR, with "
        "DIR/<secretRef name>/ holding ca.crt (the device's CA), tls.crt and tls.key (the certificate and key the "
        "device knows the node's KM by)")


def test_a_device_link_on_the_local_runtime_uses_the_credentials_it_was_given():
    secrets = {"alice": Path("/secrets/qkd-a-creds"), "carol": Path("/secrets/qkd-c-creds")}
    given = {("alice-carol", node): TLSPaths(ca=d / "ca.crt", cert=d / "tls.crt", key=d / "tls.key")
             for node, d in secrets.items()}
    addressing = dataclasses.replace(local_addressing(), device_credentials=given)
    plan = plan_network(network(NETWORK + DEVICE_LINK), addressing)
    for node in secrets:
        device = next(link for link in plan.topologies[node].links if link.name == "alice-carol")
        assert device.module_tls == given[("alice-carol", node)]
    assert "alice-carol" not in plan.modules and "alice-carol" not in plan.module_endpoints


@pytest.mark.parametrize("addressing", [local_addressing(), cluster_addressing()], ids=["local", "cluster"])
def test_an_emulated_links_device_profile_reaches_its_module_pair(addressing):
    profiled = network(NETWORK.replace(
        "emulated: {keyRateBps: 1000, qber: 0.03}",
        "emulated: {keyRateBps: 1000, qber: 0.03, device: {maxKeySize: 1024, maxKeysPerRequest: 128, "
        "slaveLatencyMsPerKey: 40, syncLagMs: 300, errorRate: 0.01, tls12Only: true}}"))
    plan = plan_network(profiled, addressing)
    assert plan.modules["bob-carol"].device == DeviceProfile(
        key_size=256, max_key_size=1024, max_keys_per_request=128, slave_latency_ms_per_key=40, sync_lag_ms=300,
        error_rate=0.01, tls12_only=True)
    assert plan.modules["alice-bob"].device == DeviceProfile()  # no profile: vqkd's own twin
    small = network(NETWORK.replace("emulated: {keyRateBps: 1000, qber: 0.03}",
                                    "emulated: {keyRateBps: 1000, device: {maxKeySize: 128}}"))
    assert plan_network(small, addressing).modules["bob-carol"].device.key_size == 128  # within the device's limit


@pytest.mark.parametrize("addressing", [
    dataclasses.replace(local_addressing(), device_credentials={
        ("alice-carol", node): TLSPaths(ca=PKI / "ca.crt", cert=PKI / "d.crt", key=PKI / "d.key")
        for node in ("alice", "carol")}),
    cluster_addressing(),
], ids=["local", "cluster"])
def test_a_device_link_bounds_its_blocks_by_what_a_draw_costs_the_kms_and_leaves_the_size_to_the_devices(addressing):
    plan = plan_network(network(NETWORK + DEVICE_LINK), addressing)
    for node in ("alice", "carol"):
        device = next(link for link in plan.topologies[node].links if link.name == "alice-carol")
        assert device.block_bits == MAX_BLOCK_BITS == 8192
    # The KMs draw the largest size both devices accept below the bound, never above either device's limit.
    lab, generous = (EndLimits(key_size=256, min_key_size=64, max_key_size=size, max_key_per_request=128)
                     for size in (1024, 1 << 20))
    assert fit_block_bits(device.block_bits, {"alice's end": lab, "carol's end": generous}) == 1024
    assert fit_block_bits(device.block_bits, {"alice's end": generous, "carol's end": generous}) == MAX_BLOCK_BITS
    emulated = [link.block_bits for km in plan.topologies.values() for link in km.links if link.name != "alice-carol"]
    assert emulated and max(emulated) <= MAX_BLOCK_BITS


def test_block_size_follows_the_link_rate_within_bounds():
    assert [block_bits_for(rate) for rate in (10, 1000, 100_000, 1e6, 1e9)] == [256, 256, 4864, 8192, 8192]
    assert block_bits_for(1e12) == MAX_BLOCK_BITS
