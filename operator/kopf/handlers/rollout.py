"""KM pod template changes, rolled out one KM at a time across the network.

A changed pod template restarts its KM, and a restarted KM loses its key pools (its peers
drop what they shared with it) and fails the sessions through it until it serves again.
Some changes alter every KM's template at once: a new operator version (its manifests), a
new control-plane address, a new CA (every KM's TLS Secret is then issued again), or many
QKDNodes edited together. Applied together, they would restart every KM at the same moment
and stop every session. So the workloads controller hands each KM whose template changes to
the ``Rollout``, which writes one at a time: the next KM only once the one before is Ready
again, as the control-plane host judges it — answering as a new instance (another
incarnation) and holding its topology, when the host pushes topologies — or, at the latest,
``km_roll_wait_s`` after it was written, when a Warning Event on its QKDNode says it did not
come back and the next KM rolls anyway.

A template change with no other KM rolling is written at once. A roll starts with the first
KM by name whose template changes, and each next one is the first by name of those waiting;
a change arriving meanwhile waits its turn, and syncs that find a KM already waiting leave
it waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from vqkd.operator.host import TICK_S, HostListener, KMLiveness
from vqkd.operator.kopf.kube import KubeError
from vqkd.operator.kopf.runtime import Runtime

KIND = "QKDNode"
log = logging.getLogger(__name__)


class Rollout(HostListener):
    """The KMs waiting for their turn, and the task writing them one at a time while any waits.

    ``survey`` queues (``request``) every KM whose template changes, so a roll follows the
    order of names whichever change was noticed first; ``roll`` writes a KM's workload as its
    node now asks and says whether its template changed (so the KM restarts), raising
    KubeError or OSError when the write fails.
    """

    def __init__(self, runtime: Runtime, survey: Callable[[], Awaitable[None]],
                 roll: Callable[[str], Awaitable[bool]]):
        self.runtime = runtime
        self.survey = survey
        self.roll = roll
        self.waiting: set[str] = set()
        self._task: asyncio.Task | None = None
        self._seen = asyncio.Event()  # the host saw a KM answer, stop answering or come back new

    def request(self, node: str) -> None:
        """The pod template of the KM of ``node`` changes: written now if no KM rolls, else in its turn."""
        self.waiting.add(node)
        if self._task is None:
            self._task = self.runtime.background.spawn(self._run(), name="KM rollout")

    def withdraw(self, node: str) -> None:
        """The KM of ``node`` no longer waits: its template is as written, or the node is gone."""
        self.waiting.discard(node)

    def km_liveness_changed(self, node: str, replica: int, liveness: KMLiveness) -> None:
        self._seen.set()

    def km_replaced(self, node: str, replica: int, seconds: float | None) -> None:
        self._seen.set()

    async def _run(self) -> None:
        try:
            await self.survey()
            while self.waiting:
                node = min(self.waiting)
                self.waiting.discard(node)
                host = self.runtime.host
                before = {replica: host.replica_liveness(node, replica).incarnation
                          for replica in range(host.replicas(node))}
                try:
                    restarts = await self.roll(node)
                except (KubeError, OSError) as e:
                    log.warning("rolling the KM of %s failed; trying again in %.0f s: %s",
                                node, self.runtime.options.retry_delay_s, e)
                    asyncio.get_running_loop().call_later(self.runtime.options.retry_delay_s, self.request, node)
                    continue
                if restarts:
                    await self._until_back(node, before)
        finally:
            self._task = None

    async def _until_back(self, node: str, before: dict[int, str | None]) -> None:
        """Wait until every KM replica of ``node``, written while they ran as ``before`` (replica
        -> incarnation), is Ready again, or until the bound passes."""
        runtime = self.runtime
        bound = runtime.options.km_roll_wait_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = len(self.waiting)
        log.info("QKDNode %s: pod template changed, its KM restarts; %d more KMs wait their turn", node, waiting)
        runtime.status.event(KIND, node, "Normal", "KMRolling",
                             f"pod template changed: the KM restarts; {waiting} more KMs roll once it is Ready again")
        while True:
            self._seen.clear()
            if self._lagging(node, before) is None:
                break
            if node not in runtime.resources.nodes:
                return
            remaining = started + bound - loop.time()
            if remaining <= 0:
                seen = self._lagging(node, before)
                message = (f"the KM was not Ready again {bound:g} s after its pod template changed "
                           f"({seen}); the next KM rolls anyway")
                log.warning("QKDNode %s: %s", node, message)
                runtime.status.event(KIND, node, "Warning", "KMRollTimedOut", message)
                return
            # Woken when the host sees the KM change; also checked at the host's pace, for a
            # topology confirmed by a later push.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, TICK_S)):
                    await self._seen.wait()
        seconds = loop.time() - started
        log.info("QKDNode %s: KM Ready again %.2f s after its pod template changed", node, seconds)
        runtime.status.event(KIND, node, "Normal", "KMRolled",
                             f"KM Ready again {seconds:.2f} s after its pod template changed")

    def _lagging(self, node: str, before: dict[int, str | None]) -> str | None:
        """Why a KM replica of ``node`` is not back yet — each must serve as a new instance and,
        where the host pushes it, hold its topology — or None when all are."""
        host = self.runtime.host
        declared = host.topologies.declared()
        unconfirmed = host.topologies.unconfirmed()
        replicas = host.replicas(node)
        for replica in range(replicas):
            which = f"replica {replica}: " if replicas > 1 else ""
            liveness = host.replica_liveness(node, replica)
            if liveness.ok is False:
                return f"{which}{liveness.error}"
            if not liveness.ok or liveness.incarnation is None or liveness.incarnation == before.get(replica):
                return f"{which}still the instance it was"
            if (node, replica) not in declared:
                continue  # its topology comes from elsewhere (the processes of `vqkd up`)
            held = host.topologies.held(node, replica)
            if held is None or held.incarnation != liveness.incarnation or (node, replica) in unconfirmed:
                return f"{which}its topology not confirmed"
        return None
