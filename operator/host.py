"""The control-plane host: the one object both runtimes run the control core in.

The host owns what the local runtime and the operator have in common:

- the control core, pushing to the KMs through the runtime's KM client (each confirmed push
  timed in ``vqkd_control_push_duration_seconds``), and the ``vqkd_control_*`` metrics;
- the gRPC server the KMs call: the ControlPlane service (paper Fig. 2a: open, key-request
  signal, close) and the standard gRPC health service, with mutual TLS under the
  controller identity;
- one cadence: the core's timers run every ``TICK_S``, monitoring every
  ``Cadence.poll_interval_s`` (see ``Cadence``);
- KM liveness, judged in one place: a KM that does not answer is reported down; one that
  answers again is reported up; one that answers with a new incarnation is a new instance
  that lost its state, so it is reported replaced and gets its topology and then every
  session it takes part in pushed again. A KM unreachable for ``replace_after_s`` is
  replaced through the runtime;
- every KM's topology (``topologies``, a ``TopologyPusher``): once the runtime tracks its
  declared resources there, each KM gets its topology when first seen, again when replaced
  or when it reports less than was pushed, and before any session is pushed to it; the
  runtime calls ``topologies.refresh()`` after each change of its resources.

A runtime plugs in only what differs: how a KM is replaced (``KMReplacer``: a process, a
pod) and how state is shown (``HostListener``: the local runtime's views read the core
directly and need none; the operator writes resource status and Events).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

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
from vqkd.operator.control.session_config import KMPusher, KMSessionConfig
from vqkd.operator.topologies import TopologyClient, TopologyPusher

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
    round costs a gRPC call per KM and a scrape per module, and sets the interval key rates
    are measured over. Timers do not depend on it; they run every ``TICK_S``. A KM that is
    down is asked again at every tick, so its return is noticed at the timers' pace.
    """

    poll_interval_s: float = 1.0
    replace_after_s: float | None = None  # None: only the runtime restarts its KMs

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0 or (self.replace_after_s is not None and self.replace_after_s <= 0):
            raise ValueError(f"cadence needs poll_interval_s > 0 and replace_after_s > 0 or None, got {self}")


class KMClient(KMPusher, KMStats, TopologyClient, Protocol):
    """The host's way to the KMs (``GrpcKMs``): session pushes for the core, stats for
    monitoring, topology pushes for the topology pusher."""

    async def close(self) -> None: ...


class KMReplacer(Protocol):
    async def replace(self, node: str) -> None:
        """Put a new instance of the KM of ``node`` in place of one that stopped answering."""


class HostListener:
    """How a runtime shows what the host sees; each method is a no-op unless overridden."""

    def km_liveness_changed(self, node: str, liveness: KMLiveness) -> None:
        """The KM of ``node`` started or stopped answering."""

    def km_replaced(self, node: str, seconds: float | None) -> None:
        """A new KM instance of ``node`` serves with its sessions pushed again; ``seconds``
        since it was found unreachable or missing, None when that was not observed."""

    def polled(self) -> None:
        """A monitoring round fed the core new samples."""


@dataclass(frozen=True, slots=True)
class KMLiveness:
    """What the host last saw of one KM."""

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

    def liveness(self) -> KMLiveness:
        return KMLiveness(self.ok, self.error, self.incarnation)


class _TimedPushes:
    """The core's pusher: the KM client, each confirmed push timed, and each session
    configuration pushed only once the KM was given the topology holding its hops."""

    def __init__(self, kms: KMPusher, observe: Callable[[str, float], None],
                 settle_topology: Callable[[str], Coroutine[Any, Any, bool]]):
        self.kms = kms
        self.observe = observe
        self.settle_topology = settle_topology

    async def configure(self, node: str, config: KMSessionConfig) -> None:
        await self.settle_topology(node)  # a KM that did not take it refuses the session: that is the failure
        started = time.perf_counter()
        await self.kms.configure(node, config)
        self.observe("configure", time.perf_counter() - started)

    async def delete(self, node: str, session_id: str, reason: str) -> None:
        started = time.perf_counter()
        await self.kms.delete(node, session_id, reason)
        self.observe("delete", time.perf_counter() - started)


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
        self.topologies = TopologyPusher(
            kms, observe=lambda seconds: self.metrics.push_seconds("topology").observe(seconds))
        self.core = ControlCore(
            _TimedPushes(kms, lambda call, seconds: self.metrics.push_seconds(call).observe(seconds),
                         self.topologies.settle),
            namespace=namespace, token_lookup=token_lookup, admission=admission, monitoring=monitoring,
        )
        self.metrics = ControlMetrics(self.core, registry)
        self.sampler = LinkSampler()
        self._watches: dict[str, _KMWatch] = {}
        self._server: grpc.aio.Server | None = None
        self._checks: health.aio.HealthServicer | None = None
        self._loops: list[asyncio.Task] = []
        self._work: dict[str, asyncio.Task] = {}  # probes and replacements in flight, by what they do

    def plug(self, *, replacer: KMReplacer | None = None, listeners: Iterable[HostListener] = ()) -> None:
        """How the runtime replaces a KM that stopped answering, and who shows what the host
        sees; plugged in before ``start``, once the runtime's parts that need the core exist."""
        self.replacer = replacer
        self.listeners = list(listeners)

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
        """The core's timers, then the KMs due for a topology, a new question or a replacement."""
        await self.core.tick()
        for node in self.topologies.due():
            if self.liveness(node).ok is not False:  # a KM down is pushed once it answers again
                self._run(f"topology {node}", self.topologies.settle(node))
        now = self.clock()
        for node, watch in self._watches.items():
            if watch.ok is not False:
                continue
            self._run(f"probe {node}", self.check(node))
            if self._replacement_due(watch, now):
                watch.replaced_at = now
                watch.replacements += 1
                log.warning("the KM of %s has not answered for %.1f s (%s); replacing it",
                            node, now - watch.failing_since, watch.error)
                self._run(f"replace {node}", self.replacer.replace(node))

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
        """One monitoring round: every KM's liveness and every link's sample into the core."""
        nodes = [row["name"] for row in self.core.nodes()]
        links = {row["name"]: tuple(row["nodes"]) for row in self.core.links()}
        modules = {link: url for link in links if (url := self.module_metrics(link)) is not None}
        asked_at = self.clock()
        round_ = await read_round(self.kms, nodes, links, modules, self.core.clock)
        for node in nodes:
            await self._observe(node, asked_at, round_.stats[node])
        for gone in set(self._watches) - set(nodes):
            del self._watches[gone]
        self.sampler.retain(links)
        for reading in round_.links:
            sample = self.sampler.sample(reading)
            if sample is not None:
                await self.core.link_sample(sample)
        for listener in self.listeners:
            listener.polled()

    # --- KM liveness --------------------------------------------------------------------

    def liveness(self, node: str) -> KMLiveness:
        watch = self._watches.get(node)
        return watch.liveness() if watch is not None else KMLiveness(ok=None)

    def km_lost(self, node: str) -> None:
        """The runtime found the KM of ``node`` gone (its process exited, its workload is
        missing): the replacement it starts is timed from now."""
        watch = self._watches.setdefault(node, _KMWatch())
        if watch.lost_at is None:
            watch.lost_at = self.clock()

    async def check(self, node: str) -> None:
        """Ask the KM of ``node`` now, e.g. once the runtime started a new instance."""
        asked_at = self.clock()
        await self._observe(node, asked_at, await read_km(self.kms, node))

    async def _observe(self, node: str, asked_at: float, answer: km_pb2.Stats | Exception) -> None:
        watch = self._watches.setdefault(node, _KMWatch())
        if asked_at < watch.asked_at:
            return  # an older question than one whose answer was already taken
        watch.asked_at = asked_at
        if isinstance(answer, Exception):
            await self._failing(node, watch, _describe(answer))
            return
        replaced = watch.incarnation is not None and watch.incarnation != answer.incarnation
        was_down = watch.ok is False
        changed = watch.ok is not True
        watch.ok, watch.error, watch.incarnation = True, "", answer.incarnation
        watch.failing_since, watch.replacements = None, 0
        self.core.keys_issued(node, answer.incarnation, ((d.session_id, d.keys, d.bits) for d in answer.delivered))
        if self.topologies.observed(node, answer.incarnation, answer.topology_version):
            await self.topologies.settle(node)  # before its sessions are pushed again, as they need its links
        if changed:
            self._tell(lambda listener: listener.km_liveness_changed(node, watch.liveness()))
        if not (was_down or replaced):
            return
        await self.core.node_up(node, "KMReplaced" if replaced else "KMReady",
                                f"KM of {node} answers (incarnation {answer.incarnation[:8]})")
        lost_at, watch.lost_at = watch.lost_at, None
        if replaced:
            seconds = self.clock() - lost_at if lost_at is not None else None
            self.metrics.km_replacements(node).inc()
            if seconds is None:
                log.warning("KM of %s replaced (restart not observed) and configured again", node)
            else:
                log.warning("KM of %s replaced and configured again %.2f s after it was lost", node, seconds)
            self._tell(lambda listener: listener.km_replaced(node, seconds))

    async def _failing(self, node: str, watch: _KMWatch, error: str) -> None:
        first = watch.ok is not False
        watch.ok, watch.error = False, error
        if not first:
            return
        watch.failing_since = self.clock()
        if watch.lost_at is None:
            watch.lost_at = watch.failing_since
        self._tell(lambda listener: listener.km_liveness_changed(node, watch.liveness()))
        await self.core.node_down(node, "KMUnreachable", f"KM of {node} does not answer: {error}")

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
