"""QKDLink: the link in the control core's topology, its key source, and the two KMs it joins.

An emulated link gets the emulated QKD module pair as a workload of its own (Deployment,
Service, ConfigMap, TLS Secret with both ends' identities). A link to real devices
(``etsi014``) gets no workload: its two KMs are pointed at the devices' ETSI 014 endpoints,
and the Secrets named for the device credentials must exist before the KMs are changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from vqkd.km import identity
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.kopf.handlers import nodes
from vqkd.operator.kopf.handlers.common import dump, refuse, validated, wait
from vqkd.operator.kopf.kube import CONFIGMAPS, DEPLOYMENTS, SECRETS, SERVICES, Kube, KubeError
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.manifests import (
    ClusterAddressing, build_module_configmap, build_module_deployment, build_module_service, build_tls_secret,
    content_hash, link_labels, module_name, module_tls_secret, service_hosts, with_spec_hash,
)
from vqkd.operator.plan import module_config
from vqkd.operator.resources.models import ConditionType, LinkState, QKDLink, QKDLinkStatus

KIND = "QKDLink"
DEVICE_SECRET_KEYS = ("ca.crt", "tls.crt", "tls.key")
log = logging.getLogger(__name__)


async def reconcile(runtime: Runtime, body: Mapping[str, Any], *, workloads: bool = True) -> None:
    with runtime.metrics.reconcile(KIND):
        link = validated(runtime, KIND, body)
        if link.spec.etsi014 is not None:
            missing = await asyncio.to_thread(_missing_device_secrets, runtime.kube, link)
            if missing:
                wait(runtime, KIND, link.name, "SecretMissing", f"QKDLink {link.name}: {'; '.join(missing)}")
        try:
            await runtime.core.apply(link)
        except UnresolvedReference as e:
            wait(runtime, KIND, link.name, "UnresolvedReference", str(e))
        except ControlError as e:
            refuse(runtime, KIND, link.name, "Conflict", str(e))
        runtime.resources.links[link.name] = link
        runtime.solved(KIND, link.name)
        if not workloads:
            return
        await _sync_modules(runtime, link)
        await nodes.sync_workloads(runtime, link.spec.nodes)
        runtime.configured.add((KIND, link.name))
        runtime.mark(KIND, link.name)


async def delete(runtime: Runtime, body: Mapping[str, Any]) -> None:
    name = body["metadata"]["name"]
    with runtime.metrics.reconcile(KIND):
        link = runtime.resources.links.get(name)
        await runtime.core.delete(KIND, name)
        try:
            await asyncio.to_thread(_delete_modules, runtime.kube, name)
        except (KubeError, OSError) as e:
            runtime.metrics.errors(KIND).inc()
            raise kopf.TemporaryError(f"QKDLink {name}: removing its emulated modules failed: {e}",
                                      delay=runtime.options.retry_delay_s) from None
        runtime.forget(KIND, name)
    if link is not None:
        try:
            await nodes.sync_workloads(runtime, link.spec.nodes)
        except kopf.TemporaryError as e:
            log.warning("after deleting QKDLink %s, its KMs keep it until their next sync: %s", name, e)


def _missing_device_secrets(kube: Kube, link: QKDLink) -> list[str]:
    problems = []
    for node, endpoint in sorted(link.spec.etsi014.endpoints.items()):
        secret_name = endpoint.secret_ref.name
        secret = kube.get(SECRETS, secret_name)
        where = f"spec.etsi014.endpoints.{node}.secretRef"
        if secret is None:
            problems.append(f"{where}: Secret {secret_name} does not exist; create it with keys "
                            f"{', '.join(DEVICE_SECRET_KEYS)}")
            continue
        absent = [key for key in DEVICE_SECRET_KEYS if key not in (secret.get("data") or {})]
        if absent:
            problems.append(f"{where}: Secret {secret_name} lacks keys {', '.join(absent)}")
    return problems


async def _sync_modules(runtime: Runtime, link: QKDLink) -> None:
    if link.spec.emulated is None:
        work, args = _delete_modules, (runtime.kube, link.name)
    else:
        configmap = build_module_configmap(link.name, module_config(link, ClusterAddressing(runtime.namespace)))
        children = (configmap, build_module_service(link.name),
                    build_module_deployment(link.name, runtime.options.module_image, content_hash(configmap["data"])))
        owner = nodes.owner_of(runtime, KIND, link.name)
        if owner is not None:
            kopf.adopt(list(children), owner=owner)
        work, args = _apply_modules, (runtime, link, tuple(with_spec_hash(child) for child in children), owner)
    try:
        await asyncio.to_thread(work, *args)
    except (KubeError, OSError) as e:
        runtime.metrics.errors(KIND).inc()
        runtime.configured.discard((KIND, link.name))
        wait(runtime, KIND, link.name, "WorkloadNotApplied", f"QKDLink {link.name}: applying its modules failed: {e}")


def _apply_modules(runtime: Runtime, link: QKDLink, children: tuple[dict[str, Any], ...],
                   owner: dict[str, Any] | None) -> None:
    kube = runtime.kube
    if kube.get(SECRETS, module_tls_secret(link.name)) is None:
        hosts = service_hosts(module_name(link.name), runtime.namespace)
        files = {"ca.crt": runtime.ca.cert_path.read_bytes()}
        for end in ("a", "b"):
            issued = runtime.ca.issue(identity.module(link.name, end), f"cluster-module-{link.name}-{end}",
                                      server_names=hosts)
            files[f"{end}.crt"], files[f"{end}.key"] = issued.cert.read_bytes(), issued.key.read_bytes()
        secret = build_tls_secret(module_tls_secret(link.name), link_labels(link.name), files)
        if owner is not None:
            kopf.adopt(secret, owner=owner)
        kube.ensure(SECRETS, secret, create_only=True)
    configmap, service, deployment = children
    kube.ensure(CONFIGMAPS, configmap)
    kube.ensure(SERVICES, service)
    kube.ensure(DEPLOYMENTS, deployment)


def _delete_modules(kube: Kube, name: str) -> None:
    for kind, child in ((DEPLOYMENTS, module_name(name)), (SERVICES, module_name(name)),
                        (CONFIGMAPS, module_name(name)), (SECRETS, module_tls_secret(name))):
        kube.delete(kind, child)


# --- status ---------------------------------------------------------------------------


def _significant(value: float | None) -> float | None:
    # Three significant digits: a status rewritten for every jitter of a measurement is noise.
    return None if value is None else float(f"{value:.3g}")


def status_of(runtime: Runtime, name: str, previous: dict[str, Any]) -> dict[str, Any]:
    status = QKDLinkStatus.model_validate(previous)
    generation = runtime.generation(KIND, name)
    problem = runtime.problems.get((KIND, name))
    row = next((row for row in runtime.core.links() if row["name"] == name), None)
    configured = (KIND, name) in runtime.configured

    def condition(type: str, ok: bool, reason: str, message: str) -> None:
        status.set_condition(type, "True" if ok else "False", reason, message, observed_generation=generation)

    if row is None:
        reason, message = (problem.reason, problem.message) if problem else ("Pending", "not registered yet")
        status.state, status.reason = LinkState.DOWN, message
        condition(ConditionType.LINK_UP, False, reason, message)
        condition(ConditionType.CONFIGURED, False, reason, message)
        condition(ConditionType.READY, False, reason, message)
    else:
        state = LinkState(row["state"])
        status.state = state
        status.key_rate_bps = _significant(row["keyRateBps"]) if row["measured"] else None
        status.qber = _significant(row["qber"]) if row["measured"] else None
        status.stored_key_bits = row["storedKeyBits"]
        status.reserved_bps = round(row["reservedBps"])
        status.sessions = row["sessions"]
        status.reason = row["message"] or None
        up = state is not LinkState.DOWN
        condition(ConditionType.LINK_UP, up, row["reason"] or str(state), row["message"] or f"link {state}")
        if configured:
            link = runtime.resources.links.get(name)
            applied = "emulated module pair and both KMs applied" if link is not None and link.spec.emulated \
                else "both KMs pointed at the QKD devices"
            condition(ConditionType.CONFIGURED, True, "Applied", applied)
        else:
            reason, message = (problem.reason, problem.message) if problem else ("Pending", "not applied yet")
            condition(ConditionType.CONFIGURED, False, reason, message)
        ready = up and configured
        condition(ConditionType.READY, ready, "LinkReady" if ready else "LinkNotReady",
                  f"state {state}, {'configured' if configured else 'not configured'}")
    status.observed_generation = generation
    return dump(status)
