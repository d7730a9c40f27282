"""End-to-end key throughput and latency across 1, 2 and 4 hops of trusted-node relay.

Starts a chain n0 - n1 - n2 - n3 - n4 of real processes with the local runtime and its
control plane; fast emulated links and a generous SLA keep QKD key and token buckets out
of the way, so what is measured is the KMs relaying. For each hop count, clients on n0 draw
keys over ETSI 014 for an SAE 1, 2 or 4 hops away (the key is one-time-pad encrypted,
MACed, re-encrypted at every intermediate and committed at the destination before the
answer). Prints one JSON line per hop count and one with the per-hop overhead.

    python bench/relay_hops.py [--seconds N] [--clients N] [--batch N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from vqkd.km.etsi014.client import ETSI014Error
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local.clients import sae_client as client
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_text

NODES = 5
HOPS = (1, 2, 4)
KEY_BITS = 256


def network_yaml() -> str:
    docs = [f"""apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: n{i}}}
spec: {{saeIds: [sae-{i}]}}""" for i in range(NODES)]
    docs += [f"""apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: n{i}-n{i + 1}}}
spec:
  nodes: [n{i}, n{i + 1}]
  emulated: {{keyRateBps: 400000000, qber: 0.01, bufferBits: 4294967296}}""" for i in range(NODES - 1)]
    docs.append(f"""apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {{name: bench}}
spec:
  saeIds: [{", ".join(f"sae-{i}" for i in range(NODES))}]
  sla: {{maxKeyRateBps: 1000000000, maxSessions: 16}}
  defaultQos: {{maxBps: 1000000000, timeout: 5000}}""")
    return "\n---\n".join(docs)


async def drive(endpoints: dict, slave: str, seconds: float, clients: int, batch: int) -> dict:
    latencies: list[float] = []
    errors = 0
    first_error = ""
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal errors, first_error
        async with client(endpoints, "sae-0") as c:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    await c.enc_keys(slave, batch, KEY_BITS)
                    latencies.append(time.perf_counter() - started)
                except ETSI014Error as e:
                    errors += 1
                    first_error = first_error or f"HTTP {e.status}: {e.message}"
                    await asyncio.sleep(0.01)

    began = time.monotonic()
    await asyncio.gather(*(one() for _ in range(clients)))
    elapsed = time.monotonic() - began
    latencies.sort()
    q = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3) if latencies else None
    return {
        "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
        "keys_per_s": round(len(latencies) * batch / elapsed, 1),
        "key_mbit_per_s": round(len(latencies) * batch * KEY_BITS / elapsed / 1e6, 3),
        "p50_ms": q(0.5), "p99_ms": q(0.99), **({"first_error": first_error} if first_error else {}),
    }


async def main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="vqkd-bench-relay-") as tmp:
        network = LocalNetwork(load_text(network_yaml(), "relay-bench"), Path(tmp), log_level="WARNING",
                               control_plane="auto")
        control = LocalControlPlane(network, admission=AdmissionSettings(inactivity_timeout_s=3600))
        await control.start()
        machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
        try:
            await asyncio.sleep(args.warmup)  # let the pools fill
            results = {}
            for hops in HOPS:
                async with client(network.endpoints, "sae-0") as c:  # open the session before timing
                    for _ in range(100):
                        try:
                            await c.enc_keys(f"sae-{hops}", 1, KEY_BITS)
                            break
                        except ETSI014Error:
                            await asyncio.sleep(0.1)
                result = await drive(network.endpoints, f"sae-{hops}", args.seconds, args.clients, args.batch)
                results[hops] = result
                print(json.dumps({"bench": "relay_hops", "hops": hops, "batch": args.batch, "key_bits": KEY_BITS,
                                  "clients": args.clients, **result, "machine": machine}), flush=True)
            p50 = {h: r["p50_ms"] for h, r in results.items()}
            if all(v is not None for v in p50.values()):
                print(json.dumps({"bench": "relay_per_hop_overhead", "p50_ms_per_extra_hop":
                                  round((p50[4] - p50[1]) / 3, 3),
                                  "throughput_ratio_4_over_1": round(results[4]["keys_per_s"] / results[1]["keys_per_s"], 3),
                                  "machine": machine}), flush=True)
        finally:
            await control.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="keys per enc_keys request")
    parser.add_argument("--warmup", type=float, default=3.0)
    asyncio.run(main(parser.parse_args()))
