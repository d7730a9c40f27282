"""The control-plane host: the one object both runtimes run the control core in.

The host owns what the local runtime and the operator have in common:

- the control core, pushing to the KMs through the runtime's KM client (each confirmed push
  timed in ``vqkd_control_push_duration_seconds``), and the ``vqkd_control_*`` metrics;
- the gRPC server the KMs call: the ControlPlane service (paper Fig. 2a: open, key-request
  signal, close) and the standard gRPC health service, with mutual TLS under the
  controller identity;
- one cadence: the core's timers run every ``TICK_S``, monitoring every
  ``Cadence.poll_interval_s`` (see ``Cadence``);
- the KM instances: a node runs ``spec.km.replicas`` KMs, and the unit the host watches,
  pushes topologies to and replaces is one of them, ``(node, replica)``. The control core
  thinks in nodes; the host fans each of its session pushes out to every replica of the
  node (see ``_ReplicaPushes``), and tells it a node is down only once no replica answers;
- KM liveness, judged in one place, per instance: one that does not answer is reported
  down; one that answers again is reported up; one that answers with a new incarnation is
  a new instance that lost its state, so it is reported replaced and gets its topology and
  then every session its node takes part in pushed again. An instance unreachable for
  ``replace_after_s`` is replaced through the runtime;
- every KM instance's topology (``topologies``, a ``TopologyPusher``): once the runtime
  tracks its declared resources (``track``), each gets its node's topology when first
  seen, again when replaced or when it reports less than was pushed, and before any session
  is pushed to it; the runtime calls ``topologies.refresh()`` after each change of its
  resources. A node whose replica count changed gets its sessions pushed again
  (``rescale``), so each of its replicas holds its share of a session's rate.

A runtime plugs in only what differs: how a KM instance is replaced (``KMReplacer``: a
process, a pod) and how state is shown (``HostListener``: the local runtime's views read
the core directly and need none; the operator writes resource status and Events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from vqkd.km.domain.vocabulary import Role
from vqkd.km.rpc.credentials import grpc_server_credentials
from vqkd.km.tls import TLSFiles
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.adapters.kms import ControlPlaneService
from vqkd.operator.adapters.metrics import ControlMetrics
from vqkd.operator.adapters.sampling import KMStats, read_km, read_round
from vqkd.operator.control.access import TokenLookup, no_tokens
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.monitoring import LinkSampler, MonitoringSettings
from vqkd.operator.control.session_config import KMSessionConfig
from vqkd.operator.plan import Addressing, DeclaredNetwork
from vqkd.operator.topologies import KMInstance, TopologyClient, TopologyPusher, instance_name

log = logging.getLogger(__name__)

# Timers (inactivity, peer wait, held-session retries, silent links, due KM replacements)
# are due at second granularity; a quarter second keeps them punctual at negligible cost.
TICK_S = 0.25
MAX_BACKOFF_FACTOR = 16
STOP_GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class Cadence:
    """How often the host looks at the network.

    Monitoring reads every KM and module, so its pace is the runtime's to choose: each
    round costs a gRPC call per KM instance and a scrape per module, and sets the interval
    key rates are measured over. Timers do not depend on it; they run every ``TICK_S``. A KM
    that is down is asked again at every tick, so its return is noticed at the timers' pace.
    """

    poll_interval_s: float = 1.0
    replace_after_s: float | None = None  # None: only the runtime restarts its KMs

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or (self.replace_after_s is not None and self.replace_after_s <= 0):
            raise ValueError(f"cadence needs poll_interval_s > 0 and replace_after_s > 0 or None, got {self}")


class KMClient(KMStats, TopologyClient, Protocol):
    """The host's way to the KMs (``GrpcKMs``), one KM instance per call: session pushes (the
    core's, fanned out to every replica of a node), stats for monitoring, topology pushes for
    the topology pusher."""

    async def configure(self, node: str, replica: int, config: KMSessionConfig) -> None:
        """Install or replace the session's entry at replica ``replica`` of the KMs of ``node``."""

    async def delete(self, node: str, replica: int, session_id: str, reason: str) -> None:
        """Remove the session from replica ``replica`` of the KMs of ``node``; idempotent."""

    async def close(self) -> None: ...


class KMReplacer(Protocol):
    async def replace(self, node: str, replica: int) -> None:
        """Put a new instance of replica ``replica`` of the KMs of ``node`` in place of one that
        stopped answering."""


class HostListener:
    """How a runtime shows what the host sees; each method is a no-op unless overridden."""

    def km_liveness_changed(self, node: str, replica: int, liveness: KMLiveness) -> None:
        """Replica ``replica`` of the KMs of ``node`` started or stopped answering."""

    def km_replaced(self, node: str, replica: int, seconds: float | None) -> None:
        """A new instance of replica ``replica`` of the KMs of ``node`` serves with its node's
        sessions pushed again; ``seconds`` since it was found unreachable or missing, None when
        that was not observed."""

    def polled(self) -> None:
        """A monitoring round fed the core new samples."""


@dataclass(frozen=True, slots=True)
class KMLiveness:
    """What the host last saw of one KM instance, or of a node's KMs as one (``liveness``)."""

    ok: bool | None  # None: not asked yet
    error: str = ""  # why it does not answer
    incarnation: str | None = None


@dataclass(slots=True)
class _KMWatch:
    ok: bool | None = None
    error: str = ""
    incarnation: str | None = None
    asked_at: float = float("-inf")  # when the question behind the latest answer taken was sent
    failing_since: float | None = None
    lost_at: float | None = None  # found unreachable or missing: a replacement is under way
    replaced_at: float | None = None  # when the host last had it replaced
    replacements: int = 0  # replacements during this outage
    missed: bool = False  # a session push to its node skipped it (not seen answering then)

    def liveness(self) -> KMLiveness:
        return KMLiveness(self.ok, self.error, self.incarnation)


class ReplicaPushFailed(RuntimeError):
    """Some replicas of a node's KMs did not confirm a push; the message says which and why."""


def source_share(config: KMSessionConfig, replicas: int) -> KMSessionConfig:
    """What one of ``replicas`` KMs of a session's source node is given: 1/n of the rate and
    of the bucket, so together they never hand out more than the grant (a client whose
    connections all reach one replica gets rate/n). A bucket keeps room for one key chunk,
    without which a replica could never serve one; intermediate and destination KMs do not
    meter, and get the configuration as it is."""
    if config.role is not Role.SOURCE or replicas <= 1:
        return config
    chunk_bits = config.key_chunk_size * 8
    bucket = max(config.bucket_bits // replicas, min(config.bucket_bits, chunk_bits), 1)
    return dataclasses.replace(config, rate_bps=config.rate_bps / replicas, bucket_bits=bucket)


class _ReplicaPushes:
    """The core's pusher: a push to a node goes to every replica of its KMs at once, each given
    the topology holding the session's hops first, and counts as confirmed (and is timed) once
    every replica pushed to confirmed.

    Only the replicas the host last saw answering are pushed to (all of them when none was,
    e.g. before the first monitoring round, and then a failure is the push's). One skipped —
    not answering, or not asked yet, as a replica just added — gets what it missed once it
    answers: a deletion is owed to it and sent then, and its node's sessions are pushed
    again (the host reports the node up to the core).
    """

    def __init__(self, host: ControlPlaneHost):
        self.host = host

    async def configure(self, node: str, config: KMSessionConfig) -> None:
        host = self.host
        replicas = host.replicas(node)
        for replica in range(replicas):  # a deletion owed from before is no longer wanted
            host._owed_deletes.get((node, replica), {}).pop(config.session_id, None)
        share = source_share(config, replicas)
        targets = host._targets(node)
        for replica in set(range(replicas)) - set(targets):
            host._watches.setdefault((node, replica), _KMWatch()).missed = True
        await self._each(node, "configure", lambda replica: self._configure(node, replica, share), targets)

    async def _configure(self, node: str, replica: int, config: KMSessionConfig) -> None:
        await self.host.topologies.settle(node, replica)  # a KM that did not take it refuses the session
        await self.host.kms.configure(node, replica, config)

    async def delete(self, node: str, session_id: str, reason: str) -> None:
        host = self.host
        targets = host._targets(node)
        for replica in set(range(host.replicas(node))) - set(targets):
            host._owed_deletes.setdefault((node, replica), {})[session_id] = reason
        await self._each(node, "delete", lambda replica: host.kms.delete(node, replica, session_id, reason),
                         targets)

    async def _each(self, node: str, call: str, push: Callable[[int], Coroutine[Any, Any, None]],
                    targets: list[int]) -> None:
        started = time.perf_counter()
        results = await asyncio.gather(*(push(replica) for replica in targets), return_exceptions=True)
        failed = [(replica, error) for replica, error in zip(targets, results) if isinstance(error, BaseException)]
        for _, error in failed:
            if not isinstance(error, Exception):
                raise error  # cancellation and interpreter exits are not push failures
        if len(failed) == 1 and len(targets) == 1:
            raise failed[0][1]
        if failed:
            raise ReplicaPushFailed("; ".join(f"replica {replica} of {len(targets)}: {type(error).__name__}: {error}"
                                              for replica, error in failed))
        self.host.metrics.push_seconds(call).observe(time.perf_counter() - started)


class ControlPlaneHost:
    def __init__(
        self,
        kms: KMClient,
        tls: TLSFiles,
        listen: str,
        *,
        module_metrics: Callable[[str], str | None] = lambda link: None,
        cadence: Cadence = Cadence(),
        admission: AdmissionSettings = AdmissionSettings(),
        monitoring: MonitoringSettings = MonitoringSettings(),
        namespace: str = "default",
        token_lookup: TokenLookup = no_tokens,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.kms = kms
        self.tls = tls
        self.listen = listen
        self.module_metrics = module_metrics
        self.cadence = cadence
        self.replacer: KMReplacer | None = None
        self.listeners: list[HostListener] = []
        self.clock = clock  # liveness and replacement timing; the core keeps its own clock
        self.network: DeclaredNetwork | None = None  # how many KM replicas each node runs; see ``track``
        self.topologies = TopologyPusher(
            kms, observe=lambda seconds: self.metrics.push_seconds("topology").observe(seconds))
        self.core = ControlCore(
            _ReplicaPushes(self), namespace=namespace, token_lookup=token_lookup, admission=admission,
            monitoring=monitoring,
        )
        self.metrics = ControlMetrics(self.core, registry, replicas=self.replica_counts)
        self.sampler = LinkSampler()
        self._watches: dict[KMInstance, _KMWatch] = {}
        self._owed_deletes: dict[KMInstance, dict[str, str]] = {}  # session ID -> reason, for a replica that was down
        self._scale: dict[str, int] = {}  # node -> the replica count its sessions were last pushed for
        self._down: set[str] = set()  # nodes the core was told are down: no replica answered
        self._server: grpc.aio.Server | None = None
        self._checks: health.aio.HealthServicer | None = None
        self._loops: list[asyncio.Task] = []
        self._work: dict[str, asyncio.Task] = {}  # probes and replacements in flight, by what they do

    def plug(self, *, replacer: KMReplacer | None = None, listeners: Iterable[HostListener] = ()) -> None:
        """How the runtime replaces a KM that stopped answering, and who shows what the host
        sees; plugged in before ``start``, once the runtime's parts that need the core exist."""
        self.replacer = replacer
        self.listeners = list(listeners)

    def track(self, network: DeclaredNetwork, addressing: Addressing | None) -> None:
        """The runtime's declared resources (kept current as for ``TopologyPusher.track``): how
        many KM replicas each node runs; and, given an ``addressing``, every KM instance's
        topology is planned from them and pushed. Untracked, every node runs one KM."""
        self.network = network
        if addressing is not None:
            self.topologies.track(network, addressing)

    # --- KM replicas --------------------------------------------------------------------

    def replicas(self, node: str) -> int:
        """How many KM replicas ``node`` declares (1 for a node not declared)."""
        declared = self.network.nodes.get(node) if self.network is not None else None
        return declared.spec.km.replicas if declared is not None else 1

    def replica_counts(self) -> dict[str, tuple[int, int]]:
        """Per node of the core: (replicas that answer, replicas declared)."""
        counts = {}
        for row in self.core.nodes():
            node = row["name"]
            replicas = self.replicas(node)
            ready = sum(1 for replica in range(replicas) if self.replica_liveness(node, replica).ok)
            counts[node] = (ready, replicas)
        return counts

    def nodes(self) -> list[dict[str, Any]]:
        """The core's node rows with their KM replicas: ``replicas`` declared, ``readyReplicas``
        answering, and ``ready`` as ``kubectl`` shows it (``1/2``)."""
        counts = self.replica_counts()
        rows = []
        for row in self.core.nodes():
            ready, replicas = counts[row["name"]]
            rows.append({**row, "ready": f"{ready}/{replicas}", "readyReplicas": ready, "replicas": replicas})
        return rows

    def _targets(self, node: str) -> list[int]:
        """The replicas of a node's KMs a session push goes to: those last seen answering; all
        when none was."""
        replicas = range(self.replicas(node))
        return [replica for replica in replicas if self.replica_liveness(node, replica).ok] or list(replicas)

    def _called(self, node: str, replica: int) -> str:
        """How messages name a KM instance: ``KM of a`` on a node with one, ``KM a/1`` otherwise."""
        return f"KM of {node}" if self.replicas(node) == 1 else f"KM {instance_name(node, replica)}"

    async def rescale(self) -> None:
        """Push again every session at a node whose replica count changed since its sessions
        were pushed, so each replica holds its share of the rate; the others get nothing."""
        nodes = [row["name"] for row in self.core.nodes()]
        for gone in set(self._scale) - set(nodes):
            del self._scale[gone]
        for node in nodes:
            replicas, before = self.replicas(node), self._scale.get(node)
            self._scale[node] = replicas
            if before is not None and before != replicas:
                log.info("the KMs of %s scaled from %d to %d replicas; pushing its sessions again", node, before,
                         replicas)
                await self.core.reconfigure_node(node)

    # --- serving ------------------------------------------------------------------------

    async def serve(self) -> None:
        """Accept the KMs' calls on ``listen``; raises OSError when it cannot listen there."""
        server = grpc.aio.server()
        km_pb2_grpc.add_ControlPlaneServicer_to_server(ControlPlaneService(self.core), server)
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        try:
            port = server.add_secure_port(self.listen, grpc_server_credentials(self.tls))
        except RuntimeError as e:  # grpc's way of saying the address is taken or malformed
            await server.stop(None)
            raise OSError(f"ControlPlane service: cannot listen on {self.listen}: {e}") from None
        if port == 0:
            await server.stop(None)
            raise OSError(f"ControlPlane service: cannot listen on {self.listen}")
        await server.start()
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server, self._checks = server, checks

    # --- the cadence --------------------------------------------------------------------

    def start(self) -> None:
        """Run the timers and monitoring in the background until ``stop``."""
        self._loops = [
            asyncio.create_task(self._every(TICK_S, self.tick), name="control-plane timers"),
            asyncio.create_task(self._every(self.cadence.poll_interval_s, self.poll), name="control-plane monitoring"),
        ]

    async def _every(self, period: float, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        due = self.clock()
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not stop monitoring or timers
                log.exception("control plane: %s failed; trying again in %.2f s", step.__name__, period)
            # A fixed pace: a slow round delays the next one, it does not shift all later ones.
            due = max(due + period, self.clock())
            await asyncio.sleep(due - self.clock())

    async def tick(self) -> None:
        """The core's timers, then the KM instances due for a topology, a new question or a
        replacement, and the nodes whose replica count changed."""
        await self.core.tick()
        for node, replica in self.topologies.due():
            if self.replica_liveness(node, replica).ok is not False:  # one down is pushed once it answers again
                self._run(f"topology {instance_name(node, replica)}", self.topologies.settle(node, replica))
        now = self.clock()
        for (node, replica), watch in self._watches.items():
            if watch.ok is not False:
                continue
            name = instance_name(node, replica)
            self._run(f"probe {name}", self.check(node, replica))
            if self._replacement_due(watch, now):
                watch.replaced_at = now
                watch.replacements += 1
                log.warning("the KM %s has not answered for %.1f s (%s); replacing it",
                            name, now - watch.failing_since, watch.error)
                self._run(f"replace {name}", self.replacer.replace(node, replica))
        self._run("rescale", self.rescale())

    def _replacement_due(self, watch: _KMWatch, now: float) -> bool:
        after = self.cadence.replace_after_s
        if self.replacer is None or after is None or watch.failing_since is None or now - watch.failing_since < after:
            return False
        # A replacement needs time to start: each further one during the same outage waits twice
        # as long (as a kubelet backs off a crashing container), so replacing never becomes a loop.
        backoff = after * min(2 ** watch.replacements, MAX_BACKOFF_FACTOR)
        return watch.replaced_at is None or now - watch.replaced_at >= backoff

    def _run(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background unless the same work is still under way."""
        if what in self._work:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work, name=what)
        self._work[what] = task
        task.add_done_callback(lambda done: self._finished(what, done))

    def _finished(self, what: str, task: asyncio.Task) -> None:
        self._work.pop(what, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("control plane: %s failed", what, exc_info=task.exception())

    async def poll(self) -> None:
        """One monitoring round: every KM instance's liveness and every link's sample into the core."""
        replicas = {row["name"]: self.replicas(row["name"]) for row in self.core.nodes()}
        links = {row["name"]: tuple(row["nodes"]) for row in self.core.links()}
        modules = {link: url for link in links if (url := self.module_metrics(link)) is not None}
        asked_at = self.clock()
        round_ = await read_round(self.kms, replicas, links, modules, self.core.clock)
        for (node, replica), answer in round_.stats.items():
            await self._observe(node, replica, asked_at, answer)
        for gone in set(self._watches) - set(round_.stats):
            del self._watches[gone]
        for gone in set(self._owed_deletes) - set(round_.stats):
            del self._owed_deletes[gone]
        self._down &= set(replicas)
        self.sampler.retain(links)
        for reading in round_.links:
            sample = self.sampler.sample(reading)
            if sample is not None:
                await self.core.link_sample(sample)
        for listener in self.listeners:
            listener.polled()

    # --- KM liveness --------------------------------------------------------------------

    def replica_liveness(self, node: str, replica: int) -> KMLiveness:
        """What the host last saw of replica ``replica`` of the KMs of ``node``."""
        watch = self._watches.get((node, replica))
        return watch.liveness() if watch is not None else KMLiveness(ok=None)

    def liveness(self, node: str) -> KMLiveness:
        """The KMs of ``node`` as one: serving while any replica answers (with the incarnation
        of the first that does), down once every replica was seen failing, unknown otherwise."""
        seen = [(replica, self.replica_liveness(node, replica)) for replica in range(self.replicas(node))]
        serving = [liveness for _, liveness in seen if liveness.ok]
        if serving:
            return serving[0]
        if seen and all(liveness.ok is False for _, liveness in seen):
            if len(seen) == 1:
                return seen[0][1]
            return KMLiveness(False, "; ".join(f"replica {replica}: {liveness.error}" for replica, liveness in seen))
        return KMLiveness(ok=None)

    def _instances(self, node: str, replica: int | None) -> list[int]:
        return list(range(self.replicas(node))) if replica is None else [replica]

    def km_lost(self, node: str, replica: int | None = None) -> None:
        """The runtime found a KM instance of ``node`` gone (its process exited, its pod is
        missing; None: every replica, e.g. its whole workload): the replacement it starts is
        timed from now."""
        for ordinal in self._instances(node, replica):
            watch = self._watches.setdefault((node, ordinal), _KMWatch())
            if watch.lost_at is None:
                watch.lost_at = self.clock()

    async def check(self, node: str, replica: int | None = None) -> None:
        """Ask a KM instance of ``node`` now (None: every replica), e.g. once the runtime started
        a new instance."""
        asked_at = self.clock()
        for ordinal in self._instances(node, replica):
            await self._observe(node, ordinal, asked_at, await read_km(self.kms, node, ordinal))

    async def _observe(self, node: str, replica: int, asked_at: float, answer: km_pb2.Stats | Exception) -> None:
        watch = self._watches.setdefault((node, replica), _KMWatch())
        if asked_at < watch.asked_at:
            return  # an older question than one whose answer was already taken
        watch.asked_at = asked_at
        if isinstance(answer, Exception):
            await self._failing(node, replica, watch, _describe(answer))
            return
        replaced = watch.incarnation is not None and watch.incarnation != answer.incarnation
        was_down = watch.ok is False
        changed = watch.ok is not True
        missed, watch.missed = watch.missed, False
        watch.ok, watch.error, watch.incarnation = True, "", answer.incarnation
        watch.failing_since, watch.replacements = None, 0
        self.core.keys_issued(node, answer.incarnation, ((d.session_id, d.keys, d.bits) for d in answer.delivered))
        if self.topologies.observed(node, replica, answer.incarnation, answer.topology_version):
            await self.topologies.settle(node, replica)  # before its sessions are pushed again, as they need its links
        if changed:
            self._tell(lambda listener: listener.km_liveness_changed(node, replica, watch.liveness()))
        if changed or replaced:
            await self._send_owed_deletes(node, replica)
        if not (was_down or replaced or missed or node in self._down):
            return
        self._down.discard(node)
        # The node's sessions go to every replica answering, under new versions: harmless to
        # those that held them, and what this one lacks (all of them if it lost its state).
        await self.core.node_up(node, "KMReplaced" if replaced else "KMReady",
                                f"{self._called(node, replica)} answers (incarnation {answer.incarnation[:8]})")
        lost_at, watch.lost_at = watch.lost_at, None
        if replaced:
            seconds = self.clock() - lost_at if lost_at is not None else None
            self.metrics.km_replacements(node).inc()
            name = instance_name(node, replica)
            if seconds is None:
                log.warning("KM %s replaced (restart not observed) and configured again", name)
            else:
                log.warning("KM %s replaced and configured again %.2f s after it was lost", name, seconds)
            self._tell(lambda listener: listener.km_replaced(node, replica, seconds))

    async def _send_owed_deletes(self, node: str, replica: int) -> None:
        owed = self._owed_deletes.pop((node, replica), {})
        for session_id, reason in sorted(owed.items()):
            try:
                await self.kms.delete(node, replica, session_id, reason)
            except Exception as e:  # still owed; sent again when it is next seen back
                self._owed_deletes.setdefault((node, replica), {})[session_id] = reason
                log.warning("KM %s did not confirm the deletion of session %s it missed: %s",
                            instance_name(node, replica), session_id, _describe(e))

    async def _failing(self, node: str, replica: int, watch: _KMWatch, error: str) -> None:
        first = watch.ok is not False
        watch.ok, watch.error = False, error
        if not first:
            return
        watch.failing_since = self.clock()
        if watch.lost_at is None:
            watch.lost_at = watch.failing_since
        self._tell(lambda listener: listener.km_liveness_changed(node, replica, watch.liveness()))
        serving = [ordinal for ordinal in range(self.replicas(node)) if self.replica_liveness(node, ordinal).ok]
        if serving:
            log.warning("KM %s does not answer (%s); replicas %s of %s serve", instance_name(node, replica), error,
                        ", ".join(map(str, serving)), node)
            return
        if node not in self._down:
            self._down.add(node)
            await self.core.node_down(node, "KMUnreachable", f"{self._called(node, replica)} does not answer: {error}")

    def _tell(self, call: Callable[[HostListener], None]) -> None:
        for listener in self.listeners:
            try:
                call(listener)
            except Exception:  # showing state must not stop judging it
                log.exception("control plane: a listener failed")

    # --- stopping -----------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop the cadence and the server, and close the KM client."""
        work = self._loops + list(self._work.values())
        for task in work:
            task.cancel()
        await asyncio.gather(*work, return_exceptions=True)
        self._loops = []
        if self._server is not None:
            await self._checks.enter_graceful_shutdown()
            await self._server.stop(STOP_GRACE_S)
            self._server = None
        await self.kms.close()


def _describe(error: Exception) -> str:
    details = error.details() if isinstance(error, grpc.aio.AioRpcError) else ""
    return f"{type(error).__name__}: {details or error}"
