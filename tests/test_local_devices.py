"""`vqkd up --secrets DIR`: links to real QKD devices on the local runtime.

The credentials of each etsi014 endpoint are read from DIR/<secretRef name>/ (the keys of
the Secret the cluster mounts), and a network may mix device links with emulated ones. The
"devices" of the mixed network are an emulated module pair started apart from vqkd, playing a
lab's device pair: keys of at most 1024 bits, 128 keys a request, a slave end taking 40 ms a
key, 300 ms synchronisation lag, TLS 1.2 only, and ends that trust only their vendor's CA.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from prometheus_client.parser import text_string_to_metric_families

from test_km_control_plane import eventually
from vqkd.km import identity
from vqkd.km.config import EmulatedLinkConfig, KMConfig, TLSPaths
from vqkd.km.domain.devices import TROUBLE_WINDOW_S
from vqkd.km.etsi014.client import ETSI014Error
from vqkd.km.pki import DevCA
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local.clients import sae_client
from vqkd.operator.local.processes import LocalNetwork, device_credentials
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.plan import PlanError
from vqkd.operator.resources.loader import load_files, load_text

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEVICE_LINK = "a-b"
LAB_DEVICE = {"key_size": 256, "max_key_size": 1024, "max_keys_per_request": 128,
              "slave_latency_ms_per_key": 40, "sync_lag_ms": 300, "tls12_only": True}
DEVICE_RATE_BPS = 40_000
SECRETS = {"lab-a": "qkd-a-b-lab-a", "lab-b": "qkd-a-b-lab-b"}  # node -> the Secret its a-b endpoint names
KEYS_PER_REQUEST = 4
KEY_BITS = 256
DRAW_SECONDS = 8.0

MIXED = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: lab-a}}
spec: {{saeIds: [sae-a]}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: lab-b}}
spec: {{saeIds: [sae-b]}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: lab-c}}
spec: {{saeIds: [sae-c]}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: a-b}}
spec:
  nodes: [lab-a, lab-b]
  etsi014:
    endpoints:
      lab-a: {{url: "{url_a}", saeId: km-lab-a, peerSaeId: km-lab-b, secretRef: {{name: qkd-a-b-lab-a}}}}
      lab-b: {{url: "{url_b}", saeId: km-lab-b, peerSaeId: km-lab-a, secretRef: {{name: qkd-a-b-lab-b}}}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: b-c}}
spec:
  nodes: [lab-b, lab-c]
  emulated: {{keyRateBps: 1000000, qber: 0.02}}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {{name: lab}}
spec:
  saeIds: [sae-a, sae-c]
  sla: {{maxKeyRateBps: 65536, maxSessions: 2}}
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {{name: a-to-c}}
spec:
  user: lab
  source: {{node: lab-a, saeId: sae-a}}
  destination: {{node: lab-c, saeId: sae-c}}
  qos: {{keyChunkSize: 32, maxBps: 32768}}
"""


def mixed_network(url_a: str = "https://127.0.0.1:1", url_b: str = "https://127.0.0.1:2"):
    return load_text(MIXED.format(url_a=url_a, url_b=url_b), "mixed.yaml")


def write_secrets(directory: Path, vendor: DevCA, network) -> None:
    """Each etsi014 endpoint's credentials, issued by the devices' vendor CA, as a secrets directory."""
    for link in network.links.values():
        for node, endpoint in (link.spec.etsi014.endpoints.items() if link.spec.etsi014 else ()):
            issued = vendor.issue(identity.km(node), f"km-{node}")
            secret = directory / endpoint.secret_ref.name
            secret.mkdir(parents=True)
            for source, file in ((vendor.cert_path, "ca.crt"), (issued.cert, "tls.crt"), (issued.key, "tls.key")):
                shutil.copy(source, secret / file)


def test_each_device_link_end_takes_the_files_of_the_secret_its_endpoint_names(tmp_path):
    write_secrets(tmp_path / "secrets", DevCA.load_or_create(tmp_path / "vendor"), mixed_network())
    found = device_credentials(mixed_network(), tmp_path / "secrets")
    assert found == {(DEVICE_LINK, node): TLSPaths(ca=tmp_path / "secrets" / secret / "ca.crt",
                                                   cert=tmp_path / "secrets" / secret / "tls.crt",
                                                   key=tmp_path / "secrets" / secret / "tls.key")
                     for node, secret in SECRETS.items()}


def test_missing_credentials_are_named_by_link_node_and_the_path_expected_all_at_once(tmp_path):
    secrets = tmp_path / "secrets"
    write_secrets(secrets, DevCA.load_or_create(tmp_path / "vendor"), mixed_network())
    shutil.rmtree(secrets / "qkd-a-b-lab-a")
    (secrets / "qkd-a-b-lab-b" / "tls.key").unlink()
    with pytest.raises(PlanError) as refused:
        device_credentials(mixed_network(), secrets)
    assert str(refused.value).split("\n") == [
        f"QKDLink a-b, node lab-a: spec.etsi014.endpoints.lab-a.secretRef names qkd-a-b-lab-a, but there is no "
        f"directory {secrets / 'qkd-a-b-lab-a'}; create it with ca.crt (the device's CA), tls.crt and tls.key "
        "(the certificate and key the device knows the node's KM by)",
        f"QKDLink a-b, node lab-b: spec.etsi014.endpoints.lab-b.secretRef names qkd-a-b-lab-b, but "
        f"{secrets / 'qkd-a-b-lab-b'} lacks tls.key; it needs ca.crt (the device's CA), tls.crt and tls.key "
        "(the certificate and key the device knows the node's KM by)",
    ]


def test_a_network_with_a_device_link_is_refused_before_anything_starts_without_its_credentials(tmp_path):
    for secrets in (None, tmp_path / "empty"):
        network = LocalNetwork(mixed_network(), tmp_path / "state", secrets=secrets)
        with pytest.raises(SystemExit, match="QKDLink a-b"):
            network.plan()
        assert not network.processes and not list((tmp_path / "state" / "config").iterdir())


def lab_devices(processes, vendor_dir: Path) -> tuple[str, str, str]:
    """The emulated pair standing in for the lab's devices: the URLs of ends a and b, and its metrics URL."""
    vendor = DevCA.load_or_create(vendor_dir)
    ports = {"a": free_port(), "b": free_port(), "admin": free_port()}
    ends = {}
    for end, node in (("a", "lab-a"), ("b", "lab-b")):
        issued = vendor.issue(identity.module(DEVICE_LINK, end), f"device-{end}")
        ends[end] = {"listen": f"127.0.0.1:{ports[end]}", "sae_id": f"km-{node}", "client": identity.km(node).uri,
                     "kme_id": f"lab-device-{end}",
                     "tls": {"ca": str(vendor.cert_path), "cert": str(issued.cert), "key": str(issued.key)}}
    proc = processes.start("vqkd.km.emulator", {
        "link": DEVICE_LINK, "key_rate_bps": DEVICE_RATE_BPS, "qber": 0.0, "device": LAB_DEVICE,
        "admin_listen": f"127.0.0.1:{ports['admin']}", "ends": ends}, "lab-devices")
    for port in ports.values():
        wait_for_port(port, proc=proc)
    return (f"https://127.0.0.1:{ports['a']}", f"https://127.0.0.1:{ports['b']}",
            f"http://127.0.0.1:{ports['admin']}/metrics")


def scrape(metrics_url: str, **labels: str) -> dict[tuple[str, ...], float]:
    """The samples carrying ``labels``, keyed by name and their other labels."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                rest = tuple(f"{k}={v}" for k, v in sorted(s.labels.items())
                             if k not in labels and k not in ("node", "replica"))
                samples[(s.name, *rest)] = s.value
    return samples


def links_view(endpoints: dict) -> dict:
    """The device link's row in the control plane's /links view."""
    with urllib.request.urlopen(endpoints["control"]["status_url"] + "/links", timeout=5) as resp:
        return next(row for row in json.loads(resp.read()) if row["name"] == DEVICE_LINK)


async def draw_over_the_path(endpoints: dict, seconds: float) -> tuple[list[tuple[str, bytes]], int]:
    """sae-a draws keys as master for sae-c, which collects each batch; every batch must match.
    The keys drawn, and how many requests were refused while key was short."""
    drawn: list[tuple[str, bytes]] = []
    refused = 0
    async with sae_client(endpoints, "sae-a") as master, sae_client(endpoints, "sae-c") as slave:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                keys = await master.enc_keys("sae-c", KEYS_PER_REQUEST, KEY_BITS)
            except ETSI014Error as e:
                assert e.status == 503, e  # key still accumulating or the session's rate reached
                refused += 1
                await asyncio.sleep(0.05)
                continue
            assert await slave.dec_keys("sae-a", [key_id for key_id, _ in keys]) == keys
            drawn.extend(keys)
    return drawn, refused


async def test_a_two_hop_pair_draws_the_same_keys_across_a_device_link_and_an_emulated_one(tmp_path, processes):
    url_a, url_b, device_metrics = lab_devices(processes, tmp_path / "vendor")
    mixed = mixed_network(url_a, url_b)
    write_secrets(tmp_path / "secrets", DevCA.load_or_create(tmp_path / "vendor"), mixed)
    network = LocalNetwork(mixed, tmp_path / "state", log_level="INFO", control_plane="auto",
                           secrets=tmp_path / "secrets")
    cp = LocalControlPlane(network, admission=AdmissionSettings(inactivity_timeout_s=600))
    await cp.start()
    try:
        assert sorted(network.processes) == ["km-lab-a", "km-lab-b", "km-lab-c", "link-b-c"]

        def session() -> dict:
            return next(s for s in cp.core.sessions() if s["keySession"] == "a-to-c")

        await eventually(lambda: session()["phase"] == "Active", timeout=30)
        assert session()["path"] == ["lab-a", "lab-b", "lab-c"]
        started = time.monotonic()
        drawn, refused = await draw_over_the_path(network.endpoints, DRAW_SECONDS)
        seconds = time.monotonic() - started
        ids = [key_id for key_id, _ in drawn]
        assert len(drawn) >= 40, f"only {len(drawn)} keys in {seconds:.1f}s ({refused} requests refused)"
        assert len(set(ids)) == len(ids) and len({key for _, key in drawn}) == len(drawn), "a key was reused"
        print(f"\nmixed network: {len(drawn) / seconds:.1f} keys/s ({len(drawn) * KEY_BITS / seconds:.0f} bit/s) "
              f"from sae-a to sae-c over a-b (ETSI 014 device) and b-c (emulated), {refused} requests refused")
        for node in ("lab-a", "lab-b"):
            metrics_url = network.endpoints["nodes"][node]["metrics_url"]
            samples = await asyncio.to_thread(scrape, metrics_url, link=DEVICE_LINK)
            # The KMs fitted the device: its largest key, not the plan's 8192-bit bound; nothing burned.
            assert samples[("vqkd_km_link_block_bits",)] == LAB_DEVICE["max_key_size"], samples
            assert sum(v for k, v in samples.items() if k[0] == "vqkd_km_burned_bits_total") == 0, samples
            # Up once the KMs' start (each refused the other's first calls) is a trouble window old.
            deadline = time.monotonic() + TROUBLE_WINDOW_S + 5
            while (await asyncio.to_thread(scrape, metrics_url, link=DEVICE_LINK, state="Up"))[
                    ("vqkd_km_link_state",)] != 1:
                assert time.monotonic() < deadline, f"{node} never saw link {DEVICE_LINK} Up"
                await asyncio.sleep(0.5)
        # The control plane's view of the link follows what its KMs report: Up, nothing burned.
        deadline = time.monotonic() + 10
        while (row := await asyncio.to_thread(links_view, network.endpoints))["state"] != "Up":
            assert time.monotonic() < deadline, f"the control plane never showed {DEVICE_LINK} Up: {row}"
            await asyncio.sleep(0.5)
        assert row["burnedBits"] == 0, row
        device = await asyncio.to_thread(scrape, device_metrics)
        assert sum(v for k, v in device.items() if k[0] == "vqkd_module_delivered_bits_total") > 0
    finally:
        await cp.stop()


def test_the_devices_example_runs_on_the_local_runtime_given_a_directory_of_its_secrets(tmp_path):
    example = load_files([EXAMPLES / "devices.yaml"])
    write_secrets(tmp_path / "secrets", DevCA.load_or_create(tmp_path / "vendor"), example)
    network = LocalNetwork(example, tmp_path / "state", secrets=tmp_path / "secrets")
    network.plan()
    assert sorted(network.processes) == ["km-lab-a", "km-lab-b", "km-lab-c", "link-a-c"]
    lab_b = KMConfig.model_validate_json(network.processes["km-lab-b"].config.read_text())
    assert {link.name: (link.module_url, str(link.module_tls.cert), link.block_bits) for link in lab_b.topology.links} == {
        "a-b": ("https://10.0.1.11:8443", str(tmp_path / "secrets" / "qkd-a-b-lab-b" / "tls.crt"), 8192),
        "b-c": ("https://10.0.2.10:443", str(tmp_path / "secrets" / "qkd-b-c-lab-b" / "tls.crt"), 8192),
    }
    twin = EmulatedLinkConfig.model_validate_json(network.processes["link-a-c"].config.read_text())
    assert (twin.device.max_key_size, twin.device.slave_latency_ms_per_key, twin.device.tls12_only) == (1024, 40, True)
