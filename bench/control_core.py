"""The control core at scale, without processes: admission, routing and reroute times, memory.

Builds a random connected network (a random spanning tree plus random extra links; 1,000
nodes and ~3,000 links by default) with emulated key rates and QBERs, loads it into the
control core with in-memory KMs, and opens 10,000 concurrent sessions the way KMs do: the
source's open request, then the destination's with the session ID. Then the busiest link
reports a QBER above its threshold, so it goes Down and every session crossing it is
rerouted (or Held when no path has the spare rate). Prints one JSON line:

- ``admission_routing_ms``: per session, both open requests until every KM on the path
  confirmed (access, SLA check, path search with reservation, 1 push per KM) — p50/p99/max;
- ``reroute``: the sample's handling — link Down, alarm, and a new path pushed for every
  session on the link (make-before-break) — in total and per affected session;
- ``gc``: the garbage collector's pauses while sessions were opened; the slowest session
  times are these pauses (a full collection walks every session object), not the core;
- ``peak_rss_mb``: the process's peak resident memory (the in-memory KMs' tables included),
  ``python_heap_mb``: what tracemalloc saw allocated at the end (a separate, slower pass is
  avoided: tracemalloc runs only with ``--trace-memory``).

    python bench/control_core.py [--nodes N] [--links N] [--sessions N] [--seed S] [--trace-memory]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import resource
import sys
import time
import tracemalloc

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.access import Credentials
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.memory_kms import InMemoryKMs
from vqkd.operator.control.monitoring import LinkSample
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.resources.models import QKDLink, QKDNode, QoS, UserProfile

SAES_PER_NODE = 2
SAES_PER_USER = 10
MIN_RATES_BPS = (0, 500, 1000, 2000)


def build_resources(nodes: int, links: int, rng: random.Random) -> tuple[list, list[Endpoint]]:
    names = [f"node-{i}" for i in range(nodes)]
    pairs: set[tuple[int, int]] = set()
    for i in range(1, nodes):  # a random spanning tree keeps the network connected
        pairs.add((rng.randrange(i), i))
    while len(pairs) < links:
        a, b = sorted(rng.sample(range(nodes), 2))
        pairs.add((a, b))
    saes = [Endpoint(name, f"sae-{i}-{k}") for i, name in enumerate(names) for k in range(SAES_PER_NODE)]
    resources: list = [
        QKDNode.model_validate({"metadata": {"name": name},
                                "spec": {"saeIds": [e.sae_id for e in saes if e.node == name]}})
        for name in names
    ]
    for a, b in sorted(pairs):
        resources.append(QKDLink.model_validate({
            "metadata": {"name": f"link-{a}-{b}"},
            "spec": {"nodes": [names[a], names[b]],
                     "emulated": {"keyRateBps": rng.randrange(50_000, 500_000), "qber": rng.uniform(0.005, 0.06)}},
        }))
    for u in range(0, len(saes), SAES_PER_USER):
        owned = [e.sae_id for e in saes[u:u + SAES_PER_USER]]
        resources.append(UserProfile.model_validate({
            "metadata": {"name": f"user-{u // SAES_PER_USER}"},
            "spec": {"saeIds": owned, "priority": rng.randrange(4),
                     "sla": {"maxKeyRateBps": 10_000_000, "maxSessions": 1000}},
        }))
    return resources, saes


def percentile(sorted_values: list[float], share: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(share * (len(sorted_values) - 1)))]


class GCPauses:
    """Collects the duration of every garbage collection while active."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self.full_collections = 0
        self._started = 0.0

    def __enter__(self) -> GCPauses:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.pauses_ms.append((time.perf_counter() - self._started) * 1000)
        self.full_collections += info["generation"] == 2


def km_tables_consistent(core: ControlCore, kms: InMemoryKMs) -> bool:
    """Every Active session is held by exactly the KMs of its path, at its current version."""
    for session in core.admission.sessions.values():
        holders = kms.holders(session.id)
        if session.state is AdmissionState.ACTIVE:
            if holders != set(session.route.nodes):
                return False
            if any(kms.entry(node, session.id).version != session.version for node in holders):
                return False
    return True


async def open_sessions(core: ControlCore, saes: list[Endpoint], count: int, rng: random.Random,
                        timings_ms: list[float], refused: dict[str, int]) -> None:
    """Open ``count`` sessions as KMs do: the source's open, then the destination's with the ID."""
    for _ in range(count):
        source, destination = rng.sample(saes, 2)
        while destination.node == source.node:
            destination = rng.choice(saes)
        qos = QoS(min_bps=rng.choice(MIN_RATES_BPS), max_bps=8000)
        begin = time.perf_counter()
        opened = await core.open_session(source.node, Credentials(source.sae_id), source, destination, qos)
        if opened.accepted:
            opened = await core.open_session(destination.node, Credentials(destination.sae_id), source,
                                             destination, session_id=opened.session_id)
        timings_ms.append((time.perf_counter() - begin) * 1000)
        if not opened.accepted:
            refused[opened.reason] = refused.get(opened.reason, 0) + 1


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    started = time.perf_counter()
    resources, saes = build_resources(args.nodes, args.links, rng)
    kms = InMemoryKMs(record_calls=False)
    core = ControlCore(kms)
    for item in resources:
        await core.apply(item)
    setup_s = time.perf_counter() - started

    timings_ms = []
    refused: dict[str, int] = {}
    with GCPauses() as collections:
        await open_sessions(core, saes, args.sessions, rng, timings_ms, refused)
    timings_ms.sort()
    active = [s for s in core.admission.sessions.values() if s.state is AdmissionState.ACTIVE]

    busiest = max(core.routing.loads, key=lambda name: len(core.routing.loads[name].sessions))
    crossing = core.routing.sessions_on_link(busiest)
    begin = time.perf_counter()
    await core.link_sample(LinkSample(busiest, core.clock(), key_rate_bps=100_000, qber=0.2))
    reroute_s = time.perf_counter() - begin
    after = [core.session(session_id) for session_id in crossing]

    return {
        "bench": "control_core",
        "nodes": args.nodes,
        "links": len(core.topology.links),
        "sessions_requested": args.sessions,
        "sessions_active": len(active),
        "sessions_refused": refused,
        "mean_path_hops": round(sum(len(s.route.links) for s in active) / max(len(active), 1), 2),
        "setup_s": round(setup_s, 3),
        "admission_routing_ms": {
            "p50": round(percentile(timings_ms, 0.50), 3),
            "p99": round(percentile(timings_ms, 0.99), 3),
            "max": round(timings_ms[-1], 3),
        },
        "gc": {
            "collections": len(collections.pauses_ms),
            "full_collections": collections.full_collections,
            "max_pause_ms": round(max(collections.pauses_ms, default=0.0), 1),
        },
        "reroute": {
            "link": busiest,
            "sessions_on_link": len(crossing),
            "rerouted": sum(s.state is AdmissionState.ACTIVE and busiest not in s.route.links for s in after),
            "held": sum(s.state is AdmissionState.HELD for s in after),
            "total_ms": round(reroute_s * 1000, 2),
            "per_session_ms": round(reroute_s * 1000 / max(len(crossing), 1), 3),
            "alarm": [a.kind.value for a in core.monitoring.active_alarms()],
        },
        "km_tables_consistent": km_tables_consistent(core, kms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--links", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trace-memory", action="store_true",
                        help="also measure the Python heap with tracemalloc (slows everything down)")
    args = parser.parse_args()
    if args.links < args.nodes - 1:
        parser.error(f"--links must be at least --nodes - 1 ({args.nodes - 1}) for a connected network")
    if args.trace_memory:
        tracemalloc.start()
    result = asyncio.run(run(args))
    if args.trace_memory:
        result["python_heap_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)
    result["python"] = platform.python_version()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
