"""Session set-up time on the paper's network: both ETSI 004 opens until Operative.

Starts examples/paper.yaml with the local runtime and its control plane, then, one pair at
a time, the source application opens (status 1: peer not yet connected), the destination
opens with the same Key_stream_ID, and the clock stops when the source's first GET_KEY
succeeds — admission, routing, configuration of every KM on the path and one key relayed.
Prints one JSON line.

    python bench/session_setup.py [--sessions N]
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

import aiohttp

from vqkd.km.tls import client_context
from vqkd.operator.local.clients import sae_tls
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_files

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("sae-0", "sae-1"), ("sae-2", "sae-3"), ("sae-4", "sae-5")]


async def call(endpoints: dict, sae: str, op: str, body: dict) -> dict:
    ctx = client_context(sae_tls(endpoints, sae))
    url = endpoints["nodes"][endpoints["saes"][sae]["node"]]["etsi014_url"] + f"/api/v1/etsi004/{op}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.post(url, json=body) as resp:
            return await resp.json()


async def one_session(endpoints: dict, source: str, destination: str) -> tuple[float, int]:
    started = time.perf_counter()
    opened = await call(endpoints, source, "open_connect",
                        {"source": source, "destination": destination, "QoS": {"Timeout": 1}})
    ksid = opened["Key_stream_ID"]
    await call(endpoints, destination, "open_connect",
               {"source": source, "destination": destination, "Key_stream_ID": ksid, "QoS": {"Timeout": 5000}})
    while True:
        got = await call(endpoints, source, "get_key", {"Key_stream_ID": ksid, "index": 0})
        if got["status"] == 0:
            break
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    await call(endpoints, source, "close", {"Key_stream_ID": ksid})
    return elapsed, len(got.get("Key_buffer", ""))


async def main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="vqkd-bench-setup-") as tmp:
        manifest = load_files([ROOT / "examples" / "paper.yaml"])
        manifest.sessions.clear()  # sessions are opened by the applications here
        network = LocalNetwork(manifest, Path(tmp), log_level="WARNING", control_plane="auto")
        control = LocalControlPlane(network, admission=AdmissionSettings(inactivity_timeout_s=3600))
        await control.start()
        try:
            await asyncio.sleep(2.0)  # QKD key in the pools
            times = []
            for i in range(args.sessions):
                source, destination = PAIRS[i % len(PAIRS)]
                elapsed, _ = await one_session(network.endpoints, source, destination)
                times.append(elapsed)
            times.sort()
            q = lambda p: round(times[min(len(times) - 1, int(p * len(times)))] * 1000, 2)
            print(json.dumps({
                "bench": "session_setup", "topology": "paper", "sessions": len(times),
                "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(times[-1] * 1000, 2),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()},
            }), flush=True)
        finally:
            await control.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30)
    asyncio.run(main(parser.parse_args()))
