"""QKDNode: the node in the control core's topology, and its KM as a one-replica StatefulSet.

The KM's configuration names its links and every SAE of the network, so it is rendered
from the cached specs of all nodes and links and applied again whenever one of them
changes; a new configuration changes the pod template's hash and so rolls the KM out.
The TLS identity is issued once, from the operator's CA, and never rewritten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import kopf

from vqkd.km import identity
from vqkd.operator.control.errors import ControlError
from vqkd.operator.kopf.handlers.common import dump, refuse, validated
from vqkd.operator.kopf.kube import CONFIGMAPS, PODS, SECRETS, SERVICES, STATEFULSETS, Kube, KubeError
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.manifests import (
    ANNOTATION_RESTARTED_AT, ClusterAddressing, build_km_configmap, build_km_service, build_km_statefulset,
    build_tls_secret, content_hash, km_name, km_pod, km_tls_secret, node_labels, service_hosts, with_spec_hash,
)
from vqkd.operator.plan import km_config, km_topology
from vqkd.operator.resources.models import API_VERSION, ConditionType, LinkState, NodePhase, QKDNode, QKDNodeStatus

KIND = "QKDNode"
log = logging.getLogger(__name__)


async def reconcile(runtime: Runtime, body: Mapping[str, Any], *, workloads: bool = True) -> None:
    """Create, update and resume alike: register the node, then make its KM match the spec."""
    with runtime.metrics.reconcile(KIND):
        node = validated(runtime, KIND, body)
        previous = runtime.resources.nodes.get(node.name)
        try:
            await runtime.core.apply(node)
        except ControlError as e:
            refuse(runtime, KIND, node.name, "Conflict", str(e))
        runtime.resources.nodes[node.name] = node
        runtime.solved(KIND, node.name)
        if not workloads:
            return
        await sync_workloads(runtime, [node.name])
        # Every KM knows where each SAE is attached: a new node or a changed SAE list reaches all.
        if previous is None or previous.spec.sae_ids != node.spec.sae_ids or previous.kme_id != node.kme_id:
            await sync_workloads(runtime, [name for name in runtime.resources.nodes if name != node.name])


async def delete(runtime: Runtime, body: Mapping[str, Any]) -> None:
    name = body["metadata"]["name"]
    with runtime.metrics.reconcile(KIND):
        try:
            await runtime.core.delete(KIND, name)
        except ControlError as e:
            raise kopf.TemporaryError(str(e), delay=runtime.options.retry_delay_s) from None
        try:
            await asyncio.to_thread(_delete_children, runtime.kube, name)
        except (KubeError, OSError) as e:
            runtime.metrics.errors(KIND).inc()
            raise kopf.TemporaryError(f"QKDNode {name}: removing its KM failed: {e}",
                                      delay=runtime.options.retry_delay_s) from None
        runtime.forget(KIND, name)
        runtime.health.pop(name, None)
        runtime.replacing.pop(name, None)
    try:
        await sync_workloads(runtime, list(runtime.resources.nodes))
    except kopf.TemporaryError as e:
        log.warning("after deleting QKDNode %s, the other KMs keep its SAEs until their next sync: %s", name, e)


def _delete_children(kube: Kube, name: str) -> None:
    # Owner references let a cluster's garbage collector do this too; doing it here makes
    # deletion complete without one, and the finalizer waits for it.
    for kind, child in ((STATEFULSETS, km_name(name)), (SERVICES, km_name(name)), (CONFIGMAPS, km_name(name)),
                        (SECRETS, km_tls_secret(name))):
        kube.delete(kind, child)


# --- the KM workload ----------------------------------------------------------------


def owner_of(runtime: Runtime, kind: str, name: str) -> dict[str, Any] | None:
    ref = runtime.refs.get((kind, name))
    if ref is None or not ref.uid:
        return None
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": ref.namespace,
                                                                   "uid": ref.uid}}


def desired_children(runtime: Runtime, node: QKDNode) -> tuple[dict[str, Any], ...]:
    """ConfigMap, Service and StatefulSet of the node's KM, owned by the node."""
    addressing = ClusterAddressing(runtime.namespace, runtime.options.km_control_plane)
    # The control plane does not push topologies yet: each KM starts with the plan's.
    config = km_config(runtime.resources, node.name, addressing).model_copy(
        update={"topology": km_topology(runtime.resources, node.name, addressing)})
    configmap = build_km_configmap(node.name, config)
    device_secrets = {
        name: link.spec.etsi014.endpoints[node.name].secret_ref.name
        for name, link in runtime.resources.links.items()
        if link.spec.etsi014 is not None and node.name in link.spec.nodes
    }
    statefulset = build_km_statefulset(node, content_hash(configmap["data"]), device_secrets)
    children = (configmap, build_km_service(node.name), statefulset)
    owner = owner_of(runtime, KIND, node.name)
    if owner is not None:
        kopf.adopt(list(children), owner=owner)
    return tuple(with_spec_hash(child) for child in children)


async def sync_workloads(runtime: Runtime, names: Iterable[str]) -> None:
    """Apply the KM workload of each named node as its spec and the network now say.

    One node at a time under its lock, rendering inside the lock: of two syncs racing, the
    later one writes last and from the newer state.
    """
    for name in names:
        async with runtime.workload_locks[name]:
            node = runtime.resources.nodes.get(name)
            if node is None or (KIND, name) not in runtime.refs:
                continue
            children = desired_children(runtime, node)
            secret_owner = owner_of(runtime, KIND, name)
            try:
                await asyncio.to_thread(_apply_children, runtime, name, children, secret_owner)
            except (KubeError, OSError) as e:
                runtime.metrics.errors(KIND).inc()
                runtime.configured.discard((KIND, name))
                message = f"QKDNode {name}: applying its KM workload failed: {e}"
                runtime.problem(KIND, name, "WorkloadNotApplied", message, permanent=False)
                raise kopf.TemporaryError(message, delay=runtime.options.retry_delay_s) from None
            runtime.configured.add((KIND, name))
            runtime.solved(KIND, name)


def _apply_children(runtime: Runtime, name: str, children: tuple[dict[str, Any], ...],
                    owner: dict[str, Any] | None) -> None:
    kube = runtime.kube
    if kube.get(SECRETS, km_tls_secret(name)) is None:
        hosts = service_hosts(km_name(name), runtime.namespace)
        issued = runtime.ca.issue(identity.km(name), f"cluster-km-{name}", server_names=hosts)
        secret = build_tls_secret(km_tls_secret(name), node_labels(name), {
            "ca.crt": runtime.ca.cert_path.read_bytes(), "tls.crt": issued.cert.read_bytes(),
            "tls.key": issued.key.read_bytes(),
        })
        if owner is not None:
            kopf.adopt(secret, owner=owner)
        kube.ensure(SECRETS, secret, create_only=True)
    configmap, service, statefulset = children
    kube.ensure(CONFIGMAPS, configmap)
    kube.ensure(SERVICES, service)
    kube.ensure(STATEFULSETS, statefulset)


def restart_km(kube: Kube, name: str) -> None:
    """Replace a KM's pod: force-delete it (a pod on a lost machine otherwise stays Terminating
    and its StatefulSet never starts another) and stamp the template, as `kubectl rollout restart`."""
    kube.delete(PODS, km_pod(name), grace_period_s=0)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.patch(STATEFULSETS, km_name(name),
               {"spec": {"template": {"metadata": {"annotations": {ANNOTATION_RESTARTED_AT: stamp}}}}})


# --- status ---------------------------------------------------------------------------


def status_of(runtime: Runtime, name: str, previous: dict[str, Any]) -> dict[str, Any]:
    status = QKDNodeStatus.model_validate(previous)
    generation = runtime.generation(KIND, name)
    problem = runtime.problems.get((KIND, name))
    health = runtime.health.get(name)
    configured = (KIND, name) in runtime.configured
    serving = bool(health and health.ok)

    def condition(type: str, ok: bool, reason: str, message: str) -> None:
        status.set_condition(type, "True" if ok else "False", reason, message, observed_generation=generation)

    if problem is not None and problem.permanent:
        status.phase, status.ready = NodePhase.FAILED, False
        condition(ConditionType.CONFIGURED, False, problem.reason, problem.message)
        condition(ConditionType.READY, False, problem.reason, problem.message)
    else:
        if configured:
            condition(ConditionType.CONFIGURED, True, "WorkloadApplied",
                      f"StatefulSet, Service and ConfigMap {km_name(name)} and Secret {km_tls_secret(name)} applied")
        else:
            reason, message = (problem.reason, problem.message) if problem else ("Pending", "KM workload not applied yet")
            condition(ConditionType.CONFIGURED, False, reason, message)
        if serving:
            down = [link.name for link in runtime.core.topology.links_at(name) if link.state is LinkState.DOWN]
            status.phase = NodePhase.DEGRADED if down else NodePhase.RUNNING
            message = f"KM serving; links down: {', '.join(down)}" if down else "KM serving"
            condition(ConditionType.READY, configured, "KMServing" if configured else "WorkloadPending", message)
        else:
            status.phase = NodePhase.PENDING
            if health is None or health.ok is None:
                condition(ConditionType.READY, False, "NotPolledYet", "the KM has not been polled yet")
            else:
                condition(ConditionType.READY, False, "KMUnreachable", f"the KM does not answer: {health.error}")
        status.ready = serving and configured
        try:
            status.endpoints.etsi014 = runtime.endpoints.km_etsi014(name)
            status.endpoints.grpc = runtime.endpoints.km_grpc(name)
            status.endpoints.metrics = runtime.endpoints.km_metrics(name)
        except LookupError:
            pass  # a local runtime without this node: no endpoints to show
    status.observed_generation = generation
    return dump(status)
