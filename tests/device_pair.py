"""Two KMs configured by hand in front of an emulated QKD device pair with a device profile.

This is how a lab wires vqkd to two devices without the control plane: each KM's link names
its end of the module, the SAE IDs the KMs have there and the block size bound. The device's
ends trust only a "vendor" CA, as a real device would; the KMs use the network's CA among
themselves and with their applications. Used by the device-link tests and bench/device_link.py.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import PKI, Processes, free_port, wait_for_port
from vqkd.km import identity
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.etsi014.client import ETSI014Client
from vqkd.km.v1 import km_pb2, km_pb2_grpc

LINK = "ab"
NODES = ("A", "B")
END = {"A": "a", "B": "b"}
PEER = {"A": "B", "B": "A"}


def sae(node: str) -> str:
    return f"sae-{node}"


@dataclass
class DevicePair:
    pki: PKI
    processes: Processes
    ports: dict[str, int]

    def url(self, node: str) -> str:
        return f"https://127.0.0.1:{self.ports['api-' + node]}"

    def client(self, node: str) -> ETSI014Client:
        """The ETSI 014 client of the SAE on ``node``."""
        return ETSI014Client(self.url(node), self.pki.files(identity.sae(sae(node))), timeout_s=15)

    def control(self, **changes) -> dict:
        """Change the emulated device pair while it runs (see the twin's /control)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports['admin']}/control",
                                     data=json.dumps(changes).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def metrics(self, node: str) -> dict[tuple[str, ...], float]:
        """The KM's samples of link ``ab``, keyed by name and the labels other than node, link and replica."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['met-' + node]}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("link") == LINK:
                    rest = tuple(f"{k}={v}" for k, v in sorted(s.labels.items())
                                 if k not in ("node", "link", "replica"))
                    samples[(s.name, *rest)] = s.value
        return samples

    async def link_stats(self, node: str) -> km_pb2.LinkStats:
        """The KM's LinkStats of link ``ab``, as the control plane reads them."""
        creds = grpc_channel_credentials(self.pki.files(identity.controller()))
        async with grpc.aio.secure_channel(f"127.0.0.1:{self.ports['grpc-' + node]}", creds) as channel:
            stats = await km_pb2_grpc.KeyManagerControlStub(channel).GetStats(km_pb2.GetStatsRequest(), timeout=5)
        return next(ls for ls in stats.links if ls.link == LINK)


def start_device_pair(pki: PKI, processes: Processes, vendor_dir: Path, device: dict, *,
                      key_rate_bps: float, block_bits: int = 8192, sync_timeout_s: float | None = None) -> DevicePair:
    """Start the emulated pair (profile ``device``, EmulatedLinkConfig.device) and two KMs."""
    vendor = PKI(vendor_dir)
    names = ("a", "b", "admin", *(f"{kind}-{node}" for node in NODES for kind in ("api", "grpc", "met")))
    ports = {name: free_port() for name in names}
    processes.start("vqkd.km.emulator", {
        "link": LINK, "key_rate_bps": key_rate_bps, "qber": 0.0, "admin_listen": f"127.0.0.1:{ports['admin']}",
        "device": device,
        "ends": {END[node]: {"listen": f"127.0.0.1:{ports[END[node]]}", "sae_id": node,
                             "client": identity.km(node).uri, "kme_id": f"device-{END[node]}",
                             "tls": vendor.paths(identity.module(LINK, END[node]))}
                 for node in NODES},
    }, "device")
    link_tuning = {"block_bits": block_bits}
    if sync_timeout_s is not None:
        link_tuning["sync_timeout_s"] = sync_timeout_s
    for node in NODES:
        peer = PEER[node]
        processes.start("vqkd.km", {
            "node": node, "kme_id": node, "etsi014_listen": f"127.0.0.1:{ports['api-' + node]}",
            "grpc_listen": f"127.0.0.1:{ports['grpc-' + node]}", "metrics_listen": f"127.0.0.1:{ports['met-' + node]}",
            "tls": pki.paths(identity.km(node)),
            "topology": {
                "saes": {sae(n): n for n in NODES},
                "links": [{"name": LINK, "peer_node": peer, "peer_kme_id": peer,
                           "peer_grpc": f"127.0.0.1:{ports['grpc-' + peer]}",
                           "module_url": f"https://127.0.0.1:{ports[END[node]]}", "module_sae_id": node,
                           "peer_module_sae_id": peer, "module_tls": vendor.paths(identity.km(node)), **link_tuning}],
            },
        }, f"km-{node}")
    for port in ports.values():
        wait_for_port(port)
    return DevicePair(pki, processes, ports)
