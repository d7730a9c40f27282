"""Throughput and latency of one KM's ETSI 014 ``enc_keys``, with the KM as the bottleneck.

Starts a two-node network of real processes (KM alice, KM bob, one emulated QKD module
pair) with the local runner; the emulated link produces far more key than a KM can hand
out, so what is measured is the master KM. Client processes, separate from the KMs, run
16 SAE clients, each over its own keep-alive mutual-TLS connection, and print what they
saw; this process prints one JSON line per case and stops everything it started.

    python bench/km_throughput.py [--quick] [--seconds N] [--clients N] [--client-procs N]

See bench/README.md for what the fields mean and how the slave's key store is kept below
its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.km.tls import TLSFiles, client_context

MASTER_SAE, SLAVE_SAE = "sae-master", "sae-slave"
KEY_BITS = 256
CASES = (("enc_keys_batch_1", 1), ("enc_keys_batch_256", 256))
POOL_FULL = 0.99  # share of the pool target that counts as "filled"
STORE_RESET = 0.25  # restart the slave KM when its store is fuller than this before a case
STORE_MARGIN = 0.9  # a case stops issuing at this share of the slave store's free room

# The link produces ~1.7 Gbit/s of secret key (2 Gbit/s at 1 % QBER) and may buffer 16 Gibit:
# the module never runs dry, so the KM is the bottleneck.
NETWORK = f"""
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: alice}}
spec: {{saeIds: [{MASTER_SAE}]}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {{name: bob}}
spec: {{saeIds: [{SLAVE_SAE}]}}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {{name: alice-bob}}
spec:
  nodes: [alice, bob]
  emulated: {{keyRateBps: 2000000000, qber: 0.01, bufferBits: {16 * 1024**3}}}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {{name: bench}}
spec:
  saeIds: [{MASTER_SAE}, {SLAVE_SAE}]
"""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far (Linux), None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- client process ------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    issued_bits: int = 0
    out_of_budget: bool = False
    last_done: float = 0.0


async def _drive(clients: list[ETSI014Client], batch: int, start: float, end: float, budget_bits: float,
                 latencies: list[float] | None) -> Tally:
    """Every client issues requests back to back from ``start``; what completes by ``end`` counts."""
    tally = Tally()
    bits = batch * KEY_BITS

    async def loop(client: ETSI014Client) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            if tally.issued_bits + bits > budget_bits:
                tally.out_of_budget = True
                return
            tally.issued_bits += bits  # before the call: concurrent clients must not overshoot
            try:
                await client.enc_keys(SLAVE_SAE, batch, KEY_BITS)
                ok = True
            except ETSI014Error:
                ok = False
            t1 = time.perf_counter()
            if t1 > end:
                return
            if ok:
                tally.requests += 1
                tally.last_done = max(tally.last_done, t1)
                if latencies is not None:
                    latencies.append(t1 - t0)
            else:
                tally.errors += 1

    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    await asyncio.gather(*(loop(c) for c in clients))
    return tally


async def _client_main(spec: dict) -> None:
    files = TLSFiles(Path(spec["ca"]), Path(spec["cert"]), Path(spec["key"]))
    clients = [ETSI014Client(spec["url"], files, max_connections=1) for _ in range(spec["clients"])]
    loop = asyncio.get_running_loop()
    try:
        # Open every connection (TLS handshake included) before anything is timed.
        await asyncio.gather(*(c.status(SLAVE_SAE) for c in clients))
        now = time.perf_counter()
        await _drive(clients, spec["batch"], now, now + spec["warmup_s"], float("inf"), None)
        print(json.dumps({"warm": True}), flush=True)
        go = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
        start = time.perf_counter() + (go["start_wall"] - time.time())
        end = start + go["seconds"]
        latencies: list[float] = []
        tally = await _drive(clients, spec["batch"], start, end, go["budget_bits"], latencies)
        window = max(tally.last_done - start, 1e-9) if tally.out_of_budget else go["seconds"]
        print(json.dumps({"requests": tally.requests, "errors": tally.errors, "window_s": window,
                          "latencies_ms": [round(x * 1000, 4) for x in latencies]}), flush=True)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


# -- orchestration -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        # Imported here: the client processes need none of the operator.
        from vqkd.operator.local.processes import LocalNetwork
        from vqkd.operator.resources.loader import load_text

        self.args = args
        self.state = Path(tempfile.mkdtemp(prefix="vqkd-bench-"))
        self.net = LocalNetwork(load_text(NETWORK, "bench"), self.state, log_level="WARNING")

    def _config(self, process: str) -> dict:
        return json.loads(self.net.processes[process].config.read_text())

    def _sae(self, sae: str) -> dict:
        info = self.net.endpoints["saes"][sae]
        return {"ca": self.net.endpoints["ca_cert"], "cert": info["cert"], "key": info["key"]}

    def _master_url(self) -> str:
        return self.net.endpoints["nodes"]["alice"]["etsi014_url"]

    def _master_call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        sae = self._sae(MASTER_SAE)
        ctx = client_context(TLSFiles(Path(sae["ca"]), Path(sae["cert"]), Path(sae["key"])))
        host, port = self._master_url().removeprefix("https://").rsplit(":", 1)
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        try:
            conn.request(method, f"/api/v1/keys/{SLAVE_SAE}/{path}", body=json.dumps(body) if body else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def _wait_pool_full(self, timeout: float = 120.0) -> None:
        target = self._config("km-alice")["topology"]["links"][0]["pool_target_bits"]
        deadline = time.monotonic() + timeout
        while True:
            _, status = self._master_call("GET", "status")
            held = status["stored_key_count"] * status["key_size"]
            if held >= POOL_FULL * target:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the master KM's pool holds {held} of {target} bits after {timeout:.0f}s")
            time.sleep(0.1)

    def _slave_store_bits(self) -> int:
        with urllib.request.urlopen(self.net.endpoints["nodes"]["bob"]["metrics_url"], timeout=10) as resp:
            text = resp.read().decode()
        match = re.search(r"^vqkd_km_stored_key_bits\{[^}]*\} (\S+)$", text, re.M)
        return int(float(match.group(1))) if match else 0

    def _reset_slave(self) -> None:
        """A fresh slave KM with an empty store; the master drops the material it shared with
        the old one once it notices, so wait for a first successful request, then a full pool."""
        log("restarting the slave KM to empty its store of delivered keys")
        self.net.restart("km-bob", kill=False)
        deadline = time.monotonic() + 60
        while self._master_call("POST", "enc_keys", {"number": 1, "size": KEY_BITS})[0] != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the master KM never got keys to the restarted slave KM")
            time.sleep(0.1)

    def _spawn_clients(self, batch: int) -> list[subprocess.Popen]:
        args = self.args
        share = [args.clients // args.client_procs + (i < args.clients % args.client_procs)
                 for i in range(args.client_procs)]
        procs = []
        for n in share:
            spec = {"url": self._master_url(), **self._sae(MASTER_SAE), "clients": n, "batch": batch,
                    "warmup_s": args.warmup}
            proc = subprocess.Popen([sys.executable, __file__, "--client-process"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            procs.append(proc)
        return procs

    def _start_profilers(self, case: str, pids: dict[str, int]) -> list[subprocess.Popen]:
        """py-spy on both KMs for the measured window: collapsed stacks, one file per process."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        return [
            subprocess.Popen([py_spy, "record", "--pid", str(pids[name]), "--duration", str(int(self.args.seconds)),
                              "--rate", "200", "--nonblocking", "--format", "raw",
                              "--output", str(out / f"{case}.{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name in ("km-alice", "km-bob")
        ]

    def run_case(self, case: str, batch: int) -> dict:
        args = self.args
        bound = self._config("km-bob")["delivered_store_max_bits"]
        if self._slave_store_bits() > STORE_RESET * bound:
            self._reset_slave()
        self._wait_pool_full()
        log(f"{case}: warming up {args.clients} clients in {args.client_procs} process(es)")
        procs = self._spawn_clients(batch)
        try:
            for proc in procs:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"client process exited with code {proc.wait()} during warm-up")
            self._wait_pool_full()
            budget = STORE_MARGIN * (bound - self._slave_store_bits()) / len(procs)
            pids = {name: p.popen.pid for name, p in self.net.processes.items()}
            pids |= {f"client-{i}": p.pid for i, p in enumerate(procs)}
            start_wall = time.time() + 0.2
            for proc in procs:
                proc.stdin.write(json.dumps({"start_wall": start_wall, "seconds": args.seconds,
                                             "budget_bits": budget}) + "\n")
                proc.stdin.flush()
            log(f"{case}: measuring for {args.seconds:g}s")
            time.sleep(max(0.0, start_wall - time.time()))
            profilers = self._start_profilers(case, pids) if args.profile else []
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            time.sleep(args.seconds)
            cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            for profiler in profilers:
                profiler.wait(timeout=60)
            results = []
            for proc in procs:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"client process exited with code {proc.wait()} while measuring")
                results.append(json.loads(line))
                proc.wait(timeout=30)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return self._summary(case, batch, results, cpu_before, cpu_after)

    def _summary(self, case: str, batch: int, results: list[dict], cpu_before: dict, cpu_after: dict) -> dict:
        seconds = max(r["window_s"] for r in results)
        requests = sum(r["requests"] for r in results)
        latencies = sorted(x for r in results for x in r["latencies_ms"])
        keys_per_s = requests * batch / seconds
        cpu_s = {name: cpu_after[name] - cpu_before[name] for name in cpu_before
                 if cpu_before[name] is not None and cpu_after[name] is not None}
        return {
            "case": case,
            "batch": batch,
            "clients": self.args.clients,
            "seconds": round(seconds, 3),
            "requests": requests,
            "requests_per_s": round(requests / seconds, 1),
            "keys_per_s": round(keys_per_s, 1),
            "key_mbit_per_s": round(keys_per_s * KEY_BITS / 1e6, 2),
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "errors": sum(r["errors"] for r in results),
            # Other load on the machine moves the rates; CPU per request moves much less.
            "cpu_percent": {name: round(100 * t / self.args.seconds, 1) for name, t in cpu_s.items()},
            "cpu_ms_per_request": {name: round(1000 * t / max(requests, 1), 3) for name, t in cpu_s.items()},
            "machine": machine(),
        }

    def run(self) -> None:
        log(f"starting the network in {self.state}")
        try:
            self.net.start()
            log("waiting for the master KM's pool to fill")
            self._wait_pool_full()
            for case, batch in CASES:
                print(json.dumps(self.run_case(case, batch)), flush=True)
        finally:
            self.net.stop()
            shutil.rmtree(self.state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per case (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per case, short warm-up")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of requests before each case")
    parser.add_argument("--clients", type=int, default=16, help="concurrent SAE clients, one connection each")
    parser.add_argument("--client-procs", type=int, default=1, help="processes the clients are spread over")
    parser.add_argument("--profile", metavar="DIR", help="sample both KMs with py-spy while measuring; "
                        "collapsed stacks go to DIR/<case>.<process>.txt")
    parser.add_argument("--client-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_process:
        asyncio.run(_client_main(json.loads(sys.stdin.readline())))
        return
    if args.quick:
        args.seconds, args.warmup = 2.0, 0.5
    if not 1 <= args.client_procs <= args.clients:
        parser.error("--client-procs must be between 1 and --clients")
    Bench(args).run()


if __name__ == "__main__":
    main()
