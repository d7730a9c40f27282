"""KM replicas: the HorizontalPodAutoscaler of a QKDNode, and the replicas its status shows.

vqkd does not scale KMs itself. ``kubectl scale qkdnode`` or a HorizontalPodAutoscaler sets
``spec.km.replicas`` through the QKDNode's scale subresource; the workloads controller then
renders the StatefulSet from the node's spec as for any other change. This controller:

- creates the HorizontalPodAutoscaler of a node with ``spec.km.autoscaling`` (owned by the
  node), updates it with that field, and removes it when the field or the node goes;
- shows what the node's StatefulSet reports — its pods and its ready pods — as
  ``status.replicas`` and ``status.readyReplicas``, with the pods' label selector in
  ``status.selector``: the scale subresource reads them, and so does an autoscaler
  (``currentReplicas``, and which pods' metrics to average).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf

from vqkd.operator.kopf.handlers.nodes import owner_of
from vqkd.operator.kopf.kube import HORIZONTALPODAUTOSCALERS, Kube, KubeError
from vqkd.operator.kopf.manifests import LABEL_NODE, build_km_autoscaler, km_autoscaler, km_selector, with_spec_hash
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.resources.models import QKDNodeStatus

KIND = "QKDNode"


class Replicas:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._counted: dict[str, tuple[int, int]] = {}  # node -> (pods, ready pods) of its StatefulSet

    async def node_changed(self, name: str) -> None:
        """The node was accepted: its autoscaler as ``spec.km.autoscaling`` says, or none."""
        runtime = self.runtime
        node = runtime.resources.nodes.get(name)
        if node is None or runtime.status.ref(KIND, name) is None:
            return
        autoscaler = build_km_autoscaler(node)
        owner = owner_of(runtime, KIND, name)
        if autoscaler is not None and owner is not None:
            kopf.adopt(autoscaler, owner=owner)
            autoscaler = with_spec_hash(autoscaler)
        await self._call(name, "applying", _apply_autoscaler, runtime.kube, name, autoscaler)

    async def node_deleted(self, name: str) -> None:
        await self._call(name, "removing", _apply_autoscaler, self.runtime.kube, name, None)
        self._counted.pop(name, None)

    async def _call(self, name: str, doing: str, call, *args: Any) -> None:
        try:
            await asyncio.to_thread(call, *args)
        except (KubeError, OSError) as e:
            self.runtime.metrics.errors(KIND).inc()
            raise kopf.TemporaryError(f"QKDNode {name}: {doing} its HorizontalPodAutoscaler failed: {e}",
                                      delay=self.runtime.options.retry_delay_s) from None

    def statefulset_seen(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a KM StatefulSet: its node shows the pods it now reports."""
        name = body.get("metadata", {}).get("labels", {}).get(LABEL_NODE)
        if not name:
            return
        status = body.get("status") or {}
        counted = (0, 0) if event_type == "DELETED" else (status.get("replicas", 0), status.get("readyReplicas", 0))
        if self._counted.get(name) != counted:
            self._counted[name] = counted
            self.runtime.status.mark(KIND, name)

    def show(self, name: str, status: QKDNodeStatus, generation: int | None) -> bool:
        status.replicas, status.ready_replicas = self._counted.get(name, (0, 0))
        status.selector = km_selector(name)
        return False


def _apply_autoscaler(kube: Kube, name: str, autoscaler: dict[str, Any] | None) -> None:
    if autoscaler is None:
        kube.delete(HORIZONTALPODAUTOSCALERS, km_autoscaler(name))
    else:
        kube.ensure(HORIZONTALPODAUTOSCALERS, autoscaler)
