"""The local runtime: a whole QKD network as processes on loopback (the digital twin).

``LocalNetwork`` turns the declared resources into one emulated QKD module pair per link
and one KM process per node, with a development CA issuing every certificate, real mutual
TLS and real gRPC between them. It writes ``endpoints.json`` once every endpoint answers
and stops every process it started.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vqkd.km import identity
from vqkd.km.config import (
    EmulatedLinkConfig, KMConfig, LinkEndConfig, ModuleEndConfig, TLSPaths,
)
from vqkd.km.pki import DevCA

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
PULLS_PER_SECOND = 20  # how often a KM should be able to draw a full block on a slow link


def block_bits_for(secret_rate_bps: float) -> int:
    """Blocks a KM draws from its module: large on fast links, small enough on slow ones
    that key becomes usable within a fraction of a second."""
    bits = int(secret_rate_bps / PULLS_PER_SECOND) // 256 * 256
    return max(256, min(8192, bits))


@dataclass
class Process:
    name: str
    module: str
    config: Path
    log: Path
    ready_url: str
    popen: subprocess.Popen | None = None
    restarts: int = 0


@dataclass
class LocalNetwork:
    """Plans, starts and stops the processes of one network described by a manifest."""

    manifest: object
    state_dir: Path
    log_level: str = "INFO"
    # ControlPlane gRPC address every KM reports to; "auto" picks a free port on loopback
    control_plane: str | None = None
    status_port: int = 0
    processes: dict[str, Process] = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        for sub in ("config", "logs", "pki"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.ca = DevCA.load_or_create(self.state_dir / "pki")

    # -- planning --------------------------------------------------------------------

    def _tls(self, ident: identity.Identity) -> TLSPaths:
        stem = f"{ident.kind.value}-{ident.name.replace('/', '-')}"
        files = self.ca.issue(ident, stem)
        return TLSPaths(ca=self.ca.cert_path, cert=files.cert, key=files.key)

    def plan(self) -> None:
        if self.processes:
            return
        nodes = self.manifest.nodes
        links = self.manifest.links
        ports = _free_ports(3 * len(nodes) + 3 * len(links) + 2)
        self.status_port = ports.pop()
        if self.control_plane == "auto":
            self.control_plane = f"{HOST}:{ports.pop()}"
        km_ports = {name: (ports.pop(), ports.pop(), ports.pop()) for name in nodes}
        saes = {sae: name for name, node in nodes.items() for sae in node.spec.sae_ids}
        kme_id = {name: node.spec.kme_id or name for name, node in nodes.items()}

        link_ends: dict[str, list[LinkEndConfig]] = {name: [] for name in nodes}
        for name, link in links.items():
            a, b = link.spec.nodes
            emulated = link.spec.emulated
            if emulated is None:
                raise SystemExit(f"QKDLink {name}: the local runtime needs an emulated key source")
            end_ports = {"a": ports.pop(), "b": ports.pop()}
            admin_port = ports.pop()
            ends = {
                end: ModuleEndConfig(
                    listen=f"{HOST}:{end_ports[end]}", sae_id=node, client=identity.km(node).uri,
                    kme_id=f"{name}-{end}", tls=self._tls(identity.module(name, end)),
                )
                for end, node in (("a", a), ("b", b))
            }
            cfg = EmulatedLinkConfig(
                link=name, key_rate_bps=emulated.key_rate_bps, qber=emulated.qber,
                **({"buffer_bits": emulated.buffer_bits} if getattr(emulated, "buffer_bits", None) else {}),
                admin_listen=f"{HOST}:{admin_port}", ends=ends,
            )
            self._add(f"link-{name}", "vqkd.km.emulator", cfg, f"http://{HOST}:{admin_port}/control")
            block = block_bits_for(emulated.key_rate_bps)
            for end, me, peer in (("a", a, b), ("b", b, a)):
                link_ends[me].append(LinkEndConfig(
                    name=name, peer_node=peer, peer_kme_id=kme_id[peer],
                    peer_grpc=f"{HOST}:{km_ports[peer][1]}",
                    module_url=f"https://{HOST}:{end_ports[end]}",
                    module_sae_id=me, peer_module_sae_id=peer, block_bits=block,
                ))
            self.endpoints.setdefault("links", {})[name] = {
                "nodes": [a, b], "control_url": f"http://{HOST}:{admin_port}/control",
                "metrics_url": f"http://{HOST}:{admin_port}/metrics",
            }

        for name in nodes:
            api, grpc_port, metrics = km_ports[name]
            cfg = KMConfig(
                node=name, kme_id=kme_id[name], etsi014_listen=f"{HOST}:{api}",
                grpc_listen=f"{HOST}:{grpc_port}", metrics_listen=f"{HOST}:{metrics}",
                tls=self._tls(identity.km(name)), saes=saes, links=link_ends[name],
                control_plane=self.control_plane,
            )
            self._add(f"km-{name}", "vqkd.km", cfg, f"http://{HOST}:{metrics}/healthz")
            self.endpoints.setdefault("nodes", {})[name] = {
                "kme_id": kme_id[name], "etsi014_url": f"https://{HOST}:{api}",
                "grpc": f"{HOST}:{grpc_port}", "metrics_url": f"http://{HOST}:{metrics}/metrics",
            }
        self.endpoints["ca_cert"] = str(self.ca.cert_path)
        if self.control_plane:
            self.endpoints["control"] = {"grpc": self.control_plane, "status_url": f"http://{HOST}:{self.status_port}"}
        self.endpoints["saes"] = {}
        for sae, node in saes.items():
            tls = self._tls(identity.sae(sae))
            self.endpoints["saes"][sae] = {"node": node, "cert": str(tls.cert), "key": str(tls.key)}

    def _add(self, name: str, module: str, config, ready_url: str) -> None:
        path = self.state_dir / "config" / f"{name}.json"
        path.write_text(config.model_dump_json(indent=2))
        self.processes[name] = Process(name, module, path, self.state_dir / "logs" / f"{name}.log", ready_url)

    # -- running ---------------------------------------------------------------------

    def _spawn(self, proc: Process) -> None:
        out = open(proc.log, "ab")
        proc.popen = subprocess.Popen(
            [sys.executable, "-P", "-m", proc.module, "--config", str(proc.config), "--log-level", self.log_level],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        out.close()

    def start(self) -> None:
        self.plan()
        # Modules first: a KM's first act is to draw key from them.
        for proc in sorted(self.processes.values(), key=lambda p: not p.name.startswith("link-")):
            self._spawn(proc)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        path = self.state_dir / "endpoints.json"
        path.write_text(json.dumps(self.endpoints, indent=2))

    def wait_ready(self, names: list[str] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        pending = [self.processes[n] for n in (names or self.processes)]
        while pending:
            proc = pending[0]
            if proc.popen.poll() is not None:
                tail = proc.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(proc.ready_url, timeout=1):
                    pending.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} did not answer at {proc.ready_url} within {timeout:.0f}s; "
                                   f"see {proc.log}")
            time.sleep(0.05)

    def restart(self, name: str, *, kill: bool = True) -> None:
        """Stop one process (SIGKILL by default, as a crash would) and start it again."""
        proc = self.processes[name]
        if proc.popen and proc.popen.poll() is None:
            proc.popen.kill() if kill else proc.popen.terminate()
            proc.popen.wait(timeout=10)
        proc.restarts += 1
        self._spawn(proc)
        self.wait_ready([name])

    def stop(self) -> None:
        running = [p.popen for p in self.processes.values() if p.popen and p.popen.poll() is None]
        for popen in running:
            popen.terminate()
        for popen in running:
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def _free_ports(n: int) -> list[int]:
    """n distinct free ports; held open together so none is handed out twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
