"""A KM reaches a QKD device that has its own CA with the credentials configured for that link.

The device here is the emulated module, but its ends trust only a "vendor" CA and present
certificates from it, as a real device would; the KMs speak to each other and to their
applications with the network's own CA.
"""

from __future__ import annotations

import asyncio

from conftest import PKI, free_port, wait_for_port
from vqkd.km import identity
from vqkd.km.etsi014.client import ETSI014Client


async def test_kms_use_the_links_device_credentials(tmp_path, pki, processes):
    vendor = PKI(tmp_path / "vendor-pki")
    ports = {name: free_port() for name in ("a", "b", "admin", "api-a", "grpc-a", "met-a", "api-b", "grpc-b", "met-b")}
    processes.start("vqkd.km.emulator", {
        "link": "ab", "key_rate_bps": 4e6, "qber": 0.01, "admin_listen": f"127.0.0.1:{ports['admin']}",
        "ends": {end: {"listen": f"127.0.0.1:{ports[end]}", "sae_id": node, "client": identity.km(node).uri,
                       "kme_id": f"device-{end}", "tls": vendor.paths(identity.module("ab", end))}
                 for end, node in (("a", "A"), ("b", "B"))},
    }, "device")
    for me, peer, end in (("A", "B", "a"), ("B", "A", "b")):
        p = me.lower()
        processes.start("vqkd.km", {
            "node": me, "kme_id": me, "etsi014_listen": f"127.0.0.1:{ports['api-' + p]}",
            "grpc_listen": f"127.0.0.1:{ports['grpc-' + p]}", "metrics_listen": f"127.0.0.1:{ports['met-' + p]}",
            "tls": pki.paths(identity.km(me)), "topology": {
                "saes": {"sae-A": "A", "sae-B": "B"},
                "links": [{"name": "ab", "peer_node": peer, "peer_kme_id": peer,
                           "peer_grpc": f"127.0.0.1:{ports['grpc-' + peer.lower()]}",
                           "module_url": f"https://127.0.0.1:{ports[end]}", "module_sae_id": me,
                           "peer_module_sae_id": peer, "block_bits": 1024,
                           "module_tls": vendor.paths(identity.km(me))}]},
        }, f"km-{me}")
    for port in ports.values():
        wait_for_port(port)
    master = ETSI014Client(f"https://127.0.0.1:{ports['api-a']}", pki.files(identity.sae("sae-A")))
    slave = ETSI014Client(f"https://127.0.0.1:{ports['api-b']}", pki.files(identity.sae("sae-B")))
    async with master, slave:
        for _ in range(100):
            if (await master.status("sae-B")).stored_key_count >= 4:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no key drawn from the device:\n" + processes.log("km-A"))
        sent = await master.enc_keys("sae-B", 4, 256)
        assert await slave.dec_keys("sae-A", [k for k, _ in sent]) == sent
