"""A new site added to, and removed from, the paper's network while it serves keys.

Starts ``examples/paper.yaml`` as real processes with the local runtime and its control
plane, keeps ETSI 014 round trips going on the pairs 0–1, 2–3 (relayed by node 0) and 4–5,
then, ``--repeat`` times: applies node-6 (its KM, a link to node-0 with its module pair, a
user, an SAE and a session to sae-0), times until the new pair's first key made the round
trip, lets it draw keys for a second and deletes the site again. The change goes through
the same entry point as ``vqkd apply`` / ``vqkd delete`` (the runtime's ``changes``), without
the command's own start-up. Prints one JSON line per repetition and a summary line.

    python bench/reconfigure.py [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.local import paper
from vqkd.operator.local.paper import RoundTrips
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.resources.loader import load_files

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {"0-1": ("sae-0", "sae-1"), "2-3": ("sae-2", "sae-3"), "4-5": ("sae-4", "sae-5")}
SITE = (ROOT / "examples" / "paper-new-site.yaml").read_text()


async def once(cp: LocalControlPlane, pairs: dict[str, RoundTrips]) -> dict:
    started = time.monotonic()
    await cp.changes.apply([("node-6.yaml", SITE)])
    applied = time.monotonic()
    new_pair = RoundTrips("sae-6", "sae-0")
    first_key = await new_pair.until_first_key(cp.network.endpoints, timeout_s=30)
    stop = asyncio.Event()
    drawing = asyncio.create_task(new_pair.run(cp.network.endpoints, stop))
    await asyncio.sleep(1.0)
    stop.set()
    await drawing
    deleting = time.monotonic()
    await cp.changes.delete([("node-6.yaml", SITE)])
    deleted = time.monotonic()
    return {
        "apply_s": round(applied - started, 3),
        "first_key_after_apply_s": round(first_key - applied, 3) if first_key else None,
        "apply_to_first_key_s": round(first_key - started, 3) if first_key else None,
        "new_pair_keys": new_pair.ok, "new_pair_mismatched": new_pair.mismatched,
        "delete_s": round(deleted - deleting, 3),
        "failed_during_apply": {name: pair.failed_between(started, applied) for name, pair in pairs.items()},
        "failed_during_delete": {name: pair.failed_between(deleting, deleted) for name, pair in pairs.items()},
    }


async def main(repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vqkd-reconfigure-") as state:
        network = LocalNetwork(load_files([ROOT / "examples" / "paper.yaml"]), Path(state), log_level="WARNING",
                               control_plane="auto")
        cp = LocalControlPlane(network, admission=AdmissionSettings(inactivity_timeout_s=600))
        await cp.start()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # progress; stdout carries the JSON lines
                await paper.wait_active(cp, ["session-0-1", "session-2-3", "session-4-5"])
            pairs = {name: RoundTrips(master, slave) for name, (master, slave) in PAIRS.items()}
            for pair in pairs.values():
                if await pair.until_first_key(network.endpoints, timeout_s=30) is None:
                    raise SystemExit(f"no key for {pair.master} -> {pair.slave}: {pair.failures[-1:]}")
                pair.ok, pair.failures = 0, []
            stop = asyncio.Event()
            load = [asyncio.create_task(pair.run(network.endpoints, stop, rounds=10**6)) for pair in pairs.values()]
            results = []
            try:
                await asyncio.sleep(1.0)
                for _ in range(repeat):
                    results.append(await once(cp, pairs))
                    print(json.dumps(results[-1]), flush=True)
            finally:
                stop.set()
                await asyncio.gather(*load)
            first_keys = [r["apply_to_first_key_s"] for r in results if r["apply_to_first_key_s"] is not None]
            print(json.dumps({
                "repeat": repeat,
                "apply_to_first_key_s_median": statistics.median(first_keys) if first_keys else None,
                "first_key_after_apply_s_max": max((r["first_key_after_apply_s"] or 0) for r in results),
                "pairs": {name: {"keys": pair.ok, "failed": len(pair.failures), "mismatched": pair.mismatched,
                                 "first_failure": pair.failures[0][1] if pair.failures else ""}
                          for name, pair in pairs.items()},
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()},
            }), flush=True)
        finally:
            await cp.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="how many times the site is added and removed")
    asyncio.run(main(parser.parse_args().repeat))
