"""Delivered key rate and burned fraction of one link against QKD device profiles.

For each profile it starts the emulated device pair with that profile and two KMs configured
by hand in front of it (tests/device_pair.py, the 8192-bit block size a lab would copy from
the twin), lets one SAE on each node draw keys as master while the SAE on the other node
collects them (4 keys of 256 bits per request, both directions at once), then stops the
device's production and waits until no drawn key is still awaited. One JSON line per profile:

    python bench/device_link.py [--seconds N] [--profiles lab,small-keys,...]

See bench/README.md for the fields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# The harness is the tests' own (the same processes, configured the same way).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import PKI, Processes  # noqa: E402
from device_pair import NODES, PEER, DevicePair, sae, start_device_pair  # noqa: E402

from vqkd.km.etsi014.client import ETSI014Error  # noqa: E402

LAB = {"max_key_size": 1024, "key_size": 256, "max_keys_per_request": 128, "slave_latency_ms_per_key": 40,
       "sync_lag_ms": 300, "tls12_only": True}
# name -> (device profile, the device's secret key rate in bit/s)
PROFILES = {
    "twin": ({}, 2_000_000),
    "lab": (LAB, 40_000),
    "lab-fast-source": (LAB, 400_000),  # more key than the slave ends can hand over
    "small-keys": ({**LAB, "max_key_size": 256}, 10_000),
    "lab-errors-5pct": ({**LAB, "error_rate": 0.05}, 40_000),
    "slow-lagging": ({**LAB, "slave_latency_ms_per_key": 100, "sync_lag_ms": 2000}, 10_000),
}
KEYS_PER_REQUEST, KEY_BITS = 4, 256
# Longest wait, after production stops, for drawn keys the peer has not held yet; keys still
# awaited then count as not pooled (a source faster than the slave ends keeps them busy).
DRAIN_S = 20.0


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def round_trips(pair: DevicePair, seconds: float) -> tuple[int, int, int]:
    """(key bits delivered to both SAEs of a pair, round trips, refusals) in ``seconds``."""
    end = time.monotonic() + seconds
    totals = {"bits": 0, "rounds": 0, "refused": 0}

    async def direction(master: str) -> None:
        slave = PEER[master]
        async with pair.client(master) as m, pair.client(slave) as s:
            while time.monotonic() < end:
                try:
                    keys = await m.enc_keys(sae(slave), KEYS_PER_REQUEST, KEY_BITS)
                except ETSI014Error:
                    totals["refused"] += 1
                    await asyncio.sleep(0.02)
                    continue
                if await s.dec_keys(sae(master), [k for k, _ in keys]) != keys:
                    raise AssertionError("the two SAEs got different keys")
                totals["bits"] += KEYS_PER_REQUEST * KEY_BITS
                totals["rounds"] += 1

    await asyncio.gather(*(direction(node) for node in NODES))
    return totals["bits"], totals["rounds"], totals["refused"]


def settled(pair: DevicePair) -> dict[str, float]:
    out = {"module_drawn_bits": 0.0, "pooled_bits": 0.0, "burned_bits": 0.0, "awaiting_bits": 0.0}
    for node in NODES:
        m = pair.metrics(node)
        out["module_drawn_bits"] += m[("vqkd_km_module_drawn_bits_total",)]
        out["pooled_bits"] += m[("vqkd_km_link_drawn_bits_total",)]
        out["awaiting_bits"] += m[("vqkd_km_awaiting_peer_bits",)]
        out["burned_bits"] += sum(v for k, v in m.items() if k[0] == "vqkd_km_burned_bits_total")
    return out


async def run_profile(name: str, seconds: float, work: Path, pki: PKI) -> dict:
    profile, key_rate = PROFILES[name]
    processes = Processes(work / name)
    (work / name).mkdir()
    try:
        pair = start_device_pair(pki, processes, work / name / "vendor", profile, key_rate_bps=key_rate)
        bits, rounds, refused = await round_trips(pair, seconds)
        pair.control(key_rate_bps=0)
        deadline = time.monotonic() + DRAIN_S
        while (totals := settled(pair))["awaiting_bits"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stats = {node: await pair.link_stats(node) for node in NODES}
        latency = pair.metrics("B")[("vqkd_km_module_seconds_per_key",)]
    finally:
        processes.stop_all()
    drawn = totals["module_drawn_bits"]
    return {
        "profile": name, "device": profile, "device_key_rate_bps": key_rate, "seconds": seconds,
        "delivered_bps": round(bits / seconds), "round_trips": rounds, "refused": refused,
        **{k: int(v) for k, v in totals.items()},
        "pooled_fraction": round(totals["pooled_bits"] / drawn, 4) if drawn else None,
        "burned_fraction": round(totals["burned_bits"] / drawn, 4) if drawn else None,
        "block_bits": stats["A"].block_bits, "slave_seconds_per_key": round(latency, 4),
        "link_state": {node: f"{s.state} ({s.reason})" for node, s in stats.items()},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="round trips per profile (default 10)")
    parser.add_argument("--profiles", default=",".join(PROFILES), help=f"comma-separated, of {', '.join(PROFILES)}")
    args = parser.parse_args()
    names = [n for n in args.profiles.split(",") if n]
    unknown = sorted(set(names) - set(PROFILES))
    if unknown:
        parser.error(f"unknown profiles {unknown}; choose from {', '.join(PROFILES)}")
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    with tempfile.TemporaryDirectory(prefix="vqkd-device-bench-") as tmp:
        work = Path(tmp)
        pki = PKI(work / "pki")
        for name in names:
            log(f"profile {name}: {args.seconds:.0f} s of round trips")
            print(json.dumps({**await run_profile(name, args.seconds, work, pki), "machine": machine}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
