"""QKDNode: the node in the control core's topology, and what its KM workload is.

``NodeHandler`` registers each QKDNode with the control core, or refuses an invalid or
conflicting one with a condition saying why. ``desired_children`` renders the node's KM as
a StatefulSet of ``spec.km.replicas`` pods with its ConfigMap, its Service and the headless
Service naming each replica (the workloads controller applies them). The ConfigMap holds
the KM's identity only; its topology (links, the network's SAEs, key limits) is pushed live
by the host. So the pod template, which carries the ConfigMap's hash, changes only with what
needs a new process: the node's own KM spec, the device Secrets mounted for its ``etsi014``
links, and the operator's own inputs (its manifests, the control plane's address, its CA);
the number of replicas is not in the template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from vqkd.operator.control.errors import ControlError
from vqkd.operator.kopf.handlers.common import Problems, validated
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.manifests import (
    ClusterAddressing, build_km_configmap, build_km_replicas_service, build_km_service, build_km_statefulset,
    content_hash, km_server_names, with_spec_hash,
)
from vqkd.operator.plan import km_config
from vqkd.operator.resources.models import API_VERSION, ConditionType, NodePhase, QKDNode, QKDNodeStatus

KIND = "QKDNode"


class NodeHandler:
    """QKDNode into the control core; owns the status of a node it refused."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.problems = Problems(KIND, runtime.status, runtime.options.retry_delay_s)

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        """Create, update and resume alike: register the node, or refuse it with the reason."""
        runtime = self.runtime
        node = validated(runtime.status, self.problems, body)
        try:
            await runtime.core.apply(node)
        except ControlError as e:
            self.problems.refuse(node.name, "Conflict", str(e))
        runtime.resources.nodes[node.name] = node
        self.problems.solved(node.name)

    async def delete(self, body: Mapping[str, Any]) -> None:
        runtime = self.runtime
        name = body["metadata"]["name"]
        try:
            await runtime.core.delete(KIND, name)
        except ControlError as e:
            raise kopf.TemporaryError(str(e), delay=runtime.options.retry_delay_s) from None
        runtime.status.forget(KIND, name)
        self.problems.forget(name)
        runtime.resources.nodes.pop(name, None)

    def show(self, name: str, status: QKDNodeStatus, generation: int | None) -> bool:
        """A refused node is Failed, neither Configured nor Ready, and nothing else applies."""
        problem = self.problems.get(name)
        if problem is None:
            return False
        status.phase, status.ready = NodePhase.FAILED, False
        for type in (ConditionType.CONFIGURED, ConditionType.READY):
            status.set_condition(type, "False", problem.reason, problem.message, observed_generation=generation)
        return True


# --- the KM workload ----------------------------------------------------------------


def owner_of(runtime: Runtime, kind: str, name: str) -> dict[str, Any] | None:
    ref = runtime.status.ref(kind, name)
    if ref is None or not ref.uid:
        return None
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": ref.namespace,
                                                                   "uid": ref.uid}}


def desired_children(runtime: Runtime, node: QKDNode) -> tuple[dict[str, Any], ...]:
    """ConfigMap, Service, headless Service and StatefulSet of the node's KM, owned by the node."""
    addressing = ClusterAddressing(runtime.namespace, runtime.options.km_control_plane)
    configmap = build_km_configmap(node.name, km_config(runtime.resources, node.name, addressing))
    device_secrets = {
        name: link.spec.etsi014.endpoints[node.name].secret_ref.name
        for name, link in runtime.resources.links.items()
        if link.spec.etsi014 is not None and node.name in link.spec.nodes
    }
    statefulset = build_km_statefulset(node, content_hash(configmap["data"]), runtime.ca_hash, device_secrets,
                                       km_server_names(node.name, runtime.namespace))
    children = (configmap, build_km_service(node.name), build_km_replicas_service(node.name), statefulset)
    owner = owner_of(runtime, KIND, node.name)
    if owner is not None:
        kopf.adopt(list(children), owner=owner)
    return tuple(with_spec_hash(child) for child in children)
