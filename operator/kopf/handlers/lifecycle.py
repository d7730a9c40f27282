"""The operator's start and stop: kopf settings, assembling the controllers, and rebuilding state.

The operator is the control-plane host (``vqkd.operator.host``) with the controllers of
``handlers/`` plugged in, one per concern: a resource handler per kind (QKDNode, QKDLink,
UserProfile, KeySession into the control core), the workloads, the KM replicas (autoscaler
and counts), KM health and replacement, and the records of sessions applications open;
``presentation`` shows what the core and monitoring find. They share only the services of
``Runtime`` and coordinate through the control core and resource status.

At start the control core is empty. Every QKDNode, QKDLink and UserProfile is loaded into
it, every KM is pushed its topology and polled once, then every KeySession is applied,
which pushes each Active session's configuration to the KMs on its path again (pushes are
idempotent and versioned, and a KM's topology goes before its sessions).
Only then does the ControlPlane service accept KM calls, so an application's open never
races the restore. kopf's resume handlers then bring each resource's children and status
up to date.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import kubernetes
from prometheus_client import CollectorRegistry

from vqkd.km import identity
from vqkd.km.pki import LOOPBACK_NAMES, DevCA
from vqkd.km.tls import TLSFiles
from vqkd.operator.adapters.kms import GrpcKMs
from vqkd.operator.host import Cadence, ControlPlaneHost, KMClient
from vqkd.operator.kopf.endpoints import ClusterEndpoints, EndpointResolver, LocalEndpoints
from vqkd.operator.kopf.handlers.application_sessions import ApplicationSessions
from vqkd.operator.kopf.handlers.km_health import KMHealth
from vqkd.operator.kopf.handlers.links import LinkHandler
from vqkd.operator.kopf.handlers.nodes import NodeHandler
from vqkd.operator.kopf.handlers.presentation import Measurements, Transitions
from vqkd.operator.kopf.handlers.replicas import Replicas
from vqkd.operator.kopf.handlers.sessions import SessionHandler
from vqkd.operator.kopf.handlers.users import Tokens, UserHandler
from vqkd.operator.kopf.handlers.workloads import Workloads
from vqkd.operator.kopf.kube import SECRETS, VQKD, Kube, KubeError
from vqkd.operator.kopf.manifests import CONTROL_PLANE_SERVICE, service_hosts
from vqkd.operator.kopf.metrics import OperatorMetrics
from vqkd.operator.kopf.runtime import Background, OperatorOptions, Runtime
from vqkd.operator.kopf.status import StatusWriter, in_parts
from vqkd.operator.resources.network import Network
from vqkd.operator.resources.models import QKDLinkStatus, QKDNodeStatus, UserProfileStatus

FINALIZER = "vqkd.io/finalizer"
ANNOTATIONS_PREFIX = "vqkd.io"
CA_SECRET = "vqkd-ca"
CONNECT_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


def configure(settings: kopf.OperatorSettings, options: OperatorOptions) -> None:
    """kopf's settings, all explicit."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATIONS_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATIONS_PREFIX, key="last-handled-configuration")
    # One namespace, named up front: no cluster-wide list or watch of namespaces and CRDs
    # (the CRDs must exist when the operator starts).
    settings.scanning.disabled = True
    settings.watching.server_timeout = options.watch_timeout_s
    settings.watching.client_timeout = options.watch_timeout_s + 30
    settings.watching.connect_timeout = CONNECT_TIMEOUT_S
    settings.networking.request_timeout = 30
    # kopf's own log lines become Events from WARNING up; vqkd posts every transition itself.
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True


@dataclass(frozen=True)
class Operator:
    """The running operator: its services and a controller per concern."""

    runtime: Runtime
    nodes: NodeHandler
    links: LinkHandler
    users: UserHandler
    sessions: SessionHandler
    applications: ApplicationSessions
    workloads: Workloads
    replicas: Replicas
    km_health: KMHealth

    @contextmanager
    def reconciling(self, kind: str) -> Iterator[None]:
        """One reconciliation of a resource of ``kind``, counted by how it ended."""
        with self.runtime.metrics.reconcile(kind):
            yield

    async def stop(self) -> None:
        runtime = self.runtime
        await runtime.host.stop()
        await runtime.background.stop()
        await asyncio.to_thread(runtime.kube.close)


def assemble(options: OperatorOptions, kube: Kube, endpoints: EndpointResolver, ca: DevCA,
             controller_tls: TLSFiles, kms: KMClient) -> Operator:
    """The host and the controllers, plugged together; ``kms`` is how the host reaches the KMs."""
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    resources = Network(namespace=options.namespace)
    tokens = Tokens()

    def module_metrics(link: str) -> str | None:
        declared = resources.links.get(link)
        return endpoints.module_metrics(link) if declared is not None and declared.spec.emulated else None

    host = ControlPlaneHost(
        kms, controller_tls, options.control_plane_listen,
        module_metrics=module_metrics,
        cadence=Cadence(poll_interval_s=options.poll_interval_s, replace_after_s=options.replace_after_s),
        admission=options.admission, monitoring=options.monitoring, namespace=options.namespace,
        token_lookup=tokens.lookup, registry=registry,
    )
    host.track(resources, options.km_addressing)
    status = StatusWriter(kube, on_error=lambda kind: metrics.errors(kind).inc())
    runtime = Runtime(options, kube, endpoints, ca, host, metrics, status, resources,
                      Background(on_error=lambda: metrics.errors("Operator").inc()))
    # Subscribed to the core's events first, so a session's record is named before its Events are posted.
    applications = ApplicationSessions(runtime)
    Transitions(runtime, applications)
    operator = Operator(
        runtime=runtime, nodes=NodeHandler(runtime), links=LinkHandler(runtime), users=UserHandler(runtime, tokens),
        sessions=SessionHandler(runtime, applications), applications=applications, workloads=Workloads(runtime),
        replicas=Replicas(runtime), km_health=KMHealth(runtime),
    )
    host.plug(replacer=operator.km_health,
              listeners=[operator.km_health, operator.workloads.rollout, Measurements(runtime, applications)])
    # Each status in the parts of the concerns owning them; a later part reads what an earlier one wrote.
    status.show("QKDNode", in_parts(QKDNodeStatus, operator.nodes.show, operator.workloads.show_node,
                                    operator.km_health.show, operator.replicas.show))
    status.show("QKDLink", in_parts(QKDLinkStatus, operator.links.show_state, operator.workloads.show_link,
                                    operator.links.show_ready))
    status.show("UserProfile", in_parts(UserProfileStatus, operator.users.show))
    status.show("KeySession", operator.sessions.render)
    return operator


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger) -> None:
    options: OperatorOptions = memo.get("options") or OperatorOptions.from_env()
    configure(settings, options)
    try:
        kube = await asyncio.to_thread(Kube.connect, options.kubeconfig, options.namespace)
        endpoints = endpoints_for(options)
    except (kubernetes.config.ConfigException, OSError, ValueError) as e:
        raise kopf.PermanentError(f"vqkd operator cannot start: {e}") from None
    operator: Operator | None = None
    try:
        try:
            ca = await asyncio.to_thread(load_ca, kube, Path(options.state_dir) / "pki")
        except (KubeError, OSError) as e:
            raise kopf.TemporaryError(f"reading the CA from Secret {CA_SECRET} failed: {e}", delay=5) from None
        hosts = service_hosts(CONTROL_PLANE_SERVICE, options.namespace) + LOOPBACK_NAMES
        controller = await asyncio.to_thread(ca.issue, identity.controller(), "controller", hosts)
        tls = TLSFiles(ca.cert_path, controller.cert, controller.key)
        operator = assemble(options, kube, endpoints, ca, tls, GrpcKMs(endpoints.km_grpc, tls))
        runtime = operator.runtime
        await restore(operator)
        runtime.background.spawn(runtime.status.run(), name="status writer")
        runtime.host.start()
        try:
            await runtime.host.serve()
            if options.metrics_listen:
                memo.metrics_server = await runtime.metrics.serve(options.metrics_listen)
        except OSError as e:
            raise kopf.PermanentError(f"vqkd operator cannot serve: {e}") from None
    except BaseException:
        await cleanup(memo)
        if operator is not None:
            await operator.stop()
        else:
            await asyncio.to_thread(kube.close)
        raise
    memo.operator = operator
    core = operator.runtime.core
    logger.info(f"vqkd operator serving namespace {options.namespace}: {len(core.nodes())} nodes, "
                f"{len(core.links())} links, {len(core.sessions())} sessions restored; "
                f"ControlPlane on {options.control_plane_listen}")


async def cleanup(memo: kopf.Memo) -> None:
    """Stop serving metrics, then the host (its server and cadence), the controllers' work and the clients."""
    metrics = memo.pop("metrics_server", None)
    if metrics is not None:
        await metrics.cleanup()
    operator: Operator | None = memo.pop("operator", None)
    if operator is not None:
        await operator.stop()


def login(memo: kopf.Memo) -> kopf.ConnectionInfo:
    """kopf connects with the credentials of the operator's own client."""
    return memo.operator.runtime.kube.connection_info()


def endpoints_for(options: OperatorOptions) -> EndpointResolver:
    if options.endpoints is not None:
        return options.endpoints
    if options.endpoints_file:
        return LocalEndpoints.from_file(options.endpoints_file)
    return ClusterEndpoints(options.namespace)


def load_ca(kube: Kube, directory: Path) -> DevCA:
    """The operator's CA from Secret ``vqkd-ca``, created on first start when there is none.

    The Secret holds ``ca.crt`` and ``ca.key`` (as the operator creates it), or is a
    kubernetes.io/tls Secret of a CA certificate (``tls.crt``, ``tls.key``, as cert-manager
    writes one). Certificates are issued into ``directory``; a leaf issued by another CA
    is never reused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    secret = kube.get(SECRETS, CA_SECRET)
    if secret is None:
        ca = DevCA.load_or_create(directory, common_name="vqkd operator CA")
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CA_SECRET}, "type": "Opaque",
                "data": _encoded({"ca.crt": ca.cert_path.read_bytes(),
                                  "ca.key": (directory / "ca.key").read_bytes()})}
        try:
            kube.create(SECRETS, body)
            return ca
        except KubeError as e:
            if not e.conflict:
                raise
            secret = kube.get(SECRETS, CA_SECRET) or {}  # another operator process created it first
    files = _decoded(secret.get("data") or {})
    for cert_name, key_name in (("ca.crt", "ca.key"), ("tls.crt", "tls.key")):
        if cert_name in files and key_name in files:
            cert, key = files[cert_name], files[key_name]
            break
    else:
        raise KubeError(422, "Invalid", f"Secret {CA_SECRET} must hold ca.crt and ca.key, or tls.crt and tls.key "
                                        f"of a CA certificate; it has {', '.join(sorted(files)) or 'nothing'}",
                        f"read Secret {CA_SECRET}")
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if not cert_path.exists() or cert_path.read_bytes() != cert:
        for stale in directory.iterdir():
            stale.unlink()
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
    return DevCA.load_or_create(directory)


def _encoded(files: dict[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(data).decode() for name, data in files.items()}


def _decoded(data: dict[str, str]) -> dict[str, bytes]:
    return {name: base64.b64decode(value) for name, value in data.items()}


async def restore(operator: Operator) -> None:
    """Load every resource into the control core, in the order references need."""
    runtime = operator.runtime
    bodies = {}
    for kind in ("QKDNode", "QKDLink", "UserProfile", "KeySession"):
        try:
            bodies[kind] = await asyncio.to_thread(runtime.kube.list, VQKD[kind])
        except (KubeError, OSError) as e:
            raise kopf.TemporaryError(f"listing {kind} resources failed: {e}", delay=5) from None
    handlers = {"QKDNode": operator.nodes.reconcile, "QKDLink": operator.links.reconcile,
                "UserProfile": operator.users.reconcile}
    for kind, reconcile in handlers.items():
        for body in bodies[kind]:
            await _restore_one(operator, kind, body, reconcile)
    await runtime.host.topologies.refresh()
    await runtime.host.poll()
    for body in bodies["KeySession"]:
        await _restore_one(operator, "KeySession", body, operator.sessions.reconcile)


async def _restore_one(operator: Operator, kind: str, body: dict[str, Any], reconcile) -> None:
    try:
        with operator.reconciling(kind):
            await reconcile(body)
    except (kopf.PermanentError, kopf.TemporaryError) as e:
        # Recorded as the resource's condition; its resume handler tries again.
        log.info("%s %s not restored yet: %s", kind, body["metadata"]["name"], e)
