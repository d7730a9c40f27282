"""The operator's start and stop: kopf settings, the runtime, and rebuilding state from resources.

At start the control core is empty. Every QKDNode, QKDLink and UserProfile is loaded into
it, the KMs are polled once, then every KeySession is applied, which pushes each Active
session's configuration to the KMs on its path again (pushes are idempotent and versioned).
Only then does the ControlPlane service accept KM calls, so an application's open never
races the restore. kopf's resume handlers then bring each resource's children and status
up to date.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import kopf
import kubernetes

from vqkd.km import identity
from vqkd.km.pki import LOOPBACK_NAMES, DevCA
from vqkd.km.tls import TLSFiles
from vqkd.operator.kopf.endpoints import ClusterEndpoints, EndpointResolver, LocalEndpoints
from vqkd.operator.kopf.handlers import controlplane, links, monitoring, nodes, sessions, users
from vqkd.operator.kopf.kube import SECRETS, VQKD, Kube, KubeError
from vqkd.operator.kopf.runtime import OperatorOptions, Runtime
from vqkd.operator.kopf.manifests import CONTROL_PLANE_SERVICE, service_hosts
from vqkd.operator.adapters.sampling import LinkMonitor

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


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger) -> None:
    options: OperatorOptions = memo.get("options") or OperatorOptions.from_env()
    configure(settings, options)
    try:
        kube = await asyncio.to_thread(Kube.connect, options.kubeconfig, options.namespace)
        endpoints = endpoints_for(options)
    except (kubernetes.config.ConfigException, OSError, ValueError) as e:
        raise kopf.PermanentError(f"vqkd operator cannot start: {e}") from None
    runtime: Runtime | None = None
    try:
        try:
            ca = await asyncio.to_thread(load_ca, kube, Path(options.state_dir) / "pki")
        except (KubeError, OSError) as e:
            raise kopf.TemporaryError(f"reading the CA from Secret {CA_SECRET} failed: {e}", delay=5) from None
        hosts = service_hosts(CONTROL_PLANE_SERVICE, options.namespace) + LOOPBACK_NAMES
        controller = await asyncio.to_thread(ca.issue, identity.controller(), "controller", hosts)
        runtime = Runtime(options, kube, endpoints, ca, TLSFiles(ca.cert_path, controller.cert, controller.key))
        runtime.status.renderers = {
            "QKDNode": lambda name, previous: nodes.status_of(runtime, name, previous),
            "QKDLink": lambda name, previous: links.status_of(runtime, name, previous),
            "UserProfile": lambda name, previous: users.status_of(runtime, name, previous),
            "KeySession": lambda name, previous: sessions.status_of(runtime, name, previous),
        }
        runtime.on_application_session = lambda session: sessions.record_application_session(runtime, session)
        monitor = monitoring.build_monitor(runtime)
        await restore(runtime, monitor)
        runtime.spawn(runtime.status.run(), name="status writer")
        runtime.spawn(monitoring.poll_forever(runtime, monitor), name="monitoring")
        try:
            memo.control_plane = await controlplane.start(runtime)
            memo.metrics_server = await runtime.metrics.serve(options.metrics_listen) if options.metrics_listen else None
        except OSError as e:
            raise kopf.PermanentError(f"vqkd operator cannot serve: {e}") from None
    except BaseException:
        await cleanup(memo)
        if runtime is not None:
            await runtime.stop()
        else:
            await asyncio.to_thread(kube.close)
        raise
    memo.runtime = runtime
    logger.info(f"vqkd operator serving namespace {options.namespace}: {len(runtime.core.topology.nodes)} nodes, "
                f"{len(runtime.core.topology.links)} links, {len(runtime.core.sessions())} sessions restored; "
                f"ControlPlane on {options.control_plane_listen}")


async def cleanup(memo: kopf.Memo) -> None:
    """Stop serving, then stop the runtime's tasks and close its clients."""
    server = memo.pop("control_plane", None)
    if server is not None:
        await controlplane.stop(server)
    metrics = memo.pop("metrics_server", None)
    if metrics is not None:
        await metrics.cleanup()
    runtime: Runtime | None = memo.pop("runtime", None)
    if runtime is not None:
        await runtime.stop()


def login(memo: kopf.Memo) -> kopf.ConnectionInfo:
    """kopf connects with the credentials of the operator's own client."""
    return memo.runtime.kube.connection_info()


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


async def restore(runtime: Runtime, monitor: LinkMonitor) -> None:
    """Load every resource into the control core, in the order references need."""
    bodies = {}
    for kind in ("QKDNode", "QKDLink", "UserProfile", "KeySession"):
        try:
            bodies[kind] = await asyncio.to_thread(runtime.kube.list, VQKD[kind])
        except (KubeError, OSError) as e:
            raise kopf.TemporaryError(f"listing {kind} resources failed: {e}", delay=5) from None
    apply = {"QKDNode": lambda body: nodes.reconcile(runtime, body, workloads=False),
             "QKDLink": lambda body: links.reconcile(runtime, body, workloads=False),
             "UserProfile": lambda body: users.reconcile(runtime, body)}
    for kind, reconcile in apply.items():
        for body in bodies[kind]:
            await _restore_one(kind, body, reconcile)
    await monitoring.poll_once(runtime, monitor)
    for body in bodies["KeySession"]:
        await _restore_one("KeySession", body, lambda body: sessions.reconcile(runtime, body))


async def _restore_one(kind: str, body: dict[str, Any], reconcile) -> None:
    try:
        await reconcile(body)
    except (kopf.PermanentError, kopf.TemporaryError) as e:
        # Recorded as the resource's condition; its resume handler tries again.
        log.info("%s %s not restored yet: %s", kind, body["metadata"]["name"], e)
