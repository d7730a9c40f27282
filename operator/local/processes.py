"""The local runtime: a whole QKD network as processes on loopback (the digital twin).

``LocalNetwork`` allocates loopback ports and issues every certificate from a development
CA, hands both to the network plan as a ``LocalAddressing``, and runs what the plan says:
one emulated QKD module pair per emulated link and one KM process per replica of each node
(``spec.km.replicas``), with real mutual TLS and real gRPC between them. A node's replicas
share its ETSI 014 port — every local KM binds it with SO_REUSEPORT (``etsi014_reuse_port``),
so the kernel spreads its SAEs' connections over them and a replica can join a running
node — and each has its own gRPC and metrics ports. A link to real QKD devices (``spec.etsi014``) needs
no process: its KMs reach the devices with the credentials found in a secrets directory,
laid out as the cluster mounts the Secrets each endpoint names. A KM reporting to a control
plane starts with its identity only and gets its topology pushed (the control plane tracks
``manifest`` and ``addressing``); one running on its own starts with the plan's topology. It
writes ``endpoints.json`` once every endpoint answers and stops every process it started.

A running network changes by planning it again (``replan``): the new nodes and emulated
links (and new replicas of a node) get ports, certificates and configuration files, and the
result says which processes to start, which module pairs take new conditions live (key rate, QBER), which
processes to start again (their configuration changed otherwise: a KM's identity, a
module's buffer or device profile) and which to stop; ``endpoints.json`` is then published
again (``publish``) in one step, so a reader sees either the old file or the new one.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from vqkd.km import identity
from vqkd.km.config import TLSPaths
from vqkd.km.pki import DevCA
from vqkd.operator.plan import (
    ENDS, DeclaredNetwork, End, KMAddress, ModuleAddress, NetworkPlan, PlanError, plan_network, replicas_of,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
# What a running module pair takes live on its admin server's /control: the twin's conditions.
MODULE_LIVE_SETTINGS = frozenset({"key_rate_bps", "qber"})
# A QKD device's credentials as files of DIR/<secretRef name>/: the keys of the cluster Secret.
DEVICE_CREDENTIAL_FILES = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
DEVICE_CREDENTIALS_HELP = ("ca.crt (the device's CA), tls.crt and tls.key (the certificate and key the device "
                           "knows the node's KM by)")


class ReplicaPorts(NamedTuple):
    grpc: int
    metrics: int


class KMPorts(NamedTuple):
    """The ports of a node's KMs: the ETSI 014 port all its replicas bind, and each replica's own."""

    etsi014: int
    replicas: tuple[ReplicaPorts, ...]  # by ordinal; a replica removed gives its ports back when stopped


class ModulePorts(NamedTuple):
    a: int
    b: int
    admin: int


@dataclass(frozen=True)
class LocalAddressing:
    """The network plan's addressing on one machine: the loopback ports the runtime allocated
    and the certificates it issued, by the identity each one names. A running network
    changes in place: its mappings gain the new nodes and links and lose the deleted ones."""

    km_ports: dict[str, KMPorts]
    module_ports: dict[str, ModulePorts]
    certificates: dict[identity.Identity, TLSPaths]
    control_plane: str | None = None
    # (link, node) -> what that node's KM presents at its QKD device, from ``device_credentials``
    device_credentials: dict[tuple[str, str], TLSPaths] = field(default_factory=dict)

    def km(self, node: str, replica: int = 0) -> KMAddress:
        ports = self.km_ports[node]
        if not 0 <= replica < len(ports.replicas):
            raise PlanError(f"node {node}: no ports for KM replica {replica}; it has {len(ports.replicas)}")
        own = ports.replicas[replica]
        return KMAddress(
            etsi014_listen=f"{HOST}:{ports.etsi014}", grpc_listen=f"{HOST}:{own.grpc}",
            metrics_listen=f"{HOST}:{own.metrics}", etsi014_url=f"https://{HOST}:{ports.etsi014}",
            grpc=f"{HOST}:{own.grpc}", metrics_url=f"http://{HOST}:{own.metrics}/metrics",
        )

    def module(self, link: str) -> ModuleAddress:
        ports = self.module_ports[link]
        ends: dict[End, int] = {"a": ports.a, "b": ports.b}
        return ModuleAddress(
            end_listen={end: f"{HOST}:{port}" for end, port in ends.items()},
            end_urls={end: f"https://{HOST}:{port}" for end, port in ends.items()},
            admin_listen=f"{HOST}:{ports.admin}", control_url=f"http://{HOST}:{ports.admin}/control",
            metrics_url=f"http://{HOST}:{ports.admin}/metrics",
        )

    def km_tls(self, node: str) -> TLSPaths:
        return self.certificates[identity.km(node)]

    def module_tls(self, link: str, end: End) -> TLSPaths:
        return self.certificates[identity.module(link, end)]

    def device_tls(self, link: str, node: str) -> TLSPaths:
        try:
            return self.device_credentials[(link, node)]
        except KeyError:
            raise PlanError(
                f"QKDLink {link}: spec.etsi014: node {node}'s KM needs the credentials for its QKD device that the "
                "cluster takes from the Secret its endpoint names (secretRef); pass vqkd up --secrets DIR, with "
                f"DIR/<secretRef name>/ holding {DEVICE_CREDENTIALS_HELP}") from None


def device_credentials(network: DeclaredNetwork, secrets: Path) -> dict[tuple[str, str], TLSPaths]:
    """What each node's KM presents at its QKD device on each ``etsi014`` link, by (link, node):
    the files of ``secrets/<secretRef name>/``. Every end whose files are missing is named at once."""
    found: dict[tuple[str, str], TLSPaths] = {}
    problems = []
    for name, link in sorted(network.links.items()):
        if link.spec.etsi014 is None:
            continue
        for node, endpoint in sorted(link.spec.etsi014.endpoints.items()):
            where = (f"QKDLink {name}, node {node}: spec.etsi014.endpoints.{node}.secretRef names "
                     f"{endpoint.secret_ref.name}")
            directory = secrets / endpoint.secret_ref.name
            files = {part: directory / file for part, file in DEVICE_CREDENTIAL_FILES.items()}
            if not directory.is_dir():
                problems.append(f"{where}, but there is no directory {directory}; create it with "
                                f"{DEVICE_CREDENTIALS_HELP}")
            elif missing := [path.name for path in files.values() if not path.is_file()]:
                problems.append(f"{where}, but {directory} lacks {', '.join(missing)}; it needs "
                                f"{DEVICE_CREDENTIALS_HELP}")
            else:
                found[(name, node)] = TLSPaths(**files)
    if problems:
        raise PlanError("\n".join(problems))
    return found


def km_process(node: str, replica: int) -> str:
    """The process name of one KM replica: ``km-<node>`` for replica 0, ``km-<node>.<replica>`` after it."""
    return f"km-{node}.{replica}" if replica else f"km-{node}"


@dataclass
class Process:
    name: str
    module: str
    config: Path
    log: Path
    ready_url: str
    km: tuple[str, int] | None = None  # the KM instance (node, replica) it runs, if it is a KM
    popen: subprocess.Popen | None = None
    restarts: int = 0


@dataclass(frozen=True)
class ProcessChanges:
    """What a new plan of a running network asks of its processes, by process name."""

    start: list[str] = field(default_factory=list)  # new: module pairs first, then KMs
    retune: dict[str, dict[str, float]] = field(default_factory=dict)  # module pair -> its new conditions
    restart: list[str] = field(default_factory=list)  # running with a configuration that changed otherwise
    stop: list[str] = field(default_factory=list)  # of nodes and links no longer declared


@dataclass
class LocalNetwork:
    """Plans, starts and stops the processes of one network described by a manifest."""

    manifest: object
    state_dir: Path
    log_level: str = "INFO"
    # DIR/<secretRef name>/{ca.crt,tls.crt,tls.key} for links to real QKD devices
    secrets: Path | None = None
    # ControlPlane gRPC address every KM reports to; "auto" picks a free port on loopback
    control_plane: str | None = None
    status_port: int = 0
    processes: dict[str, Process] = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)
    addressing: LocalAddressing | None = field(default=None, init=False)  # set by ``plan``

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if self.secrets is not None:
            self.secrets = Path(self.secrets).resolve()
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
        try:
            planned, addressing = self._plan()
        except PlanError as e:
            raise SystemExit(str(e)) from None
        self.addressing = addressing
        self._write(planned, addressing)

    def _plan(self) -> tuple[NetworkPlan, LocalAddressing]:
        # Device credentials first: a missing file stops the network before anything is issued.
        credentials = device_credentials(self.manifest, self.secrets) if self.secrets is not None else {}
        nodes = list(self.manifest.nodes)
        emulated = [name for name, link in self.manifest.links.items() if link.spec.emulated is not None]
        replicas = {node: len(replicas_of(self.manifest, node)) for node in nodes}
        ports = _free_ports(sum(1 + 2 * count for count in replicas.values()) + 3 * len(emulated) + 2)
        self.status_port = ports.pop()
        if self.control_plane == "auto":
            self.control_plane = f"{HOST}:{ports.pop()}"
        identities = [identity.km(node) for node in nodes]
        identities += [identity.module(link, end) for link in emulated for end in ENDS]
        addressing = LocalAddressing(
            km_ports={node: _km_ports(ports, count) for node, count in replicas.items()},
            module_ports={link: ModulePorts(ports.pop(), ports.pop(), ports.pop()) for link in emulated},
            certificates={ident: self._tls(ident) for ident in identities},
            control_plane=self.control_plane, device_credentials=credentials,
        )
        return plan_network(self.manifest, addressing), addressing

    def _write(self, planned: NetworkPlan, addressing: LocalAddressing) -> None:
        """Each planned process's configuration file, and the endpoints to publish."""
        for name, config in planned.modules.items():
            self._add(f"link-{name}", "vqkd.km.emulator", config, addressing.module(name).control_url)
        for name, module, config, ready_url, km in _km_processes(planned):
            self._add(name, module, config, ready_url, km)
        self.endpoints["nodes"] = {name: asdict(ends) for name, ends in planned.km_endpoints.items()}
        self.endpoints["links"] = {name: asdict(ends) for name, ends in planned.module_endpoints.items()}
        self.endpoints["ca_cert"] = str(self.ca.cert_path)
        if self.control_plane:
            self.endpoints["control"] = {"grpc": self.control_plane, "status_url": f"http://{HOST}:{self.status_port}"}
        self.endpoints["saes"] = {}
        for sae, node in planned.saes.items():
            tls = self._tls(identity.sae(sae))
            self.endpoints["saes"][sae] = {"node": node, "cert": str(tls.cert), "key": str(tls.key)}

    def _add(self, name: str, module: str, config, ready_url: str, km: tuple[str, int] | None = None) -> None:
        path = self.state_dir / "config" / f"{name}.json"
        path.write_text(config.model_dump_json(indent=2))
        self.processes[name] = Process(name, module, path, self.state_dir / "logs" / f"{name}.log", ready_url, km)

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
        """Start every process and publish the endpoints once they answer."""
        self.launch()
        self.publish()

    def launch(self) -> None:
        """Start every process and wait until each answers; stop them all if one does not."""
        self.plan()
        # Modules first: a KM's first act is to draw key from them.
        for proc in sorted(self.processes.values(), key=lambda p: not p.name.startswith("link-")):
            self._spawn(proc)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def publish(self) -> None:
        """Write ``endpoints.json``: the network is ready for its applications. Replaced in one
        step (written beside it, then renamed), so a reader sees the old file or the new one."""
        path = self.state_dir / "endpoints.json"
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        draft.write_text(json.dumps(self.endpoints, indent=2))
        os.replace(draft, path)

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

    # -- changing the running network ----------------------------------------------

    def replan(self, network: DeclaredNetwork) -> ProcessChanges:
        """Plan ``network`` in place of the running one, and say what that asks of the processes.

        New nodes, replicas and emulated links get loopback ports and certificates, every process to
        start, retune or start again gets its configuration file, and the endpoints to
        publish become the new network's (new SAEs get their certificates). Nothing is
        started or stopped here: the caller runs the changes (``start_planned``, ``retune``,
        ``restart``, ``retire``).
        Raises PlanError, with nothing changed, when the network cannot run here.
        """
        planned, addressing = self._replan(network)
        for table in ("km_ports", "module_ports", "certificates", "device_credentials"):
            getattr(self.addressing, table).update(getattr(addressing, table))
        wanted = [(f"link-{name}", "vqkd.km.emulator", config, addressing.module(name).control_url, None)
                  for name, config in planned.modules.items()]
        wanted += _km_processes(planned)
        changes = ProcessChanges(stop=sorted(set(self.processes) - {name for name, *_ in wanted}))
        for name, module, config, ready_url, km in wanted:
            proc = self.processes.get(name)
            if proc is None:
                changes.start.append(name)
                self._add(name, module, config, ready_url, km)
            elif changed := _changed_settings(proc.config, config):
                proc.config.write_text(config.model_dump_json(indent=2))
                if proc.module == "vqkd.km.emulator" and changed <= MODULE_LIVE_SETTINGS:
                    changes.retune[name] = {setting: getattr(config, setting) for setting in sorted(changed)}
                else:
                    changes.restart.append(name)
        self.endpoints["nodes"] = {name: asdict(ends) for name, ends in planned.km_endpoints.items()}
        self.endpoints["links"] = {name: asdict(ends) for name, ends in planned.module_endpoints.items()}
        self.endpoints["saes"] = {}
        for sae, node in planned.saes.items():
            tls = self._tls(identity.sae(sae))
            self.endpoints["saes"][sae] = {"node": node, "cert": str(tls.cert), "key": str(tls.key)}
        return changes

    def _replan(self, network: DeclaredNetwork) -> tuple[NetworkPlan, LocalAddressing]:
        """The plan of ``network`` with the running processes' ports and ports for the new ones."""
        credentials = device_credentials(network, self.secrets) if self.secrets is not None else {}
        running = self.addressing
        nodes = [name for name in network.nodes if name not in running.km_ports]
        # A node's replicas beyond those running need ports; those beyond the new count keep theirs until stopped.
        more = {name: len(replicas_of(network, name)) - len(running.km_ports[name].replicas)
                for name in network.nodes if name in running.km_ports}
        emulated = [name for name, link in network.links.items()
                    if link.spec.emulated is not None and name not in running.module_ports]
        replicas = {node: len(replicas_of(network, node)) for node in nodes}
        ports = _free_ports(sum(1 + 2 * count for count in replicas.values())
                            + 2 * sum(count for count in more.values() if count > 0) + 3 * len(emulated))
        identities = [identity.km(node) for node in nodes]
        identities += [identity.module(link, end) for link in emulated for end in ENDS]
        grown = {name: running.km_ports[name]._replace(
                     replicas=running.km_ports[name].replicas + _replica_ports(ports, count))
                 for name, count in more.items() if count > 0}
        addressing = LocalAddressing(
            km_ports={**running.km_ports, **grown, **{node: _km_ports(ports, count) for node, count in replicas.items()}},
            module_ports={**running.module_ports,
                          **{link: ModulePorts(ports.pop(), ports.pop(), ports.pop()) for link in emulated}},
            certificates={**running.certificates, **{ident: self._tls(ident) for ident in identities}},
            control_plane=running.control_plane, device_credentials=credentials,
        )
        return plan_network(network, addressing), addressing

    def start_planned(self, names: list[str]) -> None:
        """Start the named processes (new in ``replan``) and wait until each answers."""
        for name in names:
            self._spawn(self.processes[name])
        self.wait_ready(names)

    def retune(self, name: str, settings: dict[str, float]) -> None:
        """Give a running module pair new conditions on its /control, as its new configuration says."""
        request = urllib.request.Request(self.processes[name].ready_url, data=json.dumps(settings).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def retire(self, names: list[str]) -> None:
        """Stop the named processes for good: their nodes and links are gone, and so are their ports."""
        procs = [self.processes.pop(name) for name in names]
        for proc in procs:
            if proc.km is None:
                self.addressing.module_ports.pop(proc.name.removeprefix("link-"), None)
                continue
            node, replica = proc.km
            ports = self.addressing.km_ports.get(node)
            if replica == 0:
                self.addressing.km_ports.pop(node, None)
            elif ports is not None:  # ordinals stay contiguous: the replicas stopped are the last ones
                self.addressing.km_ports[node] = ports._replace(replicas=ports.replicas[:replica])
        _terminate([p.popen for p in procs if p.popen and p.popen.poll() is None])

    def stop(self) -> None:
        _terminate([p.popen for p in self.processes.values() if p.popen and p.popen.poll() is None])


def _terminate(running: list[subprocess.Popen]) -> None:
    for popen in running:
        popen.terminate()
    for popen in running:
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def _km_processes(planned: NetworkPlan) -> list[tuple[str, str, object, str, tuple[str, int]]]:
    """Every KM replica's process: (name, module, configuration, ready URL, KM instance). Each binds
    its node's ETSI 014 port with SO_REUSEPORT, so the node's replicas share it."""
    processes = []
    for node, configs in planned.kms.items():
        for config in configs:
            update: dict[str, object] = {"etsi014_reuse_port": True}
            if config.control_plane is None:  # on its own: nobody will push it a topology
                update["topology"] = planned.topologies[node]
            processes.append((km_process(node, config.replica), "vqkd.km", config.model_copy(update=update),
                              f"http://{config.metrics_listen}/healthz", (node, config.replica)))
    return processes


def _km_ports(ports: list[int], replicas: int) -> KMPorts:
    return KMPorts(ports.pop(), _replica_ports(ports, replicas))


def _replica_ports(ports: list[int], count: int) -> tuple[ReplicaPorts, ...]:
    return tuple(ReplicaPorts(ports.pop(), ports.pop()) for _ in range(count))


def _changed_settings(path: Path, config) -> set[str]:
    """The settings in which ``config`` differs from the file at ``path`` its process started from.

    A KM's topology is taken live, so the one its file may start it with never counts.
    """
    held, wanted = json.loads(path.read_text()), json.loads(config.model_dump_json())
    return {key for key in held.keys() | wanted.keys() if key != "topology" and held.get(key) != wanted.get(key)}


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
