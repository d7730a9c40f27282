"""Demonstration scenarios on the local runtime, printed step by step for a person to follow."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.operator.local import paper
from vqkd.operator.local.clients import sae_client
from vqkd.operator.local.processes import LocalNetwork

KEYS = 4
KEY_BITS = 256
WAIT_FOR_KEY_S = 30.0


async def wait_for_key(client: ETSI014Client, slave: str, needed: int) -> None:
    deadline = time.monotonic() + WAIT_FOR_KEY_S
    while True:
        status = await client.status(slave)
        have = status.stored_key_count * status.key_size
        if have >= needed:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"no QKD key after {WAIT_FOR_KEY_S:.0f}s ({have} of {needed} bits); is the link up?")
        print(f"  waiting for QKD key: {have}/{needed} bits in the pool", flush=True)
        await asyncio.sleep(0.5)


async def two_nodes(endpoints: dict) -> bool:
    saes = endpoints["saes"]
    nodes = list(endpoints["nodes"])
    master = next(s for s, i in saes.items() if i["node"] == nodes[0])
    slave = next(s for s, i in saes.items() if i["node"] == nodes[1])
    alice, bob = sae_client(endpoints, master), sae_client(endpoints, slave)
    try:
        print(f"master SAE {master} on {nodes[0]}, slave SAE {slave} on {nodes[1]}")
        await wait_for_key(alice, slave, KEYS * KEY_BITS)
        status = await alice.status(slave)
        print(f"status: {status.source_KME_ID} -> {status.target_KME_ID}, {status.stored_key_count} keys of "
              f"{status.key_size} bits stored")
        sent = await alice.enc_keys(slave, KEYS, KEY_BITS)
        print(f"{master}: enc_keys returned {len(sent)} keys of {KEY_BITS} bits")
        received = await bob.dec_keys(master, [key_id for key_id, _ in sent])
        print(f"{slave}: dec_keys returned {len(received)} keys")
        same = dict(sent) == dict(received)
        for key_id, _ in sent:
            print(f"  {key_id}  {'identical at both ends' if dict(received).get(key_id) == dict(sent)[key_id] else 'MISMATCH'}")
        try:
            await bob.dec_keys(master, [sent[0][0]])
            print("a key was handed out twice: FAILED")
            same = False
        except ETSI014Error as e:
            print(f"asking again for {sent[0][0]}: HTTP {e.status} ({e.message}) — each key is delivered once")
        return same
    finally:
        await alice.close()
        await bob.close()


def run(scenario: str, manifest, state_dir: Path, plot: str | None = None) -> int:
    if scenario == "paper":
        ok = asyncio.run(paper.run(manifest, state_dir, plot))
        print("demo passed: every pair holds identical keys" if ok else "demo FAILED")
        return 0 if ok else 1
    network = LocalNetwork(manifest, state_dir, log_level="WARNING")
    print(f"starting {len(manifest.nodes)} key managers and {len(manifest.links)} emulated QKD links "
          f"(state in {network.state_dir})", flush=True)
    network.start()
    try:
        ok = asyncio.run(two_nodes(network.endpoints))
    finally:
        network.stop()
        print("network stopped", flush=True)
    print("demo passed: both SAEs hold the same keys" if ok else "demo FAILED")
    return 0 if ok else 1
