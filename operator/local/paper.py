"""The paper's proof of concept (§4, Fig. 4) on the local runtime.

Six nodes in a star around node-0 plus a link between node-4 and node-5, with an access
control, admission control, routing element and monitoring; three pairs of applications
draw keys in parallel: 0–1 and 4–5 over their own links, 2–3 through trusted node 0.
The demo prints each KM's events in order with timestamps, checks that both ends of every
pair hold identical keys and can draw the timeline like Fig. 4.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from vqkd.km.etsi014.client import ETSI014Error
from vqkd.operator.local.clients import sae_client
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.local.processes import LocalNetwork

KEYS_PER_REQUEST = 4
KEY_BITS = 256
ROUNDS = 3
READY_TIMEOUT_S = 60.0


async def wait_active(control: LocalControlPlane, names: list[str]) -> None:
    """Until every declared session is Active and every link has key; progress on one line."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        sessions = {s["keySession"]: s for s in control.core.sessions() if s["keySession"] in names}
        active = [n for n in names if sessions.get(n, {}).get("phase") == "Active"]
        print(f"\r  sessions active: {len(active)}/{len(names)}", end="", flush=True)
        if len(active) == len(names):
            print()
            return
        if time.monotonic() > deadline:
            print()
            raise SystemExit(f"sessions not active after {READY_TIMEOUT_S:.0f}s: "
                             + "; ".join(f"{n}: {sessions.get(n, {}).get('reason')}" for n in names if n not in active))
        await asyncio.sleep(0.2)


async def exchange(endpoints: dict, master: str, slave: str) -> tuple[int, int]:
    """Rounds of enc_keys at the master and dec_keys at the slave; (keys matched, mismatched)."""
    m, s = sae_client(endpoints, master), sae_client(endpoints, slave)
    matched = mismatched = 0
    try:
        for _ in range(ROUNDS):
            for attempt in range(50):
                try:
                    sent = await m.enc_keys(slave, KEYS_PER_REQUEST, KEY_BITS)
                    break
                except ETSI014Error as e:
                    if e.status != 503 or attempt == 49:
                        raise
                    await asyncio.sleep(0.1)  # QKD key still accumulating or token bucket refilling
            got = dict(await s.dec_keys(master, [k for k, _ in sent]))
            for key_id, key in sent:
                if got.get(key_id) == key:
                    matched += 1
                else:
                    mismatched += 1
    finally:
        await m.close()
        await s.close()
    return matched, mismatched


@dataclass
class RoundTrips:
    """Continuous ETSI 014 round trips of one SAE pair: ``enc_keys`` at the master, ``dec_keys``
    at the slave, the keys compared; what failed is kept with the time it failed.

    With ``dec_retry_s``, a ``dec_keys`` answered 503 (the slave's KM cannot tell yet, e.g. a
    replica holding the keys just went) or not answered at all (the connection's replica went)
    is asked again for that long; keys the master got and the slave then still cannot have are
    counted as ``lost``, and when their ``dec_keys`` began is kept in ``lost_at``."""

    master: str
    slave: str
    ok: int = 0
    mismatched: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic(), what)
    first_key_at: float | None = None
    dec_retry_s: float = 0.0
    lost: int = 0
    lost_at: list[float] = field(default_factory=list)  # time.monotonic() a dec_keys that lost keys began

    async def run(self, endpoints: dict, stop: asyncio.Event, pause_s: float = 0.1, rounds: int = 2000) -> None:
        """Up to ``rounds`` round trips of one key, ``pause_s`` apart, until ``stop`` is set."""
        async with sae_client(endpoints, self.master) as master, sae_client(endpoints, self.slave) as slave:
            for _ in range(rounds):
                if stop.is_set():
                    return
                try:
                    sent = await master.enc_keys(self.slave, 1, KEY_BITS)
                except (ETSI014Error, aiohttp.ClientError, asyncio.TimeoutError) as e:
                    self.failures.append((time.monotonic(), f"enc_keys {type(e).__name__}: {e}"))
                    await asyncio.sleep(pause_s)
                    continue
                began = time.monotonic()
                try:
                    got = dict(await self._dec_keys(slave, [key_id for key_id, _ in sent]))
                except (ETSI014Error, aiohttp.ClientError, asyncio.TimeoutError) as e:
                    self.failures.append((time.monotonic(), f"dec_keys {type(e).__name__}: {e}"))
                    self.lost += len(sent)
                    self.lost_at.append(began)
                else:
                    matched = sum(got.get(key_id) == key for key_id, key in sent)
                    self.ok += matched
                    self.mismatched += len(sent) - matched
                    if matched and self.first_key_at is None:
                        self.first_key_at = time.monotonic()
                await asyncio.sleep(pause_s)

    async def _dec_keys(self, slave, key_ids: list[str]) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + self.dec_retry_s
        while True:
            try:
                return await slave.dec_keys(self.master, key_ids)
            except (ETSI014Error, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if isinstance(e, ETSI014Error) and e.status not in (0, 503) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.1)

    async def until_first_key(self, endpoints: dict, timeout_s: float) -> float | None:
        """Round trips back to back until one key made it; when it did (``time.monotonic``), None if not in time."""
        deadline = time.monotonic() + timeout_s
        while self.first_key_at is None and time.monotonic() < deadline:
            await self.run(endpoints, asyncio.Event(), pause_s=0.02, rounds=1)
        return self.first_key_at

    def failed_between(self, start: float, end: float) -> int:
        return sum(start <= at <= end for at, _ in self.failures)


def km_events(endpoints: dict) -> dict[str, list[dict]]:
    events = {}
    for node, info in endpoints["nodes"].items():
        url = info["metrics_url"].rsplit("/", 1)[0] + "/events"
        with urllib.request.urlopen(url, timeout=5) as resp:
            events[node] = json.loads(resp.read())
    return events


def print_events(events: dict[str, list[dict]], start: float, names: dict[str, str]) -> None:
    for node in sorted(events):
        print(f"\n{node}")
        for e in events[node]:
            session = names.get(e["session_id"], e["session_id"][:8])
            print(f"  +{e['at'] - start:8.3f}s  {session:<12} {e['event']:<22} {e['state']:<14} {e['detail']}")


async def run(manifest, state_dir: Path, plot: str | None) -> bool:
    network = LocalNetwork(manifest, state_dir, log_level="WARNING", control_plane="auto")
    control = LocalControlPlane(network)
    print(f"starting the paper's network: {len(manifest.nodes)} KMs, {len(manifest.links)} emulated QKD links, "
          "access control, admission control, routing element, monitoring", flush=True)
    await control.start()
    try:
        names = list(manifest.sessions)
        await wait_active(control, names)
        for s in control.core.sessions():
            print(f"  {s['keySession']}: {s['source']} -> {s['destination']} path {' -> '.join(s['path'])}")
        start = time.time()
        pairs = [(s.spec.source.sae_id, s.spec.destination.sae_id) for s in manifest.sessions.values()]
        print(f"parallel key requests: {', '.join(f'{a} -> {b}' for a, b in pairs)}", flush=True)
        results = await asyncio.gather(*(exchange(network.endpoints, a, b) for a, b in pairs))
        ok = True
        for (a, b), (matched, mismatched) in zip(pairs, results):
            print(f"  {a} -> {b}: {matched} keys identical at both ends, {mismatched} mismatched")
            ok &= mismatched == 0 and matched == ROUNDS * KEYS_PER_REQUEST
        ids = {s["sessionId"]: s["keySession"] for s in control.core.sessions()}
        events = km_events(network.endpoints)
        events = {n: [e for e in evs if e["at"] >= start - 1] for n, evs in events.items()}
        print_events(events, start, ids)
        if plot:
            from vqkd.operator.local.timeline import draw

            draw(events, start, ids, Path(plot))
            print(f"\ntimeline written to {plot}")
        return ok
    finally:
        await control.stop()
        print("network stopped", flush=True)
