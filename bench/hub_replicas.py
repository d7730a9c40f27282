"""Relayed key rate through a hub node run as 1 and 2 KM replicas, and a replica's failover.

A star of real processes on the local runtime and its control plane: hub ``h`` with four
leaves ``l1`` … ``l4``, fast emulated links and a generous SLA, so what is measured is the
KMs. Pairs l1→l2 and l3→l4 are relayed by the hub. For each replica count of the hub,
clients draw keys over ETSI 014 for ``--seconds`` and the relayed rate is printed. Then,
with two replicas, ETSI 014 round trips run on both pairs while one hub replica is killed
(SIGKILL): the failover window (from the kill until the replica is back with its topology
and sessions), the requests that failed, the keys a master got that its slave could not
have (lost) and mismatched keys are printed. One JSON line each; the machine's cores in all.

All processes share the machine's cores: on a small machine a second replica adds a process
competing for the same cores, so the rate says what replicas cost there, not what they buy
on a cluster with a core per pod.

    python bench/hub_replicas.py [--seconds N] [--clients N] [--batch N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vqkd.km.etsi014.client import ETSI014Error
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local.clients import sae_client
from vqkd.operator.local.paper import RoundTrips
from vqkd.operator.local.processes import LocalNetwork, km_process
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.resources.loader import load_text

KEY_BITS = 256
LEAVES = 4
PAIRS = (("sae-l1", "sae-l2"), ("sae-l3", "sae-l4"))
BACK_WITHIN_S = 30.0


def network_yaml(replicas: int) -> str:
    docs = [f"""apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: h}}
spec: {{saeIds: [sae-h], km: {{replicas: {replicas}}}}}"""]
    for i in range(1, LEAVES + 1):
        docs.append(f"""apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: l{i}}}
spec: {{saeIds: [sae-l{i}]}}""")
        docs.append(f"""apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: h-l{i}}}
spec:
  nodes: [h, l{i}]
  emulated: {{keyRateBps: 400000000, qber: 0.01, bufferBits: 4294967296}}""")
    docs.append(f"""apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {{name: bench}}
spec:
  saeIds: [sae-h, {", ".join(f"sae-l{i}" for i in range(1, LEAVES + 1))}]
  sla: {{maxKeyRateBps: 1000000000, maxSessions: 16}}
  defaultQos: {{maxBps: 1000000000, timeout: 5000}}""")
    return "\n---\n".join(docs)


async def first_keys(endpoints: dict) -> None:
    """Open every pair's session and see a key through before anything is timed."""
    for master, slave in PAIRS:
        pair = RoundTrips(master, slave)
        if await pair.until_first_key(endpoints, timeout_s=60) is None:
            raise SystemExit(f"no key for {master} -> {slave}: {pair.failures[-1:]}")


async def relayed_rate(endpoints: dict, seconds: float, clients: int, batch: int) -> dict:
    """``clients`` per pair drawing ``batch`` keys per enc_keys for ``seconds``."""
    done = errors = 0
    first_error = ""
    stop = time.monotonic() + seconds

    async def one(master: str, slave: str) -> None:
        nonlocal done, errors, first_error
        async with sae_client(endpoints, master) as c:
            while time.monotonic() < stop:
                try:
                    await c.enc_keys(slave, batch, KEY_BITS)
                    done += 1
                except ETSI014Error as e:
                    errors += 1
                    first_error = first_error or f"HTTP {e.status}: {e.message}"
                    await asyncio.sleep(0.01)

    began = time.monotonic()
    await asyncio.gather(*(one(m, s) for m, s in PAIRS for _ in range(clients)))
    elapsed = time.monotonic() - began
    return {"requests": done, "errors": errors, "seconds": round(elapsed, 2),
            "relayed_keys_per_s": round(done * batch / elapsed, 1),
            "relayed_mbit_per_s": round(done * batch * KEY_BITS / elapsed / 1e6, 3),
            **({"first_error": first_error} if first_error else {})}


def healthz(cp: LocalControlPlane, replica: int) -> dict:
    url = cp.network.endpoints["nodes"]["h"]["replicas"][replica]["metrics_url"].rsplit("/", 1)[0] + "/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def failover(cp: LocalControlPlane, seconds: float) -> dict:
    """Round trips on both pairs while hub replica 1 is killed and comes back."""
    endpoints = cp.network.endpoints
    pairs = [RoundTrips(master, slave, dec_retry_s=5.0) for master, slave in PAIRS]
    stop = asyncio.Event()
    load = [asyncio.create_task(pair.run(endpoints, stop, pause_s=0.02, rounds=10**6)) for pair in pairs]
    killed = healthz(cp, 1)["incarnation"]
    try:
        await asyncio.sleep(seconds / 2)
        killed_at = time.monotonic()
        cp.network.processes[km_process("h", 1)].popen.kill()
        while True:
            seen, held = cp.host.replica_liveness("h", 1), cp.host.topologies.held("h", 1)
            if seen.ok and seen.incarnation != killed and held is not None and held.incarnation == seen.incarnation:
                break
            if time.monotonic() - killed_at > BACK_WITHIN_S:
                raise SystemExit(f"hub replica 1 not back within {BACK_WITHIN_S:.0f} s")
            await asyncio.sleep(0.05)
        back_at = time.monotonic()
        await asyncio.sleep(seconds / 2)
    finally:
        stop.set()
        await asyncio.gather(*load)
    failures = [at for pair in pairs for at, _ in pair.failures]
    return {
        "replica_back_s": round(back_at - killed_at, 3),
        "failed_requests": len(failures),
        "failing_from_kill_s": round(min(failures) - killed_at, 3) if failures else None,
        "failing_until_after_kill_s": round(max(failures) - killed_at, 3) if failures else None,
        "keys": sum(pair.ok for pair in pairs), "lost": sum(pair.lost for pair in pairs),
        "mismatched": sum(pair.mismatched for pair in pairs),
    }


async def run(replicas: int, args, machine: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="vqkd-bench-hub-") as tmp:
        network = LocalNetwork(load_text(network_yaml(replicas), "hub-bench"), Path(tmp), log_level="WARNING",
                               control_plane="auto")
        cp = LocalControlPlane(network, admission=AdmissionSettings(inactivity_timeout_s=3600))
        await cp.start()
        try:
            await asyncio.sleep(args.warmup)  # let the pools fill
            with contextlib.redirect_stdout(sys.stderr):
                await first_keys(network.endpoints)
            rate = await relayed_rate(network.endpoints, args.seconds, args.clients, args.batch)
            print(json.dumps({"bench": "hub_replicas", "hub_replicas": replicas, "batch": args.batch,
                              "key_bits": KEY_BITS, "clients_per_pair": args.clients, **rate, "machine": machine}),
                  flush=True)
            if replicas > 1:
                print(json.dumps({"bench": "hub_replica_failover", "hub_replicas": replicas,
                                  **await failover(cp, args.seconds), "machine": machine}), flush=True)
        finally:
            await cp.stop()


async def main(args) -> None:
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    for replicas in (1, 2):
        await run(replicas, args, machine)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8, help="clients per relayed pair")
    parser.add_argument("--batch", type=int, default=16, help="keys per enc_keys request")
    parser.add_argument("--warmup", type=float, default=3.0)
    asyncio.run(main(parser.parse_args()))
