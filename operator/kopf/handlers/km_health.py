"""Health and replacement of the KMs, as the operator does and shows them.

The control-plane host polls every KM and judges its liveness by incarnation (see
``vqkd.operator.host``); this controller is what the operator plugs into it. It replaces a
KM that stopped answering by replacing its pod; it shows each KM's health as the QKDNode's
``Ready`` condition, phase and endpoints; and it reports each replacement — from the KM
found unreachable or missing to a new instance serving with its sessions pushed again — in
``vqkd_operator_km_replacement_seconds`` and as an Event on the node.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.host import HostListener, KMLiveness
from vqkd.operator.kopf.kube import PODS, STATEFULSETS, Kube, KubeError
from vqkd.operator.kopf.manifests import ANNOTATION_RESTARTED_AT, km_name, km_pod
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.resources.models import ConditionType, NodePhase, QKDNodeStatus

KIND = "QKDNode"
log = logging.getLogger(__name__)


class KMHealth(HostListener):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def replace(self, node: str, replica: int) -> None:
        """The host's ``KMReplacer``: a new pod for a KM replica that stopped answering."""
        declared = self.runtime.resources.nodes.get(node)
        only = declared is None or declared.spec.km.replicas == 1
        try:
            await asyncio.to_thread(replace_pod, self.runtime.kube, node, replica, restamp=only)
        except (KubeError, OSError) as e:
            self.runtime.metrics.errors(KIND).inc()
            log.warning("replacing the KM pod of QKDNode %s failed; trying again later: %s", node, e)

    def km_liveness_changed(self, node: str, replica: int, liveness: KMLiveness) -> None:
        self.runtime.status.mark(KIND, node)

    def km_replaced(self, node: str, replica: int, seconds: float | None) -> None:
        sessions = next((row["sessions"] for row in self.runtime.core.nodes() if row["name"] == node), 0)
        if seconds is None:
            message = f"a new KM instance serves with its {sessions} sessions pushed again (restart not observed)"
        else:
            self.runtime.metrics.km_replacement_seconds.observe(seconds)
            message = (f"KM replaced in {seconds:.2f} s: from found unreachable or missing to a new instance serving "
                       f"with its {sessions} sessions pushed again")
        log.info("QKDNode %s: %s", node, message)
        self.runtime.status.event(KIND, node, "Normal", "KMReplaced", message)
        self.runtime.status.mark(KIND, node)

    def show(self, name: str, status: QKDNodeStatus, generation: int | None) -> bool:
        """``Ready`` when the KM serves and its workload is ``Configured`` (written before this part)."""
        runtime = self.runtime
        liveness = runtime.host.liveness(name)
        configured = status.condition(ConditionType.CONFIGURED)
        configured = configured is not None and configured.status == "True"

        def ready(ok: bool, reason: str, message: str) -> None:
            status.set_condition(ConditionType.READY, "True" if ok else "False", reason, message,
                                 observed_generation=generation)

        if liveness.ok:
            down = [row["name"] for row in runtime.core.links()
                    if name in row["nodes"] and row["state"] == LinkState.DOWN]
            status.phase = NodePhase.DEGRADED if down else NodePhase.RUNNING
            ready(configured, "KMServing" if configured else "WorkloadPending",
                  f"KM serving; links down: {', '.join(down)}" if down else "KM serving")
        else:
            status.phase = NodePhase.PENDING
            if liveness.ok is None:
                ready(False, "NotPolledYet", "the KM has not been polled yet")
            else:
                ready(False, "KMUnreachable", f"the KM does not answer: {liveness.error}")
        status.ready = bool(liveness.ok) and configured
        try:
            status.endpoints.etsi014 = runtime.endpoints.km_etsi014(name)
            status.endpoints.grpc = runtime.endpoints.km_grpc(name)
            status.endpoints.metrics = runtime.endpoints.km_metrics(name)
        except LookupError:
            pass  # a local runtime without this node: no endpoints to show
        return False

    def probe(self) -> dict[str, int]:
        """For kopf's liveness endpoint: how many KMs answer, of how many."""
        nodes = [row["name"] for row in self.runtime.core.nodes()]
        return {"kms": len(nodes), "answering": sum(1 for node in nodes if self.runtime.host.liveness(node).ok)}


def replace_pod(kube: Kube, name: str, replica: int = 0, *, restamp: bool = True) -> None:
    """Replace one KM replica's pod: force-delete it (a pod on a lost machine otherwise stays
    Terminating and its StatefulSet never starts another) and, with ``restamp``, stamp the
    template, as `kubectl rollout restart`. A node with several replicas is not restamped: that
    would restart its healthy replicas too, one after the other."""
    kube.delete(PODS, km_pod(name, replica), grace_period_s=0)
    if not restamp:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.patch(STATEFULSETS, km_name(name),
               {"spec": {"template": {"metadata": {"annotations": {ANNOTATION_RESTARTED_AT: stamp}}}}})
