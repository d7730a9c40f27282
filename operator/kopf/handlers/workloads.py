"""The workloads controller: the children the operator runs for QKDNodes and QKDLinks.

Each QKDNode gets its KM (StatefulSet, Service, ConfigMap rendered by
``nodes.desired_children``, and a TLS Secret issued from the operator's CA); each emulated
QKDLink its module pair (Deployment, Service, ConfigMap rendered by
``links.module_children``, and a TLS Secret with both ends' identities). A link to real
devices gets no workload of its own: its KMs are pointed at the devices. A TLS Secret is
issued once, and again only when the operator's CA is no longer the one it was issued from;
the pod templates carry the CA, so the pods then restart onto the new certificates.

Children are applied once the resource handler has accepted the resource. A KM's workload
holds its identity only, so other nodes, links and SAEs never change it (the host pushes
the KMs their topologies); only a link to devices does, at its two nodes, whose KMs mount
its device Secrets. A change of a KM's pod template restarts the KM, so it is written in
the KM's turn of the ``Rollout`` (one KM at a time); a new KM, and a change that leaves the
template as it is, are written at once. Children are removed with their resource (owner
references let a cluster's garbage collector do this too; doing it here makes deletion
complete without one). A daemon per QKDNode guards its StatefulSet: a missing one is
created again. The controller owns the ``Configured`` condition of both kinds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import kopf
from cryptography import x509

from vqkd.km import identity
from vqkd.km.pki import DevCA
from vqkd.operator.kopf.handlers.common import Problems
from vqkd.operator.kopf.handlers.links import module_children
from vqkd.operator.kopf.handlers.nodes import desired_children, owner_of
from vqkd.operator.kopf.handlers.rollout import Rollout
from vqkd.operator.kopf.kube import CONFIGMAPS, DEPLOYMENTS, SECRETS, SERVICES, STATEFULSETS, Kube, KubeError
from vqkd.operator.kopf.manifests import (
    build_tls_secret, km_name, km_replicas_service, km_server_names, km_tls_secret, link_labels, module_name,
    module_tls_secret, node_labels, service_hosts, template_hash,
)
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.status import Key
from vqkd.operator.resources.models import ConditionType, QKDLink, QKDLinkStatus, QKDNodeStatus

NODE, LINK = "QKDNode", "QKDLink"
log = logging.getLogger(__name__)


class Workloads:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.problems = {kind: Problems(kind, runtime.status, runtime.options.retry_delay_s) for kind in (NODE, LINK)}
        self.applied: set[Key] = set()  # resources whose children are applied as their spec says
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._link_ends: dict[str, tuple[str, ...]] = {}  # link -> the nodes whose KMs it was rendered into
        self.rollout = Rollout(runtime, self._queue_template_changes, self._roll)

    # --- QKDNode ------------------------------------------------------------------------

    async def node_changed(self, name: str) -> None:
        """The node was accepted: its KM as it says."""
        await self.sync_kms([name])

    async def node_deleted(self, name: str) -> None:
        """The node was removed from the core: its KM goes."""
        try:
            await asyncio.to_thread(_delete_km, self.runtime.kube, name)
        except (KubeError, OSError) as e:
            self.runtime.metrics.errors(NODE).inc()
            raise kopf.TemporaryError(f"QKDNode {name}: removing its KM failed: {e}",
                                      delay=self.runtime.options.retry_delay_s) from None
        self.applied.discard((NODE, name))
        self.problems[NODE].forget(name)
        self.rollout.withdraw(name)

    async def sync_kms(self, names: Iterable[str]) -> None:
        """Apply the KM workload of each named node as its spec and its device links now say;
        one whose pod template changes waits for its turn in the rollout.

        One node at a time under its lock, rendering inside the lock: of two syncs racing, the
        later one writes last and from the newer state.
        """
        runtime = self.runtime
        for name in names:
            async with self._locks[name]:
                node = runtime.resources.nodes.get(name)
                if node is None or runtime.status.ref(NODE, name) is None:
                    continue
                children = desired_children(runtime, node)
                secret_owner = owner_of(runtime, NODE, name)
                try:
                    if await asyncio.to_thread(_restarts_km, runtime.kube, children):
                        self._await_turn(name)
                        continue
                    self.rollout.withdraw(name)
                    await asyncio.to_thread(_apply_km, runtime, name, children, secret_owner)
                except (KubeError, OSError) as e:
                    runtime.metrics.errors(NODE).inc()
                    self.applied.discard((NODE, name))
                    self.problems[NODE].wait(name, "WorkloadNotApplied",
                                             f"QKDNode {name}: applying its KM workload failed: {e}")
                self.applied.add((NODE, name))
                self.problems[NODE].solved(name)

    def _await_turn(self, name: str) -> None:
        self.applied.discard((NODE, name))
        self.problems[NODE].note(name, "RollPending", f"QKDNode {name}: its KM's pod template changes; the KMs "
                                 "restart one at a time, and this one waits its turn", permanent=False)
        self.rollout.request(name)

    async def _queue_template_changes(self) -> None:
        """The rollout's survey: every KM whose pod template changes waits its turn."""
        runtime = self.runtime
        for name, node in sorted(runtime.resources.nodes.items()):
            if runtime.status.ref(NODE, name) is None:
                continue
            try:
                if await asyncio.to_thread(_restarts_km, runtime.kube, desired_children(runtime, node)):
                    self._await_turn(name)
            except (KubeError, OSError) as e:
                log.warning("QKDNode %s: reading its StatefulSet failed; its next sync rolls it if it must: %s", name, e)

    async def _roll(self, name: str) -> bool:
        """The rollout's turn of the KM of ``name``: its workload as its node now asks; True when
        its pod template changed, so that the KM restarts."""
        runtime = self.runtime
        async with self._locks[name]:
            node = runtime.resources.nodes.get(name)
            if node is None or runtime.status.ref(NODE, name) is None:
                return False
            children = desired_children(runtime, node)
            try:
                restarts = await asyncio.to_thread(_restarts_km, runtime.kube, children)
                await asyncio.to_thread(_apply_km, runtime, name, children, owner_of(runtime, NODE, name))
            except (KubeError, OSError) as e:
                runtime.metrics.errors(NODE).inc()
                self.applied.discard((NODE, name))
                self.problems[NODE].note(name, "WorkloadNotApplied",
                                         f"QKDNode {name}: applying its KM workload failed: {e}", permanent=False)
                raise
            self.applied.add((NODE, name))
            self.problems[NODE].solved(name)
            return restarts

    async def guard(self, name: str, stopped: kopf.DaemonStopped, logger: logging.Logger) -> None:
        """The kopf daemon of one QKDNode: its StatefulSet exists, or is created again."""
        runtime = self.runtime
        while not stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(runtime.options.workload_check_s):
                    # Not stopped.wait(timeout): kopf's own time limit runs in a task of its own,
                    # which fails with TimeoutError, and fails the operator's exit, when the daemon
                    # is cancelled just as the limit expires.
                    await stopped.wait()
            if stopped or name not in runtime.resources.nodes:
                continue
            try:
                if await asyncio.to_thread(runtime.kube.get, STATEFULSETS, km_name(name)) is None:
                    runtime.host.km_lost(name)
                    self.applied.discard((NODE, name))
                    logger.warning(f"StatefulSet {km_name(name)} of QKDNode {name} is missing; creating it again")
                    await self.sync_kms([name])
            except (KubeError, OSError) as e:
                runtime.metrics.errors(NODE).inc()
                logger.warning(f"checking the KM workload of QKDNode {name} failed: {e}")
            except kopf.TemporaryError as e:
                logger.warning(str(e))

    def show_node(self, name: str, status: QKDNodeStatus, generation: int | None) -> bool:
        if (NODE, name) in self.applied:
            status.set_condition(ConditionType.CONFIGURED, "True", "WorkloadApplied",
                                 f"StatefulSet, Service and ConfigMap {km_name(name)} and Secret {km_tls_secret(name)} "
                                 "applied", observed_generation=generation)
        else:
            self._not_applied(NODE, name, status, generation, "KM workload not applied yet")
        return False

    # --- QKDLink ------------------------------------------------------------------------

    async def link_changed(self, name: str) -> None:
        """The link was accepted: its module pair as it says, and both its KMs mounting what it
        needs of them (the Secrets of its devices, or nothing)."""
        link = self.runtime.resources.links[name]
        self._link_ends[name] = tuple(link.spec.nodes)
        await self._sync_modules(link)
        await self.sync_kms(link.spec.nodes)
        self.applied.add((LINK, name))
        self.problems[LINK].solved(name)

    async def link_deleted(self, name: str) -> None:
        """The link was removed from the core: its modules go, and its KMs unmount its device Secrets."""
        try:
            await asyncio.to_thread(_delete_modules, self.runtime.kube, name)
        except (KubeError, OSError) as e:
            self.runtime.metrics.errors(LINK).inc()
            raise kopf.TemporaryError(f"QKDLink {name}: removing its emulated modules failed: {e}",
                                      delay=self.runtime.options.retry_delay_s) from None
        self.applied.discard((LINK, name))
        self.problems[LINK].forget(name)
        # Not rendered in this operator's lifetime: any KM may still mount its Secrets.
        ends = self._link_ends.pop(name, None) or list(self.runtime.resources.nodes)
        try:
            await self.sync_kms(ends)
        except kopf.TemporaryError as e:
            log.warning("after deleting QKDLink %s, its KMs keep its device Secrets mounted until their next sync: %s",
                        name, e)

    async def _sync_modules(self, link: QKDLink) -> None:
        runtime = self.runtime
        children = module_children(runtime, link)
        try:
            if children:
                await asyncio.to_thread(_apply_modules, runtime, link, children, owner_of(runtime, LINK, link.name))
            else:
                await asyncio.to_thread(_delete_modules, runtime.kube, link.name)
        except (KubeError, OSError) as e:
            runtime.metrics.errors(LINK).inc()
            self.applied.discard((LINK, link.name))
            self.problems[LINK].wait(link.name, "WorkloadNotApplied",
                                     f"QKDLink {link.name}: applying its modules failed: {e}")

    def show_link(self, name: str, status: QKDLinkStatus, generation: int | None) -> bool:
        if (LINK, name) in self.applied:
            link = self.runtime.resources.links.get(name)
            applied = "emulated module pair and both KMs applied" if link is not None and link.spec.emulated \
                else "both KMs pointed at the QKD devices"
            status.set_condition(ConditionType.CONFIGURED, "True", "Applied", applied, observed_generation=generation)
        else:
            self._not_applied(LINK, name, status, generation, "not applied yet")
        return False

    def _not_applied(self, kind: str, name: str, status: Any, generation: int | None, pending: str) -> None:
        problem = self.problems[kind].get(name)
        reason, message = (problem.reason, problem.message) if problem else ("Pending", pending)
        status.set_condition(ConditionType.CONFIGURED, "False", reason, message, observed_generation=generation)


# --- the calls, in worker threads ---------------------------------------------------------


def _restarts_km(kube: Kube, children: tuple[dict[str, Any], ...]) -> bool:
    """Whether applying a KM's ``children`` changes the pod template of a StatefulSet there is."""
    statefulset = children[-1]
    actual = kube.get(STATEFULSETS, statefulset["metadata"]["name"])
    return actual is not None and template_hash(actual) != template_hash(statefulset)


def _apply_km(runtime: Runtime, name: str, children: tuple[dict[str, Any], ...],
              owner: dict[str, Any] | None) -> None:
    kube = runtime.kube
    secret = kube.get(SECRETS, km_tls_secret(name))
    hosts = km_server_names(name, runtime.namespace)
    if secret is None or _stale(secret, runtime.ca) or not _names_all(secret, hosts):
        issued = runtime.ca.issue(identity.km(name), f"cluster-km-{name}", server_names=hosts)
        _write_tls_secret(kube, secret, build_tls_secret(km_tls_secret(name), node_labels(name), {
            "ca.crt": runtime.ca.cert_path.read_bytes(), "tls.crt": issued.cert.read_bytes(),
            "tls.key": issued.key.read_bytes(),
        }), owner)
    configmap, service, replicas_service, statefulset = children
    kube.ensure(CONFIGMAPS, configmap)
    kube.ensure(SERVICES, service)
    kube.ensure(SERVICES, replicas_service)
    kube.ensure(STATEFULSETS, statefulset)


def _stale(secret: dict[str, Any], ca: DevCA) -> bool:
    """Whether a TLS Secret was issued from another CA than the operator's."""
    issued_by = (secret.get("data") or {}).get("ca.crt")
    return issued_by is None or base64.b64decode(issued_by) != ca.cert_path.read_bytes()


def _names_all(secret: dict[str, Any], hosts: Iterable[str]) -> bool:
    """Whether a TLS Secret's certificate names every one of ``hosts`` (one issued before the KM
    had replicas lacks their names, and gets issued again)."""
    cert = (secret.get("data") or {}).get("tls.crt")
    if cert is None:
        return False
    try:
        names = x509.load_pem_x509_certificate(base64.b64decode(cert)).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except (ValueError, x509.ExtensionNotFound):
        return False
    return set(hosts) <= set(names)


def _write_tls_secret(kube: Kube, actual: dict[str, Any] | None, secret: dict[str, Any],
                      owner: dict[str, Any] | None) -> None:
    """Create ``secret``, or put its files in place of the stale ones of ``actual``."""
    if actual is not None:
        kube.patch(SECRETS, secret["metadata"]["name"], {"data": secret["data"]})
        return
    if owner is not None:
        kopf.adopt(secret, owner=owner)
    kube.ensure(SECRETS, secret, create_only=True)


def _delete_km(kube: Kube, name: str) -> None:
    for kind, child in ((STATEFULSETS, km_name(name)), (SERVICES, km_name(name)), (SERVICES, km_replicas_service(name)),
                        (CONFIGMAPS, km_name(name)), (SECRETS, km_tls_secret(name))):
        kube.delete(kind, child)


def _apply_modules(runtime: Runtime, link: QKDLink, children: tuple[dict[str, Any], ...],
                   owner: dict[str, Any] | None) -> None:
    kube = runtime.kube
    secret = kube.get(SECRETS, module_tls_secret(link.name))
    if secret is None or _stale(secret, runtime.ca):
        hosts = service_hosts(module_name(link.name), runtime.namespace)
        files = {"ca.crt": runtime.ca.cert_path.read_bytes()}
        for end in ("a", "b"):
            issued = runtime.ca.issue(identity.module(link.name, end), f"cluster-module-{link.name}-{end}",
                                      server_names=hosts)
            files[f"{end}.crt"], files[f"{end}.key"] = issued.cert.read_bytes(), issued.key.read_bytes()
        _write_tls_secret(kube, secret, build_tls_secret(module_tls_secret(link.name), link_labels(link.name), files),
                          owner)
    configmap, service, deployment = children
    kube.ensure(CONFIGMAPS, configmap)
    kube.ensure(SERVICES, service)
    kube.ensure(DEPLOYMENTS, deployment)


def _delete_modules(kube: Kube, name: str) -> None:
    for kind, child in ((DEPLOYMENTS, module_name(name)), (SERVICES, module_name(name)),
                        (CONFIGMAPS, module_name(name)), (SECRETS, module_tls_secret(name))):
        kube.delete(kind, child)
