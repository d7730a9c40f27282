"""Monitoring and KM replacement.

One loop polls every KM and emulated module (``LinkMonitor``): samples go to the control
core, which judges the links and reroutes or holds sessions; a KM that does not answer is
reported down, and up again when it answers, with everything it should hold pushed again
when it is a new instance. The loop also runs the core's timers and refreshes QKDLink status.

A kopf daemon per QKDNode compares the node's workload with the wish: a missing StatefulSet
is created again, and a KM unreachable for ``replace_after_s`` gets its pod replaced. How
long a replacement took — from the KM found unreachable or missing to its replacement
serving with its configuration pushed again — is logged, counted in
``vqkd_operator_km_replacement_seconds`` and posted as an Event on the node.
"""

from __future__ import annotations

import asyncio
import logging
import time

import kopf

from vqkd.km.v1 import km_pb2
from vqkd.operator.kopf.handlers import nodes
from vqkd.operator.kopf.kube import STATEFULSETS, KubeError
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.manifests import km_name
from vqkd.operator.adapters.sampling import LinkMonitor

log = logging.getLogger(__name__)
MAX_BACKOFF_FACTOR = 16


class HealthRecorder:
    """The KMs as ``LinkMonitor`` polls them, keeping what each poll said in ``runtime.health``."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def stats(self, node: str, timeout: float = 2.0) -> km_pb2.Stats:
        health = self.runtime.health[node]
        try:
            result = await self.runtime.kms.stats(node, timeout)
        except Exception as e:
            error = f"{type(e).__name__}: {getattr(e, 'details', lambda: '')() or e}"
            if health.ok is not False:
                health.failing_since = time.monotonic()
                self.runtime.replacing[node] = health.failing_since
                self.runtime.mark("QKDNode", node)
            health.ok, health.error = False, error
            raise
        if health.ok is not True:
            health.ok, health.failing_since, health.error, health.replacements = True, None, "", 0
            self.runtime.mark("QKDNode", node)
        return result


def build_monitor(runtime: Runtime) -> LinkMonitor:
    return LinkMonitor(runtime.core, HealthRecorder(runtime), nodes=[], links={},
                       on_replaced=lambda node: replaced(runtime, node))


def _refresh_targets(runtime: Runtime, monitor: LinkMonitor) -> None:
    topology = runtime.core.topology
    monitor.nodes = sorted(topology.nodes)
    monitor.links = {name: link.ends for name, link in sorted(topology.links.items())}
    modules = {}
    for name in monitor.links:
        link = runtime.resources.links.get(name)
        url = runtime.endpoints.module_metrics(name) if link is not None and link.spec.emulated else None
        if url is not None:
            modules[name] = url
    monitor.module_metrics = modules


async def poll_once(runtime: Runtime, monitor: LinkMonitor) -> None:
    _refresh_targets(runtime, monitor)
    await monitor.poll()
    await runtime.core.tick()
    for link in monitor.links:
        runtime.mark("QKDLink", link)
    now = time.monotonic()
    if now - runtime.counts_shown_at >= runtime.options.counts_interval_s:
        # Keys delivered change with every key request: written at this slower pace, and only
        # for the resources whose figures changed (the status writer skips equal statuses).
        runtime.counts_shown_at = now
        for session in runtime.core.admission.sessions.values():
            if session.live:
                name = runtime.session_resource(session.id)
                if name is not None:
                    runtime.mark("KeySession", name)
                runtime.mark("UserProfile", session.user)


async def poll_forever(runtime: Runtime, monitor: LinkMonitor) -> None:
    while True:
        try:
            await poll_once(runtime, monitor)
        except Exception:
            log.exception("monitoring poll failed; trying again in %.1f s", runtime.options.poll_interval_s)
            runtime.metrics.errors("Monitoring").inc()
        await asyncio.sleep(runtime.options.poll_interval_s)


def replaced(runtime: Runtime, node: str) -> None:
    """A new KM instance of ``node`` serves and holds its configuration again."""
    found = runtime.replacing.pop(node, None)
    runtime.metrics.control.km_replacements(node).inc()
    sessions = len(runtime.core.routing.sessions_at_node(node))
    if found is None:
        message = f"a new KM instance serves with its {sessions} sessions pushed again (restart not observed)"
    else:
        seconds = time.monotonic() - found
        runtime.metrics.km_replacement_seconds.observe(seconds)
        message = (f"KM replaced in {seconds:.2f} s: from found unreachable or missing to a new instance serving "
                   f"with its {sessions} sessions pushed again")
    log.info("QKDNode %s: %s", node, message)
    runtime.status.event("QKDNode", node, "Normal", "KMReplaced", message)
    runtime.mark("QKDNode", node)


async def guard_node(runtime: Runtime, name: str, stopped: kopf.DaemonStopped, logger: logging.Logger) -> None:
    """The kopf daemon of one QKDNode: its KM workload exists and its KM answers, or is replaced."""
    while not stopped:
        await stopped.wait(runtime.options.workload_check_s)
        if stopped or name not in runtime.resources.nodes:
            continue
        try:
            await _check(runtime, name, logger)
        except (KubeError, OSError) as e:
            runtime.metrics.errors("QKDNode").inc()
            logger.warning(f"checking the KM workload of QKDNode {name} failed: {e}")
        except kopf.TemporaryError as e:
            logger.warning(str(e))


async def _check(runtime: Runtime, name: str, logger: logging.Logger) -> None:
    statefulset = await asyncio.to_thread(runtime.kube.get, STATEFULSETS, km_name(name))
    if statefulset is None:
        runtime.replacing.setdefault(name, time.monotonic())
        runtime.configured.discard(("QKDNode", name))
        logger.warning(f"StatefulSet {km_name(name)} of QKDNode {name} is missing; creating it again")
        await nodes.sync_workloads(runtime, [name])
        return
    health = runtime.health.get(name)
    now = time.monotonic()
    after = runtime.options.replace_after_s
    if health is None or health.ok is not False or health.failing_since is None:
        return
    # A replacement needs time to start: each further one during the same outage waits twice
    # as long (as a kubelet backs off a crashing container), so replacing never becomes a loop.
    backoff = after * min(2 ** health.replacements, MAX_BACKOFF_FACTOR)
    if now - health.failing_since < after or (health.restarted_at is not None and now - health.restarted_at < backoff):
        return
    health.restarted_at = now
    health.replacements += 1
    logger.warning(f"the KM of QKDNode {name} has not answered for {now - health.failing_since:.1f} s "
                   f"({health.error}); replacing its pod")
    await asyncio.to_thread(nodes.restart_km, runtime.kube, name)


def probe(runtime: Runtime) -> dict[str, int]:
    """For kopf's liveness endpoint: how many KMs answer, of how many."""
    answering = sum(1 for node in runtime.core.topology.nodes if runtime.health.get(node) and runtime.health[node].ok)
    return {"kms": len(runtime.core.topology.nodes), "answering": answering}
